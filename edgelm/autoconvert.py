"""Serving a Hugging Face checkpoint: `edgelm serve [--parallel N] SOURCE`, where SOURCE is a checkpoint folder or a
Hub id naming one, converts it to GGUF once and serves the GGUF.

The quantization is chosen as ``edgelm convert SOURCE --quant auto --parallel N --max-ppl-increase 10%`` chooses
it (:func:`edgelm.convert`): of the quantizations within the perplexity budget, the one that serves N streams the
most tokens per second on this CPU (each candidate timed; the timings cached in ``$EDGELM_HOME/step-costs.json``),
or with one stream the smallest within the budget.  The result is kept under ``$EDGELM_HOME/converted/``, in a
folder named after the source and a digest of what the choice depends on (the source's files, N, the budget, the
threads and this CPU), with ``choice.json`` beside it, so serving the same source again reuses the file and says
again why it was chosen.  The output is an ordinary conversion output: `edgelm list` shows it, `edgelm rm` removes
it (the next serve converts again).

The budget is declared once, in :class:`AutoConvertOptions` (`edgelm serve --max-ppl-increase`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .conversion import convert, parse_fraction
from .converters.source import resolve as download_checkpoint
from .declarations import from_dataclass, setting
from .formats import hf
from .hub import hub_checkpoint
from .plan import PARALLEL_PPL_BUDGET
from .platforms import cpu_signature
from .runtimes import detect_backend
from .home import write_atomic
from .store_index import edgelm_home, forget, record_output

log = logging.getLogger("edgelm")

Progress = Callable[[str, float], None]

CONVERTED_DIR = "converted"  # under $EDGELM_HOME
CHOICE_NAME = "choice.json"


@dataclass(frozen=True, kw_only=True)
class AutoConvertOptions:
    """How a served checkpoint is converted, each option declared once; `edgelm serve` derives its flags."""

    max_ppl_increase: str | float = setting(
        PARALLEL_PPL_BUDGET, "A Hugging Face checkpoint (folder or Hub id) is converted to GGUF once before it is served: of the "
        "quantizations within this perplexity increase over the 16-bit reference, the one that serves --parallel N "
        "streams the most tokens per second here (the smallest, for one stream).", kind="str",
        cli=("--max-ppl-increase",), example="5%")


AUTO_CONVERT = from_dataclass(AutoConvertOptions)


@dataclass(frozen=True)
class ServedCheckpoint:
    """The GGUF a checkpoint is served as, and why that quantization."""

    path: Path  # the GGUF under $EDGELM_HOME/converted/
    source: str  # the checkpoint folder converted
    quant: str
    parallel: int
    reason: str  # one line: the quantization and why (speedup, perplexity ratio)
    converted: bool  # False: an earlier conversion was reused
    tried: list[dict[str, Any]] = field(default_factory=list)  # every candidate measured (ConversionReport.tried)


def find_checkpoint(text: str | os.PathLike[str]) -> Path | None:
    """The Hugging Face checkpoint folder ``text`` names, or None: a local folder with config.json and safetensors
    weights (not a GGUF or ONNX model), or a Hub id of a checkpoint repository (from the HF cache, which works
    offline; online and not cached, downloaded).  A Hub id of a GGUF or ONNX repository is None: edgelm.hub pulls
    those."""
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve() if hf.is_checkpoint(path) and detect_backend(path) is None else None
    found = hub_checkpoint(str(text))
    if isinstance(found, Path):
        return found
    if found is not None:  # online, not in the cache: its facts were read from the Hub; fetch the files
        return download_checkpoint(str(text))
    return None


def _fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    """What the conversion reads, by name, size and modification time (a Hub snapshot's files are links to blobs
    named by their hash, and its folder by the commit)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja")):
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
    return out


def _stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "model"


def _home_for(folder: Path, label: str, parallel: int, budget: float, threads: int | None) -> Path:
    key = json.dumps({"source": str(folder), "files": _fingerprint(folder), "parallel": parallel,
                      "max_ppl_increase": budget, "threads": threads, "cpu": cpu_signature()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return edgelm_home() / CONVERTED_DIR / f"{_stem(label)}-{digest}"


def _reuse(home: Path) -> ServedCheckpoint | None:
    try:
        data = json.loads((home / CHOICE_NAME).read_text(encoding="utf-8"))
        path = home / data["file"]
        if not path.is_file():
            return None  # removed (`edgelm rm`): convert again
        return ServedCheckpoint(path, data["source"], data["quant"], int(data["parallel"]), data["reason"],
                                converted=False, tried=list(data.get("tried") or []))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _reason(report: Any, parallel: int, budget: float) -> str:
    """One line: the quantization kept, and why (its speed against the next fastest within the budget; its
    perplexity against the 16-bit reference's; which were over the budget)."""
    quant = report.quant.upper()
    timed = [t for t in report.tried if "tokens_per_second" in t]
    over = [t["quant"].upper() for t in report.tried if not t.get("kept") and "tokens_per_second" not in t]
    reference = str(report.reference or "reference").split(" of ")[0]
    why = [f"perplexity {report.perplexity / report.reference_perplexity:.3f}x the {reference}'s (budget "
           f"{1 + budget:.2f}x)"] if report.perplexity and report.reference_perplexity else []
    if over:
        why.append(f"over the budget: {', '.join(over)}")
    ours = next((t["tokens_per_second"] for t in timed if t["quant"] == report.quant), None)
    others = sorted((t for t in timed if t["quant"] != report.quant), key=lambda t: -t["tokens_per_second"])
    if parallel <= 1:
        head = f"{quant}, the smallest quantization within the budget"
    elif not others or not ours:
        head = f"{quant}, the only quantization within the budget"
    else:
        runner = others[0]
        head = (f"{quant}: {parallel} streams at {ours:.1f} tokens/s on this CPU, "
                f"{ours / runner['tokens_per_second']:.2f}x {runner['quant'].upper()}, the next fastest of the "
                f"{len(timed)} within the budget")
    return "; ".join([head, *why])


def _say(progress: Progress | None, line: str, fraction: float = 1.0) -> None:
    if progress is not None:
        progress(line, fraction)
    else:
        log.info(line)


def serve_checkpoint(folder: str | os.PathLike[str], *, label: str | None = None, parallel: int | None = None,
                     threads: int | None = None, max_ppl_increase: str | float | None = None,
                     progress: Progress | None = None) -> ServedCheckpoint:
    """The GGUF to serve the Hugging Face checkpoint ``folder`` (see :func:`find_checkpoint`) as: converted once
    with ``quant="auto"`` for ``parallel`` streams (None: 1) within ``max_ppl_increase`` (None: the declared
    default, :class:`AutoConvertOptions`), kept under ``$EDGELM_HOME/converted/`` and reused afterwards.
    ``label``: how the source is named in messages and file names (a Hub id; default: the folder's name).
    ``progress(message, fraction)`` hears the conversion's steps, then the line naming the quantization and why
    (:attr:`ServedCheckpoint.reason`); without it, that line is logged."""
    source = Path(folder).expanduser().resolve()
    label = label or source.name
    n = 1 if parallel is None else parallel
    given = AutoConvertOptions(**({} if max_ppl_increase is None else {"max_ppl_increase": max_ppl_increase}))
    budget = parse_fraction(given.max_ppl_increase)
    assert budget is not None
    home = _home_for(source, label, n, budget, threads)
    kept = _reuse(home)
    if kept is not None:
        _say(progress, f"serving {kept.path.name}, converted earlier from {label}: {kept.reason}")
        return kept
    streams = f"{n} streams" if n > 1 else "one stream"
    _say(progress, f"converting {label} to GGUF once, for {streams} within +{budget * 100:g}% perplexity (kept in "
         f"{home})", 0.0)
    home.mkdir(parents=True, exist_ok=True)
    for old in home.glob("*.gguf"):  # a run killed before choice.json was written: its file is not known to be right
        old.unlink()
        forget(old)
    first = home / f"{_stem(label)}.gguf"
    report = convert(str(source), to="gguf", quant="auto", parallel=n, max_ppl_increase=budget, output=str(first),
                     overwrite=True, progress=progress, threads=threads)
    path = home / f"{_stem(label)}-{report.quant}.gguf"
    os.replace(first, path)  # size and mtime kept: the step costs measured for it still apply
    forget(first)
    record_output(path)
    reason = _reason(report, n, budget)
    choice = {"file": path.name, "source": str(source), "quant": report.quant, "parallel": n, "reason": reason,
              "tried": report.tried}
    write_atomic(home / CHOICE_NAME, json.dumps(choice, indent=1))
    _say(progress, f"serving {path.name}: {reason}")
    return ServedCheckpoint(path, str(source), report.quant, n, reason, converted=True, tried=report.tried)


__all__ = ["AUTO_CONVERT", "AutoConvertOptions", "ServedCheckpoint", "find_checkpoint", "serve_checkpoint"]
