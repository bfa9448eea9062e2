"""A scripted backend for fast unit tests of everything above the runtime (edgelm.model, CLI plumbing).

Its vocabulary is a list of byte strings, so tests can split multi-byte UTF-8 characters across tokens
exactly where they want.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

from edgelm.chat_templates import TEMPLATES
from edgelm.runtimes.base import BackendBase, Capabilities, LoadOptions, Seq

EOS = 0
# control tokens of the fake vocabulary: one token each when tokenized with parse_special (as in a real model),
# ids 500, 501, ...; text is one token per character, ids 1000 + code point
SPECIALS = ("<|im_start|>", "<|im_end|>")


class FakeBackend(BackendBase):
    name: ClassVar[str] = "fake"
    script: ClassVar[list[int]] = []  # token ids generate() yields, in order
    loaded: ClassVar[list["FakeBackend"]] = []  # every instance load() made, latest last
    template: ClassVar[str | None] = TEMPLATES["chatml"]  # the chat template the fake model "ships" (None: none)

    def __init__(self, vocab: list[bytes], n_ctx: int = 64) -> None:
        self.vocab = vocab
        self.n_ctx = n_ctx
        self.bos_token = "<s>"
        self.eos_token = "</s>"
        self.chat_template = self.template
        self.generated: list[int] = []
        self.closed = False
        self.calls: list[tuple[list[int], Any]] = []
        self.stopped_early = False
        self.options: LoadOptions | None = None
        # grammar/constraints: it records them with the call (tests of the settings' surfaces), enforcing nothing
        self.capabilities = Capabilities(max_sequences=1, scoring=False, grammar=True, constraints=True)
        self._make_sequences(1)

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return path.suffix == ".fake"

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "FakeBackend":
        vocab = [b"</s>"] + [line.encode("utf-8") for line in path.read_text(encoding="utf-8").split("|")]
        backend = cls(vocab, n_ctx=options.n_ctx or 64)
        backend.options = options
        cls.loaded.append(backend)
        return backend

    @classmethod
    def inspect(cls, path: Path) -> dict[str, Any]:
        return {"path": str(path), "format": "fake", "architecture": "fake", "quantization": "none", "parameters": 1}

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        # one token per character: ids are 1000 + code point (never collide with the scripted vocab)
        out: list[int] = []
        i = 0
        while i < len(text):
            special = next((k for k, sp in enumerate(SPECIALS) if parse_special and text.startswith(sp, i)), None)
            if special is not None:
                out.append(500 + special)
                i += len(SPECIALS[special])
            else:
                out.append(1000 + ord(text[i]))
                i += 1
        return out

    def text_of(self, tokens: Sequence[int]) -> str:
        """The text ``tokens`` stand for, control tokens included (what a test checks a prompt against)."""
        return "".join(SPECIALS[t - 500] if 500 <= t < 1000 else chr(t - 1000) for t in tokens)

    def token_bytes(self, token: int) -> bytes:
        if token >= 1000:
            return chr(token - 1000).encode("utf-8")
        if token >= 500:  # control tokens have no text of their own
            return b""
        return b"" if token == EOS else self.vocab[token]

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def rewind(self, seq: Seq, n: int) -> bool:
        del seq.tokens[n:]
        return True

    def extend(self, seq: Seq, tokens: Sequence[int]) -> None:
        seq.tokens.extend(tokens)

    def generate(self, seq: Seq, tokens: Sequence[int], params: Any) -> Iterator[int]:
        self.calls.append((list(tokens), params))
        self.prepare(seq, tokens)
        return self._scripted()

    def _scripted(self) -> Iterator[int]:
        self.generated = []
        try:
            for token in self.script:
                self.generated.append(token)
                yield token
        except GeneratorExit:
            self.stopped_early = True
            raise

    def describe(self) -> dict[str, Any]:
        return {"format": "fake", "architecture": "fake", "quantization": "none", "parameters": 1,
                "trained_context_length": self.n_ctx}

    def close(self) -> None:
        self.closed = True
