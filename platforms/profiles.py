"""Device profiles (data in profiles/*.json) and the device a plan is made for."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from edgelm.errors import UnknownDeviceError

from .detect import detect

GB = 1024**3
MB = 1024**2


@lru_cache(maxsize=1)
def profiles() -> dict[str, dict[str, Any]]:
    """Every profile by name, read from the package data."""
    out = {}
    for entry in resources.files("edgelm.platforms").joinpath("profiles").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            out[data["name"]] = data
    return dict(sorted(out.items()))


def device_names() -> list[str]:
    """Every name `--device` accepts: each profile, and each of its RAM variants (e.g. raspberry-pi-5-8gb)."""
    names = []
    for name, p in profiles().items():
        names.append(name)
        if len(p["ram_gb"]) > 1:
            names += [f"{name}-{_gb_label(gb)}" for gb in p["ram_gb"]]
    return names


def _gb_label(gb: float) -> str:
    return f"{int(gb * 1024)}mb" if gb < 1 else f"{int(gb)}gb"


@dataclass
class Device:
    """What a plan needs to know about a device, from a profile or from detecting this machine."""

    name: str
    title: str
    os: str
    arch: str
    ram_bytes: int
    usable_bytes: int  # what a model may take: RAM minus what the OS and apps keep (or MemAvailable here)
    memory_bandwidth_gbs: float
    performance_cores: int
    gflops_per_core: float
    gpu_offload: str | None = None  # metal | cuda | None
    backends: list[str] = field(default_factory=lambda: ["llamacpp", "onnxruntime"])
    onnx_providers: list[str] | None = None
    cpu_features: list[str] = field(default_factory=list)
    install: str | None = None
    notes: str | None = None
    measured: bool = False  # True when bandwidth/compute were measured on this machine
    npu: dict[str, Any] | None = None  # an NPU's EP, its options and the export it needs (profiles' "npu" key)
    # what an offline bundle for it is built for (`edgelm bundle`): machine, Python, wheel platform tags, the CPU
    # target llama.cpp is compiled for and its CMake flags, the QEMU core that emulates it (None: not a profile's)
    bundle: dict[str, Any] | None = None

    @property
    def simd(self) -> str:
        """The widest SIMD level of its CPU (a key of DECODE_GFLOPS_PER_CORE)."""
        return simd_level(self.cpu_features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve(name: str) -> Device:
    """The device called ``name`` (a profile, optionally with a RAM suffix like -8gb / -512mb)."""
    if not isinstance(name, str):
        raise UnknownDeviceError(f"Invalid device: {name!r}.", fix="Pass a profile name (see `edgelm devices`).")
    key = name.strip().lower()
    ram_gb = None
    m = re.fullmatch(r"(.+?)-(\d+)(gb|mb)", key)
    table = profiles()
    if key not in table and m and m.group(1) in table:
        key, ram_gb = m.group(1), int(m.group(2)) / (1024 if m.group(3) == "mb" else 1)
    if key not in table:
        raise UnknownDeviceError(
            f"Unknown device {name!r}.",
            fix=f"Use 'auto' or one of: {', '.join(device_names())} (`edgelm devices` lists them).", device=name,
        )
    p = table[key]
    if ram_gb is None:
        ram_gb = p["default_ram_gb"]
    elif ram_gb not in p["ram_gb"]:
        raise UnknownDeviceError(
            f"{p['title']} does not come with {name.rsplit('-', 1)[1].upper()}.",
            fix=f"Use one of: {', '.join(f'{key}-{_gb_label(g)}' for g in p['ram_gb'])}.", device=name,
        )
    ram = int(ram_gb * GB)
    label = key if len(p["ram_gb"]) == 1 else f"{key}-{_gb_label(ram_gb)}"
    return Device(
        name=label, title=f"{p['title']} ({_gb_label(ram_gb).upper()})", os=p["os"], arch=p["arch"], ram_bytes=ram,
        usable_bytes=max(0, ram - p["os_reserve_mb"] * MB), memory_bandwidth_gbs=p["memory_bandwidth_gbs"],
        performance_cores=p["cores"]["performance"], gflops_per_core=p["gflops_per_core"],
        gpu_offload=p.get("gpu_offload"), backends=list(p["backends"]), onnx_providers=p.get("onnx_providers"),
        cpu_features=list(p.get("cpu_features", [])), install=p.get("install"), notes=p.get("notes"),
        npu=p.get("npu"),
        bundle=p.get("bundle"),
    )


def this_machine(host: Any = None, bandwidth_gbs: float | None = None) -> Device:
    """This machine as a Device: detected facts, memory bandwidth measured (a few hundred ms) unless given."""
    h = host or detect()
    total = h.memory.get("total") or 0
    available = h.memory.get("available") or total
    llama = h.backends.get("llamacpp", {})
    gpu = None
    if llama.get("gpu_offload"):
        gpu = "metal" if llama.get("metal") else "cuda" if llama.get("cuda") else "gpu"
    cores = int(h.cpu.get("cores_usable") or h.performance_cores)
    return Device(
        name="auto", title=f"this machine ({h.cpu.get('model')}, {h.os} {h.arch})", os=h.os, arch=h.arch,
        ram_bytes=total, usable_bytes=int(available * 0.9), memory_bandwidth_gbs=bandwidth_gbs or measure_bandwidth(),
        performance_cores=min(cores, h.performance_cores), gflops_per_core=_gflops_guess(h.cpu.get("features", [])),
        gpu_offload=gpu, cpu_features=list(h.cpu.get("features", [])), measured=bandwidth_gbs is None,
    )


# Decode compute of llama.cpp's CPU kernels, in effective GFLOPS per thread (2 FLOPs per weight of a quantized
# mat-vec: unpack the blocks, integer dot products against the int8-quantized activations), by the widest SIMD the
# CPU has.  A token costs max(bytes read / bandwidth, 2 x parameters / (this x threads)): on CPUs without 256-bit
# integer SIMD the compute side binds first, even for small models that fit the caches.
# Calibration (SmolLM2-135M Q4_1, 134.5 M parameters, 2 threads, greedy decode; edgelm.plan's model):
#   avx (AMD EPYC with AVX/FMA/F16C, no AVX2): ~100 tok/s measured (9.9 ms/token) -> 16 (the plan says ~101);
#   avx2 (AMD EPYC with AVX2, no AVX-512): twice AVX's integer width, below AVX-512's bound -> 40 (memory-bound in
#     the plan for small models).  Measured here on 2026-11-25 only under a load average of 6-8 from other jobs:
#     14-23 tok/s at 2 threads, 20-29 at 1, one-thread bandwidth 4-5 GB/s: too disturbed to calibrate with
#     (benchmarks/bench_plan.py prints estimate vs measured on an idle machine);
#   avx512 (AMD EPYC with AVX-512): Q4_0 at 233 tok/s means at least 48 (memory-bound there in the plan);
#   amx: AMX tiles serve matrix-matrix products (prompts), not decode's mat-vec: as AVX-512.
#   ARM: neon / dotprod as the Raspberry Pi 4 (Cortex-A72) and Pi 5 (Cortex-A76) profiles; i8mm as the phone's.
DECODE_GFLOPS_PER_CORE: dict[str, float] = {
    "amx": 50.0, "avx512": 50.0, "avx2": 40.0, "avx": 16.0,
    "i8mm": 22.0, "dotprod": 19.0, "neon": 7.0, "scalar": 2.0,
}
SIMD_TITLES = {
    "amx": "AMX/AVX-512", "avx512": "AVX-512", "avx2": "AVX2", "avx": "AVX without AVX2 (128-bit integer SIMD)",
    "i8mm": "NEON with i8mm", "dotprod": "NEON with dot product", "neon": "NEON without dot product",
    "scalar": "no SIMD detected",
}


def simd_level(features: list[str] | tuple[str, ...]) -> str:
    """The widest SIMD level in a CPU's features (edgelm.platforms' names: avx512, avx2, avx, neon, dotprod, ...)."""
    have = set(features or ())
    for level in ("amx", "avx512", "avx2", "avx", "i8mm", "dotprod", "neon"):
        if level in have:
            return level
    return "scalar"


def _gflops_guess(features: list[str]) -> float:
    return DECODE_GFLOPS_PER_CORE[simd_level(features)]


def measure_bandwidth(megabytes: int = 128, repeats: int = 5) -> float:
    """Read bandwidth of one thread in GB/s: the median of summing a buffer larger than the caches."""
    import statistics
    import time

    import numpy as np

    buf = np.ones(megabytes * MB // 8, dtype=np.float64)
    buf.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.nbytes / statistics.median(times) / 1e9
