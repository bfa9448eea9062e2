"""Which decoder blocks matter least: each block scored on calibration text.

For every block i (the first and last are never candidates) three numbers, all on calibration windows:

* ``angular`` - the angular distance between the hidden states entering and leaving the block, arccos(cos)/pi,
  averaged over tokens (Gromov et al. 2024; ShortGPT's "block influence" is 1 - cos of the same vectors).  Cheap,
  and only a proxy: a block can barely turn the residual stream and still matter a lot.
* ``kl`` - KL(original || model without block i) of the next-token distributions: what removing the block
  actually costs, measured.
* ``kl_healed`` - the same after the least-squares healing :mod:`.linear` would apply (the block before i refitted
  to carry what i added).  The choice uses this one: a block that is nearly a linear function of its input is
  cheap to remove even when its angular distance is large.

The fit of the healing uses other windows than the KL measurement, so a block is not favoured by an over-fitted map.
Each KL costs about half a forward pass per block, so only the one the choice needs is measured (``kl_healed`` when
the result is healed, ``kl`` when it is not); ``ce_increase`` is the cross-entropy increase of that same model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from .linear import _block, ridge_fit
from .surgery import decoder_layers, head_logits, position_embeddings, run_layers

Progress = Callable[[str, float], None]


@dataclass
class LayerScore:
    layer: int
    angular: float
    kl: float | None = None
    kl_healed: float | None = None
    ce_increase: float | None = None  # cross-entropy increase (nats/token) on the scoring text (healed, if measured)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kl_divergence(teacher_logits: Any, student_logits: Any) -> float:
    """Mean KL(teacher || student) per token, in nats."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def cross_entropy(logits: Any, ids: Any) -> float:
    import torch.nn.functional as F

    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)))


def score_layers(model: Any, fit: Sequence[Any], score: Sequence[Any], *, ridge: float = 1e-2, plain: bool = True,
                 healed: bool = True, progress: Progress | None = None) -> list[LayerScore]:
    """Scores of blocks 1..n-2 of ``model``; ``fit`` and ``score``: lists of token-id tensors (batch, seq).
    ``plain`` / ``healed``: measure ``kl`` / ``kl_healed`` (each costs about half a forward pass per block)."""
    import torch

    report = progress or (lambda message, fraction: None)
    layers = decoder_layers(model)
    n = len(layers)
    candidates = range(1, n - 1)
    with torch.no_grad():
        # the healing fit: for block c removed, block c-1's MLP activations A and the state after block c, Y
        grams: dict[int, Any] = {}
        cross: dict[int, Any] = {}
        for b, ids in enumerate(fit if healed else []):
            states, mids, acts = _trace(model, ids)
            for c in candidates:
                a = acts[c - 1].reshape(-1, acts[c - 1].shape[-1]).double()
                y = (states[c + 1] - mids[c - 1]).reshape(-1, states[c + 1].shape[-1]).double()
                grams[c] = grams.get(c, 0) + a.T @ a
                cross[c] = cross.get(c, 0) + a.T @ y
            report("fitting the healing maps", 0.3 * (b + 1) / len(fit))
        maps = {c: ridge_fit(grams[c], cross[c], layers[c - 1].mlp.down_proj.weight.data.T.double(), ridge).float()
                for c in candidates} if healed else {}  # in x out
        del grams, cross
        # scoring: the original's logits and states once, then each block removed
        scores = [LayerScore(layer=i, angular=0.0) for i in candidates]
        totals = {i: [0.0, 0.0, 0.0, 0] for i in candidates}
        count = 0
        for b, ids in enumerate(score):
            states, mids, acts = _trace(model, ids)
            rope = position_embeddings(model, states[0])
            t_logits = head_logits(model, states[-1])
            base_ce = cross_entropy(t_logits, ids)
            for k, i in enumerate(candidates):
                a, o = states[i], states[i + 1]
                cos = torch.nn.functional.cosine_similarity(a, o, dim=-1).clamp(-1, 1)
                totals[i][0] += float((torch.arccos(cos) / math.pi).mean())
                if plain:
                    removed = head_logits(model, run_layers(model, layers[i + 1:], states[i], rope))
                    totals[i][1] += kl_divergence(t_logits, removed)
                    if not healed:
                        totals[i][3] += cross_entropy(removed, ids) - base_ce
                if healed:
                    fixed = mids[i - 1] + acts[i - 1] @ maps[i]
                    repaired = head_logits(model, run_layers(model, layers[i + 1:], fixed, rope))
                    totals[i][2] += kl_divergence(t_logits, repaired)
                    totals[i][3] += cross_entropy(repaired, ids) - base_ce
                report(f"scoring block {i}", 0.3 + 0.7 * (b * len(candidates) + k + 1) / (len(score) * len(candidates)))
            count += 1
        for s in scores:
            ang, kl, klh, dce = totals[s.layer]
            s.angular = ang / count
            s.ce_increase = dce / count if plain or healed else None
            s.kl = kl / count if plain else None
            s.kl_healed = klh / count if healed else None
    return scores


def _trace(model: Any, ids: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """(states entering each block + the last output, states after each block's attention, each block's MLP
    activations) of the model on ``ids``."""
    h = model.model.embed_tokens(ids)
    rope = position_embeddings(model, h)
    states, mids, acts = [h], [], []
    for layer in decoder_layers(model):
        mid, act = _block(layer, h, rope)
        h = mid + layer.mlp.down_proj(act)
        states.append(h)
        mids.append(mid)
        acts.append(act)
    return states, mids, acts
