"""``edgelm recommend MODEL --profile raspberry-pi-5-4gb --workers 3``: a plan for a model over several boards.

Memory: the split of :mod:`edgelm.rpc.split` over this device and the workers (each worker offering its usable
memory, or what a live worker reports), with edgelm's head-room.  Speed: one token passes through the devices in
order, so its time is the *sum* of each device's time (its weight bytes over its memory bandwidth, or its FLOPs over
its compute, whichever binds; RPC pools memory, it adds no speed) plus the network: one round trip per worker per
token (llama.cpp's RPC client sends the worker its graph and inputs, then waits for its output), plus the logits
(n_vocab floats) coming back from the device that holds the output layer.

Per-hop figures (:data:`LINKS`, round trip including llama.cpp's RPC software, and payload bandwidth) are estimates:
``loopback`` is measured here by ``benchmarks/bench_rpc.py`` (one worker holding every layer costs ~0.3 ms a token);
``ethernet`` is a 1 GbE LAN (0.2 ms ping + RPC handling; 100 MB/s of payload); ``wifi`` a good 802.11ac link (3-5 ms
round trips, ~5 MB/s effective).  Anchor from llama.cpp's RPC pull request (#6829, 2024): TinyLlama-1.1B F16 63 tok/s
local, 60 over loopback RPC, 42 over 1 GbE.  ``hop_ms`` overrides the round trip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edgelm.errors import InvalidParameterError
from edgelm.formats.gguf import GGUFHeader, read_header
from edgelm.plan import RECOMMEND_DEFAULTS
from edgelm.sources import resolve_model_path
from edgelm.platforms.profiles import resolve, this_machine
from edgelm.rpc import protocol, split
from edgelm.units import human_bytes

PER_TOKEN_OVERHEAD_S = 0.0015  # sampling, Python and thread sync per token (edgelm.plan's figure)


@dataclass(frozen=True)
class Link:
    round_trip_s: float  # per worker per token, network and RPC software
    bandwidth_bytes_s: float  # payload (activations, logits)
    note: str


LINKS = {
    "loopback": Link(0.0003, 2e9, "same machine (measured by benchmarks/bench_rpc.py)"),
    "ethernet": Link(0.001, 100e6, "1 GbE LAN (estimate)"),
    "wifi": Link(0.005, 5e6, "802.11ac Wi-Fi (estimate)"),
}


@dataclass
class ClusterPart:
    device: str  # "this machine" or a worker
    title: str  # the board
    usable_bytes: int
    memory_bytes: int  # what this part needs
    layers: int
    output: bool
    fits: bool
    seconds_per_token: float  # its share of compute/memory time


@dataclass
class ClusterPlan:
    model: str
    device: str
    workers: list[str]
    link: str
    n_ctx: int
    kv_cache: str
    fits: bool
    parts: list[ClusterPart]
    tokens_per_second: float
    seconds_per_token: dict[str, float]  # devices, network, overhead
    tensor_split: list[float]  # [this machine, worker 1, ...] in layers: pass to edgelm.load to follow the plan
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_kwargs(self) -> dict[str, Any]:
        """Arguments for :func:`edgelm.load` that follow this plan (give the real workers' addresses as workers=)."""
        return {"n_ctx": self.n_ctx, "kv_cache": self.kv_cache, "tensor_split": list(self.tensor_split)}


def recommend_cluster(model: Any = None, profile: str = RECOMMEND_DEFAULTS.profile, *,
                      workers: int | Sequence[str] = 1, worker_profile: str | None = None,
                      n_ctx: int | None = RECOMMEND_DEFAULTS.n_ctx,
                      link: str = "ethernet", hop_ms: float | None = None, host: Any = None,
                      bandwidth_gbs: float | None = None) -> ClusterPlan:
    """Plan ``model`` (a GGUF path, None for the embedded one, or a read GGUFHeader) over the device ``profile``
    (this machine: "auto", or a profile of `edgelm devices`) and ``workers``: a number of boards like
    ``worker_profile`` (default: the same as ``profile``), or live workers ["host:port", ...] (asked for their
    memory; their speed is taken from ``worker_profile``).  Never raises for lack of memory: the plan
    says ``fits`` and what each device would need."""
    if link not in LINKS:
        raise InvalidParameterError(f"Unknown link {link!r}.", fix=f"Use one of: {', '.join(LINKS)}.",
                                    parameter="link", value=link)
    if isinstance(model, GGUFHeader):  # already read (a GGUF header takes a while to skip through its vocabulary)
        header, path = model, model.path
    else:
        path = resolve_model_path(model)
        header = read_header(path)
    here = this_machine(host, bandwidth_gbs) if profile == "auto" else resolve(profile)
    board = resolve(worker_profile) if worker_profile else (here if profile != "auto" else None)
    if isinstance(workers, int) and not isinstance(workers, bool):
        if workers < 0:
            raise InvalidParameterError(f"Invalid workers: {workers}.", fix="Give a number >= 0, or addresses.",
                                        parameter="workers", value=workers)
        if board is None:
            raise InvalidParameterError("workers=N with profile='auto' needs worker_profile (the workers' board).",
                                        fix="Pass worker_profile=\"raspberry-pi-5-4gb\" (a profile of `edgelm devices`).",
                                        parameter="worker_profile", value=None)
        names = [f"worker {i + 1}" for i in range(workers)]
        boards = [board] * workers
        frees = [board.usable_bytes] * workers
    else:
        endpoints = protocol.parse_workers(workers)
        infos = protocol.query_all(endpoints)
        names = [str(i.endpoint) for i in infos]
        frees = [i.free for i in infos]
        boards = [board or here] * len(infos)
    hop = LINKS[link]
    round_trip = hop_ms / 1000 if hop_ms is not None else hop.round_trip_s
    shape = header.attention_shape()
    wanted = n_ctx or min(header.context_length or 2048, 4096)
    attempts = [(wanted, "f16"), (wanted, "q8_0")]
    ctx = wanted // 2
    while ctx >= 512:
        attempts += [(ctx, "f16"), (ctx, "q8_0")]
        ctx //= 2
    chosen = None
    for ctx, kv in attempts:
        costs = split.model_costs(header, ctx, kv, min(512, ctx))
        s = split.plan_split(costs, list(zip(names, frees)), local_memory=here.usable_bytes, check=False)
        chosen = (ctx, kv, costs, s)
        if s.fits:
            break
    assert chosen is not None
    ctx, kv, costs, s = chosen
    total_weights = max(1, costs.total_weights)
    parts, device_s = [], 0.0
    for part, dev in zip(s.parts, [here] + boards):
        read = part.weights_bytes - (costs.input_bytes if part.input else 0)  # the embedding is looked up, not read
        kv_read = part.kv_bytes // 4  # a typical chat: half the context, half of it attended on average
        memory_s = (read + kv_read) / (dev.memory_bandwidth_gbs * 1e9)
        params = header.parameters * read / total_weights
        compute_s = 2 * params / (dev.gflops_per_core * max(1, dev.performance_cores) * 1e9) if dev.gpu_offload is None else 0
        t = max(memory_s, compute_s)
        device_s += t
        parts.append(ClusterPart(part.device, dev.title, int(part.budget or dev.usable_bytes), part.bytes,
                                 part.layers, part.output, part.fits, round(t, 6)))
    hops = sum(1 for p in s.parts[1:] if p.units > 0)
    payload = hops * shape.n_embd * 4 * 2 + (shape.n_vocab * 4 if any(p.output for p in s.parts[1:]) else 0)
    network_s = hops * round_trip + payload / hop.bandwidth_bytes_s
    per_token = device_s + network_s + PER_TOKEN_OVERHEAD_S
    notes = list(s.notes)
    if ctx < wanted:
        notes.append(f"n_ctx reduced from {wanted} to {ctx} to fit.")
    if kv != "f16":
        notes.append("KV cache quantized to q8_0 to fit.")
    if not s.fits:
        short = [p for p in s.parts if not p.fits]
        notes.append("Does not fit: " + "; ".join(f"{p.device} needs {human_bytes(p.bytes)}, has "
                                                  f"{human_bytes(p.budget or 0)}" for p in short)
                     + ". Add workers, use boards with more memory, or a smaller quantization.")
    notes.append(f"Network: {hops} round trip(s) per token at {round_trip * 1000:.1f} ms ({link}: {hop.note}) and "
                 f"{payload / 1024:.0f} KB of activations and logits per token.")
    if hops and network_s > device_s:
        notes.append("The network costs more than the computation: a faster link, or fewer workers, helps more than "
                     "faster boards.")
    return ClusterPlan(model=str(path), device=here.title, workers=names, link=link, n_ctx=ctx, kv_cache=kv,
                       fits=s.fits, parts=parts, tokens_per_second=round(1.0 / per_token, 1),
                       seconds_per_token={"devices": round(device_s, 6), "network": round(network_s, 6),
                                          "overhead": PER_TOKEN_OVERHEAD_S},
                       tensor_split=[float(c) for c in s.counts], notes=notes)


def print_plan(plan: ClusterPlan, out: Any) -> None:
    mb = 1024**2
    out(f"model       {Path(plan.model).name}")
    out(f"cluster     this machine: {plan.device}; {len(plan.workers)} worker(s); link {plan.link}")
    out(f"n_ctx       {plan.n_ctx} (KV cache {plan.kv_cache})")
    out(f"{'device':<22} {'board':<32} {'layers':>6}  {'needs MB':>9} {'usable MB':>9}  fits")
    for p in plan.parts:
        layers = f"{p.layers}{'+out' if p.output else ''}"
        out(f"{p.device:<22} {p.title[:32]:<32} {layers:>6}  {p.memory_bytes / mb:>9.0f} {p.usable_bytes / mb:>9.0f}  "
            f"{'yes' if p.fits else 'NO'}")
    s = plan.seconds_per_token
    out(f"speed       ~{plan.tokens_per_second:.1f} tokens/s decode ({s['devices'] * 1000:.1f} ms on the devices + "
        f"{s['network'] * 1000:.1f} ms network + {s['overhead'] * 1000:.1f} ms overhead per token)")
    out(f"fits        {'yes' if plan.fits else 'NO'}")
    for note in plan.notes:
        out(f"note        {note}")
