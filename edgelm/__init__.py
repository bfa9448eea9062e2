"""edgelm: convert, run and serve language models on edge devices.

    import edgelm
    with edgelm.load() as m:                      # the embedded SmolLM2-135M-Instruct
        for chunk in m.stream_chat([{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")

The public names are imported when first used (PEP 562), so ``import edgelm`` costs only the errors and the
types: a command, a desktop app's launch or a Pi's slow Python pays for the parts it touches, no more.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import *  # noqa: F401,F403  (the typed errors are part of the public API)
from .errors import EdgelmError
from .exports import LAZY
from .types import Chunk, Completion, ModelInfo, Timings, ToolCall, ToolCallDelta, Usage

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time __getattr__ imports them
    from .cluster import recommend_cluster
    from .compression import compress
    from .constraints import Constraint
    from .conversion import convert
    from .default_model import default_model_path
    from .deploy import bundle, verify_bundle
    from .hub import pull
    from .loader import load
    from .model import Model, collect
    from .params import GenerationParams
    from .plan import Plan
    from .rpc.worker import serve_worker as worker
    from .server import serve
    from .planning import recommend
    from .version import __version__


def __getattr__(name: str) -> Any:
    target = LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'edgelm' has no attribute {name!r}")
    module, _, attribute = target.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY))


__all__ = [
    "load", "Model", "ModelInfo", "Chunk", "Completion", "Usage", "Timings", "GenerationParams", "Constraint",
    "EdgelmError", "ToolCall", "ToolCallDelta", "default_model_path", "collect", "recommend", "Plan", "serve",
    "convert", "compress", "pull", "worker", "recommend_cluster", "bundle", "verify_bundle", "__version__",
]
