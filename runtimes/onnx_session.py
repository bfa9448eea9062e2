"""edgelm's own decode loop over one onnxruntime InferenceSession, for plain decoder graphs (optimum-onnx's exports).

onnxruntime-genai runs only the graphs its builder writes (GroupQueryAttention, genai_config.json).  optimum-onnx
writes a plain graph instead: ``input_ids``, ``attention_mask``, ``position_ids`` (most architectures) and one
``past_key_values.{i}.key/value`` input per layer in; ``logits`` and ``present.{i}.key/value`` out, where each
present is ``Concat(past, new)`` along the sequence axis.  :class:`OnnxSessionBackend` runs such a graph with I/O
binding and no copy of the cache through numpy:

* A graph whose attention edgelm rewrote into onnxruntime's GroupQueryAttention at conversion
  (:mod:`edgelm.converters.onnx.attention`; ``session_io(...)["shared_buffer"]``) keeps each cache tensor in one
  buffer ``[1, heads, n_ctx, head_size]``, bound once at load as both past and present: the op writes the new
  positions in place and reads only the first ``len(seq) + n`` (from ``attention_mask``).  A step binds only
  input_ids, attention_mask, position_ids and logits; rewinding is forgetting the tail.
* Any other graph (present = ``Concat(past, new)``): every cache tensor has two flat buffers allocated once at load
  for ``n_ctx`` positions (the pages are only touched, and so only cost memory, as the sequence grows).
  A step binds ``past`` to the first ``len(seq)`` positions of the front buffer and ``present`` to the first
  ``len(seq) + n`` positions of the back buffer, by pointer; onnxruntime's Concat writes the new cache straight into
  the back buffer, and the two swap.  A prefix of a flat buffer viewed as ``[1, heads, length, head_size]`` is
  contiguous, so no step allocates or copies outside the graph, but the Concat copies the whole cache once per step.
* input_ids / attention_mask / position_ids / logits are views of buffers allocated once too.
* Rewinding a two-buffer cache to a shorter prefix (a chat whose history changed) moves the kept positions once (one
  copy of the prefix), after which the layout is again ``[1, heads, n, head_size]``.

Chosen by :class:`edgelm.runtimes.onnx.OnnxBackend` when the folder's manifest says optimum wrote it
(``formats.onnx_folder.exporter_kind``), so ``backend="onnxruntime"`` (and ``auto``) runs both kinds of folder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgelm.errors import BackendError, InvalidModelFileError, UnsupportedModelError
from edgelm.formats import onnx_folder, onnx_plain
from edgelm.optional import require

from .base import Capabilities, LoadOptions, Seq
from .onnx_base import HostLogitsBackend
from .onnx_providers import ort_version

log = logging.getLogger("edgelm.onnx")

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32}


def _ort() -> Any:
    return require("onnxruntime", extra="onnx", purpose="The onnxruntime backend", backend="onnxruntime")


class _KV:
    """One cache tensor (a layer's key or value): two flat buffers for ``capacity`` positions, front and back, or
    one (``shared``: front is back)."""

    __slots__ = ("past", "present", "static", "axis", "dtype", "front", "back", "per_position", "elem")

    def __init__(self, past: str, present: str, shape: Sequence[int], axis: int, dtype: Any, capacity: int,
                 shared: bool = False) -> None:
        self.past, self.present, self.axis, self.dtype = past, present, axis, np.dtype(dtype)
        self.static = [1 if i == 0 else int(d) for i, d in enumerate(shape)]  # batch 1; the sequence axis set per step
        self.per_position = math.prod(d for i, d in enumerate(self.static) if i != axis)
        self.front = np.zeros(self.per_position * capacity, dtype=self.dtype)  # calloc: pages cost memory when used
        self.back = self.front if shared else np.empty(self.per_position * capacity, dtype=self.dtype)

    def shape(self, n: int) -> list[int]:
        s = list(self.static)
        s[self.axis] = n
        return s

    def view(self, buf: np.ndarray, n: int) -> np.ndarray:
        return buf[: self.per_position * n].reshape(self.shape(n))

    def swap(self) -> None:
        self.front, self.back = self.back, self.front

    def keep(self, n: int, length: int) -> None:
        """Keep the first ``n`` of ``length`` positions (one copy into the back buffer, then swap)."""
        src = self.view(self.front, length)
        index = [slice(None)] * src.ndim
        index[self.axis] = slice(0, n)
        np.copyto(self.view(self.back, n), src[tuple(index)])
        self.swap()


class OnnxSessionBackend(HostLogitsBackend):

    def __init__(self) -> None:  # use load()
        self.session: Any = None  # onnxruntime.InferenceSession
        self.capabilities = Capabilities(max_sequences=1, grammar=True, constraints=True)
        self._make_sequences(1)
        self._last: np.ndarray | None = None  # logits of the last evaluated token

    # --- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def accepts(cls, path: Path) -> bool:
        folder = onnx_folder.folder_of(Path(path))
        if not onnx_folder.is_onnx_folder(folder):
            return False
        try:
            return onnx_folder.exporter_kind(onnx_folder.read_manifest(folder)) == "optimum"
        except Exception:
            return False

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "OnnxSessionBackend":
        folder, manifest = cls.open_folder(path)
        ort = _ort()
        self = cls()
        self._setup(folder, manifest, options)
        model_file = folder / manifest.get("model_file", "model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(options.threads)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        providers = [self.provider] + (["CPUExecutionProvider"] if self.provider != "CPUExecutionProvider" else [])
        try:
            self.session = ort.InferenceSession(str(model_file), so, providers=providers)
        except Exception as exc:
            msg = str(exc)
            if "protobuf" in msg.lower() or "parse" in msg.lower() or "external data" in msg.lower():
                raise InvalidModelFileError(f"onnxruntime could not read {model_file}: {msg}",
                                            fix="The files are corrupt or incomplete: convert the model again.",
                                            path=str(model_file)) from exc
            raise UnsupportedModelError(f"onnxruntime {ort_version()} cannot run {model_file} on {self.provider}: "
                                        f"{msg.strip()[:400]}", fix="Upgrade onnxruntime, or convert the model again "
                                        "with this edgelm.", path=str(model_file)) from exc
        self._setup_io(model_file)
        self._load_tokenizer()
        return self

    def _setup_io(self, model_file: Path) -> None:
        """Buffers for every input and output, from the session's own I/O (the manifest's record is checked)."""
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        io = onnx_plain.session_io(model_file)  # raises for a graph without past key/values
        unknown = [n for n in io["inputs"] if n not in ("input_ids", "attention_mask", "position_ids")]
        if unknown:
            raise UnsupportedModelError(f"{model_file} has inputs edgelm does not know how to feed: {unknown}.",
                                        fix="Convert the model to GGUF instead.", path=str(model_file))
        self.has_mask, self.has_positions = "attention_mask" in ins, "position_ids" in ins
        self.id_type = _NUMPY.get(ins["input_ids"].type, np.int64)
        cap = self.n_ctx
        self.shared = bool(io["shared_buffer"])
        self.kv = [_KV(k["past"], k["present"], k["shape"], k["sequence_axis"], _NUMPY[ins[k["past"]].type], cap,
                       self.shared) for k in io["kv"]]
        self.vocab = int(outs["logits"].shape[-1]) if isinstance(outs["logits"].shape[-1], int) else \
            int(self.manifest.get("vocab_size") or 0)
        self.logits_type = _NUMPY.get(outs["logits"].type, np.float32)
        self.n_batch = max(1, int(self.options.n_batch))
        self._ids = np.zeros(self.n_batch, dtype=self.id_type)
        self._mask = np.ones(cap, dtype=_NUMPY.get(ins["attention_mask"].type, np.int64) if self.has_mask else np.int64)
        self._pos = np.arange(cap, dtype=_NUMPY.get(ins["position_ids"].type, np.int64) if self.has_positions
                              else np.int64)
        self._logits = np.empty(self.n_batch * self.vocab, dtype=self.logits_type)  # pages touched only when used
        self.binding = self.session.io_binding()
        self.kv_bytes = sum(kv.front.nbytes * (1 if self.shared else 2) for kv in self.kv)
        if self.shared:  # bound once: the op appends in place and reads the first len(seq) + n positions
            for kv in self.kv:
                self.binding.bind_input(kv.past, "cpu", 0, kv.dtype, kv.shape(cap), kv.front.ctypes.data)
                self.binding.bind_output(kv.present, "cpu", 0, kv.dtype, kv.shape(cap), kv.front.ctypes.data)

    # --- the sequence ---------------------------------------------------------------------------------------------

    def _run(self, seq: Seq, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate ``tokens`` (at most n_batch) after what ``seq`` holds; their logits [len(tokens), vocab]."""
        if self.session is None:
            raise BackendError("The onnxruntime model is closed.", fix="Load it again with edgelm.load().")
        n, s = len(seq.tokens), len(tokens)
        if n + s > self.n_ctx:
            raise BackendError(f"Cannot evaluate {s} more tokens: the sequence holds {n} of n_ctx={self.n_ctx}.",
                               fix="Use a shorter prompt or a larger n_ctx.")
        b = self.binding
        ids = self._ids[:s]
        ids[:] = tokens
        b.bind_input("input_ids", "cpu", 0, ids.dtype, [1, s], ids.ctypes.data)
        if self.has_mask:
            b.bind_input("attention_mask", "cpu", 0, self._mask.dtype, [1, n + s], self._mask.ctypes.data)
        if self.has_positions:
            b.bind_input("position_ids", "cpu", 0, self._pos.dtype, [1, s], self._pos[n:].ctypes.data)
        if not self.shared:
            for kv in self.kv:
                b.bind_input(kv.past, "cpu", 0, kv.dtype, kv.shape(n), kv.front.ctypes.data)
                b.bind_output(kv.present, "cpu", 0, kv.dtype, kv.shape(n + s), kv.back.ctypes.data)
        b.bind_output("logits", "cpu", 0, self._logits.dtype, [1, s, self.vocab], self._logits.ctypes.data)
        try:
            self.session.run_with_iobinding(b)
        except Exception as exc:
            self._reset(seq)
            raise BackendError(f"onnxruntime failed to evaluate {s} tokens ({n} in the sequence, n_ctx={self.n_ctx}): "
                               f"{exc}", fix="Load the model again; if it repeats, convert it again.") from exc
        if not self.shared:
            for kv in self.kv:
                kv.swap()
        seq.tokens.extend(tokens)
        return self._logits[: s * self.vocab].reshape(s, self.vocab)

    def _reset(self, seq: Seq) -> None:
        seq.tokens.clear()
        self._last = None

    def extend(self, seq: Seq, tokens: Sequence[int]) -> None:
        for i in range(0, len(tokens), self.n_batch):
            logits = self._run(seq, tokens[i : i + self.n_batch])
        if len(tokens):
            self._last = logits[-1]

    def rewind(self, seq: Seq, n: int) -> bool:
        length = len(seq.tokens)
        if n >= length:
            return True
        if n > 0 and not self.shared:  # a shared buffer's positions past n are simply not read any more
            for kv in self.kv:
                kv.keep(n, length)
        del seq.tokens[n:]
        self._last = None  # the kept prefix's last logits are gone: the caller evaluates at least one token
        return True

    def logits_all(self, seq: Seq, tokens: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        for i in range(0, len(tokens), self.n_batch):
            logits = self._run(seq, tokens[i : i + self.n_batch])
            self._last = logits[-1]
            yield i, logits

    # --- facts ------------------------------------------------------------------------------------------------------

    def runtime_facts(self) -> dict[str, Any]:
        return {"kv_cache_bytes": self.kv_bytes, "exporter": self.manifest.get("exporter"),
                "kv_cache_shared_buffer": self.shared,
                "runtime": "edgelm decode loop over an onnxruntime InferenceSession (I/O binding)"}

    def close(self) -> None:
        self.session = None
        self.binding = None
        self.kv = []
        self._last = None
        for seq in self.sequences:
            seq.tokens.clear()
