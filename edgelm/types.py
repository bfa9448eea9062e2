"""Records the library hands back: model facts, streamed chunks, finished completions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    path: str
    format: str  # "gguf" | "onnx"
    backend: str
    architecture: str
    quantization: str
    parameters: int
    context_length: int  # the context window this instance was loaded with (n_ctx)
    trained_context_length: int | None = None
    name: str | None = None
    size_bytes: int = 0
    device: str = "cpu"
    threads: int = 1
    capabilities: dict[str, Any] = field(default_factory=dict)  # runtimes.Capabilities: max_sequences, grammar, ...
    extra: dict[str, Any] = field(default_factory=dict)  # backend details: n_gpu_layers, provider, kv cache, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the KV cache (not evaluated again)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},  # as OpenAI reports it
        }


@dataclass(frozen=True)
class Timings:
    """Seconds, measured around the backend (prompt = until the first generated token)."""

    prompt_seconds: float
    generation_seconds: float
    total_seconds: float
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and how many of them the model kept
    accepted_tokens: int = 0

    @property
    def draft_acceptance(self) -> float | None:
        """The share of drafted tokens the model kept (None: nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    def tokens_per_second(self, completion_tokens: int) -> float:
        # the first token comes out of prompt processing; decode speed counts the ones after it
        n = completion_tokens - 1
        return n / self.generation_seconds if n > 0 and self.generation_seconds > 0 else 0.0


@dataclass(frozen=True)
class Chunk:
    """One piece of a stream.  The last chunk of every stream has ``finish_reason``, ``usage`` and ``timings``."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    usage: Usage | None = None
    timings: Timings | None = None
    tokens: tuple[int, ...] = ()  # ids generated since the previous chunk (text held back for a stop string or an
    # unfinished UTF-8 character may come in a later chunk); the end-of-generation token is not included


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings | None = None
    tokens: tuple[int, ...] = ()  # every generated token id, in order

    def __str__(self) -> str:
        return self.text
