"""The static-shape ONNX pair (``edgelm convert --to onnx --target npu``): the folder's layout, its I/O contract and
the host-side KV window both the converter (calibration) and the runtime drive it with.

Folder::

    prefill.onnx   AR-N graph: N tokens per run (the prompt, in chunks of N; the last chunk padded)
    decode.onnx    AR-1 graph: one token per run
    weights.data   the external weights both graphs read (one copy on disk)
    edgelm.json    the manifest: "graphs" (file, AR size, inputs and outputs with their shapes and types),
                   "context", "kv_encoding", "calibration", "lint" (the EP rule tables the graphs passed)
    tokenizer.json, tokenizer_config.json, chat_template.jinja, ...

Every dimension is fixed.  Per run a graph takes ``input_ids`` and ``position_ids`` (int32 ``[1, AR]``), an
additive ``attention_mask`` (float ``[1, 1, AR, context + AR]``: 0 where a row may attend, MASK_VALUE elsewhere) and,
per layer, the whole KV window the host keeps: ``past_key.{i}`` ``[1, kv_heads, head_size, context]`` (keys stored
transposed, as NPUs want them for the score MatMul) and ``past_value.{i}`` ``[1, kv_heads, context, head_size]``.
It returns ``logits`` ``[1, AR, vocab]`` and only the AR new entries of each layer, ``present_key.{i}``
``[1, kv_heads, head_size, AR]`` and ``present_value.{i}`` ``[1, kv_heads, AR, head_size]``, which the host writes
into its window at the sequence's length.  Columns ``[0, context)`` of the mask address the window, columns
``[context, context + AR)`` the run's own tokens.  Quantized graphs keep the KV window as uint8 (symmetric: zero
point 128, one scale per layer and tensor, the same in both graphs), so the host stores bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

EXPORTER = "edgelm static pair"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "weights.data"
MASK_VALUE = -100.0  # exp(-100) is 0 in float32; a small range keeps the 16-bit mask encoding fine-grained
NPU_QUANTS = ("w8a16", "w4a16", "fp32")
# bytes per parameter of the folder as written (SmolLM2-135M: the uint16 embedding table and the separate 8-bit
# output head weigh on a small model), for plans
BYTES_PER_PARAMETER = {"w8a16": 1.45, "w4a16": 0.95, "fp32": 4.85}


def input_names(layers: int) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask"] + [
        n for i in range(layers) for n in (f"past_key.{i}", f"past_value.{i}")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [n for i in range(layers) for n in (f"present_key.{i}", f"present_value.{i}")]


def is_static_pair(manifest: dict[str, Any]) -> bool:
    return str((manifest.get("exporter") or {}).get("name") or "") == EXPORTER


@dataclass(frozen=True)
class PairShape:
    """What the host needs to drive the pair: from the manifest's ``kv_cache`` and ``context``."""

    layers: int
    kv_heads: int
    head_size: int
    context: int
    vocab: int

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> "PairShape":
        kv = manifest["kv_cache"]
        return cls(int(kv["layers"]), int(kv["kv_heads"]), int(kv["head_size"]), int(manifest["context"]),
                   int(manifest["vocab_size"]))

    def key_shape(self, length: int) -> list[int]:
        return [1, self.kv_heads, self.head_size, length]

    def value_shape(self, length: int) -> list[int]:
        return [1, self.kv_heads, length, self.head_size]


class KVWindow:
    """The host's KV window for one sequence, allocated once: per layer a key and a value buffer of ``context``
    positions (``dtype``: float32 for the fp32 pair, uint8 for quantized ones), plus the per-graph input buffers
    (ids, positions, mask) and output buffers (new keys and values) of each AR size.  A run binds these buffers by
    pointer (the runtime) or passes them as arrays (calibration); nothing is allocated per step, and the only copy
    is of the AR new entries into the window (:meth:`commit`)."""

    def __init__(self, shape: PairShape, dtype: Any, ar_sizes: tuple[int, ...]) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)
        ctx = shape.context
        self.keys = [np.zeros(shape.key_shape(ctx), self.dtype) for _ in range(shape.layers)]
        self.values = [np.zeros(shape.value_shape(ctx), self.dtype) for _ in range(shape.layers)]
        self.ids = {ar: np.zeros((1, ar), np.int32) for ar in ar_sizes}
        self.positions = {ar: np.zeros((1, ar), np.int32) for ar in ar_sizes}
        self.mask = {ar: np.full((1, 1, ar, ctx + ar), MASK_VALUE, np.float32) for ar in ar_sizes}
        self.new_keys = {ar: [np.zeros(shape.key_shape(ar), self.dtype) for _ in range(shape.layers)]
                         for ar in ar_sizes}
        self.new_values = {ar: [np.zeros(shape.value_shape(ar), self.dtype) for _ in range(shape.layers)]
                           for ar in ar_sizes}
        self.logits = {ar: np.zeros((1, ar, shape.vocab), np.float32) for ar in ar_sizes}
        self.length = 0  # positions of the window in use

    def prepare(self, tokens: Any, ar: int) -> None:
        """Fill the AR-``ar`` graph's inputs for ``tokens`` (at most ``ar``; the rest is padding) after the
        ``length`` positions the window holds."""
        n, ctx, past = len(tokens), self.shape.context, self.length
        if n > ar or past + n > ctx:
            raise ValueError(f"{n} tokens after {past} do not fit AR-{ar} / context {ctx}")
        ids = self.ids[ar][0]
        ids[:n] = tokens
        ids[n:] = tokens[-1] if n else 0
        np.minimum(np.arange(past, past + ar, dtype=np.int32), ctx - 1, out=self.positions[ar][0])
        mask = self.mask[ar][0, 0]
        mask[:, :past] = 0.0
        mask[:, past:ctx] = MASK_VALUE
        own = mask[:, ctx:]
        own[:] = MASK_VALUE
        own[np.tril_indices(ar)] = 0.0  # row t sees the run's tokens 0..t (padding rows see themselves and before)

    def feeds(self, ar: int) -> dict[str, np.ndarray]:
        """The inputs as arrays (for a plain ``session.run``)."""
        out = {"input_ids": self.ids[ar], "position_ids": self.positions[ar], "attention_mask": self.mask[ar]}
        for i in range(self.shape.layers):
            out[f"past_key.{i}"], out[f"past_value.{i}"] = self.keys[i], self.values[i]
        return out

    def commit(self, ar: int, n: int) -> None:
        """Write the first ``n`` new entries of the last AR-``ar`` run into the window."""
        start = self.length
        for i in range(self.shape.layers):
            self.keys[i][..., start:start + n] = self.new_keys[ar][i][..., :n]
            self.values[i][:, :, start:start + n] = self.new_values[ar][i][:, :, :n]
        self.length = start + n
