"""Hardware facts and runtime defaults.  The only place edgelm looks at the machine it runs on.

Everything here takes its probes as arguments (with the real machine as default), so tests can pretend to be a
Raspberry Pi or a Mac.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class RuntimeDefaults:
    """What `edgelm.load(..., device="auto", threads=None)` resolves to on this machine."""

    device: str  # cpu | metal | cuda | vulkan | gpu
    threads: int
    n_gpu_layers: int
    providers: list[str] | None = None  # onnxruntime execution providers, best first
    notes: list[str] = field(default_factory=list)


DEVICES = ("auto", "cpu", "gpu", "metal", "cuda", "vulkan", "npu", "coreml", "qnn", "nnapi", "directml", "xnnpack")


def performance_cores(cpu_count: Callable[[], int | None] = os.cpu_count) -> int:
    """Threads to use by default: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, cpu_count() or 1)


def runtime_defaults(backend: str, device: str = "auto", *, gpu_offload: bool | None = None) -> RuntimeDefaults:
    """Resolve ``device`` for ``backend`` on this machine (llama.cpp offloads every layer when it can)."""
    threads = performance_cores()
    if backend == "llamacpp":
        if gpu_offload is None:
            from edgelm.runtimes.llamacpp import supports_gpu_offload

            gpu_offload = supports_gpu_offload()
        if device == "cpu":
            return RuntimeDefaults("cpu", threads, 0)
        if device == "auto":
            return RuntimeDefaults("gpu" if gpu_offload else "cpu", threads, -1 if gpu_offload else 0)
        if not gpu_offload:
            from edgelm.errors import BackendError

            raise BackendError(
                f"device={device!r} was asked for, but this llama.cpp build has no GPU offload.",
                fix="Reinstall llama-cpp-python with GPU support (e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install "
                "--force-reinstall --no-cache-dir llama-cpp-python; Metal is on by default on macOS), "
                "or use device=\"cpu\".",
                device=device,
            )
        return RuntimeDefaults(device, threads, -1)
    return RuntimeDefaults("cpu" if device == "auto" else device, threads, 0)
