"""The wheels a bundle carries: edgelm itself (built from the installed source), the llama-cpp-python wheel built for
the device's CPU (:mod:`edgelm.deploy.crossbuild`), and every dependency as a binary wheel for the device's platform
and Python, fetched by this machine's pip (``pip download --platform ... --only-binary=:all:``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgelm.errors import BundleBuildError, InvalidParameterError

from .crossbuild import write_wheel

Progress = Callable[[str, float], None]
EXTRAS = ("llamacpp", "serve")  # what the device installs: llama.cpp and `edgelm serve`
# wheel platform tags a pip on a machine takes, from newest glibc baseline down (a bare linux_<machine> expands to them)
PLATFORM_FAMILY = ("manylinux_2_28_{m}", "manylinux_2_17_{m}", "manylinux2014_{m}", "linux_{m}")


def platform_tags(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``linux_aarch64`` -> the manylinux tags of aarch64 and itself; a comma-separated list is taken as given."""
    tags = [t.strip() for t in (value.split(",") if isinstance(value, str) else value) if t.strip()]
    if len(tags) == 1 and re.fullmatch(r"linux_\w+", tags[0]):
        return [f.format(m=tags[0][len("linux_"):]) for f in PLATFORM_FAMILY]
    if not tags or not all(re.fullmatch(r"(manylinux\w*|musllinux\w*|linux|macosx_\d+_\d+|win)_\w+", t) for t in tags):
        raise InvalidParameterError(f"Invalid wheel platform {value!r}.",
                                    fix="Use a wheel platform tag such as linux_aarch64, linux_x86_64 or "
                                    "manylinux_2_28_aarch64 (several: comma-separated).", parameter="platform",
                                    value=value)
    return tags


def machine_of(tags: list[str]) -> str:
    """The machine a list of platform tags is for (aarch64, x86_64, ...)."""
    machines = {re.sub(r"^(manylinux_\d+_\d+|manylinux\d+|musllinux_\d+_\d+|linux)_", "", t) for t in tags}
    if len(machines) != 1:
        raise InvalidParameterError(f"The platform tags {tags} name several machines ({', '.join(sorted(machines))}).",
                                    fix="Give the tags of one machine.", parameter="platform", value=tags)
    return machines.pop()


def python_tag(version: str) -> tuple[str, str]:
    """"3.11" -> ("3.11", "cp311"); refuses what is not MAJOR.MINOR."""
    m = re.fullmatch(r"\s*3\.(\d+)\s*", str(version))
    if not m:
        raise InvalidParameterError(f"Invalid Python version {version!r}.", fix="Use MAJOR.MINOR, e.g. 3.11 or 3.13.",
                                    parameter="python", value=version)
    return f"3.{m.group(1)}", f"cp3{m.group(1)}"


def _source_dir(dist: metadata.Distribution) -> Path | None:
    """The source folder edgelm runs from (an editable install or a checkout on sys.path), or the folder it was
    installed from (pip install .), else None."""
    here = Path(__file__).resolve().parents[2]  # edgelm/deploy/wheels.py -> the folder holding edgelm/
    project = here / "pyproject.toml"
    if project.is_file() and re.search(r'^name\s*=\s*"edgelm"', project.read_text(encoding="utf-8"), re.M):
        return here
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    url = json.loads(text).get("url", "")
    if not url.startswith("file://"):
        return None
    folder = Path(url[len("file://"):])
    return folder if (folder / "pyproject.toml").is_file() else None


def edgelm_wheel(out: Path, progress: Progress | None = None) -> Path:
    """A wheel of the installed edgelm in ``out``: built from its source folder (an editable or folder install),
    else packed from the installed files (their RECORD)."""
    dist = metadata.distribution("edgelm")
    source = _source_dir(dist)
    if source is not None:
        if progress:
            progress(f"building the edgelm wheel from {source}", 0.0)
        with tempfile.TemporaryDirectory(prefix="edgelm-src-") as tmp:
            # a copy, so the build leaves nothing (build/, *.egg-info) in the user's tree
            copy = Path(tmp) / "src"
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns(
                ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "tests", "benchmarks",
                "examples", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.gguf", "*.onnx"))
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                   "-w", str(out), str(copy)]
            # with this environment's setuptools first (no download); one too old for the pyproject (a venv's
            # bundled setuptools 65): in an isolated build environment, as pip does by default
            for isolation in (["--no-build-isolation"], []):
                proc = subprocess.run(cmd[:4] + isolation + cmd[4:], capture_output=True, text=True, errors="replace",
                                      cwd=tmp)
                if proc.returncode == 0:
                    break
        found = sorted(out.glob("edgelm-*.whl"))
        if proc.returncode != 0 or not found:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            tail = " | ".join(([line.strip() for line in lines if "error" in line.lower()] or lines)[-3:])
            raise BundleBuildError(f"Building the edgelm wheel from {source} failed: {tail}",
                                   fix="Check that `pip wheel --no-deps --no-build-isolation .` works there "
                                   "(setuptools and wheel installed).")
        return found[0]
    if progress:
        progress("packing the installed edgelm as a wheel", 0.0)
    files: dict[str, bytes] = {}
    base = Path(str(dist.locate_file("")))
    for entry in dist.files or []:
        rel = entry.as_posix()
        if ".dist-info/" in rel or "__pycache__" in rel or rel.startswith(".."):
            continue
        path = base / rel
        if path.is_file():
            files[rel] = path.read_bytes()
    meta = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    if "\nVersion:" not in meta:
        raise BundleBuildError(f"The installed edgelm ({dist.locate_file('')}) has no readable metadata.",
                               fix="Reinstall edgelm (pip install edgelm, or pip install -e . in its checkout).")
    entry_points = dist.read_text("entry_points.txt")
    info = f"edgelm-{dist.version}.dist-info"
    if entry_points:
        files[f"{info}/entry_points.txt"] = entry_points.encode()
    return write_wheel(out / f"edgelm-{dist.version}-py3-none-any.whl", files, name="edgelm", version=dist.version,
                       tag="py3-none-any", metadata=meta.encode())


def download(requirements: list[str], out: Path, *, platforms: list[str], python: str, find_links: list[Path],
             progress: Progress | None = None) -> list[Path]:
    """Every wheel ``requirements`` need on the device, into ``out`` (the ones in ``find_links`` included)."""
    version, abi = python_tag(python)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--disable-pip-version-check",
           "--python-version", version, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
           "-d", str(out)]
    for tag in platforms:
        cmd += ["--platform", tag]
    for folder in find_links:
        cmd += ["--find-links", str(folder)]
    if progress:
        progress(f"pip download for {platforms[0]}, Python {version}: {' '.join(requirements)}", 0.0)
    proc = subprocess.run([*cmd, *requirements], capture_output=True, text=True, errors="replace", cwd=out)
    if proc.returncode != 0:
        tail = " | ".join(line for line in (proc.stdout + proc.stderr).strip().splitlines()[-4:])
        raise BundleBuildError(
            f"Fetching the device's wheels failed (pip exit {proc.returncode}): {tail}",
            fix="A dependency may have no binary wheel for this platform and Python (try another --python), or the "
            "package index is unreachable.", platforms=platforms, python=version)
    return sorted(out.glob("*.whl"))


def requirement(version: str) -> str:
    return f"edgelm[{','.join(EXTRAS)}]=={version}"
