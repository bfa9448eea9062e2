"""What this machine is and what edgelm can use on it (`edgelm doctor`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from . import darwin, linux, windows
from .probes import Probes

_OS_MODULES = {"Linux": linux, "Darwin": darwin, "Windows": windows}


@dataclass
class Host:
    os: str  # linux | android | macos | windows
    arch: str  # x86_64 | arm64
    cpu: dict[str, Any]
    memory: dict[str, int | None]
    board: str | None
    gpu: dict[str, Any]
    backends: dict[str, Any]
    npu: list[str] = field(default_factory=list)
    missing: list[dict[str, str]] = field(default_factory=list)  # {"what": ..., "fix": ...}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def performance_cores(self) -> int:
        return int(self.cpu.get("performance_cores") or self.cpu.get("cores_logical") or 1)


def _arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l", "armv8", "arm64e"):
        return "arm64"
    return m or "unknown"


def _llama_backend(caps: dict[str, Any] | None) -> dict[str, Any]:
    if caps is None:
        return {"installed": False}
    info = caps.get("system_info", "")
    flags = dict(re.findall(r"(\w+) = (\d)", info))
    return {
        "installed": True,
        "version": caps.get("version"),
        "gpu_offload": bool(caps.get("gpu_offload")),
        "metal": "Metal" in info or "MTL" in info,
        "cuda": "CUDA" in info,
        "vulkan": "Vulkan" in info,
        "blas": flags.get("BLAS") == "1" or "BLAS" in info.split("CPU :")[0],
        "cpu_flags": sorted(k for k, v in flags.items() if v == "1"),
    }


def cpu_signature(probes: Probes | None = None) -> str:
    """This CPU's model and instruction-set features, as one string: what a kernel's measured speed depends on (a
    cache of such measurements is keyed by it), without the slower probes of :func:`detect`."""
    p = probes or Probes()
    cpu = _OS_MODULES.get(p.system, linux).cpu(p)
    return f"{_arch(p.machine)}|{cpu.get('model')}|{','.join(sorted(cpu.get('features') or []))}"


def detect(probes: Probes | None = None) -> Host:
    """Detect the machine through ``probes`` (the real one by default)."""
    p = probes or Probes()
    module = _OS_MODULES.get(p.system, linux)
    os_name = {"Linux": "linux", "Darwin": "macos", "Windows": "windows"}.get(p.system, p.system.lower())
    if p.system == "Linux" and linux.is_android(p):
        os_name = "android"
    cpu = module.cpu(p)
    cpu["cores_usable"] = min(p.usable_cpus(), cpu.get("cores_logical") or p.usable_cpus())
    memory = module.memory(p)
    board = linux.board(p) if p.system == "Linux" else (p.sysctl("hw.model") if p.system == "Darwin" else None)
    if os_name == "android":
        board = board or linux.android_soc(p)
    gpu = module.gpus(p)
    llama = _llama_backend(p.llama_caps())
    if llama.get("installed"):
        llama["rpc"] = p.rpc_caps() or {"available": False, "built_in": False, "module": None}
    onnx = p.onnx_providers()
    backends = {"llamacpp": llama,
                "onnxruntime": {"installed": onnx is not None, **(onnx or {})}}
    providers = set((onnx or {}).get("providers", []))
    npu = []
    soc = (board or "") + " " + (cpu.get("model") or "")
    if os_name == "android" or "snapdragon" in soc.lower() or "qualcomm" in soc.lower():
        npu.append("QNN (Qualcomm Hexagon NPU)" + (" - available" if "QNNExecutionProvider" in providers else ""))
        if os_name == "android":
            npu.append("NNAPI" + (" - available" if "NnapiExecutionProvider" in providers else ""))
    if os_name == "macos" and _arch(p.machine) == "arm64":
        npu.append("Apple Neural Engine via CoreML" + (" - available" if "CoreMLExecutionProvider" in providers else ""))
    host = Host(os=os_name, arch=_arch(p.machine), cpu=cpu, memory=memory, board=board, gpu=gpu,
                backends=backends, npu=npu)
    host.missing = _missing(host)
    return host


def _missing(h: Host) -> list[dict[str, str]]:
    """What this machine could use but the installation lacks, each with the command that fixes it."""
    out = []
    llama, onnx = h.backends["llamacpp"], h.backends["onnxruntime"]
    if not llama.get("installed"):
        out.append({"what": "the llama.cpp backend (llama-cpp-python)", "fix": 'pip install "edgelm[llamacpp]"'})
    else:
        if h.gpu.get("metal") and not llama.get("metal"):
            out.append({"what": "Metal offload in llama-cpp-python",
                        "fix": 'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir '
                               "llama-cpp-python"})
        if h.gpu.get("cuda") and not llama.get("cuda"):
            out.append({"what": "CUDA offload in llama-cpp-python (an NVIDIA GPU is present)",
                        "fix": 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                               "llama-cpp-python"})
    if not onnx.get("installed"):
        out.append({"what": "the onnxruntime backend", "fix": 'pip install "edgelm[onnx]"'})
    else:
        providers = set(onnx.get("providers", []))
        if h.gpu.get("cuda") and "CUDAExecutionProvider" not in providers:
            out.append({"what": "onnxruntime's CUDA execution provider",
                        "fix": "pip install onnxruntime-gpu onnxruntime-genai-cuda"})
        if h.os == "macos" and "CoreMLExecutionProvider" not in providers:
            out.append({"what": "onnxruntime's CoreML execution provider", "fix": "pip install --upgrade onnxruntime"})
        if any(n.startswith("QNN") for n in h.npu) and "QNNExecutionProvider" not in providers:
            out.append({"what": "onnxruntime's QNN execution provider (Qualcomm NPU)",
                        "fix": "pip install onnxruntime-qnn (Windows on Arm) or use the onnxruntime-android QNN build"})
    return out
