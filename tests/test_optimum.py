"""optimum-onnx as the ONNX exporter for the architectures onnxruntime-genai's builder lacks, and edgelm's own
onnxruntime session loop that decodes its graphs (runtimes/onnx_session.py).

Fast tests: option checks, the exporter choice and its errors, config translation, graph rewrites and a graph
without a KV cache (no optimum needed).  Slow tests: tiny random GPT-2, GPT-NeoX, OPT, BLOOM and Falcon checkpoints
made here, exported by optimum-onnx (installed apart by `edgelm install-converter`, as the README's test command
does): fp32 greedy tokens equal transformers', int8/int4 perplexity within a margin of fp32; the real SmolLM2 through
optimum gives the builder's greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.converters.onnx import optimum as optimum_onnx
from edgelm.converters.onnx import ARCHITECTURES, choose_exporter, convert_to_onnx
from edgelm.converters.onnx.options import OnnxOptions
from edgelm.errors import BackendNotInstalledError, InvalidParameterError, UnsupportedModelError
from edgelm.formats import onnx_folder, onnx_plain

from .helpers import raw_greedy
from .optimum_helpers import OPTIMUM_ARCHS, tiny_optimum_checkpoint

# --- fast ---------------------------------------------------------------------------------------------------------


def test_exporter_option_is_checked():
    with pytest.raises(InvalidParameterError, match="exporter.*auto, genai, optimum"):
        OnnxOptions(exporter="torch")
    assert OnnxOptions(exporter="optimum").exporter == "optimum"


def test_optimum_algo_choice():
    opts = OnnxOptions(exporter="optimum")
    assert optimum_onnx.resolve_algo("int4", opts).algo == "gptq"
    assert optimum_onnx.resolve_algo("int4", opts.replace(symmetric=False)).algo == "default"
    assert optimum_onnx.resolve_algo("int8", opts).algo == "default"
    assert optimum_onnx.resolve_algo("int4", opts.replace(algo="rtn")).algo == "default"
    with pytest.raises(InvalidParameterError, match="k_quant.*optimum"):
        optimum_onnx.resolve_algo("int4", opts.replace(algo="k_quant"))
    with pytest.raises(InvalidParameterError, match="fp16"):
        optimum_onnx.resolve_algo("fp16", opts)


def test_transformers5_config_is_translated_for_transformers4():
    neox = {"model_type": "gpt_neox", "dtype": "float32",
            "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"}}
    out = optimum_onnx.legacy_config(neox)
    assert out["rotary_pct"] == 0.5 and out["partial_rotary_factor"] == 0.5 and out["rope_theta"] == 10000.0
    assert out["torch_dtype"] == "float32" and "rope_scaling" not in out
    llama = {"model_type": "llama", "rope_theta": 5.0,
             "rope_parameters": {"rope_theta": 100000.0, "rope_type": "linear", "factor": 2.0}}
    out = optimum_onnx.legacy_config(llama)
    assert out["rope_theta"] == 5.0  # what the config already says is kept
    assert out["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    gemma3 = {"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    out = optimum_onnx.legacy_config(gemma3)
    assert out["rope_theta"] == 1e6 and out["rope_local_base_freq"] == 1e4


def _fake_optimum(tmp_path: Path, monkeypatch, types: list[str]) -> Path:
    home = tmp_path / "fake-optimum"
    (home / "optimum" / "exporters" / "onnx").mkdir(parents=True)
    (home / "optimum" / "exporters" / "onnx" / "__init__.py").write_text("")
    (home / optimum_onnx.MODEL_TYPES_FILE).write_text(json.dumps(types))
    monkeypatch.setenv(optimum_onnx.ENV_VAR, str(home))
    return home


def test_exporter_choice_and_its_errors(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    mamba = {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
    monkeypatch.setenv(optimum_onnx.ENV_VAR, str(tmp_path / "not-installed"))
    assert choose_exporter(src, llama) == "genai"
    # optimum not installed: auto for an architecture the builder lacks names the install command
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM.*not installed") as exc:
        choose_exporter(src, gpt2)
    assert "edgelm install-converter --optimum" in exc.value.fix and "GGUF" in exc.value.fix
    with pytest.raises(BackendNotInstalledError, match="optimum-onnx") as exc:
        choose_exporter(src, llama, "optimum")
    assert "edgelm install-converter --optimum" in exc.value.fix
    with pytest.raises(UnsupportedModelError, match="builder does not support.*GPT2LMHeadModel") as exc:
        choose_exporter(src, gpt2, "genai")
    assert "--exporter optimum" in exc.value.fix
    # installed: auto picks optimum where the builder lacks the architecture, the builder where it has it
    _fake_optimum(tmp_path, monkeypatch, ["gpt2", "gpt-neox", "llama"])
    assert choose_exporter(src, gpt2) == "optimum"
    assert choose_exporter(src, {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}) == "optimum"
    assert choose_exporter(src, llama) == "genai"
    assert choose_exporter(src, llama, "optimum") == "optimum"
    with pytest.raises(UnsupportedModelError, match="Neither ONNX exporter.*MambaForCausalLM") as exc:
        choose_exporter(src, mamba)
    with pytest.raises(UnsupportedModelError, match="Neither ONNX exporter.*MambaForCausalLM.*'llama'"):
        choose_exporter(src, {**mamba, "model_type": "llama"})  # optimum would build a llama from model_type
    assert all(a in exc.value.message for a in ARCHITECTURES) and "gpt2, gpt-neox, llama" in exc.value.message
    assert "GGUF" in exc.value.fix


def _graph(folder: Path, with_cache: bool) -> Path:
    """A one-layer toy decoder graph with optimum's I/O names (or without its cache inputs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    emb = numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["logits"])]
    head = numpy_helper.from_array(np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32), "head")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", 16])]
    if with_cache:
        inputs.append(helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                                    ["batch_size", 1, "past_sequence_length", 8]))
        outputs.append(helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT,
                                                     ["batch_size", 1, "past_sequence_length + sequence_length", 8]))
        nodes += [helper.make_node("Unsqueeze", ["h", "one"], ["h4"]),
                  helper.make_node("Concat", ["past_key_values.0.key", "h4"], ["present.0.key"], axis=2)]
    inits = [emb, head] + ([numpy_helper.from_array(np.array([1], dtype=np.int64), "one")] if with_cache else [])
    model = helper.make_model(helper.make_graph(nodes, "toy", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_graph_without_kv_cache_is_refused_clearly(tmp_path):
    model_file = _graph(tmp_path / "nocache", with_cache=False)
    with pytest.raises(UnsupportedModelError, match="no past key/value inputs.*without a KV cache") as exc:
        onnx_plain.session_io(model_file)
    assert "text-generation-with-past" in exc.value.fix
    io = onnx_plain.session_io(_graph(tmp_path / "cache", with_cache=True))
    assert io["kv"] == [{"past": "past_key_values.0.key", "present": "present.0.key", "shape": [0, 1, 0, 8],
                         "sequence_axis": 2}]
    assert io["inputs"] == ["input_ids"] and io["vocab_size"] == 16 and io["layout"] == "BNSH"


def _toy_folder(folder: Path, with_cache: bool) -> Path:
    from .onnx_helpers import tiny_tokenizer

    _graph(folder, with_cache=with_cache)
    tiny_tokenizer(folder)
    (folder / "edgelm.json").write_text(json.dumps({
        "format": "edgelm-onnx", "version": 1, "name": "toy", "architecture": "GPT2LMHeadModel", "quantization": "fp32",
        "context_length": 64, "vocab_size": 16, "model_file": "model.onnx", "eos_token_ids": [2],
        "exporter": {"name": "optimum-onnx"}}))
    return folder


def test_runtime_refuses_a_folder_whose_graph_has_no_cache(tmp_path):
    with pytest.raises(UnsupportedModelError, match="without a KV cache"):
        edgelm.load(_toy_folder(tmp_path / "m", with_cache=False), threads=1)


def test_session_cache_grows_in_its_buffers_and_rewinds(tmp_path):
    """The toy graph's cache holds each token's embedding: after extend / rewind / extend, the bound buffer holds
    exactly the embeddings of the tokens the sequence says it holds, in order."""
    import onnx
    from onnx import numpy_helper

    folder = _toy_folder(tmp_path / "m", with_cache=True)
    emb = numpy_helper.to_array(next(t for t in onnx.load(str(folder / "model.onnx")).graph.initializer
                                     if t.name == "emb"))
    with edgelm.load(folder, threads=1, n_ctx=16) as m:
        b = m.backend
        assert type(b).__name__ == "OnnxSessionBackend" and m.info.backend == "onnxruntime"
        seq = b.sequences[0]
        kv = b.kv[0]

        def cache() -> np.ndarray:
            return kv.view(kv.front, len(seq.tokens))[0, 0]

        b.extend(seq, [3, 4, 5])
        np.testing.assert_array_equal(cache(), emb[[3, 4, 5]])
        b.extend(seq, [6])
        np.testing.assert_array_equal(cache(), emb[[3, 4, 5, 6]])
        assert b.prepare(seq, [3, 4, 9, 10]) == 2  # rewound to [3, 4], then 9 and 10 evaluated
        assert seq.tokens == [3, 4, 9, 10]
        np.testing.assert_array_equal(cache(), emb[[3, 4, 9, 10]])
        assert b.rewind(seq, 0) and seq.tokens == []
        b.extend(seq, list(range(16)))
        with pytest.raises(edgelm.EdgelmError, match="n_ctx=16"):
            b.extend(seq, [1])
        logits = b.score(seq, [1, 2, 3])  # log-probs of tokens 2 and 3
        assert logits.shape == (2,) and np.all(logits < 0)


def test_prepare_rewrites_gemm_and_folds_transposed_weights():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgelm.converters.onnx import quantize as onnx_quantize

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 4)).astype(np.float32)  # Gemm with transB: [N, K]
    bias = rng.normal(size=(6,)).astype(np.float32)
    w2 = rng.normal(size=(5, 6)).astype(np.float32)  # a tied head: Transpose of a table [V, K]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b"], ["y"], transB=1),
             helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
             helper.make_node("MatMul", ["y", "w2t"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 5])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(bias, "b"),
                               numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.normal(size=(3, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert onnx_quantize.prepare(model) == {"gemm": 1, "transpose": 1}
    onnx.checker.check_model(model)
    assert sorted(n.op_type for n in model.graph.node) == ["Add", "MatMul", "MatMul"]
    inits = {t.name for t in model.graph.initializer}
    assert "w2t" in inits and "w2" not in inits  # the table only the Transpose read is gone
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


# --- slow: real optimum-onnx exports ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optimum_installed():
    if optimum_onnx.find_optimum() is None:  # the README's test command runs `edgelm install-converter`
        pytest.fail("optimum-onnx is not installed: run `edgelm install-converter --optimum`.")


class _Exports(dict):
    """model type -> (tiny checkpoint, its fp32 optimum export), each made once for the module when first asked for."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, model_type: str) -> tuple[Path, Path]:
        src = tiny_optimum_checkpoint(model_type, self.root / f"tiny-{model_type}")
        self[model_type] = (src, convert_to_onnx(src, self.root / f"{model_type}-fp32", "fp32"))
        return self[model_type]


@pytest.fixture(scope="module")
def fp32_exports(tmp_path_factory, optimum_installed) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("optimum"))


def transformers_greedy(folder: Path, tokens: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(tokens):].tolist()


def perplexity(folder: Path) -> float:
    from edgelm.measure import evaluate

    return evaluate(str(folder), window=128, windows=4, n_ctx=256, threads=2)[0].perplexity


@pytest.mark.slow  # budget: 5 optimum exports (~10 s each on 2 free cores) + transformers
@pytest.mark.parametrize("model_type", sorted(OPTIMUM_ARCHS))
def test_fp32_export_decodes_like_transformers(model_type, fp32_exports):
    src, out = fp32_exports[model_type]
    manifest = onnx_folder.read_manifest(out)
    assert manifest["exporter"]["name"] == "optimum-onnx" and manifest["exporter"]["task"] == "text-generation-with-past"
    assert manifest["exporter"]["transformers"].startswith("4.57")
    kv = manifest["kv_cache"]
    assert kv["layers"] == 4 and kv["layout"] == "BNSH" and kv["sequence_axis"] == 2  # 2 layers x key, value
    assert kv["past"][0] == "past_key_values.0.key" and kv["present"][0] == "present.0.key"
    assert "input_ids" in manifest["inputs"] and "attention_mask" in manifest["inputs"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == ["model.onnx", "model.onnx.data"]
    # every layer's attention is one GroupQueryAttention over a shared cache buffer, except BLOOM's (ALiBi adds a
    # per-head bias to the scores, which that op does not take): it runs as exported, and the record says why
    attention = manifest["exporter"]["graph_rewrites"]["attention"]
    fused = model_type != "bloom"
    assert attention["attention"] == ("GroupQueryAttention" if fused else "as exported"), attention
    assert kv["shared_buffer"] is fused
    if fused:
        assert attention["layers"] == 2
    else:
        assert "not a [batch, 1, q, kv] mask" in attention["reason"] or "permutes" in attention["reason"]
    with edgelm.load(out, threads=2, n_ctx=128) as m:
        assert m.info.backend == "onnxruntime" and "InferenceSession" in m.info.extra["runtime"]
        assert m.info.extra["kv_cache_shared_buffer"] is fused
        ids = m.tokenize("The Python Language Reference describes", add_special=False)
        got = raw_greedy(m, ids, 24)
        # a second prompt sharing the first's prefix reuses the cache (rewind + extend), and still agrees
        longer = ids + got[:5]
        again = raw_greedy(m, longer, 8)
        assert m.backend.sequences[0].reused == len(ids) + 4  # rewound from the first generation's cache
    assert got == transformers_greedy(src, ids, 24)
    assert again == got[5:13]


@pytest.mark.slow  # budget: ~20 s (quantizing tiny graphs, perplexity on 4 x 128 tokens)
@pytest.mark.parametrize("model_type", sorted(OPTIMUM_ARCHS))
def test_int8_and_int4_perplexity_stays_near_fp32(model_type, fp32_exports, tmp_path):
    _, fp32 = fp32_exports[model_type]
    base = perplexity(fp32)
    int8 = optimum_onnx.quantize_folder(fp32, tmp_path / "int8", "int8")
    int4 = optimum_onnx.quantize_folder(fp32, tmp_path / "int4", "int4")
    assert onnx_folder.read_manifest(int4)["quantization_options"]["algo"] == "gptq"
    ratio8, ratio4 = perplexity(int8) / base, perplexity(int4) / base
    # random weights (std 0.25) spread over all 16 int4 levels; int8 is near-lossless.  On a random model int4's
    # rounding moves perplexity either way (measured 0.898 for OPT on one CPU): within 25 % each way (1/1.25 .. 1.25)
    assert 0.98 < ratio8 < 1.02, ratio8
    assert 0.8 < ratio4 < 1.25, ratio4
    sizes = {q: sum(p.stat().st_size for p in f.iterdir()) for q, f in (("fp32", fp32), ("int8", int8), ("int4", int4))}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


@pytest.mark.slow  # budget: one optimum export + GPTQ + the fp32 reference export + quality report, ~60 s
def test_convert_gpt2_int4_end_to_end_with_quality_report(tmp_path, optimum_installed):
    src = tiny_optimum_checkpoint("gpt2", tmp_path / "tiny-gpt2", n_positions=1024)  # the report decodes 512 tokens
    out = tmp_path / "gpt2-int4"
    report = edgelm.convert(str(src), to="onnx", quant="int4", output=str(out))  # exporter auto -> optimum
    assert report.method == "gptq" and report.reference == "fp32 ONNX of the same source"
    assert report.perplexity is not None and report.perplexity / report.reference_perplexity < 1.25
    assert report.tokens_per_second > 0
    manifest = onnx_folder.read_manifest(out)
    assert manifest["exporter"]["name"] == "optimum-onnx" and manifest["quantization"] == "int4"
    assert manifest["exporter"]["graph_rewrites"]["gemm"] > 0  # GPT-2's Conv1D, now MatMulNBits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-int4", "tiny-gpt2"]  # no temporary left
    with edgelm.load(out, threads=2) as m:
        text = "".join(c.text for c in m.stream("def main(", max_tokens=16, temperature=0.8, seed=3, top_k=40))
        assert isinstance(text, str)
        chat = m.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert chat.usage.completion_tokens <= 4


@pytest.mark.slow  # budget: SmolLM2 through optimum (~40 s) and the builder (~30 s), 32 greedy tokens each
def test_smollm2_through_optimum_decodes_like_through_the_builder(tmp_path, optimum_installed):
    from .hf_fixtures import smollm2_hf_checkpoint

    src = smollm2_hf_checkpoint()
    via_optimum = convert_to_onnx(src, tmp_path / "optimum", "fp32", exporter="optimum")
    via_builder = convert_to_onnx(src, tmp_path / "builder", "fp32", exporter="genai")
    manifest = onnx_folder.read_manifest(via_optimum)
    assert onnx_folder.exporter_kind(manifest) == "optimum"
    # the graph the builder would write: per layer one GroupQueryAttention with the rotary inside and q, k, v packed,
    # and every residual Add + RMSNorm one SkipSimplifiedLayerNormalization (60: each layer's two but the first, and the final one)
    attention = manifest["exporter"]["graph_rewrites"]["attention"]
    assert {k: attention[k] for k in ("attention", "layers", "rotary_in_op", "packed_qkv", "skip_rms_norms")} == {
        "attention": "GroupQueryAttention", "layers": 30, "rotary_in_op": 30, "packed_qkv": 30, "skip_rms_norms": 60}
    assert manifest["kv_cache"]["shared_buffer"] is True
    assert onnx_folder.exporter_kind(onnx_folder.read_manifest(via_builder)) == "genai"
    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    runs, ends = [], []
    for folder in (via_optimum, via_builder):
        with edgelm.load(folder, threads=2, n_ctx=512) as m:
            prompt = m.tokenize(m.apply_chat_template(messages), add_special=False, parse_special=True)
            runs.append(raw_greedy(m, prompt, 32))
            ends.append(next((i + 1 for i, t in enumerate(runs[-1]) if m.backend.is_eog(t)), 32))
    # onnxruntime-genai repeats the end token once a sequence has ended: compare up to the first one
    end = min(ends)
    assert end > 8
    assert runs[0][:end] == runs[1][:end]
