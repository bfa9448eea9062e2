"""Speculative decoding: draft a few tokens cheaply, verify them in one batch, keep what greedy decoding agrees with.

Drafts come from the prompt itself (n-gram lookup, :class:`PromptLookup`) or from a smaller model with the same
tokenizer (:class:`DraftModel`).  Every yielded token is the argmax after the tokens before it, exactly as in plain
greedy decoding; drafts only decide how many positions one evaluation checks, and :class:`Pacer` decides how many
tokens of a proposal are worth checking (none, where drafting would not pay).  Works on any backend that implements
:class:`Verifier` (the llama.cpp backend does).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generator, Mapping, Protocol, Sequence

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


class Drafter(Protocol):
    """Proposes drafts, and says beforehand how likely each would be kept.

    ``match(most)`` gives the kind of each token it could draft now (at most ``most``; [] when it has nothing),
    ``PRIORS`` the chance that a token of each kind is kept before this generation says otherwise, and
    ``propose(k)`` then drafts the first ``k``.  ``peek()`` is the first token a draft would have when knowing it
    costs nothing (prompt lookup), else None: a draft that was not made is checked against what came instead."""

    PRIORS: Mapping[int, float]

    def append(self, token: int) -> None: ...

    def match(self, most: int) -> list[int]: ...

    def propose(self, k: int) -> list[int]: ...

    def peek(self) -> int | None: ...


class PromptLookup:
    """Drafts by n-gram lookup: the tokens that followed the latest earlier occurrence of the current suffix.

    A drafted token's kind is the length of the match it follows, counted back beyond the n-gram up to ``LONG``
    tokens (the i-th token of a draft is checked only once the ones before it were kept, so it follows a match
    i - 1 tokens longer): the longer the suffix that recurs, the likelier the text is being copied."""

    SIZES = (4, 3, 2)
    LONG = 8
    # how often the next token was the looked-up one, by match length (SmolLM2-135M, greedy, 128 tokens after each
    # of ten prompts: copy, prose, summary, questions, code, lists, recipe, e-mail): 2 tokens 0.49, 3 0.78, 4 0.73,
    # 5 to 7 ~0.9, 8 or more 0.96 (0.9 outside copies), taken a little lower: a first guess that is wrong costs time
    PRIORS: Mapping[int, float] = {2: 0.5, 3: 0.7, 4: 0.7, 5: 0.8, 6: 0.8, 7: 0.8, 8: 0.9}

    def __init__(self, tokens: Sequence[int]) -> None:
        self.history: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self._next = -1  # where the draft of the last match() starts in history (-1: no match)
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        h = self.history
        h.append(token)
        end = len(h) - 1  # the n-gram ending just before `token` is now followed by something
        for n in self.SIZES:
            if end >= n:
                self.index[tuple(h[end - n : end])] = end - n

    def match(self, most: int) -> list[int]:
        h = self.history
        self._next = -1
        for n in self.SIZES:
            if len(h) >= n:
                start = self.index.get(tuple(h[-n:]))
                if start is not None:
                    length = n  # h[start:start+n] == h[-n:]; how far back does the match go?
                    while length < self.LONG and start > length - n and h[start - 1 - (length - n)] == h[-1 - length]:
                        length += 1
                    self._next = start + n
                    return [min(length + i, self.LONG) for i in range(min(most, len(h) - self._next))]
        return []

    def propose(self, k: int) -> list[int]:
        """``k`` tokens of the continuation the last :meth:`match` found."""
        return self.history[self._next : self._next + k] if self._next >= 0 else []

    def peek(self) -> int | None:
        return self.history[self._next] if self._next >= 0 else None


class DraftModel:
    """Drafts with a smaller model of the same tokenizer, greedily (its KV cache follows the history)."""

    PRIORS: Mapping[int, float] = {0: 0.75}  # one kind: what the draft model says

    def __init__(self, draft: Any, tokens: Sequence[int]) -> None:
        self.draft = draft
        self.seq = draft.sequences[0]
        self.history = list(tokens)

    def append(self, token: int) -> None:
        self.history.append(token)

    def match(self, most: int) -> list[int]:
        return [0] * max(0, min(most, self.draft.n_ctx - len(self.history) - 1))

    def peek(self) -> int | None:
        return None  # it would take a step of the draft model

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


class Costs:
    """Seconds per evaluation of n tokens (the new one and n-1 drafts, drafting included), measured on one backend
    and kept across its generations: what drafting costs is the machine's and the model's, not the text's.

    On a CPU a drafted token costs most of a plain step (SmolLM2-135M on 2 threads: 2 tokens 1.85 steps, 3 tokens
    2.4, 9 tokens 5.3), on a GPU a few percent.  A size not measured yet is interpolated between measured ones, and
    beyond the largest costs its cost per drafted token or PRIOR_EXTRA, whichever is less (costs grow slower than
    linearly on a CPU: a longer draft is tried once it would pay at that price, and then measured)."""

    WEIGHT = 0.25  # of the newest measurement in each running mean
    PRIOR_EXTRA = 0.6  # plain steps per drafted token, before any is measured
    REFRESH = 32  # draft rounds after which one plain step is measured again (the machine's load changes)

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}  # evaluation size -> running mean of its seconds
        self.rounds_since_plain = 0

    def record(self, size: int, seconds: float) -> None:
        old = self.seconds.get(size)
        self.seconds[size] = seconds if old is None else old + self.WEIGHT * (seconds - old)
        self.rounds_since_plain = 0 if size == 1 else self.rounds_since_plain + 1

    def wants_plain(self) -> bool:
        """True when a plain step should be measured (none yet, or none for REFRESH rounds)."""
        return 1 not in self.seconds or self.rounds_since_plain >= self.REFRESH

    def relative(self, size: int) -> float:
        """What evaluating ``size`` tokens costs, in plain steps (once a plain step is measured)."""
        s = self.seconds
        one = s[1]
        if size in s:
            cost = s[size] / one
        else:
            below = max(m for m in s if m < size)
            above = min((m for m in s if m > size), default=0)
            low = s[below] / one
            if above:
                cost = low + (s[above] / one - low) * (size - below) / (above - below)
            else:
                extra = min((low - 1) / (below - 1), self.PRIOR_EXTRA) if below > 1 else self.PRIOR_EXTRA
                cost = low + extra * (size - below)
        # per drafted token a longer draft costs no more than a shorter one (a batch shares its fixed costs): so a
        # size measured once while the machine was busy is not shunned for good
        for m in s:
            if 1 < m < size:
                cost = min(cost, 1 + (s[m] / one - 1) * (size - 1) / (m - 1))
        return cost


class Pacer:
    """Per generation: how many tokens of a proposal to draft, from what drafting costs and how often such tokens
    are kept, so that drafting pays or steps aside.

    A drafted token costs a share of a plain step (:class:`Costs`) and is worth one only if it is kept: the i-th of
    a draft is, with chance p1 * ... * pi, pj being the chance of the j-th token's kind (:class:`Drafter`).
    Drafting k tokens yields 1 + p1 + p1*p2 + ... per evaluation of 1 + k tokens; the pacer drafts the k with the
    most tokens per plain step, and none unless that beats a plain step by MARGIN (by anything, before the first
    draft is measured).  Each kind's chance is the drafter's prior, moved by this generation's outcomes: drafted
    tokens kept or not, and, for a drafter that can peek, whether the token it would have drafted at a plain step
    came.  Outcomes fade (half their weight in ~35 tokens), so the pacer follows the text: a list or a copy later
    in an answer gets drafts.  ``clock`` is injected for tests."""

    MARGIN = 0.1
    PRIOR_WEIGHT = 4.0  # the prior counts as this many outcomes
    FADE = 0.98  # per generated token, of the weight of earlier outcomes

    def __init__(self, clock: Callable[[], float] = time.perf_counter, costs: Costs | None = None) -> None:
        self.clock = clock
        self.costs = costs if costs is not None else Costs()
        self.tokens = 0  # generated so far
        self.outcomes: dict[int, tuple[float, float, int]] = {}  # kind -> (kept, seen, at tokens), faded to then

    def acceptance(self, kind: int, prior: float) -> float:
        """The chance that a drafted token of ``kind`` is kept (when the ones before it in its draft were)."""
        kept, seen, at = self.outcomes.get(kind, (0.0, 0.0, 0))
        fade = self.FADE ** (self.tokens - at)
        return (kept * fade + self.PRIOR_WEIGHT * prior) / (seen * fade + self.PRIOR_WEIGHT)

    def draft_length(self, kinds: Sequence[int], priors: Mapping[int, float]) -> int:
        """How many tokens of a proposal whose tokens have these ``kinds`` to draft (0: a plain step pays better)."""
        # until a draft has been measured, one that might pay at all is tried: else its cost would never be known
        best, best_rate = 0, 1.0 + (self.MARGIN if len(self.costs.seconds) > 1 else 0.0)
        reach, expected = 1.0, 1.0
        for k, kind in enumerate(kinds, 1):
            reach *= self.acceptance(kind, priors[kind])
            expected += reach
            rate = expected / self.costs.relative(k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def observe(self, kind: int, kept: bool) -> None:
        """One token of ``kind`` that was drafted, or would have been, and was or was not the right one."""
        was_kept, seen, at = self.outcomes.get(kind, (0.0, 0.0, self.tokens))
        fade = self.FADE ** (self.tokens - at)
        self.outcomes[kind] = (was_kept * fade + kept, seen * fade + 1, self.tokens)

    def record(self, seconds: float, drafted: int, kept: int) -> None:
        """One evaluation with ``drafted`` tokens besides the new one, ``kept`` of them kept."""
        self.costs.record(1 + drafted, seconds)
        self.tokens += 1 + kept


def speculative_loop(v: Verifier, seq: Seq, drafter: Drafter, max_draft: int, stats: dict[str, Any],
                     pacer: Pacer | None = None, limit: int | None = None) -> Generator[int, None, None]:
    """Greedy decoding of ``seq`` (already holding the prompt) that evaluates [token, *draft] in one batch, with
    drafts as long as :class:`Pacer` finds they pay (none where they do not).  ``limit``: the most tokens the
    caller will take (max_tokens), so that no draft reaches past them."""
    pacer = pacer or Pacer()
    stats.update(rounds=0, drafted=0, accepted=0, skipped=0)
    token = v.argmax(-1)
    taken = 0
    while True:
        yield token
        taken += 1
        drafter.append(token)
        pos = len(seq.tokens)
        if pos >= v.n_ctx:
            return
        started = pacer.clock()  # drafting's cost counts (a draft model's own steps), not only the verification
        most = min(max_draft, v.n_ctx - pos - 1, max_draft if limit is None else limit - taken - 1)
        kinds = [] if most <= 0 or pacer.costs.wants_plain() else drafter.match(most)
        k = pacer.draft_length(kinds, drafter.PRIORS) if kinds else 0
        draft = drafter.propose(k) if k else []
        v.evaluate(seq, [token, *draft], all_logits=bool(draft))
        if not draft:
            token = v.argmax(-1)
            pacer.record(pacer.clock() - started, 0, 0)
            if kinds and not k:  # a draft that was not made: was its first token the right one?
                stats["skipped"] += 1
                guess = drafter.peek()
                if guess is not None:
                    pacer.observe(kinds[0], guess == token)
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
        pacer.record(pacer.clock() - started, len(draft), len(accepted))
        for i in range(min(len(accepted) + 1, len(draft))):  # the tokens after the first rejected one: unchecked
            pacer.observe(kinds[i], i < len(accepted))
        stats["rounds"] += 1
        stats["drafted"] += len(draft)
        stats["accepted"] += len(accepted)
        for d in accepted:
            yield d
            taken += 1
            drafter.append(d)
        token = nxt


def plain_greedy(params: Any) -> bool:
    """Speculation applies to plain greedy decoding only (temperature 0, no grammar or constraint, no penalties),
    where its output is identical; anything else runs the plain path."""
    return params.greedy and not params.grammar and params.constraint is None and params.repeat_penalty == 1.0 \
        and not params.presence_penalty and not params.frequency_penalty
