"""Models by name (edgelm.hub) and the local store (edgelm.store), against a local stand-in of the Hub.

The real huggingface_hub client runs unchanged; HF_ENDPOINT points at tests/hub_standin.py's servers on
127.0.0.1.  Every test has its own HF_HOME and EDGELM_HOME under tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgelm
from edgelm import hub, store
from edgelm.errors import DoesNotFitError, DownloadCorruptError, HubError, ModelNotFoundError, QuantNotFoundError
from edgelm.sources import resolve_model_path

from .conftest import run_cli
from .hub_standin import FakeHub, make_gguf, online_hub

Q8 = make_gguf(file_type=7, weight_bytes=2 << 20, name="tiny")  # general.file_type 7 = Q8_0
Q4 = make_gguf(file_type=15, weight_bytes=1 << 20, name="tiny")  # 15 = Q4_K_M
Q2 = make_gguf(file_type=10, weight_bytes=512 << 10, name="tiny")  # 10 = Q2_K


@pytest.fixture
def env(tmp_path, monkeypatch):
    with online_hub(tmp_path, monkeypatch, private_caches=True) as fake:
        yield fake


@pytest.fixture
def gguf_repo(env):
    env.add("org/repo", {"tiny-Q8_0.gguf": Q8, "tiny-Q4_K_M.gguf": Q4, "tiny-Q2_K.gguf": Q2, "README.md": b"# tiny\n"})
    return env


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cdn_gets(fake: FakeHub, data: bytes) -> list:
    return [r for r in fake.requests("cdn", "GET") if r[2].endswith(sha(data))]


# --- names ----------------------------------------------------------------------------------------------

def test_parse_reference():
    p = hub.parse_reference
    assert p("org/repo") == hub.Reference("org/repo", None)
    assert p("bartowski/SmolLM2-135M-Instruct-GGUF:q4_k_m") == hub.Reference("bartowski/SmolLM2-135M-Instruct-GGUF",
                                                                              "q4_k_m")
    assert p("hf.co/org/repo:Q8_0") == hub.Reference("org/repo", "Q8_0")
    assert p("https://huggingface.co/org/repo") == hub.Reference("org/repo", None)
    assert p("org/repo:latest") == hub.Reference("org/repo", None)
    assert p("microsoft/Phi-3-mini-4k-instruct-onnx:cpu_and_mobile/cpu-int4").quant == "cpu_and_mobile/cpu-int4"
    for not_a_name in ("model.gguf", "models/model.gguf", "./org/repo", "/abs/path", "a/b/c", "C:/models/x",
                       "org/repo:", "org/..", "org/repo:../x", "", "org/model.onnx", None, 3):
        assert p(not_a_name) is None, not_a_name


def test_quant_labels_and_candidates():
    label = hub.quant_label
    assert label("Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert label("smollm2-135m-instruct-q8_0.gguf") == "Q8_0"
    assert label("model.IQ4_XS.gguf") == "IQ4_XS"
    assert label("Qwen3-8B-UD-Q4_K_XL-00001-of-00002.gguf") == "UD-Q4_K_XL"
    assert label("gemma-3-270m-it-bf16.gguf") == "BF16"
    assert label("gpt-oss-20b-MXFP4.gguf") == "MXFP4"
    assert label("Qwen2.5-0.5B.gguf") is None  # "Qwen2" is not Q2
    files = {"a-Q8_0.gguf": 800, "Q4_K_M/a-Q4_K_M-00001-of-00003.gguf": 100, "Q4_K_M/a-Q4_K_M-00002-of-00003.gguf": 100,
             "Q4_K_M/a-Q4_K_M-00003-of-00003.gguf": 50, "b-Q2_K-00001-of-00002.gguf": 10, "mmproj-a-f16.gguf": 90,
             "README.md": 5}
    cands = {c.label: c for c in hub.candidates(files)}
    assert set(cands) == {"Q8_0", "Q4_K_M", "Q2_K"}  # no vision projector
    assert cands["Q4_K_M"].files == [f"Q4_K_M/a-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert cands["Q4_K_M"].size_bytes == 250 and cands["Q4_K_M"].entry.endswith("00001-of-00003.gguf")
    assert cands["Q2_K"].missing == ["b-Q2_K-00002-of-00002.gguf"]
    onnx = hub.candidates({"cpu-int4/genai_config.json": 1, "cpu-int4/model.onnx": 10, "cuda-fp16/genai_config.json": 1,
                           "cuda-fp16/model.onnx": 20, "README.md": 3})
    assert [c.label for c in onnx] == ["cuda-fp16", "cpu-int4"] and onnx[1].files == ["cpu-int4/genai_config.json",
                                                                                      "cpu-int4/model.onnx"]


# --- pulling --------------------------------------------------------------------------------------------

def test_pull_by_quant_is_case_insensitive_and_fetches_only_that_file(gguf_repo, tmp_path):
    path = edgelm.pull("org/repo:q4_k_m", progress=False)
    cache = tmp_path / "hf" / "hub" / "models--org--repo"
    assert path.parent.parent == cache / "snapshots" and path.name == "tiny-Q4_K_M.gguf"
    assert path.read_bytes() == Q4
    assert path.resolve() == cache / "blobs" / sha(Q4)  # the HF cache layout, blob named by its sha256
    assert (cache / "refs" / "main").read_text() == path.parent.name
    assert [r[2] for r in gguf_repo.requests("cdn")] == [f"/blobs/{sha(Q4)}"]  # not Q8_0, Q2_K or the README
    assert not list(cache.glob("blobs/*.incomplete"))
    # a second pull asks the Hub for the revision, finds the file in place and downloads nothing
    pulled = hub.pull_model("org/repo:Q4_K_M", progress=False)
    assert pulled.path == path and pulled.downloaded_bytes == 0 and len(gguf_repo.requests("cdn")) == 1


def test_hf_hub_cache_and_a_progress_callable(gguf_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # read at the call, not at import
    seen = []
    path = edgelm.pull("org/repo:Q2_K", progress=lambda name, done, total: seen.append((name, done, total)))
    assert path.is_relative_to(tmp_path / "elsewhere") and not (tmp_path / "hf" / "hub").exists()
    assert seen[-1] == ("tiny-Q2_K.gguf", len(Q2), len(Q2))
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)


def test_pull_a_missing_quant_lists_the_ones_there_are(gguf_repo):
    with pytest.raises(QuantNotFoundError) as err:
        edgelm.pull("org/repo:Q5_K_M", progress=False)
    assert err.value.available == ["Q8_0", "Q4_K_M", "Q2_K"]
    assert "Q8_0" in str(err.value) and "Q2_K" in str(err.value) and "'Q5_K_M'" in str(err.value)
    assert isinstance(err.value, HubError)
    with pytest.raises(HubError, match="no repository 'org/nothing'"):
        edgelm.pull("org/nothing:Q4_K_M", progress=False)
    with pytest.raises(HubError, match="no revision 'v9'"):
        edgelm.pull("org/repo:Q4_K_M", revision="v9", progress=False)


def test_revision_pins_a_commit(gguf_repo):
    first = gguf_repo.repos["org/repo"].refs["main"]
    newer = make_gguf(file_type=15, weight_bytes=1 << 20, name="newer")
    gguf_repo.add("org/repo", {"tiny-Q4_K_M.gguf": newer})
    assert edgelm.pull("org/repo:Q4_K_M", progress=False).read_bytes() == newer
    old = edgelm.pull("org/repo:Q4_K_M", revision=first, progress=False)
    assert old.read_bytes() == Q4 and old.parent.name == first


def test_interrupted_download_resumes_and_is_checked(env, tmp_path):
    from huggingface_hub import constants

    # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB): cut after more than one
    big = make_gguf(file_type=7, weight_bytes=3 * constants.DOWNLOAD_CHUNK_SIZE, name="big")
    env.add("org/big", {"big-Q8_0.gguf": big})
    cut = int(1.5 * constants.DOWNLOAD_CHUNK_SIZE)
    env.cut(sha(big), at=cut)  # the connection drops there; the retry that follows gets a 503
    with pytest.raises(HubError, match="run the same command again to resume") as err:
        edgelm.pull("org/big:Q8_0", progress=False)
    assert not isinstance(err.value, DownloadCorruptError)
    blobs = tmp_path / "hf" / "hub" / "models--org--big" / "blobs"
    partial = blobs / f"{sha(big)}.incomplete"
    kept = partial.stat().st_size
    assert 0 < kept <= cut and not (blobs / sha(big)).exists()
    assert hub.find_cached(hub.Reference("org/big", "Q8_0")) is None  # nothing half-written is ever handed out
    path = edgelm.pull("org/big:Q8_0", progress=False)
    assert path.read_bytes() == big and not partial.exists()
    ranges = [r[3] for r in cdn_gets(env, big)]
    assert ranges[0] is None and ranges[-1] == f"bytes={kept}-"  # the second pull asked only for the rest
    assert env.bytes_served[sha(big)] == cut + len(big) - kept


def test_a_corrupted_download_is_deleted_and_refused(gguf_repo, tmp_path):
    gguf_repo.corrupt(sha(Q4), offset=len(Q4) - 100)
    with pytest.raises(DownloadCorruptError, match="has been deleted") as err:
        edgelm.pull("org/repo:Q4_K_M", progress=False)
    assert err.value.expected == sha(Q4)
    cache = tmp_path / "hf" / "hub" / "models--org--repo"
    assert not list(cache.glob("blobs/*")) and not list(cache.glob("snapshots/*/*.gguf"))
    del gguf_repo.corruptions[sha(Q4)]
    assert edgelm.pull("org/repo:Q4_K_M", progress=False).read_bytes() == Q4


def test_a_damaged_cached_file_is_deleted_before_use(gguf_repo):
    path = edgelm.pull("org/repo:Q4_K_M", progress=False)
    blob = path.resolve()
    with open(blob, "r+b") as fh:  # truncated on disk after the download
        fh.truncate(len(Q4) - 4096)
    with pytest.raises(DownloadCorruptError, match="truncated or corrupted"):
        resolve_model_path("org/repo:Q4_K_M")
    assert not blob.exists() and not path.exists()
    assert resolve_model_path("org/repo:Q4_K_M").read_bytes() == Q4  # pulled again


def test_split_files_are_fetched_together(env):
    parts = {f"big/model-Q4_K_M-0000{i}-of-00003.gguf": make_gguf(weight_bytes=256 << 10, name=f"part{i}")
             for i in (1, 2, 3)}
    env.add("org/split", {**parts, "model-Q8_0.gguf": Q8})
    path = edgelm.pull("org/split:Q4_K_M", progress=False)
    assert path.name == "model-Q4_K_M-00001-of-00003.gguf"  # the first part: llama.cpp opens the others
    for name, data in parts.items():
        assert (path.parent.parent / name).read_bytes() == data
    assert {r[2] for r in env.requests("cdn")} == {f"/blobs/{sha(d)}" for d in parts.values()}
    assert [m.name for m in store.list_models()] == ["org/split:Q4_K_M"]


def test_without_a_quant_the_largest_that_fits_is_chosen(gguf_repo, tmp_path):
    from edgelm.platforms.detect import Host

    def host(available: int) -> Host:
        return Host(os="linux", arch="x86_64", cpu={"model": "test", "features": [], "cores_usable": 2,
                                                    "performance_cores": 2},
                    memory={"total": available, "available": available}, board=None, gpu={}, backends={})

    # what the plan arithmetic says each file needs, read from local copies of the same files
    needs = {}
    for name, data in (("q8", Q8), ("q4", Q4), ("q2", Q2)):
        (tmp_path / f"{name}.gguf").write_bytes(data)
        needs[name] = edgelm.recommend(tmp_path / f"{name}.gguf", "auto", host=host(64 << 30),
                                       bandwidth_gbs=1.0).memory_bytes
    assert needs["q8"] > needs["q4"] > needs["q2"]
    # enough for Q4_K_M but not Q8_0 (usable = 90 % of available, plans keep 15 % head-room)
    available = int((needs["q4"] + (needs["q8"] - needs["q4"]) // 2) / 0.9 / 0.85)
    pulled = hub.pull_model("org/repo", host=host(available), progress=False)
    assert pulled.candidate.label == "Q4_K_M" and pulled.path.read_bytes() == Q4
    assert "the largest quantization in org/repo that fits" in pulled.reason
    # only a header was read from the smallest file, and only Q4_K_M downloaded in full
    header_reads = cdn_gets(gguf_repo, Q2)
    assert header_reads and all(r[3] and r[3].startswith("bytes=0-") for r in header_reads)
    assert cdn_gets(gguf_repo, Q8) == []
    assert hub.pull_model("org/repo", host=host(64 << 30), progress=False).candidate.label == "Q8_0"
    with pytest.raises(DoesNotFitError, match="No quantization in org/repo fits"):
        hub.pull_model("org/repo", host=host(16 << 20), progress=False)
    # a device profile instead of this machine: a Pi Zero 2 W has room for the largest of these tiny files
    assert hub.pull_model("org/repo", profile="raspberry-pi-zero-2-w", progress=False).candidate.label == "Q8_0"


def test_onnx_repository_gives_the_folder(env):
    files = {"cpu-int4/genai_config.json": b"{}", "cpu-int4/model.onnx": b"graph" * 100,
             "cpu-int4/model.onnx.data": b"\1" * 5000, "cpu-int4/tokenizer.json": b"{}",
             "cuda-fp16/genai_config.json": b"{}", "cuda-fp16/model.onnx": b"g" * 900, "README.md": b"readme"}
    env.add("org/onnx", files)
    path = edgelm.pull("org/onnx:int4", progress=False)
    assert path.is_dir() and path.name == "cpu-int4"
    assert sorted(p.name for p in path.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data",
                                                      "tokenizer.json"]
    assert (path / "model.onnx.data").read_bytes() == files["cpu-int4/model.onnx.data"]
    assert not (path.parent / "README.md").exists() and not (path.parent / "cuda-fp16").exists()
    with pytest.raises(HubError, match="several ONNX folders") as err:
        edgelm.pull("org/onnx", progress=False)
    assert "cpu-int4" in str(err.value) and "cuda-fp16" in str(err.value)
    env.add("org/onnx-top", {"edgelm.json": b"{}", "model.onnx": b"graph", "README.md": b"x"})
    top = edgelm.pull("org/onnx-top", progress=False)
    assert top.is_dir() and (top / "model.onnx").is_file() and top.name == env.repos["org/onnx-top"].refs["main"]


def test_repository_with_nothing_to_run_says_convert(env):
    env.add("org/checkpoint", {"config.json": b"{}", "model.safetensors": b"\0" * 64})
    with pytest.raises(HubError, match="no GGUF file and no ONNX folder") as err:
        edgelm.pull("org/checkpoint", progress=False)
    assert "edgelm convert org/checkpoint" in str(err.value)


# --- offline and by name --------------------------------------------------------------------------------

def test_offline_against_a_cache_filled_by_huggingface_hub_itself(gguf_repo, monkeypatch, tmp_path):
    from huggingface_hub import hf_hub_download

    # the cache as `hf download` leaves it (huggingface_hub's own downloader, its own layout)
    hf_hub_download("org/repo", "tiny-Q4_K_M.gguf", cache_dir=str(tmp_path / "hf" / "hub"),
                    endpoint=gguf_repo.endpoint)
    gguf_repo.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(gguf_repo.log)
    path = edgelm.pull("org/repo:Q4_K_M", progress=False)
    assert path.read_bytes() == Q4 and len(gguf_repo.log) == before
    assert hub.pull_model("org/repo", progress=False).candidate.label == "Q4_K_M"  # the only one cached
    with pytest.raises(HubError) as err:
        edgelm.pull("org/repo:Q8_0", progress=False)
    message = str(err.value)
    assert "is not in the Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message
    assert "The cache has Q4_K_M" in message and "edgelm pull org/repo:Q8_0" in message
    with pytest.raises(HubError, match="not in the Hugging Face cache"):
        edgelm.pull("org/other:Q4_K_M", progress=False)


def test_load_by_name_pulls_once_then_uses_the_cache_without_the_hub(gguf_repo, monkeypatch):
    resolve = resolve_model_path
    first = resolve("org/repo:Q2_K")
    assert first.read_bytes() == Q2
    gguf_repo.stop()  # the Hub is gone (no HF_HUB_OFFLINE): the cached copy is used as it is
    assert resolve("org/repo:q2_k") == first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("hf.co/org/repo:Q2_K") == first
    with pytest.raises(ModelNotFoundError):  # a path that does not exist is still "not found", not a Hub id
        resolve("missing/model.gguf")


def test_hub_unreachable_falls_back_to_the_cache(gguf_repo, monkeypatch):
    path = edgelm.pull("org/repo:Q4_K_M", progress=False)
    gguf_repo.stop()
    assert hub.pull_model("org/repo:Q4_K_M", progress=False).path == path  # `edgelm pull` with no network
    with pytest.raises(HubError, match="cannot be reached"):
        edgelm.pull("org/repo:Q8_0", progress=False)


def test_serve_names_models_by_reference(gguf_repo):
    from edgelm.server import model_names

    names = model_names(["org/repo:Q4_K_M", "small=org/repo:q2_k"])
    assert list(names) == ["org/repo:Q4_K_M", "small"]
    assert names["org/repo:Q4_K_M"].read_bytes() == Q4 and names["small"].read_bytes() == Q2


# --- the store ------------------------------------------------------------------------------------------

def test_list_and_rm(gguf_repo, tmp_path):
    edgelm.pull("org/repo:Q4_K_M", progress=False)
    edgelm.pull("org/repo:Q2_K", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    converted = out / "mine-q8_0.gguf"
    converted.write_bytes(Q8)
    store.record_output(converted)
    store.touch(converted)
    rows = {r.name: r for r in store.list_models()}
    assert set(rows) == {"org/repo:Q4_K_M", "org/repo:Q2_K", str(converted)}
    assert rows["org/repo:Q4_K_M"].quant == "Q4_K_M" and rows["org/repo:Q4_K_M"].size_bytes == len(Q4)
    assert rows["org/repo:Q4_K_M"].last_used is None and rows["org/repo:Q4_K_M"].source == "hub"
    assert rows[str(converted)].quant == "Q8_0" and rows[str(converted)].source == "converted"
    assert time.time() - rows[str(converted)].last_used < 60

    removed = store.remove("org/repo:q2_k")
    assert [p.name for p in removed] == ["tiny-Q2_K.gguf"]
    assert [r.name for r in store.list_models() if r.source == "hub"] == ["org/repo:Q4_K_M"]
    blobs = tmp_path / "hf" / "hub" / "models--org--repo" / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == [sha(Q4)]  # the Q2_K blob went with it
    store.remove(str(converted))
    assert not converted.exists() and str(converted) not in store.read_index()["outputs"]
    with pytest.raises(ModelNotFoundError, match="org/repo:Q4_K_M"):
        store.remove("org/repo:Q3_K_S")
    store.remove("org/repo")
    assert store.list_models() == [] and not (tmp_path / "hf" / "hub" / "models--org--repo").exists()


def test_converted_output_deleted_by_hand_drops_out_of_the_list(env, tmp_path):
    onnx = tmp_path / "model-onnx"
    onnx.mkdir()
    (onnx / "edgelm.json").write_text(json.dumps({"quantization": "int4"}))
    (onnx / "model.onnx").write_bytes(b"x" * 10)
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(Q2)
    store.record_output(onnx)
    store.record_output(gone)
    gone.unlink()
    rows = store.list_models()
    assert [(r.name, r.format, r.quant) for r in rows] == [(str(onnx), "onnx", "int4")]
    assert str(gone) not in store.read_index()["outputs"]


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (t, t))


def test_rm_stale_removes_killed_conversion_leftovers_only(env, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    out = folder / "out.gguf"
    out.write_bytes(Q2)
    store.record_output(out)
    old_convert = folder / ".out.gguf.k2j4_x9a.convert"
    old_convert.mkdir()
    (old_convert / "out-f16.gguf").write_bytes(b"half written")
    old_part = folder / ".out.gguf.ab12cd34.part"
    old_part.write_bytes(b"x")
    old_partial = folder / ".out-onnx.zz99yy88.partial"
    old_partial.mkdir()
    (old_partial / "model.onnx").write_bytes(b"x")
    fresh = folder / ".out.gguf.fresh123.convert"  # a conversion running now
    fresh.mkdir()
    busy = folder / ".out.gguf.busy4567.part"  # old, but a process still has it open
    busy.write_bytes(b"x")
    old_ref = folder / ".edgelm-ref-x1y2z3w4"  # the fp32 reference of an ONNX conversion's quality check
    old_ref.mkdir()
    mine = folder / ".hidden-notes.txt"  # not a conversion's temporary
    mine.write_text("keep")
    for p in (old_convert, old_part, old_partial, old_ref, busy, mine):
        _age(p, 3600)
    with open(busy, "rb"):
        assert [r.name for r in store.list_models()] == [str(out)]  # never listed
        dry = store.remove_all_stale(dry_run=True)
        removed = store.remove_all_stale()
    expected = {old_convert, old_part, old_partial, old_ref} | ({busy} if store.paths_in_use() is None else set())
    assert set(dry) == set(removed) == expected
    assert fresh.exists() and mine.exists() and out.exists()
    assert not any(p.exists() for p in expected)


def test_remove_stale_hook_before_a_conversion(env, tmp_path):
    folder = tmp_path / "fresh-folder"
    folder.mkdir()
    left = folder / ".x.gguf.q1w2e3r4.convert"
    left.mkdir()
    _age(left, 7200)
    assert store.remove_stale(folder) == [left] and not left.exists()
    assert str(folder) in store.read_index()["folders"]  # `edgelm rm --stale` will look here later
    assert store.remove_stale(folder) == []
    store.touch(folder / ".x.gguf.a1b2c3d4.part")  # a conversion loading its own temporary: not "used"
    assert store.read_index()["last_used"] == {}


def test_index_survives_corruption_and_concurrent_writers(env, tmp_path):
    home = tmp_path / "edgelm"
    home.mkdir(parents=True, exist_ok=True)
    (home / "store.json").write_text('{"outputs": {"/x": ')  # torn
    store.touch(tmp_path / "a.gguf")
    assert store.last_used(tmp_path / "a.gguf") is not None
    assert (home / "store.json.corrupt").exists()
    code = ("import sys; from edgelm import store\n"
            "for i in range(20): store.record_output(f'{sys.argv[1]}/w{sys.argv[2]}-{i}.gguf')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(w)], env=os.environ.copy())
             for w in range(3)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    outputs = store.read_index()["outputs"]
    assert len([k for k in outputs if "/w" in k]) == 60  # nobody's entries were lost
    assert not list(home.glob(".store.json.*.tmp"))


# --- the command line -----------------------------------------------------------------------------------

def test_cli_pull_list_rm(gguf_repo, tmp_path):
    from click.testing import CliRunner

    from edgelm.cli import main

    environ = {k: os.environ[k] for k in ("HF_HOME", "EDGELM_HOME", "HF_ENDPOINT", "XDG_CACHE_HOME")}
    r = run_cli("pull", "org/repo:Q4_K_M", env=environ, timeout=60)  # the installed command, as a user runs it
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == Q4 and "org/repo:Q4_K_M" in r.stderr
    r = run_cli("pull", "org/repo:IQ1_S", env=environ, timeout=60)
    assert r.returncode == 3 and "Q8_0 (2.0 MB), Q4_K_M (1.0 MB), Q2_K" in r.stderr
    runner = CliRunner()
    r = runner.invoke(main, ["list"])
    assert r.exit_code == 0 and "org/repo:Q4_K_M" in r.output and "never" in r.output, r.output
    r = runner.invoke(main, ["rm", "org/repo:Q3_K_S"])
    assert r.exit_code == 3 and "edgelm list" in r.output
    r = runner.invoke(main, ["rm", "org/repo:Q4_K_M"])
    assert r.exit_code == 0 and "tiny-Q4_K_M.gguf" in r.output
    assert store.list_models() == []
    r = runner.invoke(main, ["rm"])
    assert r.exit_code == 2 and "--stale" in r.output


# --- the real model, loaded by name ---------------------------------------------------------------------

@pytest.mark.slow
def test_load_by_name_generates_with_llama_cpp(env, default_gguf, smollm, monkeypatch):
    """Budget: ~10 s here (a 98 MB download over loopback, its sha256, one load of SmolLM2)."""
    env.add("org/smollm2", {"SmolLM2-135M-Instruct-Q4_1.gguf": default_gguf, "README.md": b"x"})
    prompt = "The capital of France is"
    with edgelm.load("org/smollm2:q4_1", n_ctx=2048) as m:
        assert Path(m.info.path).is_relative_to(Path(os.environ["HF_HOME"]))
        assert m.info.quantization == "Q4_1"
        by_name = m.generate(prompt, max_tokens=6, temperature=0).text
    assert by_name.strip() and by_name == smollm.generate(prompt, max_tokens=6, temperature=0).text
    assert store.list_models()[0].last_used is not None  # the load was noted
    env.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # afterwards: offline, from the cache
    assert resolve_model_path("org/smollm2:Q4_1") == Path(m.info.path)
