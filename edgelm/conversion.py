"""`edgelm.convert`: write a GGUF or ONNX model and measure what the conversion cost in quality.

Every conversion (unless eval=False) scores the output and an unquantized reference on the built-in evaluation
text, and runs a short generation in a child process for decode speed and peak memory.  Budgets
(max_ppl_increase, max_size) turn a conversion that loses too much into an error with no output left behind.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InvalidParameterError, InvalidSourceError, OutputExistsError, QualityBudgetError

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
    peak_rss: int | None = None  # bytes, a short generation with the output
    conversion_peak_rss: int | None = None  # bytes, llama.cpp's HF -> GGUF converter process (HF sources only)
    method: str | None = None  # ONNX int4/int8: how weights were rounded (gptq, default = round to nearest, ...)
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
            max_size: str | int | None = None, allow_pickle: bool = False, progress: Progress | None = None,
            **options: Any) -> ConversionReport:
    """Convert ``src`` (a Hugging Face folder or Hub id; for GGUF output also a .gguf to re-quantize).

    to: "gguf" or "onnx".  quant: a llama.cpp type (q4_k_m, q8_0, f16, ...) or int4/int8/fp16/fp32 for ONNX, or
    "auto" to keep the smallest that meets ``max_size`` / ``max_ppl_increase``.

    A Hugging Face checkpoint becomes GGUF in two steps: llama.cpp's converter writes a 16-bit GGUF (bf16 for bf16
    checkpoints, f16 otherwise; f32/bf16 when asked for), then llama.cpp's quantizer writes ``quant`` from it; that
    16-bit file is the reference the quality report compares against, and is removed at the end.
    allow_pickle: accept *.bin pickle weights (they can run code when loaded).
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
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise OutputExistsError(f"The output {out} already exists.", fix="Choose another path or pass --overwrite.",
                                path=str(out))
    report = progress or (lambda message, fraction: None)
    quant = str(quant).lower()
    if quant == "auto" and budget_ppl is None and budget_size is None:
        raise InvalidParameterError('quant="auto" needs a budget.', fix="Add max_size and/or max_ppl_increase.",
                                    parameter="quant", value="auto")
    if to == "gguf" and quant != "auto":
        from .converters.gguf import quant_id

        quant_id(quant)  # an unknown type is refused before minutes of conversion
    name = source.name if Path(src).expanduser().exists() else str(src)  # a Hub id, not its snapshot hash
    with _staged(source, name, to, quant, out, allow_pickle, report, options) as staged:
        if quant == "auto":
            return _auto(staged, to, out, overwrite, eval, budget_ppl, budget_size, report, options)
        return _one(staged, to, quant, out, overwrite, eval, budget_ppl, budget_size, report, options)


@dataclass
class _Staged:
    """What the writer reads: the source itself, or (Hugging Face -> GGUF) the converter's 16-bit GGUF."""

    source: Path  # the user's source (folder or file)
    path: Path  # what the GGUF quantizer reads; for ONNX the source folder
    reference: str = ""  # how the report names the unquantized reference
    seconds: float = 0.0  # time already spent converting
    peak_rss: int | None = None  # the converter process's peak memory
    allow_pickle: bool = False


@contextlib.contextmanager
def _staged(source: Path, name: str, to: str, quant: str, out: Path, allow_pickle: bool, report: Progress,
            options: dict[str, Any]) -> Iterator[_Staged]:
    if to == "onnx":
        if not source.is_dir():
            raise InvalidSourceError(f"ONNX conversion needs a Hugging Face folder; {source} is a file.",
                                     fix="Pass the folder with config.json and the safetensors weights.",
                                     path=str(source))
        options["allow_pickle"] = allow_pickle
        yield _Staged(source, source, "fp32 ONNX of the same source", allow_pickle=allow_pickle)
        return
    from .runtimes.gguf import is_gguf, read_header

    unknown = sorted(set(options) - {"threads", "timeout"})
    if unknown:
        raise InvalidParameterError(f"Unknown GGUF conversion option {unknown[0]!r}.", fix="Use threads or timeout.",
                                    parameter=unknown[0], value=options[unknown[0]])
    if source.is_file() and is_gguf(source):
        yield _Staged(source, source, f"the source {name}")
        return
    if not (source.is_dir() and (source / "config.json").is_file()):
        raise InvalidSourceError(f"{source} is neither a GGUF file nor a Hugging Face folder (no config.json).",
                                 fix="Pass a model folder with config.json, or a .gguf to re-quantize.",
                                 path=str(source))
    from .converters.hf_gguf import check_hf_source, hf_to_gguf
    from .converters.onnx import _count_parameters

    check_hf_source(source, allow_pickle=allow_pickle)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = _count_parameters(source) or sum(f.stat().st_size for f in source.glob("*.bin")) // 2  # pickles: 16-bit?
    need = params * (4 if quant == "f32" else 2) * 2 + (16 << 20)  # the 16-bit file + the output
    free = shutil.disk_usage(out.parent).free
    if free < need:
        from .errors import InsufficientDiskSpaceError

        raise InsufficientDiskSpaceError(f"{out.parent} has {free / 1e6:.0f} MB free; converting {source.name} needs "
                                         f"about {need / 1e6:.0f} MB there.", fix="Free some space or write elsewhere.",
                                         needed=need, free=free)
    outtype = quant if quant in ("f32", "bf16") else "auto"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".convert", dir=out.parent))
    try:
        path = tmp / f"{source.name}-{outtype}.gguf"
        run = hf_to_gguf(source, path, outtype, allow_pickle=allow_pickle, timeout=options.get("timeout"),
                         progress=lambda message, fraction: report(message, 0.5 * fraction))
        header = read_header(path)
        yield _Staged(source, path, f"{header.quantization} GGUF of {name}", run.seconds, run.peak_rss)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(staged: _Staged, to: str, quant: str, out: Path, overwrite: bool, report: Progress,
           options: dict[str, Any]) -> Path:
    if to == "gguf":
        from .converters.gguf import check_runs, requantize

        return requantize(staged.path, out, quant, overwrite=overwrite, threads=options.get("threads"),
                          verify=check_runs, progress=lambda message, fraction: report(message, 0.5 + 0.1 * fraction))
    from .converters.onnx import convert_to_onnx

    return convert_to_onnx(staged.path, out, quant, progress=report, overwrite=overwrite, **options)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _one(staged: _Staged, to: str, quant: str, out: Path, overwrite: bool, evaluate: bool, budget_ppl: float | None,
         budget_size: int | None, report: Progress, options: dict[str, Any], reference: tuple[str, float] | None = None
         ) -> ConversionReport:
    t0 = time.perf_counter()
    _write(staged, to, quant, out, overwrite, report, options)
    seconds = time.perf_counter() - t0 + staged.seconds
    try:
        result = _describe(out, to, quant, seconds)
        result.conversion_peak_rss = staged.peak_rss
        if budget_size is not None and result.size_bytes > budget_size:
            raise QualityBudgetError(f"{out.name} is {result.size_bytes / 1e6:.1f} MB, over max_size "
                                     f"{budget_size / 1e6:.1f} MB.", fix="Use a smaller quantization.",
                                     size=result.size_bytes)
        if evaluate:
            ref = reference or _reference(staged, to, out, quant, report)
            _measure(result, ref, report)
            if budget_ppl is not None and result.ppl_increase > budget_ppl:
                raise QualityBudgetError(
                    f"{quant.upper()} raised perplexity by {result.ppl_increase * 100:.2f} % "
                    f"({result.perplexity:.3f} vs {result.reference_perplexity:.3f} for {result.reference}), over the "
                    f"budget of {budget_ppl * 100:.2f} %; {out} was not kept.",
                    fix="Use a larger quantization (e.g. q5_k_m, q8_0) or raise --max-ppl-increase.",
                    perplexity=result.perplexity, reference_perplexity=result.reference_perplexity,
                    size=result.size_bytes)
    except BaseException:
        _remove(out)
        raise
    return result


def _describe(out: Path, to: str, quant: str, seconds: float) -> ConversionReport:
    from .loader import inspect

    facts = inspect(out)
    params = facts.get("parameters") or 0
    size = _size(out)
    method = (facts.get("quantization_options") or {}).get("algo") if to == "onnx" else None
    return ConversionReport(output=str(out), format=to, quant=quant, architecture=str(facts.get("architecture")),
                            size_bytes=size, bits_per_weight=round(8 * size / params, 3) if params else None,
                            seconds=round(seconds, 2), method=method)


def _reference(staged: _Staged, to: str, out: Path, quant: str | None, report: Progress) -> tuple[str, float]:
    """Perplexity of the unquantized model: the source GGUF or the converter's 16-bit GGUF, or an fp32 ONNX export
    (temporary)."""
    if to == "gguf":
        report(f"measuring the reference ({staged.reference}) perplexity", 0.6)
        return (staged.reference, _perplexity(staged.path))
    if quant == "fp32":
        return ("fp32 (the output itself)", _perplexity(out))
    from .converters.onnx import convert_to_onnx

    report("exporting the fp32 reference", 0.6)
    with tempfile.TemporaryDirectory(prefix=".edgelm-ref-", dir=out.parent) as tmp:
        ref = convert_to_onnx(staged.path, Path(tmp) / "fp32", "fp32", allow_pickle=staged.allow_pickle)
        return (staged.reference, _perplexity(ref))


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


def _auto(staged: _Staged, to: str, out: Path, overwrite: bool, evaluate: bool, budget_ppl: float | None,
          budget_size: int | None, report: Progress, options: dict[str, Any]) -> ConversionReport:
    """Try quantizations smallest first; keep the first that meets every budget."""
    candidates = AUTO_GGUF if to == "gguf" else AUTO_ONNX
    reference = _reference(staged, to, out, None, report) if evaluate else None
    tried: list[dict[str, Any]] = []
    for quant in candidates:
        report(f"trying {quant}", 0.0)
        try:
            result = _one(staged, to, quant, out, True, evaluate, budget_ppl, budget_size, report, options, reference)
        except QualityBudgetError as exc:
            tried.append({"quant": quant, "kept": False, "reason": exc.message,
                          **{k: exc.details.get(k) for k in ("size", "perplexity") if k in exc.details}})
            continue
        tried.append({"quant": quant, "kept": True, "size_bytes": result.size_bytes,
                      "perplexity": result.perplexity})
        result.tried = tried
        return result
    raise QualityBudgetError(
        f"No quantization of {staged.source.name} meets the budget "
        f"({'max size ' + str(budget_size) + ' bytes' if budget_size else ''}"
        f"{', ' if budget_size and budget_ppl is not None else ''}"
        f"{'max perplexity increase ' + format(budget_ppl * 100, '.2f') + ' %' if budget_ppl is not None else ''}); "
        f"tried {', '.join(t['quant'] for t in tried)}.",
        fix="Loosen the budget, or use a smaller model.", tried=tried)
