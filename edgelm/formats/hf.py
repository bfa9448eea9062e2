"""Hugging Face checkpoint folders: config.json and safetensors headers, read without loading any weights."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edgelm.errors import InvalidModelFileError, UnsupportedModelError

from .gguf import AttentionShape

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # a safetensors header is JSON of tensor names and shapes: never this large


def safetensors_header(path: Path) -> dict:
    """The JSON header of one .safetensors file (tensor names, dtypes, shapes, offsets)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is not plausible")
            data = fh.read(n)
            if len(data) < n:
                raise ValueError(f"the {n}-byte header is cut short at {len(data)} bytes")
            header = json.loads(data)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidModelFileError(f"{path} is not a readable safetensors file ({exc}).",
                                    fix="Download or save the checkpoint again.", path=str(path)) from exc
    if not isinstance(header, dict):
        raise InvalidModelFileError(f"{path} has a safetensors header that is not a JSON object.",
                                    fix="Download or save the checkpoint again.", path=str(path))
    return header


def count_parameters(folder: Path) -> int:
    """Parameter count of a checkpoint from its safetensors headers (no weights are read); 0 without any."""
    return tensor_summary(safetensors_header(f) for f in Path(folder).glob("*.safetensors")).parameters


def is_checkpoint(path: Path) -> bool:
    """A folder holding config.json and safetensors weights."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (any(path.glob("*.safetensors"))
                                                           or (path / SAFETENSORS_INDEX).is_file())


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFileError(f"{path} is not valid JSON ({exc}).", fix="Restore the file from the source.",
                                    path=str(path)) from exc
    if not isinstance(config, dict):
        raise InvalidModelFileError(f"{path} is not a JSON object.", fix="Restore the file from the source.",
                                    path=str(path))
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal models such as Gemma 3 nest it as ``text_config``)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) and inner else config


def _first(c: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    return None


def attention_shape(config: dict[str, Any], where: str = CONFIG) -> AttentionShape:
    """The KV-cache shape a Hugging Face config describes: layers, heads, KV heads (grouped-query attention), head
    dimension (``head_dim``, else hidden size / heads) and vocabulary."""
    c = text_config(config)
    n_layer = _first(c, "num_hidden_layers", "n_layer", "num_layers")
    n_embd = _first(c, "hidden_size", "n_embd", "d_model")
    n_head = _first(c, "num_attention_heads", "n_head")
    missing = [name for name, v in (("num_hidden_layers", n_layer), ("hidden_size", n_embd),
                                    ("num_attention_heads", n_head)) if not isinstance(v, int) or v <= 0]
    if missing:
        raise UnsupportedModelError(
            f"{where} does not say {', '.join(missing)}, so the model's KV cache cannot be sized.",
            fix="Use the config.json the model was published with (a decoder-only language model).", path=where)
    n_kv = _first(c, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if n_kv is None:
        n_kv = 1 if c.get("multi_query") else n_head
    head = _first(c, "head_dim") or n_embd // n_head
    return AttentionShape(n_layer=int(n_layer), n_embd=int(n_embd), n_head=int(n_head), n_head_kv=int(n_kv),
                          head_k=int(head), head_v=int(head), n_vocab=int(c.get("vocab_size") or 0))


def context_length(config: dict[str, Any]) -> int | None:
    """The context the model was trained for."""
    value = _first(text_config(config), "max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")
    return int(value) if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class TensorSummary:
    parameters: int
    bytes: int
    dtype: str  # the dtype holding most of the bytes (BF16, F16, F32, ...)


def tensor_summary(headers: Iterable[dict[str, Any]]) -> TensorSummary:
    """Parameters, bytes and main dtype over safetensors headers (``{name: {dtype, shape, data_offsets}}``)."""
    params = total = 0
    by_dtype: dict[str, int] = {}
    for header in headers:
        for name, t in header.items():
            if name == "__metadata__" or not isinstance(t, dict):
                continue
            count = 1
            for d in t.get("shape", []):
                count *= int(d)
            begin, end = t.get("data_offsets", (0, 0))
            params += count
            total += int(end) - int(begin)
            dtype = str(t.get("dtype", "?")).upper()
            by_dtype[dtype] = by_dtype.get(dtype, 0) + int(end) - int(begin)
    dtype = max(by_dtype, key=lambda k: by_dtype[k]) if by_dtype else "?"
    return TensorSummary(params, total, dtype)


def checkpoint_tensors(folder: Path) -> TensorSummary:
    """What the *.safetensors files of a checkpoint folder hold, from their headers alone."""
    return tensor_summary(safetensors_header(f) for f in sorted(Path(folder).glob("*.safetensors")))
