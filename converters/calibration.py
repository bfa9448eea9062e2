"""The default calibration text: the Python standard library's own docstrings (offline, English technical prose,
and not the evaluation text, which comes from the Language Reference in ``pydoc_data``).

GPTQ (:mod:`edgelm.converters.onnx.gptq`) calibrates on it, and :mod:`edgelm.compression` measures and heals on the
same text.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

# modules whose docstrings make the default calibration text (the evaluation text comes from pydoc_data instead)
CALIBRATION_MODULES = ("os", "re", "json", "collections", "itertools", "functools", "pathlib", "subprocess",
                       "argparse", "logging", "threading", "asyncio", "typing", "dataclasses", "random", "statistics",
                       "datetime", "email", "http.client", "urllib.request", "unittest", "csv", "sqlite3", "zipfile",
                       "tarfile", "shutil", "tempfile", "textwrap", "string", "decimal")


def calibration_text() -> str:
    """The docstrings (over 200 characters) of :data:`CALIBRATION_MODULES` and their members, each once."""
    parts: list[str] = []
    with warnings.catch_warnings():  # some members are deprecated aliases (typing.re, ...): reading them warns
        warnings.simplefilter("ignore")
        for name in CALIBRATION_MODULES:
            module = importlib.import_module(name)
            for _, obj in inspect.getmembers(module):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))
