"""Closed-form pruning and healing: one pass over the layers, on calibration activations.

The MLP of a decoder block ends in a linear map, ``down_proj``, whose output is added to the residual stream.  For a
fixed input, choosing ``down_proj``'s weights to reproduce a target output is ordinary least squares on the MLP's
intermediate activations ``A`` (one column per neuron): ``W = argmin |A W - Y|^2 + lam |W - W0|^2``.  Two uses:

* **Width pruning** (Optimal Brain Surgeon, structured: Hassibi & Stork 1993; as in ZipLM / SlimGPT): remove the
  neuron whose column costs least once the remaining weights absorb it, ``|W[j]|^2 / [H^-1]_jj`` with
  ``H = A^T A``, update the remaining weights, and repeat; gate/up lose the same rows.
* **Depth healing** (as in ReplaceMe / LLM-Streamline, with the map folded into the previous MLP): the block before a
  removed one gets ``down_proj`` weights whose output also carries what the removed blocks added to the residual
  stream, fitted against the original model's hidden state after them.

Layers are processed in order on the already-compressed model's own activations (the errors of earlier layers are
what later layers see, as in GPTQ), with the original model run alongside for the targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .surgery import decoder_layers, position_embeddings

Progress = Callable[[str, float], None]


@dataclass
class LinearPlan:
    drop: list[int]  # original indices of the blocks removed
    width: int | None = None  # MLP neurons kept per layer (None: all)
    heal_depth: bool = True  # fit the block before each removed run to the original's state after it
    compensate: bool = True  # width pruning: the kept neurons' weights absorb the removed ones (else left as they were)
    ridge: float = 1e-2  # lam, relative to the mean diagonal of A^T A
    stats: dict[str, Any] = field(default_factory=dict)


def _capture_input(module: Any) -> tuple[dict[str, Any], Any]:
    box: dict[str, Any] = {}

    def hook(_mod: Any, args: tuple) -> None:
        box["x"] = args[0]

    return box, module.register_forward_pre_hook(hook)


def _block(layer: Any, hidden: Any, rope: tuple[Any, Any]) -> tuple[Any, Any]:
    """(state after attention, MLP intermediate activations) of one decoder block."""
    pe, pos = rope
    attn, _ = layer.self_attn(layer.input_layernorm(hidden), attention_mask=None, position_embeddings=pe,
                              position_ids=pos)
    mid = hidden + attn
    box, handle = _capture_input(layer.mlp.down_proj)
    try:
        layer.mlp(layer.post_attention_layernorm(mid))
    finally:
        handle.remove()
    return mid, box["x"]


def obs_prune(weight: Any, hessian: Any, keep: int, ridge: float, group: int | None = None) -> tuple[Any, Any, float]:
    """Structured OBS on the input columns of ``weight`` (out x in): (kept column indices, compensated weight of
    the kept columns, relative error |A(W - W')|^2 / |A W|^2).

    Columns go ``group`` at a time (default: 1/32 of those to remove), each group the lowest-scored columns at that
    point, removed together with the exact block update ``W -= W[:, S] (Hinv[S, S])^-1 Hinv[S, :]`` - a few dozen
    updates of the inverse instead of one per column.  float64."""
    import torch

    w = weight.clone().double()  # out x in
    h = hessian.double()
    n = h.shape[0]
    damp = ridge * h.diagonal().mean().clamp_min(1e-12)
    hinv = torch.linalg.inv(h + damp * torch.eye(n, dtype=h.dtype))
    alive = torch.ones(n, dtype=torch.bool)
    base = float(torch.einsum("oi,ij,oj->", w, h, w))
    remove = n - keep
    step = group or max(1, remove // 32)
    while remove > 0:
        k = min(step, remove)
        score = (w * w).sum(0) / hinv.diagonal().clamp_min(1e-30)
        score[~alive] = float("inf")
        s = torch.topk(score, k, largest=False).indices
        block_inv = torch.linalg.inv(hinv[s][:, s])
        rows = hinv[s]  # k x n
        w -= (w[:, s] @ block_inv) @ rows
        hinv -= rows.T @ block_inv @ rows
        alive[s] = False
        w[:, s] = 0.0
        hinv[s, :] = 0.0
        hinv[:, s] = 0.0
        hinv[s, s] = 1.0  # keeps the diagonal positive; dead columns are never chosen again
        remove -= k
    idx = torch.nonzero(alive).flatten()
    wk = w[:, idx]
    lost = float(torch.einsum("oi,ij,oj->", weight.double() - w, h, weight.double() - w))
    return idx, wk, lost / max(base, 1e-30)


def ridge_fit(gram: Any, cross: Any, w0: Any, ridge: float) -> Any:
    """argmin_W |A W - Y|^2 + lam |W - W0|^2 from gram = A^T A, cross = A^T Y, w0 (in x out)."""
    import torch

    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, cross + lam * w0)


def linear_pass(teacher: Any, student: Any, batches: Sequence[Any], plan: LinearPlan,
                progress: Progress | None = None) -> dict[str, Any]:
    """Prune ``student`` (a deep copy of ``teacher`` with all its layers) as ``plan`` says, in place, healing with
    least squares; ``batches``: token id tensors (batch, seq).  Returns per-layer statistics.  The student's
    removed layers are left in place; the caller drops them afterwards (``surgery.drop_layers``)."""
    import torch

    report = progress or (lambda message, fraction: None)
    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    n = len(t_layers)
    drop = set(plan.drop)
    keep = [i for i in range(n) if i not in drop]
    stats: dict[str, Any] = {"layers": []}
    kept_neurons: list[list[int]] = []
    with torch.no_grad():
        teach = [teacher.model.embed_tokens(b) for b in batches]
        stud = [t.clone() for t in teach]
        ropes = [position_embeddings(teacher, t) for t in teach]
        done = 0
        for k, j in enumerate(keep):
            nxt = keep[k + 1] if k + 1 < len(keep) else n  # the next kept block (n: the end)
            cut = nxt != j + 1
            layer = s_layers[j]
            down = layer.mlp.down_proj
            w0 = down.weight.data.T.double()  # in x out
            fit_target = cut and plan.heal_depth
            width = plan.width if plan.width is not None and plan.width < w0.shape[0] else None
            mids, acts = [], []
            gram = torch.zeros(w0.shape[0], w0.shape[0], dtype=torch.float64)
            cross = torch.zeros_like(w0) if fit_target else None
            # the original model to the boundary this block must reach (after the removed blocks, if any)
            for b in range(len(batches)):
                mid, act = _block(layer, stud[b], ropes[b])
                mids.append(mid)
                acts.append(act)
                a = act.reshape(-1, act.shape[-1]).double()
                gram += a.T @ a
                h = teach[b]
                for i in range(j, nxt):
                    h = t_layers[i](h, attention_mask=None, position_embeddings=ropes[b][0],
                                    position_ids=ropes[b][1])
                teach[b] = h
                if fit_target:
                    cross += a.T @ (h - mid).reshape(-1, h.shape[-1]).double()
            entry: dict[str, Any] = {"layer": j}
            w = ridge_fit(gram, cross, w0, plan.ridge) if fit_target else w0
            if width is not None:
                idx, wk, err = obs_prune(w.T, gram, width, plan.ridge)
                entry["mlp_error"] = err
                if not plan.compensate:
                    wk = w.T[:, idx]
                kept_neurons.append(idx.tolist())
                down.weight.data = wk.float().contiguous()  # out x kept
                down.in_features = width
                for name in ("gate_proj", "up_proj"):
                    lin = getattr(layer.mlp, name)
                    lin.weight.data = lin.weight.data[idx].contiguous()
                    if lin.bias is not None:
                        lin.bias.data = lin.bias.data[idx].contiguous()
                    lin.out_features = width
                if hasattr(layer.mlp, "intermediate_size"):
                    layer.mlp.intermediate_size = width
                acts = [a[..., idx] for a in acts]
            elif fit_target:
                down.weight.data = w.T.float().contiguous()
            for b in range(len(batches)):
                stud[b] = mids[b] + down(acts[b])
            if fit_target or width is not None:
                err = sum(float(((stud[b] - teach[b]) ** 2).sum()) for b in range(len(batches)))
                ref = sum(float((teach[b] ** 2).sum()) for b in range(len(batches)))
                entry["state_error"] = err / max(ref, 1e-30)
            stats["layers"].append(entry)
            done += 1
            report(f"layer {j + 1}/{n}", done / len(keep))
    if plan.width is not None:
        student.config.intermediate_size = plan.width
        stats["kept_neurons"] = kept_neurons
    plan.stats = stats
    return stats
