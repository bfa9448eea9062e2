from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _edgelm_home(tmp_path_factory):
    """edgelm's store index (edgelm.store: last used, recorded outputs) is written under a temporary folder in
    tests, never ~/.cache/edgelm; CLI subprocesses inherit it."""
    old = os.environ.get("EDGELM_HOME")
    os.environ["EDGELM_HOME"] = str(tmp_path_factory.mktemp("edgelm-home"))
    yield
    if old is None:
        os.environ.pop("EDGELM_HOME", None)
    else:
        os.environ["EDGELM_HOME"] = old


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
