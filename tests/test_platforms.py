"""Detection through injected probes (a fake Raspberry Pi 4, M2 Mac and Snapdragon phone), runtime defaults and the
real detection on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgelm
from edgelm.platforms import Probes, default_threads, detect, preferred_providers, runtime_defaults

from .conftest import run_cli


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _cpuinfo_arm(parts: list[str], features: str) -> str:
    return "\n\n".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                       f"CPU part\t: {part}" for i, part in enumerate(parts)) + "\n"


def fake_pi4(tmp_path: Path) -> Probes:
    root = _tree(tmp_path / "pi4", {
        "proc/cpuinfo": _cpuinfo_arm(["0xd08"] * 4, "fp asimd evtstrm crc32 cpuid") + "\nModel\t: Raspberry Pi 4 Model B Rev 1.4\n",
        "proc/meminfo": "MemTotal:        3884136 kB\nMemFree:          912000 kB\nMemAvailable:    3402116 kB\n",
        "proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\0",
    })
    return Probes(root=root, system="Linux", machine="aarch64", processor="", env={}, cpu_count=lambda: 4,
                  usable_cpus=lambda: 4, sysctl=lambda name: None,
                  llama_caps=lambda: {"version": "0.3.36", "gpu_offload": False,
                                      "system_info": "CPU : NEON = 1 | ARM_FMA = 1 | OPENMP = 1 | REPACK = 1 |"},
                  onnx_providers=lambda: None)


def fake_m2(tmp_path: Path) -> Probes:
    values = {"machdep.cpu.brand_string": "Apple M2", "hw.logicalcpu": "8", "hw.perflevel0.physicalcpu": "4",
              "hw.perflevel1.physicalcpu": "4", "hw.optional.arm.FEAT_DotProd": "1", "hw.optional.arm.FEAT_I8MM": "1",
              "hw.memsize": str(16 * 1024**3), "hw.pagesize": "16384", "vm.page_free_count": "250000",
              "vm.page_purgeable_count": "50000", "hw.model": "Mac14,2"}
    (tmp_path / "m2").mkdir()
    return Probes(root=tmp_path / "m2", system="Darwin", machine="arm64", processor="arm", env={},
                  cpu_count=lambda: 8, usable_cpus=lambda: 8, sysctl=values.get,
                  llama_caps=lambda: {"version": "0.3.36", "gpu_offload": True,
                                      "system_info": "Metal : EMBED_LIBRARY = 1 | CPU : NEON = 1 | DOTPROD = 1 |"},
                  onnx_providers=lambda: {"version": "1.32.0",
                                          "providers": ["CoreMLExecutionProvider", "CPUExecutionProvider"]})


def fake_phone(tmp_path: Path) -> Probes:
    parts = ["0xd46"] * 3 + ["0xd4d"] * 2 + ["0xd47"] * 2 + ["0xd4e"]
    freqs = [2016000] * 3 + [2803200] * 4 + [3187200]
    files = {
        "proc/cpuinfo": _cpuinfo_arm(parts, "fp asimd asimdhp asimddp i8mm bf16 sve sve2"),
        "proc/meminfo": "MemTotal:        7812000 kB\nMemAvailable:    3100000 kB\n",
        "system/build.prop": "ro.product.model=Phone\nro.soc.model=SM8550\nro.board.platform=kalama\n",
        "dev/kgsl-3d0": "",
    }
    for i, f in enumerate(freqs):
        files[f"sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq"] = f"{f}\n"
    root = _tree(tmp_path / "phone", files)
    return Probes(root=root, system="Linux", machine="aarch64", processor="", env={"ANDROID_ROOT": "/system"},
                  cpu_count=lambda: 8, usable_cpus=lambda: 8, sysctl=lambda name: None,
                  llama_caps=lambda: {"version": "0.3.36", "gpu_offload": False, "system_info": "CPU : NEON = 1 |"},
                  onnx_providers=lambda: {"version": "1.32.0", "providers": ["CPUExecutionProvider"]})


def test_fake_raspberry_pi_4(tmp_path):
    p = fake_pi4(tmp_path)
    h = detect(p)
    assert (h.os, h.arch) == ("linux", "arm64")
    assert h.board == "Raspberry Pi 4 Model B Rev 1.4"
    assert h.cpu["model"] == "Raspberry Pi 4 Model B Rev 1.4" or "Cortex-A72" in h.cpu["model"]
    assert h.cpu["features"] == ["neon"]  # no dotprod on the A72
    assert h.cpu["performance_cores"] == 4 and h.cpu["efficiency_cores"] == 0
    assert h.memory == {"total": 3884136 * 1024, "available": 3402116 * 1024}
    assert h.gpu["cuda"] is False and h.npu == []
    assert {"what": "the onnxruntime backend", "fix": 'pip install "edgelm[onnx]"'} in h.missing
    d = runtime_defaults("llamacpp", "auto", probes=p)
    assert (d.device, d.threads, d.n_gpu_layers) == ("cpu", 4, 0)
    assert preferred_providers(p) is None


def test_fake_m2_mac(tmp_path):
    p = fake_m2(tmp_path)
    h = detect(p)
    assert (h.os, h.arch, h.board) == ("macos", "arm64", "Mac14,2")
    assert h.cpu["model"] == "Apple M2"
    assert h.cpu["performance_cores"] == 4 and h.cpu["efficiency_cores"] == 4
    assert {"neon", "dotprod", "i8mm"} <= set(h.cpu["features"])
    assert h.memory["total"] == 16 * 1024**3 and h.memory["available"] == 300000 * 16384
    assert h.gpu["metal"] and h.backends["llamacpp"]["metal"] and h.backends["llamacpp"]["gpu_offload"]
    assert any("CoreML" in n and "available" in n for n in h.npu)
    assert h.missing == []
    d = runtime_defaults("llamacpp", "auto", probes=p)
    assert (d.device, d.threads, d.n_gpu_layers) == ("gpu", 4, -1)  # Metal offload, performance cores only
    o = runtime_defaults("onnxruntime", "auto", probes=p)
    assert o.providers == ["CoreMLExecutionProvider"]


def test_fake_snapdragon_phone(tmp_path):
    p = fake_phone(tmp_path)
    h = detect(p)
    assert (h.os, h.arch, h.board) == ("android", "arm64", "SM8550")
    assert h.cpu["performance_cores"] == 5 and h.cpu["efficiency_cores"] == 3  # big.LITTLE from max frequencies
    assert "Cortex-X3" in h.cpu["model"] and "Cortex-A510" in h.cpu["model"]
    assert {"neon", "dotprod", "i8mm", "sve2"} <= set(h.cpu["features"])
    assert h.gpu["adreno"]
    assert any(n.startswith("QNN") for n in h.npu) and any(n.startswith("NNAPI") for n in h.npu)
    assert any("QNN" in m["what"] for m in h.missing)
    assert default_threads(p) == 5
    assert preferred_providers(p)[0] == "QNNExecutionProvider"
    d = runtime_defaults("llamacpp", "auto", probes=p)
    assert (d.device, d.threads) == ("cpu", 5)


def test_cpu_device_on_a_build_without_gpu_names_the_fix(tmp_path):
    with pytest.raises(edgelm.BackendError, match="CMAKE_ARGS"):
        runtime_defaults("llamacpp", "cuda", probes=fake_pi4(tmp_path))


def test_real_detection_on_this_machine():
    h = detect()
    assert h.os == "linux" and h.arch in ("x86_64", "arm64")
    assert h.memory["total"] > 1024**3 and 0 < h.memory["available"] <= h.memory["total"]
    assert h.cpu["cores_usable"] >= 1 and h.cpu["features"]
    assert h.backends["llamacpp"]["installed"] and h.backends["llamacpp"]["version"]
    assert default_threads() <= h.cpu["cores_usable"]


def test_doctor_json_has_the_documented_keys():
    r = run_cli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {"os", "arch", "cpu", "memory", "backends"} <= set(data)
    assert data["backends"]["llamacpp"]["installed"] is True


def test_devices_lists_every_profile():
    r = run_cli("devices")
    assert r.returncode == 0
    for name in ("raspberry-pi-zero-2-w", "raspberry-pi-4", "raspberry-pi-5", "apple-m1", "apple-m4",
                 "android-snapdragon", "x86-laptop", "jetson-orin-nano"):
        assert name in r.stdout
