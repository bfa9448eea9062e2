"""edgelm: convert, run and serve language models on edge devices.

    import edgelm
    with edgelm.load() as m:                      # the embedded SmolLM2-135M-Instruct
        for chunk in m.stream_chat([{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")
"""

from __future__ import annotations

from .errors import *  # noqa: F401,F403  (the typed errors are part of the public API)
from .errors import EdgelmError
from .loader import default_model_path, load
from .model import Model, collect
from .params import GenerationParams
from .hub import pull
from .plan import Plan
from .sources import recommend
from .types import Chunk, Completion, ModelInfo, Timings, Usage
from .version import __version__


def convert(src, **kwargs):
    """Convert a model to GGUF or ONNX and measure its quality; see edgelm.conversion.convert."""
    from .conversion import convert as _convert

    return _convert(src, **kwargs)


def compress(src, output, **kwargs):
    """Remove decoder blocks / MLP neurons from a Hugging Face checkpoint, heal, measure; see
    edgelm.compression.api.compress."""
    from .compression import compress as _compress

    return _compress(src, output, **kwargs)


def worker(*args, **kwargs):
    """Run a llama.cpp RPC worker that other machines split models onto (blocking); see edgelm.rpc.serve_worker."""
    from .rpc import serve_worker

    return serve_worker(*args, **kwargs)


def recommend_cluster(*args, **kwargs):
    """Plan a model over a device and N RPC workers; see edgelm.cluster.recommend_cluster."""
    from .cluster import recommend_cluster as _recommend

    return _recommend(*args, **kwargs)


def serve(*args, **kwargs):
    """Serve models over the OpenAI- and Ollama-compatible API (blocking); see edgelm.server.serve."""
    from .server import serve as _serve

    return _serve(*args, **kwargs)


__all__ = [
    "load", "Model", "ModelInfo", "Chunk", "Completion", "Usage", "Timings", "GenerationParams", "EdgelmError",
    "default_model_path", "collect", "recommend", "Plan", "serve", "convert", "compress", "pull", "worker",
    "recommend_cluster", "__version__",
]
