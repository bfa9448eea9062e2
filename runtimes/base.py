"""The runtime protocol every backend implements.

A backend turns token ids into token ids: it tokenizes, runs the model and samples.  Everything a user sees on
top of that (text decoding that never splits a UTF-8 character, stop strings, context checks, usage counts,
chat templates) lives once in :mod:`edgelm.model`, so llama.cpp and onnxruntime behave the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol, Sequence, runtime_checkable

from edgelm.params import GenerationParams

KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


@dataclass
class LoadOptions:
    """What :func:`edgelm.load` resolved before handing a model to a backend."""

    threads: int
    n_ctx: int | None = None  # None: the model's own context length, capped by the backend's default
    device: str = "cpu"  # resolved device: cpu | metal | cuda | vulkan | gpu | npu | coreml | ...
    n_gpu_layers: int = 0  # -1 = all
    use_mmap: bool = True
    flash_attn: bool | None = None  # None = backend decides
    kv_cache: str | None = None  # KV cache element type (KV_CACHE_TYPES); None = f16
    n_batch: int = 512
    providers: Sequence[str] | None = None  # onnxruntime execution providers, in order of preference
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """What :class:`edgelm.Model` needs from a runtime."""

    name: ClassVar[str]
    n_ctx: int
    bos_token: str
    eos_token: str
    chat_template: str | None

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """True when this backend can read the file or folder at ``path`` (used by backend="auto")."""

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "Backend": ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token's text (may be part of a UTF-8 character); b"" for control tokens."""

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (eos, eot, <|im_end|>, ...)."""

    def generate(self, tokens: Sequence[int], params: GenerationParams) -> Iterator[int]:
        """Evaluate ``tokens`` and yield sampled token ids until the caller stops iterating."""

    def describe(self) -> dict[str, Any]:
        """Facts for :class:`edgelm.ModelInfo`: architecture, quantization, parameters, context_length, ..."""

    def close(self) -> None: ...


class BackendBase:
    """Shared defaults for backends; subclasses override what their runtime does better."""

    name: ClassVar[str] = "base"
    n_ctx: int = 0
    bos_token: str = ""
    eos_token: str = ""
    chat_template: str | None = None

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass
