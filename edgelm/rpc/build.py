"""``edgelm install-rpc``: llama.cpp's RPC backend, compiled for the llama-cpp-python already installed.

llama-cpp-python builds llama.cpp without its RPC backend unless ``CMAKE_ARGS="-DGGML_RPC=on"`` was set, and pip
reuses a wheel it built before whatever CMAKE_ARGS say (its wheel cache is keyed by the sdist), so rebuilding the
whole package (4-7 minutes on 2 cores) is both slow and easy to get silently wrong.  Instead this compiles only
``ggml/src/ggml-rpc`` (two files, ~10 s of CPU) from the llama.cpp tree of the *same* llama-cpp-python release (its
sdist, fetched with pip, usually from pip's cache), as a loadable ggml backend module linked against the installed
``libggml-base``; :mod:`edgelm.native.rpc` loads it with ``ggml_backend_load``.  The module is stored per build
(llama-cpp-python version + a hash of its libggml-base), checked in a child process (loaded, and a worker served and
queried on loopback) before it is put in place, and ignored by a different build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from edgelm.errors import BackendNotInstalledError
from edgelm.native.rpc_module import PACKAGE, build_key, lib_dir, llama_cpp_version, module_name, rpc_home

SOURCES = ("ggml/src/ggml-rpc/ggml-rpc.cpp", "ggml/src/ggml-rpc/transport.cpp")

Progress = Callable[[str, float], None]


def built_in() -> bool:
    """True when llama-cpp-python was built with -DGGML_RPC=on (asked in a child: nothing is loaded here)."""
    code = ("from edgelm.native import rpc; g = rpc.ggml(); print(int(bool(g.reg_by_name(b'RPC'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace", timeout=120)
    return proc.returncode == 0 and proc.stdout.strip().endswith("1")


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate) or candidate
    raise BackendNotInstalledError(
        "No C++ compiler found (tried $CXX, c++, g++, clang++): edgelm install-rpc compiles llama.cpp's RPC backend.",
        fix="Install one (Debian/Raspberry Pi OS: sudo apt install g++; macOS: xcode-select --install), the same "
        "compiler llama-cpp-python itself was built with.", backend="rpc", extra="llamacpp")


def _fetch_sources(version: str, work: Path, source: Path | None, progress: Progress | None) -> Path:
    """The llama.cpp tree of llama-cpp-python ``version`` (only the ggml headers and ggml-rpc), under ``work``."""
    if source is not None and source.is_dir():
        root = source / "vendor" / "llama.cpp" if (source / "vendor" / "llama.cpp").is_dir() else source
        if not (root / SOURCES[0]).is_file():
            raise BackendNotInstalledError(f"{source} is not a llama.cpp tree (no {SOURCES[0]}).",
                                           fix="Pass the llama.cpp folder, or the llama-cpp-python sdist.",
                                           backend="rpc", extra="llamacpp")
        return root
    if source is None:
        if progress:
            progress(f"pip download {PACKAGE}=={version} (sdist; from pip's cache when it built it here)", 0.1)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", str(work / "sdist"), f"{PACKAGE}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        found = sorted((work / "sdist").glob("*.tar.gz")) if proc.returncode == 0 else []
        if not found:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            raise BackendNotInstalledError(
                f"Fetching the {PACKAGE} {version} sources failed (pip exit code {proc.returncode}): {tail}",
                fix="Check that the package index is reachable, or pass the sdist or a llama.cpp tree: "
                "edgelm install-rpc --source llama_cpp_python-VERSION.tar.gz", backend="rpc", extra="llamacpp")
        source = found[0]
    if progress:
        progress(f"extracting ggml headers and ggml-rpc from {source.name}", 0.3)
    root = work / "src"
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if "vendor" not in parts or not member.isfile():
                continue
            rel = "/".join(parts[parts.index("vendor") + 2:])  # after vendor/llama.cpp/
            if rel.startswith("ggml/include/") or rel.startswith("ggml/src/ggml-rpc/") or \
                    (rel.startswith("ggml/src/") and rel.count("/") == 2 and rel.endswith(".h")):
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as fh, open(target, "wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(fh, out)
    if not (root / SOURCES[0]).is_file():
        raise BackendNotInstalledError(f"{source} holds no vendor/llama.cpp/{SOURCES[0]}.",
                                       fix=f"Use the {PACKAGE} sdist of the installed version ({version}).",
                                       backend="rpc", extra="llamacpp")
    return root


def compile_command(root: Path, lib_dir: Path, output: Path, compiler: str) -> list[str]:
    cmd = [compiler, "-shared", "-fPIC", "-O3", "-DNDEBUG", "-std=c++17", "-pthread", "-fvisibility=hidden",
           # a loadable ggml backend module (GGML_BACKEND_DL: exports ggml_backend_init) of a shared ggml build
           "-DGGML_BACKEND_DL", "-DGGML_BACKEND_BUILD", "-DGGML_BACKEND_SHARED", "-DGGML_SHARED",
           f"-I{root / 'ggml/include'}", f"-I{root / 'ggml/src'}", f"-I{root / 'ggml/src/ggml-rpc'}",
           *[str(root / s) for s in SOURCES], f"-L{lib_dir}", "-o", str(output)]
    if sys.platform == "darwin":
        cmd += ["-lggml-base", f"-Wl,-rpath,{lib_dir}", "-undefined", "dynamic_lookup"]
    else:
        cmd += ["-D_GNU_SOURCE", "-l:libggml-base.so.0" if (lib_dir / "libggml-base.so.0").exists() else "-lggml-base",
                f"-Wl,-rpath,{lib_dir}"]
    return cmd


_CHECK = r"""
import json, sys, threading, time, socket
from edgelm.native import rpc
from edgelm.rpc import protocol
g = rpc.ggml()
reg = g.load(sys.argv[1].encode())
assert reg and g.reg_by_name(b"RPC"), "ggml_backend_load did not register RPC"
for name in (b"ggml_backend_rpc_add_server", b"ggml_backend_rpc_start_server"):
    assert g.proc(reg, name), name
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
devices = rpc.serving_devices()
threading.Thread(target=rpc.start_server, args=(f"127.0.0.1:{port}", None, 1, devices), daemon=True).start()
for _ in range(100):
    try:
        info = protocol.query(f"127.0.0.1:{port}", timeout=2.0); break
    except Exception:
        time.sleep(0.05)
print("EDGELM_RPC_CHECK", json.dumps({"version": list(info.version), "devices": info.devices}), flush=True)
"""


def install_rpc(*, force: bool = False, source: str | os.PathLike[str] | None = None,
                progress: Progress | None = None) -> Path | None:
    """Compile llama.cpp's RPC backend for the installed llama-cpp-python (once per build); return the module (None
    when llama-cpp-python was built with it: nothing to do).

    ``source``: the llama-cpp-python sdist (.tar.gz) or a llama.cpp tree, instead of fetching it with pip."""
    libs = lib_dir()
    if built_in():
        if progress:
            progress("llama.cpp's RPC backend is built into this llama-cpp-python: nothing to build", 1.0)
        return None
    target = rpc_home()
    module = target / module_name()
    if module.is_file() and (target / "build.json").is_file() and not force:
        if progress:
            progress(f"already built for this llama-cpp-python: {module}", 1.0)
        return module
    version = llama_cpp_version()
    compiler = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    work = Path(tempfile.mkdtemp(prefix="edgelm-rpc-src-"))
    start = time.perf_counter()
    try:
        root = _fetch_sources(version, work, Path(source).expanduser() if source else None, progress)
        out = tmp / module_name()
        cmd = compile_command(root, libs, out, compiler)
        if progress:
            progress(f"compiling ggml-rpc with {Path(compiler).name} (about 10 s of CPU)", 0.5)
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0 or not out.is_file():
            tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
            raise BackendNotInstalledError(f"Compiling llama.cpp's RPC backend failed: {tail}",
                                           fix="Check the compiler (the one llama-cpp-python was built with), or "
                                           "reinstall llama-cpp-python with CMAKE_ARGS=\"-DGGML_RPC=on\".",
                                           backend="rpc", extra="llamacpp")
        if progress:
            progress("checking it: loaded into llama.cpp, a worker served and queried on loopback", 0.8)
        check = subprocess.run([sys.executable, "-c", _CHECK, str(out)], capture_output=True, text=True,
                               errors="replace", timeout=120)
        if check.returncode != 0:
            tail = " | ".join((check.stdout + check.stderr).strip().splitlines()[-3:])
            raise BackendNotInstalledError(f"The RPC module built for {PACKAGE} {version} does not work with it: {tail}",
                                           fix="Reinstall llama-cpp-python with CMAKE_ARGS=\"-DGGML_RPC=on\" instead.",
                                           backend="rpc", extra="llamacpp")
        facts = json.loads(next(line.split(" ", 1)[1] for line in check.stdout.splitlines()
                                if line.startswith("EDGELM_RPC_CHECK ")))
        (tmp / "build.json").write_text(json.dumps({
            "llama_cpp_python": version, "build": build_key(), "compiler": compiler,
            "protocol": ".".join(map(str, facts["version"])), "seconds": round(time.perf_counter() - start, 1),
            "command": cmd}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        progress(f"installed {target / module_name()}", 1.0)
    return target / module_name()
