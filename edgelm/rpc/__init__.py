"""Split a model across machines with llama.cpp's RPC workers.

    # on each other machine (after `edgelm install-rpc`):
    edgelm.rpc.serve_worker(host="192.168.1.21", port=50052, mem="3GB")       # or: edgelm worker ...
    # here:
    m = edgelm.load("model.gguf", workers=["192.168.1.21:50052", "192.168.1.22:50052"])
    m.info.extra["rpc"]["parts"]          # per device: layers, bytes of weights / KV cache / compute buffers
    edgelm.recommend_cluster("model.gguf", profile="raspberry-pi-5-4gb", workers=3)   # before buying the boards

Modules: :mod:`.protocol` (endpoints; asking a worker in plain Python), :mod:`.split` (where each layer goes),
:mod:`.attach` (the llama.cpp side, in the model's process), :mod:`.worker` (``edgelm worker``), :mod:`.build`
(``edgelm install-rpc``).  Above this package: :mod:`edgelm.runtimes.remote` (``load(..., workers=)``, a backend
in a child process) and :mod:`edgelm.cluster` (plans for boards not bought yet), which use it.  Nothing here imports
llama.cpp until it is needed (:mod:`.attach` and :mod:`edgelm.native.rpc` load it, and are imported where used).
"""

from __future__ import annotations

from typing import Any

from . import protocol
from .build import install_rpc
from .worker import serve_worker


def query(endpoint: str, *, timeout: float = 3.0) -> Any:
    """Ask a worker for its protocol version and memory; see :func:`edgelm.rpc.protocol.query`."""
    return protocol.query(endpoint, timeout=timeout)


def availability() -> dict[str, Any]:
    """Whether this process can use RPC: {"available", "built_in", "module", "loaded"}."""
    from edgelm.native.rpc import availability as _availability  # loads llama.cpp

    return _availability().to_dict()


__all__ = ["serve_worker", "query", "install_rpc", "availability"]
