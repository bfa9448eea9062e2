"""The static pair's runtime: the prefill (AR-N) and decode (AR-1) graphs of ``--target npu`` on any onnxruntime EP.

The host keeps the KV window (:class:`edgelm.formats.static_pair.KVWindow`): per layer one key and one value buffer
of ``context`` positions, allocated at load and bound once, by pointer, as the ``past_*`` inputs of both sessions
(I/O binding: onnxruntime reads them in place; nothing is copied or allocated per step).  The ids, positions, mask,
logits and new-KV buffers of each graph are bound once too; a step fills ids/positions/mask in place, runs, and writes
only its new entries into the window (AR positions, never the window).  A prompt is evaluated in prefill chunks of
AR tokens (the last one padded), a single token by the decode graph.  Rewinding is forgetting the tail (the mask
hides it), so prompt reuse (:meth:`BackendBase.prepare`) costs nothing.

The EP: QNN (Snapdragon), OpenVINO (Intel NPU) or VitisAI (Ryzen AI) when device="npu"/"auto" finds it installed,
with the options of the matching device profile (:func:`edgelm.platforms.npu.runtime_options`: QNN backend path,
HTP performance mode, EPContext caching of the compiled graph); the CPU EP otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgelm.errors import BackendError, InvalidModelFileError, UnsupportedModelError
from edgelm.formats import onnx_folder, static_pair
from edgelm.optional import require
from edgelm.platforms.npu import NPU_PROVIDERS, runtime_options

from .base import Capabilities, LoadOptions, Seq
from .onnx_base import HostLogitsBackend
from .onnx_providers import available_providers, ort_version

log = logging.getLogger("edgelm.onnx")


class StaticPairBackend(HostLogitsBackend):
    ar: int  # the prefill graph's tokens per run
    shape: static_pair.PairShape
    window: static_pair.KVWindow

    def __init__(self) -> None:  # use load()
        self.sessions: dict[int, Any] = {}  # AR size -> InferenceSession
        self.bindings: dict[int, Any] = {}
        self.capabilities = Capabilities(max_sequences=1)
        self._make_sequences(1)
        self._last: np.ndarray | None = None
        self.ep: dict[str, Any] = {}

    @classmethod
    def accepts(cls, path: Path) -> bool:
        folder = onnx_folder.folder_of(Path(path))
        try:
            return onnx_folder.is_onnx_folder(folder) and \
                onnx_folder.exporter_kind(onnx_folder.read_manifest(folder)) == "static"
        except Exception:
            return False

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "StaticPairBackend":
        folder, manifest = cls.open_folder(path)
        ort = require("onnxruntime", extra="onnx", purpose="The onnxruntime backend", backend="onnxruntime")
        self = cls()
        if options.device in ("npu", "auto"):  # an NPU EP where onnxruntime has one, before the platform's others
            found = [p for p in NPU_PROVIDERS if p in available_providers()]
            if found or options.device == "npu":
                options = _with_providers(options, found or list(NPU_PROVIDERS))
        self._setup(folder, manifest, options)
        self.shape = static_pair.PairShape.of(manifest)
        graphs = manifest["graphs"]
        self.ar = int(graphs["prefill"]["ar"])
        kv_type = str(manifest["kv_cache"].get("dtype") or "float32")
        self.window = static_pair.KVWindow(self.shape, np.dtype(kv_type), (self.ar, 1))
        self.ep = runtime_options(self.provider)
        for key, ar in (("prefill", self.ar), ("decode", 1)):
            self.sessions[ar] = self._session(ort, folder / graphs[key]["file"], options)
            self.bindings[ar] = self._bind(ar)
        self._load_tokenizer()
        return self

    def _session(self, ort: Any, model_file: Path, options: LoadOptions) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(options.threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        for key, value in self.ep["session_config"].items():
            so.add_session_config_entry(key, str(value))
        providers: list[Any] = [self.provider]
        if self.provider != "CPUExecutionProvider":
            providers = [(self.provider, {k: str(v) for k, v in self.ep["provider_options"].items()}),
                         "CPUExecutionProvider"]
        try:
            return ort.InferenceSession(str(model_file), so, providers=providers)
        except Exception as exc:
            msg = str(exc)
            if "protobuf" in msg.lower() or "external data" in msg.lower():
                raise InvalidModelFileError(f"onnxruntime could not read {model_file}: {msg}",
                                            fix="The files are corrupt or incomplete: convert the model again.",
                                            path=str(model_file)) from exc
            raise UnsupportedModelError(f"onnxruntime {ort_version()} cannot run {model_file} on {self.provider}: "
                                        f"{msg.strip()[:400]}", fix="Upgrade onnxruntime, or convert again.",
                                        path=str(model_file)) from exc

    def _bind(self, ar: int) -> Any:
        """Every input and output of the AR-``ar`` session bound once to the window's buffers."""
        w = self.window
        b = self.sessions[ar].io_binding()

        def bind_in(name: str, arr: np.ndarray) -> None:
            b.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

        def bind_out(name: str, arr: np.ndarray) -> None:
            b.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

        bind_in("input_ids", w.ids[ar])
        bind_in("position_ids", w.positions[ar])
        bind_in("attention_mask", w.mask[ar])
        for i in range(self.shape.layers):
            bind_in(f"past_key.{i}", w.keys[i])
            bind_in(f"past_value.{i}", w.values[i])
            bind_out(f"present_key.{i}", w.new_keys[ar][i])
            bind_out(f"present_value.{i}", w.new_values[ar][i])
        bind_out("logits", w.logits[ar])
        return b

    # --- the sequence ---------------------------------------------------------------------------------------------

    def _run(self, seq: Seq, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate ``tokens`` (1, or up to AR) after what ``seq`` holds; their logits [len(tokens), vocab]."""
        if not self.sessions:
            raise BackendError("The onnxruntime model is closed.", fix="Load it again with edgelm.load().")
        n, s = len(seq.tokens), len(tokens)
        if n + s > self.n_ctx:
            raise BackendError(f"Cannot evaluate {s} more tokens: the sequence holds {n} of n_ctx={self.n_ctx}.",
                               fix="Use a shorter prompt or a larger n_ctx.")
        ar = 1 if s == 1 else self.ar
        w = self.window
        w.length = n
        w.prepare(list(tokens), ar)
        try:
            self.sessions[ar].run_with_iobinding(self.bindings[ar])
        except Exception as exc:
            seq.tokens.clear()
            self._last = None
            raise BackendError(f"onnxruntime failed to evaluate {s} tokens ({n} in the sequence): {exc}",
                               fix="Load the model again; if it repeats, convert it again.") from exc
        w.commit(ar, s)
        seq.tokens.extend(tokens)
        return w.logits[ar][0, :s]

    def _chunks(self, tokens: Sequence[int]) -> Iterator[tuple[int, Sequence[int]]]:
        for i in range(0, len(tokens), self.ar):
            yield i, tokens[i:i + self.ar]

    def extend(self, seq: Seq, tokens: Sequence[int]) -> None:
        for _, chunk in self._chunks(tokens):
            logits = self._run(seq, chunk)
        if len(tokens):
            self._last = logits[-1].copy()

    def rewind(self, seq: Seq, n: int) -> bool:
        del seq.tokens[n:]  # the mask hides the window's positions past n; the next run overwrites them
        self._last = None
        return True

    def logits_all(self, seq: Seq, tokens: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        for i, chunk in self._chunks(tokens):
            logits = self._run(seq, chunk)
            self._last = logits[-1].copy()
            yield i, logits

    # --- facts ------------------------------------------------------------------------------------------------------

    def runtime_facts(self) -> dict[str, Any]:
        w = self.window
        return {"exporter": self.manifest.get("exporter"), "prefill_ar": self.ar, "context": self.shape.context,
                "kv_cache_bytes": sum(a.nbytes for a in w.keys + w.values), "ep_profile": self.ep.get("profile"),
                "lint": (self.manifest.get("lint") or {}).get("graphs"),
                "runtime": "edgelm static pair (prefill + decode sessions, host KV window, I/O binding)"}

    def close(self) -> None:
        self.sessions, self.bindings = {}, {}
        self._last = None
        for seq in self.sequences:
            seq.tokens.clear()


def _with_providers(options: LoadOptions, providers: list[str]) -> LoadOptions:
    import dataclasses

    return dataclasses.replace(options, providers=providers or None)
