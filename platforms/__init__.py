"""Hardware facts, device profiles and runtime defaults: the only place edgelm looks at the machine it runs on.

Everything takes its probes as arguments (the real machine by default), so tests can pretend to be a Raspberry
Pi, a Mac or a phone: see :class:`edgelm.platforms.probes.Probes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgelm.errors import BackendError
from edgelm.settings import DEVICES  # declared with the device setting, a layer below

from . import darwin, linux, windows
from .detect import Host, cpu_signature, detect
from .probes import Probes
from .profiles import Device, device_names, profiles, resolve, this_machine


@dataclass(frozen=True)
class RuntimeDefaults:
    """What `edgelm.load(..., device="auto", threads=None)` resolves to on this machine."""

    device: str  # cpu | metal | cuda | vulkan | gpu | auto (onnxruntime picks from `providers`)
    threads: int
    n_gpu_layers: int
    providers: list[str] | None = None  # onnxruntime execution providers, best first
    notes: list[str] = field(default_factory=list)


def default_threads(probes: Probes | None = None) -> int:
    """Performance cores (physical, not SMT siblings) this process may run on."""
    p = probes or Probes()
    module = {"Darwin": darwin, "Windows": windows}.get(p.system, linux)
    cpu = module.cpu(p)
    perf = int(cpu.get("performance_cores") or cpu.get("cores_logical") or 1)
    return max(1, min(perf, p.usable_cpus()))


def available_memory(probes: Probes | None = None) -> int | None:
    """Bytes of memory this machine can give a new allocation now (MemAvailable on Linux), or None if unknown."""
    p = probes or Probes()
    module = {"Darwin": darwin, "Windows": windows}.get(p.system, linux)
    return module.memory(p).get("available")


def preferred_providers(probes: Probes | None = None) -> list[str] | None:
    """onnxruntime execution providers worth trying here, best first (None: CPU)."""
    p = probes or Probes()
    if p.system == "Darwin":
        return ["CoreMLExecutionProvider"] if p.machine == "arm64" else None
    if p.system == "Windows":
        return ["CUDAExecutionProvider", "DmlExecutionProvider"] if p.env.get("CUDA_PATH") else ["DmlExecutionProvider"]
    if linux.is_android(p):
        return ["QNNExecutionProvider", "NnapiExecutionProvider", "XnnpackExecutionProvider"]
    if linux.gpus(p)["cuda"]:
        return ["CUDAExecutionProvider"]
    return None


def runtime_defaults(backend: str, device: str = "auto", *, gpu_offload: bool | None = None,
                     probes: Probes | None = None, threads: int | None = None) -> RuntimeDefaults:
    """Resolve ``device`` for ``backend`` on this machine: llama.cpp offloads every layer when its build can,
    onnxruntime gets the execution providers that match the platform; threads = performance cores, unless
    ``threads`` is given (then the CPU is not examined for it)."""
    threads = threads or default_threads(probes)
    if backend == "llamacpp":
        if gpu_offload is None:
            caps = (probes or Probes()).llama_caps()
            gpu_offload = bool(caps and caps.get("gpu_offload"))
        if device == "cpu":
            return RuntimeDefaults("cpu", threads, 0)
        if device == "auto":
            return RuntimeDefaults("gpu" if gpu_offload else "cpu", threads, -1 if gpu_offload else 0)
        if not gpu_offload:
            raise BackendError(
                f"device={device!r} was asked for, but this llama.cpp build has no GPU offload.",
                fix="Reinstall llama-cpp-python with GPU support (e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install "
                "--force-reinstall --no-cache-dir llama-cpp-python; Metal is on by default on macOS), "
                "or use device=\"cpu\".",
                device=device,
            )
        return RuntimeDefaults(device, threads, -1)
    if backend == "onnxruntime" and device == "auto":
        return RuntimeDefaults("auto", threads, 0, providers=preferred_providers(probes))
    return RuntimeDefaults(device, threads, 0)


__all__ = ["Host", "Probes", "Device", "RuntimeDefaults", "DEVICES", "detect", "cpu_signature", "profiles", "device_names", "resolve",
           "this_machine", "runtime_defaults", "default_threads", "preferred_providers", "available_memory"]
