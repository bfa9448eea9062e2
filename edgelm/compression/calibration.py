"""Calibration text: what the layer scores, the least-squares fits and the distillation are measured on.

Default: the Python standard library's own docstrings (offline, English technical prose; the same text the ONNX
GPTQ export calibrates on, and not the built-in evaluation text, which comes from the Language Reference).  A model
meant for other text should be compressed with ``calibration=`` text like it: the healing makes the model good at
what it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.converters.calibration import calibration_text
from edgelm.errors import InvalidParameterError, ModelNotFoundError

MIN_TOKENS = 4096  # 8 windows of 512: 4 to score the layers on, 4 to fit and train on


def default_text() -> str:
    return calibration_text()


def read_text(path: str | Path, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFoundError(f"The {what} file {p} does not exist.", fix="Pass a UTF-8 text file.", path=str(p))
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameterError(f"The {what} file {p} is not UTF-8 text ({exc}).",
                                    fix="Pass a UTF-8 text file.", parameter=what, value=str(p)) from exc


def check_length(tokenizer: Any, text: str, source: str) -> int:
    """The token count of ``text``; InvalidParameterError naming the minimum when it is too short."""
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    if n < MIN_TOKENS:
        raise InvalidParameterError(
            f"The {source} is {n:,} tokens long; compression needs at least {MIN_TOKENS:,} "
            f"(about {MIN_TOKENS * 4 // 1000} kB of English).",
            fix="Pass a longer --calibration file (text like what the model will see).", parameter="calibration",
            value=n)
    return n


@dataclass
class Windows:
    """Token windows of the calibration text, split by use (no window serves two uses)."""

    score: Any  # (k, seq): the layer scores and the choice are measured on these
    fit: Any  # (m, seq): least-squares statistics
    train: Any  # (t, seq): distillation (includes the fit windows)
    seq_len: int
    tokens: int  # in the whole text


def windows(tokenizer: Any, text: str, *, seq_len: int, max_tokens: int, fit_tokens: int, score_windows: int = 2,
            source: str = "calibration text") -> Windows:
    import torch

    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < MIN_TOKENS:
        check_length(tokenizer, text, source)  # raises, naming the minimum
    seq = min(seq_len, len(ids) // 8)
    n = min(len(ids), max_tokens) // seq
    stride = len(ids) // n  # spread over the whole text
    rows = torch.tensor([ids[i * stride:i * stride + seq] for i in range(n)], dtype=torch.long)
    # the scoring windows are spread evenly through the text; the others fit and train
    k = min(score_windows, max(1, n // 8))
    score_idx = [round((i + 0.5) * n / k) for i in range(k)]
    rest = [i for i in range(n) if i not in score_idx]
    m = max(1, min(len(rest), fit_tokens // seq))
    return Windows(score=rows[score_idx], fit=rows[rest[:: max(1, len(rest) // m)][:m]], train=rows[rest],
                   seq_len=seq, tokens=len(ids))
