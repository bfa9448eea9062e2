"""Offline bundles, the fast parts: the manifest and its check, install.sh refusing a damaged copy (the real script
under the real sh and sha256sum), verify's fit checks, the device target from the profile and its overrides, the
toolchain error, the launcher's flags.  The emulated Raspberry Pi installs are in tests/test_bundle_device.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import edgelm
from edgelm.deploy import api, crossbuild, manifest, scripts, wheels
from edgelm.plan import Plan


def _fake_bundle(root: Path, *, profile: str = "raspberry-pi-5", memory: int = 300 * 2**20) -> Path:
    """A small bundle laid out as `edgelm bundle` writes it (a fake model, empty wheels), with the real scripts."""
    t = api.target(profile)
    (root / "model").mkdir(parents=True)
    (root / "model" / "tiny.gguf").write_bytes(os.urandom(4096))
    (root / "wheels").mkdir()
    for name in ("llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl", "edgelm-0.1.0-py3-none-any.whl",
                 "numpy-2.2.0-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"):
        (root / "wheels" / name).write_bytes(b"PK\x05\x06" + bytes(18))
    (root / scripts.INSTALL).write_text(scripts.install_script(
        title="tiny", machine=t.machine, python=t.python, requirement="edgelm[llamacpp,serve]==0.1.0",
        model_file="tiny.gguf", host="127.0.0.1", port=8080))
    plan = {"memory_bytes": memory, "quant": "Q4_1", "n_ctx": 2048, "threads": 4, "tokens_per_second": 20.0}
    manifest.write(root, {"profile": t.device.name, "device": t.device.title, "plan": plan,
                          "target": {"machine": t.machine, "python": t.python, "platforms": t.platforms,
                                     "cpu_target": t.cpu_target}})
    return root


def test_manifest_names_changed_missing_and_extra_files(tmp_path):
    root = _fake_bundle(tmp_path / "b")
    report = edgelm.verify_bundle(root)
    assert report.files == 5 and report.profile == "raspberry-pi-5-8gb"
    data = json.loads((root / manifest.MANIFEST).read_text())
    assert set(data["files"]) == {"install.sh", "model/tiny.gguf", *(f"wheels/{p.name}" for p in
                                                                       (root / "wheels").iterdir())}
    model = root / "model" / "tiny.gguf"
    raw = bytearray(model.read_bytes())
    raw[100] ^= 1
    model.write_bytes(bytes(raw))
    (root / "wheels" / "edgelm-0.1.0-py3-none-any.whl").unlink()
    (root / "stray.txt").write_text("x")
    with pytest.raises(edgelm.BundleCorruptError) as err:
        edgelm.verify_bundle(root)
    assert err.value.changed == ["model/tiny.gguf"] and err.value.extra == ["stray.txt"]
    assert err.value.missing == ["wheels/edgelm-0.1.0-py3-none-any.whl"]
    assert "model/tiny.gguf" in str(err.value) and "stray.txt" in str(err.value)


def test_an_edited_manifest_is_refused(tmp_path):
    root = _fake_bundle(tmp_path / "b")
    data = json.loads((root / manifest.MANIFEST).read_text())
    data["plan"]["memory_bytes"] = 1  # "fits anything", without matching SHA256SUMS
    (root / manifest.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(edgelm.BundleCorruptError, match="manifest.json"):
        edgelm.verify_bundle(root)
    with pytest.raises(edgelm.BundleCorruptError, match="not an edgelm bundle"):
        edgelm.verify_bundle(tmp_path)


@pytest.mark.skipif(not shutil.which("sha256sum"), reason="install.sh checks with coreutils' sha256sum")
def test_install_sh_refuses_one_corrupted_byte_naming_the_file(tmp_path):
    root = _fake_bundle(tmp_path / "b")
    model = root / "model" / "tiny.gguf"
    raw = bytearray(model.read_bytes())
    raw[2048] ^= 0x40
    model.write_bytes(bytes(raw))
    proc = subprocess.run(["sh", str(root / scripts.INSTALL), str(tmp_path / "prefix")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "refusing this bundle" in proc.stderr and "model/tiny.gguf" in proc.stderr
    assert not (tmp_path / "prefix").exists()  # refused before anything was installed


def test_install_sh_refuses_a_file_the_manifest_does_not_list(tmp_path):
    root = _fake_bundle(tmp_path / "b")
    (root / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    proc = subprocess.run(["sh", str(root / scripts.INSTALL), str(tmp_path / "prefix")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3 and "wheels/evil-1.0-py3-none-any.whl" in proc.stderr, proc.stderr


def test_install_sh_refuses_another_machine(tmp_path):
    """The hashes pass; this x86-64 machine is not the bundle's aarch64: refused before any install."""
    if crossbuild.host_machine() == "aarch64":
        pytest.skip("this machine is aarch64")
    root = _fake_bundle(tmp_path / "b")
    proc = subprocess.run(["sh", str(root / scripts.INSTALL), str(tmp_path / "prefix")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 4 and "this bundle is for aarch64" in proc.stderr, proc.stderr


def test_verify_checks_the_fit_against_the_profile(tmp_path):
    big = _fake_bundle(tmp_path / "big", profile="raspberry-pi-5", memory=3 * 2**30)
    assert edgelm.verify_bundle(big).profile == "raspberry-pi-5-8gb"
    with pytest.raises(edgelm.DoesNotFitError, match="2GB"):
        edgelm.verify_bundle(big, "raspberry-pi-5-2gb")
    with pytest.raises(edgelm.InvalidParameterError, match="armv8.2-a"):  # a Pi 5 build would SIGILL on a Pi 4
        edgelm.verify_bundle(big, "raspberry-pi-4")
    with pytest.raises(edgelm.InvalidParameterError, match="x86_64"):
        edgelm.verify_bundle(big, "x86-laptop")


def test_the_target_comes_from_the_profile_and_the_overrides():
    pi5 = api.target("raspberry-pi-5-4gb")
    assert (pi5.machine, pi5.python, pi5.qemu_cpu) == ("aarch64", "3.11", "cortex-a76")
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" in pi5.cmake and "linux_aarch64" in pi5.platforms
    assert api.target("raspberry-pi-4").cmake == ["-DGGML_CPU_ARM_ARCH=armv8-a"]
    laptop = api.target("x86-laptop")
    assert laptop.cpu_target == "x86-64-v2" and "-DGGML_AVX2=OFF" in laptop.cmake
    assert not any("native" in flag.lower() and "=ON" in flag for flag in laptop.cmake + list(crossbuild.COMMON_CMAKE))
    over = api.target("raspberry-pi-5", platform="linux_aarch64", python="3.13")
    assert over.python == "3.13" and over.platforms[0] == "manylinux_2_28_aarch64"
    assert over.platforms[-1] == "linux_aarch64"
    with pytest.raises(edgelm.InvalidParameterError, match="x86_64"):
        api.target("raspberry-pi-5", platform="linux_x86_64")
    with pytest.raises(edgelm.InvalidParameterError, match="MAJOR.MINOR"):
        api.target("raspberry-pi-5", python="eleven")
    with pytest.raises(edgelm.InvalidParameterError, match="bundle"):
        api.target("apple-m2")  # no "bundle" section in its profile
    assert wheels.platform_tags("manylinux_2_28_aarch64,linux_aarch64") == ["manylinux_2_28_aarch64", "linux_aarch64"]


def test_the_wheel_cache_is_keyed_by_version_and_cpu_target(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pi5, pi4 = api.target("raspberry-pi-5"), api.target("raspberry-pi-4")
    keys = {crossbuild.build_key("0.3.36", t.machine, t.cpu_target, t.cmake) for t in (pi5, pi4)}
    keys.add(crossbuild.build_key("0.3.37", pi5.machine, pi5.cpu_target, pi5.cmake))
    assert len(keys) == 3
    assert crossbuild.cached_wheel("0.3.36", pi5.machine, pi5.cpu_target, pi5.cmake) is None
    assert str(crossbuild.cache_home()).startswith(str(tmp_path))


def test_a_missing_cross_compiler_names_the_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.setattr(crossbuild, "host_machine", lambda: "x86_64")
    with pytest.raises(edgelm.ToolchainMissingError) as err:
        crossbuild.toolchain("aarch64")
    assert "crossbuild-essential-arm64" in err.value.fix and "edgelm install-cross-toolchain" in err.value.fix
    assert "aarch64-linux-gnu-gcc" in err.value.message
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert crossbuild.install_toolchain("aarch64", dry_run=True)[:3] == ["apt-get", "install", "-y"]
    from click.testing import CliRunner

    from edgelm.cli import main
    result = CliRunner().invoke(main, ["install-cross-toolchain", "--dry-run"])
    assert "crossbuild-essential-arm64 cmake" in result.output


def test_the_launcher_follows_the_plan_with_flags_from_the_load_table():
    plan = Plan(model="m", device="raspberry-pi-5-8gb", device_title="Pi", backend="llamacpp", format="gguf",
                quant="Q4_1", n_ctx=2048, threads=4, n_gpu_layers=0, kv_cache="f16", memory_bytes=1,
                memory_breakdown={}, device_memory_bytes=2, tokens_per_second=1.0, bound_by="memory bandwidth",
                needs_conversion=False, parallel=2)
    args = api._serve_args(plan, "127.0.0.1", 8080)
    assert args == ["--host", "127.0.0.1", "--port", "8080", "--n-ctx", "2048", "--threads", "4", "--kv-cache",
                    "f16", "--parallel", "2"]
    text = scripts.launcher(title="t", model_name="m", model_file="m.gguf", args=args)
    assert '"m=$PREFIX/models/m.gguf" --host 127.0.0.1 --port 8080 --n-ctx 2048' in text
    with pytest.raises(edgelm.InsecureBindError):
        edgelm.bundle("x.gguf", profile="raspberry-pi-5", output="o", serve_host="0.0.0.0")
    with pytest.raises(edgelm.InvalidParameterError, match="profil"):
        edgelm.bundle("x.gguf", profil="raspberry-pi-5", output="o")  # type: ignore[call-arg]


def test_written_wheels_carry_a_record_pip_accepts(tmp_path):
    path = crossbuild.write_wheel(tmp_path / "demo_pkg-1.0-py3-none-any.whl", {"demo_pkg/__init__.py": b"X = 1\n"},
                                  name="demo_pkg", version="1.0", tag="py3-none-any",
                                  metadata=b"Metadata-Version: 2.1\nName: demo_pkg\nVersion: 1.0\n")
    with zipfile.ZipFile(path) as zf:
        record = zf.read("demo_pkg-1.0.dist-info/RECORD").decode()
    assert "demo_pkg/__init__.py,sha256=" in record
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q",
                           "--target", str(target), str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (target / "demo_pkg" / "__init__.py").read_text() == "X = 1\n"


def test_verify_reads_an_archive_too(tmp_path):
    root = _fake_bundle(tmp_path / "pi5")
    archive = tmp_path / "pi5.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(tmp_path), "pi5"], check=True)
    assert edgelm.verify_bundle(archive).bundle == str(archive)
    (root / "model" / "tiny.gguf").write_bytes(b"changed")
    subprocess.run(["tar", "-czf", str(archive), "-C", str(tmp_path), "pi5"], check=True)
    with pytest.raises(edgelm.BundleCorruptError, match="model/tiny.gguf"):
        edgelm.verify_bundle(archive)
