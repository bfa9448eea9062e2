"""Where each part of a model goes when it is split across this machine and RPC workers.

llama.cpp's rule (llama-model.cpp ``load_tensors``): the token embedding (input layer) always stays on this machine;
of the ``n_layer`` repeating layers and the output layer (``n_layer + 1`` units), the first ``n_layer + 1 -
n_gpu_layers`` stay here and the rest go to the offload devices (the workers) in order, split by ``tensor_split`` —
or by each device's reported free memory when that is all zeros.  The output layer (output head + norm, or a copy of
the token embedding when the model ties them) goes to the device that holds the last layers, with the logits
buffer (n_vocab x n_ubatch floats), often the largest single allocation.

edgelm's default, llama.cpp's own for RPC: every unit goes to the workers, split by the memory each reports, and
only what does not fit them stays on this machine.  ``tensor_split=[here, worker 1, ...]`` sets the shares instead.
The plan is made here, from the GGUF header and the memory figures, *before* anything is loaded; llama.cpp then gets
exact layer counts (n_gpu_layers and a tensor_split of counts), so what it does is what the plan says.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from edgelm.errors import DoesNotFitError, InvalidParameterError
from edgelm.formats.gguf import GGUFHeader
from edgelm.units import human_bytes

MB = 1024**2
HEADROOM = 0.9  # a worker's share may use at most this part of the memory it reports
LOCAL_RUNTIME_BYTES = 60 * MB  # this machine's Python process with llama.cpp, before the model (as edgelm.plan)


@dataclass(frozen=True)
class ModelCosts:
    """Bytes of each part of a model at a given n_ctx / KV type / batch size (from the GGUF header alone)."""

    n_layer: int
    layer_weights: tuple[int, ...]  # per repeating layer
    layer_kv: int  # KV cache of one layer at n_ctx
    input_bytes: int  # token embedding and other tensors outside the layers (stay on this machine)
    output_bytes: int  # output head + norm (the token embedding again when tied)
    logits_bytes: int  # n_vocab x n_ubatch x 4: the compute buffer of the device holding the output
    layer_compute: int  # compute buffer of a device holding layers (attention scores, feed-forward activations)
    local_compute: int  # compute buffer on this machine (embedding rows, masks, copies)

    @property
    def units(self) -> int:
        return self.n_layer + 1  # the repeating layers and the output layer

    def unit_bytes(self, i: int) -> int:
        return self.layer_weights[i] + self.layer_kv if i < self.n_layer else self.output_bytes

    @property
    def total_weights(self) -> int:
        return sum(self.layer_weights) + self.input_bytes + self.output_bytes


def model_costs(header: GGUFHeader, n_ctx: int, kv_cache: str | None = None, n_ubatch: int = 512) -> ModelCosts:
    shape = header.attention_shape()
    n_layer = shape.n_layer
    layers = [0] * n_layer
    input_bytes = output_bytes = 0
    tied = True
    for t in header.tensors:
        size = t.n_bytes or 0
        name = t.name
        if name.startswith("blk."):
            try:
                layers[int(name.split(".")[1])] += size
            except (ValueError, IndexError):
                input_bytes += size
        elif name.startswith("output"):  # output.weight, output_norm.weight
            output_bytes += size
            tied = tied and name != "output.weight"
        else:
            input_bytes += size
    if tied:  # llama.cpp loads a copy of the token embedding as the output head
        output_bytes += next((t.n_bytes or 0 for t in header.tensors if t.name == "token_embd.weight"), 0)
    kv_total = shape.kv_bytes(n_ctx, kv_cache or "f16")
    n_ff = header.arch_value("feed_forward_length", 4 * shape.n_embd)
    n_ff = max(n_ff) if isinstance(n_ff, (list, tuple)) and n_ff else int(n_ff or 4 * shape.n_embd)
    ub = max(1, min(n_ubatch, n_ctx))
    attention = ub * n_ctx * shape.n_head * 4
    layer_compute = attention + ub * n_ff * 4 * 2 + ub * shape.n_embd * 4 * 4
    local_compute = ub * shape.n_embd * 4 * 4 + ub * n_ctx * 4 * 2
    return ModelCosts(n_layer=n_layer, layer_weights=tuple(layers), layer_kv=kv_total // max(1, n_layer),
                      input_bytes=input_bytes, output_bytes=output_bytes, logits_bytes=shape.n_vocab * ub * 4,
                      layer_compute=layer_compute, local_compute=local_compute)


@dataclass
class Part:
    """One device's share of the model."""

    device: str  # "this machine" or the worker's host:port
    memory_bytes: int | None  # what the device reports free (None: unknown, this machine unlimited)
    units: int = 0  # repeating layers (+1 when it holds the output layer)
    first_layer: int | None = None
    last_layer: int | None = None  # inclusive
    output: bool = False
    input: bool = False
    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    fits: bool = True

    @property
    def layers(self) -> int:
        return self.units - (1 if self.output else 0)

    @property
    def bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes

    @property
    def budget(self) -> int | None:
        return None if self.memory_bytes is None else int(self.memory_bytes * HEADROOM)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(layers=self.layers, bytes=self.bytes)
        return d


@dataclass
class Split:
    """The placement of a model over [this machine, worker 1, ...] and the llama.cpp parameters that make it."""

    parts: list[Part]
    n_gpu_layers: int  # llama_model_params.n_gpu_layers (units on the workers)
    tensor_split: list[float]  # per worker, in layer units (llama_model_params.tensor_split)
    policy: str  # "memory" (by reported memory) or "tensor_split"
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        return [p.units for p in self.parts]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"parts": [p.to_dict() for p in self.parts], "n_gpu_layers": self.n_gpu_layers,
                "tensor_split": self.tensor_split, "policy": self.policy, "notes": list(self.notes)}


def parse_tensor_split(value: Any, n_workers: int) -> list[float] | None:
    """tensor_split as given (a list of numbers, or "0,1,1") -> n_workers + 1 shares; errors name the fix."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            shares = [float(x) for x in value.replace(" ", "").split(",") if x != ""]
        except ValueError:
            shares = []
    elif isinstance(value, (list, tuple)):
        shares = value
    else:
        shares = []
    ok = (len(shares) == n_workers + 1 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 and math.isfinite(x) and x >= 0 for x in shares) and sum(shares) > 0)
    if not ok:
        raise InvalidParameterError(
            f"Invalid tensor_split: {value!r}.",
            fix=f"Give {n_workers + 1} non-negative shares, this machine's first and then one per worker in the order "
            f"of workers (e.g. {','.join(['0'] + ['1'] * n_workers)} puts every layer on the workers, evenly).",
            parameter="tensor_split", value=value)
    return [float(x) for x in shares]


def _largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    s = float(sum(weights))
    raw = [w * total / s for w in weights]
    counts = [int(math.floor(r + 1e-9)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - counts[i], weights[i]), reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _fill(parts: list[Part], counts: list[int], costs: ModelCosts, local_bytes_extra: int) -> None:
    """Give each part its contiguous units (this machine first) and its bytes."""
    last = max((i for i, c in enumerate(counts) if c > 0), default=0)
    start = 0
    for i, (part, count) in enumerate(zip(parts, counts)):
        part.units = count
        part.output = count > 0 and i == last
        part.input = i == 0
        layer_end = min(start + count, costs.n_layer)
        part.first_layer, part.last_layer = (start, layer_end - 1) if layer_end > start else (None, None)
        weights = sum(costs.layer_weights[start:layer_end]) if layer_end > start else 0
        part.kv_bytes = costs.layer_kv * max(0, layer_end - start)
        part.weights_bytes = weights + (costs.output_bytes if part.output else 0)
        compute = costs.layer_compute if layer_end > start else 0
        if part.output:
            compute = max(compute, costs.logits_bytes + costs.layer_compute // 2)
        if i == 0:
            part.weights_bytes += costs.input_bytes
            compute += costs.local_compute
        part.compute_bytes = compute + (local_bytes_extra if i == 0 else 0)
        budget = part.budget
        part.fits = budget is None or part.bytes <= budget
        start += count


def plan_split(costs: ModelCosts, workers: Sequence[tuple[str, int]], *, local_memory: int | None = None,
               tensor_split: Sequence[float] | None = None, check: bool = True) -> Split:
    """Place ``costs`` over this machine (``local_memory`` bytes available, None = do not check) and ``workers``
    [(name, reported free bytes), ...].  Raises DoesNotFitError, naming each device's need, when it does not fit
    (``check=False``: returns the split with ``fits`` False instead)."""
    parts = [Part("this machine", local_memory)] + [Part(name, free) for name, free in workers]
    units = costs.units
    notes: list[str] = []
    if tensor_split is not None:
        counts = _largest_remainder(tensor_split, units)
        policy = "tensor_split"
    else:
        policy = "memory"
        free = [max(0, f) for _, f in workers]
        counts = [0] + (_largest_remainder(free, units) if sum(free) > 0 else [0] * len(workers))
        if sum(free) == 0:
            counts[0] = units
        for _ in range(units * (len(workers) + 1) + 1):  # move units off over-full workers, to workers with room, else here
            _fill(parts, counts, costs, LOCAL_RUNTIME_BYTES)
            over = [i for i in range(1, len(parts)) if not parts[i].fits and counts[i] > 0]
            if not over:
                break
            i = max(over, key=lambda k: parts[k].bytes - (parts[k].budget or 0))
            room = [j for j in range(1, len(parts)) if j != i and parts[j].budget is not None
                    and parts[j].budget - parts[j].bytes >= costs.unit_bytes(0) + (costs.layer_compute if counts[j] == 0 else 0)]
            counts[i] -= 1
            if room:
                counts[max(room, key=lambda j: parts[j].budget - parts[j].bytes)] += 1
            else:
                counts[0] += 1
        if counts[0]:
            notes.append(f"{counts[0]} of {units} layers stay on this machine: the workers' reported memory does not "
                         "hold them all.")
    _fill(parts, counts, costs, LOCAL_RUNTIME_BYTES)
    for p in parts[1:]:
        if p.units == 0:
            notes.append(f"worker {p.device} gets no layers (it reports {human_bytes(p.memory_bytes or 0)} free).")
    split = Split(parts=parts, n_gpu_layers=units - counts[0], tensor_split=[float(c) for c in counts[1:]],
                  policy=policy, notes=notes)
    if check and not split.fits:
        bad = [p for p in parts if not p.fits]
        raise DoesNotFitError(
            "The model does not fit " + "; ".join(
                f"{p.device}: needs {human_bytes(p.bytes)} for {p.layers} layers{' + output' if p.output else ''}"
                f"{' + embeddings' if p.input else ''}, has {human_bytes(p.budget or 0)} usable of "
                f"{human_bytes(p.memory_bytes or 0)} reported" for p in bad) + ".",
            fix="Add workers or give them more memory (edgelm worker --mem), use a smaller quantization or n_ctx, or "
            "set tensor_split to move layers to the devices with room.",
            needed=sum(p.bytes for p in parts), available=sum(p.budget or 0 for p in parts),
            split=split.to_dict())
    return split


