from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SESSION_HOME: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """No test writes outside temporary folders: HOME, the XDG and Hugging Face caches and edgelm's own folders
    point into one folder for this test session (removed at the end), for this process and every command the
    tests run.  llama.cpp's converter, installed by `edgelm install-converter` under the real cache, is found
    first and named by EDGELM_GGUF_CONVERTER (the RPC module of `edgelm install-rpc` and optimum-onnx likewise:
    EDGELM_RPC_MODULE, EDGELM_OPTIMUM).  EDGELM_TEST_CACHE (optional) keeps the derived SmolLM2 checkpoint between
    sessions; by default it is derived once per session."""
    global _SESSION_HOME
    if _SESSION_HOME is not None:
        return
    from edgelm.converters.hf_gguf import ENV_VAR, find_converter
    from edgelm.native import rpc_module as rpc_build

    found = find_converter()
    if found is not None and found[1]:
        os.environ[ENV_VAR] = str(found[0].parent)
    rpc_module = rpc_build.installed_module()  # `edgelm install-rpc` put it under the real cache
    if rpc_module is not None:
        os.environ[rpc_build.ENV_VAR] = str(rpc_module)
    from edgelm.converters.onnx import optimum as optimum_onnx

    optimum_dir = optimum_onnx.find_optimum()  # `edgelm install-converter` put optimum-onnx there too
    if optimum_dir is not None:
        os.environ[optimum_onnx.ENV_VAR] = str(optimum_dir)
    _SESSION_HOME = Path(tempfile.mkdtemp(prefix="edgelm-tests-"))
    home = _SESSION_HOME / "home"
    for name, sub in (("HOME", "home"), ("XDG_CACHE_HOME", "home/.cache"), ("XDG_CONFIG_HOME", "home/.config"),
                      ("HF_HOME", "hf"), ("EDGELM_HOME", "edgelm"), ("MPLCONFIGDIR", "home/.config/matplotlib")):
        folder = _SESSION_HOME / sub
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ.setdefault("EDGELM_TEST_CACHE", str(home / "edgelm-tests"))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_HOME is not None:
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    import edgelm

    try:
        return edgelm.default_model_path()
    except edgelm.DefaultModelMissingError as exc:  # the README's test command installs it
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def smollm(default_gguf: Path):
    """The real SmolLM2-135M-Instruct on llama.cpp, shared by the slow tests of a session."""
    import edgelm

    with edgelm.load(default_gguf, n_ctx=2048) as m:
        yield m


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 300):
    """Run the installed `edgelm` command for real (a subprocess, as a user would)."""
    exe = shutil.which("edgelm") or sys.executable
    cmd = [exe, *args] if exe != sys.executable else [sys.executable, "-m", "edgelm", *args]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("EDGELM_DEBUG", None)
    return subprocess.run(cmd, input=input, capture_output=True, text=True, env=full_env, timeout=timeout)
