"""A llama-cpp-python wheel for another machine's CPU: llama.cpp compiled for the device profile's CPU target
(cross-compiled for arm64 on an x86-64 workstation), packed with the Python bindings of the same release.

llama-cpp-python ships no binary wheels, and a Raspberry Pi builds it from source in tens of minutes, only with the
network.  Here the sdist's vendored llama.cpp is built with CMake (``GGML_NATIVE=OFF`` plus the profile's CMake flags,
e.g. ``GGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16`` for a Pi 5: never ``-march=native`` of the workstation), only the
four libraries the bindings load (llama, ggml, ggml-base, ggml-cpu; unversioned sonames, stripped), and written as a
``py3-none-linux_<machine>`` wheel next to the bindings (pure ctypes Python, so any CPython 3 takes it).

Wheels are cached per llama-cpp-python version and CPU target under ``$XDG_CACHE_HOME/edgelm/wheels`` (a build is
minutes, a cached one is free); a partial build never lands there (temporary folder, renamed at the end).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from edgelm.errors import BundleBuildError, ToolchainMissingError

PACKAGE = "llama-cpp-python"
LIBRARIES = ("llama", "ggml", "ggml-base", "ggml-cpu")  # what llama_cpp's ctypes bindings load
# build settings every target shares; the CPU's own flags come from the device profile
COMMON_CMAKE = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF", "-DLLAVA_BUILD=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                "-DLLAMA_BUILD_SERVER=OFF", "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON", "-DGGML_BACKEND_DL=OFF")
# Debian's cross compilers, by target machine: (compiler prefix, the apt package that installs them)
CROSS = {"aarch64": ("aarch64-linux-gnu-", "crossbuild-essential-arm64"),
         "x86_64": ("x86_64-linux-gnu-", "crossbuild-essential-amd64"),
         "armv7l": ("arm-linux-gnueabihf-", "crossbuild-essential-armhf")}
ELF_MACHINE = {"aarch64": 183, "x86_64": 62, "armv7l": 40}
ENV_VAR = "EDGELM_WHEEL_CACHE"  # another folder for the built wheels (the tests keep theirs between runs with it)
CACHE_VERSION = 1  # bump when the wheel's layout changes: a cached wheel of an older layout is rebuilt

Progress = Callable[[str, float], None]


def cache_home() -> Path:
    """$EDGELM_WHEEL_CACHE, else $XDG_CACHE_HOME/edgelm/wheels/llama-cpp-python (~/.cache/...)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "edgelm" / "wheels" / PACKAGE


def host_machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def build_key(version: str, machine: str, cpu_target: str, cmake: list[str]) -> str:
    flags = hashlib.sha256(json.dumps([CACHE_VERSION, *COMMON_CMAKE, *cmake]).encode()).hexdigest()[:8]
    return f"{version}-{machine}-{slug(cpu_target)}-{flags}"


def wheel_name(version: str, machine: str) -> str:
    return f"llama_cpp_python-{version}-py3-none-linux_{machine}.whl"


def cached_wheel(version: str, machine: str, cpu_target: str, cmake: list[str]) -> Path | None:
    folder = cache_home() / build_key(version, machine, cpu_target, cmake)
    wheel = folder / wheel_name(version, machine)
    return wheel if wheel.is_file() and (folder / "build.json").is_file() else None


def apt_packages(machine: str) -> list[str]:
    """The Debian packages that build for ``machine`` here: a cross compiler unless it is this machine, and cmake."""
    packages = ["cmake"]
    if machine != host_machine():
        packages.insert(0, CROSS[machine][1] if machine in CROSS else f"crossbuild-essential-{machine}")
    else:
        packages.insert(0, "g++")
    return packages


def toolchain(machine: str) -> dict[str, str]:
    """The compilers (and strip) that build for ``machine``; ToolchainMissingError naming the packages otherwise."""
    if machine == host_machine():
        tools = {"cc": os.environ.get("CC") or "gcc", "cxx": os.environ.get("CXX") or "g++", "strip": "strip"}
    elif machine in CROSS and sys.platform.startswith("linux"):
        prefix = CROSS[machine][0]
        tools = {"cc": f"{prefix}gcc", "cxx": f"{prefix}g++", "strip": f"{prefix}strip"}
    else:
        raise ToolchainMissingError(
            f"edgelm cannot cross-compile llama.cpp for {machine} on this {sys.platform} {host_machine()} machine.",
            fix="Build the bundle on a Debian/Ubuntu x86-64 or arm64 workstation (or on a machine of the target's "
            "kind).", machine=machine)
    tools["cmake"] = "cmake"
    missing = [tool for tool in tools.values() if not shutil.which(tool)]
    if missing:
        packages = " ".join(apt_packages(machine))
        raise ToolchainMissingError(
            f"Building llama.cpp for {machine} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
            " not installed.",
            fix=f"Run `edgelm install-cross-toolchain --machine {machine}` (it runs: apt-get install -y {packages}), "
            f"or install them yourself: sudo apt-get install {packages}.", machine=machine, missing=missing,
            packages=apt_packages(machine))
    return {k: shutil.which(v) or v for k, v in tools.items()}


def install_toolchain(machine: str, *, dry_run: bool = False, progress: Progress | None = None) -> list[str]:
    """Install the packages :func:`toolchain` needs for ``machine`` with apt-get (as root or through sudo); return the
    command.  ``dry_run``: only return it."""
    packages = apt_packages(machine)
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise ToolchainMissingError("Installing the cross toolchain needs root, and sudo is not installed.",
                                        fix=f"As root: apt-get install -y {' '.join(packages)}", packages=packages)
        prefix = ["sudo"]
    command = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *packages]
    if dry_run:
        return command
    if not shutil.which("apt-get"):
        raise ToolchainMissingError(f"No apt-get here to install {' '.join(packages)}.",
                                    fix="Install a cross compiler for the target and cmake with your package "
                                    "manager, or build the bundle on a Debian/Ubuntu machine.", packages=packages)
    if progress:
        progress(" ".join(command), 0.1)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*prefix, "apt-get", "update", "-qq"], command):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise ToolchainMissingError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {tail}",
                                        fix=f"Install them yourself: sudo apt-get install {' '.join(packages)}.",
                                        packages=packages)
    return command


def _toolchain_file(folder: Path, machine: str, tools: dict[str, str]) -> Path:
    path = folder / "toolchain.cmake"
    path.write_text("\n".join([
        "set(CMAKE_SYSTEM_NAME Linux)", f"set(CMAKE_SYSTEM_PROCESSOR {machine})",
        f"set(CMAKE_C_COMPILER {tools['cc']})", f"set(CMAKE_CXX_COMPILER {tools['cxx']})",
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)", "set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)", ""]))
    return path


def fetch_sdist(version: str, work: Path, progress: Progress | None = None) -> Path:
    """llama-cpp-python ``version``'s sdist (pip download: from pip's cache when it was built here)."""
    if progress:
        progress(f"pip download {PACKAGE}=={version} (sdist)", 0.02)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-q", "-d", str(work / "sdist"), f"{PACKAGE}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=work)
    found = sorted((work / "sdist").glob("*.tar.gz")) if proc.returncode == 0 else []
    if not found:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise BundleBuildError(f"Fetching the {PACKAGE} {version} sources failed (pip exit {proc.returncode}): {tail}",
                               fix="Check that the package index is reachable, or pass the sdist: "
                               "--llama-cpp-source llama_cpp_python-VERSION.tar.gz.")
    return found[0]


def _extract(sdist: Path, work: Path) -> Path:
    """The sdist's tree under ``work`` (llama.cpp's models, docs and tests left out: vocabularies are large)."""
    skip = ("/vendor/llama.cpp/models/", "/vendor/llama.cpp/docs/", "/vendor/llama.cpp/examples/",
            "/vendor/llama.cpp/tests/", "/vendor/llama.cpp/tools/", "/docs/", "/examples/", "/tests/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if not any(s in "/" + m.name for s in skip)]
        if sys.version_info >= (3, 12):
            tar.extractall(work / "src", members=members, filter="data")
        else:
            tar.extractall(work / "src", members=members)  # noqa: S202  (our own pip download)
    roots = [p for p in (work / "src").iterdir() if (p / "CMakeLists.txt").is_file()]
    if not roots or not (roots[0] / "llama_cpp" / "llama_cpp.py").is_file():
        raise BundleBuildError(f"{sdist.name} is not a {PACKAGE} sdist (no CMakeLists.txt and llama_cpp/).",
                               fix=f"Pass the {PACKAGE} sdist (.tar.gz) from PyPI.")
    return roots[0]


def _run(cmd: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if proc.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-6:])
        raise BundleBuildError(f"{what} failed (exit {proc.returncode}): {tail}",
                               fix=f"The whole log is {log}; a compiler too old for this llama.cpp, or CMake < 3.21?")


def _elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    return int.from_bytes(header[18:20], "little") if header[:4] == b"\x7fELF" else -1


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(path: Path, files: dict[str, bytes], *, name: str, version: str, tag: str, metadata: bytes,
                executable: tuple[str, ...] = ()) -> Path:
    """A wheel at ``path`` of ``files`` (archive name -> bytes) with its dist-info (METADATA, WHEEL, RECORD)."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    wheel = (f"Wheel-Version: 1.0\nGenerator: edgelm\nRoot-Is-Purelib: {'true' if tag.endswith('-any') else 'false'}"
             f"\nTag: {tag}\n").encode()
    entries = {**files, f"{info}/METADATA": metadata, f"{info}/WHEEL": wheel}
    record = [_record_line(n, d) for n, d in entries.items()] + [f"{info}/RECORD,,"]
    entries[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in entries.items():
            zi = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = (0o755 if arcname in executable else 0o644) << 16
            zf.writestr(zi, data)
    return path


def _pack(root: Path, libs: dict[str, Path], out: Path, version: str, machine: str, facts: dict[str, Any]) -> Path:
    files: dict[str, bytes] = {}
    for path in sorted((root / "llama_cpp").rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and "/lib/" not in rel and "__pycache__" not in rel:
            files[rel] = path.read_bytes()
    for name, path in libs.items():
        files[f"llama_cpp/lib/{name}"] = path.read_bytes()
    files["llama_cpp/lib/edgelm-build.json"] = json.dumps(facts, indent=2).encode()
    metadata = (root / "PKG-INFO").read_bytes()
    return write_wheel(out / wheel_name(version, machine), files, name="llama_cpp_python", version=version,
                       tag=f"py3-none-linux_{machine}", metadata=metadata,
                       executable=tuple(f"llama_cpp/lib/{n}" for n in libs))


def build_wheel(version: str, machine: str, cpu_target: str, cmake: list[str], *, jobs: int | None = None,
                sdist: str | os.PathLike[str] | None = None, force: bool = False,
                progress: Progress | None = None) -> Path:
    """The llama-cpp-python ``version`` wheel for ``machine`` with llama.cpp built for ``cpu_target`` (``cmake``: the
    profile's CPU flags); from the cache when it was built before."""
    report = progress or (lambda message, fraction: None)
    if not force:
        cached = cached_wheel(version, machine, cpu_target, cmake)
        if cached is not None:
            report(f"llama-cpp-python {version} for {cpu_target}: cached ({cached.parent})", 1.0)
            return cached
    tools = toolchain(machine)
    target = cache_home() / build_key(version, machine, cpu_target, cmake)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    work = Path(tempfile.mkdtemp(prefix="edgelm-llama-build-"))
    log = target.parent / f"{target.name}.log"  # kept when the build fails; moved into the cache when it works
    log.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        source = Path(sdist).expanduser() if sdist else fetch_sdist(version, work, report)
        report(f"extracting {source.name}", 0.05)
        root = _extract(source, work)
        build = work / "build"
        args = ["cmake", "-S", str(root), "-B", str(build), *COMMON_CMAKE, *cmake,
                f"-DCMAKE_C_COMPILER={tools['cc']}", f"-DCMAKE_CXX_COMPILER={tools['cxx']}"]
        if machine != host_machine():
            args.append(f"-DCMAKE_TOOLCHAIN_FILE={_toolchain_file(work, machine, tools)}")
        report(f"configuring llama.cpp for {machine} {cpu_target}", 0.08)
        _run(args, log, "Configuring llama.cpp (cmake)")
        jobs = jobs or os.cpu_count() or 2
        report(f"compiling llama.cpp for {cpu_target} with {jobs} jobs (minutes; log: {log})", 0.1)
        _run(["cmake", "--build", str(build), "--parallel", str(jobs), "--target", *LIBRARIES], log,
             "Compiling llama.cpp")
        libs: dict[str, Path] = {}
        for lib in LIBRARIES:
            found = sorted(build.rglob(f"lib{lib}.so"))
            if not found:
                raise BundleBuildError(f"The build wrote no lib{lib}.so.", fix=f"See {log}.")
            stripped = work / f"lib{lib}.so"
            shutil.copyfile(found[0], stripped)
            _run([tools["strip"], "--strip-unneeded", str(stripped)], log, f"Stripping lib{lib}.so")
            if _elf_machine(stripped) != ELF_MACHINE.get(machine, -2):
                raise BundleBuildError(f"lib{lib}.so was built for ELF machine {_elf_machine(stripped)}, not {machine}.",
                                       fix="Check the cross compiler (CC/CXX set to the host's?).")
            libs[f"lib{lib}.so"] = stripped
        facts = {"llama_cpp_python": version, "machine": machine, "cpu_target": cpu_target,
                 "cmake": [*COMMON_CMAKE, *cmake], "compiler": tools["cxx"],
                 "seconds": round(time.perf_counter() - start, 1)}
        report("packing the wheel", 0.95)
        _pack(root, libs, tmp, version, machine, facts)
        (tmp / "build.json").write_text(json.dumps(facts, indent=2))
        os.replace(log, tmp / "build.log")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    report(f"built {target / wheel_name(version, machine)}", 1.0)
    return target / wheel_name(version, machine)
