"""Where a model comes from: what a user names a model by (nothing or "default", a file or folder, a Hub id
``ORG/REPO[:QUANT]``) turned into a path on this machine.

:func:`resolve_model_path` is what :func:`edgelm.load` (and the server, the CLI) use: the default model, an existing
path, or a GGUF / ONNX repository from the Hugging Face cache, pulled on first use.  Planning from the same names is
:mod:`edgelm.planning` (``edgelm.recommend``), kept apart so that loading a local file imports no planner.

Layers: below :mod:`edgelm.loader` and :mod:`edgelm.planning`; the Hub client only for a name that is not a path.
"""

from __future__ import annotations

import os
from pathlib import Path

from .default_model import DEFAULT_MODEL_NAMES, default_model_path, is_default
from .errors import InvalidParameterError, ModelNotFoundError


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """The file or folder to load for ``model``: the embedded default (None, "default", "smollm2", ...), an existing
    path, or ``ORG/REPO[:QUANT]`` from the Hugging Face cache (pulled on first use).  ModelNotFoundError otherwise."""
    if is_default(model):
        return default_model_path()
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidParameterError(f"Invalid model: {model!r}.", fix="Pass a file or folder path.",
                                    parameter="model", value=model)
    path = Path(model).expanduser()
    if path.exists():
        return path
    # --- models by name (edgelm.hub): ORG/REPO[:QUANT] comes from the Hugging Face cache, pulled on first use ---
    from .hub import resolve_reference  # off the cold path of a local file

    pulled = resolve_reference(model)
    if pulled is not None:
        return pulled
    # --- end of models by name ---
    raise ModelNotFoundError(
        f"Model not found: {path} does not exist.",
        fix="Check the path; convert a Hugging Face model with `edgelm convert SRC --to onnx -o DIR`; "
        f"or omit the model to use the embedded default ({', '.join(DEFAULT_MODEL_NAMES[:2])}).",
        path=str(path),
    )
