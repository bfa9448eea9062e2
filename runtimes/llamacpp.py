"""The llama.cpp backend, on llama-cpp-python's low-level bindings.

Why not ``llama_cpp.Llama``: its completion path does per-token work in Python that edgelm does once in
:mod:`edgelm.model`, and it hides the batch API that prompt reuse and speculative decoding need.  This module
drives llama.cpp directly: one context whose sequences (llama.cpp sequence ids) keep their KV cache between calls,
one batch, one sampler chain per generation.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any, ClassVar, Generator, Iterator, Sequence

from edgelm.errors import BackendError, InvalidParameterError, StateMismatchError, UnsupportedModelError
from edgelm.formats import gguf, kv_state
from edgelm.native import llamacpp as native  # before llama_cpp: it sets up OpenMP first
from edgelm.native.llamacpp import llama_cpp
from edgelm.native.team import decoding as team_decoding
from edgelm.optional import require
from edgelm.params import GenerationParams
from llama_cpp import _internals as internals

from . import speculative
from .base import BackendBase, Capabilities, Guide, LoadOptions, Seq, resolve_n_ctx


# Model.embed's pooling names -> llama.cpp pooling types
POOLING = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
           "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS}


class _Sampler:
    """A llama.cpp sampler chain (freed by close()), and the constraint's guide when there is one: it masks the
    logits in place (forbidden tokens -inf) before the chain samples from them."""

    __slots__ = ("chain", "_owner", "guide")

    def __init__(self) -> None:
        self._owner = internals.LlamaSampler()
        self.chain = self._owner.sampler
        self.guide: Guide | None = None

    def close(self) -> None:
        self._owner.close()


def _progress_callback(progress: Any) -> Any:
    """llama.cpp's load progress callback over ``progress(fraction)``, or None.  It always answers "go on": an
    exception from the caller's function is logged, never raised through C."""
    if progress is None:
        return None

    def report(fraction: float, user_data: Any) -> bool:
        try:
            if fraction < 1.0:  # edgelm.load reports 1.0 itself, once the model is ready
                progress(float(fraction))
        except Exception:  # noqa: BLE001 - never raise through C
            native.log.exception("the load progress callback raised")
        return True

    return llama_cpp.llama_progress_callback(report)


class LlamaCppBackend(BackendBase):
    name: ClassVar[str] = "llamacpp"

    def __init__(self, path: Path, header: gguf.GGUFHeader, model: Any, ctx: Any, options: LoadOptions) -> None:
        self.path = path
        self.header = header
        self._model = model
        self._ctx = ctx
        self.options = options
        self._vocab = model.vocab
        self.parallel = max(1, options.parallel)
        # one KV pool of parallel x n_ctx cells (unified): every sequence may hold a whole context
        self.n_ctx = ctx.n_ctx() // self.parallel  # llama.cpp may round n_ctx up; ask, don't assume
        self.n_batch = llama_cpp.llama_n_batch(ctx.ctx)
        self._batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self.chat_template = header.chat_template
        bos, eos = model.token_bos(), model.token_eos()
        self.bos_token = model.token_get_text(bos) if bos >= 0 else ""
        self.eos_token = model.token_get_text(eos) if eos >= 0 else ""
        self.n_vocab = model.n_vocab()
        self.draft: LlamaCppBackend | None = None
        self.rpc: dict[str, Any] | None = None  # where each part lives, when layers are on RPC workers
        self.speculation_stats: dict[str, Any] = {}
        # what drafting costs on this model and machine, by mode: learned once, used by every generation
        self._draft_costs: dict[str, speculative.Costs] = {}
        self.capabilities = Capabilities(max_sequences=self.parallel, grammar=True, constraints=True, state=True,
                                         embeddings=True, speculative=self.parallel == 1)
        self._lltokenizer: Any = None
        self._embedders: dict[str, Any] = {}  # pooling -> an embedding context over the same weights
        self._embed_lock = threading.Lock()
        self._make_sequences(self.parallel)

    # --- loading --------------------------------------------------------------------------------------------

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return path.is_file() and gguf.is_gguf(path)

    @classmethod
    def inspect(cls, path: Path) -> dict[str, Any]:
        return gguf.inspect(path)

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "LlamaCppBackend":
        header = gguf.read_header(path)  # raises typed errors before llama.cpp sees a malformed file
        native.init()
        kv = options.kv_cache
        if kv is not None and kv not in gguf.KV_TYPE_IDS:
            raise InvalidParameterError(f"Invalid kv_cache: {kv!r}.", fix=f"Use one of: {', '.join(gguf.KV_CACHE_TYPES)}.",
                                        parameter="kv_cache", value=kv)
        if kv in gguf.KV_NEEDS_FLASH_ATTN and options.flash_attn is False:
            raise InvalidParameterError(
                f"kv_cache={kv!r} needs flash attention in llama.cpp, but flash_attn=False was given.",
                fix="Drop flash_attn=False, or use kv_cache='f16'.", parameter="flash_attn", value=False,
            )
        n_ctx = resolve_n_ctx(options.n_ctx, header.context_length)
        if options.parallel > 1 and (options.speculative or options.draft_model):
            raise InvalidParameterError(
                f"Speculative decoding runs one sequence at a time, but parallel={options.parallel} was asked for.",
                fix="Use parallel=1 with speculative=/draft_model=, or drop them to batch several sequences.",
                parameter="parallel", value=options.parallel)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0x7FFFFFFF if options.n_gpu_layers < 0 else options.n_gpu_layers
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if options.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        # llama.cpp's AMX weight buffers crash the first decode (segfault, seen with llama-cpp-python 0.3.36 on
        # an AMX CPU); the other extra buffers only repack weights. Off where AMX is present, unless asked for.
        extra = options.extra_buffers
        mp.use_extra_bufts = (not native.amx_present()) if extra is None else bool(extra)
        rpc = None
        if options.workers:  # layers on llama.cpp RPC workers (edgelm.rpc); edgelm.load runs this in a child process
            from edgelm.rpc import attach  # off the cold path of a model on this machine

            rpc = attach.prepare(header, options, n_ctx)
            rpc.apply(mp)
        callback = _progress_callback(options.progress)
        if callback is not None:  # the ctypes function must live until LlamaModel returns
            mp.progress_callback = callback
        native.clear_log()
        try:
            model = internals.LlamaModel(path_model=str(path), params=mp, verbose=True)
        except ValueError as exc:
            raise UnsupportedModelError(
                f"llama.cpp could not load {path} (architecture {header.architecture!r}, "
                f"{header.quantization}): {native.recent_errors() or exc}.",
                fix="The file may need a newer llama.cpp: upgrade llama-cpp-python, or convert the model again "
                "with the llama.cpp version edgelm ships with (`edgelm convert`).",
                path=str(path),
                architecture=header.architecture,
            ) from exc
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx * options.parallel
        cp.n_batch = min(options.n_batch, n_ctx)
        cp.n_ubatch = cp.n_batch
        cp.n_seq_max = options.parallel
        cp.kv_unified = False  # one KV stream per sequence: attention reads only its own cells
        cp.n_threads = options.threads
        cp.n_threads_batch = options.threads
        cp.no_perf = True
        if options.flash_attn is None:
            cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if kv in gguf.KV_NEEDS_FLASH_ATTN
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
        else:
            cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if kv is not None:
            cp.type_k = cp.type_v = gguf.KV_TYPE_IDS[kv]
        try:
            ctx = internals.LlamaContext(model=model, params=cp, verbose=True)
        except ValueError as exc:
            model.close()
            raise BackendError(
                f"llama.cpp could not create a context for {path} (n_ctx={n_ctx}, parallel={options.parallel}, "
                f"kv_cache={kv or 'f16'}): {native.recent_errors() or exc}.",
                fix="Try a smaller n_ctx or parallel, or the default kv_cache.",
                path=str(path),
            ) from exc
        backend = cls(path, header, model, ctx, options)
        backend.rpc = rpc.finish() if rpc is not None else None
        try:
            backend._attach_draft(options)
        except BaseException:
            backend.close()
            raise
        return backend

    def _attach_draft(self, options: LoadOptions) -> None:
        if options.draft_model is None:
            return
        draft_file = Path(options.draft_model).expanduser()
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

    def _decode_failed(self, seq: Seq, rc: int, pos: int) -> BackendError:
        self.rewind(seq, 0)
        return BackendError(f"llama.cpp decode failed with code {rc} at position {pos} (n_ctx={self.n_ctx}): "
                            f"{native.recent_errors()}.",
                            fix="The context may be full; use a shorter prompt or a larger n_ctx.")

    def _fill_batch(self, seq: Seq, tokens: Sequence[int], start: int, all_logits: bool) -> Any:
        """Put ``tokens`` at positions start.. of ``seq`` into the batch; logits for the last (or all)."""
        b = self._batch.batch
        b.n_tokens = len(tokens)
        sid = seq.id
        for j, tok in enumerate(tokens):
            b.token[j] = tok
            b.pos[j] = start + j
            b.seq_id[j][0] = sid
            b.n_seq_id[j] = 1
            b.logits[j] = all_logits
        b.logits[len(tokens) - 1] = True
        return b

    def evaluate(self, seq: Seq, tokens: Sequence[int], *, all_logits: bool = False) -> None:
        """Evaluate ``tokens`` after ``seq`` in batches of n_batch; logits for the last one (or all of them, when
        they fit one batch)."""
        ctx, start = self._ctx.ctx, len(seq.tokens)
        for i in range(0, len(tokens), self.n_batch):
            part = tokens[i : i + self.n_batch]
            with team_decoding():  # a prompt often follows an idle pause: its threads start on distinct CPUs
                rc = llama_cpp.llama_decode(ctx, self._fill_batch(seq, part, start + i, all_logits))
            if rc != 0:
                raise self._decode_failed(seq, rc, start + i)
            seq.tokens.extend(part)

    def extend(self, seq: Seq, tokens: Sequence[int]) -> None:
        if len(tokens) != 1:
            self.evaluate(seq, tokens)
            return
        b = self._batch.batch  # the decode step: one token, filled without a loop
        b.n_tokens = 1
        b.token[0] = tokens[0]
        b.pos[0] = pos = len(seq.tokens)
        b.seq_id[0][0] = seq.id
        b.n_seq_id[0] = 1
        b.logits[0] = True
        with team_decoding():  # often a prompt's last token after a reused prefix, after an idle pause
            rc = llama_cpp.llama_decode(self._ctx.ctx, b)
        if rc != 0:
            raise self._decode_failed(seq, rc, pos)
        seq.tokens.append(tokens[0])

    def rewind(self, seq: Seq, n: int) -> bool:
        if n >= len(seq.tokens):
            return True
        if n == 0:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq.id, -1, -1)
            seq.tokens.clear()
            return True
        if not llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq.id, n, -1):
            return False  # e.g. a recurrent model's state cannot be cut in the middle
        del seq.tokens[n:]
        return True

    def reset_cache(self) -> None:
        self._ctx.kv_cache_clear()
        for seq in self.sequences:
            seq.tokens.clear()

    def argmax(self, row: int) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, row), shape=(self.n_vocab,))
        return int(logits.argmax())

    def logits_all(self, seq: Seq, tokens: Sequence[int]) -> Iterator[tuple[int, Any]]:
        import numpy as np

        ctx = self._ctx.ctx
        for i in range(0, len(tokens), self.n_batch):
            part = tokens[i : i + self.n_batch]
            rc = llama_cpp.llama_decode(ctx, self._fill_batch(seq, part, i, True))
            if rc != 0:
                raise self._decode_failed(seq, rc, i)
            seq.tokens.extend(part)
            yield i, np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(part), self.n_vocab))

    def decode_batch(self, parts: Sequence[tuple[Seq, Sequence[int], bool]]) -> list[int]:
        """One llama_decode over several sequences (continuous batching): each part's tokens go after what its
        sequence holds; returns each part's logits row (-1 when not wanted)."""
        b = self._batch.batch
        rows = [-1] * len(parts)
        j = 0
        # in sequence-id order: llama.cpp splits a batch over several KV streams into runs of consecutive sequence
        # ids, and every run is one more pass over the weights (4 sequences out of order cost 1.4x in order)
        for i in sorted(range(len(parts)), key=lambda i: parts[i][0].id):
            seq, tokens, want = parts[i]
            start, sid = len(seq.tokens), seq.id
            for k, tok in enumerate(tokens):
                b.token[j] = tok
                b.pos[j] = start + k
                b.seq_id[j][0] = sid
                b.n_seq_id[j] = 1
                b.logits[j] = False
                j += 1
            if want:
                b.logits[j - 1] = True
                rows[i] = j - 1
        b.n_tokens = j
        with team_decoding():  # the first step after an idle pause starts with its threads on distinct CPUs
            rc = llama_cpp.llama_decode(self._ctx.ctx, b)
        if rc != 0:
            for seq, _, _ in parts:  # nothing of a failed batch stays in the cache
                llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq.id, len(seq.tokens), -1)
            raise BackendError(f"llama.cpp decode failed with code {rc} for a batch of {j} tokens over {len(parts)} "
                               f"sequences: {native.recent_errors()}.",
                               fix="The context may be full; use shorter prompts, a larger n_ctx or a smaller "
                               "parallel.")
        for seq, tokens, _ in parts:
            seq.tokens.extend(tokens)
        return rows

    # --- sampling -------------------------------------------------------------------------------------------

    def constraint_tokenizer(self) -> Any:
        """The vocabulary for llguidance, read from llama.cpp, whose own tokenizer then does llguidance's
        tokenizing; control tokens (and user-defined ones shaped like <...>) are marked special (a 0xFF byte
        first, llguidance's convention); every end-of-generation token counts as EOS.  Built once (~0.5 s for 49k
        tokens)."""
        if self._lltokenizer is None:
            llg = require("llguidance", extra="llamacpp", purpose="Structured output (constraint=)")
            buf = ctypes.create_string_buffer(1024)
            control, user = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            pieces: list[bytes] = []
            for t in range(self.n_vocab):
                n = llama_cpp.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, True)
                piece = buf.raw[: max(n, 0)]
                attr = llama_cpp.llama_vocab_get_attr(self._vocab, t)
                if attr & control or (attr & user and piece.startswith(b"<") and piece.endswith(b">")):
                    piece = b"\xff" + piece
                pieces.append(piece)
            eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
            tokenize = ctypes.cast(llama_cpp.llama_tokenize, ctypes.c_void_p).value
            self._lltokenizer = llg.LLTokenizer.from_llamacpp(tokens=pieces, vocab_ptr=self._vocab,
                                                               tokenize_fptr=tokenize, eos_token=eog or None)
        return self._lltokenizer

    def sampler(self, params: GenerationParams, history: Sequence[int]) -> _Sampler:
        s = _Sampler()
        try:
            s.guide = self.guide(params.constraint)
            self._build_chain(s._owner, params, history)
        except BaseException:
            s.close()
            raise
        return s

    def _build_chain(self, smpl: Any, params: GenerationParams, prompt: Sequence[int]) -> None:
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

    def _add_grammar(self, smpl: Any, grammar: str) -> None:
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidParameterError(
                f"The grammar does not parse: {native.recent_errors() or 'llama.cpp rejected it'}.",
                fix="Check the GBNF syntax; the start rule must be called 'root'.", parameter="grammar",
                value=grammar[:200],
            )
        llama_cpp.llama_sampler_chain_add(smpl.sampler, sampler)

    def sample(self, seq: Seq, sampler: _Sampler) -> int:
        return self.sample_row(sampler, -1)

    def sample_row(self, sampler: _Sampler, row: int) -> int:
        """Sample from the logits at ``row`` of the last batch (one sequence of a decode_batch)."""
        guide = sampler.guide
        if guide is None:
            return llama_cpp.llama_sampler_sample(sampler.chain, self._ctx.ctx, row)
        guide.mask(self._logits(row))  # in llama.cpp's own buffer: the chain samples from the masked logits
        token = llama_cpp.llama_sampler_sample(sampler.chain, self._ctx.ctx, row)
        guide.accept(token)
        return token

    def _logits(self, row: int) -> Any:
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, row), shape=(self.n_vocab,))

    # --- generation -----------------------------------------------------------------------------------------

    def generate(self, seq: Seq, tokens: Sequence[int], params: GenerationParams) -> Generator[int, None, None]:
        mode = self._speculation_mode(params)
        self.speculation_stats = {}
        if mode is not None:
            self.prepare(seq, tokens)
            drafter = (speculative.PromptLookup(tokens) if mode == "prompt-lookup"
                       else speculative.DraftModel(self.draft, tokens))
            self.speculation_stats = {"mode": mode}
            pacer = speculative.Pacer(costs=self._draft_costs.setdefault(mode, speculative.Costs()))
            return speculative.speculative_loop(self, seq, drafter, self.options.max_draft, self.speculation_stats,
                                                pacer, limit=params.max_tokens)
        smpl = self.sampler(params, tokens)  # before touching the cache: a bad grammar leaves it intact
        try:
            self.prepare(seq, tokens)
        except BaseException:
            smpl.close()
            raise
        if smpl.guide is not None:
            return self._loop(seq, smpl)  # the shared loop, through sample(): the guide masks each step
        return self._decode_loop(seq, smpl)

    def _decode_loop(self, seq: Seq, smpl: _Sampler) -> Generator[int, None, None]:
        """The plain loop with the per-token work inlined (this is the path every streamed token takes)."""
        sample, decode = llama_cpp.llama_sampler_sample, llama_cpp.llama_decode
        chain, ctx, n_ctx = smpl.chain, self._ctx.ctx, self.n_ctx
        b = self._batch.batch
        cached = seq.tokens
        try:
            while True:
                token = sample(chain, ctx, -1)
                yield token
                pos = len(cached)
                if pos >= n_ctx:
                    return
                b.n_tokens = 1
                b.token[0] = token
                b.pos[0] = pos
                b.seq_id[0][0] = seq.id
                b.n_seq_id[0] = 1
                b.logits[0] = True
                rc = decode(ctx, b)
                if rc != 0:
                    raise self._decode_failed(seq, rc, pos)
                cached.append(token)
        finally:
            smpl.close()

    def _speculation_mode(self, params: GenerationParams) -> str | None:
        """The drafting method for this call, or None (see speculative.plain_greedy)."""
        mode = params.speculative or self.options.speculative
        if mode is None and self.draft is not None:
            mode = "draft"
        if mode == "draft" and self.draft is None:
            raise InvalidParameterError(
                "speculative='draft' needs a draft model, and none was loaded.",
                fix='Load with edgelm.load(model, draft_model="small.gguf"), or use speculative="prompt-lookup".',
                parameter="speculative", value=mode,
            )
        return mode if mode and speculative.plain_greedy(params) else None

    def stats(self) -> dict[str, Any]:
        return {"speculative": dict(self.speculation_stats)} if self.speculation_stats else {}

    # --- embeddings -----------------------------------------------------------------------------------------

    EMBED_MAX_TOKENS = 2048  # the longest input embedded (its whole sequence goes through one ubatch)
    EMBED_MAX_SEQUENCES = 64  # inputs packed into one decode

    def embed_limit(self) -> int:
        """The most tokens one input may have."""
        return min(self.n_ctx, self.EMBED_MAX_TOKENS)

    def _embedder(self, pooling: str) -> Any:
        """A second llama.cpp context over the same weights with embeddings on and ``pooling`` done in llama.cpp
        (made on first use): embedding never touches the generating sequences' caches."""
        ctx = self._embedders.get(pooling)
        if ctx is None:
            cp = llama_cpp.llama_context_default_params()
            cp.embeddings = True
            cp.pooling_type = POOLING[pooling]
            cp.n_ctx = cp.n_batch = cp.n_ubatch = self.embed_limit()
            cp.n_seq_max = self.EMBED_MAX_SEQUENCES
            cp.kv_unified = True  # the packed inputs share one pool of n_ctx cells
            # flash attention off, as in llama-cpp-python's Llama.embed: the vectors equal its (cosine > 0.9999999).
            # Packed inputs attend over one pool of cells (the others masked), which rounds differently from an
            # input alone: last-token pooling moves by up to 2e-4 in cosine, as Llama.embed's own packing does.
            cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cp.n_threads = cp.n_threads_batch = self.options.threads
            cp.no_perf = True
            try:
                ctx = internals.LlamaContext(model=self._model, params=cp, verbose=True)
            except ValueError as exc:
                raise BackendError(f"llama.cpp could not create an embedding context for {self.path}: "
                                   f"{native.recent_errors() or exc}.", fix="Load the model with a smaller n_ctx.",
                                   path=str(self.path)) from exc
            self._embedders[pooling] = ctx
        return ctx

    def embed(self, inputs: Sequence[Sequence[int]], pooling: str) -> Any:
        """One vector per token list (``pooling`` over the last hidden states: mean, last or cls), not normalized.
        Inputs are packed into as few decodes as they fit (one sequence id each)."""
        import numpy as np

        n_embd = self._model.n_embd()
        out = np.empty((len(inputs), n_embd), dtype=np.float32)
        limit = self.embed_limit()
        with self._embed_lock:
            ctx = self._embedder(pooling)
            batch = internals.LlamaBatch(n_tokens=limit, embd=0, n_seq_max=1, verbose=False)
            try:
                group: list[int] = []
                used = 0
                for i, tokens in enumerate(inputs):
                    if len(tokens) > limit:
                        raise InvalidParameterError(f"Input {i} has {len(tokens)} tokens; at most {limit} are embedded.",
                                                    fix="Shorten it, or pass truncate=True.", parameter=f"input[{i}]",
                                                    value=len(tokens))
                    if group and (used + len(tokens) > limit or len(group) >= self.EMBED_MAX_SEQUENCES):
                        self._embed_group(ctx, batch, inputs, group, out, n_embd)
                        group, used = [], 0
                    group.append(i)
                    used += len(tokens)
                if group:
                    self._embed_group(ctx, batch, inputs, group, out, n_embd)
            finally:
                batch.close()
        return out

    def _embed_group(self, ctx: Any, batch: Any, inputs: Sequence[Sequence[int]], group: list[int], out: Any,
                     n_embd: int) -> None:
        import numpy as np

        b = batch.batch
        j = 0
        for sid, i in enumerate(group):
            for pos, tok in enumerate(inputs[i]):
                b.token[j] = tok
                b.pos[j] = pos
                b.seq_id[j][0] = sid
                b.n_seq_id[j] = 1
                b.logits[j] = True  # in embedding mode every token is an output
                j += 1
        b.n_tokens = j
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
        rc = llama_cpp.llama_decode(ctx.ctx, b)
        if rc != 0:
            raise BackendError(f"llama.cpp failed to embed {len(group)} inputs (code {rc}): {native.recent_errors()}.",
                               fix="Try shorter or fewer inputs.")
        for sid, i in enumerate(group):
            ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, sid)
            if not ptr:
                raise BackendError("llama.cpp returned no embedding.", fix="Use another pooling.")
            out[i] = np.ctypeslib.as_array(ptr, shape=(n_embd,))

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
            "llama_cpp_python": native.version(),
        }

    def save_state(self, seq: Seq, path: Path) -> int:
        """Write ``seq``'s KV cache (and its tokens) to ``path``; return the token count."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, seq.id)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, size, seq.id)
        kv_state.write(path, self.state_identity(), seq.tokens, memoryview(buf)[:written])
        return len(seq.tokens)

    def load_state(self, seq: Seq, path: Path) -> int:
        """Restore into ``seq`` a KV cache written by :meth:`save_state` for this same model."""
        meta, tokens, blob = kv_state.read(path)
        kv_state.check_identity(path, meta, self.state_identity(), ("model", "kv_cache", "llama_cpp_python"))
        if len(tokens) >= self.n_ctx:
            raise StateMismatchError(f"The state in {path} holds {len(tokens)} tokens, more than n_ctx={self.n_ctx}.",
                                     fix=f"Load the model with n_ctx > {len(tokens)}.", path=str(path))
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        self.rewind(seq, 0)
        if llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, len(blob), seq.id) == 0:
            self.rewind(seq, 0)
            raise StateMismatchError(f"llama.cpp refused the state in {path}: {native.recent_errors()}.",
                                     fix="Rebuild the state with this model and settings.", path=str(path))
        seq.tokens[:] = tokens
        return len(tokens)

    # --- facts --------------------------------------------------------------------------------------------

    def kv_cache_bytes(self) -> int:
        """Bytes of K and V cache for every sequence at this n_ctx (what kv_cache= quantization saves)."""
        return self.header.attention_shape().kv_bytes(self.n_ctx * self.parallel, self.options.kv_cache or "f16")

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
                "gpu_offload_supported": native.supports_gpu_offload(),
                "flash_attn": o.flash_attn,
                "kv_cache": o.kv_cache or "f16",
                "use_mmap": o.use_mmap,
                "extra_buffers": bool(self._model.params.use_extra_bufts),
                "n_batch": self.n_batch,
                "parallel": self.parallel,
                "speculative": o.speculative or ("draft" if self.draft is not None else None),
                "draft_model": str(self.draft.path) if self.draft is not None else None,
                "bits_per_weight": round(h.bits_per_weight, 3),
                "kv_cache_bytes": self.kv_cache_bytes(),
                "llama_cpp_python": native.version(),
                **({"rpc": self.rpc} if self.rpc else {}),  # where each part lives (edgelm.rpc)
            },
        }

    def close(self) -> None:
        draft = getattr(self, "draft", None)
        if draft is not None:
            draft.close()
            self.draft = None
        for ctx in getattr(self, "_embedders", {}).values():
            ctx.close()
        self._embedders = {}
        for obj in (getattr(self, "_batch", None), getattr(self, "_ctx", None), getattr(self, "_model", None)):
            if obj is not None:
                obj.close()
        for seq in getattr(self, "sequences", ()):
            seq.tokens.clear()
