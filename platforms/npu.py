"""NPU execution providers: which ones run the static pair (``--target npu``), and each one's options from the device
profiles (profiles/*.json, key "npu"): QNN's backend library and HTP performance mode, OpenVINO's device, VitisAI's
config, and EPContext caching of the compiled graph.  Hardware facts only; the runtime applies them."""

from __future__ import annotations

import platform
from typing import Any

from .profiles import profiles

# onnxruntime providers that run the pair on an NPU, best first (CPU is the fallback)
NPU_PROVIDERS = ("QNNExecutionProvider", "OpenVINOExecutionProvider", "VitisAIExecutionProvider")
# an OS name as platform.system() gives it -> as profiles write it
_OS = {"Windows": "windows", "Linux": "linux", "Darwin": "macos"}


def npu_profiles() -> dict[str, dict[str, Any]]:
    """The device profiles that describe an NPU (they carry an "npu" section)."""
    return {name: p for name, p in profiles().items() if p.get("npu")}


def runtime_options(provider: str, *, profile: str | None = None, system: str | None = None) -> dict[str, Any]:
    """{"provider_options": {...}, "session_config": {...}, "profile": name} for ``provider``: the named profile's,
    else the first NPU profile for this OS that uses that provider; empty for providers no profile names (CPU)."""
    table = npu_profiles()
    os_name = _OS.get(system or platform.system(), "linux")
    chosen = table.get(profile) if profile else None
    if chosen is None:
        matches = [p for p in table.values() if p["npu"]["provider"] == provider]
        chosen = next((p for p in matches if p["os"] == os_name), matches[0] if matches else None)
    if chosen is None or chosen["npu"]["provider"] != provider:
        return {"provider_options": {}, "session_config": {}, "profile": None}
    npu = chosen["npu"]
    return {"provider_options": dict(npu.get("provider_options") or {}),
            "session_config": dict(npu.get("session_config") or {}), "profile": chosen["name"]}
