"""GPTQ int4 weights for the ONNX exporter (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization").

Round-to-nearest int4 rounds every weight on its own.  GPTQ rounds the columns of each linear layer one at a time and
spreads each rounding error over the columns not yet rounded, weighted by how the layer's inputs correlate (the
Hessian X^T X of a few calibration sequences), so the layer's *outputs* change less.  The result is an ordinary int4
weight (a scale per block of ``block_size`` inputs, integer zero points): the same MatMulNBits kernels run it, at
the same speed as round-to-nearest.

Layers are quantized in order, each on the outputs of the already-quantized layers before it.  The calibration text
is the Python standard library's own docstrings (offline, English technical prose, and not the evaluation text),
or any text given.  The quantized model is written as a GPTQ-format Hugging Face checkpoint (``qweight``,
``qzeros``, ``scales``, ``g_idx``), which onnxruntime-genai's model builder turns into MatMulNBits.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import Progress
from ..calibration import calibration_text
from .mixed import INT8_FILE

DEFAULT_SAMPLES = 16  # calibration windows
LAZY_BATCH = 128  # GPTQ's lazy batch: the rest of the matrix is updated once per this many columns
# each block's scale: the fraction of its largest weight's that rounds with the least energy-weighted error (False: 1.0)
CLIP_SEARCH = True
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# mixed precision (issue 18): the MLP down projections of this last share of the decoder layers stay at 8 bits.
# Measured on SmolLM2-135M (README): their 4-bit rounding costs most on text unlike the calibration text.  With the
# 8-bit embedding and clipped block scales, GPL-3 perplexity vs fp32: none 1.155x, the last third 1.106x (0.97x the
# decode speed), the last half 1.115x (0.89x); before clipping: the first half 1.168x, all 1.107-1.114x but
# ~0.85-0.9x the speed, o_proj of every layer 1.176x.
INT8_DOWN_SHARE = 1 / 3
_DOWN = re.compile(r"\.(\d+)\.mlp\.down_proj$")

# the tensor names onnxruntime-genai's GPTQ import reads (its loaders/base.py, 0.18); it passes over others, so a
# checkpoint with different names (Phi-1/2's dense/fc1/final_layernorm, InternLM2's wqkv, ...) would lose weights
_LAYER = r"model\.layers\.\d+\."
IMPORTABLE = re.compile(
    r"^(?:model\.embed_tokens\.weight|model\.norm\.(?:weight|bias)|lm_head\.(?:weight|bias)"
    rf"|{_LAYER}(?:input|post_attention|pre_feedforward|post_feedforward)_layernorm\.(?:weight|bias)"
    rf"|{_LAYER}self_attn\.(?:q_proj|k_proj|v_proj|o_proj|qkv_proj|q_norm|k_norm)\.(?:weight|bias)"
    rf"|{_LAYER}self_attn\.rotary_emb\.inv_freq"
    rf"|{_LAYER}mlp\.(?:gate_proj|up_proj|down_proj|gate_up_proj)\.(?:weight|bias))$")


def unimportable_tensor(source_dir: Path) -> str | None:
    """The first tensor of the checkpoint whose name onnxruntime-genai's GPTQ import would not read, or None
    (from the safetensors headers: no weights are loaded)."""
    for f in sorted(source_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name in sorted(header):
            normal = "model." + name[len("model.language_model."):] if name.startswith("model.language_model.") \
                else name
            if name != "__metadata__" and not IMPORTABLE.match(normal):
                return name
    return None


class _Caught(Exception):
    """Stops the model once the first decoder layer's inputs are captured."""


def gptq_checkpoint(source_dir: Path, out_dir: Path, *, block_size: int = 32, symmetric: bool = True,
                    samples: int = DEFAULT_SAMPLES, seq_len: int = 512, damp: float = 0.01, text: str | None = None,
                    mixed: bool = True, progress: Progress | None = None) -> Path:
    """Quantize the linear layers of the decoder blocks in ``source_dir`` with GPTQ and write a GPTQ-format
    checkpoint (4-bit, ``block_size`` inputs per scale) to ``out_dir``.  The output head is quantized too, on the
    final norm's outputs (a tied head is written apart from the embedding table, which stays float); embeddings and
    norms are left as they are.

    text: the calibration text (default: :func:`calibration_text`); ``samples`` windows of ``seq_len`` tokens spread
    over it.  mixed: the MLP down projections of the last INT8_DOWN_SHARE of the layers at 8 bits
    (:func:`int8_modules`); they are written in the checkpoint as 4-bit placeholders (the builder imports one bit
    width) and, 8-bit, in ``mixed.INT8_FILE``, for ``mixed.apply_int8`` to put in the exported graph."""
    import torch

    report = progress or (lambda message, fraction: None)
    torch.manual_seed(0)
    model, tokenizer = _load(source_dir)
    batches = calibration_batches(tokenizer, calibration_text() if text is None else text, samples, seq_len,
                                  getattr(model.config, "max_position_embeddings", None))
    codes = quantize_model(model, batches, block_size=block_size, symmetric=symmetric, damp=damp,
                           int8=int8_modules(model) if mixed and symmetric else (), progress=report)
    report("GPTQ: writing the checkpoint", 1.0)
    _write(model, source_dir, out_dir, codes, block_size, symmetric)
    return out_dir


def int8_modules(model: Any, share: float = INT8_DOWN_SHARE) -> set[str]:
    """The MLP down projections (``<layers>.N.mlp.down_proj``) of the last ``share`` of the decoder layers: the
    matrices mixed precision keeps at 8 bits.  Empty for a model whose modules are named otherwise."""
    prefix, layers = _decoder_layers(model)
    first = len(layers) - int(round(len(layers) * share))
    names = {name for name, _ in model.named_modules() if name.startswith(prefix + ".")}
    return {f"{prefix}.{i}.mlp.down_proj" for i in range(first, len(layers))} & names


def _load(source_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would cut through the caller's progress bar
    try:
        model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def calibration_batches(tokenizer: Any, text: str, samples: int, seq_len: int, max_len: int | None = None
                        ) -> list[Any]:
    """``samples`` windows of ``seq_len`` tokens (fewer when the text is short) spread evenly over ``text``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    seq_len = min(seq_len, len(ids), max_len or seq_len)
    samples = max(1, min(samples, len(ids) // seq_len))
    stride = len(ids) // samples  # spread over the whole text
    return [ids[i * stride:i * stride + seq_len].unsqueeze(0) for i in range(samples)]


@dataclass
class Quantized:
    """One linear layer's rounding: codes [out, in] (0 .. 2**bits - 1), scales and zero points [out, in / block],
    and the mean squared change of its output on the calibration tokens (``error``)."""
    codes: Any
    scales: Any
    zeros: Any
    bits: int
    error: float


def quantize_model(model: Any, batches: list[Any], *, block_size: int = 32, symmetric: bool = True,
                   damp: float = 0.01, int8: Any = (), progress: Progress | None = None) -> dict[str, Quantized]:
    """GPTQ every linear layer of the decoder blocks, in order, each on the outputs of the already-quantized ones,
    then the output head; the decoder's weights are replaced by their dequantized values (the head's stay float).
    Returns module name -> Quantized; the modules named in ``int8`` get 8 bits, the others 4.  block_size=0: one
    scale per output channel (the NPU pair's int4), and the head is left to the caller."""
    import torch

    report = progress or (lambda message, fraction: None)
    prefix, layers = _decoder_layers(model)
    eight = set(int8)
    inputs, kwargs = _first_inputs(model, layers, batches)
    codes: dict[str, Quantized] = {}
    with torch.no_grad():
        for index, layer in enumerate(layers):
            report(f"GPTQ: layer {index + 1}/{len(layers)}", index / len(layers))
            hessians = _hessians(layer, inputs, kwargs, len(batches))
            for name, m in _linears(layer).items():
                full = f"{prefix}.{index}.{name}"
                block = block_size or m.weight.shape[1]  # 0: one scale per output channel (per-channel int4)
                q = quantize_layer(m.weight.data, hessians[name], block, symmetric, damp,
                                   bits=8 if full in eight else 4)
                m.weight.data = dequantize(q, block)
                codes[full] = q
            outputs = [layer(x, **kwargs) for x in inputs]  # the next layer sees this layer quantized
            inputs = [o[0] if isinstance(o, tuple) else o for o in outputs]
        head = model.get_output_embeddings()
        norm = getattr(model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model, "norm", None)
        if block_size and isinstance(head, torch.nn.Linear) and norm is not None and head.in_features % block_size == 0:
            report("GPTQ: output head", 0.98)
            hessian = torch.zeros(head.in_features, head.in_features)
            for x in inputs:
                h = norm(x).reshape(-1, head.in_features).float()
                hessian += 2 * h.T @ h / len(batches)
            # the head's weights stay float in the model: a tied one is the embedding table too, which stays float
            codes["lm_head"] = quantize_layer(head.weight.data, hessian, block_size, symmetric, damp)
    return codes


def _linears(layer: Any) -> dict[str, Any]:
    import torch

    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _hessians(layer: Any, inputs: list[Any], kwargs: dict[str, Any], n_batches: int) -> dict[str, Any]:
    """2 X^T X / batches of the inputs of every linear of ``layer`` on ``inputs``."""
    import torch

    linears = _linears(layer)
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}

    def accumulate(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple, output: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name] += 2 * x.T @ x / n_batches
        return hook

    hooks = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
    for x in inputs:
        layer(x, **kwargs)
    for h in hooks:
        h.remove()
    return hessians


def _first_inputs(model: Any, layers: Any, batches: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """The first decoder layer's inputs for every batch, and the other arguments the model passes it."""
    import torch

    inputs: list[Any] = []
    kwargs: dict[str, Any] = {}

    def catch(module: Any, args: tuple, kw: dict[str, Any]) -> None:
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            try:
                model(batch, use_cache=False)
            except _Caught:
                pass
    handle.remove()
    return inputs, kwargs


def _decoder_layers(model: Any) -> tuple[str, Any]:
    import torch

    for name, module in model.named_modules():
        if name.endswith(".layers") and isinstance(module, torch.nn.ModuleList):
            return name, module
    raise ValueError("no decoder layers (a '*.layers' ModuleList) found")


def quantize_layer(w: Any, hessian: Any, block_size: int, symmetric: bool, damp: float, bits: int = 4) -> Quantized:
    """GPTQ on one weight [out, in] (see quantize), with the change of its outputs: trace(dW H dW^T)."""
    codes, scales, zeros, dequantized = quantize(w, hessian, block_size, symmetric, damp, bits=bits)
    delta = dequantized - w.float()
    return Quantized(codes, scales, zeros, bits, float(((delta @ hessian) * delta).sum()))


def dequantize(q: Quantized, block_size: int) -> Any:
    n_out, n_in = q.codes.shape
    blocks = (q.codes.float().reshape(n_out, -1, block_size) - q.zeros.unsqueeze(2)) * q.scales.unsqueeze(2)
    return blocks.reshape(n_out, n_in)


def quantize(w: Any, hessian: Any, block_size: int, symmetric: bool, damp: float, act_order: bool = True,
             bits: int = 4, clip_search: bool = CLIP_SEARCH) -> tuple[Any, Any, Any, Any]:
    """GPTQ on one weight [out, in]: (codes 0..2**bits-1 [out, in], scales [out, in/block], zero points
    [out, in/block], the dequantized weight).

    act_order: round the inputs with the largest Hessian diagonal (the most active) first, while the scales stay
    those of the original blocks ("static groups"), so the result keeps the plain block layout."""
    import torch

    W = w.clone().float()
    n_out, n_in = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scales = torch.zeros(n_out, n_in // block_size)
    zeros = torch.zeros(n_out, n_in // block_size)
    energy = torch.diag(H).clamp(min=0)  # how much each input carries: the weight of its rounding error
    for b in range(n_in // block_size):
        cols = slice(b * block_size, (b + 1) * block_size)
        scale, zero = _block_params(W[:, cols], symmetric, bits)
        if clip_search:
            scale = _clipped_scale(W[:, cols], scale, zero, energy[cols], bits)
        scales[:, b], zeros[:, b] = scale.squeeze(1), zero.squeeze(1)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n_in)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n_in)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(n_out, n_in, dtype=torch.int32)
    step = min(block_size, LAZY_BATCH)  # columns per lazy update (exact for any size; per-row scales need a bound)
    for start in range(0, n_in, step):
        end = min(start + step, n_in)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        errors = torch.zeros_like(W1)
        for i in range(end - start):
            column, group = W1[:, i], int(perm[start + i]) // block_size
            scale, zero = scales[:, group], zeros[:, group]
            q = torch.clamp(torch.round(column / scale) + zero, 0, 2**bits - 1)
            codes[:, perm[start + i]] = q.to(torch.int32)
            error = (column - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= error.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            errors[:, i] = error
        W[:, end:] -= errors @ Hinv[start:end, end:]
    dequantized = ((codes.float().reshape(n_out, -1, block_size) - zeros.unsqueeze(2)) * scales.unsqueeze(2))
    return codes, scales, zeros, dequantized.reshape(n_out, n_in)


def _clipped_scale(W1: Any, scale: Any, zero: Any, energy: Any, bits: int) -> Any:
    """Per row of one block, the scale among ``scale x CLIP_FACTORS`` with the least rounding error weighted by
    each input's energy (a smaller scale clips the largest weight and rounds the others finer)."""
    import torch

    best, best_err = scale, None
    for f in CLIP_FACTORS:
        s = scale * f
        q = torch.clamp(torch.round(W1 / s) + zero, 0, 2**bits - 1)
        err = (((W1 - (q - zero) * s) ** 2) * energy).sum(1, keepdim=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def _block_params(W1: Any, symmetric: bool, bits: int = 4) -> tuple[Any, Any]:
    """Scale and integer zero point per row of one block (the grid onnxruntime's MatMulNBits uses: codes
    0 .. 2**bits - 1)."""
    import torch

    half = 2 ** (bits - 1)
    if symmetric:  # the largest magnitude maps to -8 (onnxruntime's symmetric convention), zero point 8 (int8: 128)
        big = torch.gather(W1, 1, W1.abs().argmax(1, keepdim=True))
        scale = big / -half
        scale[scale == 0] = 1
        return scale, torch.full_like(scale, half)
    lo = torch.clamp(W1.min(1, keepdim=True).values, max=0)
    hi = torch.clamp(W1.max(1, keepdim=True).values, min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale[scale == 0] = 1
    return scale, torch.round(-lo / scale)


def _pack(values: Any, axis: int) -> Any:
    """Eight 4-bit values along ``axis`` into one int32 (GPTQ layout: the first value in the lowest bits)."""
    import torch

    v = values.to(torch.int64) & 0xF
    v = v.reshape(v.shape[0] // 8, 8, v.shape[1]) if axis == 0 else v.reshape(v.shape[0], v.shape[1] // 8, 8)
    packed = torch.zeros(v.shape[0], v.shape[2] if axis == 0 else v.shape[1], dtype=torch.int64)
    for j in range(8):
        packed |= (v[:, j, :] if axis == 0 else v[:, :, j]) << (4 * j)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _write(model: Any, source_dir: Path, out_dir: Path, codes: dict[str, Quantized], block_size: int,
           symmetric: bool) -> None:
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    eight: dict[str, Any] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base in codes:
            q = codes[base]
            if q.bits == 8:  # an int4 placeholder for the builder; mixed.apply_int8 puts the 8-bit one in
                eight[base + ".codes"] = q.codes.to(torch.uint8)
                eight[base + ".scales"] = q.scales.float()
                q = _rtn4(dequantize(q, block_size), block_size, symmetric)
            tensors[base + ".qweight"] = _pack(q.codes.T.contiguous(), axis=0)  # [in/8, out]
            tensors[base + ".qzeros"] = _pack((q.zeros.T.contiguous().to(torch.int64) - 1), axis=1)  # GPTQ v1: zero-1
            tensors[base + ".scales"] = q.scales.T.contiguous().to(torch.float16)
            tensors[base + ".g_idx"] = (torch.arange(q.codes.shape[1]) // block_size).to(torch.int32)
        elif not (tied and name == "lm_head.weight"):
            tensors[name] = tensor.contiguous().clone()
        # a tied head quantized above is written as lm_head.q*, beside the float embedding table
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if eight:
        save_file(eight, str(out_dir / INT8_FILE))
    for f in source_dir.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")) and \
                f.name != "model.safetensors.index.json":
            shutil.copy2(f, out_dir / f.name)
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    if "lm_head" in codes:
        config["tie_word_embeddings"] = False  # the head is int4 now; the embedding table stays float
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": block_size,
                                     "desc_act": False, "sym": symmetric, "checkpoint_format": "gptq"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _rtn4(w: Any, block_size: int, symmetric: bool) -> Quantized:
    import torch

    n_out, n_in = w.shape
    blocks = w.reshape(n_out, n_in // block_size, block_size)
    params = [_block_params(blocks[:, b], symmetric) for b in range(n_in // block_size)]
    scales = torch.cat([p[0] for p in params], dim=1)
    zeros = torch.cat([p[1] for p in params], dim=1)
    codes = torch.clamp(torch.round(blocks / scales.unsqueeze(2)) + zeros.unsqueeze(2), 0, 15).to(torch.int32)
    return Quantized(codes.reshape(n_out, n_in), scales, zeros, 4, 0.0)
