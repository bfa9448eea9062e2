"""`edgelm.convert`: write a GGUF or ONNX model and measure what the conversion cost in quality.

Every conversion (unless eval=False) scores the output and an unquantized reference on the built-in evaluation
text, and runs a short generation in a child process for decode speed and peak memory.  Budgets
(max_ppl_increase, max_size) turn a conversion that loses too much into an error with no output left behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypedDict

from .converters import TARGETS, option_record
from .converters import target as find_target
from .converters.source import resolve
from .declarations import Setting, from_dataclass, setting
from .errors import ConversionError, EdgelmError, InvalidParameterError, OutputExistsError, QualityBudgetError
from .formats import disk_size
from .loader import inspect, load
from .measure import bench, evaluate, step_seconds, streams_per_second
from .runtimes import detect_backend
from .store import record_output, remove_stale

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; type checkers ship typing_extensions

Progress = Callable[[str, float], None]


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


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """convert()'s own options, each declared once (type, default, help, flag); `edgelm convert` derives its flags
    from them.  The target's options (threads, algo, ...) are declared on its record (``target(to).options``)."""

    to: str = setting("gguf", "The format written.", kind="choice", choices=tuple(TARGETS), cli=("--to",),
                      example="onnx")
    quant: str = setting(
        "q4_k_m", "GGUF: any llama.cpp type (q8_0, q6_k, q5_k_m, q4_k_m, q4_0, f16, ...); ONNX: int4, int8, fp16, "
        "fp32; or auto (with --max-size / --max-ppl-increase).", kind="str", cli=("-q", "--quant"), example="q8_0")
    output: str | os.PathLike[str] | None = setting(
        None, "Output .gguf file, or folder for ONNX.", kind="path", cli=("-o", "--output"), example="out.gguf")
    overwrite: bool = setting(False, "Replace an existing output.", kind="bool", cli=("--overwrite",), example=True)
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) when SRC is a Hub id.", kind="str",
                                   cli=("--revision",), example="main")
    eval: bool = setting(True, "Measure the output's quality and speed (--no-eval skips it).", kind="bool",
                         cli=("--eval/--no-eval",), example=False)
    max_ppl_increase: str | float | None = setting(
        None, 'Fail (and keep no output) when perplexity rises more than this, e.g. "5%".', kind="str",
        cli=("--max-ppl-increase",), example="5%")
    max_size: str | int | None = setting(
        None, 'Largest acceptable output, e.g. "120MB" (with --quant auto).', kind="str", cli=("--max-size",),
        example="120MB")
    parallel: int = setting(
        1, "Streams the model will serve at once. With --quant auto and N > 1 (GGUF), of the quantizations within the "
        "budgets keep the one that serves N streams the most tokens per second on this CPU (each measured: llama.cpp "
        "repacks some types for batched kernels).", kind="int", cli=("--parallel",), example=4)
    allow_pickle: bool = setting(
        False, "Accept *.bin pickle weights. They can run code when loaded: only for sources you trust.",
        kind="bool", cli=("--allow-pickle",), example=True)


CONVERT = from_dataclass(ConvertOptions)

# the target options `edgelm convert` has flags for; their defaults are the target's (GGUFOptions, OnnxOptions),
# so none is given here: a flag left out leaves the target's default
TARGET_FLAGS = (
    Setting("threads", "int", None, "GGUF: threads for llama.cpp's quantizer [default: all cores].",
            cli=("--threads",), example=2),
    Setting("algo", "str", None, "ONNX int4/int8: how weights are rounded: gptq (int4, calibrated: better quality at "
            "the same speed, slower to convert), default (round to nearest), k_quant, k_quant_mixed [default: gptq "
            "for int4 when the fp32 model fits easily in memory, else round to nearest].", cli=("--algo",),
            example="gptq"),
    Setting("calibration", "path", None, "ONNX --algo gptq: a UTF-8 text file like what the model will see "
            "[default: Python's docstrings].", cli=("--calibration",), example="calibration.txt"),
    Setting("mixed_precision", "bool", None, "ONNX int4 with GPTQ: keep the input embedding and the late MLP down "
            "projections at 8 bits (better on text unlike the calibration: SmolLM2 1.16x -> 1.11x fp32 perplexity "
            "on licence prose; larger: 128 vs 92 MB) [default: off].", cli=("--mixed-precision",), example=True),
    Setting("exporter", "choice", None, "ONNX: who writes the graph: genai (onnxruntime-genai's builder), optimum "
            "(optimum-onnx, for GPT-2, GPT-NeoX, OPT, BLOOM, Falcon, ...: `edgelm install-converter --optimum` "
            "once) [default: auto, the builder where it supports the architecture, optimum otherwise].",
            choices=("auto", "genai", "optimum"), cli=("--exporter",), example="optimum"),
)


class ConvertKwargs(TypedDict, total=False):
    """The keyword arguments of :func:`convert`: :class:`ConvertOptions`' fields, then the targets' options
    (GGUFOptions, OnnxOptions); a test checks they match."""

    to: str
    quant: str
    output: str | os.PathLike[str] | None
    overwrite: bool
    revision: str | None
    eval: bool
    max_ppl_increase: str | float | None
    max_size: str | int | None
    parallel: int
    allow_pickle: bool
    # GGUF and ONNX
    threads: int | None
    timeout: float | None
    # ONNX
    block_size: int
    symmetric: bool
    accuracy_level: int
    algo: str
    calibration: str | None
    mixed_precision: bool
    execution_provider: str
    builder_options: dict[str, Any] | None
    exporter: str


def convert(src: str | os.PathLike[str], *, progress: Progress | None = None,
            **options: Unpack[ConvertKwargs]) -> ConversionReport:
    """Convert ``src`` (a Hugging Face folder or Hub id; for GGUF output also a .gguf to re-quantize).

    The options are :class:`ConvertOptions`' fields and the target's.
    to: "gguf" or "onnx" (edgelm.converters.TARGETS).  quant: a llama.cpp type (q4_k_m, q8_0, f16, ...) or
    int4/int8/fp16/fp32 for ONNX, or "auto" to keep the smallest that meets ``max_size`` / ``max_ppl_increase``.
    The target's options: GGUF: threads, timeout; ONNX: see ``edgelm.converters.target("onnx").options``
    (an unknown name raises InvalidParameterError naming the valid ones).

    A Hugging Face checkpoint becomes GGUF in two steps: llama.cpp's converter writes a 16-bit GGUF (bf16 for bf16
    checkpoints, f16 otherwise; f32/bf16 when asked for), then llama.cpp's quantizer writes ``quant`` from it; that
    16-bit file is the reference the quality report compares against, and is removed at the end.
    allow_pickle: accept *.bin pickle weights (they can run code when loaded).
    """
    own = {s.name for s in CONVERT}
    given = ConvertOptions(**{k: v for k, v in options.items() if k in own})
    target_options = {k: v for k, v in options.items() if k not in own}
    to, quant, output, eval = given.to, given.quant, given.output, given.eval
    target = find_target(to)
    budget_ppl = parse_fraction(given.max_ppl_increase)
    budget_size = parse_size(given.max_size)
    if budget_ppl is not None and not eval:
        raise InvalidParameterError("max_ppl_increase needs the quality evaluation, but eval=False.",
                                    fix="Drop --no-eval.", parameter="eval", value=False)
    opts = option_record(target.options, target_options, f"{target.name.upper()} conversion")
    quant = str(quant).lower()
    if quant == "auto" and budget_ppl is None and budget_size is None:
        raise InvalidParameterError('quant="auto" needs a budget.', fix="Add max_size and/or max_ppl_increase.",
                                    parameter="quant", value="auto")
    if not isinstance(given.parallel, int) or given.parallel < 1:
        raise InvalidParameterError(f"Invalid parallel: {given.parallel!r}.", fix="Pass an integer >= 1.",
                                    parameter="parallel", value=given.parallel)
    if given.parallel > 1 and (quant != "auto" or target.name != "gguf"):
        raise InvalidParameterError(
            f"parallel={given.parallel} chooses among quantizations, so it needs quant='auto' and to='gguf' "
            f"(got quant={quant!r}, to={target.name!r}).", fix="Add --quant auto and a budget (--max-ppl-increase "
            "10%), or drop --parallel.", parameter="parallel", value=given.parallel)
    if quant != "auto":
        quant = target.check_quant(quant)  # an unknown type is refused before minutes of conversion
    source = resolve(src, revision=given.revision)
    if output is None:
        raise InvalidParameterError("No output path given.", fix="Pass output= (-o on the command line).",
                                    parameter="output", value=None)
    out = Path(output).expanduser()
    if out.exists() and not given.overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise OutputExistsError(f"The output {out} already exists.", fix="Choose another path or pass --overwrite.",
                                path=str(out))
    if out.parent.is_dir():
        remove_stale(out.parent)  # what a killed conversion left there (hidden temporary files and folders)
    job = _Job(target, opts, out, given.overwrite, eval, budget_ppl, budget_size,
               progress or (lambda message, fraction: None), parallel=given.parallel)
    name = source.name if Path(src).expanduser().exists() else str(src)  # a Hub id, not its snapshot hash
    with target.stage(source, name, quant, out, opts, allow_pickle=given.allow_pickle, progress=job.report) as staged:
        job.staged = staged
        result = job.auto() if quant == "auto" else job.one(quant)
    record_output(out)  # `edgelm list` shows it
    return result


@dataclass
class _Job:
    """One conversion: the target, its options and budgets, and what was staged."""

    target: Any
    options: Any
    out: Path
    overwrite: bool
    evaluate: bool
    budget_ppl: float | None
    budget_size: int | None
    report: Progress
    staged: Any = None
    parallel: int = 1  # > 1: auto keeps the quantization that serves this many streams fastest

    def one(self, quant: str, overwrite: bool | None = None, reference: tuple[str, float] | None = None
            ) -> ConversionReport:
        t0 = time.perf_counter()
        self.target.write(self.staged, quant, self.out, self.options,
                          overwrite=self.overwrite if overwrite is None else overwrite, progress=self.report,
                          verify=check_runs)
        seconds = time.perf_counter() - t0 + self.staged.seconds
        try:
            result = self._describe(quant, seconds)
            if self.budget_size is not None and result.size_bytes > self.budget_size:
                raise QualityBudgetError(f"{self.out.name} is {result.size_bytes / 1e6:.1f} MB, over max_size "
                                         f"{self.budget_size / 1e6:.1f} MB.", fix="Use a smaller quantization.",
                                         size=result.size_bytes)
            if self.evaluate:
                _measure(result, reference or self.reference(quant), self.report)
                if self.budget_ppl is not None and result.ppl_increase > self.budget_ppl:
                    raise QualityBudgetError(
                        f"{quant.upper()} raised perplexity by {result.ppl_increase * 100:.2f} % "
                        f"({result.perplexity:.3f} vs {result.reference_perplexity:.3f} for {result.reference}), over "
                        f"the budget of {self.budget_ppl * 100:.2f} %; {self.out} was not kept.",
                        fix="Use a larger quantization (e.g. q5_k_m, q8_0) or raise --max-ppl-increase.",
                        perplexity=result.perplexity, reference_perplexity=result.reference_perplexity,
                        size=result.size_bytes)
        except BaseException:
            _remove(self.out)
            raise
        return result

    def _describe(self, quant: str, seconds: float) -> ConversionReport:
        facts = inspect(self.out)
        params = facts.get("parameters") or 0
        size = disk_size(self.out)
        return ConversionReport(output=str(self.out), format=self.target.name, quant=quant,
                                architecture=str(facts.get("architecture")), size_bytes=size,
                                bits_per_weight=round(8 * size / params, 3) if params else None,
                                seconds=round(seconds, 2), method=self.target.method(self.out),
                                conversion_peak_rss=self.staged.peak_rss)

    def reference(self, quant: str | None) -> tuple[str, float]:
        """Perplexity of the target's unquantized reference of the same source."""
        self.report(f"measuring the reference ({self.staged.reference}) perplexity", 0.6)
        with self.target.reference(self.staged, self.out, quant) as path:
            label = f"{quant} (the output itself)" if path == self.out else self.staged.reference
            return label, _perplexity(path)

    def auto(self) -> ConversionReport:
        """Try quantizations smallest first; keep the first that meets every budget, or with ``parallel`` > 1 the
        one of those that serves ``parallel`` streams the most tokens per second here (each measured)."""
        reference = self.reference(None) if self.evaluate else None
        tried: list[dict[str, Any]] = []
        final, best, best_speed = self.out, None, 0.0
        # with parallel > 1 the candidates are written to a hidden folder beside the output, which a killed run
        # leaves for remove_stale (edgelm.store) to find; it goes at the end either way
        candidates = final.with_name(f".{final.name}.{secrets.token_hex(4)}.convert")
        try:
            for quant in self.target.auto_quants:
                self.report(f"trying {quant}", 0.0)
                if self.parallel > 1:
                    candidates.mkdir(exist_ok=True)
                    self.out = candidates / f"{quant}{final.suffix}"
                try:
                    result = self.one(quant, overwrite=True, reference=reference)
                except QualityBudgetError as exc:
                    tried.append({"quant": quant, "kept": False, "reason": exc.message,
                                  **{k: exc.details.get(k) for k in ("size", "perplexity") if k in exc.details}})
                    continue
                row = {"quant": quant, "kept": True, "size_bytes": result.size_bytes, "perplexity": result.perplexity}
                tried.append(row)
                if self.parallel == 1:
                    result.tried = tried
                    return result
                self.report(f"timing a {self.parallel}-token step of {quant}", 0.9)
                speed = streams_per_second(step_seconds(self.out, (1, self.parallel),
                                                        threads=getattr(self.options, "threads", None)),
                                           self.parallel)
                row["tokens_per_second"] = round(speed, 1)
                if best is None or speed > best_speed:
                    if best is not None:
                        _remove(Path(best.output))
                    best, best_speed = result, speed
                else:
                    _remove(self.out)
            if best is not None:
                for row in tried:
                    if "tokens_per_second" in row:
                        row["kept"] = row["quant"] == best.quant
                        row.setdefault("reason", f"slower to {self.parallel} streams")
                _remove(final)  # overwrite was checked before the conversion began
                os.replace(best.output, final)
                best.output, best.tried = str(final), tried
                return best
        finally:
            self.out = final
            _remove(candidates)
        b_size, b_ppl = self.budget_size, self.budget_ppl
        raise QualityBudgetError(
            f"No quantization of {self.staged.source.name} meets the budget "
            f"({'max size ' + str(b_size) + ' bytes' if b_size else ''}"
            f"{', ' if b_size and b_ppl is not None else ''}"
            f"{'max perplexity increase ' + format(b_ppl * 100, '.2f') + ' %' if b_ppl is not None else ''}); "
            f"tried {', '.join(t['quant'] for t in tried)}.",
            fix="Loosen the budget, or use a smaller model.", tried=tried)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _perplexity(path: Path) -> float:
    return evaluate(str(path))[0].perplexity


def _measure(result: ConversionReport, reference: tuple[str, float], report: Progress) -> None:
    report("measuring perplexity, speed and memory", 0.8)
    result.reference, result.reference_perplexity = reference
    result.perplexity = _perplexity(Path(result.output))
    run = bench([result.output], runs=1, prompt_tokens=64, gen_tokens=32, n_ctx=512)[0]
    result.tokens_per_second = round(run.tokens_per_second, 1)
    result.peak_rss = run.peak_rss


# what to do when a freshly written model does not run, by the backend that runs it
_NOT_RUNNING_FIX = {
    "llamacpp": "The converter may know an architecture or tokenizer this llama.cpp does not: upgrade llama-cpp-python "
                '(pip install -U "edgelm[llamacpp]"), or install the converter version edgelm is tested with '
                "(`edgelm install-converter --force`).",
    "onnxruntime": 'Upgrade onnxruntime (pip install -U "edgelm[onnx]"), try another quantization, or convert to GGUF.',
}


def check_runs(path: Path, timeout: float = 300) -> None:
    """Load the model at ``path`` (a temporary output) and decode a few tokens in a child process (llama.cpp aborts
    the process on some bad files).  A model this machine's runtime cannot load or run is a ConversionError that
    says why; the caller then removes it."""
    code = "from edgelm.conversion import _check_child; _check_child()"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"Loading the converted {path.name} did not finish in {timeout:.0f} s.",
                              fix="Check the file with `edgelm info`.") from exc
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    result = json.loads(last[0]) if last and last[0].startswith("{") else {}
    if proc.returncode == 0 and result.get("ok"):
        return
    facts = inspect(path)
    backend = detect_backend(path) or "?"
    why = result.get("error") or (f"the process died with signal {-proc.returncode}" if proc.returncode < 0 else
                                  " | ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit {proc.returncode}")
    raise ConversionError(
        f"The converted model ({facts.get('architecture')}, {facts.get('quantization')}) does not run on this "
        f"machine's {backend} backend: {why}",
        fix=_NOT_RUNNING_FIX.get(backend, "Convert it again, or to another format."),
        architecture=facts.get("architecture"))


def _check_child() -> None:
    try:
        with load(sys.argv[1], n_ctx=64, threads=1) as model:
            model.generate("Hello", max_tokens=2, temperature=0)
    except EdgelmError as exc:
        print(json.dumps({"ok": False, "error": exc.message}))
        sys.exit(1)
    print(json.dumps({"ok": True}))
