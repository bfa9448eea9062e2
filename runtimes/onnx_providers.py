"""onnxruntime execution providers: which one serves an edgelm device, what installs it, and the choice made at load.

Kept apart from the backend so ``edgelm doctor`` and plans can name providers without loading a model.
"""

from __future__ import annotations

import platform
from typing import Sequence

from edgelm.errors import ExecutionProviderError
from edgelm.optional import available, require

# onnxruntime provider name -> (name onnxruntime-genai's Config.append_provider takes, what installs it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "CPUExecutionProvider": ("cpu", "onnxruntime"),
    "CUDAExecutionProvider": ("cuda", "onnxruntime-gpu and onnxruntime-genai-cuda (NVIDIA GPUs, Linux/Windows)"),
    "DmlExecutionProvider": ("dml", "onnxruntime-directml and onnxruntime-genai-directml (Windows)"),
    "CoreMLExecutionProvider": ("coreml", "onnxruntime on macOS (the macOS wheels include CoreML)"),
    "QNNExecutionProvider": ("qnn", "onnxruntime-qnn (Qualcomm NPUs, Windows on Arm / Android)"),
    "NnapiExecutionProvider": ("nnapi", "an onnxruntime build with NNAPI (onnxruntime-android)"),
    "XnnpackExecutionProvider": ("xnnpack", "an onnxruntime build with XNNPACK (e.g. onnxruntime-android)"),
    "WebGpuExecutionProvider": ("webgpu", "an onnxruntime build with WebGPU"),
    "OpenVINOExecutionProvider": ("OpenVINO", "onnxruntime-openvino (Intel CPUs, GPUs and NPUs)"),
    "VitisAIExecutionProvider": ("VitisAI", "AMD's Ryzen AI Software (onnxruntime-vitisai, Ryzen AI NPUs, Windows)"),
}
# edgelm device -> onnxruntime providers that serve it, best first
DEVICE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "gpu": ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider", "WebGpuExecutionProvider"),
    "metal": ("CoreMLExecutionProvider",),
    "coreml": ("CoreMLExecutionProvider",),
    "directml": ("DmlExecutionProvider",),
    "qnn": ("QNNExecutionProvider",),
    "nnapi": ("NnapiExecutionProvider",),
    "xnnpack": ("XnnpackExecutionProvider",),
    "npu": ("QNNExecutionProvider", "NnapiExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider",
            "VitisAIExecutionProvider"),
    "vulkan": ("WebGpuExecutionProvider",),
}
# provider -> edgelm device name reported in info
PROVIDER_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "directml",
                   "CoreMLExecutionProvider": "coreml", "QNNExecutionProvider": "qnn", "NnapiExecutionProvider": "nnapi",
                   "XnnpackExecutionProvider": "xnnpack", "WebGpuExecutionProvider": "gpu",
                   "OpenVINOExecutionProvider": "npu", "VitisAIExecutionProvider": "npu"}


def ort_version() -> str:
    if not available("onnxruntime"):
        return "(not installed)"
    return str(require("onnxruntime", extra="onnx", purpose="The onnxruntime backend").__version__)


def available_providers() -> list[str]:
    return list(require("onnxruntime", extra="onnx", purpose="The onnxruntime backend").get_available_providers())


def choose_provider(device: str, preferred: Sequence[str] | None, available: Sequence[str],
                    built_for: str = "cpu", system: str | None = None) -> tuple[str, str | None]:
    """The onnxruntime provider to run on, and why it is CPU when something else was preferred (or None).

    ``device`` is the resolved edgelm device.  An explicitly requested accelerator that is not installed raises
    :class:`ExecutionProviderError` naming the package; a preference (``preferred``, from the platform defaults,
    or device="auto") that cannot be met falls back to CPU with the reason.
    """
    system = system or platform.system()
    if device in ("cpu", "auto") and not preferred:
        return "CPUExecutionProvider", None
    wanted = list(preferred or ()) or list(DEVICE_PROVIDERS.get(device, ()))
    if not wanted:
        raise ExecutionProviderError(f"No onnxruntime execution provider serves device={device!r}.",
                                     fix=f"Use one of: {', '.join(['auto', *DEVICE_PROVIDERS])}.", device=device)
    for name in wanted:
        if name in available:
            return name, None
    if device not in ("auto", "cpu") and not preferred:
        first = wanted[0]
        package = PROVIDERS.get(first, ("", f"an onnxruntime build with {first}"))[1]
        raise ExecutionProviderError(
            f"device={device!r} needs onnxruntime's {' or '.join(wanted)}, which this onnxruntime does not have "
            f"(available: {', '.join(available)}).",
            fix=f"Install {package}, or use device='cpu'.", device=device, provider=first)
    package = PROVIDERS.get(wanted[0], ("", f"an onnxruntime build with {wanted[0]}"))[1]
    reason = (f"none of the preferred execution providers ({', '.join(wanted)}) is available in this onnxruntime "
              f"(available: {', '.join(available)}) on {system}; install {package} to use it")
    return "CPUExecutionProvider", reason

