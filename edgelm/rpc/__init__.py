"""Split a model across machines with llama.cpp's RPC workers.

    # on each other machine (after `edgelm install-rpc`):
    edgelm.rpc.serve_worker(host="192.168.1.21", port=50052, mem="3GB")       # or: edgelm worker ...
    # here:
    m = edgelm.load("model.gguf", workers=["192.168.1.21:50052", "192.168.1.22:50052"])
    m.info.extra["rpc"]["parts"]          # per device: layers, bytes of weights / KV cache / compute buffers
    edgelm.recommend_cluster("model.gguf", device="raspberry-pi-5-4gb", workers=3)   # before buying the boards

Modules: :mod:`.protocol` (endpoints; asking a worker in plain Python), :mod:`.split` (where each layer goes),
:mod:`.client` (``load(..., workers=)``), :mod:`.attach` (the llama.cpp side, in the model's process),
:mod:`.worker` (``edgelm worker``), :mod:`.cluster` (plans for boards not bought yet), :mod:`.build`
(``edgelm install-rpc``).  Nothing here imports llama.cpp until it is needed.
"""

from __future__ import annotations

from typing import Any


def serve_worker(*args: Any, **kwargs: Any) -> None:
    """Run an RPC worker (blocks); see :func:`edgelm.rpc.worker.serve_worker`."""
    from .worker import serve_worker as _serve

    return _serve(*args, **kwargs)


def query(endpoint: str, *, timeout: float = 3.0) -> Any:
    """Ask a worker for its protocol version and memory; see :func:`edgelm.rpc.protocol.query`."""
    from .protocol import query as _query

    return _query(endpoint, timeout=timeout)


def install_rpc(**kwargs: Any) -> Any:
    """Build llama.cpp's RPC backend for the installed llama-cpp-python; see :func:`edgelm.rpc.build.install_rpc`."""
    from .build import install_rpc as _install

    return _install(**kwargs)


def availability() -> dict[str, Any]:
    """Whether this process can use RPC: {"available", "built_in", "module", "loaded"}."""
    from edgelm.native.rpc import availability as _availability

    return _availability().to_dict()


def recommend_cluster(*args: Any, **kwargs: Any) -> Any:
    """A plan for a model over this device and N workers; see :func:`edgelm.rpc.cluster.recommend_cluster`."""
    from .cluster import recommend_cluster as _recommend

    return _recommend(*args, **kwargs)


__all__ = ["serve_worker", "query", "install_rpc", "availability", "recommend_cluster"]
