"""Backends behind one protocol, found by name or by what a model file is.

Built-in backends are named here and imported only when used, so ``import edgelm`` never pays for
llama.cpp or onnxruntime.  Third-party backends register through the ``edgelm.backends`` entry-point group
(value ``module:Class``), and tests may call :func:`register_backend` directly.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgelm.errors import BackendNotInstalledError, UnknownBackendError

from .base import Backend, BackendBase, LoadOptions

# name -> (module:attribute, Python module it needs, extra that installs it)
BUILTIN: dict[str, tuple[str, str, str]] = {
    "llamacpp": ("edgelm.runtimes.llamacpp:LlamaCppBackend", "llama_cpp", "llamacpp"),
    "onnxruntime": ("edgelm.runtimes.onnx:OnnxBackend", "onnxruntime", "onnx"),
}
ALIASES = {
    "llama.cpp": "llamacpp", "llama_cpp": "llamacpp", "llama-cpp": "llamacpp", "gguf": "llamacpp",
    "onnx": "onnxruntime", "ort": "onnxruntime",
}
_registered: dict[str, Callable[[], type]] = {}


def register_backend(name: str, cls: type) -> None:
    """Make ``cls`` available as ``backend=name`` (and to backend="auto" through ``cls.accepts``)."""
    _registered[name] = lambda: cls


def unregister_backend(name: str) -> None:
    _registered.pop(name, None)


def backend_names() -> list[str]:
    names = list(BUILTIN) + list(_registered)
    try:
        names += [ep.name for ep in metadata.entry_points(group="edgelm.backends")]
    except Exception:  # broken metadata of some other distribution must not break edgelm
        pass
    return list(dict.fromkeys(names))


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


def get_backend(name: str) -> type:
    """The backend class called ``name``; typed errors for unknown names and missing extras."""
    key = canonical_name(name)
    if key in _registered:
        return _registered[key]()
    if key in BUILTIN:
        target, module, extra = BUILTIN[key]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise BackendNotInstalledError(
                f"The {key} backend needs the Python package {module!r}, which is not installed ({exc}).",
                fix=f'Install it with: pip install "edgelm[{extra}]"',
                backend=key,
                extra=extra,
            ) from exc
        mod_name, attr = target.split(":")
        return getattr(importlib.import_module(mod_name), attr)
    for ep in _entry_points():
        if ep.name == key:
            return ep.load()
    raise UnknownBackendError(
        f"Unknown backend {name!r}.", fix=f"Use one of: auto, {', '.join(backend_names())}.", backend=name
    )


def _entry_points():
    try:
        return list(metadata.entry_points(group="edgelm.backends"))
    except Exception:
        return []


def detect_backend(path: Path) -> str | None:
    """The name of the backend that reads ``path`` by its format, without importing heavy runtimes."""
    from .gguf import is_gguf

    for name, factory in _registered.items():
        if getattr(factory(), "accepts", lambda p: False)(path):
            return name
    if path.is_file() and is_gguf(path):
        return "llamacpp"
    if path.suffix == ".onnx" or (path.is_dir() and (any(path.glob("*.onnx")) or (path / "edgelm.json").exists())):
        return "onnxruntime"
    return None


__all__ = [
    "Backend", "BackendBase", "LoadOptions", "BUILTIN", "register_backend", "unregister_backend", "get_backend",
    "backend_names", "detect_backend", "canonical_name",
]
