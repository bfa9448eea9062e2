"""`edgelm.convert`: write a GGUF or ONNX model and measure what the conversion cost in quality.

Every conversion (unless eval=False) scores the output and an unquantized reference on the built-in evaluation
text, and runs a short generation in a child process for decode speed and peak memory.  Budgets
(max_ppl_increase, max_size) turn a conversion that loses too much into an error with no output left behind.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConversionError, InvalidParameterError, InvalidSourceError, QualityBudgetError

Progress = Callable[[str, float], None]
# --quant auto tries these, smallest first, and keeps the first that meets the budgets
AUTO_GGUF = ("q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0")
AUTO_ONNX = ("int4", "int8", "fp16")


@dataclass
class ConversionReport:
    output: str
    format: str
    quant: str
    architecture: str
    size_bytes: int
    bits_per_weight: float | None
    seconds: float
    perplexity: float | None = None
    reference_perplexity: float | None = None
    reference: str | None = None  # what the reference perplexity was measured on
    tokens_per_second: float | None = None
    peak_rss: int | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)  # --quant auto: every candidate measured

    @property
    def ppl_increase(self) -> float | None:
        if self.perplexity is None or not self.reference_perplexity:
            return None
        return self.perplexity / self.reference_perplexity - 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl_increase": self.ppl_increase}


def parse_fraction(value: str | float | None, name: str = "max_ppl_increase") -> float | None:
    """"5%" or 0.05 -> 0.05."""
    if value is None:
        return None
    try:
        out = float(value[:-1]) / 100 if isinstance(value, str) and value.strip().endswith("%") else float(value)
    except (TypeError, ValueError):
        out = -1.0
    if out < 0:
        raise InvalidParameterError(f"Invalid {name}: {value!r}.", fix='Use a percentage like "5%" or a fraction 0.05.',
                                    parameter=name, value=value)
    return out


def parse_size(value: str | int | None) -> int | None:
    """"120MB", "1.5GB", "500k" or a byte count -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)?\s*", str(value), re.I)
    if not m:
        raise InvalidParameterError(f"Invalid max_size: {value!r}.", fix='Use a size like "120MB" or "1.5GB".',
                                    parameter="max_size", value=value)
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def convert(src: str, *, to: str = "gguf", quant: str = "q4_k_m", output: str | None = None, overwrite: bool = False,
            revision: str | None = None, eval: bool = True, max_ppl_increase: str | float | None = None,
            max_size: str | int | None = None, progress: Progress | None = None, **options: Any) -> ConversionReport:
    """Convert ``src`` (a Hugging Face folder or Hub id; for GGUF output also a .gguf to re-quantize).

    to: "gguf" or "onnx".  quant: a llama.cpp type (q4_k_m, q8_0, f16, ...) or int4/int8/fp16/fp32 for ONNX, or
    "auto" to keep the smallest that meets ``max_size`` / ``max_ppl_increase``.
    """
    from .converters.source import resolve

    to = str(to).lower()
    if to not in ("gguf", "onnx"):
        raise InvalidParameterError(f"Invalid target format {to!r}.", fix='Use to="gguf" or to="onnx".',
                                    parameter="to", value=to)
    budget_ppl = parse_fraction(max_ppl_increase)
    budget_size = parse_size(max_size)
    if budget_ppl is not None and not eval:
        raise InvalidParameterError("max_ppl_increase needs the quality evaluation, but eval=False.",
                                    fix="Drop --no-eval.", parameter="eval", value=False)
    source = resolve(src, revision=revision)
    if output is None:
        raise InvalidParameterError("No output path given.", fix="Pass output= (-o on the command line).",
                                    parameter="output", value=None)
    out = Path(output).expanduser()
    report = progress or (lambda message, fraction: None)
    if str(quant).lower() == "auto":
        if budget_ppl is None and budget_size is None:
            raise InvalidParameterError('quant="auto" needs a budget.', fix="Add max_size and/or max_ppl_increase.",
                                        parameter="quant", value="auto")
        return _auto(source, to, out, overwrite, eval, budget_ppl, budget_size, report, options)
    return _one(source, to, str(quant).lower(), out, overwrite, eval, budget_ppl, budget_size, report, options)


def _write(source: Path, to: str, quant: str, out: Path, overwrite: bool, report: Progress,
           options: dict[str, Any]) -> Path:
    if to == "gguf":
        from .converters.gguf import requantize
        from .runtimes.gguf import is_gguf

        if source.is_file() and is_gguf(source):
            return requantize(source, out, quant, overwrite=overwrite, progress=report,
                              threads=options.get("threads"))
        if (source / "config.json").is_file():
            raise ConversionError(
                f"{source} is a Hugging Face checkpoint; this version of edgelm converts it to ONNX (to='onnx') but "
                "not yet to GGUF.",
                fix="Write an f16 GGUF with llama.cpp's convert_hf_to_gguf.py, then `edgelm convert model-f16.gguf "
                f"--quant {quant}` quantizes it and measures the quality.", path=str(source))
        raise InvalidSourceError(f"{source} is neither a GGUF file nor a Hugging Face folder (no config.json).",
                                 fix="Pass a model folder with config.json, or a .gguf to re-quantize.",
                                 path=str(source))
    from .converters.onnx import convert_to_onnx

    if not source.is_dir():
        raise InvalidSourceError(f"ONNX conversion needs a Hugging Face folder; {source} is a file.",
                                 fix="Pass the folder with config.json and the safetensors weights.", path=str(source))
    return convert_to_onnx(source, out, quant, progress=report, overwrite=overwrite, **options)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _one(source: Path, to: str, quant: str, out: Path, overwrite: bool, evaluate: bool, budget_ppl: float | None,
         budget_size: int | None, report: Progress, options: dict[str, Any], reference: tuple[str, float] | None = None
         ) -> ConversionReport:
    t0 = time.perf_counter()
    _write(source, to, quant, out, overwrite, report, options)
    seconds = time.perf_counter() - t0
    try:
        result = _describe(out, to, quant, seconds)
        if budget_size is not None and result.size_bytes > budget_size:
            raise QualityBudgetError(f"{out.name} is {result.size_bytes / 1e6:.1f} MB, over max_size "
                                     f"{budget_size / 1e6:.1f} MB.", fix="Use a smaller quantization.",
                                     size=result.size_bytes)
        if evaluate:
            ref = reference or _reference(source, to, out, quant, report)
            _measure(result, ref, report)
            if budget_ppl is not None and result.ppl_increase > budget_ppl:
                raise QualityBudgetError(
                    f"{quant.upper()} raised perplexity by {result.ppl_increase * 100:.2f} % "
                    f"({result.perplexity:.3f} vs {result.reference_perplexity:.3f} for {result.reference}), over the "
                    f"budget of {budget_ppl * 100:.2f} %; {out} was not kept.",
                    fix="Use a larger quantization (e.g. q5_k_m, q8_0) or raise --max-ppl-increase.",
                    perplexity=result.perplexity, reference_perplexity=result.reference_perplexity)
    except BaseException:
        _remove(out)
        raise
    return result


def _describe(out: Path, to: str, quant: str, seconds: float) -> ConversionReport:
    from .loader import inspect

    facts = inspect(out)
    params = facts.get("parameters") or 0
    size = _size(out)
    return ConversionReport(output=str(out), format=to, quant=quant, architecture=str(facts.get("architecture")),
                            size_bytes=size, bits_per_weight=round(8 * size / params, 3) if params else None,
                            seconds=round(seconds, 2))


def _reference(source: Path, to: str, out: Path, quant: str | None, report: Progress) -> tuple[str, float]:
    """Perplexity of the unquantized model: the source GGUF itself, or an fp32 ONNX export (temporary)."""
    if to == "gguf":
        report("measuring the reference (source) perplexity", 0.6)
        return (f"the source {source.name}", _perplexity(source))
    if quant == "fp32":
        return ("fp32 (the output itself)", _perplexity(out))
    from .converters.onnx import convert_to_onnx

    report("exporting the fp32 reference", 0.6)
    with tempfile.TemporaryDirectory(prefix=".edgelm-ref-", dir=out.parent) as tmp:
        ref = convert_to_onnx(source, Path(tmp) / "fp32", "fp32")
        return ("fp32 ONNX of the same source", _perplexity(ref))


def _perplexity(path: Path) -> float:
    from .measure import evaluate

    return evaluate(str(path))[0].perplexity


def _measure(result: ConversionReport, reference: tuple[str, float], report: Progress) -> None:
    from .measure import bench

    report("measuring perplexity, speed and memory", 0.8)
    result.reference, result.reference_perplexity = reference
    result.perplexity = _perplexity(Path(result.output))
    run = bench([result.output], runs=1, prompt_tokens=64, gen_tokens=32, n_ctx=512)[0]
    result.tokens_per_second = round(run.tokens_per_second, 1)
    result.peak_rss = run.peak_rss


def _auto(source: Path, to: str, out: Path, overwrite: bool, evaluate: bool, budget_ppl: float | None,
          budget_size: int | None, report: Progress, options: dict[str, Any]) -> ConversionReport:
    """Try quantizations smallest first; keep the first that meets every budget."""
    from .errors import OutputExistsError

    if out.exists() and not overwrite:
        raise OutputExistsError(f"The output {out} already exists.", fix="Choose another path or pass --overwrite.",
                                path=str(out))
    candidates = AUTO_GGUF if to == "gguf" else AUTO_ONNX
    reference = _reference(source, to, out, None, report) if evaluate else None
    tried: list[dict[str, Any]] = []
    for quant in candidates:
        report(f"trying {quant}", 0.0)
        try:
            result = _one(source, to, quant, out, True, evaluate, budget_ppl, budget_size, report, options, reference)
        except QualityBudgetError as exc:
            tried.append({"quant": quant, "kept": False, "reason": exc.message,
                          **{k: exc.details.get(k) for k in ("size", "perplexity") if k in exc.details}})
            continue
        tried.append({"quant": quant, "kept": True, "size_bytes": result.size_bytes,
                      "perplexity": result.perplexity})
        result.tried = tried
        return result
    raise QualityBudgetError(
        f"No quantization of {source.name} meets the budget "
        f"({'max size ' + str(budget_size) + ' bytes' if budget_size else ''}"
        f"{', ' if budget_size and budget_ppl is not None else ''}"
        f"{'max perplexity increase ' + format(budget_ppl * 100, '.2f') + ' %' if budget_ppl is not None else ''}); "
        f"tried {', '.join(t['quant'] for t in tried)}.",
        fix="Loosen the budget, or use a smaller model.", tried=tried)
