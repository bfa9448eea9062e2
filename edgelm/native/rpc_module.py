"""Where llama.cpp's RPC backend module lives for the installed llama-cpp-python (no llama.cpp loaded here).

``edgelm install-rpc`` (:mod:`edgelm.rpc.build`) writes the module, :mod:`edgelm.native.rpc` loads it: both find it
here, keyed by the build (llama-cpp-python's version and a hash of its libggml-base), so a module made for another
build is never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from edgelm.errors import BackendNotInstalledError

ENV_VAR = "EDGELM_RPC_MODULE"  # a module file to use instead (or a folder to install into)
PACKAGE = "llama-cpp-python"
INSTALL_HINT = ("Build it once for this llama-cpp-python: `edgelm install-rpc` (compiles llama.cpp's RPC backend from "
                "the same release's sources in about a minute; needs a C++ compiler), or reinstall llama-cpp-python "
                "with it built in: CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --force-reinstall --no-cache-dir "
                "llama-cpp-python.")


def lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise BackendNotInstalledError("llama-cpp-python is not installed.", fix='pip install "edgelm[llamacpp]"',
                                       backend="llamacpp", extra="llamacpp")
    return Path(spec.origin).resolve().parent / "lib"


def llama_cpp_version() -> str:
    from importlib import metadata  # ~20 ms to import: only when the RPC module is looked for

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def ggml_base(lib_dir: Path) -> Path:
    names = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    name = next((v for k, v in names.items() if sys.platform.startswith(k)), "libggml-base.so")
    path = lib_dir / name
    if not path.exists():
        raise BackendNotInstalledError(f"{path} is missing: this llama-cpp-python install has no libggml-base.",
                                       fix="Reinstall llama-cpp-python.", backend="llamacpp", extra="llamacpp")
    return path


_build_key_cache: dict[tuple[str, int, int], str] = {}


def build_key() -> str:
    """Identifies the installed llama.cpp build: llama-cpp-python's version and the hash of its libggml-base."""
    base = ggml_base(lib_dir()).resolve()
    st = base.stat()
    key = (str(base), st.st_size, st.st_mtime_ns)
    if key not in _build_key_cache:
        digest = hashlib.sha256(base.read_bytes()).hexdigest()[:12]
        _build_key_cache[key] = f"{PACKAGE}-{llama_cpp_version()}-{digest}"
    return _build_key_cache[key]


def module_name() -> str:
    return "ggml-rpc.dll" if sys.platform == "win32" else "libggml-rpc.dylib" if sys.platform == "darwin" \
        else "libggml-rpc.so"


def rpc_home() -> Path:
    """Where ``edgelm install-rpc`` puts the module for this build: $XDG_CACHE_HOME/edgelm/tools/ggml-rpc/<build>."""
    override = os.environ.get(ENV_VAR)
    if override and not override.endswith((".so", ".dylib", ".dll")):
        return Path(override).expanduser() / build_key()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "edgelm" / "tools" / "ggml-rpc" / build_key()


def installed_module() -> Path | None:
    """The RPC module built for the installed llama-cpp-python, or None."""
    override = os.environ.get(ENV_VAR)
    if override and override.endswith((".so", ".dylib", ".dll")):
        path = Path(override).expanduser()
        return path if path.is_file() else None
    try:
        path = rpc_home() / module_name()
    except BackendNotInstalledError:
        return None
    return path if path.is_file() and (path.parent / "build.json").is_file() else None
