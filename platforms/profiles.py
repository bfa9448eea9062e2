"""Device profiles (data in profiles/*.json) and the device a plan is made for."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from edgelm.errors import UnknownDeviceError

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
    )


def this_machine(host: Any = None, bandwidth_gbs: float | None = None) -> Device:
    """This machine as a Device: detected facts, memory bandwidth measured (a few hundred ms) unless given."""
    from .detect import detect

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


def _gflops_guess(features: list[str]) -> float:
    if "amx" in features or "avx512" in features:
        return 80.0
    if "avx2" in features:
        return 50.0
    if "i8mm" in features or "dotprod" in features:
        return 25.0
    return 8.0


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
