"""`edgelm.recommend`: a deployment plan for a model on a device, from the model's header and the device's facts.

Memory = weights + KV cache at the planned n_ctx + runtime overhead (compute buffers, logits, the runtime itself),
and it must fit the device's usable memory with head-room.  Decode speed is estimated from what one token costs:
every weight byte (and the KV cache so far) is read once per token, so tokens/s ~ bandwidth / bytes per token,
unless compute (2 FLOPs per weight) binds first.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import DoesNotFitError, UnsupportedModelError
from .formats.gguf import AttentionShape, file_type_bpw

MB = 1024**2
HEADROOM = 0.85  # a plan may use at most this share of the device's usable memory
PER_TOKEN_OVERHEAD_S = 0.0015  # sampling, Python and thread sync per token, measured on llama.cpp here
RUNTIME_BASE_BYTES = 60 * MB  # the Python process with llama.cpp loaded, before the model

# GGUF quantizations a plan may propose (their bits per weight: edgelm.formats.gguf.FILE_TYPE_BPW)
PLAN_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


@dataclass(frozen=True)
class ModelFacts:
    path: str
    format: str
    architecture: str
    quantization: str
    parameters: int
    weight_bytes: int
    shape: AttentionShape
    context_length: int

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_kwargs(self) -> dict[str, Any]:
        """Arguments for :func:`edgelm.load` that follow this plan."""
        return {"backend": self.backend, "n_ctx": self.n_ctx, "threads": self.threads,
                "n_gpu_layers": self.n_gpu_layers, "kv_cache": self.kv_cache, "parallel": self.parallel}


def model_facts(model: str | os.PathLike[str] | None) -> ModelFacts:
    """Read what a plan needs from the model's header, without loading it."""
    from .formats.gguf import read_header
    from .loader import resolve_model_path
    from .runtimes import detect_backend

    path = resolve_model_path(model)
    if detect_backend(path) != "llamacpp":
        from .loader import inspect

        facts = inspect(path)
        raise UnsupportedModelError(
            f"recommend() plans from GGUF headers; {path} is a {facts.get('format', 'non-GGUF')} model.",
            fix="Pass the GGUF of the model (or its Hugging Face source converted with `edgelm convert --to gguf`).",
            path=str(path),
        )
    h = read_header(path)
    return ModelFacts(
        path=str(path), format="gguf", architecture=h.architecture, quantization=h.quantization,
        parameters=h.parameters, weight_bytes=h.weight_bytes, shape=h.attention_shape(),
        context_length=h.context_length or 2048,
    )


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


def recommend(model: str | os.PathLike[str] | ModelFacts | None = None, device: str = "auto", *, n_ctx: int | None = None,
              parallel: int = 1, host: Any = None, bandwidth_gbs: float | None = None) -> Plan:
    """Plan how to run ``model`` (default: the embedded one) on ``device`` ("auto" = this machine, or a profile
    name from `edgelm devices`, e.g. "raspberry-pi-5-8gb").  Raises :class:`DoesNotFitError` when no option fits.
    ``parallel``: sequences generated at the same time (a server's concurrent requests), each with its own KV cache
    of n_ctx tokens.

    ``host`` (a detected :class:`edgelm.platforms.Host`) and ``bandwidth_gbs`` may be injected for device="auto".
    """
    from .platforms.profiles import resolve, this_machine

    f = model if isinstance(model, ModelFacts) else model_facts(model)
    dev = this_machine(host, bandwidth_gbs) if device == "auto" else resolve(device)
    threads = max(1, dev.performance_cores)
    gflops = dev.gflops_per_core * threads
    gpu = dev.gpu_offload is not None
    wanted_ctx = n_ctx or min(f.context_length, 4096)
    budget = int(dev.usable_bytes * HEADROOM)

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
        for kv in ("f16", "q8_0"):
            ctx = wanted_ctx
            while ctx >= 512 or ctx == wanted_ctx:
                mem = wbytes + parallel * f.kv_bytes(ctx, kv) + _overhead(f, ctx)
                tps, bound = _speed(f, wbytes, ctx, kv, dev.memory_bandwidth_gbs, gflops, gpu)
                row = {"quant": quant, "kv_cache": kv, "n_ctx": ctx, "memory_bytes": mem, "fits": mem <= budget,
                       "tokens_per_second": round(tps, 1)}
                tried.append(row)
                if mem <= budget and chosen is None:
                    chosen = (quant, wbytes, kv, ctx, mem, tps, bound)
                if chosen is not None or ctx <= 512:
                    break
                ctx //= 2
            if chosen is not None:
                break
        if chosen is not None:
            break
    if chosen is None:
        smallest = min(tried, key=lambda r: r["memory_bytes"])
        raise DoesNotFitError(
            f"{Path(f.path).name} does not fit {dev.title}: it needs "
            f"{_human(f.weight_bytes + parallel * f.kv_bytes(512) + _overhead(f, 512))} at its own {own} with n_ctx 512"
            f"{f' for {parallel} sequences' if parallel > 1 else ''}, and the device has {_human(dev.usable_bytes)} usable "
            f"({_human(dev.ram_bytes)} RAM); the smallest option, {smallest['quant']} with a {smallest['kv_cache']} "
            f"KV cache at n_ctx {smallest['n_ctx']}, needs {_human(smallest['memory_bytes'])}.",
            fix="Use a smaller model (fewer parameters), fewer parallel sequences, or a device with more memory.",
            device=dev.name, needed=smallest["memory_bytes"], available=dev.usable_bytes,
        )
    quant, wbytes, kv, ctx, mem, tps, bound = chosen
    notes = []
    if quant != own:
        notes.append(f"The file is {own} ({_human(f.weight_bytes)} of weights); {quant} is the largest that fits.")
    if ctx < wanted_ctx:
        notes.append(f"n_ctx reduced from {wanted_ctx} to {ctx} to fit memory.")
    if kv != "f16":
        notes.append("KV cache quantized to q8_0 to fit memory (about +0.1-0.5 % perplexity).")
    if dev.gpu_offload:
        notes.append(f"All layers offloaded to {dev.gpu_offload} (unified memory counted once).")
    if dev.notes:
        notes.append(dev.notes)
    return Plan(
        model=f.path, device=dev.name, device_title=dev.title, backend="llamacpp", format="gguf", quant=quant,
        n_ctx=ctx, threads=threads, n_gpu_layers=-1 if gpu else 0, kv_cache=kv, memory_bytes=mem,
        memory_breakdown={"weights": wbytes, "kv_cache": parallel * f.kv_bytes(ctx, kv), "overhead": _overhead(f, ctx)},
        parallel=parallel,
        device_memory_bytes=dev.usable_bytes, tokens_per_second=round(tps, 1), bound_by=bound,
        needs_conversion=quant != own,
        convert_command=(f"edgelm convert SRC --to gguf --quant {quant.lower()} -o model-{quant.lower()}.gguf"
                         if quant != own else None),
        notes=notes, alternatives=tried,
    )


def default_parallel(model: str | os.PathLike[str] | None, *, n_ctx: int | None = None, kv_cache: str | None = None,
                     available: int | None = None, most: int = 4) -> int:
    """How many sequences a server should batch for ``model``: up to ``most``, as long as their KV caches (n_ctx
    tokens each) take at most a quarter of the available memory.  1 for models other than GGUF."""
    from .platforms import detect

    try:
        f = model_facts(model)
    except UnsupportedModelError:
        return 1
    ctx = n_ctx or min(f.context_length, 4096)
    per = max(1, f.kv_bytes(ctx, kv_cache or "f16"))
    if available is None:
        available = int(detect().memory.get("available") or 0) or 2 * 1024**3
    return max(1, min(most, available // 4 // per))


def _human(n: int) -> str:
    return f"{n / 1024**3:.2f} GB" if n >= 1024**3 else f"{n / MB:.0f} MB"
