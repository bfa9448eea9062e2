"""Plans before converting: `edgelm.recommend` on a Hugging Face checkpoint (folder, or Hub id from the HF cache)
and on an ONNX folder; the quantization table; the decode estimate on CPUs without AVX2.

Fast: checkpoints here are config.json plus safetensors headers over sparse (unwritten) data, so a 135M-parameter
"SmolLM2" costs a few KB on disk; nothing is loaded or run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from edgelm.errors import DoesNotFitError, HubError, InvalidModelFileError, UnsupportedModelError
from edgelm.formats.gguf import estimate_file_bytes, file_type_bpw, read_header
from edgelm.formats.onnx_folder import BYTES_PER_PARAMETER
from edgelm.plan import PLAN_ONNX_QUANTS, PLAN_QUANTS, default_parallel
from edgelm.platforms import Probes, detect
from edgelm.platforms.profiles import DECODE_GFLOPS_PER_CORE, simd_level
from edgelm.planning import model_facts, recommend

from .conftest import run_cli
from .hub_standin import FakeHub, online_hub
from .test_platforms import _tree

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152, ctx=8192)
SMOLLM2_Q4_1_AVX_ONLY_TOK_S = 100.0  # measured with llama.cpp on an AMD EPYC with AVX but no AVX2 (shared FACTS)
AVX_ONLY_MARGIN = 0.20  # the AVX-only estimate must be within 20 % of that


def checkpoint(folder: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
               ctx: int, dtype: str = "BF16", head_dim: int | None = None, sparse: bool = True,
               shards: int = 1) -> Path:
    """A Llama-shaped checkpoint: config.json and safetensors files whose headers describe every tensor (tied
    embeddings); the data is a hole (sparse) unless ``sparse`` is False (zeros, for serving over HTTP)."""
    folder.mkdir(parents=True, exist_ok=True)
    head = head_dim or hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": ctx,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    if head_dim:
        config["head_dim"] = head_dim
    (folder / "config.json").write_text(json.dumps(config))
    shapes = [("model.embed_tokens.weight", [vocab, hidden]), ("model.norm.weight", [hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", [heads * head, hidden]),
                   (p + "self_attn.k_proj.weight", [kv_heads * head, hidden]),
                   (p + "self_attn.v_proj.weight", [kv_heads * head, hidden]),
                   (p + "self_attn.o_proj.weight", [hidden, heads * head]),
                   (p + "mlp.gate_proj.weight", [intermediate, hidden]),
                   (p + "mlp.up_proj.weight", [intermediate, hidden]),
                   (p + "mlp.down_proj.weight", [hidden, intermediate]),
                   (p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden])]
    size = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    for s in range(shards):
        part = shapes[s::shards]
        header, offset = {}, 0
        for name, shape in part:
            n = size
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with open(folder / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            if sparse:
                fh.truncate(8 + len(raw) + offset)
            else:
                fh.write(bytes(offset))
    return folder


def smollm2_parameters() -> int:
    h, i, v, n = SMOLLM2["hidden"], SMOLLM2["intermediate"], SMOLLM2["vocab"], SMOLLM2["layers"]
    kv = SMOLLM2["kv_heads"] * h // SMOLLM2["heads"]
    return v * h + h + n * (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h)


# --- fake hosts --------------------------------------------------------------------------------------------

def fake_x86(root: Path, flags: str, *, cores: int = 2, mem_gb: float = 24, model: str = "AMD EPYC") -> Probes:
    cpuinfo = "".join(f"processor\t: {i}\nmodel name\t: {model}\nphysical id\t: 0\ncore id\t: {i}\n"
                      f"flags\t\t: fpu sse sse2 {flags}\n\n" for i in range(cores))
    kb = int(mem_gb * 1024 * 1024)
    _tree(root, {"proc/cpuinfo": cpuinfo,
                 "proc/meminfo": f"MemTotal:       {kb} kB\nMemAvailable:   {int(kb * 0.8)} kB\n"})
    return Probes(root=root, system="Linux", machine="x86_64", processor="", env={}, cpu_count=lambda: cores,
                  usable_cpus=lambda: cores, sysctl=lambda name: None,
                  llama_caps=lambda: {"version": "0.3.36", "gpu_offload": False, "system_info": "CPU : AVX = 1 |"},
                  onnx_providers=lambda: None)


def fake_pi_zero_2w(root: Path) -> Probes:
    cpuinfo = "\n\n".join(f"processor\t: {i}\nBogoMIPS\t: 38.40\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                          f"CPU implementer\t: 0x41\nCPU part\t: 0xd03" for i in range(4))
    _tree(root, {"proc/cpuinfo": cpuinfo + "\nModel\t: Raspberry Pi Zero 2 W Rev 1.0\n",
                 "proc/meminfo": "MemTotal:         427000 kB\nMemAvailable:     350000 kB\n",
                 "proc/device-tree/model": "Raspberry Pi Zero 2 W Rev 1.0\0"})
    return Probes(root=root, system="Linux", machine="aarch64", processor="", env={}, cpu_count=lambda: 4,
                  usable_cpus=lambda: 4, sysctl=lambda name: None,
                  llama_caps=lambda: {"version": "0.3.36", "gpu_offload": False, "system_info": "CPU : NEON = 1 |"},
                  onnx_providers=lambda: None)


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("ck") / "SmolLM2-135M-Instruct", **SMOLLM2)


# --- facts ---------------------------------------------------------------------------------------------------

def test_checkpoint_facts_from_config_and_safetensors_headers(smol, tmp_path):
    f = model_facts(smol)
    assert f.format == "hf" and f.architecture == "LlamaForCausalLM" and f.quantization == "BF16"
    assert f.parameters == smollm2_parameters() and f.weight_bytes == 2 * f.parameters
    s = f.shape
    assert (s.n_layer, s.n_head, s.n_head_kv, s.head_k, s.head_v, s.n_vocab) == (30, 9, 3, 64, 64, 49152)
    assert f.context_length == 8192
    assert f.kv_bytes(1, "f16") == 30 * 3 * (64 + 64) * 2  # the one KV formula, per token
    # sharded checkpoints sum their shards; config.json itself names the folder; head_dim wins over hidden/heads
    sharded = checkpoint(tmp_path / "sharded", **{**SMOLLM2, "layers": 4}, shards=3, head_dim=32, dtype="F32")
    g = model_facts(sharded / "config.json")
    assert g.path == str(sharded) and g.quantization == "F32" and g.shape.head_k == 32
    assert g.weight_bytes == 4 * g.parameters


# --- the quantization table ------------------------------------------------------------------------------------

def test_checkpoint_plan_lists_every_quantization_and_recommends_one(smol):
    plan = recommend(smol, "x86-laptop-16gb")
    rows = plan.quantizations
    assert [r["quant"] for r in rows] == [q.lower() for q in PLAN_QUANTS] + list(PLAN_ONNX_QUANTS)
    params = smollm2_parameters()
    for r in rows:
        if r["format"] == "gguf":
            assert r["size_bytes"] == estimate_file_bytes(r["quant"], params, row_size=576, output_parameters=49152 * 576)
        else:
            assert r["size_bytes"] == int(params * BYTES_PER_PARAMETER[r["quant"]])
        assert r["memory_bytes"] > r["size_bytes"] and r["tokens_per_second"] > 0 and r["fits"]
        assert r["convert_command"].startswith(f"edgelm convert {smol} --to {r['format']} --quant {r['quant']} -o ")
    gguf = [r for r in rows if r["format"] == "gguf"]
    speeds = [r["tokens_per_second"] for r in gguf]
    assert speeds == sorted(speeds)  # smaller files decode faster (bandwidth-bound on the laptop profile)
    chosen = [r for r in rows if r["recommended"]]
    assert len(chosen) == 1 and chosen[0]["quant"] == "q8_0"  # a 135M model: Q8_0 (F16 is never recommended)
    assert plan.quant == "Q8_0" and plan.needs_conversion and plan.source_format == "hf"
    assert plan.convert_command == f"edgelm convert {smol} --to gguf --quant q8_0 -o SmolLM2-135M-Instruct-q8_0.gguf"
    assert plan.memory_bytes == chosen[0]["memory_bytes"] == sum(plan.memory_breakdown.values())
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["quantizations"] == rows and data["simd"] == "avx2"


def test_pi_zero_2w_gets_a_smaller_quant_than_a_16gb_laptop(smol, tmp_path):
    zero = recommend(smol, "raspberry-pi-zero-2-w")
    laptop = recommend(smol, "x86-laptop-16gb")
    assert file_type_bpw(zero.quant) < file_type_bpw(laptop.quant)
    assert zero.memory_bytes <= zero.device_memory_bytes * 0.85
    assert zero.n_ctx >= 2048  # context before quality: Q8_0 would fit only at n_ctx 512
    assert any(not r["fits"] for r in zero.quantizations)  # F16 does not fit 512 MB
    assert zero.tokens_per_second < laptop.tokens_per_second
    # the same through detection: a pretend Pi Zero 2 W and a pretend 16 GB AVX2 laptop
    pi = recommend(smol, "auto", host=detect(fake_pi_zero_2w(tmp_path / "pi")), bandwidth_gbs=1.5)
    lap = recommend(smol, "auto", host=detect(fake_x86(tmp_path / "lap", "avx avx2 fma f16c", cores=4, mem_gb=16,
                                                       model="Intel Core i7")), bandwidth_gbs=25.0)
    assert pi.simd == "neon" and lap.simd == "avx2" and pi.threads == 4
    assert file_type_bpw(pi.quant) < file_type_bpw(lap.quant)
    assert pi.convert_command != lap.convert_command


def test_a_7b_checkpoint_does_not_fit_a_pi_zero_and_says_by_how_much(tmp_path):
    big = checkpoint(tmp_path / "big", layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=11008, vocab=32000,
                     ctx=4096)
    with pytest.raises(DoesNotFitError) as err:
        recommend(big, "raspberry-pi-zero-2-w")
    msg = str(err.value)
    assert "Q2_K" in msg and "GB" in msg and "362 MB usable" in msg and "smaller model" in msg
    plan = recommend(big, "raspberry-pi-5-8gb")  # 6.7B parameters: capped at Q4_K_M above 2B
    assert plan.quant == "Q4_K_M" and [r["quant"] for r in plan.quantizations if not r["fits"]][:1] == ["f16"]


@pytest.mark.slow
def test_size_estimates_match_what_llama_cpp_writes(default_gguf, tmp_path):
    """SmolLM2 (hidden 576: k-quants fall back, a large tied embedding) re-quantized by llama.cpp's quantizer: the
    weights it writes are within 3 % of the estimate a checkpoint plan lists (typical bits per weight alone were
    up to 21 % under)."""
    import ctypes

    import llama_cpp

    src = read_header(default_gguf)
    shape = src.attention_shape()
    for quant in ("Q4_0", "Q4_K_M", "Q3_K_M"):
        out = tmp_path / f"{quant}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
        params.allow_requantize = True
        params.nthread = 2
        assert llama_cpp.llama_model_quantize(str(default_gguf).encode(), str(out).encode(), ctypes.byref(params)) == 0
        written = read_header(out).weight_bytes
        estimate = estimate_file_bytes(quant, src.parameters, row_size=shape.n_embd,
                                       output_parameters=shape.n_vocab * shape.n_embd)
        assert abs(estimate / written - 1) <= 0.03, (quant, estimate, written)
        out.unlink()


# --- decode estimate: compute-bound without AVX2 -------------------------------------------------------------

def test_simd_levels():
    assert simd_level(["avx", "f16c", "fma"]) == "avx"
    assert simd_level(["avx", "avx2", "fma"]) == "avx2"
    assert simd_level(["avx", "avx2", "avx512"]) == "avx512"
    assert simd_level(["neon", "dotprod"]) == "dotprod" and simd_level(["neon"]) == "neon"
    assert simd_level([]) == "scalar"
    assert DECODE_GFLOPS_PER_CORE["avx"] < DECODE_GFLOPS_PER_CORE["avx2"] <= DECODE_GFLOPS_PER_CORE["avx512"]


def test_avx_only_host_estimate_is_lower_and_near_the_measured_decode(default_gguf, tmp_path):
    """SmolLM2 Q4_1 on 2 cores at the same bandwidth (20 GB/s, FACTS): AVX-only is compute-bound."""
    avx = recommend(default_gguf, "auto", host=detect(fake_x86(tmp_path / "avx", "avx fma f16c")), bandwidth_gbs=20.0)
    avx2 = recommend(default_gguf, "auto", host=detect(fake_x86(tmp_path / "avx2", "avx avx2 fma f16c")),
                     bandwidth_gbs=20.0)
    assert avx.threads == avx2.threads == 2 and avx.simd == "avx" and avx2.simd == "avx2"
    assert avx.tokens_per_second < 0.8 * avx2.tokens_per_second
    assert avx.bound_by == "compute" and any("AVX without AVX2" in n for n in avx.notes)
    target = SMOLLM2_Q4_1_AVX_ONLY_TOK_S
    assert abs(avx.tokens_per_second - target) <= AVX_ONLY_MARGIN * target, avx.tokens_per_second
    # the same model as a checkpoint: its plan shows the compute bound in every row
    ck = recommend(checkpoint(tmp_path / "ck", **SMOLLM2), "auto",
                   host=detect(fake_x86(tmp_path / "avx", "avx fma f16c")), bandwidth_gbs=20.0)
    small = [r for r in ck.quantizations if r["format"] == "gguf" and r["quant"] in ("q4_k_m", "q4_0", "q2_k")]
    assert all(r["bound_by"] == "compute" for r in small)
    assert max(r["tokens_per_second"] for r in small) <= target * (1 + AVX_ONLY_MARGIN)


# --- a Hub id from a pre-filled Hugging Face cache, offline ---------------------------------------------------

@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    with online_hub(tmp_path, monkeypatch) as fake:
        yield fake


def _tiny_repo(hub: FakeHub, tmp_path: Path, repo_id: str = "org/tiny-llama") -> Path:
    folder = checkpoint(tmp_path / "src", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512,
                        ctx=2048, sparse=False)
    hub.add(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()})
    return folder


def test_hub_id_from_a_prefilled_cache_offline(hub_env, tmp_path, monkeypatch):
    from huggingface_hub import snapshot_download

    folder = _tiny_repo(hub_env, tmp_path)
    snapshot_download("org/tiny-llama", cache_dir=str(tmp_path / "hf" / "hub"), endpoint=hub_env.endpoint)
    hub_env.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub_env.log)
    plan = recommend("org/tiny-llama", "raspberry-pi-4-2gb")
    assert len(hub_env.log) == before  # nothing asked of the Hub
    local = recommend(folder, "raspberry-pi-4-2gb")
    assert plan.model == "org/tiny-llama" and plan.source_format == "hf"
    assert [r["size_bytes"] for r in plan.quantizations] == [r["size_bytes"] for r in local.quantizations]
    assert plan.convert_command.startswith("edgelm convert org/tiny-llama --to gguf --quant ")
    assert plan.convert_command.endswith("-o tiny-llama-q8_0.gguf")
    r = run_cli("recommend", "org/tiny-llama", "--profile", "raspberry-pi-4-2gb", "--json",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub_env.endpoint})
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["quant"] == plan.quant and len(data["quantizations"]) == len(PLAN_QUANTS) + len(PLAN_ONNX_QUANTS)
    with pytest.raises(HubError, match="not in the Hugging Face cache"):
        recommend("org/not-cached", "raspberry-pi-4-2gb")


def test_hub_id_online_reads_headers_only(hub_env, tmp_path):
    _tiny_repo(hub_env, tmp_path, "org/online")
    weights = hub_env.file("org/online", "model.safetensors")
    plan = recommend("org/online", "raspberry-pi-4-2gb")
    assert plan.source_format == "hf" and plan.model == "org/online"
    assert model_facts("org/online").parameters == model_facts(tmp_path / "src").parameters
    gets = [r for r in hub_env.requests("cdn", "GET") if r[2].endswith(weights.sha256)]
    assert gets and all(r[3] for r in gets)  # range requests for the safetensors header, never the whole file


# --- ONNX folders -----------------------------------------------------------------------------------------------

def onnx_folder(folder: Path, quant: str = "int4", parameters: int = 134_515_008) -> Path:
    """An edgelm ONNX folder: a readable (tiny) graph whose external data file is as large as the real model's
    weights would be (sparse), a genai_config.json, a tokenizer and the manifest."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    data_bytes = int(parameters * BYTES_PER_PARAMETER[quant])
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "model.onnx.data"), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[w])
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    with open(folder / "model.onnx.data", "wb") as fh:
        fh.truncate(data_bytes)
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "edgelm.json").write_text(json.dumps({
        "format": "edgelm-onnx", "version": 1, "name": "smollm2", "architecture": "LlamaForCausalLM",
        "model_type": "llama", "quantization": quant, "parameters": parameters, "context_length": 8192,
        "vocab_size": 49152, "model_file": "model.onnx", "external_data": ["model.onnx.data"],
        "kv_cache": {"layers": 30, "kv_heads": 3, "attention_heads": 9, "head_size": 64, "layout": "BNSH"},
        "exporter": {"name": "onnxruntime-genai model builder", "version": None}}))
    return folder


def test_onnx_folder_plan(tmp_path):
    int4 = onnx_folder(tmp_path / "int4")
    f = model_facts(int4)
    assert f.format == "onnx" and f.quantization == "int4" and f.shape.n_head_kv == 3
    assert f.weight_bytes >= int(134_515_008 * BYTES_PER_PARAMETER["int4"])
    plan = recommend(int4, "raspberry-pi-5-8gb")
    assert plan.backend == "onnxruntime" and plan.format == "onnx" and plan.quant == "int4"
    assert not plan.needs_conversion and plan.convert_command is None and plan.kv_cache == "f32"
    assert plan.memory_breakdown["kv_cache"] == f.kv_bytes(plan.n_ctx, "f32")
    assert set(plan.load_kwargs()) == {"backend", "n_ctx", "threads"}
    zero = recommend(int4, "raspberry-pi-zero-2-w")
    assert zero.n_ctx < plan.n_ctx and zero.tokens_per_second < plan.tokens_per_second
    with pytest.raises(DoesNotFitError, match="int4"):
        recommend(onnx_folder(tmp_path / "big", parameters=1_500_000_000), "raspberry-pi-zero-2-w")
    assert default_parallel(int4) == 1
    r = run_cli("recommend", str(int4), "--profile", "raspberry-pi-5-8gb")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime (onnx)" in r.stdout and "int4" in r.stdout


# --- bad inputs ---------------------------------------------------------------------------------------------

def test_a_folder_that_is_neither_gets_a_clear_error(tmp_path):
    junk = tmp_path / "photos"
    junk.mkdir()
    (junk / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(UnsupportedModelError) as err:
        recommend(junk, "raspberry-pi-5-8gb")
    msg = str(err.value)
    assert str(junk) in msg and "GGUF" in msg and "config.json" in msg and "ONNX" in msg
    r = run_cli("recommend", str(junk), "--profile", "raspberry-pi-5-8gb")
    assert r.returncode == 4 and str(junk) in r.stderr
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (half / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UnsupportedModelError, match="no \\*.safetensors"):
        recommend(half, "raspberry-pi-5-8gb")


def test_incomplete_config_and_corrupt_safetensors_are_named(tmp_path):
    ck = checkpoint(tmp_path / "ck", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, ctx=512)
    config = json.loads((ck / "config.json").read_text())
    del config["num_hidden_layers"]
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers"):
        recommend(ck, "raspberry-pi-5-8gb")
    bad = checkpoint(tmp_path / "bad", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, ctx=512)
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InvalidModelFileError, match="model.safetensors"):
        recommend(bad, "raspberry-pi-5-8gb")


def test_cli_prints_the_table_and_the_convert_command(smol):
    r = run_cli("recommend", str(smol), "--profile", "raspberry-pi-zero-2-w")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = [line for line in out.splitlines() if line.startswith("* ")]
    assert len(lines) == 1 and " q4_0 " in lines[0]
    for q in PLAN_QUANTS:
        assert f" {q.lower()} " in out
    assert f"edgelm convert {smol} --to gguf --quant q4_0 -o SmolLM2-135M-Instruct-q4_0.gguf" in out
    assert "Raspberry Pi Zero 2 W" in out


def test_a_plan_for_several_streams_names_the_conversion_that_measures_them(smol):
    plan = recommend(smol, "x86-laptop-16gb", parallel=4)
    assert plan.convert_command == (f"edgelm convert {smol} --to gguf --quant auto --parallel 4 "
                                    "--max-ppl-increase 10% -o SmolLM2-135M-Instruct-for-4.gguf")
    assert any("4 streams at once" in n for n in plan.notes)
    one = recommend(smol, "x86-laptop-16gb")
    assert "--quant q8_0" in one.convert_command  # one stream: the estimate's pick, as before
