"""edgelm: convert, run and serve language models on edge devices.

    import edgelm
    with edgelm.load() as m:                      # the embedded SmolLM2-135M-Instruct
        for chunk in m.stream_chat([{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")
"""

from __future__ import annotations

import os as _os
from pathlib import Path
from typing import Any

# llama.cpp (OPENMP = 1 in llama-cpp-python's build) syncs its threads at every operation of a forward pass with an
# OpenMP barrier, and how a thread waits there decides the speed: libgomp's default spins for about 300,000 rounds
# (milliseconds) before it sleeps, which is fastest on an idle machine and pathological on a loaded one (a waiting
# thread burns the core its partner needs: decoding ran 20-50x slower on this project's 2-core machines under load);
# OMP_WAIT_POLICY=PASSIVE (sleep at once) is safe under load but pays a futex wake-up at each of hundreds of
# barriers per token: 0.6-0.65x the tokens/s on an idle machine.  A short spin (10,000 rounds, a fraction of a
# millisecond) catches a barrier on an idle machine and gives the core up soon under load: measured 1.5x PASSIVE's
# single-stream decode idle, and no worse than PASSIVE with two CPU hogs.  Longer spins make the first token after an
# idle pause a little faster (13-15 ms instead of 16-20 for SmolLM2 with 30,000-300,000 rounds) but 100,000 already
# stalled for over 25 s under two hogs, and a round lasts longer on some CPUs: 10,000 keeps a wide margin.  Read by
# libgomp once, when it loads: set here, before edgelm imports llama.cpp.  Set OMP_WAIT_POLICY or GOMP_SPINCOUNT
# yourself to choose otherwise.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .compression import compress
from .conversion import convert
from .errors import *  # noqa: F401,F403  (the typed errors are part of the public API)
from .errors import EdgelmError
from .hub import pull as _hub_pull
from .loader import default_model_path, load
from .model import Model, collect
from .params import GenerationParams
from .plan import RECOMMEND_DEFAULTS, Plan, recommend
from .rpc.cluster import recommend_cluster
from .rpc.worker import serve_worker as worker
from .server import serve
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
