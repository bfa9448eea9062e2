"""edgelm: convert, run and serve language models on edge devices.

    import edgelm
    with edgelm.load() as m:                      # the embedded SmolLM2-135M-Instruct
        for chunk in m.stream_chat([{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cluster import recommend_cluster
from .compression import compress
from .conversion import convert
from .errors import *  # noqa: F401,F403  (the typed errors are part of the public API)
from .errors import EdgelmError
from .hub import pull as _hub_pull
from .loader import default_model_path, load
from .model import Model, collect
from .params import GenerationParams
from .plan import RECOMMEND_DEFAULTS, Plan
from .rpc.worker import serve_worker as worker
from .server import serve
from .sources import recommend
from .types import Chunk, Completion, ModelInfo, Timings, Usage
from .version import __version__


def pull(reference: str, revision: str | None = None, *, profile: str = RECOMMEND_DEFAULTS.profile,
         **kwargs: Any) -> Path:
    """Download ORG/REPO[:QUANT] from the Hugging Face Hub into its cache; the largest quantization that fits the
    device ``profile`` ("auto": this machine) unless QUANT names one; see edgelm.hub.pull."""
    return _hub_pull(reference, revision, device=profile, **kwargs)


__all__ = [
    "load", "Model", "ModelInfo", "Chunk", "Completion", "Usage", "Timings", "GenerationParams", "EdgelmError",
    "default_model_path", "collect", "recommend", "Plan", "serve", "convert", "compress", "pull", "worker",
    "recommend_cluster", "__version__",
]
