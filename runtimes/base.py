"""The runtime protocol every backend implements.

A backend turns token ids into token ids.  It holds one or more *sequences* (a KV cache each: llama.cpp sequence
ids, an onnxruntime-genai generator), evaluates tokens into them, samples the next token, rewinds them, scores a
text's tokens (log-probs) and, where it can, embeds texts.  What it can do is declared in :class:`Capabilities`,
never probed.  Everything a user sees on top (text decoding that never splits a UTF-8 character, stop strings,
context checks, usage counts, chat templates) lives once in :mod:`edgelm.model`, so every backend behaves the same.

Shared here, once for every backend: prefix reuse (:meth:`BackendBase.prepare`), the generic generation loop, the
log-sum-exp scoring (:func:`logprobs_of`), and the context-window resolution (:func:`resolve_n_ctx`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generator, Iterator, Protocol, Sequence, runtime_checkable

from edgelm.constraints import Constraint, Guide
from edgelm.errors import BackendError, InvalidParameterError
from edgelm.params import GenerationParams
from edgelm.settings import LoadOptions  # the load settings' record, declared with them (edgelm.settings)

if TYPE_CHECKING:
    import numpy as np

DEFAULT_MAX_CTX = 4096  # default n_ctx cap: the trained context of many models costs GBs of KV cache


@dataclass(frozen=True)
class Capabilities:
    """What a loaded backend can do; :class:`edgelm.Model` and the server read this instead of probing."""

    max_sequences: int = 1  # sequences that generate at the same time, batched (1: one after another)
    grammar: bool = False  # GBNF-constrained sampling (grammar=)
    constraints: bool = False  # structured output through llguidance (constraint=: JSON schema, regex, Lark, GBNF)
    state: bool = False  # save_state / load_state of a sequence's KV cache
    embeddings: bool = False  # embed()
    speculative: bool = False  # speculative decoding (prompt-lookup, draft model)
    scoring: bool = True  # score(): log-probs of a token sequence (perplexity)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(eq=False)
class Seq:
    """One sequence of a backend: ``tokens`` is what its KV cache holds, in order."""

    id: int
    tokens: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens the last prepare() kept from the cache instead of evaluating them

    def __len__(self) -> int:
        return len(self.tokens)


@runtime_checkable
class Backend(Protocol):
    """What :class:`edgelm.Model` needs from a runtime."""

    name: ClassVar[str]
    capabilities: Capabilities
    n_ctx: int  # tokens one sequence may hold
    n_vocab: int
    bos_token: str
    eos_token: str
    chat_template: str | None
    sequences: list[Seq]  # capabilities.max_sequences of them

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """True when this backend can read the file or folder at ``path`` (used by backend="auto")."""

    @classmethod
    def inspect(cls, path: Path) -> dict[str, Any]:
        """The model's facts from its header or manifest, without loading it."""

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "Backend": ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token's text (may be part of a UTF-8 character); b"" for control tokens."""

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (eos, eot, <|im_end|>, ...)."""

    def extend(self, seq: Seq, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` after what ``seq`` holds; the logits of the last one are ready for :meth:`sample`."""

    def rewind(self, seq: Seq, n: int) -> bool:
        """Keep the first ``n`` tokens of ``seq``; False when the backend cannot (the caller starts afresh)."""

    def sampler(self, params: GenerationParams, history: Sequence[int]) -> Any:
        """A sampler for ``params`` (raises on a bad grammar before any cache is touched); it has ``close()``."""

    def sample(self, seq: Seq, sampler: Any) -> int:
        """The next token of ``seq`` from its last logits (the sampler then knows it was chosen)."""

    def prepare(self, seq: Seq, tokens: Sequence[int]) -> int:
        """Bring ``seq`` to ``tokens``, reusing their longest common prefix; return the number reused."""

    def generate(self, seq: Seq, tokens: Sequence[int], params: GenerationParams) -> Generator[int, None, None]:
        """Bring ``seq`` to ``tokens`` and yield sampled token ids until the caller stops iterating."""

    def score(self, seq: Seq, tokens: Sequence[int], *, argmax: bool = False) -> "np.ndarray":
        """Log-probability of each of tokens[1:] after the tokens before it (argmax: the most likely token after
        each of tokens[:-1] instead); ``seq`` is left empty."""

    def embed_limit(self) -> int:
        """With capabilities.embeddings: the most tokens one input to :meth:`embed` may have."""

    def embed(self, inputs: Sequence[Sequence[int]], pooling: str) -> "np.ndarray":
        """With capabilities.embeddings: one unnormalized vector per token list, the last hidden states pooled
        ("mean", "last" or "cls"); it does not touch the generating sequences."""

    def stats(self) -> dict[str, Any]:
        """Counters of the last generation (e.g. speculative decoding's drafted/accepted tokens)."""

    def health(self) -> dict[str, Any]:
        """{"status": "ok" | "degraded" | "lost" | "closed", ...} (a model on RPC workers can lose one)."""

    def describe(self) -> dict[str, Any]:
        """Facts for :class:`edgelm.ModelInfo`: architecture, quantization, parameters, context_length, ..."""

    def close(self) -> None: ...


def resolve_n_ctx(requested: int | None, trained: int | None, *, limit: int | None = None) -> int:
    """The context window to load with: ``requested``, else the model's trained length capped at DEFAULT_MAX_CTX.
    ``limit`` is a hard maximum of the format (an ONNX graph exported for a length)."""
    n_ctx = requested or min(int(trained or 2048), DEFAULT_MAX_CTX)
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 8:
        raise InvalidParameterError(f"Invalid n_ctx: {n_ctx!r}.", fix="n_ctx must be an integer >= 8.",
                                    parameter="n_ctx", value=n_ctx)
    if limit is not None and n_ctx > limit:
        raise InvalidParameterError(f"n_ctx={n_ctx} is larger than the context this model was exported for ({limit}).",
                                    fix=f"Use n_ctx <= {limit}.", parameter="n_ctx", value=n_ctx)
    return n_ctx


def context_for(text_bytes: int, max_tokens: int, *, trained: int | None = None) -> int | None:
    """The context window a one-shot generation needs (a prompt of ``text_bytes`` UTF-8 bytes, then at most
    ``max_tokens``), rounded up to a multiple of 256 (at least 256): every tokenizer edgelm loads (byte-level BPE,
    SentencePiece with byte fallback) makes at most one token per byte, plus a few special ones.  None when that is
    not below the window a load gets by default (:func:`resolve_n_ctx` for a model trained for ``trained``): load
    with the default then.  A smaller window is a smaller KV cache to allocate and clear (SmolLM2 at 4,096 tokens:
    94 MB, ~40 ms of a cold start)."""
    need = text_bytes + max_tokens + 8
    n_ctx = max(256, -(-need // 256) * 256)
    return n_ctx if n_ctx < resolve_n_ctx(None, trained) else None


def reusable_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    """How many of ``tokens`` a cache holding ``cached`` can keep: their common prefix, leaving at least the last
    prompt token to evaluate (its logits pick the first new token)."""
    n = 0
    limit = min(len(cached), len(tokens) - 1)
    while n < limit and cached[n] == tokens[n]:
        n += 1
    return n


def logprobs_of(logits: "np.ndarray", next_tokens: Sequence[int]) -> "np.ndarray":
    """log softmax(logits[k])[next_tokens[k]] for each row k < len(next_tokens), in float64."""
    import numpy as np

    nxt = np.asarray(next_tokens, dtype=np.int64)
    rows = logits[: len(nxt)]
    m = rows.max(axis=1, keepdims=True)
    lse = m[:, 0].astype(np.float64) + np.log(np.exp(rows - m).sum(axis=1, dtype=np.float64))
    return rows[np.arange(len(nxt)), nxt].astype(np.float64) - lse


class BackendBase:
    """Shared behaviour for backends; subclasses provide extend/rewind/sampler/sample/logits_all."""

    name: ClassVar[str] = "base"
    capabilities: Capabilities = Capabilities()
    n_ctx: int = 0
    n_vocab: int = 0
    bos_token: str = ""
    eos_token: str = ""
    chat_template: str | None = None

    def _make_sequences(self, n: int) -> None:
        self.sequences = [Seq(i) for i in range(n)]

    # --- tokens ---------------------------------------------------------------------------------------------

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- what each backend provides (the Backend protocol) --------------------------------------------------

    def extend(self, seq: Seq, tokens: Sequence[int]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def rewind(self, seq: Seq, n: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def sampler(self, params: GenerationParams, history: Sequence[int]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, seq: Seq, sampler: Any) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- structured output (capabilities.constraints) -----------------------------------------------------------

    def constraint_tokenizer(self) -> Any:
        """This model's vocabulary as an llguidance ``LLTokenizer`` (built once, on first use)."""
        raise BackendError(f"The {self.name} backend cannot constrain its output.",
                           fix="Use the llama.cpp or onnxruntime backend for constraint=/response_format.")

    def guide(self, constraint: Constraint | None) -> Guide | None:
        """A :class:`~edgelm.constraints.Guide` for one generation under ``constraint`` (None: no constraint)."""
        if constraint is None:
            return None
        return Guide(constraint, self.constraint_tokenizer(), self.token_bytes)

    # --- embeddings (capabilities.embeddings) ---------------------------------------------------------------

    def embed_limit(self) -> int:
        return 0

    def embed(self, inputs: Sequence[Sequence[int]], pooling: str) -> "np.ndarray":
        raise BackendError(f"The {self.name} backend cannot embed text.",
                           fix="Use a GGUF model on the llama.cpp backend for embeddings.")

    # --- sequences ------------------------------------------------------------------------------------------

    def prepare(self, seq: Seq, tokens: Sequence[int]) -> int:
        """Bring ``seq`` to ``tokens``: keep their longest common prefix (rewinding the rest, or starting afresh
        when the backend cannot rewind that far), evaluate the remainder; return the number of tokens reused."""
        n = reusable_prefix(seq.tokens, tokens)
        if n < len(seq.tokens) and not (n > 0 and self.rewind(seq, n)):
            self.rewind(seq, 0)
            n = 0
        self.extend(seq, tokens[n:])
        seq.reused = n
        return n

    def generate(self, seq: Seq, tokens: Sequence[int], params: GenerationParams) -> Generator[int, None, None]:
        """The plain loop: sample, yield, evaluate the sampled token, until the caller stops or the sequence is
        full.  The sampler is built first, so a bad grammar leaves the cache as it was."""
        sampler = self.sampler(params, tokens)
        self.prepare(seq, tokens)
        return self._loop(seq, sampler)

    def _loop(self, seq: Seq, sampler: Any) -> Generator[int, None, None]:
        n_ctx = self.n_ctx
        try:
            while True:
                token = self.sample(seq, sampler)
                yield token
                if len(seq.tokens) >= n_ctx:
                    return
                self.extend(seq, (token,))
        finally:
            sampler.close()

    def score(self, seq: Seq, tokens: Sequence[int], *, argmax: bool = False) -> "np.ndarray":
        """Log-probabilities of tokens[1:] (or, with ``argmax``, the most likely token after each of tokens[:-1]),
        evaluated from an empty ``seq`` (left empty afterwards)."""
        import numpy as np

        if len(tokens) > self.n_ctx:
            raise InvalidParameterError(f"Cannot score {len(tokens)} tokens with n_ctx={self.n_ctx}.",
                                        fix="Use shorter windows, or load the model with a larger n_ctx.",
                                        parameter="tokens", value=len(tokens))
        if len(tokens) < 2:
            return np.empty(0, dtype=np.float64)
        out = np.empty(len(tokens) - 1, dtype=np.int64 if argmax else np.float64)
        self.rewind(seq, 0)
        try:
            for start, logits in self.logits_all(seq, tokens):
                # the logits at position k predict token k+1
                nxt = tokens[start + 1 : start + 1 + len(logits)]
                out[start : start + len(nxt)] = logits[: len(nxt)].argmax(axis=1) if argmax else logprobs_of(logits, nxt)
        finally:
            self.rewind(seq, 0)
        return out

    def logits_all(self, seq: Seq, tokens: Sequence[int]) -> Iterator[tuple[int, "np.ndarray"]]:
        """Evaluate ``tokens`` into ``seq`` in chunks, yielding (start, logits of every position of the chunk)."""
        raise BackendError(f"The {self.name} backend cannot score tokens.", fix="Use the llama.cpp backend.")

    def reset_cache(self) -> None:
        """Forget every sequence's cache, so the next prompt is evaluated from scratch."""
        for seq in getattr(self, "sequences", ()):
            self.rewind(seq, 0)

    def stats(self) -> dict[str, Any]:
        return {}

    def health(self) -> dict[str, Any]:
        """{"status": "ok" | "degraded" | "lost" | "closed", ...}; a model on RPC workers can lose one
        (runtimes.isolated)."""
        return {"status": "ok"}

    def close(self) -> None:
        pass
