"""Where a model comes from: what a user names a model by (nothing or "default", a file or folder, a Hub id
``ORG/REPO[:QUANT]``) turned into a path on this machine, or into the facts a plan needs.

- :func:`resolve_model_path` is what :func:`edgelm.load` (and the server, the CLI) use: the default model, an
  existing path, or a GGUF / ONNX repository from the Hugging Face cache, pulled on first use.
- :func:`model_facts` and :func:`recommend` (``edgelm.recommend``) do the same for planning, and also read a Hub id
  that names a Hugging Face checkpoint from its headers alone (:mod:`edgelm.hub.checkpoint`), then hand the facts to
  :mod:`edgelm.plan`, which only estimates.

Layers: this module sits above :mod:`edgelm.plan` and :mod:`edgelm.hub` and below :mod:`edgelm.loader`, so the
loader calls down into it and nothing here loads a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .default_model import DEFAULT_MODEL_NAMES, default_model_path, is_default
from .errors import InvalidParameterError, ModelNotFoundError
from .plan import RECOMMEND_DEFAULTS, ModelFacts, Plan, file_facts
from .plan import recommend as plan_for


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


def model_facts(model: str | os.PathLike[str] | None) -> ModelFacts:
    """Read what a plan needs from the model's header, manifest or config, without loading it: a GGUF file, an
    ONNX folder, a Hugging Face checkpoint folder (config.json + *.safetensors) or a Hub id (from the HF cache; a
    GGUF or ONNX repository is pulled as `edgelm.load` would)."""
    if not is_default(model) and isinstance(model, (str, os.PathLike)) and Path(model).expanduser().exists():
        return file_facts(model)
    if not is_default(model) and isinstance(model, str):
        from .hub import hub_checkpoint  # off the cold path of a local file

        checkpoint = hub_checkpoint(model)
        if isinstance(checkpoint, ModelFacts):
            return checkpoint
        if checkpoint is not None:
            return file_facts(checkpoint, source=model)
    return file_facts(resolve_model_path(model))  # the default model, or a GGUF / ONNX repository by name


def recommend(model: str | os.PathLike[str] | ModelFacts | None = None, profile: str = RECOMMEND_DEFAULTS.profile,
              *, n_ctx: int | None = RECOMMEND_DEFAULTS.n_ctx, parallel: int = RECOMMEND_DEFAULTS.parallel,
              host: Any = None, bandwidth_gbs: float | None = None) -> Plan:
    """Plan how to run ``model`` (default: the embedded one) on the device ``profile`` ("auto" = this machine, or a
    profile name from `edgelm devices`, e.g. "raspberry-pi-5-8gb").  Raises :class:`DoesNotFitError` when no option fits.
    ``parallel``: sequences generated at the same time (a server's concurrent requests), each with its own KV cache
    of n_ctx tokens.

    ``model`` may be a GGUF file, an ONNX folder, or a Hugging Face checkpoint (folder or Hub id, read from the HF
    cache; offline works): for a checkpoint, ``plan.quantizations`` lists every GGUF and ONNX quantization it could
    be converted to (size, memory, fits, tokens/s) and ``plan.convert_command`` makes the recommended one.

    ``host`` (a detected :class:`edgelm.platforms.Host`) and ``bandwidth_gbs`` may be injected for profile="auto".
    The estimate itself is :func:`edgelm.plan.recommend`'s.
    """
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    return plan_for(facts, profile, n_ctx=n_ctx, parallel=parallel, host=host, bandwidth_gbs=bandwidth_gbs)
