"""Converters: Hugging Face checkpoints (and GGUF files) to GGUF or quantized ONNX.

Each target format is a module behind one small protocol, :class:`Target` (``gguf``, ``onnx``; more later), with a
typed option record.  :func:`edgelm.convert` picks the target by name from :data:`TARGETS` and runs the same steps
for every one: stage the source, write the output (temporary name, renamed at the end), measure it against the
target's unquantized reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

from edgelm.errors import InvalidParameterError

Progress = Callable[[str, float], None]
Verify = Callable[[Path], None]

# target name -> module:attribute of its Target
TARGETS: dict[str, str] = {"gguf": "edgelm.converters.gguf:TARGET", "onnx": "edgelm.converters.onnx:TARGET"}


@dataclass
class Staged:
    """What a target writes from: the source itself, or an intermediate it made (Hugging Face -> 16-bit GGUF)."""

    source: Path  # the user's source (folder or file)
    path: Path  # what the writer reads
    reference: str = ""  # how reports name the unquantized reference
    seconds: float = 0.0  # time already spent making ``path``
    peak_rss: int | None = None  # peak memory of the process that made ``path``
    allow_pickle: bool = False


class Target(Protocol):
    name: str  # "gguf", "onnx"
    options: type  # the typed option record (a frozen dataclass built by option_record)
    auto_quants: tuple[str, ...]  # quant="auto" tries these, smallest first

    def check_quant(self, quant: str, options: Any = None, given: bool = True) -> str:
        """The canonical name of ``quant`` for these ``options``; UnknownQuantizationError listing the valid ones.
        ``given``: the user named it (else it is ConvertOptions' default, which a target may replace: the NPU pair's
        quant follows its weights option)."""

    def stage(self, source: Path, name: str, quant: str, out: Path, options: Any, *, allow_pickle: bool,
              progress: Progress) -> ContextManager[Staged]:
        """Check the source and make what :meth:`write` reads (removed when the context ends)."""

    def write(self, staged: Staged, quant: str, out: Path, options: Any, *, overwrite: bool, progress: Progress,
              verify: Verify | None) -> Path:
        """Write ``out`` (temporary name, renamed when whole and ``verify`` passed); nothing is left on failure."""

    def reference(self, staged: Staged, out: Path, quant: str | None) -> ContextManager[Path]:
        """An unquantized model of the same source to measure the output against (temporary when made here)."""

    def method(self, out: Path) -> str | None:
        """How the output's weights were rounded (gptq, default = round to nearest, ...), when the target says."""


def target(name: str) -> Target:
    key = str(name).lower()
    if key not in TARGETS:
        raise InvalidParameterError(f"Invalid target format {name!r}.", fix=f"Use one of: {', '.join(TARGETS)}.",
                                    parameter="to", value=name)
    module, attr = TARGETS[key].split(":")
    return getattr(importlib.import_module(module), attr)


def option_record(cls: type, options: dict[str, Any], what: str) -> Any:
    """``cls(**options)`` for a dataclass of options; unknown names and None values handled once for every target
    (None means "the default")."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise InvalidParameterError(f"Unknown {what} option {unknown[0]!r}.", fix=f"Use one of: {', '.join(names)}.",
                                    parameter=unknown[0], value=options[unknown[0]])
    return cls(**{k: v for k, v in options.items() if v is not None})


@contextlib.contextmanager
def as_is(path: Path):
    """A reference that is already on disk (nothing to remove afterwards)."""
    yield path
