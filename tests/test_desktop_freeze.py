"""The desktop example frozen with PyInstaller (one-folder mode) as a desktop developer does it: edgelm installed
normally (not editable: PyInstaller cannot follow an editable install's import hook), then `pyinstaller app.py` with
no flags (edgelm's hooks, found through its pyinstaller40 entry point, collect llama.cpp, package data and the
default model).  The frozen program then runs with no Python: `env -i`, PATH holding no python, HOME a temporary
folder, no network (`unshare -n`, where the kernel allows it), with --self-test.

Frozen once per session (about a minute or two); its size and time are printed (run with -s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .desktop_helpers import APP, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.desktop]

LEFT_OUT = ("torch", "transformers", "matplotlib", "IPython", "onnx", "scipy")  # must not be in the bundle


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.fixture(scope="session")
def frozen_app(tmp_path_factory) -> Path:
    """dist/app/ of the example, frozen once per session."""
    pytest.importorskip("PyInstaller", reason="pip install pyinstaller (edgelm's desktop extra)")
    work = tmp_path_factory.mktemp("freeze")
    site = work / "site"
    # edgelm as a user has it: a regular install (the editable one's import hook is invisible to PyInstaller)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                              str(ROOT)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    shutil.copy(APP, work / "app.py")
    env = {**os.environ, "PYTHONPATH": str(site)}
    start = time.perf_counter()
    build = subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "app.py"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    assert build.returncode == 0, build.stderr[-5000:]
    dist = work / "dist" / "app"
    internal = dist / "_internal"
    parts = {
        "model": sum(f.stat().st_size for f in internal.rglob("*.gguf")),
        "llama.cpp": _size(internal / "llama_cpp"),
        "Qt (PySide6, shiboken6)": _size(internal / "PySide6") + _size(internal / "shiboken6"),
        "Python runtime": sum(f.stat().st_size for f in internal.glob("libpython*")) + _size(internal / "python3.11")
        + (internal / "base_library.zip").stat().st_size,
    }
    # the ONNX backend's runtime and numpy (with its OpenBLAS) are shared libraries the app carries too
    more = {"onnxruntime backend": sum(_size(internal / n) for n in ("onnxruntime", "onnxruntime_genai", "tokenizers")),
            "numpy": _size(internal / "numpy") + _size(internal / "numpy.libs")}
    total = _size(dist)
    base = sum(parts.values())
    every = base + sum(more.values())
    print(f"\nfrozen in {seconds:.0f} s: {total / 2**20:.0f} MB; "
          + ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in {**parts, **more}.items())
          + f"; the rest {(total - every) / 2**20:.0f} MB; total / (llama.cpp + Qt + model + Python) = {total / base:.2f}"
          + f", / (those + onnxruntime + numpy) = {total / every:.2f}")
    return dist


def test_nothing_from_torch_or_transformers_is_frozen_in(frozen_app):
    internal = frozen_app / "_internal"
    found = [name for name in LEFT_OUT if (internal / name).exists()]
    assert not found, f"frozen into the app: {found}"
    assert list((internal / "llama_cpp" / "lib").glob("libllama*")), "llama.cpp's shared library was not collected"
    assert list(internal.rglob("*.gguf")), "the default model was not bundled"
    assert (internal / "edgelm" / "platforms" / "profiles").is_dir(), "edgelm's package data was not collected"


def test_the_frozen_app_runs_with_no_python_and_no_network(frozen_app, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    empty_path = tmp_path / "bin"  # no python here, nor anything else
    empty_path.mkdir()
    command = ["env", "-i", f"HOME={home}", f"PATH={empty_path}", str(frozen_app / "app"), "--self-test"]
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        command = [unshare, "-rn", *command]  # a network namespace with nothing in it
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "self-test ok: 8 tokens" in out.stdout, out.stdout[-3000:]
    print("\n" + out.stdout.strip().splitlines()[-1])
