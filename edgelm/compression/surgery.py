"""Torch-side model surgery: load a checkpoint, run its decoder blocks, remove blocks, narrow MLPs, save.

Everything here works on a transformers ``*ForCausalLM`` of a family in :mod:`.families`, in float32 on the CPU.
Decoder blocks are run one by one (``run_layers``) so the callers can start from a cached hidden state, skip blocks
or stop early; attention is causal over the whole window (windows are never longer than a sliding window).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from edgelm.errors import UnsupportedModelError

from .families import LAYER_MODULES, Family

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack")
NOT_COPIED = {"config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
              "README.md"}  # written anew, or describe the original model


def load_model(source: Path) -> Any:
    """The checkpoint in float32, in eval mode, every parameter frozen (callers unfreeze what they train)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would cut through ours
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_structure(model: Any, where: str) -> None:
    """Every decoder layer has the modules compression edits (a variant of a known family that differs is refused)."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for name in LAYER_MODULES:
            obj = layer
            for part in name.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                raise UnsupportedModelError(
                    f"{where}: decoder layer {i} has no {name}; compression needs the standard Llama-style block.",
                    fix="Quantize this model with `edgelm convert` instead.", module=name)
    if len(layers) < 3:
        raise UnsupportedModelError(f"{where} has {len(layers)} decoder layers; compression needs at least 3 (the "
                                    "first and last are always kept).", fix="Compress a deeper model.",
                                    layers=len(layers))


def decoder_layers(model: Any) -> Any:
    return model.model.layers


def max_window(model: Any) -> int | None:
    """The shortest attention window any layer has (a sliding window), or None."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    if hasattr(cfg, "use_sliding_window") and not cfg.use_sliding_window:
        return None
    return int(window)


def position_embeddings(model: Any, hidden: Any) -> tuple[Any, Any]:
    import torch

    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    return model.model.rotary_emb(hidden, pos), pos


def run_layers(model: Any, layers: Sequence[Any], hidden: Any, rope: tuple[Any, Any] | None = None) -> Any:
    """Hidden states after ``layers`` (decoder blocks, in order) from ``hidden`` (batch, seq, dim); causal."""
    pe, pos = rope or position_embeddings(model, hidden)
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, position_embeddings=pe, position_ids=pos)
    return hidden


def head_logits(model: Any, hidden: Any) -> Any:
    return model.lm_head(model.model.norm(hidden))


def count_parameters(model: Any) -> int:
    """Parameters as stored (a tied input embedding and output head count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def drop_layers(model: Any, family: Family, drop: Sequence[int]) -> None:
    """Remove the decoder layers ``drop`` (original indices) and update the config to match."""
    import torch

    layers = decoder_layers(model)
    n = len(layers)
    gone = set(drop)
    keep = [i for i in range(n) if i not in gone]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new  # KV-cache slot
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    for key in family.per_layer_keys:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, key, [value[i] for i in keep])
    for key in family.layer_bound_keys:
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            setattr(cfg, key, sum(1 for i in keep if i < value))


def prune_mlp(model: Any, keep: Sequence[Any]) -> None:
    """Keep the intermediate neurons ``keep[k]`` (index tensors, the same count in every layer) of each layer's MLP."""
    import torch

    width = {len(k) for k in keep}
    if len(width) != 1:
        raise ValueError(f"every layer must keep the same number of MLP neurons, got {sorted(width)}")
    for layer, idx in zip(decoder_layers(model), keep, strict=True):
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            _slice_linear(getattr(mlp, name), rows=idx)
        _slice_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(idx)
    model.config.intermediate_size = width.pop()


def _slice_linear(linear: Any, rows: Any = None, cols: Any = None) -> None:
    import torch

    w = linear.weight.data
    if rows is not None:
        w = w[rows]
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data[rows].clone(), requires_grad=False)
        linear.out_features = len(rows)
    if cols is not None:
        w = w[:, cols]
        linear.in_features = len(cols)
    linear.weight = torch.nn.Parameter(w.clone().contiguous(), requires_grad=False)


def save_checkpoint(model: Any, source: Path, out: Path, *, dtype: str | None, provenance: dict[str, Any]) -> None:
    """Write ``model`` as a Hugging Face checkpoint into the (new, empty) folder ``out``: weights in ``dtype`` (the
    source's), config and generation config updated, tokenizer, chat template and licence files copied."""
    import torch

    model.config.edgelm_compression = provenance  # kept in config.json: what was removed, and how it was healed
    to = getattr(torch, dtype) if dtype in ("bfloat16", "float16") else None
    if to is not None:
        model.to(to)
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if to is not None:
            model.to(torch.float32)
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(WEIGHT_SUFFIXES) \
                and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    # the generation config of the source (sampling defaults, eos ids) as it was, if save_pretrained wrote none
    if (source / "generation_config.json").is_file() and not (out / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", out / "generation_config.json")


def source_dtype(config: dict[str, Any]) -> str | None:
    return config.get("torch_dtype") or config.get("dtype")


