"""edgelm's PyInstaller hooks, without running PyInstaller (the freeze itself: tests/test_desktop_freeze.py)."""

from __future__ import annotations

import runpy
from importlib import metadata
from pathlib import Path

from edgelm._pyinstaller import get_hook_dirs


def test_the_hooks_are_registered_for_pyinstaller():
    points = [ep for ep in metadata.entry_points(group="pyinstaller40") if ep.value.startswith("edgelm.")]
    assert [(ep.name, ep.value) for ep in points] == [("hook-dirs", "edgelm._pyinstaller:get_hook_dirs")]
    (folder,) = get_hook_dirs()
    names = {p.name for p in Path(folder).glob("hook-*.py")}
    assert {"hook-edgelm.py", "hook-llama_cpp.py", "hook-onnxruntime.py"} <= names


def test_the_edgelm_hook_collects_package_data_and_backends_and_leaves_torch_out(monkeypatch):
    monkeypatch.setenv("EDGELM_PYINSTALLER_DEFAULT_MODEL", "0")
    hook = runpy.run_path(str(Path(get_hook_dirs()[0]) / "hook-edgelm.py"))
    dests = {(Path(src).name, dest) for src, dest in hook["datas"]}
    assert any(dest == str(Path("edgelm/platforms/profiles")) and name.endswith(".json") for name, dest in dests)
    assert any(dest.startswith(str(Path("edgelm/server/static"))) for _, dest in dests)
    assert all(not name.endswith((".py", ".pyc")) for name, _ in dests)
    assert not any(name.endswith(".gguf") for name, _ in dests)  # left out when asked
    assert "edgelm.runtimes.llamacpp" in hook["hiddenimports"]
    assert {"torch", "transformers", "onnx"} <= set(hook["excludedimports"])
