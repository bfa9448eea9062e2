"""The onnxruntime backend: ONNX folders written by `edgelm convert --to onnx`, decoded by onnxruntime-genai.

Why onnxruntime-genai's Generator and not a Python loop over ``InferenceSession.run``: its C++ loop keeps the KV
cache in one preallocated buffer that the graph updates in place (GroupQueryAttention with a shared past/present
buffer), so a decode step copies nothing; a Python loop that feeds the cache back as numpy arrays decodes at
less than half that speed here (see benchmarks/bench_onnx.py).

Sampling: plain greedy decoding (temperature 0, no penalties) runs entirely inside onnxruntime-genai.  Any other
setting reads the step's logits and samples in numpy with llama.cpp's chain and semantics (penalties over the
last ``repeat_last_n`` tokens, top-k, top-p, min-p, temperature, seeded draw), so both backends mean the same thing
by the same parameters.  Grammars are a llama.cpp feature and are refused here.

The generator is kept between calls: a prompt that starts with the tokens of the previous one (a chat that grows)
rewinds the cache to the shared prefix and evaluates only the rest.
"""

from __future__ import annotations

import json
import logging
import platform
from collections import Counter, deque
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from edgelm.errors import (BackendError, BackendNotInstalledError, ExecutionProviderError, InvalidModelFileError,
                           InvalidParameterError, ModelNotFoundError, UnsupportedModelError)
from edgelm.params import GenerationParams

from .base import BackendBase, LoadOptions

log = logging.getLogger("edgelm.onnx")

DEFAULT_MAX_CTX = 4096
MANIFEST = "edgelm.json"

# onnxruntime provider name -> (name onnxruntime-genai's Config.append_provider takes, what installs it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "CPUExecutionProvider": ("cpu", "onnxruntime"),
    "CUDAExecutionProvider": ("cuda", "onnxruntime-gpu and onnxruntime-genai-cuda (NVIDIA GPUs, Linux/Windows)"),
    "DmlExecutionProvider": ("dml", "onnxruntime-directml and onnxruntime-genai-directml (Windows)"),
    "CoreMLExecutionProvider": ("coreml", "onnxruntime on macOS (the macOS wheels include CoreML)"),
    "QNNExecutionProvider": ("qnn", "onnxruntime-qnn (Qualcomm NPUs, Windows on Arm / Android)"),
    "NnapiExecutionProvider": ("nnapi", "an onnxruntime build with NNAPI (onnxruntime-android)"),
    "XnnpackExecutionProvider": ("xnnpack", "an onnxruntime build with XNNPACK (e.g. onnxruntime-android)"),
    "WebGpuExecutionProvider": ("webgpu", "an onnxruntime build with WebGPU"),
    "OpenVINOExecutionProvider": ("OpenVINO", "onnxruntime-openvino (Intel CPUs, GPUs and NPUs)"),
}
# edgelm device -> onnxruntime providers that serve it, best first
DEVICE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "gpu": ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider", "WebGpuExecutionProvider"),
    "metal": ("CoreMLExecutionProvider",),
    "coreml": ("CoreMLExecutionProvider",),
    "directml": ("DmlExecutionProvider",),
    "qnn": ("QNNExecutionProvider",),
    "nnapi": ("NnapiExecutionProvider",),
    "xnnpack": ("XnnpackExecutionProvider",),
    "npu": ("QNNExecutionProvider", "NnapiExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider"),
    "vulkan": ("WebGpuExecutionProvider",),
}
# provider -> edgelm device name reported in info
PROVIDER_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "directml",
                   "CoreMLExecutionProvider": "coreml", "QNNExecutionProvider": "qnn", "NnapiExecutionProvider": "nnapi",
                   "XnnpackExecutionProvider": "xnnpack", "WebGpuExecutionProvider": "gpu",
                   "OpenVINOExecutionProvider": "npu"}
# end-of-turn tokens llama.cpp also treats as end of generation
EOG_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
             "<|return|>", "</s>", "<|eom_id|>")


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"The onnxruntime backend needs the Python package 'onnxruntime_genai', which is not installed ({exc}).",
            fix='Install it with: pip install "edgelm[onnx]"', backend="onnxruntime", extra="onnx") from exc
    return og


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:  # pragma: no cover
        return "(not installed)"


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def choose_provider(device: str, preferred: Sequence[str] | None, available: Sequence[str],
                    built_for: str = "cpu", system: str | None = None) -> tuple[str, str | None]:
    """The onnxruntime provider to run on, and why it is CPU when something else was preferred (or None).

    ``device`` is the resolved edgelm device.  An explicitly requested accelerator that is not installed raises
    :class:`ExecutionProviderError` naming the package; a preference (``preferred``, from the platform defaults,
    or device="auto") that cannot be met falls back to CPU with the reason.
    """
    system = system or platform.system()
    if device in ("cpu", "auto") and not preferred:
        return "CPUExecutionProvider", None
    wanted = list(preferred or ()) or list(DEVICE_PROVIDERS.get(device, ()))
    if not wanted:
        raise ExecutionProviderError(f"No onnxruntime execution provider serves device={device!r}.",
                                     fix=f"Use one of: {', '.join(['auto', *DEVICE_PROVIDERS])}.", device=device)
    for name in wanted:
        if name in available:
            return name, None
    if device not in ("auto", "cpu") and not preferred:
        first = wanted[0]
        package = PROVIDERS.get(first, ("", f"an onnxruntime build with {first}"))[1]
        raise ExecutionProviderError(
            f"device={device!r} needs onnxruntime's {' or '.join(wanted)}, which this onnxruntime does not have "
            f"(available: {', '.join(available)}).",
            fix=f"Install {package}, or use device='cpu'.", device=device, provider=first)
    package = PROVIDERS.get(wanted[0], ("", f"an onnxruntime build with {wanted[0]}"))[1]
    reason = (f"none of the preferred execution providers ({', '.join(wanted)}) is available in this onnxruntime "
              f"(available: {', '.join(available)}) on {system}; install {package} to use it")
    return "CPUExecutionProvider", reason


# --- token text ------------------------------------------------------------------------------------------------

def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, reversed (byte-level BPE token text -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _TokenText:
    """Token id -> the raw bytes it stands for, from tokenizer.json (byte-level BPE or SentencePiece style)."""

    def __init__(self, spec: dict[str, Any], tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        model = spec.get("model") or {}
        decoder = json.dumps(spec.get("decoder") or {})
        pre = json.dumps(spec.get("pre_tokenizer") or {})
        self.byte_level = '"ByteLevel"' in decoder or '"ByteLevel"' in pre
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.metaspace = "\u2581" in decoder or '"Metaspace"' in pre or '"Metaspace"' in decoder
        self.special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
        self.added = {t["id"]: t["content"] for t in spec.get("added_tokens") or []}
        self.byte_decoder = _gpt2_byte_decoder() if self.byte_level else {}
        self.cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self.cache.get(token)
        if piece is None:
            piece = self.cache[token] = self._bytes(token)
        return piece

    def _bytes(self, token: int) -> bytes:
        if token in self.special:
            return b""
        if token in self.added:
            return self.added[token].encode("utf-8")
        text = self.tokenizer.id_to_token(token)
        if text is None:
            return b""
        if self.byte_level:
            dec = self.byte_decoder
            try:
                return bytes(dec[c] for c in text)
            except KeyError:
                return text.encode("utf-8")
        if self.byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                pass
        if self.metaspace:
            return text.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


# --- sampling ---------------------------------------------------------------------------------------------------

class _Sampler:
    """llama.cpp's sampler chain in numpy: penalties -> top-k -> top-p -> min-p -> temperature -> draw."""

    def __init__(self, params: GenerationParams, history: Sequence[int], n_ctx: int) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.penalize = params.repeat_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0
        last_n = n_ctx if params.repeat_last_n == -1 else params.repeat_last_n
        self.window: deque[int] = deque(maxlen=max(last_n, 0))
        self.counts: Counter[int] = Counter()
        if self.penalize and last_n > 0:
            for t in history[-last_n:]:
                self.accept(t)

    def accept(self, token: int) -> None:
        if not self.penalize or self.window.maxlen == 0:
            return
        w = self.window
        if len(w) == w.maxlen:
            old = w[0]
            self.counts[old] -= 1
            if self.counts[old] <= 0:
                del self.counts[old]
        w.append(token)
        self.counts[token] += 1

    def __call__(self, logits: np.ndarray) -> int:
        p = self.p
        if self.penalize and self.counts:
            logits = logits.astype(np.float32, copy=True)
            ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            cnt = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            ids_ok = ids < logits.shape[0]
            ids, cnt = ids[ids_ok], cnt[ids_ok]
            v = logits[ids]
            if p.repeat_penalty != 1.0:
                v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
            v = v - cnt * p.frequency_penalty - p.presence_penalty
            logits[ids] = v
        if p.greedy:
            return int(logits.argmax())
        cand = np.arange(logits.shape[0])
        vals = logits
        if 0 < p.top_k < vals.shape[0]:
            idx = np.argpartition(vals, -p.top_k)[-p.top_k:]
            cand, vals = cand[idx], vals[idx]
        # probabilities before temperature, as llama.cpp's top-p / min-p see them
        m = vals.max()
        prob = np.exp((vals - m).astype(np.float64))
        prob /= prob.sum()
        if p.min_p > 0.0:  # min-p keeps a prefix of the sorted order too, so it may run before top-p
            keep = prob >= p.min_p * prob.max()
            cand, vals, prob = cand[keep], vals[keep], prob[keep]
            prob = prob / prob.sum()
        if p.top_p < 1.0 and len(cand) > 1:
            order = np.argsort(-prob, kind="stable")
            cum = np.cumsum(prob[order])
            n = int(np.searchsorted(cum, p.top_p) + 1)
            order = order[: max(1, min(n, len(order)))]
            cand, vals = cand[order], vals[order]
        scaled = (vals - vals.max()).astype(np.float64) / p.temperature
        w = np.exp(scaled)
        w /= w.sum()
        return int(cand[self.rng.choice(len(cand), p=w)])


# --- the backend ------------------------------------------------------------------------------------------------

def _resolve_folder(path: Path) -> Path:
    return path.parent if path.is_file() and path.suffix == ".onnx" else path


class OnnxBackend(BackendBase):
    name: ClassVar[str] = "onnxruntime"

    def __init__(self) -> None:  # use load()
        self._gen = None
        self._model = None
        self.cached_tokens: list[int] = []

    # --- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def accepts(cls, path: Path) -> bool:
        folder = _resolve_folder(Path(path))
        return folder.is_dir() and ((folder / MANIFEST).is_file() or (folder / "genai_config.json").is_file())

    @classmethod
    def inspect(cls, path: Path) -> dict[str, Any]:
        """Facts from the manifest alone (no onnxruntime session is created)."""
        from edgelm.converters.onnx import check_output_folder

        folder = _resolve_folder(Path(path))
        m = check_output_folder(folder)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        q = m.get("quantization_options") or {}
        bits = q.get("bits") or {"fp16": 16, "fp32": 32}.get(m.get("quantization"), None)
        return {
            "path": str(folder),
            "format": "onnx",
            "name": m.get("name"),
            "architecture": m.get("model_type") or m.get("architecture"),
            "hf_architecture": m.get("architecture"),
            "quantization": m.get("quantization"),
            "quantization_options": m.get("quantization_options"),
            "parameters": m.get("parameters"),
            "context_length": m.get("context_length"),
            "size_bytes": size,
            "bits_per_weight": round(size * 8 / m["parameters"], 3) if m.get("parameters") else bits,
            "built_for": m.get("execution_provider"),
            "kv_cache": {k: v for k, v in (m.get("kv_cache") or {}).items()
                         if k in ("layers", "kv_heads", "head_size", "layout", "shared_buffer")},
            "eos_token_ids": m.get("eos_token_ids"),
            "bos_token_id": m.get("bos_token_id"),
            "chat_template": m.get("chat_template") is not None,
            "exporter": m.get("exporter"),
        }

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "OnnxBackend":
        from edgelm.converters.onnx import check_output_folder

        folder = _resolve_folder(Path(path))
        if not folder.is_dir():
            raise ModelNotFoundError(f"{path} is not an ONNX model folder.",
                                     fix="Pass the folder written by `edgelm convert SRC --to onnx -o DIR`.",
                                     path=str(path))
        manifest = check_output_folder(folder)
        og = _genai()
        self = cls()
        self.path = folder
        self.manifest = manifest
        self.options = options
        trained = int(manifest.get("context_length") or 2048)
        n_ctx = options.n_ctx or min(trained, DEFAULT_MAX_CTX)
        if not isinstance(n_ctx, int) or n_ctx < 8:
            raise InvalidParameterError(f"Invalid n_ctx: {n_ctx!r}.", fix="n_ctx must be an integer >= 8.",
                                        parameter="n_ctx", value=n_ctx)
        if n_ctx > trained:
            raise InvalidParameterError(
                f"n_ctx={n_ctx} is larger than the context this ONNX model was exported for ({trained}).",
                fix=f"Use n_ctx <= {trained}.", parameter="n_ctx", value=n_ctx)
        self.n_ctx = self.kv_length = n_ctx
        if options.kv_cache not in (None, "f32", "f16"):
            raise InvalidParameterError(
                f"kv_cache={options.kv_cache!r} is not available on the onnxruntime backend (its KV cache has the "
                "model's own element type).", fix="Drop kv_cache=..., or use a GGUF model on llama.cpp.",
                parameter="kv_cache", value=options.kv_cache)
        available = available_providers()
        provider, self.fallback_reason = choose_provider(options.device, options.providers, available,
                                                         manifest.get("execution_provider", "cpu"))
        if self.fallback_reason:
            log.warning("onnxruntime: running on CPU because %s.", self.fallback_reason)
        self.provider = provider
        self.available = available
        self._load_model(og, folder, provider, options)
        self._load_tokenizer(folder, manifest)
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
            from edgelm.converters.onnx import kv_length

            self.kv_length = kv_length(folder, self.n_ctx)  # >= n_ctx: a sliding window may need more
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
                    f"onnxruntime {_ort_version()} cannot run {folder} on {provider}: {msg.strip()}",
                    fix=f"The graph uses an operator or opset this onnxruntime/provider lacks: {hint}.",
                    path=str(folder), provider=provider) from exc
            if "protobuf" in msg.lower() or "parse" in msg.lower() or "external data" in msg.lower():
                raise InvalidModelFileError(f"onnxruntime could not read {folder}: {msg}",
                                            fix="The files are corrupt or incomplete: convert the model again.",
                                            path=str(folder)) from exc
            raise BackendError(f"onnxruntime-genai could not load {folder} on {provider}: {msg}",
                               fix="Convert the model again with this edgelm version, or try device='cpu'.",
                               path=str(folder), provider=provider) from exc

    def _load_tokenizer(self, folder: Path, manifest: dict[str, Any]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BackendNotInstalledError(f"The onnxruntime backend needs the Python package 'tokenizers' ({exc}).",
                                           fix='Install it with: pip install "edgelm[onnx]"', backend="onnxruntime",
                                           extra="onnx") from exc
        tok_file = folder / "tokenizer.json"
        try:
            spec = json.loads(tok_file.read_text(encoding="utf-8"))
            self._tok = Tokenizer.from_str(json.dumps(spec))
            self._tok_plain = Tokenizer.from_str(json.dumps(spec))
            self._tok_plain.encode_special_tokens = True  # special-token text stays text (parse_special=False)
        except Exception as exc:
            raise InvalidModelFileError(f"{tok_file} is not a valid tokenizer file ({exc}).",
                                        fix="Copy tokenizer.json from the source checkpoint, or convert again.",
                                        path=str(tok_file)) from exc
        self._text = _TokenText(spec, self._tok)
        tcfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                tcfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                tcfg = {}

        def token_text(value: Any, token_id: Any) -> str:
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
            if isinstance(token_id, int) and token_id >= 0:
                return self._tok.id_to_token(token_id) or ""
            return ""

        eos_ids = [int(i) for i in manifest.get("eos_token_ids") or []]
        self.bos_token_id = manifest.get("bos_token_id")
        self.bos_token = token_text(tcfg.get("bos_token"), self.bos_token_id)
        self.eos_token = token_text(tcfg.get("eos_token"), eos_ids[0] if eos_ids else None)
        eog = set(eos_ids)
        for text in EOG_TEXTS:
            tid = self._tok.token_to_id(text)
            if tid is not None and tid in self._text.special:
                eog.add(tid)
        self._eog = frozenset(eog)
        template = None
        name = manifest.get("chat_template")
        if name and (folder / name).is_file():
            template = (folder / name).read_text(encoding="utf-8")
        elif (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            t = tcfg.get("chat_template")
            if isinstance(t, list):  # named templates: take "default"
                t = next((x.get("template") for x in t if x.get("name") == "default"), None)
            template = t if isinstance(t, str) else None
        self.chat_template = template
        self.n_vocab = int(manifest.get("vocab_size") or self._tok.get_vocab_size(with_added_tokens=True))

    # --- tokens ---------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        tok = self._tok if parse_special else self._tok_plain
        return list(tok.encode(text, add_special_tokens=add_special).ids)

    def token_bytes(self, token: int) -> bytes:
        return self._text(token)

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    # --- evaluation -----------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._model is None:
            raise BackendError("The onnxruntime model is closed.", fix="Load it again with edgelm.load().")

    def reset_cache(self) -> None:
        """Forget the cached tokens; the generator and its KV buffer stay (a new one costs ~85 ms at 4096)."""
        self.cached_tokens = []

    def _drop_generator(self) -> None:
        self._gen = None
        self.cached_tokens = []

    def _empty_generator(self) -> Any:
        """The generator, rewound to an empty sequence (created on first use, or again when it cannot rewind)."""
        if self._gen is not None and not self._rewind(0):
            self._gen = None
        if self._gen is None:
            og = _genai()
            self._gen = og.Generator(self._model, self._gen_params)
        self.cached_tokens = []
        return self._gen

    def _rewind(self, n: int) -> bool:
        """Rewind the generator to its first ``n`` tokens.  False when it cannot: a sliding-window layer's cache
        (Gemma 2/3, ...) keeps only the last window of positions, so going back further than that means starting
        again from an empty cache."""
        try:
            self._gen.rewind_to(n)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError("Cannot rewind to ...: ... evicted")
            log.debug("onnxruntime-genai cannot rewind to %d (%s); evaluating from the start", n, exc)
            return False
        return True

    def prepare(self, tokens: Sequence[int]) -> int:
        """Bring the generator's cache to ``tokens``, reusing the longest common prefix; return the reused count."""
        self._check_open()
        cached = self.cached_tokens
        n = 0
        limit = min(len(cached), len(tokens) - 1)  # the last prompt token is always evaluated (for its logits)
        while n < limit and cached[n] == tokens[n]:
            n += 1
        try:
            if self._gen is None or n == 0 or not self._rewind(n):
                gen = self._empty_generator()
                n = 0
            else:
                gen = self._gen
                del cached[n:]
            gen.append_tokens(list(tokens[n:]))
        except Exception as exc:
            self._drop_generator()
            raise BackendError(f"onnxruntime-genai failed to evaluate the prompt ({len(tokens)} tokens, "
                               f"n_ctx={self.n_ctx}): {exc}", fix="Use a shorter prompt or a larger n_ctx.") from exc
        self.cached_tokens = list(tokens)
        return n

    def generate(self, tokens: Sequence[int], params: GenerationParams) -> Iterator[int]:
        if params.grammar:
            raise InvalidParameterError(
                "Grammars (constrained decoding) are not available on the onnxruntime backend.",
                fix="Use a GGUF model on the llama.cpp backend for grammar=..., or drop the grammar.",
                parameter="grammar", value=params.grammar[:40])
        self._check_open()
        penalize = params.repeat_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0
        sampler = None if params.greedy and not penalize else _Sampler(params, tokens, self.n_ctx)
        self.prepare(tokens)
        if sampler is None:
            return self._generate_native()
        return self._generate_sampled(sampler)

    def _generate_native(self) -> Iterator[int]:
        """Greedy decoding inside onnxruntime-genai.  generate_next_token() evaluates the previous token (if
        any) and then picks the next one, so the last yielded token is never in the cache yet."""
        gen, cached = self._gen, self.cached_tokens
        pending = None
        try:
            while True:
                gen.generate_next_token()
                if pending is not None:
                    cached.append(pending)
                token = int(gen.get_next_tokens()[0])
                pending = token
                yield token
                if len(cached) + 1 >= self.n_ctx:
                    return
        except GeneratorExit:
            raise
        except Exception as exc:
            self._drop_generator()
            raise BackendError(f"onnxruntime-genai failed while decoding: {exc}",
                               fix="Load the model again; if it repeats, convert it again.") from exc

    def _generate_sampled(self, sampler: _Sampler) -> Iterator[int]:
        gen, cached = self._gen, self.cached_tokens
        try:
            while True:
                logits = gen.get_logits()
                token = sampler(logits.reshape(-1, logits.shape[-1])[-1])
                yield token
                if len(cached) + 1 >= self.n_ctx:
                    return
                sampler.accept(token)
                gen.append_tokens([token])
                cached.append(token)
        except GeneratorExit:
            raise
        except Exception as exc:
            self._drop_generator()
            raise BackendError(f"onnxruntime-genai failed while decoding: {exc}",
                               fix="Load the model again; if it repeats, convert it again.") from exc

    def token_logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """Log-probability the model gives each of tokens[1:] after the tokens before it (for perplexity).

        Evaluates from an empty cache in chunks of n_batch tokens, reading every position's logits; the cache is
        left empty afterwards.
        """
        self._check_open()
        if len(tokens) > self.n_ctx:
            raise InvalidParameterError(f"Cannot score {len(tokens)} tokens with n_ctx={self.n_ctx}.",
                                        fix="Use shorter windows.", parameter="tokens", value=len(tokens))
        out = np.empty(len(tokens) - 1, dtype=np.float64)
        step = max(1, int(self.options.n_batch))
        try:
            gen = self._empty_generator()
            for i in range(0, len(tokens), step):
                part = list(tokens[i : i + step])
                gen.append_tokens(part)
                raw = np.asarray(gen.get_output("logits"), dtype=np.float32)
                logits = raw.reshape(-1, raw.shape[-1])[-len(part):]
                m = logits.max(axis=1, keepdims=True)
                lse = m[:, 0].astype(np.float64) + np.log(np.exp(logits - m).sum(axis=1, dtype=np.float64))
                nxt = np.asarray(tokens[i + 1 : i + 1 + len(part)], dtype=np.int64)
                rows = np.arange(len(nxt))
                out[i : i + len(nxt)] = logits[rows, nxt].astype(np.float64) - lse[: len(nxt)]
        except InvalidParameterError:
            raise
        except Exception as exc:
            self._drop_generator()
            raise BackendError(f"onnxruntime-genai failed while scoring {len(tokens)} tokens: {exc}",
                               fix="Use shorter windows.") from exc
        finally:
            self.reset_cache()
        return out

    # --- facts ------------------------------------------------------------------------------------------------------

    def kv_cache_bytes(self) -> int:
        kv = self.manifest.get("kv_cache") or {}
        elem = 2 if self.manifest.get("quantization") == "fp16" and self.provider != "CPUExecutionProvider" else 4
        per_token = int(kv.get("layers", 0)) * 2 * int(kv.get("kv_heads", 0)) * int(kv.get("head_size", 0)) * elem
        return per_token * self.kv_length

    def describe(self) -> dict[str, Any]:
        from importlib import metadata

        m = self.manifest

        def version(dist: str) -> str | None:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return None

        return {
            "format": "onnx",
            "architecture": m.get("model_type") or m.get("architecture"),
            "quantization": m.get("quantization"),
            "parameters": int(m.get("parameters") or 0),
            "trained_context_length": m.get("context_length"),
            "name": m.get("name"),
            "device": PROVIDER_DEVICE.get(self.provider, self.options.device),
            "extra": {
                "execution_provider": self.provider,
                "available_providers": self.available,
                "provider_fallback": self.fallback_reason,
                "built_for": m.get("execution_provider"),
                "quantization_options": m.get("quantization_options"),
                "kv_cache_bytes": self.kv_cache_bytes(),
                "hf_architecture": m.get("architecture"),
                "onnxruntime": version("onnxruntime"),
                "onnxruntime_genai": version("onnxruntime-genai"),
            },
        }

    def close(self) -> None:
        self._gen = None
        self._model = None
        self.cached_tokens = []
