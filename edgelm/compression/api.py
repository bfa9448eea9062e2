"""`edgelm.compress`: remove decoder blocks and MLP neurons from a Hugging Face checkpoint, heal, and measure.

Stages (each recorded in the work folder next to the output, so an interrupted run resumes where it stopped):

1. score every block on calibration text and choose which to remove (:mod:`.scoring`);
2. remove them and narrow the MLPs, healing in closed form (:mod:`.linear`);
3. distil from the original within the budget (:mod:`.distill`), checkpointing every few minutes;
4. write the checkpoint (a temporary folder, renamed into place), then measure: q8_0 GGUFs of the original, the
   pruned-but-not-healed model and the result, perplexity with llama.cpp and decode speed in child processes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypedDict

from edgelm.conversion import convert
from edgelm.converters.hf_gguf import find_converter
from edgelm.converters.source import read_checkpoint, resolve
from edgelm.declarations import check_names, from_dataclass, setting
from edgelm.errors import BackendNotInstalledError, InvalidParameterError, OutputExistsError, QualityBudgetError
from edgelm.measure import bench, evaluate

from . import calibration as calib
from .clock import now
from .distill import Budget, DistillSettings, DistillState, distill, parse_budget, trainable_parameters
from .families import Family, family_of
from .gguf_blocks import drop_blocks
from .linear import LinearPlan, linear_pass
from .report import CompressionReport
from .scoring import LayerScore, score_layers
from .surgery import (check_structure, count_parameters, drop_layers, load_model, max_window, prune_mlp,
                      save_checkpoint, source_dtype)
from .work import WorkDir, source_identity

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; type checkers ship typing_extensions

Progress = Callable[[str, float], None]
HEALS = ("none", "linear", "distill")
WIDTH_MULTIPLE = 32  # MLP width kept: a multiple of llama.cpp's q8_0/q4_0 block, so every type quantizes it


def _fraction(value: Any, name: str) -> float:
    """"25%" / 0.25 -> 0.25 (0 <= x < 1)."""
    try:
        text = str(value).strip()
        out = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except (TypeError, ValueError):
        out = -1.0
    if not 0 <= out < 1:
        raise InvalidParameterError(f"Invalid {name}: {value!r}.", fix='Use a percentage like "25%" or a fraction '
                                    "0.25, below 100 %.", parameter=name, value=value)
    return out


def _check_drop(drop: Sequence[int], n: int) -> list[int]:
    out = sorted({int(i) for i in drop})
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise InvalidParameterError(f"Layer {bad[0]} does not exist: the model has layers 0..{n - 1}.",
                                    fix=f"Pick blocks between 1 and {n - 2}.", parameter="drop_layers", value=bad[0])
    edge = [i for i in out if i in (0, n - 1)]
    if edge:
        raise InvalidParameterError(
            f"Layer {edge[0]} is the {'first' if edge[0] == 0 else 'last'} decoder block, which is never removed "
            "(it turns embeddings into the residual stream / the stream into next-token features; removing it "
            "breaks the model).", fix=f"Pick blocks between 1 and {n - 2}.", parameter="drop_layers", value=edge[0])
    return out


def _check_count(count: int, n: int) -> None:
    if count > n - 2:
        raise InvalidParameterError(
            f"Cannot remove {count} of {n} decoder blocks: the first and last are always kept"
            + (", so removing them all is impossible" if count >= n else "") + ".",
            fix=f"Remove at most {n - 2}.", parameter="drop_layers", value=count)


def read_per_token(model: Any) -> int:
    """Weights read from memory per generated token: every matrix but the input embedding's rows not looked up
    (a tied output head is read whole)."""
    emb = model.model.embed_tokens.weight
    tied = model.lm_head.weight is emb
    return count_parameters(model) - (0 if tied else emb.numel())


def estimate_speedup(model: Any, drop: Sequence[int], width: int | None) -> float:
    layers = model.model.layers
    before = read_per_token(model)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    mlp = layers[0].mlp
    full = mlp.down_proj.in_features
    mlp_params = sum(p.numel() for p in mlp.parameters())
    after_layer = per_layer - (mlp_params * (1 - (width or full) / full))
    kept = len(layers) - len(drop)
    after = before - len(layers) * per_layer + kept * after_layer
    return before / after


@dataclass
class _Options:
    """compress()'s arguments, checked and normalised."""

    src: str
    source: Path  # the resolved checkpoint folder
    config: dict[str, Any]
    family: Family
    out: Path
    drop_layers: int | list[int] | None
    target_speedup: float | None
    ppl_budget: float | None
    width_cut: float
    heal: str
    budget: Budget | None
    calibration: str | None  # None: the default text
    calibration_name: str
    eval_text: str | None
    eval_name: str | None
    resume: bool | None
    measure: bool
    curve: bool
    seed: int
    seq_len: int
    calibration_tokens: int
    fit_tokens: int
    distill: DistillSettings
    threads: int | None

    def settings(self) -> dict[str, Any]:
        """What decides the result (the work folder's key): not the budget, so more budget continues a run."""
        return {"source": source_identity(self.source), "drop_layers": self.drop_layers,
                "target_speedup": self.target_speedup, "max_ppl_increase": self.ppl_budget,
                "prune_mlp": self.width_cut, "heal": self.heal,
                "calibration": _text_digest(self.calibration if self.calibration is not None else "default"),
                "seed": self.seed, "seq_len": self.seq_len, "calibration_tokens": self.calibration_tokens,
                "fit_tokens": self.fit_tokens, "distill": {k: v for k, v in asdict(self.distill).items()
                                                           if k != "checkpoint_every"}, "version": 1}


@dataclass(frozen=True, kw_only=True)
class CompressOptions:
    """compress()'s options, each declared once: type, default, help and command-line flag (`edgelm compress`
    derives its flags from these fields; :class:`CompressKwargs` spells their names for editors)."""

    drop_layers: int | Sequence[int] | None = setting(
        None, "Decoder blocks to remove: a number (the best-scored are chosen) or indices like 12,14,17.",
        kind="ints", cli=("--drop-layers",), example=4)
    target_speedup: float | None = setting(
        None, "Remove the fewest blocks whose estimated decode speed-up reaches this, e.g. 1.2.", kind="float",
        cli=("--target-speedup",), example=1.2)
    max_ppl_increase: str | float | None = setting(
        None, 'Remove the most blocks within this estimated perplexity increase, e.g. "10%"; checked on the result '
        "(QualityBudgetError, exit code 7, nothing written, when over).", kind="str", cli=("--max-ppl-increase",),
        example="10%")
    prune_mlp: str | float | None = setting(
        None, 'Share of MLP neurons removed in every block, e.g. "25%".', kind="str", cli=("--prune-mlp",),
        example="25%")
    heal: str = setting(
        "distill", "none: just remove; linear: least-squares refit (seconds); distill: linear, then logit "
        "distillation from the original within --budget.", kind="choice", choices=HEALS, cli=("--heal",),
        example="linear")
    budget: str | float | Budget | None = setting(
        "30m", 'Time for the whole compression ("30m", "90s", "1.5h"), or distillation tokens ("200k", "1M").',
        kind="str", cli=("--budget",), example="200k")
    calibration: str | os.PathLike[str] | None = setting(
        None, "UTF-8 text like what the model will see, a file [default: Python's docstrings].", kind="path",
        cli=("--calibration",), example="calibration.txt")
    calibration_text: str | None = setting(
        None, "The calibration text itself instead of a file (library only).", kind="str", example="Some text.")
    eval_text: str | os.PathLike[str] | None = setting(
        None, "A UTF-8 text file scored besides the built-in text (use text not in --calibration).", kind="path",
        cli=("--eval-text",), example="notes.txt")
    overwrite: bool = setting(False, "Replace an existing output folder.", kind="bool", cli=("--overwrite",),
                              example=True)
    resume: bool | None = setting(
        None, "Continue an interrupted run: --resume (True) requires one, --no-resume (False) starts afresh "
        "[default: automatic, when its work folder has the same settings].", kind="bool",
        cli=("--resume/--no-resume",), example=False)
    revision: str | None = setting(None, "Hub revision when SRC is a Hub id.", kind="str", cli=("--revision",),
                                   example="main")
    measure: bool = setting(True, "Measure the result: q8_0 GGUFs' perplexity and speed (--no-eval skips them).",
                            kind="bool", cli=("--eval/--no-eval",), example=False)
    curve: bool = setting(False, "Also measure perplexity with 0..N blocks removed (the report's chart; on the "
                          "command line --plot FILE).", kind="bool", example=True)
    seed: int = setting(0, "Seed of the scoring windows and the distillation.", kind="int", cli=("--seed",),
                        example=1)
    seq_len: int = setting(512, "Tokens per calibration window.", kind="int", example=256)
    calibration_tokens: int = setting(120_000, "Calibration tokens used (the first ones of the text).", kind="int",
                                      example=20_000)
    fit_tokens: int = setting(16_384, "Calibration tokens of the least-squares fit.", kind="int", example=4096)
    distill_settings: DistillSettings | None = setting(
        None, "The distillation's settings [default: DistillSettings(seed=seed)].", kind="object",
        example=DistillSettings(seed=1))
    threads: int | None = setting(
        None, "CPU threads for torch and the llama.cpp measurements [default: the cores available].", kind="int",
        cli=("--threads",), example=2)


COMPRESS = from_dataclass(CompressOptions)


class CompressKwargs(TypedDict, total=False):
    """The keyword arguments of :func:`compress`: the fields of :class:`CompressOptions` (a test checks they match)."""

    drop_layers: int | Sequence[int] | None
    target_speedup: float | None
    max_ppl_increase: str | float | None
    prune_mlp: str | float | None
    heal: str
    budget: str | float | Budget | None
    calibration: str | os.PathLike[str] | None
    calibration_text: str | None
    eval_text: str | os.PathLike[str] | None
    overwrite: bool
    resume: bool | None
    revision: str | None
    measure: bool
    curve: bool
    seed: int
    seq_len: int
    calibration_tokens: int
    fit_tokens: int
    distill_settings: DistillSettings | None
    threads: int | None


def compress(src: str | os.PathLike[str], output: str | os.PathLike[str], *, progress: Progress | None = None,
             **options: Unpack[CompressKwargs]) -> CompressionReport:
    """Compress the Hugging Face checkpoint ``src`` (a folder or Hub id) into the folder ``output``.

    The options are the fields of :class:`CompressOptions` (an unknown name raises InvalidParameterError).
    What to remove - one of:
      drop_layers: a number of decoder blocks (the best-scored are chosen) or a list of block indices;
      target_speedup: remove the fewest blocks whose estimated decode speed-up reaches this (e.g. 1.2);
      max_ppl_increase: remove the most blocks whose estimated perplexity increase stays within this ("10%"),
        checked again on the result (QualityBudgetError, nothing written, when the result is over);
    and/or prune_mlp: the share of MLP neurons removed in every block ("25%").
    heal: "none" (just remove), "linear" (least squares, seconds to minutes), "distill" (linear, then logit
      distillation from the original within ``budget``: "30m", "90s" for the whole compression, or "200k"
      distillation tokens).
    calibration (a file) / calibration_text: text like what the model will see (default: Python's docstrings);
      the first calibration_tokens tokens are used, in windows of seq_len, fit_tokens of them for least squares.
    eval_text: a text file scored besides the built-in text.  measure=False skips the GGUF measurements.
    curve: also measure perplexity with 0..N blocks removed (for the report's chart).
    resume: None continues a matching interrupted run, True requires one, False starts afresh.
    threads: CPU threads for torch and for the llama.cpp measurements (default: each library's own choice).
    """
    check_names(COMPRESS, dict(options), "compress option")
    given = CompressOptions(**options)
    opts = _options(src, output, given)
    with _torch_threads(given.threads):
        return _Compression(opts, progress).run()


def _options(src: Any, output: Any, given: CompressOptions) -> _Options:
    """Check every argument before anything slow happens (loading, scoring)."""
    (drop_layers, target_speedup, max_ppl_increase, prune_mlp, heal, calibration, calibration_text, eval_text,
     measure) = (given.drop_layers, given.target_speedup, given.max_ppl_increase, given.prune_mlp, given.heal,
                 given.calibration, given.calibration_text, given.eval_text, given.measure)
    if heal not in HEALS:
        raise InvalidParameterError(f"Invalid heal {heal!r}.", fix="Use none, linear or distill.", parameter="heal",
                                    value=heal)
    modes = [name for name, value in (("drop_layers", drop_layers), ("target_speedup", target_speedup),
                                      ("max_ppl_increase", max_ppl_increase)) if value is not None]
    if len(modes) > 1:
        raise InvalidParameterError(f"{' and '.join(modes)} were both given; they are alternatives.",
                                    fix="Give one of --drop-layers, --target-speedup, --max-ppl-increase.",
                                    parameter=modes[1], value=None)
    width_cut = _fraction(prune_mlp, "prune_mlp") if prune_mlp is not None else 0.0
    if not modes and not width_cut:
        raise InvalidParameterError("Nothing to remove: give what to compress.",
                                    fix="Pass --drop-layers N, --target-speedup 1.2, --max-ppl-increase 10% and/or "
                                    "--prune-mlp 25%.", parameter="drop_layers", value=None)
    if target_speedup is not None and (isinstance(target_speedup, bool)
                                       or not isinstance(target_speedup, (int, float)) or target_speedup <= 1):
        raise InvalidParameterError(f"Invalid target_speedup {target_speedup!r}.",
                                    fix="Use a factor above 1, e.g. 1.2.", parameter="target_speedup",
                                    value=target_speedup)
    ppl_budget = _fraction(max_ppl_increase, "max_ppl_increase") if max_ppl_increase is not None else None
    if ppl_budget is not None and not measure:
        raise InvalidParameterError("max_ppl_increase needs the measurements, but measure=False.",
                                    fix="Drop --no-eval.", parameter="measure", value=False)
    if isinstance(drop_layers, bool) or (isinstance(drop_layers, int) and drop_layers < 0):
        raise InvalidParameterError(f"Invalid drop_layers {drop_layers!r}.", fix="Use a number of blocks >= 0 or a "
                                    "list of block indices.", parameter="drop_layers", value=drop_layers)
    if drop_layers is not None and not isinstance(drop_layers, int):
        drop_layers = sorted({int(i) for i in drop_layers})
    the_budget = parse_budget(given.budget) if heal == "distill" else None
    if heal == "distill" and the_budget is None:
        raise InvalidParameterError("heal='distill' needs a budget.", fix='Pass budget="30m" or "200k" (tokens).',
                                    parameter="budget", value=None)
    if calibration is not None and calibration_text is not None:
        raise InvalidParameterError("calibration and calibration_text were both given.", fix="Give one.",
                                    parameter="calibration_text", value=None)
    extra = calib.read_text(eval_text, "eval_text") if eval_text is not None else None
    cal = calibration_text if calibration_text is not None else (
        calib.read_text(calibration, "calibration") if calibration is not None else None)
    cal_name = Path(calibration).name if calibration is not None else (
        "calibration_text" if calibration_text is not None else "Python standard library docstrings")
    source = resolve(src, revision=given.revision)
    config = read_checkpoint(source, tokenizer_files=("tokenizer.json", "tokenizer.model", "vocab.json"),
                             tokenizer_why="the compressed model needs the tokenizer")
    family = family_of(config, str(src))
    n_layers = config.get("num_hidden_layers")
    if isinstance(n_layers, int) and drop_layers is not None:  # checked again on the loaded model
        if isinstance(drop_layers, list):
            _check_drop(drop_layers, n_layers)
        else:
            _check_count(drop_layers, n_layers)
    out = Path(output).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not given.overwrite:
            raise OutputExistsError(f"The output {out} already exists.", fix="Choose another folder or pass "
                                    "--overwrite.", path=str(out))
        if not out.is_dir():
            raise OutputExistsError(f"The output {out} is a file; compress writes a folder.",
                                    fix="Choose a folder path.", path=str(out))
    if measure:
        _need_converter()
    return _Options(src=str(src), source=source, config=config, family=family, out=out, drop_layers=drop_layers,
                    target_speedup=target_speedup, ppl_budget=ppl_budget, width_cut=width_cut, heal=heal,
                    budget=the_budget, calibration=cal, calibration_name=cal_name, eval_text=extra,
                    eval_name=Path(eval_text).name if eval_text is not None else None, resume=given.resume,
                    measure=measure, curve=given.curve, seed=given.seed, seq_len=given.seq_len,
                    calibration_tokens=given.calibration_tokens, fit_tokens=given.fit_tokens,
                    distill=given.distill_settings or DistillSettings(seed=given.seed), threads=given.threads)


class _Compression:
    """One compression run, stage by stage; each stage's result is recorded in the work folder."""

    def __init__(self, opts: _Options, progress: Progress | None) -> None:
        self.o = opts
        self.report = progress or (lambda message, fraction: None)
        self.t_start = now()

    def run(self) -> CompressionReport:
        import torch
        from transformers import AutoTokenizer

        o = self.o
        tokenizer = AutoTokenizer.from_pretrained(o.source)
        text = o.calibration if o.calibration is not None else calib.default_text()
        calib.check_length(tokenizer, text, o.calibration_name)  # before minutes of loading and scoring
        o.out.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(o.seed)
        self.work = WorkDir(o.out, o.settings())
        self.resumed = self.work.open(o.resume)
        self.seconds: dict[str, float] = dict((self.work.read("seconds.json") or {}) if self.resumed else {})
        self.clock = _Clock(self.seconds, self.work)
        self.earlier = sum(v for k, v in self.seconds.items() if k in ("scoring", "pruning"))  # earlier runs

        self.report("loading the model", 0.0)
        self.teacher = load_model(o.source)
        check_structure(self.teacher, o.src)
        self.n_layers = len(self.teacher.model.layers)
        self.full_width = self.teacher.model.layers[0].mlp.down_proj.in_features
        self.width = None
        if o.width_cut:
            kept = int(round(self.full_width * (1 - o.width_cut) / WIDTH_MULTIPLE)) * WIDTH_MULTIPLE
            self.width = min(self.full_width, max(WIDTH_MULTIPLE, kept))
        seq = min(o.seq_len, getattr(self.teacher.config, "max_position_embeddings", None) or o.seq_len,
                  max_window(self.teacher) or o.seq_len)
        self.windows = calib.windows(tokenizer, text, seq_len=seq, max_tokens=o.calibration_tokens,
                                     fit_tokens=o.fit_tokens, source=o.calibration_name)
        plan = self._plan()
        student, lin_state, latest = self._prune(plan["drop"])
        distilled = self._distill(student, latest) if o.heal == "distill" else None
        return self._finish(plan, student, lin_state, distilled)

    # --- 1. scores and choice -----------------------------------------------------------------------------

    def _plan(self) -> dict[str, Any]:
        o = self.o
        plan = self.work.read("plan.json") if self.resumed else None
        if plan is not None:
            return plan
        if isinstance(o.drop_layers, list):
            _check_drop(o.drop_layers, self.n_layers)
        with self.clock("scoring"):
            w = self.windows
            healed = o.heal != "none"
            given = isinstance(o.drop_layers, list) or not (o.drop_layers or o.target_speedup or o.ppl_budget)
            # blocks given (or none removed): nothing to choose, so only the cheap angular distances, for the report
            scores = score_layers(self.teacher, list(w.fit[:8].split(2)), list(w.score.split(1)),
                                  plain=not healed and not given, healed=healed and not given,
                                  progress=lambda m, f: self.report(m, 0.05 + 0.15 * f))
            drop, choice = _choose(scores, self.n_layers, o.drop_layers, o.target_speedup, o.ppl_budget, o.heal,
                                   self.teacher, self.width)
            _check_drop(drop, self.n_layers)
            plan = {"scores": [s.to_dict() for s in scores], "drop": drop, "choice": choice}
            self.work.write("plan.json", plan)
        return plan

    # --- 2. removal, with closed-form healing ---------------------------------------------------------------

    def _prune(self, drop: list[int]) -> tuple[Any, dict[str, Any], tuple[Path, dict[str, Any]] | None]:
        o = self.o
        student = copy.deepcopy(self.teacher)
        latest = self.work.latest() if self.resumed else None
        base = self.work.path / "linear"
        if latest is not None or (self.resumed and (base / "state.json").is_file()):
            _restore_structure(student, o.family, drop, self.width)
            _load_weights(student, latest[0] if latest else base)
            return student, self.work.read("linear.json") or {}, latest
        heal = o.heal != "none"
        if not heal and self.width is None:  # blocks removed, nothing refitted: no statistics to gather
            drop_layers_(student, o.family, drop)
            return student, {"kept_neurons": None, "layers": []}, None
        plan = LinearPlan(drop=drop, width=self.width, heal_depth=heal, compensate=heal)
        with self.clock("pruning"):
            stats = linear_pass(self.teacher, student, list(self.windows.fit.split(2)), plan,
                                progress=lambda m, f: self.report(f"pruning: {m}", 0.2 + 0.1 * f))
            drop_layers_(student, o.family, drop)
            lin_state = {"kept_neurons": stats.get("kept_neurons"), "layers": stats["layers"]}
            self.work.write("linear.json", lin_state)
            _save_weights_dir(self.work, "linear", student, {"stage": "linear"})
        return student, lin_state, None

    # --- 3. distillation ------------------------------------------------------------------------------------

    def _distill(self, student: Any, latest: tuple[Path, dict[str, Any]] | None) -> DistillState:
        import torch

        prior = opt_state = None
        if latest is not None and latest[1].get("stage") == "distill":
            prior = DistillState(**{k: v for k, v in latest[1].items() if k in DistillState.__dataclass_fields__})
            opt_state = torch.load(latest[0] / "optim.pt", weights_only=True)

        def save(st: DistillState, opt: Any) -> None:
            self.clock.flush()
            _save_weights_dir(self.work, f"distill-{st.steps:06d}", student, {"stage": "distill", **st.to_dict()},
                              optimizer=opt)

        # a time budget covers the whole compression: this run so far, and earlier runs before their
        # distillation (their distillation time is in the checkpoint's state)
        spent = self.earlier + (now() - self.t_start)
        with self.clock("healing"):
            return distill(self.teacher, student, self.windows.train, self.o.budget, settings=self.o.distill,
                           state=prior, optimizer_state=opt_state, spent_seconds=spent, save=save,
                           progress=lambda m, f: self.report(m, 0.3 + 0.5 * f))

    # --- 4. the output, and what it cost ---------------------------------------------------------------------

    def _finish(self, plan: dict[str, Any], student: Any, lin_state: dict[str, Any],
                distilled: DistillState | None) -> CompressionReport:
        o, drop = self.o, plan["drop"]
        result = CompressionReport(
            output=str(o.out), source=o.src, architecture=o.family.model_type, layers_before=self.n_layers,
            layers_after=self.n_layers - len(drop), dropped_layers=drop, mlp_width_before=self.full_width,
            mlp_width_after=self.width or self.full_width, parameters_before=count_parameters(self.teacher),
            parameters_after=count_parameters(student), heal=o.heal, choice=plan["choice"], scores=plan["scores"],
            estimated_speedup=round(estimate_speedup(self.teacher, drop, self.width), 3),
            budget=o.budget.describe() if o.budget else None,
            distillation=distilled.to_dict() if distilled else None, resumed=self.resumed,
            calibration=o.calibration_name, calibration_tokens=self.windows.tokens)
        provenance = {"source": o.src, "dropped_layers": drop, "mlp_width": self.width or self.full_width,
                      "original_layers": self.n_layers, "original_mlp_width": self.full_width, "heal": o.heal}
        tmp = Path(tempfile.mkdtemp(prefix=f".{o.out.name}.", suffix=".tmp", dir=o.out.parent))
        try:
            with self.clock("saving"):
                self.report("writing the checkpoint", 0.8)
                save_checkpoint(student, o.source, tmp, dtype=source_dtype(o.config), provenance=provenance)
            if o.measure:
                with self.clock("measuring"):
                    _measure(result, o, tmp, self.teacher, drop, self.width, lin_state, self.work,
                             lambda m, f: self.report(m, 0.85 + 0.15 * f))
                self._check_quality(result)
            if o.out.exists():
                shutil.rmtree(o.out)
            os.replace(tmp, o.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.work.remove()
        self.seconds["total"] = sum(v for k, v in self.seconds.items() if k != "total")
        result.seconds = {k: round(v, 1) for k, v in self.seconds.items()}
        self.report("done", 1.0)
        return result

    def _check_quality(self, result: CompressionReport) -> None:
        budget = self.o.ppl_budget
        ratio = result.ppl_ratio("built-in")
        if budget is None or ratio is None or ratio - 1 <= budget:
            return
        self.work.remove()  # the settings include the budget: a looser one starts afresh anyway
        n = len(result.dropped_layers)
        raise QualityBudgetError(
            f"Removing {n} blocks raised perplexity on the built-in text by {ratio - 1:.1%} (estimated from the "
            f"layer scores: within {budget:.1%}), over the budget; {self.o.out} was not written.",
            fix=f"Use --drop-layers {max(0, n - 1)}, or a looser --max-ppl-increase.", perplexity=result.perplexity)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads for the compression, restored after (a library call leaves global state as it was)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


drop_layers_ = drop_layers  # the module function; ``drop_layers`` is also compress()'s parameter name


def _text_digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Clock:
    """Seconds per stage, added to those of earlier (interrupted) runs and saved in the work folder."""

    def __init__(self, seconds: dict[str, float], work: WorkDir) -> None:
        self.seconds, self.work = seconds, work
        self._stage: str | None = None
        self._t0 = 0.0

    def __call__(self, stage: str) -> "_Clock":
        self._stage = stage
        return self

    def __enter__(self) -> "_Clock":
        self._t0 = now()
        return self

    def flush(self) -> None:
        if self._stage:
            t = now()
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + t - self._t0
            self._t0 = t
            if self.work.path.is_dir():
                self.work.write("seconds.json", self.seconds)

    def __exit__(self, *exc: Any) -> None:
        self.flush()
        self._stage = None


def _need_converter() -> None:
    if find_converter() is None:
        raise BackendNotInstalledError("Measuring the result needs llama.cpp's Hugging Face -> GGUF converter, which "
                                       "is not installed.", fix="Run `edgelm install-converter` once, or pass "
                                       "--no-eval (measure=False) to skip the measurements.")


def _choose(scores: list[LayerScore], n: int, drop_layers: Any, target_speedup: float | None,
            ppl_budget: float | None, heal: str, model: Any, width: int | None) -> tuple[list[int], str]:
    key = "kl_healed" if heal != "none" else "kl"
    if (drop_layers is None and target_speedup is None and ppl_budget is None) or drop_layers == 0:
        return [], "no blocks removed"
    if drop_layers is not None and not isinstance(drop_layers, int):
        return sorted(int(i) for i in drop_layers), "given"
    ranked = sorted(scores, key=lambda s: getattr(s, key))
    if isinstance(drop_layers, int):
        _check_count(drop_layers, n)
        return sorted(s.layer for s in ranked[:drop_layers]), f"the {drop_layers} lowest {key.replace('_', ' ')}"
    if target_speedup is not None:
        for k in range(0, n - 1):
            chosen = [s.layer for s in ranked[:k]]
            if estimate_speedup(model, chosen, width) >= target_speedup:
                return sorted(chosen), (f"fewest blocks (lowest {key.replace('_', ' ')} first) for an estimated "
                                        f"{target_speedup:.2f}x")
        raise InvalidParameterError(f"No choice of blocks reaches an estimated {target_speedup:.2f}x decode speed.",
                                    fix="Ask for less, or add --prune-mlp.", parameter="target_speedup",
                                    value=target_speedup)
    limit = math.log1p(ppl_budget)
    total, chosen = 0.0, []
    for s in ranked:
        cost = max(0.0, s.ce_increase or 0.0)
        if total + cost > limit:
            break
        total += cost
        chosen.append(s.layer)
    return sorted(chosen), (f"most blocks whose summed cross-entropy increase ({total:.3f} nats) stays within "
                            f"log(1 + {ppl_budget:.0%})")


def _restore_structure(student: Any, family: Family, drop: list[int], width: int | None) -> None:
    import torch

    drop_layers_(student, family, drop)
    if width is not None:
        prune_mlp(student, [torch.arange(width) for _ in student.model.layers])


def _save_weights_dir(work: WorkDir, name: str, student: Any, state: dict[str, Any], optimizer: Any = None) -> None:
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        tensors = {k: v.detach().contiguous() for k, v in trainable_parameters(student).items()}
        save_file(tensors, str(folder / "student.safetensors"))
        if optimizer is not None:
            import torch

            torch.save(optimizer.state_dict(), folder / "optim.pt")

    if name == "linear":  # the base every later stage starts from: kept apart from the distillation checkpoints
        import json

        target = work.path / "linear"
        tmp = Path(tempfile.mkdtemp(prefix=".linear.", dir=work.path))
        write(tmp)
        (tmp / "state.json").write_text(json.dumps(state))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return
    work.checkpoint(name, write, state)


def _load_weights(student: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "student.safetensors"))
    params = trainable_parameters(student)
    missing = set(params) - set(tensors)
    if missing:
        raise InvalidParameterError(f"The checkpoint in {folder} does not match the model ({sorted(missing)[0]} "
                                    "missing).", fix="Start afresh with resume=False (--no-resume).",
                                    parameter="resume", value=str(folder))
    for name, p in params.items():
        p.data = tensors[name].to(p.dtype).contiguous()


def _measure(result: CompressionReport, o: _Options, compressed: Path, teacher: Any, drop: list[int],
             width: int | None, lin_state: dict[str, Any], work: WorkDir, report: Progress) -> None:
    """q8_0 GGUFs of the original, the pruned-not-healed model and the result: perplexity (llama.cpp) on the
    built-in text and the eval text, decode tokens/s each in its own process; with ``o.curve``, perplexity with
    the best-scored 0..N blocks removed (no healing, full MLP width)."""
    load = {"threads": o.threads} if o.threads else {}
    source, family, scores = o.source, o.family, result.scores
    folder = Path(tempfile.mkdtemp(prefix=".measure.", dir=work.path))
    try:
        def gguf(checkpoint: Path, name: str) -> Path:
            path = folder / f"{name}-q8_0.gguf"
            convert(str(checkpoint), to="gguf", quant="q8_0", output=str(path), eval=False)
            return path

        def plain(name: str, blocks: list[int], kept: list[list[int]] | None) -> Path:
            import torch

            model = copy.deepcopy(teacher)
            drop_layers_(model, family, blocks)
            if kept:
                prune_mlp(model, [torch.tensor(k) for k in kept])
            ckpt = folder / name
            ckpt.mkdir()
            save_checkpoint(model, source, ckpt, dtype=None, provenance={"dropped_layers": blocks})
            del model
            path = gguf(ckpt, name)
            shutil.rmtree(ckpt)
            return path

        def cut(name: str, blocks: list[int]) -> Path:  # blocks removed, nothing else: cut from the original's GGUF
            return drop_blocks(models["original"], folder / f"{name}-q8_0.gguf", blocks)

        report("converting the original to q8_0", 0.0)
        models = {"original": gguf(source, "original"), "compressed": gguf(compressed, "compressed")}
        if result.heal != "none":
            report("building the pruned, not healed model", 0.15)
            kept = lin_state.get("kept_neurons")
            models["pruned"] = plain("pruned", drop, kept) if kept else cut("pruned", drop)
        texts: dict[str, str | None] = {"built-in": None}
        if o.eval_text is not None:
            texts[o.eval_name or "eval text"] = o.eval_text
        for t, (label, text) in enumerate(texts.items()):
            row = {}
            for name, path in models.items():
                report(f"perplexity of the {name} model on the {label} text", 0.3 + 0.3 * t / len(texts))
                row[name] = round(evaluate(str(path), text=text, **load)[0].perplexity, 4)
            if "pruned" not in row:
                row["pruned"] = row["compressed"]
            result.perplexity[label] = row
        report("decode speed (each model in its own process)", 0.6)
        runs = bench([str(models["original"]), str(models["compressed"])] * 2, runs=3, prompt_tokens=64,
                     gen_tokens=64, n_ctx=512, **load)
        import statistics

        result.tokens_per_second = {
            "original": round(statistics.median([runs[0].tokens_per_second, runs[2].tokens_per_second]), 1),
            "compressed": round(statistics.median([runs[1].tokens_per_second, runs[3].tokens_per_second]), 1)}
        result.gguf_q8_0_bytes = {"original": models["original"].stat().st_size,
                                  "compressed": models["compressed"].stat().st_size}
        if o.curve:
            ranked = sorted(scores, key=lambda s: s["kl_healed"] if s.get("kl_healed") is not None else s["kl"])
            order = [s["layer"] for s in ranked if s["layer"] in drop]
            order += [i for i in drop if i not in order]
            points = [{"layers_removed": 0, "perplexity": result.perplexity["built-in"]["original"]}]
            for k in range(1, len(order) + 1):
                report(f"curve: {k} blocks removed", 0.75 + 0.25 * k / len(order))
                path = cut(f"curve-{k}", sorted(order[:k]))
                ppl = evaluate(str(path), **load)[0].perplexity
                points.append({"layers_removed": k, "perplexity": round(ppl, 4)})
                path.unlink()
            result.curve = points
    finally:
        shutil.rmtree(folder, ignore_errors=True)
