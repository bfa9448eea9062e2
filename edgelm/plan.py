"""A deployment plan for a model on a device, from the model's header and the device's facts (`edgelm.recommend`).

The model is a GGUF file, an ONNX model folder, or a Hugging Face checkpoint folder (or facts already read, e.g.
from the Hub by :mod:`edgelm.hub.checkpoint`): only headers are read (GGUF metadata, edgelm.json /
genai_config.json, config.json and safetensors headers), never the weights.  For a checkpoint the plan lists every
quantization it could be converted to, with its size, memory, fit and speed, and recommends one with the `edgelm
convert` command that makes it.

This module neither loads models nor resolves names, so the Hub's file choice can plan with it:
:mod:`edgelm.planning` turns the default model and Hub names into facts (through :mod:`edgelm.sources`), then plans here
(``edgelm.recommend`` is :func:`edgelm.planning.recommend`).

Memory = weights + KV cache at the planned n_ctx + runtime overhead (compute buffers, logits, the runtime itself),
and it must fit the device's usable memory with head-room.  Decode speed is estimated from what one token costs:
every weight byte (and the KV cache so far) is read once per token, and every weight is multiplied once (2 FLOPs),
so a token takes max(bytes / memory bandwidth, 2 x parameters / compute) plus a fixed per-token overhead; compute
is the CPU's SIMD level x threads (``edgelm.platforms.profiles.DECODE_GFLOPS_PER_CORE``), which is what binds on
CPUs without AVX2.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .declarations import from_dataclass, setting
from .errors import DoesNotFitError, ModelNotFoundError, UnsupportedModelError
from .formats import hf, onnx_folder, static_pair
from .formats.gguf import AttentionShape, estimate_file_bytes, file_type_bpw, is_gguf, read_header
from .platforms import detect
from .platforms.profiles import DECODE_GFLOPS_PER_CORE, SIMD_TITLES, resolve, this_machine
from .units import human_bytes

MB = 1024**2
HEADROOM = 0.85  # a plan may use at most this share of the device's usable memory
PER_TOKEN_OVERHEAD_S = 0.0015  # sampling, Python and thread sync per token, measured on llama.cpp here
RUNTIME_BASE_BYTES = 60 * MB  # the Python process with llama.cpp loaded, before the model

# GGUF quantizations a plan may propose (their bits per weight: edgelm.formats.gguf.FILE_TYPE_BPW)
PLAN_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
# ONNX quantizations listed for a checkpoint (their bytes per parameter: edgelm.formats.onnx_folder)
PLAN_ONNX_QUANTS = ("int8", "int4")
# Which GGUF quantization a checkpoint plan recommends: the highest-quality one that fits, but no larger than this.
# Small models lose the most to 4-bit weights (SmolLM2-135M: Q8_0 +0.5 % perplexity, Q4_K_M +8.7 %, see FACTS),
# so below SMALL_MODEL_PARAMETERS the cap is Q8_0; above it Q4_K_M, the usual choice (larger ones cost speed for
# little quality).  F16 is listed for reference, never recommended.
SMALL_MODEL_PARAMETERS = 2_000_000_000
RECOMMEND_CAP = {"small": "Q8_0", "large": "Q4_K_M"}
# the quality budget within which a model for several streams is converted to its fastest quantization (measured on
# the CPU that will serve it: llama.cpp's batched kernels differ by weight type); `edgelm serve --parallel N
# CHECKPOINT` (edgelm.autoconvert) converts with it, and a plan for parallel > 1 names that conversion
PARALLEL_PPL_BUDGET = "10%"
# ... and a context of at least this many tokens (or the wanted n_ctx, if smaller) comes before quality: a Pi Zero
# 2 W fits SmolLM2-135M at Q8_0 only with n_ctx 512, at Q4_K_M with 2048.
RECOMMEND_MIN_CTX = 2048


@dataclass(frozen=True)
class ModelFacts:
    path: str
    format: str  # gguf | onnx | hf (a Hugging Face checkpoint)
    architecture: str
    quantization: str  # a GGUF file type, an ONNX quantization (int4 ...), or a checkpoint's dtype (BF16 ...)
    parameters: int
    weight_bytes: int
    shape: AttentionShape
    context_length: int
    source: str | None = None  # the name it was given by (a Hub id), for the convert command

    def kv_bytes(self, n_ctx: int, kv: str = "f16") -> int:
        return self.shape.kv_bytes(n_ctx, kv)


@dataclass
class Plan:
    model: str
    device: str
    device_title: str
    backend: str
    format: str
    quant: str
    n_ctx: int
    threads: int
    n_gpu_layers: int
    kv_cache: str
    memory_bytes: int
    memory_breakdown: dict[str, int]
    device_memory_bytes: int  # usable memory on the device (RAM minus what the OS keeps)
    tokens_per_second: float
    bound_by: str  # "memory bandwidth" | "compute"
    needs_conversion: bool
    convert_command: str | None = None
    notes: list[str] = field(default_factory=list)
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    parallel: int = 1  # sequences at the same time, each with n_ctx tokens of KV cache
    source_format: str = "gguf"  # what the model given is: gguf | onnx | hf
    simd: str | None = None  # the device CPU's SIMD level (edgelm.platforms.profiles.simd_level)
    # for a checkpoint: one row per quantization it could be converted to (see quantization_rows)
    quantizations: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_kwargs(self) -> dict[str, Any]:
        """Arguments for :func:`edgelm.load` that follow this plan."""
        if self.backend == "onnxruntime":
            return {"backend": self.backend, "n_ctx": self.n_ctx, "threads": self.threads}
        return {"backend": self.backend, "n_ctx": self.n_ctx, "threads": self.threads,
                "n_gpu_layers": self.n_gpu_layers, "kv_cache": self.kv_cache, "parallel": self.parallel}


# --- facts from headers -----------------------------------------------------------------------------------

def file_facts(model: str | os.PathLike[str], *, source: str | None = None) -> ModelFacts:
    """Read what a plan needs from a model on disk, without loading it: a GGUF file, an ONNX folder, or a Hugging Face
    checkpoint folder (config.json + *.safetensors; its config.json names it too).  ``source``: the name it was given
    by (a Hub id), for the convert command.  Names (the default model, ORG/REPO) are :mod:`edgelm.planning`' job."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"Model not found: {path} does not exist.",
            fix="Check the path; to plan the default model or a Hub name (ORG/REPO[:QUANT]) use edgelm.recommend.",
            path=str(path))
    if path.is_file() and path.name == hf.CONFIG:
        path = path.parent
    if path.is_file() and is_gguf(path):
        h = read_header(path)
        return ModelFacts(
            path=str(path), format="gguf", architecture=h.architecture, quantization=h.quantization,
            parameters=h.parameters, weight_bytes=h.weight_bytes, shape=h.attention_shape(),
            context_length=h.context_length or 2048, source=source,
        )
    if onnx_folder.is_onnx_folder(path):
        return _onnx_facts(onnx_folder.folder_of(path), source)
    if path.is_dir() and hf.is_checkpoint(path):
        return checkpoint_facts(path, source=source)
    raise _not_a_model(path)


def _not_a_model(path: Path) -> UnsupportedModelError:
    what = "a file" if path.is_file() else "a folder"
    why = ""
    if path.is_dir() and (path / hf.CONFIG).is_file():
        why = " It has config.json but no *.safetensors weights (pickle *.bin files are not read to plan)."
    elif path.is_dir() and any(path.glob("*.safetensors")):
        why = " It has safetensors weights but no config.json."
    return UnsupportedModelError(
        f"{path} is {what} that is neither a GGUF file, a Hugging Face checkpoint folder (config.json + "
        f"*.safetensors) nor an ONNX model folder (edgelm.json or genai_config.json).{why}",
        fix="Pass a .gguf file, a checkpoint folder, a Hub id (org/name, from the Hugging Face cache), or a folder "
        "written by `edgelm convert --to onnx`.", path=str(path))


def checkpoint_facts(folder: str | os.PathLike[str], *, source: str | None = None) -> ModelFacts:
    """A Hugging Face checkpoint folder's facts from config.json and its safetensors headers."""
    folder = Path(folder)
    config = hf.read_config(folder)
    return config_facts(str(folder), config, hf.checkpoint_tensors(folder), source)


def config_facts(path: str, config: dict[str, Any], tensors: hf.TensorSummary, source: str | None) -> ModelFacts:
    """A checkpoint's facts from its config.json (a dict) and the summary of its safetensors headers, wherever they
    were read (a folder, or the Hub by range requests)."""
    if tensors.parameters <= 0:
        raise UnsupportedModelError(f"{path}'s safetensors headers describe no tensors.",
                                    fix="Pass a complete checkpoint (config.json and its *.safetensors).", path=path)
    arch = (config.get("architectures") or [config.get("model_type") or "unknown"])[0]
    return ModelFacts(
        path=path, format="hf", architecture=str(arch), quantization=tensors.dtype, parameters=tensors.parameters,
        weight_bytes=tensors.bytes, shape=hf.attention_shape(config, f"{path}/{hf.CONFIG}"),
        context_length=hf.context_length(config) or 2048, source=source,
    )


def _onnx_facts(folder: Path, source: str | None) -> ModelFacts:
    m = onnx_folder.check_folder(folder)
    model_file = m.get("model_file", "model.onnx")
    weight_bytes = sum(p.stat().st_size for p in folder.iterdir()
                       if p.is_file() and (p.name == model_file or p.name.startswith(model_file + ".")))
    quant = str(m.get("quantization") or "fp32")
    params = int(m.get("parameters") or 0)
    if params <= 0:  # an onnxruntime-genai folder with packed int4 weights: from its size
        params = int(weight_bytes / onnx_folder.BYTES_PER_PARAMETER.get(quant, 4.0))
    return ModelFacts(
        path=str(folder), format="onnx", architecture=str(m.get("model_type") or m.get("architecture")),
        quantization=quant, parameters=params, weight_bytes=weight_bytes, shape=onnx_folder.attention_shape(m),
        context_length=int(m.get("context_length") or 2048), source=source,
    )


# --- memory and speed -------------------------------------------------------------------------------------

def _overhead(f: ModelFacts, n_ctx: int) -> int:
    # llama.cpp's compute buffer: logits of a 512-token batch plus attention scratch that grows with n_ctx
    compute = 4 * f.shape.n_vocab * 512 + 4 * n_ctx * f.shape.n_embd * 4
    return RUNTIME_BASE_BYTES + compute


def _speed(f: ModelFacts, weight_bytes: int, n_ctx: int, kv: str, bandwidth_gbs: float, gflops: float,
           gpu: bool) -> tuple[float, str]:
    kv_read = f.kv_bytes(min(n_ctx, 512), kv) // 2  # a typical short chat: half of 512 positions on average
    memory_s = (weight_bytes + kv_read) / (bandwidth_gbs * 1e9)
    compute_s = 2 * f.parameters / (gflops * 1e9) if not gpu else 0.0
    per_token = max(memory_s, compute_s) + PER_TOKEN_OVERHEAD_S
    return 1.0 / per_token, "memory bandwidth" if memory_s >= compute_s else "compute"


@dataclass
class _Target:
    """The device side of a plan."""

    dev: Any
    threads: int
    gflops: float
    gpu: bool
    budget: int
    wanted_ctx: int
    parallel: int


@dataclass
class _Fit:
    quant: str
    weight_bytes: int
    kv: str
    n_ctx: int
    memory_bytes: int
    tokens_per_second: float
    bound_by: str
    fits: bool


def _fit(f: ModelFacts, t: _Target, quant: str, wbytes: int, kv_types: tuple[str, ...],
         tried: list[dict[str, Any]]) -> _Fit:
    """The first way to run ``wbytes`` of weights that fits: the wanted n_ctx, else halving it down to 512, then the
    same with the next KV cache type.  When nothing fits, the smallest attempt (``fits`` False)."""
    last = None
    for kv in kv_types:
        ctx = t.wanted_ctx
        while True:
            mem = wbytes + t.parallel * f.kv_bytes(ctx, kv) + _overhead(f, ctx)
            tps, bound = _speed(f, wbytes, ctx, kv, t.dev.memory_bandwidth_gbs, t.gflops, t.gpu)
            last = _Fit(quant, wbytes, kv, ctx, mem, tps, bound, mem <= t.budget)
            tried.append({"quant": quant, "kv_cache": kv, "n_ctx": ctx, "memory_bytes": mem, "fits": last.fits,
                          "tokens_per_second": round(tps, 1)})
            if last.fits or ctx // 2 < 512:
                break
            ctx //= 2
        if last.fits:
            return last
    assert last is not None
    return last


def _notes(f: ModelFacts, t: _Target, fit: _Fit) -> list[str]:
    notes = []
    if fit.n_ctx < t.wanted_ctx:
        notes.append(f"n_ctx reduced from {t.wanted_ctx} to {fit.n_ctx} to fit memory.")
    if fit.kv == "q8_0":
        notes.append("KV cache quantized to q8_0 to fit memory (about +0.1-0.5 % perplexity).")
    simd = t.dev.simd
    if fit.bound_by == "compute" and not t.gpu:
        notes.append(f"Decode is bound by compute, not memory bandwidth: this CPU has {SIMD_TITLES[simd]}, about "
                     f"{t.dev.gflops_per_core:g} GFLOPS a thread in llama.cpp's quantized kernels (AVX2 CPUs: "
                     f"~{DECODE_GFLOPS_PER_CORE['avx2']:g}); more threads help, a smaller file less.")
    if t.dev.gpu_offload:
        notes.append(f"All layers offloaded to {t.dev.gpu_offload} (unified memory counted once).")
    if t.dev.notes:
        notes.append(t.dev.notes)
    return notes


@dataclass(frozen=True, kw_only=True)
class RecommendOptions:
    """recommend()'s options, each declared once (type, default, help, flag): `edgelm recommend` derives its flags
    from these fields, and recommend()'s signature takes its defaults from :data:`RECOMMEND_DEFAULTS`."""

    profile: str = setting(
        "auto", "A device profile from `edgelm devices` (e.g. raspberry-pi-5-8gb), or auto for this machine.",
        kind="str", cli=("--profile",), example="raspberry-pi-5-8gb")
    n_ctx: int | None = setting(None, "Context window wanted [default: the model's, up to 4096].", kind="int",
                                cli=("--n-ctx",), example=512)
    parallel: int = setting(
        1, "Sequences generated at the same time (a server's concurrent requests), each with its own KV cache.",
        kind="int", cli=("--parallel", "-np"), example=4)


RECOMMEND = from_dataclass(RecommendOptions)
RECOMMEND_DEFAULTS = RecommendOptions()


def recommend(model: str | os.PathLike[str] | ModelFacts, profile: str = RECOMMEND_DEFAULTS.profile, *,
              n_ctx: int | None = RECOMMEND_DEFAULTS.n_ctx, parallel: int = RECOMMEND_DEFAULTS.parallel,
              host: Any = None, bandwidth_gbs: float | None = None) -> Plan:
    """Plan how to run ``model`` (its facts, or a file or folder on disk) on the device ``profile`` ("auto" = this
    machine, or a profile name from `edgelm devices`, e.g. "raspberry-pi-5-8gb").  Raises :class:`DoesNotFitError` when no option
    fits.  ``parallel``: sequences generated at the same time (a server's concurrent requests), each with its own
    KV cache of n_ctx tokens.  (The default model and Hub names: :func:`edgelm.planning.recommend`.)

    ``model`` may be a GGUF file, an ONNX folder, or a Hugging Face checkpoint: for a checkpoint,
    ``plan.quantizations`` lists every GGUF and ONNX quantization it could be converted to (size, memory, fits,
    tokens/s) and ``plan.convert_command`` makes the recommended one.

    ``host`` (a detected :class:`edgelm.platforms.Host`) and ``bandwidth_gbs`` may be injected for profile="auto".
    """
    f = model if isinstance(model, ModelFacts) else file_facts(model)
    dev = this_machine(host, bandwidth_gbs) if profile == "auto" else resolve(profile)
    threads = max(1, dev.performance_cores)
    t = _Target(dev=dev, threads=threads, gflops=dev.gflops_per_core * threads, gpu=dev.gpu_offload is not None,
                budget=int(dev.usable_bytes * HEADROOM), wanted_ctx=n_ctx or min(f.context_length, 4096),
                parallel=parallel)
    if f.format == "hf" and dev.npu:
        return _plan_npu(f, t)
    if f.format == "hf":
        return _plan_checkpoint(f, t)
    if f.format == "onnx":
        return _plan_onnx(f, t)

    own = f.quantization.upper()
    options: list[tuple[str, int]] = [(own, f.weight_bytes)]
    for q in PLAN_QUANTS:
        size = int(f.parameters * file_type_bpw(q) / 8)
        if q != own and size < f.weight_bytes:  # only smaller files are worth converting to
            options.append((q, size))
    options.sort(key=lambda o: -o[1])  # best quality (largest) first

    tried: list[dict[str, Any]] = []
    chosen = None
    for quant, wbytes in options:
        fit = _fit(f, t, quant, wbytes, ("f16", "q8_0"), tried)
        if fit.fits:
            chosen = fit
            break
    if chosen is None:
        smallest = min(tried, key=lambda r: r["memory_bytes"])
        raise DoesNotFitError(
            f"{Path(f.path).name} does not fit {dev.title}: it needs "
            f"{human_bytes(f.weight_bytes + parallel * f.kv_bytes(512) + _overhead(f, 512))} at its own {own} "
            f"with n_ctx 512{f' for {parallel} sequences' if parallel > 1 else ''}, and the device has "
            f"{human_bytes(dev.usable_bytes)} usable ({human_bytes(dev.ram_bytes)} RAM); the smallest option, "
            f"{smallest['quant']} with a {smallest['kv_cache']} "
            f"KV cache at n_ctx {smallest['n_ctx']}, needs {human_bytes(smallest['memory_bytes'])}.",
            fix="Use a smaller model (fewer parameters), fewer parallel sequences, or a device with more memory.",
            device=dev.name, needed=smallest["memory_bytes"], available=dev.usable_bytes,
        )
    quant = chosen.quant
    notes = []
    if quant != own:
        notes.append(f"The file is {own} ({human_bytes(f.weight_bytes)} of weights); {quant} is the largest that fits.")
    notes += _notes(f, t, chosen)
    return _plan(f, t, chosen, backend="llamacpp", fmt="gguf", needs_conversion=quant != own,
                 convert_command=(f"edgelm convert SRC --to gguf --quant {quant.lower()} -o model-{quant.lower()}.gguf"
                                  if quant != own else None),
                 notes=notes, alternatives=tried)


def _plan(f: ModelFacts, t: _Target, fit: _Fit, *, backend: str, fmt: str, needs_conversion: bool,
          convert_command: str | None, notes: list[str], alternatives: list[dict[str, Any]],
          quantizations: list[dict[str, Any]] | None = None) -> Plan:
    return Plan(
        model=f.source or f.path, device=t.dev.name, device_title=t.dev.title, backend=backend, format=fmt,
        quant=fit.quant, n_ctx=fit.n_ctx, threads=t.threads, n_gpu_layers=-1 if t.gpu and backend == "llamacpp" else 0,
        kv_cache=fit.kv, memory_bytes=fit.memory_bytes,
        memory_breakdown={"weights": fit.weight_bytes, "kv_cache": t.parallel * f.kv_bytes(fit.n_ctx, fit.kv),
                          "overhead": _overhead(f, fit.n_ctx)},
        parallel=t.parallel, device_memory_bytes=t.dev.usable_bytes, tokens_per_second=round(fit.tokens_per_second, 1),
        bound_by=fit.bound_by, needs_conversion=needs_conversion, convert_command=convert_command, notes=notes,
        alternatives=alternatives, source_format=f.format, simd=t.dev.simd, quantizations=quantizations or [],
    )


# --- ONNX folders -----------------------------------------------------------------------------------------

def _onnx_kv(f: ModelFacts, t: _Target, quant: str) -> str:
    # onnxruntime-genai keeps the KV cache in the graph's activation type: fp32 on CPU, fp16 for fp16 GPU models
    return "f16" if quant == "fp16" and t.gpu else "f32"


def _plan_onnx(f: ModelFacts, t: _Target) -> Plan:
    tried: list[dict[str, Any]] = []
    fit = _fit(f, t, f.quantization, f.weight_bytes, (_onnx_kv(f, t, f.quantization),), tried)
    if not fit.fits:
        raise DoesNotFitError(
            f"{Path(f.path).name} ({f.quantization} ONNX, {human_bytes(f.weight_bytes)} of weights) does not fit "
            f"{t.dev.title}: it needs {human_bytes(fit.memory_bytes)} at n_ctx {fit.n_ctx}, and the device has "
            f"{human_bytes(t.dev.usable_bytes)} usable ({human_bytes(t.dev.ram_bytes)} RAM).",
            fix="Convert the source to a smaller quantization (`edgelm recommend SRC` on the Hugging Face checkpoint "
            "lists them with their sizes), or use a device with more memory.",
            device=t.dev.name, needed=fit.memory_bytes, available=t.dev.usable_bytes)
    notes = [f"Runs on onnxruntime as it is ({f.quantization}); its KV cache is {fit.kv}."] + _notes(f, t, fit)
    return _plan(f, t, fit, backend="onnxruntime", fmt="onnx", needs_conversion=False, convert_command=None,
                 notes=notes, alternatives=tried)


# --- Hugging Face checkpoints: which quantization to convert to -------------------------------------------

def convert_command(source: str, quant: str, to: str = "gguf") -> str:
    """The `edgelm convert` command that writes ``source`` (a folder or Hub id) as ``quant``."""
    stem = Path(source.rstrip("/")).name or "model"
    out = f"{stem}-{quant.lower()}.gguf" if to == "gguf" else f"{stem}-{quant.lower()}-onnx"
    return f"edgelm convert {shlex.quote(source)} --to {to} --quant {quant.lower()} -o {shlex.quote(out)}"


def parallel_convert_command(source: str, parallel: int) -> str:
    """The `edgelm convert` command that keeps, of the GGUF quantizations within PARALLEL_PPL_BUDGET, the one that
    serves ``parallel`` streams the most tokens per second on the machine that runs it (each timed there)."""
    stem = Path(source.rstrip("/")).name or "model"
    return (f"edgelm convert {shlex.quote(source)} --to gguf --quant auto --parallel {parallel} "
            f"--max-ppl-increase {PARALLEL_PPL_BUDGET} -o {shlex.quote(f'{stem}-for-{parallel}.gguf')}")


def recommend_cap(parameters: int) -> str:
    """The largest GGUF quantization a checkpoint plan recommends for a model of this size."""
    return RECOMMEND_CAP["small" if parameters < SMALL_MODEL_PARAMETERS else "large"]


def quantization_rows(f: ModelFacts, t: _Target) -> tuple[list[dict[str, Any]], list[_Fit]]:
    """One row per quantization a checkpoint could be converted to: GGUF (PLAN_QUANTS, sizes from
    edgelm.formats.gguf.estimate_file_bytes) and ONNX (PLAN_ONNX_QUANTS, bytes per parameter from
    edgelm.formats.onnx_folder)."""
    source = f.source or f.path
    rows, fits = [], []
    output = f.shape.n_vocab * f.shape.n_embd  # the output matrix (the token embedding, when tied)
    options = [("gguf", q, estimate_file_bytes(q, f.parameters, row_size=f.shape.n_embd, output_parameters=output))
               for q in PLAN_QUANTS]
    options += [("onnx", q, int(f.parameters * onnx_folder.BYTES_PER_PARAMETER[q])) for q in PLAN_ONNX_QUANTS]
    for fmt, q, size in options:
        kv_types = ("f16", "q8_0") if fmt == "gguf" else (_onnx_kv(f, t, q),)
        fit = _fit(f, t, q, size, kv_types, [])
        fits.append(fit)
        rows.append({
            "format": fmt, "quant": q.lower() if fmt == "gguf" else q, "size_bytes": size,
            "bits_per_weight": round(size * 8 / f.parameters, 2), "memory_bytes": fit.memory_bytes,
            "n_ctx": fit.n_ctx, "kv_cache": fit.kv, "fits": fit.fits,
            "tokens_per_second": round(fit.tokens_per_second, 1), "bound_by": fit.bound_by, "recommended": False,
            "convert_command": convert_command(source, q, fmt),
        })
    return rows, fits


def _plan_checkpoint(f: ModelFacts, t: _Target) -> Plan:
    rows, fits = quantization_rows(f, t)
    cap = file_type_bpw(recommend_cap(f.parameters))
    usable = [i for i, (r, fit) in enumerate(zip(rows, fits))
              if r["format"] == "gguf" and fit.fits and file_type_bpw(fit.quant) <= cap]  # best quality first
    roomy = [i for i in usable if fits[i].n_ctx >= min(t.wanted_ctx, RECOMMEND_MIN_CTX)]
    best = (roomy or usable)[0] if usable else None  # roomy is a part of usable
    if best is None:
        smallest = min((fit for r, fit in zip(rows, fits) if r["format"] == "gguf"), key=lambda x: x.memory_bytes)
        raise DoesNotFitError(
            f"{f.source or f.path} ({f.parameters / 1e6:.0f} M parameters) does not fit {t.dev.title} at any "
            f"quantization: even {smallest.quant} ({human_bytes(smallest.weight_bytes)}) with a {smallest.kv} KV "
            "cache at "
            f"n_ctx {smallest.n_ctx} needs {human_bytes(smallest.memory_bytes)}, and the device has "
            f"{human_bytes(t.dev.usable_bytes)} usable ({human_bytes(t.dev.ram_bytes)} RAM).",
            fix="Use a smaller model (fewer parameters) or a device with more memory.",
            device=t.dev.name, needed=smallest.memory_bytes, available=t.dev.usable_bytes)
    rows[best]["recommended"] = True
    fit = fits[best]
    notes = [f"Planned from config.json and the safetensors headers ({f.parameters / 1e6:.1f} M parameters, "
             f"{f.quantization}); sizes are estimates (edgelm.formats.gguf.estimate_file_bytes).",
             f"{fit.quant} is the highest-quality quantization that fits"
             + (f" with n_ctx {min(t.wanted_ctx, RECOMMEND_MIN_CTX)} or more" if roomy else "")
             + f", up to {recommend_cap(f.parameters)} for a model of this size"
             + (" (small models lose the most to 4-bit weights)." if f.parameters < SMALL_MODEL_PARAMETERS else ".")]
    if f.shape.n_embd % 256:
        notes.append(f"The hidden size ({f.shape.n_embd}) is not a multiple of 256, which k-quants (Q*_K) need: "
                     "llama.cpp stores those tensors as Q5_0/Q5_1/IQ4_NL/Q8_0 instead (counted in the sizes), so "
                     "the k-quants gain little over Q4_0/Q8_0 here.")
    command = rows[best]["convert_command"]
    if t.parallel > 1:  # the batched step's cost is the CPU's kernels' to say, not an estimate's
        command = parallel_convert_command(f.source or f.path, t.parallel)
        notes.append(f"For {t.parallel} streams at once, the command converts to the quantization that serves them the "
                     f"most tokens per second on the machine that runs it (each within {PARALLEL_PPL_BUDGET} of the "
                     "16-bit perplexity timed there: llama.cpp repacks some types for cheaper batched kernels); run it "
                     f"on the device, or `edgelm serve --parallel {t.parallel}` with the checkpoint does it there.")
    notes += _notes(f, t, fit)
    return _plan(f, t, fit, backend="llamacpp", fmt="gguf", needs_conversion=True,
                 convert_command=command, notes=notes, alternatives=[], quantizations=rows)


def npu_convert_command(source: str, export: dict[str, Any]) -> str:
    """The `edgelm convert` command that writes the static NPU pair a device profile's "npu" section asks for."""
    stem = Path(source.rstrip("/")).name or "model"
    weights = export.get("weights", "w8")
    return (f"edgelm convert {shlex.quote(source)} --to onnx --target npu --weights {weights} "
            f"--prefill {int(export.get('prefill', 128))} --context {int(export.get('context', 1024))} "
            f"-o {shlex.quote(f'{stem}-npu-{weights}a16')}")


def _plan_npu(f: ModelFacts, t: _Target) -> Plan:
    """A checkpoint for a device with an NPU: the static pair its profile asks for (weights, prefill, context), on
    onnxruntime with the NPU's execution provider.  Memory from the pair's bytes per parameter and its uint8 KV
    window; the speed figure is the CPU estimate (no NPU speed is modelled)."""
    npu = t.dev.npu
    export = npu.get("export") or {}
    quant = f"{export.get('weights', 'w8')}a16"
    wbytes = int(f.parameters * static_pair.BYTES_PER_PARAMETER[quant])
    t = dataclasses.replace(t, wanted_ctx=int(export.get("context", 1024)))
    fit = _fit(f, t, quant, wbytes, ("q8_0",), [])
    if not fit.fits:
        raise DoesNotFitError(
            f"{f.source or f.path} as a {quant} NPU pair needs {human_bytes(fit.memory_bytes)}, and "
            f"{t.dev.title} has {human_bytes(t.dev.usable_bytes)} usable.", fix="Use a smaller model.",
            device=t.dev.name, needed=fit.memory_bytes, available=t.dev.usable_bytes)
    notes = [f"{t.dev.title}: the NPU runs the static prefill + decode pair (edgelm convert --to onnx --target npu) "
             f"through {npu['provider']} ({npu.get('package', '')}); edgelm.load picks that EP with the profile's "
             "options.",
             "Verified on this kind of machine: graph legality (the EP rule tables), numerics on onnxruntime's CPU EP "
             "and OpenVINO's CPU device; not verified: the NPU compile and its speed (the tokens/s here are a CPU "
             "estimate)."]
    notes += [n for n in _notes(f, t, fit) if not n.startswith("KV cache quantized")]  # the pair's KV is 8-bit anyway
    return _plan(f, t, fit, backend="onnxruntime", fmt="onnx", needs_conversion=True,
                 convert_command=npu_convert_command(f.source or f.path, export), notes=notes, alternatives=[])


def default_parallel(model: str | os.PathLike[str], *, n_ctx: int | None = None, kv_cache: str | None = None,
                     available: int | None = None, most: int = 4) -> int:
    """How many sequences a server should batch for ``model`` (a file or folder on disk): up to ``most``, as long as
    their KV caches (n_ctx tokens each) take at most a quarter of the available memory.  1 for models other than
    GGUF."""
    try:
        f = file_facts(model)
    except UnsupportedModelError:
        return 1
    if f.format != "gguf":
        return 1
    ctx = n_ctx or min(f.context_length, 4096)
    per = max(1, f.kv_bytes(ctx, kv_cache or "f16"))
    if available is None:
        available = int(detect().memory.get("available") or 0) or 2 * 1024**3
    return max(1, min(most, available // 4 // per))


