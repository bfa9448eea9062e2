"""Optional third-party packages: imported where they are used, and a missing one named with its fix.

Heavy or optional packages (llama_cpp, onnxruntime, onnxruntime_genai, torch, transformers, huggingface_hub, ...)
are never imported at module level: ``import edgelm`` stays fast and works with none of them installed.  Code that
needs one calls :func:`require`, which imports it or raises :class:`~edgelm.errors.BackendNotInstalledError` naming
the extra that brings it; :func:`available` asks without raising.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import BackendNotInstalledError


def require(module: str, *, extra: str | None = None, purpose: str, install: str | None = None,
            **details: object) -> ModuleType:
    """Import ``module`` (a dotted name), or raise BackendNotInstalledError.

    ``purpose`` completes "... needs <package>" (e.g. "The onnxruntime backend"); the fix names
    ``pip install "edgelm[<extra>]"``, or ``install`` when the package comes another way.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        fix = install or (f'Install it with: pip install "edgelm[{extra}]"' if extra else
                          f"Install it with: pip install {module.split('.')[0]}")
        raise BackendNotInstalledError(
            f"{purpose} needs the Python package '{module}', which is not installed or failed to import ({exc}).",
            fix=fix, extra=extra, **details) from exc


def available(module: str) -> bool:
    """True when ``module`` (a top-level or dotted name) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False
