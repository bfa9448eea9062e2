"""``edgelm.load(model, workers=[...])``: check the workers, plan the split, load the model in a child process.

Order, so that every failure is a typed error before llama.cpp is involved:
1. the workers are parsed and asked (plain Python, with timeouts) for their protocol version and memory:
   WorkerUnreachableError naming ``host:port``;
2. the split is planned from the GGUF header and that memory: DoesNotFitError naming the device short of memory;
3. the model is loaded in a child process (:class:`edgelm.runtimes.isolated.IsolatedBackend`) with the plan's exact
   layer counts; if the child dies (a worker went away: llama.cpp aborts), the call in flight raises
   WorkerLostError naming the worker(s) that no longer answer, and the model reports ``health()["status"] ==
   "lost"`` until it is loaded again.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidParameterError, WorkerLostError
from edgelm.formats.gguf import read_header
from edgelm.platforms import available_memory
from edgelm.rpc import protocol, split
from edgelm.rpc.protocol import part_name

from .base import Backend, resolve_n_ctx
from .isolated import IsolatedBackend

log = logging.getLogger("edgelm.rpc")


def preflight(path: Path, options: Any, *, timeout: float = protocol.CONNECT_TIMEOUT_S) -> tuple[Any, split.Split]:
    """Validate ``workers``/``tensor_split``, ask every worker, plan the split; return (options with exact layer
    counts as tensor_split, the plan)."""
    endpoints = protocol.parse_workers(options.workers)
    if not endpoints:
        raise InvalidParameterError("tensor_split was given without workers.",
                                    fix="Pass workers=[\"host:port\", ...] too, or drop tensor_split.",
                                    parameter="tensor_split", value=options.tensor_split)
    infos = protocol.query_all(endpoints, timeout=timeout)
    names, frees = [], []
    for info in infos:
        for i, (free, _) in enumerate(info.devices):
            names.append(part_name(info.endpoint, i, len(info.devices)))
            frees.append(free)
    header = read_header(path)
    n_ctx = resolve_n_ctx(options.n_ctx, header.context_length)
    costs = split.model_costs(header, n_ctx, options.kv_cache, min(options.n_batch, n_ctx))
    shares = split.parse_tensor_split(options.tensor_split, len(names))
    plan = split.plan_split(costs, list(zip(names, frees)), local_memory=available_memory(), tensor_split=shares)
    for note in plan.notes:
        log.info("%s", note)
    exact = dataclasses.replace(options, workers=tuple(e.spec for e in endpoints), n_ctx=n_ctx,
                                tensor_split=[float(c) for c in plan.counts])
    return exact, plan


def load_with_workers(cls: type[Backend], path: Path, options: Any) -> Any:
    """The backend of a model split across ``options.workers``, running in a child process."""
    exact, plan = preflight(path, options)
    endpoints = protocol.parse_workers(exact.workers)

    def lost(reason: str) -> BaseException:
        down = {str(e): why for e in endpoints if (why := protocol.reachable(e, timeout=1.0)) is not None}
        who = (", ".join(f"{e} ({why})" for e, why in down.items()) if down else
               f"{', '.join(map(str, endpoints))} (reachable again now)")
        return WorkerLostError(
            f"Lost the connection to worker {who}: llama.cpp's RPC client ended the model's process ({reason}).",
            fix="Restart the worker (edgelm worker ...) and load the model again (the server does that on the next "
            "request). Nothing else is affected.",
            endpoint=next(iter(down), str(endpoints[0])), workers=[str(e) for e in endpoints])

    def describe(facts: dict[str, Any]) -> dict[str, Any]:
        facts.setdefault("extra", {})["rpc"] = describe_parts(facts, plan)
        return facts

    # GGML_NO_BACKTRACE: on a lost worker ggml would otherwise run gdb on the dying child (seconds)
    return IsolatedBackend.start(cls.name, path, exact, on_exit=lost, env={"GGML_NO_BACKTRACE": "1"},
                                 describe_hook=describe)


def describe_parts(facts: dict[str, Any], plan: split.Split) -> dict[str, Any]:
    """The child's placement (what llama.cpp did) with the plan's policy and the memory each device reported."""
    rpc = dict(facts.get("extra", {}).get("rpc") or {})
    planned = {p.device: p for p in plan.parts}
    for part in rpc.get("parts", []):
        p = planned.get(part["device"])
        if p is not None:
            part["reported_free_bytes"] = p.memory_bytes
            part["planned_bytes"] = p.bytes
    rpc["policy"] = plan.policy
    rpc["notes"] = list(plan.notes)
    return rpc
