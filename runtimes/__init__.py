"""Backends behind one protocol, found by name or by what a model file is.

Built-in backends are named here and imported only when used, so ``import edgelm`` never pays for
llama.cpp or onnxruntime.  Third-party backends register through the ``edgelm.backends`` entry-point group
(value ``module:Class``), and tests may call :func:`register_backend` directly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgelm.errors import UnknownBackendError
from edgelm.formats import gguf, onnx_folder
from edgelm.optional import require

from .base import Backend, BackendBase, Capabilities, LoadOptions, Seq


@dataclass(frozen=True)
class Builtin:
    target: str  # module:Class
    module: str  # the Python module it needs
    extra: str  # the edgelm extra that installs it
    format: str  # edgelm.formats module that reads its files (inspect without importing the runtime)


BUILTIN: dict[str, Builtin] = {
    "llamacpp": Builtin("edgelm.runtimes.llamacpp:LlamaCppBackend", "llama_cpp", "llamacpp", "gguf"),
    "onnxruntime": Builtin("edgelm.runtimes.onnx:OnnxBackend", "onnxruntime", "onnx", "onnx_folder"),
}
ALIASES = {
    "llama.cpp": "llamacpp", "llama_cpp": "llamacpp", "llama-cpp": "llamacpp", "gguf": "llamacpp",
    "onnx": "onnxruntime", "ort": "onnxruntime",
}
_registered: dict[str, Callable[[], type[Backend]]] = {}


def register_backend(name: str, cls: type[Backend]) -> None:
    """Make ``cls`` available as ``backend=name`` (and to backend="auto" through ``cls.accepts``)."""
    _registered[name] = lambda: cls


def unregister_backend(name: str) -> None:
    _registered.pop(name, None)


def backend_names() -> list[str]:
    names = list(BUILTIN) + list(_registered)
    names += [ep.name for ep in _entry_points()]
    return list(dict.fromkeys(names))


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


def get_backend(name: str) -> type[Backend]:
    """The backend class called ``name``; typed errors for unknown names and missing extras."""
    key = canonical_name(name)
    if key in _registered:
        return _registered[key]()
    if key in BUILTIN:
        b = BUILTIN[key]
        require(b.module, extra=b.extra, purpose=f"The {key} backend", backend=key)
        mod_name, attr = b.target.split(":")
        return getattr(importlib.import_module(mod_name), attr)
    for ep in _entry_points():
        if ep.name == key:
            return ep.load()
    raise UnknownBackendError(
        f"Unknown backend {name!r}.", fix=f"Use one of: auto, {', '.join(backend_names())}.", backend=name
    )


def _entry_points():
    from importlib import metadata  # ~20 ms (email parsing): only when a name is not built in

    try:
        return list(metadata.entry_points(group="edgelm.backends"))
    except Exception:  # broken metadata of some other distribution must not break edgelm
        return []


def detect_backend(path: Path) -> str | None:
    """The name of the backend that reads ``path`` by its format, without importing heavy runtimes."""
    for name, factory in _registered.items():
        if factory().accepts(path):
            return name
    if path.is_file() and gguf.is_gguf(path):
        return "llamacpp"
    if onnx_folder.looks_like_onnx(path):
        return "onnxruntime"
    return None


def inspect(path: Path, name: str) -> dict[str, Any]:
    """Facts of the model at ``path`` read by backend ``name``'s format, without loading it; built-in formats
    are read without importing their runtime."""
    key = canonical_name(name)
    if key in BUILTIN and key not in _registered:
        module = importlib.import_module(f"edgelm.formats.{BUILTIN[key].format}")
        return module.inspect(path)
    return get_backend(key).inspect(path)


__all__ = [
    "Backend", "BackendBase", "Capabilities", "LoadOptions", "Seq", "BUILTIN", "register_backend",
    "unregister_backend", "get_backend", "backend_names", "detect_backend", "canonical_name", "inspect",
]
