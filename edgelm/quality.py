"""Quality measurements: perplexity on the built-in evaluation text (or any text).

Used by `edgelm eval`, and by every conversion's quality report.  Windows are scored independently from an
empty cache (like llama.cpp's `llama-perplexity`), and only the second half of each window counts, so every
scored token has at least half a window of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from .errors import InvalidParameterError

DEFAULT_WINDOW = 512
DEFAULT_WINDOWS = 4


def eval_text() -> str:
    """The built-in evaluation text (an excerpt of the Python Language Reference, PSF licence)."""
    return resources.files("edgelm").joinpath("data/eval.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    windows: int
    window: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows_of(model: Any, text: str | None = None, *, window: int = DEFAULT_WINDOW,
               windows: int | None = DEFAULT_WINDOWS) -> list[list[int]]:
    """The token windows perplexity scores: consecutive ``window``-token slices of ``text`` (``windows=None``: all)."""
    text = eval_text() if text is None else text
    if not isinstance(window, int) or window < 16:
        raise InvalidParameterError(f"Invalid window: {window!r}.", fix="window must be an integer >= 16.",
                                    parameter="window", value=window)
    if window > model.n_ctx:
        raise InvalidParameterError(
            f"window={window} is larger than the model's context (n_ctx={model.n_ctx}).",
            fix=f"Use window <= {model.n_ctx}, or load the model with a larger n_ctx.", parameter="window",
            value=window,
        )
    tokens = model.tokenize(text, add_special=False)
    n_full = len(tokens) // window
    if n_full == 0:
        raise InvalidParameterError(
            f"The text has {len(tokens)} tokens, fewer than one window of {window}.",
            fix="Use a longer text or a smaller window.", parameter="text", value=len(tokens),
        )
    n = n_full if windows is None else min(windows, n_full)
    return [tokens[w * window : (w + 1) * window] for w in range(n)]


def perplexity(model: Any, text: str | None = None, *, window: int = DEFAULT_WINDOW,
               windows: int | None = DEFAULT_WINDOWS) -> PerplexityResult:
    """Perplexity of ``model`` (an :class:`edgelm.Model`) on ``text`` (default: the built-in text).

    ``windows=None`` scores every full window of the text.
    """
    chunks = windows_of(model, text, window=window, windows=windows)
    total, count = 0.0, 0
    half = window // 2
    for chunk in chunks:
        scored = model.score(chunk)[half - 1 :]  # score()[k] is for chunk[k+1]: score the second half
        total -= float(scored.sum())
        count += len(scored)
    return PerplexityResult(perplexity=math.exp(total / count), tokens_scored=count, windows=len(chunks),
                            window=window)
