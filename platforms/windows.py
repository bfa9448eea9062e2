"""Windows: what the platform module and the environment tell (no WMI dependency)."""

from __future__ import annotations

import ctypes
from typing import Any

from .probes import Probes


def cpu(probes: Probes) -> dict[str, Any]:
    logical = probes.cpu_count()
    return {"model": probes.processor_name() or probes.env.get("PROCESSOR_IDENTIFIER", "unknown"), "features": [],
            "cores_logical": logical, "performance_cores": logical, "efficiency_cores": 0}


def memory(probes: Probes) -> dict[str, int | None]:
    if probes.root.as_posix() != "/":  # a fake machine in tests: nothing to ask
        return {"total": None, "available": None}
    try:
        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        status = MemoryStatus()
        status.dwLength = ctypes.sizeof(MemoryStatus)
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))  # type: ignore[attr-defined]
        return {"total": int(status.ullTotalPhys), "available": int(status.ullAvailPhys)}
    except Exception:
        return {"total": None, "available": None}


def gpus(probes: Probes) -> dict[str, Any]:
    return {"directml": True, "cuda": bool(probes.env.get("CUDA_PATH"))}
