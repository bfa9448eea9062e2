"""GPTQ int4 for the ONNX exporter: the algorithm on its own, a tiny checkpoint through the whole exporter, and the
real SmolLM2 against its fp32 export (the issue's quality goal: int4 perplexity <= 1.10 x fp32)."""

from __future__ import annotations

import json

from pathlib import Path

import pytest

import edgelm
from edgelm.converters.onnx.gptq import INT8_DOWN_SHARE, _pack, quantize
from edgelm.converters.onnx import convert_to_onnx
from edgelm.errors import InvalidParameterError

from .onnx_helpers import tiny_checkpoint


def correlated_inputs(n: int, k: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.logspace(0, 1.5, k)[torch.randperm(k, generator=g)]  # some inputs far more active than others
    return (torch.randn(n, k, generator=g) @ mix) * scale


def rtn(w, block: int):
    import torch

    wb = w.reshape(w.shape[0], -1, block)
    scale = torch.gather(wb, 2, wb.abs().argmax(2, keepdim=True)) / -8
    return (torch.clamp(torch.round(wb / scale), -8, 7) * scale).reshape(w.shape)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_changes_the_layer_output_less_than_rounding(symmetric):
    import torch

    torch.manual_seed(0)
    x = correlated_inputs(2048, 128)
    w = torch.randn(64, 128) * 0.05
    h = 2 * x.T @ x / len(x)
    codes, scales, zeros, dq = quantize(w, h, 32, symmetric, 0.01)
    assert codes.min() >= 0 and codes.max() <= 15 and scales.shape == (64, 4) and zeros.shape == (64, 4)
    # the dequantized weight is exactly what the codes say (what MatMulNBits computes)
    assert torch.allclose(dq, ((codes.float().reshape(64, 4, 32) - zeros[..., None]) * scales[..., None]).reshape(64, 128))
    err_gptq = ((x @ w.T - x @ dq.T) ** 2).mean()
    err_rtn = ((x @ w.T - x @ rtn(w, 32).T) ** 2).mean()
    assert err_gptq < 0.6 * err_rtn, (err_gptq, err_rtn)


def test_clipping_each_blocks_scale_lowers_the_layer_error_where_weights_have_outliers():
    """A weight far larger than the rest of its block sets a coarse grid for them; a scale that clips it a little
    (chosen per block by the error weighted with each input's activity) gives a smaller layer error."""
    import torch

    g = torch.Generator().manual_seed(1)
    x = correlated_inputs(2048, 128, seed=1)
    w = torch.randn(64, 128, generator=g) * 0.05
    w[torch.rand(64, 128, generator=g) < 0.03] *= 6  # a few outliers per block, as trained weights have
    h = 2 * x.T @ x / len(x)
    errors = {}
    for clip in (False, True):
        codes, scales, zeros, dq = quantize(w, h, 32, True, 0.01, clip_search=clip)
        errors[clip] = ((x @ w.T - x @ dq.T) ** 2).mean()
    assert errors[True] < 0.95 * errors[False], errors


def test_packing_puts_the_first_value_in_the_lowest_bits():
    import torch

    q = torch.arange(16).reshape(16, 1) % 16  # 16 values along the packed axis
    packed = _pack(q, axis=0)
    assert packed.shape == (2, 1)
    assert int(packed[0, 0]) & 0xF == 0 and (int(packed[0, 0]) >> 4) & 0xF == 1
    assert (int(packed[1, 0]) & 0xFFFFFFFF) >> 28 == 15  # the 16th value, highest bits of the second word


def test_gptq_options_are_checked_before_any_work(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(InvalidParameterError, match="int4"):
        convert_to_onnx(src, tmp_path / "o", "int8", algo="gptq")
    with pytest.raises(InvalidParameterError, match="gptq"):
        convert_to_onnx(src, tmp_path / "o", "int4", algo="default", calibration=str(tmp_path / "text.txt"))
    with pytest.raises(InvalidParameterError, match="calibration"):
        convert_to_onnx(src, tmp_path / "o", "int4", algo="gptq", calibration=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("too short " * 20)
    with pytest.raises(InvalidParameterError, match="words"):
        convert_to_onnx(src, tmp_path / "o", "int4", algo="gptq", calibration=str(short))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt", "src"]


@pytest.mark.slow
def test_tiny_checkpoint_converts_with_gptq_and_generates(tmp_path):
    src = tiny_checkpoint("llama", tmp_path / "tiny-llama")
    out = convert_to_onnx(src, tmp_path / "gptq", "int4", algo="gptq")
    assert not (out / ".gptq-checkpoint").exists()
    with edgelm.load(out, threads=2, n_ctx=128) as m:
        assert m.info.quantization == "int4"
        assert m.generate("The", max_tokens=4, temperature=0).usage.completion_tokens > 0


@pytest.mark.slow
def test_mixed_precision_keeps_the_embedding_and_late_down_projections_at_8_bits(tmp_path):
    """GPTQ int4 with mixed_precision=True: the input embedding is an 8-bit copy of the float table (not the int4
    head) and the MLP down projections of the last INT8_DOWN_SHARE of the layers are 8-bit MatMulNBits; everything
    else 4-bit.
    Budget: 60 s."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from safetensors.numpy import load_file

    src = tiny_checkpoint("llama", tmp_path / "tied", tied=True)
    out = convert_to_onnx(src, tmp_path / "mixed", "int4", algo="gptq", mixed_precision=True)
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    bits = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    first = layers - int(round(layers * INT8_DOWN_SHARE))
    eight = {f"/model/layers.{i}/mlp/down_proj/MatMulNBits" for i in range(first, layers)}
    assert eight and {name for name, b in bits.items() if b == 8} == eight | {"/model/embed_tokens/GatherBlockQuantized"}
    assert json.loads((out / "edgelm.json").read_text())["quantization_options"]["mixed_precision"]
    # the lookup reads the source's table to within half an 8-bit step
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    codes, scales = inits[lookup.input[0]], inits[lookup.input[2]]
    table = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float32)
    got = ((codes.astype(np.float32) - 128).reshape(len(codes), -1, 32) * scales[:, :, None]).reshape(table.shape)
    assert np.all(np.abs(got - table) <= scales.repeat(32, axis=1) * 0.51)
    with edgelm.load(out, threads=1) as m:
        assert m.generate("The", max_tokens=4, temperature=0).usage.completion_tokens > 0


@pytest.mark.slow
def test_tied_checkpoint_looks_its_embedding_up_in_the_int4_head(tmp_path, monkeypatch):
    """A model whose input embedding is its output head keeps one int4 copy (as round-to-nearest exports do), not
    the int4 head plus a float table."""
    import numpy as np
    import onnx

    import edgelm.converters.onnx.export as exporter  # embed_from_head is looked up there at call time

    src = tiny_checkpoint("llama", tmp_path / "tied", tied=True)
    out = convert_to_onnx(src, tmp_path / "shared", "int4", algo="gptq", mixed_precision=False)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    lookup = next(n for n in graph.node if n.name == "/model/embed_tokens/GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    assert lookup.input[2] == head.input[2] and len(head.input) == 3  # the head's scales; no zero points
    assert "model.embed_tokens.weight" not in {t.name for t in graph.initializer}
    monkeypatch.setattr(exporter, "embed_from_head", lambda folder: False)
    separate = convert_to_onnx(src, tmp_path / "separate", "int4", algo="gptq", mixed_precision=False)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(separate) - size(out) > 0.8 * 512 * 128 * 4  # the float table (vocab x hidden x 4 bytes) is gone
    # the lookup must read the head's rows exactly: put the dequantized head in the separate model's float table
    model = onnx.load(str(separate / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    packed = onnx.numpy_helper.to_array(inits[head.input[1]])  # [vocab, blocks, 16 bytes]: two values a byte
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], packed.shape[1], -1)
    scales = onnx.numpy_helper.to_array(inits[head.input[2]]).reshape(packed.shape[0], packed.shape[1], 1)
    table = ((codes.astype(np.float32) - 8) * scales).reshape(packed.shape[0], -1)
    inits["model.embed_tokens.weight"].CopyFrom(onnx.numpy_helper.from_array(table, "model.embed_tokens.weight"))
    for f in separate.glob("model.onnx*"):
        f.unlink()
    onnx.save_model(model, str(separate / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    with edgelm.load(out, threads=1) as a, edgelm.load(separate, threads=1) as b:
        ids = a.tokenize("The object of the reference is", add_special=False)
        np.testing.assert_allclose(a.score(ids), b.score(ids), atol=1e-4)


@pytest.mark.slow
def test_smollm2_gptq_int4_within_ten_percent_of_fp32(tmp_path):
    from .hf_fixtures import smollm2_hf_checkpoint

    src = Path(smollm2_hf_checkpoint())
    report = edgelm.convert(str(src), to="onnx", quant="int4", algo="gptq", output=str(tmp_path / "gptq"))
    assert report.reference == "fp32 ONNX of the same source" and report.method == "gptq"
    assert report.ppl_increase <= 0.10, report.to_dict()  # round-to-nearest int4 is ~1.31x on these weights
    assert report.bits_per_weight < 6, report.to_dict()  # as small as round-to-nearest: no float embedding table
    # no golden answer here: int4 answers to the capital question flip between CPUs' kernels (see
    # test_onnx_smollm2.py, which measures top-1 agreement with fp32 instead), while the perplexity ratio holds


def test_auto_uses_gptq_for_int4_when_the_model_fits_in_memory(tmp_path, caplog):
    from edgelm.converters.onnx.options import OnnxOptions, resolve_algo

    src = tiny_checkpoint("llama", tmp_path / "tiny")  # 0.43 M parameters: 1.7 MB in fp32
    assert resolve_algo(src, "int4", OnnxOptions(), memory=8 * 2**30).algo == "gptq"
    # a machine with 4 MB free
    assert resolve_algo(src, "int4", OnnxOptions(), memory=4 * 2**20).algo == "default"
    assert "--algo gptq" in caplog.text
    assert resolve_algo(src, "int8", OnnxOptions(), memory=8 * 2**30).algo == "default"
    text = tmp_path / "t.txt"
    text.write_text("words of calibration text " * 200)
    with pytest.raises(InvalidParameterError, match="int4"):
        resolve_algo(src, "int8", OnnxOptions(calibration=str(text)), memory=8 * 2**30)


@pytest.mark.slow
def test_auto_falls_back_to_rounding_when_gptq_fails(tmp_path, monkeypatch, caplog):
    import edgelm.converters.onnx.gptq as gptq

    def broken(*args, **kwargs):
        raise RuntimeError("no GPTQ today")

    monkeypatch.setattr(gptq, "gptq_checkpoint", broken)
    src = tiny_checkpoint("llama", tmp_path / "tiny")
    out = convert_to_onnx(src, tmp_path / "o", "int4")  # algo="auto" picks GPTQ for this small model
    assert "no GPTQ today" in caplog.text and "round-to-nearest" in caplog.text
    from edgelm.formats.onnx_folder import read_manifest

    assert read_manifest(out)["quantization_options"]["algo"] == "default"
    with pytest.raises(edgelm.ConversionError, match="no GPTQ today"):
        convert_to_onnx(src, tmp_path / "o2", "int4", algo="gptq")  # asked for by name: no fallback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "tiny"]


@pytest.mark.slow
def test_gptq_is_not_used_for_weights_the_builder_would_not_import(tmp_path, caplog):
    """Phi-1/2 name their layers dense / fc1 / final_layernorm, which onnxruntime-genai's GPTQ import passes over:
    asked for by name, GPTQ is refused before any work; algo='auto' rounds to nearest instead."""
    from edgelm.formats.onnx_folder import read_manifest

    src = tiny_checkpoint("phi", tmp_path / "phi")
    with pytest.raises(edgelm.UnsupportedModelError, match="model.final_layernorm") as err:
        convert_to_onnx(src, tmp_path / "o", "int4", algo="gptq")
    assert "algo='default'" in err.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi"]
    out = convert_to_onnx(src, tmp_path / "o", "int4")
    assert read_manifest(out)["quantization_options"]["algo"] == "default"
    assert "does not import GPTQ weights named like 'model.final_layernorm" in caplog.text
    with edgelm.load(out, threads=1) as m:
        assert m.generate("The object", temperature=0, max_tokens=8).usage.completion_tokens > 0


def test_int8_node_names_follow_the_builder():
    from edgelm.converters.onnx.mixed import group, node_name

    assert node_name("model.layers.3.mlp.down_proj") == "/model/layers.3/mlp/down_proj/MatMulNBits"
    assert node_name("model.layers.0.self_attn.k_proj") == "/model/layers.0/attn/qkv_proj/MatMulNBits"
    assert node_name("model.layers.7.self_attn.o_proj") == "/model/layers.7/attn/o_proj/MatMulNBits"
    assert node_name("lm_head") == "/lm_head/MatMulNBits"
    assert group("model.layers.2.self_attn.v_proj") == [f"model.layers.2.self_attn.{p}_proj" for p in "qkv"]
    assert group("model.layers.2.mlp.up_proj") == ["model.layers.2.mlp.up_proj"]
    with pytest.raises(ValueError, match="embed_tokens"):
        node_name("model.embed_tokens")
