"""Planning from what a user names a model by: :func:`model_facts` and :func:`recommend` (``edgelm.recommend``)
read the default model, a file or folder, or a Hub id (a Hugging Face checkpoint from its headers alone, through
:mod:`edgelm.hub.checkpoint`; a GGUF or ONNX repository pulled as :func:`edgelm.load` would), then hand the facts to
:mod:`edgelm.plan`, which only estimates.

Layers: above :mod:`edgelm.sources` (names to paths), :mod:`edgelm.plan` and :mod:`edgelm.hub`; nothing here loads a
model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .default_model import is_default
from .plan import RECOMMEND_DEFAULTS, ModelFacts, Plan, file_facts
from .plan import recommend as plan_for
from .sources import resolve_model_path


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
