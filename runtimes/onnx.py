"""The onnxruntime backend: ONNX folders written by `edgelm convert --to onnx`, decoded by onnxruntime-genai.

Why onnxruntime-genai's Generator and not a Python loop over ``InferenceSession.run``: its C++ loop keeps the KV
cache in one preallocated buffer that the graph updates in place (GroupQueryAttention with a shared past/present
buffer), so a decode step copies nothing; a Python loop that feeds the cache back as numpy arrays decodes at
less than half that speed here (see benchmarks/bench_onnx.py).

One sequence: the generator.  It is kept between calls, so a prompt that starts with the tokens of the previous one
(a chat that grows) rewinds the cache to the shared prefix and evaluates only the rest (BackendBase.prepare).

Sampling: plain greedy decoding (temperature 0, no penalties) runs entirely inside onnxruntime-genai.  Any other
setting reads the step's logits and samples with :class:`~edgelm.runtimes.sampling.NumpySampler` (llama.cpp's
chain and meaning).  Grammars are a llama.cpp feature and are refused here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

import numpy as np

from edgelm.errors import BackendError, InvalidModelFileError, UnsupportedModelError
from edgelm.formats import onnx_folder
from edgelm.optional import require
from edgelm.params import GenerationParams

from .base import BackendBase, Capabilities, LoadOptions, Seq
from .onnx_base import OnnxFolderBackend, package_version
from .onnx_providers import PROVIDERS, ort_version
from .onnx_session import OnnxSessionBackend
from .onnx_static import StaticPairBackend
from .sampling import NumpySampler

log = logging.getLogger("edgelm.onnx")


def _genai() -> Any:
    return require("onnxruntime_genai", extra="onnx", purpose="The onnxruntime backend", backend="onnxruntime")


def _greedy_only(params: GenerationParams) -> bool:
    return params.greedy and params.repeat_penalty == 1.0 and not params.presence_penalty \
        and not params.frequency_penalty


class OnnxBackend(OnnxFolderBackend):

    def __init__(self) -> None:  # use load()
        self._gen: Any = None  # onnxruntime_genai.Generator
        self._model: Any = None  # onnxruntime_genai.Model
        self._pending = False  # the generator picked a token (native greedy) that it has not evaluated
        self.capabilities = Capabilities(max_sequences=1, grammar=True, constraints=True)
        self._make_sequences(1)

    # --- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return onnx_folder.is_onnx_folder(Path(path))

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "BackendBase":
        folder, manifest = cls.open_folder(path)
        if onnx_folder.exporter_kind(manifest) == "optimum":  # a plain decoder graph: edgelm's own session loop
            return OnnxSessionBackend.load(folder, options)
        if onnx_folder.exporter_kind(manifest) == "static":  # the NPU pair: prefill + decode graphs, host KV window
            return StaticPairBackend.load(folder, options)
        self = cls()
        self._setup(folder, manifest, options)
        self._load_model(_genai(), folder, self.provider, options)
        self._load_tokenizer()
        return self

    def _load_model(self, og: Any, folder: Path, provider: str, options: LoadOptions) -> None:
        try:
            cfg = og.Config(str(folder))
            cfg.clear_providers()
            if provider != "CPUExecutionProvider":
                cfg.append_provider(PROVIDERS[provider][0])
            session = {"intra_op_num_threads": int(options.threads), "inter_op_num_threads": 1}
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
            self._model = og.Model(cfg)
            params = og.GeneratorParams(self._model)
            self.kv_length = onnx_folder.kv_length(folder, self.n_ctx)  # >= n_ctx: a sliding window may need more
            params.set_search_options(max_length=self.kv_length, do_sample=False, batch_size=1)
            self._gen_params = params
        except Exception as exc:
            msg = str(exc)
            if any(w in msg for w in ("NOT_IMPLEMENTED", "not implemented", "opset", "Opset",
                                      "Could not find an implementation", "is not a registered function/op")):
                hint = ("load it with device='cpu', or convert it again for this provider (execution_provider=...)"
                        if provider != "CPUExecutionProvider" else
                        "upgrade onnxruntime and onnxruntime-genai (pip install -U \"edgelm[onnx]\"), or convert "
                        "the model again with this edgelm")
                raise UnsupportedModelError(
                    f"onnxruntime {ort_version()} cannot run {folder} on {provider}: {msg.strip()}",
                    fix=f"The graph uses an operator or opset this onnxruntime/provider lacks: {hint}.",
                    path=str(folder), provider=provider) from exc
            if "protobuf" in msg.lower() or "parse" in msg.lower() or "external data" in msg.lower():
                raise InvalidModelFileError(f"onnxruntime could not read {folder}: {msg}",
                                            fix="The files are corrupt or incomplete: convert the model again.",
                                            path=str(folder)) from exc
            raise BackendError(f"onnxruntime-genai could not load {folder} on {provider}: {msg}",
                               fix="Convert the model again with this edgelm version, or try device='cpu'.",
                               path=str(folder), provider=provider) from exc

    # --- the sequence ---------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._model is None:
            raise BackendError("The onnxruntime model is closed.", fix="Load it again with edgelm.load().")

    def _drop_generator(self, seq: Seq) -> None:
        self._gen = None
        self._pending = False
        seq.tokens.clear()

    def rewind(self, seq: Seq, n: int) -> bool:
        """Rewind the generator to its first ``n`` tokens.  A sliding-window layer's cache (Gemma 2/3, ...) keeps only
        the last window of positions, so going back further than that fails: False for n > 0; for n == 0 the
        generator is dropped (a new one costs ~85 ms at 4096) and made again on the next extend."""
        if self._gen is None:
            seq.tokens.clear()
            return n == 0
        if n >= len(seq.tokens) and not self._pending:
            return True
        try:
            self._gen.rewind_to(n)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError("Cannot rewind to ...: ... evicted")
            log.debug("onnxruntime-genai cannot rewind to %d (%s)", n, exc)
            if n == 0:
                self._drop_generator(seq)
                return True
            return False
        self._pending = False
        del seq.tokens[n:]
        return True

    def extend(self, seq: Seq, tokens: Sequence[int]) -> None:
        self._check_open()
        if self._pending:  # the token it picked is not in the cache: forget it before appending
            self.rewind(seq, len(seq.tokens))
        try:
            if self._gen is None:
                self._gen = _genai().Generator(self._model, self._gen_params)
                seq.tokens.clear()
            self._gen.append_tokens(list(tokens))
        except Exception as exc:
            n = len(seq.tokens) + len(tokens)
            self._drop_generator(seq)
            raise BackendError(f"onnxruntime-genai failed to evaluate {len(tokens)} tokens ({n} in the sequence, "
                               f"n_ctx={self.n_ctx}): {exc}", fix="Use a shorter prompt or a larger n_ctx.") from exc
        seq.tokens.extend(tokens)

    def sample(self, seq: Seq, sampler: NumpySampler) -> int:
        logits = self._gen.get_logits()
        token = sampler(logits.reshape(-1, logits.shape[-1])[-1])
        sampler.accept(token)
        return token

    def generate(self, seq: Seq, tokens: Sequence[int], params: GenerationParams) -> Generator[int, None, None]:
        self._check_open()
        sampler = self.sampler(params, tokens)
        self.prepare(seq, tokens)
        if _greedy_only(params) and sampler.guide is None:
            return self._generate_native(seq)
        return self._generate_sampled(seq, sampler)

    def _generate_native(self, seq: Seq) -> Generator[int, None, None]:
        """Greedy decoding inside onnxruntime-genai.  generate_next_token() evaluates the previous token (if
        any) and then picks the next one, so the last yielded token is never in the cache yet."""
        gen, cached = self._gen, seq.tokens
        pending = None
        try:
            while True:
                gen.generate_next_token()
                if pending is not None:
                    cached.append(pending)
                token = int(gen.get_next_tokens()[0])
                pending = token
                self._pending = True
                yield token
                if len(cached) + 1 >= self.n_ctx:
                    return
        except Exception as exc:
            raise self._decode_failed(seq, exc) from exc

    def _decode_failed(self, seq: Seq, exc: Exception) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        self._drop_generator(seq)
        return BackendError(f"onnxruntime-genai failed while decoding: {exc}",
                            fix="Load the model again; if it repeats, convert it again.")

    def _generate_sampled(self, seq: Seq, sampler: NumpySampler) -> Generator[int, None, None]:
        try:
            while True:
                token = self.sample(seq, sampler)
                yield token
                if len(seq.tokens) + 1 >= self.n_ctx:
                    return
                self.extend(seq, (token,))
        except Exception as exc:
            raise self._decode_failed(seq, exc) from exc

    def logits_all(self, seq: Seq, tokens: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        step = max(1, int(self.options.n_batch))
        for i in range(0, len(tokens), step):
            part = list(tokens[i : i + step])
            self.extend(seq, part)
            try:
                raw = np.asarray(self._gen.get_output("logits"), dtype=np.float32)
            except Exception as exc:
                self._drop_generator(seq)
                raise BackendError(f"onnxruntime-genai failed while scoring {len(tokens)} tokens: {exc}",
                                   fix="Use shorter windows.") from exc
            yield i, raw.reshape(-1, raw.shape[-1])[-len(part):]

    # --- facts ------------------------------------------------------------------------------------------------------

    def kv_cache_bytes(self) -> int:
        elem = "f16" if self.manifest.get("quantization") == "fp16" and self.provider != "CPUExecutionProvider" else "f32"
        return onnx_folder.attention_shape(self.manifest).kv_bytes(self.kv_length, elem)

    def runtime_facts(self) -> dict[str, Any]:
        return {"kv_cache_bytes": self.kv_cache_bytes(), "onnxruntime_genai": package_version("onnxruntime-genai")}

    def close(self) -> None:
        self._gen = None
        self._model = None
        for seq in self.sequences:
            seq.tokens.clear()
