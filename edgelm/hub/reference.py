"""Model names: ``ORG/REPO[:QUANT]`` as a user types them, told apart from file names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameterError

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_QUANT = re.compile(r"^[\w.\-/]+$")
_NOT_A_REPO = (".gguf", ".onnx", ".json", ".bin", ".safetensors")
_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "https://hf.co/", "hf.co/")


@dataclass(frozen=True)
class Reference:
    """``ORG/REPO[:QUANT]`` as typed (an ``hf.co/`` or ``huggingface.co/`` prefix is dropped)."""

    repo_id: str
    quant: str | None = None

    @property
    def name(self) -> str:
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id

    def __str__(self) -> str:
        return self.name


def parse_reference(text: Any) -> Reference | None:
    """The :class:`Reference` in ``text``, or None when it does not look like ``ORG/REPO[:QUANT]`` (a file name such as
    ``dir/model.gguf`` is not one).  Whether a path of that name exists is for the caller to check first."""
    if not isinstance(text, str):
        return None
    s = text.strip()
    for prefix in _PREFIXES:
        if s.lower().startswith(prefix):
            s = s[len(prefix):]
            break
    repo, sep, tag = s.partition(":")
    if not _REPO.match(repo) or repo.lower().endswith(_NOT_A_REPO) or ".." in repo:
        return None
    if sep and (not tag or not _QUANT.match(tag) or ".." in tag):
        return None
    # no tag, or Ollama's default tag "latest": the best that fits
    return Reference(repo, tag if tag and tag.lower() != "latest" else None)


def as_reference(ref: Reference | str) -> Reference:
    """``ref`` parsed, or InvalidParameterError when it is no ``ORG/REPO[:QUANT]``."""
    if isinstance(ref, Reference):
        return ref
    parsed = parse_reference(ref)
    if parsed is None:
        raise InvalidParameterError(
            f"{ref!r} is not a model name of the form ORG/REPO[:QUANT].",
            fix="Use e.g. bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M, or pass a local path.",
            parameter="model", value=ref)
    return parsed
