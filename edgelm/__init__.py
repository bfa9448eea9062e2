"""edgelm: convert, run and serve language models on edge devices.

    import edgelm
    with edgelm.load() as m:                      # the embedded SmolLM2-135M-Instruct
        for chunk in m.stream_chat([{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")
"""

from __future__ import annotations

from .cluster import recommend_cluster
from .compression import compress
from .conversion import convert
from .errors import *  # noqa: F401,F403  (the typed errors are part of the public API)
from .errors import EdgelmError
from .hub import pull
from .default_model import default_model_path
from .deploy import bundle, verify_bundle
from .loader import load
from .model import Model, collect
from .params import GenerationParams
from .plan import Plan
from .rpc.worker import serve_worker as worker
from .server import serve
from .sources import recommend
from .types import Chunk, Completion, ModelInfo, Timings, Usage
from .version import __version__

__all__ = [
    "load", "Model", "ModelInfo", "Chunk", "Completion", "Usage", "Timings", "GenerationParams", "EdgelmError",
    "default_model_path", "collect", "recommend", "Plan", "serve", "convert", "compress", "pull", "worker",
    "recommend_cluster", "bundle", "verify_bundle", "__version__",
]
