"""The llama.cpp backend, on llama-cpp-python's low-level bindings.

Why not ``llama_cpp.Llama``: its completion path does per-token work in Python that edgelm does once in
:mod:`edgelm.model`, and it hides the batch API that prompt reuse and speculative decoding need.  This module
drives llama.cpp directly: one context, one batch, one sampler chain per generation, and the KV cache of the
last sequence kept so a prompt that shares a prefix with the previous one only evaluates the new part.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import llama_cpp
from llama_cpp import _internals as internals

from edgelm.errors import BackendError, InvalidParameterError, StateMismatchError, UnsupportedModelError
from edgelm.params import GenerationParams

from .base import KV_CACHE_TYPES, BackendBase, LoadOptions
from .gguf import GGUFHeader, is_gguf, read_header

log = logging.getLogger("edgelm.llamacpp")

# KV cache element type name -> ggml type id
KV_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
assert set(KV_TYPE_IDS) == set(KV_CACHE_TYPES)
STATE_MAGIC = b"EDGELMKV"
STATE_VERSION = 1
DEFAULT_MAX_CTX = 4096  # default n_ctx cap: the trained context of many models costs GBs of KV cache

# --- llama.cpp's log: kept in a ring buffer (to explain load failures) and forwarded to `logging` ----------

_recent_log: collections.deque[str] = collections.deque(maxlen=40)
# ggml_log_level: NONE=0 DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5 (continues the previous line)
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = logging.DEBUG


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    try:
        msg = text.decode("utf-8", errors="replace")
        py_level = _LEVELS.get(level, _last_level)
        _last_level = py_level
        _recent_log.append(msg)
        if log.isEnabledFor(py_level) and msg.strip():
            log.log(py_level, msg.rstrip())
    except Exception:  # never raise through C
        pass


_init_lock = threading.Lock()
_initialized = False


def _init_backend() -> None:
    global _initialized
    with _init_lock:
        if not _initialized:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _initialized = True


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


def amx_present() -> bool:
    """True when this build runs llama.cpp's AMX kernels (Intel Sapphire Rapids and newer)."""
    return "AMX_INT8 = 1" in system_info()


def _recent_errors() -> str:
    lines = [line.strip() for line in _recent_log if line.strip()]
    interesting = [line for line in lines if any(w in line.lower() for w in ("error", "unknown", "fail", "invalid"))]
    return " | ".join((interesting or lines)[-4:])


class LlamaCppBackend(BackendBase):
    name: ClassVar[str] = "llamacpp"

    def __init__(self, path: Path, header: GGUFHeader, model: Any, ctx: Any, options: LoadOptions) -> None:
        self.path = path
        self.header = header
        self._model = model
        self._ctx = ctx
        self.options = options
        self._vocab = model.vocab
        self.n_ctx = ctx.n_ctx()
        self.n_batch = llama_cpp.llama_n_batch(ctx.ctx)  # llama.cpp may round n_ctx up; ask, don't assume
        self._batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self.cached_tokens: list[int] = []  # what the KV cache of sequence 0 holds, in order
        self.chat_template = header.chat_template
        bos, eos = model.token_bos(), model.token_eos()
        self.bos_token = model.token_get_text(bos) if bos >= 0 else ""
        self.eos_token = model.token_get_text(eos) if eos >= 0 else ""
        self.n_vocab = model.n_vocab()
        self.draft: LlamaCppBackend | None = None
        self.max_draft = int(options.extra.get("max_draft", 8))
        self.speculation_stats: dict[str, Any] = {}

    # --- loading --------------------------------------------------------------------------------------------

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return path.is_file() and is_gguf(path)

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "LlamaCppBackend":
        header = read_header(path)  # raises typed errors before llama.cpp sees a malformed file
        _init_backend()
        kv = options.kv_cache
        if kv is not None and kv not in KV_TYPE_IDS:
            raise InvalidParameterError(
                f"Invalid kv_cache: {kv!r}.", fix=f"Use one of: {', '.join(KV_CACHE_TYPES)}.", parameter="kv_cache",
                value=kv,
            )
        if kv not in (None, "f16", "f32", "bf16") and options.flash_attn is False:
            raise InvalidParameterError(
                f"kv_cache={kv!r} needs flash attention in llama.cpp, but flash_attn=False was given.",
                fix="Drop flash_attn=False, or use kv_cache='f16'.", parameter="flash_attn", value=False,
            )
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0x7FFFFFFF if options.n_gpu_layers < 0 else options.n_gpu_layers
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if options.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        # llama.cpp's AMX weight buffers crash the first decode (segfault, seen with llama-cpp-python 0.3.36 on
        # an AMX CPU); the other extra buffers only repack weights. Off where AMX is present, unless asked for.
        extra_buffers = options.extra.get("extra_buffers")
        mp.use_extra_bufts = (not amx_present()) if extra_buffers is None else bool(extra_buffers)
        _recent_log.clear()
        try:
            model = internals.LlamaModel(path_model=str(path), params=mp, verbose=True)
        except ValueError as exc:
            raise UnsupportedModelError(
                f"llama.cpp could not load {path} (architecture {header.architecture!r}, "
                f"{header.quantization}): {_recent_errors() or exc}.",
                fix="The file may need a newer llama.cpp: upgrade llama-cpp-python, or convert the model again "
                "with the llama.cpp version edgelm ships with (`edgelm convert`).",
                path=str(path),
                architecture=header.architecture,
            ) from exc
        trained = model.n_ctx_train()
        n_ctx = options.n_ctx or min(trained, DEFAULT_MAX_CTX)
        if not isinstance(n_ctx, int) or n_ctx < 8:
            model.close()
            raise InvalidParameterError(f"Invalid n_ctx: {n_ctx!r}.", fix="n_ctx must be an integer >= 8.",
                                        parameter="n_ctx", value=n_ctx)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = min(options.n_batch, n_ctx)
        cp.n_ubatch = cp.n_batch
        cp.n_seq_max = 1
        cp.n_threads = options.threads
        cp.n_threads_batch = options.threads
        cp.no_perf = True
        if options.flash_attn is None:
            quantized_v = kv not in (None, "f16", "f32", "bf16")
            cp.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if quantized_v else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
            )
        else:
            cp.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        if kv is not None:
            cp.type_k = cp.type_v = KV_TYPE_IDS[kv]
        try:
            ctx = internals.LlamaContext(model=model, params=cp, verbose=True)
        except ValueError as exc:
            model.close()
            raise BackendError(
                f"llama.cpp could not create a context for {path} (n_ctx={n_ctx}, kv_cache={kv or 'f16'}): "
                f"{_recent_errors() or exc}.",
                fix="Try a smaller n_ctx, or the default kv_cache.",
                path=str(path),
            ) from exc
        backend = cls(path, header, model, ctx, options)
        try:
            backend._attach_draft(options)
        except BaseException:
            backend.close()
            raise
        return backend

    def _attach_draft(self, options: LoadOptions) -> None:
        spec = options.extra.get("speculative")
        if spec not in (None, "prompt-lookup", "draft"):
            raise InvalidParameterError(f"Invalid speculative: {spec!r}.",
                                        fix='Use None, "prompt-lookup" or "draft" (with draft_model=...).',
                                        parameter="speculative", value=spec)
        draft_path = options.extra.get("draft_model")
        if draft_path is None:
            return
        draft_file = Path(draft_path).expanduser()
        sub = LoadOptions(threads=options.threads, n_ctx=self.n_ctx, device=options.device,
                          n_gpu_layers=options.n_gpu_layers, use_mmap=options.use_mmap, n_batch=options.n_batch)
        self.draft = LlamaCppBackend.load(draft_file, sub)
        if self.draft.n_vocab != self.n_vocab or any(
            self.draft.token_bytes(t) != self.token_bytes(t) for t in range(0, self.n_vocab, max(1, self.n_vocab // 512))
        ):
            self.draft.close()
            self.draft = None
            raise InvalidParameterError(
                f"The draft model {draft_file} has another vocabulary than {self.path}.",
                fix="Use a smaller model of the same family (same tokenizer) as draft_model.",
                parameter="draft_model", value=str(draft_file),
            )

    # --- tokens ---------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_special, parse_special)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = self._piece_buf
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:  # longer than the buffer
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        value = self._eog.get(token)
        if value is None:
            value = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return value

    # --- evaluation -----------------------------------------------------------------------------------------

    def _decode(self, tokens: Sequence[int], start: int, logits_all: bool = False) -> None:
        """Evaluate ``tokens`` at positions start.. in batches; logits for the last one (or all of them)."""
        step = self.n_batch
        for i in range(0, len(tokens), step):
            part = tokens[i : i + step]
            b = self._fill_batch(part, start + i, logits_all)
            rc = llama_cpp.llama_decode(self._ctx.ctx, b)
            if rc != 0:
                self.reset_cache()
                raise BackendError(
                    f"llama.cpp decode failed with code {rc} at position {start + i} "
                    f"(n_ctx={self.n_ctx}): {_recent_errors()}.",
                    fix="The context may be full; use a shorter prompt or a larger n_ctx.",
                )
            self.cached_tokens.extend(part)

    def _fill_batch(self, tokens: Sequence[int], start: int, logits_all: bool) -> Any:
        """Put ``tokens`` at positions start.. of sequence 0 into the batch; logits for the last (or all)."""
        b = self._batch.batch
        b.n_tokens = len(tokens)
        for j, tok in enumerate(tokens):
            b.token[j] = tok
            b.pos[j] = start + j
            b.seq_id[j][0] = 0
            b.n_seq_id[j] = 1
            b.logits[j] = logits_all
        b.logits[len(tokens) - 1] = True
        return b

    def _decode_one(self, token: int, pos: int) -> None:
        b = self._batch.batch
        b.n_tokens = 1
        b.token[0] = token
        b.pos[0] = pos
        b.seq_id[0][0] = 0
        b.n_seq_id[0] = 1
        b.logits[0] = True
        rc = llama_cpp.llama_decode(self._ctx.ctx, b)
        if rc != 0:
            self.reset_cache()
            raise BackendError(f"llama.cpp decode failed with code {rc} at position {pos}: {_recent_errors()}.",
                               fix="The context may be full; use a shorter prompt or a larger n_ctx.")
        self.cached_tokens.append(token)

    def reset_cache(self) -> None:
        self._ctx.kv_cache_clear()
        self.cached_tokens = []

    def prepare(self, tokens: Sequence[int]) -> int:
        """Bring the KV cache to ``tokens`` (reusing the longest common prefix); return the reused count."""
        cached = self.cached_tokens
        n = 0
        limit = min(len(cached), len(tokens) - 1)  # the last prompt token is always evaluated (for its logits)
        while n < limit and cached[n] == tokens[n]:
            n += 1
        if n < len(cached):
            if n == 0 or not llama_cpp.llama_memory_seq_rm(self._ctx.memory, 0, n, -1):
                self.reset_cache()
                n = 0
            else:
                del cached[n:]
        self._decode(tokens[n:], n)
        return n

    def _sampler(self, params: GenerationParams, prompt: Sequence[int]) -> Any:
        smpl = internals.LlamaSampler()
        penalize = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        if penalize:
            last_n = self.n_ctx if params.repeat_last_n == -1 else params.repeat_last_n
            smpl.add_penalties(self.n_vocab, last_n, params.repeat_penalty, params.frequency_penalty,
                               params.presence_penalty)
        if params.grammar:
            self._add_grammar(smpl, params.grammar)
        if params.greedy:
            smpl.add_greedy()
        else:
            if params.top_k > 0:
                smpl.add_top_k(params.top_k)
            if params.top_p < 1.0:
                smpl.add_top_p(params.top_p, 1)
            if params.min_p > 0.0:
                smpl.add_min_p(params.min_p, 1)
            smpl.add_temp(params.temperature)
            smpl.add_dist(llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed)
        if penalize and not params.grammar:
            last_n = len(prompt) if params.repeat_last_n == -1 else params.repeat_last_n
            for tok in prompt[-last_n:] if last_n > 0 else []:
                smpl.accept(tok)
        return smpl

    def _add_grammar(self, smpl: Any, grammar: str) -> None:
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidParameterError(
                f"The grammar does not parse: {_recent_errors() or 'llama.cpp rejected it'}.",
                fix="Check the GBNF syntax; the start rule must be called 'root'.", parameter="grammar",
                value=grammar[:200],
            )
        llama_cpp.llama_sampler_chain_add(smpl.sampler, sampler)

    def generate(self, tokens: Sequence[int], params: GenerationParams) -> Iterator[int]:
        mode = self._speculation_mode(params)
        smpl = self._sampler(params, tokens)  # before touching the cache: a bad grammar leaves it intact
        self.prepare(tokens)
        if mode is not None:
            smpl.close()
            yield from self._generate_speculative(tokens, mode)
            return
        sample = llama_cpp.llama_sampler_sample
        chain, ctx = smpl.sampler, self._ctx.ctx
        pos = len(tokens)
        try:
            while True:
                token = sample(chain, ctx, -1)
                yield token
                if pos >= self.n_ctx:
                    return
                self._decode_one(token, pos)
                pos += 1
        finally:
            smpl.close()

    # --- speculative decoding -------------------------------------------------------------------------------

    def _speculation_mode(self, params: GenerationParams) -> str | None:
        """The drafting method for this call, or None.  Drafts are verified greedily, so speculation applies to
        plain greedy decoding (temperature 0, no grammar, no penalties), where its output is identical."""
        mode = params.speculative or self.options.extra.get("speculative")
        if mode is None and self.draft is not None:
            mode = "draft"
        if mode == "draft" and self.draft is None:
            raise InvalidParameterError(
                "speculative='draft' needs a draft model, and none was loaded.",
                fix='Load with edgelm.load(model, draft_model="small.gguf"), or use speculative="prompt-lookup".',
                parameter="speculative", value=mode,
            )
        plain_greedy = params.greedy and not params.grammar and params.repeat_penalty == 1.0 \
            and not params.presence_penalty and not params.frequency_penalty
        return mode if mode and plain_greedy else None

    def _argmax(self, i: int) -> int:
        import numpy as np

        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, i), shape=(self.n_vocab,))
        return int(row.argmax())

    def _generate_speculative(self, tokens: Sequence[int], mode: str) -> Iterator[int]:
        """Greedy decoding that evaluates [token, *draft] in one batch and keeps the drafts llama.cpp agrees with.

        Every yielded token is the argmax after the tokens before it, exactly as in plain greedy decoding; drafts
        only decide how many positions one llama_decode call checks.
        """
        drafter = _PromptLookup(tokens) if mode == "prompt-lookup" else _DraftModel(self.draft, tokens)
        k = self.max_draft
        stats = self.speculation_stats = {"mode": mode, "rounds": 0, "drafted": 0, "accepted": 0}
        token = self._argmax(-1)
        pos = len(tokens)
        while True:
            yield token
            drafter.append(token)
            if pos >= self.n_ctx:
                return
            room = self.n_ctx - pos - 1
            draft = drafter.propose(min(k, room)) if room > 0 else []
            self._decode([token, *draft], pos, logits_all=bool(draft))
            if not draft:
                pos += 1
                token = self._argmax(-1)
                continue
            accepted = []
            nxt = self._argmax(0)
            for i, d in enumerate(draft):
                if nxt != d:
                    break
                accepted.append(d)
                nxt = self._argmax(i + 1)
            keep = pos + 1 + len(accepted)
            if len(accepted) < len(draft):  # forget the rejected drafts
                llama_cpp.llama_memory_seq_rm(self._ctx.memory, 0, keep, -1)
                del self.cached_tokens[keep:]
            stats["rounds"] += 1
            stats["drafted"] += len(draft)
            stats["accepted"] += len(accepted)
            # grow the draft while drafts are right, shrink it to what was right when they are not
            k = min(self.max_draft, k * 2) if len(accepted) == len(draft) else max(2, len(accepted) + 1)
            pos = keep
            for d in accepted:
                yield d
                drafter.append(d)
            token = nxt

    def token_logprobs(self, tokens: Sequence[int]) -> "np.ndarray":
        """Log-probability the model gives each of tokens[1:] after the tokens before it (for perplexity).

        Evaluates from an empty cache with logits for every position; the cache is left empty afterwards.
        """
        import numpy as np

        if len(tokens) > self.n_ctx:
            raise InvalidParameterError(
                f"Cannot score {len(tokens)} tokens with n_ctx={self.n_ctx}.", fix="Use shorter windows.",
                parameter="tokens", value=len(tokens),
            )
        self.reset_cache()
        out = np.empty(len(tokens) - 1, dtype=np.float64)
        try:
            for i in range(0, len(tokens), self.n_batch):
                part = tokens[i : i + self.n_batch]
                rc = llama_cpp.llama_decode(self._ctx.ctx, self._fill_batch(part, i, True))
                if rc != 0:
                    raise BackendError(f"llama.cpp decode failed with code {rc} while scoring.",
                                       fix="Use shorter windows or a larger n_ctx.")
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx.ctx),
                                               shape=(len(part), self.n_vocab))
                m = logits.max(axis=1, keepdims=True)
                lse = m[:, 0].astype(np.float64) + np.log(np.exp(logits - m).sum(axis=1, dtype=np.float64))
                # logits at position k predict token k+1
                nxt = np.asarray(tokens[i + 1 : i + 1 + len(part)], dtype=np.int64)
                rows = np.arange(len(nxt))
                out[i : i + len(nxt)] = logits[rows, nxt].astype(np.float64) - lse[: len(nxt)]
        finally:
            self.reset_cache()
        return out

    # --- persistent KV state ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Identifies the model file's contents cheaply: a hash of its GGUF header (metadata + tensor table)."""
        if getattr(self, "_fingerprint", None) is None:
            import hashlib

            with open(self.path, "rb") as fh:
                digest = hashlib.sha256(fh.read(self.header.data_offset))
            digest.update(str(self.header.file_size).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def state_identity(self) -> dict[str, Any]:
        return {
            "model": self.fingerprint(),
            "model_name": self.header.name or self.path.name,
            "kv_cache": self.options.kv_cache or "f16",
            "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        }

    def save_state(self, path: Path) -> int:
        """Write the KV cache of the current sequence (and its tokens) to ``path``; return the token count."""
        import json
        import os
        import tempfile

        import numpy as np

        tokens = np.asarray(self.cached_tokens, dtype=np.int32)
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, size, 0)
        header = json.dumps({"version": STATE_VERSION, **self.state_identity(), "n_tokens": len(tokens),
                             "n_bytes": written}).encode()
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(STATE_MAGIC + len(header).to_bytes(4, "little") + header)
                fh.write(tokens.tobytes())
                fh.write(memoryview(buf)[:written])
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(tokens)

    def load_state(self, path: Path) -> int:
        """Restore a KV cache written by :meth:`save_state` for this same model; return the token count."""
        import json

        import numpy as np

        path = Path(path)
        data = path.read_bytes()
        if not data.startswith(STATE_MAGIC):
            raise StateMismatchError(f"{path} is not an edgelm state file.", fix="Pass a file written by save_state().",
                                     path=str(path))
        n = int.from_bytes(data[8:12], "little")
        meta = json.loads(data[12 : 12 + n])
        mine = self.state_identity()
        for key in ("model", "kv_cache", "llama_cpp_python"):
            if meta.get(key) != mine[key]:
                what = {"model": f"model {meta.get('model_name')!r}, not {mine['model_name']!r} ({self.path})",
                        "kv_cache": f"kv_cache={meta.get('kv_cache')!r}, not {mine['kv_cache']!r}",
                        "llama_cpp_python": f"llama-cpp-python {meta.get('llama_cpp_python')}, "
                        f"not {mine['llama_cpp_python']}"}[key]
                raise StateMismatchError(f"The state in {path} was saved for {what}.",
                                         fix="Rebuild the state with this model (run the prompt and save_state again).",
                                         path=str(path), mismatch=key)
        n_tokens = int(meta["n_tokens"])
        if n_tokens >= self.n_ctx:
            raise StateMismatchError(f"The state in {path} holds {n_tokens} tokens, more than n_ctx={self.n_ctx}.",
                                     fix=f"Load the model with n_ctx > {n_tokens}.", path=str(path))
        start = 12 + n
        tokens = np.frombuffer(data, dtype=np.int32, count=n_tokens, offset=start).tolist()
        blob = data[start + 4 * n_tokens :]
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        self.reset_cache()
        if llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, len(blob), 0) == 0:
            self.reset_cache()
            raise StateMismatchError(f"llama.cpp refused the state in {path}: {_recent_errors()}.",
                                     fix="Rebuild the state with this model and settings.", path=str(path))
        self.cached_tokens = tokens
        return n_tokens

    # --- facts --------------------------------------------------------------------------------------------

    def kv_cache_bytes(self) -> int:
        """Bytes of K and V cache at this n_ctx (what kv_cache= quantization saves)."""
        from .gguf import GGML_TYPES

        h = self.header
        n_layer = int(h.arch_value("block_count", 0))
        n_embd = int(h.arch_value("embedding_length", 0))
        n_head = int(h.arch_value("attention.head_count", 1) or 1)
        n_head_kv = h.arch_value("attention.head_count_kv", n_head)
        n_head_kv = int(n_head_kv if not hasattr(n_head_kv, "__len__") else max(n_head_kv))
        head_k = int(h.arch_value("attention.key_length", n_embd // n_head))
        head_v = int(h.arch_value("attention.value_length", n_embd // n_head))
        _, block, size = GGML_TYPES[KV_TYPE_IDS[self.options.kv_cache or "f16"]]
        elements = n_layer * self.n_ctx * n_head_kv * (head_k + head_v)
        return elements * size // block

    def describe(self) -> dict[str, Any]:
        h = self.header
        o = self.options
        return {
            "format": "gguf",
            "architecture": h.architecture,
            "quantization": h.quantization,
            "parameters": h.parameters,
            "trained_context_length": h.context_length or self._model.n_ctx_train(),
            "name": h.name,
            "extra": {
                "n_gpu_layers": o.n_gpu_layers,
                "gpu_offload_supported": supports_gpu_offload(),
                "flash_attn": o.flash_attn,
                "kv_cache": o.kv_cache or "f16",
                "use_mmap": o.use_mmap,
                "extra_buffers": bool(self._model.params.use_extra_bufts),
                "n_batch": self.n_batch,
                "speculative": o.extra.get("speculative") or ("draft" if self.draft is not None else None),
                "draft_model": str(self.draft.path) if self.draft is not None else None,
                "bits_per_weight": round(h.bits_per_weight, 3),
                "kv_cache_bytes": self.kv_cache_bytes(),
                "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
            },
        }

    def close(self) -> None:
        draft = getattr(self, "draft", None)
        if draft is not None:
            draft.close()
            self.draft = None
        for obj in (getattr(self, "_batch", None), getattr(self, "_ctx", None), getattr(self, "_model", None)):
            if obj is not None:
                obj.close()
        self.cached_tokens = []


class _PromptLookup:
    """Drafts by n-gram lookup: the tokens that followed the latest earlier occurrence of the current suffix."""

    SIZES = (4, 3, 2)

    def __init__(self, tokens: Sequence[int]) -> None:
        self.history: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        h = self.history
        h.append(token)
        end = len(h) - 1  # the n-gram ending just before `token` is now followed by something
        for n in self.SIZES:
            if end >= n:
                self.index[tuple(h[end - n : end])] = end - n

    def propose(self, k: int) -> list[int]:
        h = self.history
        for n in self.SIZES:
            if len(h) >= n:
                start = self.index.get(tuple(h[-n:]))
                if start is not None:
                    return h[start + n : start + n + k]
        return []


class _DraftModel:
    """Drafts with a smaller model of the same tokenizer, greedily (its KV cache follows the history)."""

    def __init__(self, draft: "LlamaCppBackend", tokens: Sequence[int]) -> None:
        self.draft = draft
        self.history = list(tokens)

    def append(self, token: int) -> None:
        self.history.append(token)

    def propose(self, k: int) -> list[int]:
        d = self.draft
        h = self.history
        if len(h) + k >= d.n_ctx:
            k = d.n_ctx - len(h) - 1
        if k <= 0:
            return []
        d.prepare(h)
        out = []
        pos = len(h)
        for _ in range(k):
            t = d._argmax(-1)
            if d.is_eog(t):
                break
            out.append(t)
            if len(out) < k:
                d._decode_one(t, pos)
                pos += 1
        return out
