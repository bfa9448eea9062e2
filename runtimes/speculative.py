"""Speculative decoding: draft a few tokens cheaply, verify them in one batch, keep what greedy decoding agrees with.

Drafts come from the prompt itself (n-gram lookup, :class:`PromptLookup`) or from a smaller model with the same
tokenizer (:class:`DraftModel`).  Every yielded token is the argmax after the tokens before it, exactly as in plain
greedy decoding; drafts only decide how many positions one evaluation checks.  Works on any backend that
implements :class:`Verifier` (the llama.cpp backend does).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generator, Protocol, Sequence

from .base import Seq

MODES = ("prompt-lookup", "draft")


class Verifier(Protocol):
    n_ctx: int

    def evaluate(self, seq: Seq, tokens: Sequence[int], *, all_logits: bool) -> None:
        """Evaluate ``tokens`` after ``seq``; logits for every one of them when ``all_logits``."""

    def argmax(self, row: int) -> int:
        """The most likely next token at ``row`` of the last evaluation (-1: its last row)."""

    def rewind(self, seq: Seq, n: int) -> bool: ...

    def is_eog(self, token: int) -> bool: ...


class PromptLookup:
    """Drafts by n-gram lookup: the tokens that followed the latest earlier occurrence of the current suffix."""

    SIZES = (4, 3, 2)

    def __init__(self, tokens: Sequence[int]) -> None:
        self.history: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        h = self.history
        h.append(token)
        end = len(h) - 1  # the n-gram ending just before `token` is now followed by something
        for n in self.SIZES:
            if end >= n:
                self.index[tuple(h[end - n : end])] = end - n

    def propose(self, k: int) -> list[int]:
        h = self.history
        for n in self.SIZES:
            if len(h) >= n:
                start = self.index.get(tuple(h[-n:]))
                if start is not None:
                    return h[start + n : start + n + k]
        return []


class DraftModel:
    """Drafts with a smaller model of the same tokenizer, greedily (its KV cache follows the history)."""

    def __init__(self, draft: Any, tokens: Sequence[int]) -> None:
        self.draft = draft
        self.seq = draft.sequences[0]
        self.history = list(tokens)

    def append(self, token: int) -> None:
        self.history.append(token)

    def propose(self, k: int) -> list[int]:
        d, h = self.draft, self.history
        k = min(k, d.n_ctx - len(h) - 1)
        if k <= 0:
            return []
        d.prepare(self.seq, h)
        out: list[int] = []
        for _ in range(k):
            t = d.argmax(-1)
            if d.is_eog(t):
                break
            out.append(t)
            if len(out) < k:
                d.evaluate(self.seq, (t,), all_logits=False)
        return out


class Pacer:
    """Whether drafting pays in this generation, from its own measured seconds per token.

    A round that checks drafts costs more than a plain step (verifying 4 tokens is ~2-3x one on a CPU), so drafts that
    are mostly rejected make decoding slower than plain.  The pacer keeps two running means: seconds per plain step,
    and seconds per yielded token in rounds with drafts.  When the drafting mean is the slower one, drafting pauses
    for ``pause`` tokens (doubling, up to MAX_PAUSE, each time it fails again) and is then tried once more: text that
    starts repeating later (a list, code being copied) gets drafts again.  ``clock`` is injected for tests.
    """

    WEIGHT = 0.25  # of the newest measurement in each running mean
    MIN_ROUNDS = 3  # draft rounds measured before drafting may be judged
    FIRST_PAUSE, MAX_PAUSE = 16, 512

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.plain: float | None = None  # seconds per plain step
        self.drafting: float | None = None  # seconds per yielded token in rounds with drafts
        self.rounds = 0  # draft rounds measured since drafting last resumed
        self.pause = 0  # plain steps left before drafting is tried again
        self.next_pause = self.FIRST_PAUSE
        self.paused = 0  # times drafting was paused, for the stats

    @staticmethod
    def _mean(old: float | None, new: float) -> float:
        return new if old is None else old + Pacer.WEIGHT * (new - old)

    def wants_drafts(self) -> bool:
        if self.pause > 0:
            self.pause -= 1
            return False
        return True

    def record(self, seconds: float, drafted: int, yielded: int) -> None:
        """One evaluation: ``drafted`` tokens checked besides the new one, ``yielded`` tokens it produced."""
        if not drafted:
            self.plain = self._mean(self.plain, seconds)
            return
        self.drafting = self._mean(self.drafting, seconds / max(1, yielded))
        self.rounds += 1
        if self.plain is None and self.rounds >= self.MIN_ROUNDS:
            self.pause = 1  # drafts were proposed at every step so far: one plain step to compare with
        elif self.rounds >= self.MIN_ROUNDS and self.plain is not None and self.drafting > self.plain:
            self.pause, self.next_pause = self.next_pause, min(self.MAX_PAUSE, self.next_pause * 2)
            self.rounds, self.drafting, self.paused = 0, None, self.paused + 1
        elif self.rounds >= self.MIN_ROUNDS:
            self.next_pause = self.FIRST_PAUSE  # drafting pays again: a later failure pauses it briefly


def speculative_loop(v: Verifier, seq: Seq, drafter: Any, max_draft: int, stats: dict[str, Any],
                     pacer: Pacer | None = None) -> Generator[int, None, None]:
    """Greedy decoding of ``seq`` (already holding the prompt) that evaluates [token, *draft] in one batch, drafting
    only while :class:`Pacer` finds it faster than plain steps."""
    k = max_draft
    pacer = pacer or Pacer()
    stats.update(rounds=0, drafted=0, accepted=0, paused=0)
    token = v.argmax(-1)
    while True:
        yield token
        drafter.append(token)
        pos = len(seq.tokens)
        if pos >= v.n_ctx:
            return
        room = v.n_ctx - pos - 1
        started = pacer.clock()  # drafting's cost counts (a draft model's own steps), not only the verification
        draft = drafter.propose(min(k, room)) if room > 0 and pacer.wants_drafts() else []
        v.evaluate(seq, [token, *draft], all_logits=bool(draft))
        if not draft:
            token = v.argmax(-1)
            pacer.record(pacer.clock() - started, 0, 1)
            continue
        accepted = []
        nxt = v.argmax(0)
        for i, d in enumerate(draft):
            if nxt != d:
                break
            accepted.append(d)
            nxt = v.argmax(i + 1)
        if len(accepted) < len(draft):  # forget the rejected drafts
            v.rewind(seq, pos + 1 + len(accepted))
        pacer.record(pacer.clock() - started, len(draft), 1 + len(accepted))
        stats["rounds"] += 1
        stats["drafted"] += len(draft)
        stats["accepted"] += len(accepted)
        stats["paused"] = pacer.paused
        # grow the draft while drafts are right, shrink it to what was right when they are not
        k = min(max_draft, k * 2) if len(accepted) == len(draft) else max(2, len(accepted) + 1)
        for d in accepted:
            yield d
            drafter.append(d)
        token = nxt


def plain_greedy(params: Any) -> bool:
    """Speculation applies to plain greedy decoding only (temperature 0, no grammar, no penalties), where its
    output is identical; anything else runs the plain path."""
    return params.greedy and not params.grammar and params.repeat_penalty == 1.0 \
        and not params.presence_penalty and not params.frequency_penalty
