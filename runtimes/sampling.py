"""llama.cpp's sampler chain in numpy, for backends that hand edgelm their logits (onnxruntime).

Same order and meaning as llama.cpp: penalties over the last ``repeat_last_n`` tokens -> top-k -> top-p -> min-p
-> temperature -> a seeded draw, so both backends mean the same thing by the same parameters.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Sequence

import numpy as np

from edgelm.params import GenerationParams


class NumpySampler:
    """llama.cpp's sampler chain in numpy: penalties -> top-k -> top-p -> min-p -> temperature -> draw."""

    def __init__(self, params: GenerationParams, history: Sequence[int], n_ctx: int, guide: Any = None) -> None:
        self.p = params
        self.guide = guide  # edgelm.constraints.Guide: masks the logits first, learns the chosen token after
        self.rng = np.random.default_rng(params.seed)
        self.penalize = params.repeat_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0
        last_n = n_ctx if params.repeat_last_n == -1 else params.repeat_last_n
        self.window: deque[int] = deque(maxlen=max(last_n, 0))
        self.counts: Counter[int] = Counter()
        if self.penalize and last_n > 0:
            for t in history[-last_n:]:
                self.accept(t)

    def close(self) -> None:
        pass

    def accept(self, token: int) -> None:
        if not self.penalize or self.window.maxlen == 0:
            return
        w = self.window
        if len(w) == w.maxlen:
            old = w[0]
            self.counts[old] -= 1
            if self.counts[old] <= 0:
                del self.counts[old]
        w.append(token)
        self.counts[token] += 1

    def __call__(self, logits: np.ndarray) -> int:
        guide = self.guide
        if guide is None:
            return self._choose(logits)
        if guide.active:
            logits = np.array(logits, dtype=np.float32)  # a copy: the runtime's buffer stays as it was
            guide.mask(logits)
        token = self._choose(logits)
        guide.accept(token)
        return token

    def _choose(self, logits: np.ndarray) -> int:
        p = self.p
        if self.penalize and self.counts:
            logits = logits.astype(np.float32, copy=True)  # a copy: masked (-inf) logits stay -inf
            ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            cnt = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            ids_ok = ids < logits.shape[0]
            ids, cnt = ids[ids_ok], cnt[ids_ok]
            v = logits[ids]
            if p.repeat_penalty != 1.0:
                v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
            v = v - cnt * p.frequency_penalty - p.presence_penalty
            logits[ids] = v
        if p.greedy:
            return int(logits.argmax())
        cand = np.arange(logits.shape[0])
        vals = logits
        if 0 < p.top_k < vals.shape[0]:
            idx = np.argpartition(vals, -p.top_k)[-p.top_k:]
            cand, vals = cand[idx], vals[idx]
        # probabilities before temperature, as llama.cpp's top-p / min-p see them
        m = vals.max()
        prob = np.exp((vals - m).astype(np.float64))
        prob /= prob.sum()
        if p.min_p > 0.0:  # min-p keeps a prefix of the sorted order too, so it may run before top-p
            keep = prob >= p.min_p * prob.max()
            cand, vals, prob = cand[keep], vals[keep], prob[keep]
            prob = prob / prob.sum()
        if p.top_p < 1.0 and len(cand) > 1:
            order = np.argsort(-prob, kind="stable")
            cum = np.cumsum(prob[order])
            n = int(np.searchsorted(cum, p.top_p) + 1)
            order = order[: max(1, min(n, len(order)))]
            cand, vals = cand[order], vals[order]
        scaled = (vals - vals.max()).astype(np.float64) / p.temperature
        w = np.exp(scaled)
        w /= w.sum()
        return int(cand[self.rng.choice(len(cand), p=w)])


