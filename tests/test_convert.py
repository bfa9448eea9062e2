"""edgelm.convert / `edgelm convert`: GGUF re-quantization with llama.cpp's quantizer, ONNX export, the quality
report and budgets, Hub resolution offline, and nothing half-written on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgelm
from edgelm.conversion import parse_fraction, parse_size

from .conftest import run_cli

CAPITAL = [{"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "What is the capital of France?"}]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_budget_parsing():
    assert parse_fraction("5%") == 0.05 and parse_fraction(0.02) == 0.02
    assert parse_size("120MB") == 120_000_000 and parse_size("1.5GB") == 1_500_000_000 and parse_size(7) == 7
    with pytest.raises(edgelm.InvalidParameterError, match="max_size"):
        parse_size("huge")
    with pytest.raises(edgelm.InvalidParameterError, match="max_ppl_increase"):
        parse_fraction("-3%")


def test_unknown_quantization_lists_the_known_ones(default_gguf, tmp_path):
    with pytest.raises(edgelm.UnknownQuantizationError) as err:
        edgelm.convert(str(default_gguf), quant="q4_x", output=str(tmp_path / "o.gguf"))
    assert "q4_k_m" in str(err.value) and "q8_0" in str(err.value)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_q8_0_report_keeps_quality_and_answers(default_gguf, tmp_path):
    out = tmp_path / "m-q8_0.gguf"
    r = edgelm.convert(str(default_gguf), quant="Q8_0", output=str(out))  # names are case-insensitive
    assert out.is_file() and leftovers(tmp_path) == ["m-q8_0.gguf"]
    d = r.to_dict()
    assert d["quant"] == "q8_0" and d["architecture"] == "llama" and d["size_bytes"] == out.stat().st_size
    assert 8.0 < d["bits_per_weight"] < 9.5
    assert abs(d["ppl_increase"]) < 0.01  # within 1 % of the reference
    assert d["tokens_per_second"] > 1 and d["peak_rss"] > 50 * 2**20
    with edgelm.load(out, n_ctx=512) as m:
        assert m.info.quantization == "Q8_0"
        assert "Paris" in m.chat(CAPITAL, temperature=0, max_tokens=20).text


@pytest.mark.slow
def test_quality_budget_failure_leaves_no_file(default_gguf, tmp_path):
    r = run_cli("convert", str(default_gguf), "--quant", "q4_0", "-o", str(tmp_path / "q4.gguf"),
                "--max-ppl-increase", "5%")
    assert r.returncode == 7, r.stderr
    assert "over the budget" in r.stderr and "was not kept" in r.stderr
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_auto_keeps_the_smallest_within_the_size_budget(default_gguf, tmp_path):
    r = run_cli("convert", str(default_gguf), "--quant", "auto", "--max-size", "95MB", "--no-eval", "-o",
                str(tmp_path / "auto.gguf"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["size_bytes"] <= 95_000_000 and report["tried"][-1]["kept"]
    assert report["quant"] == report["tried"][-1]["quant"] == "q2_k"  # the smallest candidate, and it fits
    assert leftovers(tmp_path) == ["auto.gguf"]
    r = run_cli("convert", str(default_gguf), "--quant", "auto", "--max-size", "80MB", "--no-eval", "-o",
                str(tmp_path / "none.gguf"))
    assert r.returncode == 7 and "No quantization" in r.stderr and "q8_0" in r.stderr
    assert leftovers(tmp_path) == ["auto.gguf"]


def test_existing_output_is_refused_unless_overwrite(default_gguf, tmp_path):
    out = tmp_path / "exists.gguf"
    out.write_text("mine")
    with pytest.raises(edgelm.OutputExistsError):
        edgelm.convert(str(default_gguf), quant="q8_0", output=str(out), eval=False)
    assert out.read_text() == "mine"


def test_interrupted_conversion_leaves_nothing(default_gguf, tmp_path):
    def interrupt(message, fraction):
        if fraction > 0.05:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        edgelm.convert(str(default_gguf), quant="q8_0", output=str(tmp_path / "x.gguf"), progress=interrupt)
    assert leftovers(tmp_path) == []


def test_truncated_source_is_refused(default_gguf, tmp_path):
    bad = tmp_path / "src" / "cut.gguf"
    bad.parent.mkdir()
    with open(default_gguf, "rb") as f:
        bad.write_bytes(f.read(40_000_000))
    with pytest.raises(edgelm.InvalidModelFileError, match="truncated"):
        edgelm.convert(str(bad), quant="q8_0", output=str(tmp_path / "out.gguf"))
    assert not (tmp_path / "out.gguf").exists()


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(edgelm.HubError) as err:
        edgelm.convert("someorg/some-model", to="onnx", quant="int4", output=str(tmp_path / "o"))
    assert "HF_HUB_OFFLINE" in str(err.value) and isinstance(err.value, OSError)


def test_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    from edgelm.converters.source import resolve

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("someorg/tiny") == snap
    assert resolve("someorg/tiny", revision=commit) == snap


@pytest.mark.slow
def test_onnx_conversion_through_the_cli(tmp_path):
    from .onnx_helpers import tiny_checkpoint

    src = tiny_checkpoint("llama", tmp_path / "tiny")
    out = tmp_path / "tiny-onnx"
    r = run_cli("convert", str(src), "--to", "onnx", "--quant", "int4", "-o", str(out), "--no-eval", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["format"] == "onnx" and report["quant"] == "int4" and report["size_bytes"] > 0
    with edgelm.load(out) as m:
        assert m.info.format == "onnx" and m.generate("the", max_tokens=4, temperature=0).usage.completion_tokens > 0


@pytest.mark.slow
def test_onnx_int8_report_against_the_fp32_reference(tmp_path):
    from .hf_fixtures import smollm2_hf_checkpoint

    r = edgelm.convert(str(smollm2_hf_checkpoint()), to="onnx", quant="int8", output=str(tmp_path / "int8"))
    d = r.to_dict()
    assert d["reference"].startswith("fp32") and d["format"] == "onnx"
    assert 0 <= d["ppl_increase"] <= 0.02  # the int8 goal
    assert d["tokens_per_second"] > 1 and d["size_bytes"] > 100e6
    assert leftovers(tmp_path) == ["int8"]  # the fp32 reference export was temporary


@pytest.mark.slow
def test_auto_table_gives_size_and_perplexity_of_every_rejected_candidate(default_gguf, tmp_path):
    r = run_cli("convert", str(default_gguf), "--quant", "auto", "--max-ppl-increase", "10%", "-o",
                str(tmp_path / "auto.gguf"), "--json")
    assert r.returncode == 0, r.stderr
    tried = json.loads(r.stdout)["tried"]
    rejected = [t for t in tried if not t["kept"]]
    assert rejected and tried[-1]["kept"]
    assert all(t["size"] > 0 and t["perplexity"] > 0 and "over the budget" in t["reason"] for t in rejected), tried
