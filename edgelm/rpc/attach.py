"""The llama.cpp side of a split model: register the workers, hand llama.cpp the devices and the layer counts, and
read back from its log where each layer and buffer went.

Called from the llama.cpp backend's ``load()`` when ``workers`` are given.  ``edgelm.load`` runs that in a child
process (:mod:`edgelm.runtimes.isolated`): llama.cpp's RPC client aborts the process it runs in when a worker goes
away.  Imports llama_cpp.
"""

from __future__ import annotations

import collections
import ctypes
import re
from dataclasses import dataclass, field
from typing import Any

from edgelm.formats.gguf import GGUFHeader
from edgelm.native import llamacpp as native
from edgelm.native.llamacpp import llama_cpp
from edgelm.platforms import available_memory
from edgelm.native import rpc as native_rpc

from . import protocol, split
from .protocol import part_name

_LAYER = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_BUFFER = re.compile(r"^\S+:\s+(\S+)\s+(model|KV|compute) buffer size =\s+([\d.]+) MiB")
_ENDPOINT = re.compile(r"\[([^\]]+)\]")


@dataclass
class Setup:
    """Workers registered with llama.cpp, and the split llama.cpp is asked to make."""

    endpoints: list[protocol.Endpoint]
    devices: list[tuple[str, protocol.Endpoint, int, native_rpc.Device]]  # (part name, worker, index there, device)
    plan: split.Split
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4000))
    _arrays: list[Any] = field(default_factory=list)  # ctypes arrays llama_model_params points to

    def apply(self, mp: Any) -> None:
        """Set llama_model_params' devices, n_gpu_layers and tensor_split (exact layer counts) from the plan."""
        handles = [d.handle for *_, d in self.devices]
        devices = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)
        shares = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*self.plan.tensor_split)
        self._arrays[:] = [devices, shares]
        mp.devices = ctypes.cast(devices, ctypes.c_void_p).value
        mp.n_gpu_layers = self.plan.n_gpu_layers
        mp.tensor_split = shares
        mp.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER

    def _listen(self, level: int, text: str) -> None:
        if "assigned to device" in text or "buffer size" in text:
            self.lines.append(text.strip())

    def finish(self) -> dict[str, Any]:
        """After the model and its context exist: stop reading the log, turn on keep-alive on the workers' sockets,
        and say where everything is (``ModelInfo.extra["rpc"]``)."""
        native.remove_listener(self._listen)
        self.keep_alive()
        return self.placement()

    def keep_alive(self) -> int:
        fds = [fd for fd, _ in native_rpc.connected_sockets(protocol.resolve(self.endpoints))]
        native_rpc.keep_alive(fds)
        return len(fds)

    def placement(self) -> dict[str, Any]:
        """Each part: the layers llama.cpp put there (from its log) and the bytes of its buffers."""
        by_device = {d.name: name for name, _, _, d in self.devices}  # llama.cpp's RPC0, RPC1, ... -> part
        by_buffer = {f"RPC{i}[{ep.spec}]": name for name, ep, i, _ in self.devices}  # buffer names -> part
        layers: dict[str, list[int]] = collections.defaultdict(list)
        measured: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        for line in self.lines:
            m = _LAYER.search(line)
            if m:
                layers[by_device.get(m.group(2), "this machine")].append(int(m.group(1)))
                continue
            m = _BUFFER.search(line)
            if m:
                part = by_buffer.get(m.group(1), "this machine")
                measured[part][m.group(2).lower()] += float(m.group(3)) * split.MB
        n_layer = sum(p.units for p in self.plan.parts) - 1
        parts = []
        for p in self.plan.parts:
            got = sorted(layers.get(p.device, []))
            m = measured.get(p.device, {})
            got_layers = [i for i in got if i < n_layer]
            parts.append({
                "device": p.device,
                "n_layers": len(got_layers),
                "first_layer": got_layers[0] if got_layers else None,
                "last_layer": got_layers[-1] if got_layers else None,
                "output_layer": n_layer in got,
                "input_layer": p.input,
                "reported_free_bytes": p.memory_bytes,
                "planned_bytes": p.bytes,
                "model_bytes": int(m.get("model", 0)),
                "kv_bytes": int(m.get("kv", 0)),
                "compute_bytes": int(m.get("compute", 0)),
            })
        return {"workers": [str(e) for e in self.endpoints], "policy": self.plan.policy,
                "n_gpu_layers": self.plan.n_gpu_layers, "parts": parts, "notes": list(self.plan.notes)}


_current: Setup | None = None


def prepare(header: GGUFHeader, options: Any, n_ctx: int) -> Setup:
    """Register ``options.workers`` with llama.cpp and plan the split (``options.tensor_split`` when given, else by
    the devices' reported memory), and start reading llama.cpp's log for :meth:`Setup.finish`.

    Connects to every worker: **aborts the process** if one is gone, so check them with
    :func:`edgelm.rpc.protocol.query` first (edgelm.load does, in the parent process)."""
    global _current
    endpoints = protocol.parse_workers(options.workers)
    per_worker = [(ep, native_rpc.add_worker(ep.spec)) for ep in endpoints]
    devices = [(part_name(ep, i, len(devs)), ep, i, d) for ep, devs in per_worker for i, d in enumerate(devs)]
    costs = split.model_costs(header, n_ctx, options.kv_cache, min(options.n_batch, n_ctx))
    shares = split.parse_tensor_split(options.tensor_split, len(devices))
    plan = split.plan_split(costs, [(name, d.free) for name, _, _, d in devices],
                            local_memory=None if shares is not None else available_memory(), tensor_split=shares)
    setup = Setup(endpoints, devices, plan)
    if _current is not None:  # a load that failed before finish(): stop its reading
        native.remove_listener(_current._listen)
    _current = setup
    native.add_listener(setup._listen)
    return setup


def check_workers(workers: Any) -> dict[str, Any]:
    """Are this process's connections to ``workers`` open?  {"status": "ok" | "degraded", "workers": {endpoint: state}}
    (looks at the sockets llama.cpp opened, peeking without reading; opens no connection to the workers)."""
    endpoints = protocol.parse_workers(workers)
    states = {}
    for ep in endpoints:
        sockets = native_rpc.connected_sockets(protocol.resolve([ep]))
        if not sockets:
            states[str(ep)] = "not connected"
        elif any(native_rpc.peer_closed(fd) for fd, _ in sockets):
            states[str(ep)] = "closed by the worker"
        else:
            states[str(ep)] = "connected"
    ok = all(v == "connected" for v in states.values())
    return {"status": "ok" if ok else "degraded", "workers": states}
