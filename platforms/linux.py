"""Linux (and Android, which is Linux underneath): /proc and /sys."""

from __future__ import annotations

import re
from typing import Any

from .probes import Probes

# ARM CPU part numbers (from /proc/cpuinfo "CPU part") -> core name, for boards whose kernels print no model name
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2", "0xd4d": "Cortex-A715",
    "0xd4e": "Cortex-X3", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720", "0xd82": "Cortex-X4", "0xd42": "Cortex-A78AE",
}
X86_FEATURES = {"avx": "avx", "avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512_vnni", "fma": "fma",
                "f16c": "f16c", "amx_int8": "amx", "avx_vnni": "avx_vnni"}
ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
                "fphp": "fp16", "asimdhp": "fp16", "bf16": "bf16"}


def cpu(probes: Probes) -> dict[str, Any]:
    text = probes.read("/proc/cpuinfo") or ""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    fields: dict[str, str] = {}
    parts: list[str] = []
    for block in blocks:
        for line in block.splitlines():
            if ":" in line:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                fields.setdefault(key, value)
                if key == "CPU part":
                    parts.append(value)
    model = fields.get("model name") or fields.get("Hardware") or fields.get("Model")
    if not model and parts:
        names = sorted({ARM_PARTS.get(p, p) for p in parts})
        model = " + ".join(names)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    table = X86_FEATURES if "flags" in fields else ARM_FEATURES
    features = sorted({name for flag, name in table.items() if flag in flags})
    logical = sum(1 for b in blocks if re.search(r"^processor\s*:", b, re.M)) or probes.cpu_count()
    physical = len({(_field(b, "physical id") or "0", _field(b, "core id") or str(i)) for i, b in enumerate(blocks)
                    if re.search(r"^processor\s*:", b, re.M)}) or logical
    perf, eff = _core_classes(probes, logical)
    if physical < logical and eff == 0:  # SMT: one thread per physical core is what llama.cpp wants
        perf = physical
    return {"model": model or probes.processor_name() or "unknown", "features": features, "cores_logical": logical,
            "cores_physical": physical, "performance_cores": perf, "efficiency_cores": eff}


def _field(block: str, key: str) -> str | None:
    m = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", block, re.M)
    return m.group(1).strip() if m else None


def _core_classes(probes: Probes, logical: int) -> tuple[int, int]:
    """big.LITTLE: cores whose max frequency is the highest are performance cores (when the kernel says)."""
    freqs = []
    for i in range(logical):
        value = probes.read(f"/sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq")
        if value and value.strip().isdigit():
            freqs.append(int(value.strip()))
    if len(freqs) == logical and len(set(freqs)) > 1:
        top = max(freqs)
        perf = sum(1 for f in freqs if f >= top * 0.85)
        return perf, logical - perf
    return logical, 0


def memory(probes: Probes) -> dict[str, int | None]:
    text = probes.read("/proc/meminfo") or ""
    values = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    return {"total": values.get("MemTotal"), "available": values.get("MemAvailable", values.get("MemFree"))}


def board(probes: Probes) -> str | None:
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model", "/sys/class/dmi/id/product_name"):
        value = probes.read(path)
        if value and value.strip("\0 \n"):
            return value.strip("\0 \n")
    return None


def is_android(probes: Probes) -> bool:
    return "ANDROID_ROOT" in probes.env or probes.exists("/system/build.prop")


def android_soc(probes: Probes) -> str | None:
    prop = probes.read("/system/build.prop") or ""
    for key in ("ro.soc.model", "ro.board.platform", "ro.product.board"):
        m = re.search(rf"^{re.escape(key)}=(.+)$", prop, re.M)
        if m:
            return m.group(1).strip()
    return None


def gpus(probes: Probes) -> dict[str, Any]:
    nvidia = probes.read("/proc/driver/nvidia/version")
    jetson = probes.read("/etc/nv_tegra_release")
    return {
        "cuda": bool(nvidia or jetson or probes.exists("/dev/nvidia0")),
        "nvidia_driver": (nvidia or "").splitlines()[0].strip() if nvidia else None,
        "jetson": jetson.splitlines()[0].strip() if jetson else None,
        "vulkan": bool(probes.glob("/usr/share/vulkan/icd.d/*.json")),
        "adreno": probes.exists("/dev/kgsl-3d0"),
    }
