"""macOS: sysctl."""

from __future__ import annotations

from typing import Any

from .probes import Probes


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def cpu(probes: Probes) -> dict[str, Any]:
    model = probes.sysctl("machdep.cpu.brand_string") or "Apple"
    logical = _int(probes.sysctl("hw.logicalcpu")) or probes.cpu_count()
    perf = _int(probes.sysctl("hw.perflevel0.physicalcpu"))
    eff = _int(probes.sysctl("hw.perflevel1.physicalcpu")) or 0
    features = []
    if probes.machine == "arm64":
        features.append("neon")
        for flag, name in (("hw.optional.arm.FEAT_DotProd", "dotprod"), ("hw.optional.arm.FEAT_I8MM", "i8mm"),
                           ("hw.optional.arm.FEAT_BF16", "bf16"), ("hw.optional.arm.FEAT_FP16", "fp16")):
            if probes.sysctl(flag) == "1":
                features.append(name)
    else:
        flags = (probes.sysctl("machdep.cpu.features") or "") + " " + (probes.sysctl("machdep.cpu.leaf7_features") or "")
        for flag, name in (("AVX1.0", "avx"), ("AVX2", "avx2"), ("AVX512F", "avx512"), ("FMA", "fma")):
            if flag in flags.split():
                features.append(name)
    return {"model": model, "features": sorted(features), "cores_logical": logical,
            "performance_cores": perf or logical, "efficiency_cores": eff}


def memory(probes: Probes) -> dict[str, int | None]:
    total = _int(probes.sysctl("hw.memsize"))
    page = _int(probes.sysctl("hw.pagesize")) or 16384
    free = _int(probes.sysctl("vm.page_free_count"))
    inactive = _int(probes.sysctl("vm.page_purgeable_count")) or 0
    available = (free + inactive) * page if free is not None else None
    return {"total": total, "available": available}


def gpus(probes: Probes) -> dict[str, Any]:
    return {"metal": probes.machine == "arm64", "cuda": False}
