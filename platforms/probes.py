"""Probes: every way edgelm looks at the machine, injectable so tests can pretend to be a Pi, a Mac or a phone.

A :class:`Probes` reads files below ``root`` (``/`` on the real machine, a fake tree in tests), asks the
``platform`` module through plain values, and asks the installed runtimes what they support through callables.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgelm.optional import available


def _llama_caps() -> dict[str, Any] | None:
    if not available("llama_cpp"):
        return None
    from edgelm.native.llamacpp import llama_cpp  # loads llama.cpp, with edgelm's OpenMP set-up

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    return {
        "version": getattr(llama_cpp, "__version__", "unknown"),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "system_info": info,
    }


def _rpc_caps() -> dict[str, Any] | None:
    """llama.cpp's RPC backend: built into llama-cpp-python, or a module `edgelm install-rpc` made for it."""
    if not available("llama_cpp"):
        return None
    try:
        from edgelm.native import rpc  # loads llama.cpp

        return rpc.availability().to_dict()
    except Exception as exc:  # a broken install must not break doctor
        return {"available": False, "built_in": False, "module": None, "loaded": False, "error": str(exc)}


def _onnx_providers() -> dict[str, Any] | None:
    if not available("onnxruntime"):
        return None
    import onnxruntime

    return {"version": onnxruntime.__version__, "providers": list(onnxruntime.get_available_providers())}


def _sysctl(name: str) -> str | None:
    import subprocess  # ~4 ms of imports, wanted only on macOS

    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class Probes:
    root: Path = Path("/")
    system: str = field(default_factory=platform.system)  # Linux | Darwin | Windows
    machine: str = field(default_factory=platform.machine)  # x86_64 | aarch64 | arm64 | AMD64
    processor: str | None = None  # platform.processor() when None: on Linux it runs `uname -p`, so only if asked
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cpu_count: Callable[[], int] = field(default=lambda: os.cpu_count() or 1)
    usable_cpus: Callable[[], int] = field(default=_affinity)
    sysctl: Callable[[str], str | None] = field(default=_sysctl)
    llama_caps: Callable[[], dict[str, Any] | None] = field(default=_llama_caps)
    onnx_providers: Callable[[], dict[str, Any] | None] = field(default=_onnx_providers)
    rpc_caps: Callable[[], dict[str, Any] | None] = field(default=_rpc_caps)

    def processor_name(self) -> str:
        if self.processor is None:
            self.processor = platform.processor()
        return self.processor

    def read(self, path: str) -> str | None:
        """Text of ``path`` below root, or None when it is absent or unreadable."""
        try:
            return (self.root / path.lstrip("/")).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None

    def exists(self, path: str) -> bool:
        return (self.root / path.lstrip("/")).exists()

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern.lstrip("/")))
