"""Speculative decoding pays or steps aside (issue 28): the pacer drafts the number of tokens that gives the most
tokens per plain step, from measured costs (read from an injected clock here) and how often such drafts were kept in
this generation; the tests count evaluations and drafted tokens instead of timing the machine."""

from __future__ import annotations

import pytest

from edgelm.runtimes.base import Seq
from edgelm.runtimes.speculative import Costs, Pacer, PromptLookup, speculative_loop


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cpu_like(n: int) -> float:
    return 1.0 + 0.5 * (n - 1)  # a drafted token costs half a plain step, as verifying a few does on a CPU


class Script:
    """A verifier whose greedy text is 0, 1, 2, ... (token i+1 follows token i) and whose evaluation of n tokens
    costs ``cost(n)`` seconds on the fake clock."""

    def __init__(self, clock: FakeClock, cost=cpu_like) -> None:
        self.clock, self.cost = clock, cost
        self.n_ctx = 100_000
        self.rows: list[int] = []
        self.sizes: list[int] = []  # of every evaluation

    def evaluate(self, seq: Seq, tokens, *, all_logits: bool) -> None:
        self.clock.now += self.cost(len(tokens))
        self.sizes.append(len(tokens))
        start = len(seq.tokens)
        seq.tokens.extend(tokens)
        self.rows = [start + i + 1 for i in range(len(tokens))]

    def argmax(self, row: int) -> int:
        return self.rows[row]

    def rewind(self, seq: Seq, n: int) -> bool:
        del seq.tokens[n:]
        return True

    def is_eog(self, token: int) -> bool:
        return False

    def drafted(self, start: int = 0) -> int:
        return sum(s - 1 for s in self.sizes[start:])


class Drafter:
    """Proposes drafts of one kind: the true continuation where ``right(position)``, else tokens never right.
    ``peeks``: like prompt lookup, it tells the first token of a draft it did not make; a draft model does not."""

    def __init__(self, seq: Seq, right, prior: float = 0.8, peeks: bool = True) -> None:
        self.seq, self.right, self.peeks = seq, right, peeks
        self.PRIORS = {0: prior}
        self.pos = 0

    def append(self, token: int) -> None:
        pass

    def match(self, most: int) -> list[int]:
        self.pos = len(self.seq.tokens) + 1  # the position of the first drafted token
        return [0] * most

    def propose(self, k: int) -> list[int]:
        return [p if self.right(p) else -1 for p in range(self.pos, self.pos + k)]

    def peek(self) -> int | None:
        return self.propose(1)[0] if self.peeks else None


def run(right, n=400, cost=cpu_like, prior=0.8, peeks=True, costs=None, limit=None):
    clock = FakeClock()
    script = Script(clock, cost)
    seq = Seq(0, [0])
    script.rows = [1]
    stats: dict = {}
    loop = speculative_loop(script, seq, Drafter(seq, right, prior, peeks), 8, stats, Pacer(clock, costs), limit)
    out = [next(loop) for _ in range(n)]
    return out, stats, script


def always(pos: int) -> bool:
    return True


def never(pos: int) -> bool:
    return False


def test_output_is_the_greedy_text_whether_drafts_are_right_or_wrong():
    for right in (always, never, lambda pos: pos % 3 != 0):
        out, _, _ = run(right)
        assert out == list(range(1, 401))


def test_right_drafts_are_drafted_in_full():
    _, stats, script = run(always, n=2000)
    assert stats["skipped"] == 0 and stats["accepted"] == stats["drafted"] > 2000 * 8 / 9 - 50
    # plain steps only to measure one: the first, then one every Costs.REFRESH rounds
    assert script.sizes.count(1) <= 1 + len(script.sizes) // Costs.REFRESH
    assert script.sizes.count(9) >= 0.9 * len(script.sizes)


def test_wrong_drafts_stop_after_a_few_and_stay_stopped_while_the_guesses_stay_wrong():
    _, stats, script = run(never, n=2000)
    assert stats["accepted"] == 0
    assert stats["rounds"] <= 3, script.sizes[:20]
    assert stats["skipped"] > 1900  # the drafts not made were still checked (peek): they stayed wrong


def test_without_peeking_a_failed_kind_is_retried_as_its_outcomes_fade():
    """A draft model cannot tell what it would have drafted without drafting: the pacer retries once the failures
    have faded (every ~35 tokens), with one drafted token, which costs half a plain step here: ~1.5 % of the time."""
    _, stats, script = run(never, n=2000, peeks=False)
    assert stats["accepted"] == 0
    assert stats["rounds"] >= 10  # it does retry
    assert script.drafted() <= 0.03 * 2000


def test_drafting_that_costs_as_much_as_plain_steps_stops_even_when_right():
    """A backend where a batch of n costs n plain steps: drafts can only break even, so they stop once measured."""
    _, stats, script = run(always, n=500, cost=float)
    assert stats["rounds"] <= 3
    assert script.sizes[-100:] == [1] * 100


def test_cheap_drafting_pays_even_when_drafts_are_mostly_wrong():
    """On a GPU checking 9 tokens costs little more than 1: half-right drafts still pay."""
    _, stats, script = run(lambda pos: pos % 2 == 0, n=500, cost=lambda n: 1.0 + 0.02 * (n - 1))
    assert stats["rounds"] > 200 and stats["skipped"] == 0


def test_a_kind_with_a_low_prior_is_drafted_once_its_guesses_prove_right():
    """A 2-token match is usually wrong (prior 0.3: skipped), but where this generation's guesses keep coming true
    the pacer learns that and drafts them: acceptance is measured per request."""
    _, stats, script = run(always, n=300, prior=0.3)
    assert 0 < stats["skipped"] < 30
    assert stats["accepted"] > 200


def test_text_that_starts_repeating_later_gets_drafts():
    _, stats, script = run(lambda pos: pos > 1000, n=2000)
    later = next(i for i in range(len(script.sizes)) if sum(script.sizes[:i]) >= 1000)
    assert script.drafted() - script.drafted(later) <= 10  # while nothing repeats, hardly a draft
    assert stats["accepted"] > 750  # once it does, drafts nearly all along (of at most 1000 * 8 / 9)


def test_no_draft_reaches_past_the_callers_limit():
    _, _, script = run(always, n=20, limit=20)
    assert sum(script.sizes) == 20 - 1  # evaluated: every token but the last (the caller takes it and stops)


def test_costs_interpolate_between_measured_sizes_and_a_longer_draft_is_never_dearer_per_token():
    c = Costs()
    assert c.wants_plain()
    c.record(1, 2.0)
    assert not c.wants_plain()
    assert c.relative(3) == pytest.approx(1 + 2 * Costs.PRIOR_EXTRA)  # nothing measured: the prior
    c.record(3, 5.0)  # 2.5 plain steps: 0.75 per drafted token
    c.record(9, 10.0)  # 5 plain steps
    assert c.relative(2) == pytest.approx(1.75)
    assert c.relative(6) == pytest.approx(2.5 + 2.5 * 3 / 6)
    assert c.relative(10) == pytest.approx(5 + 0.5)  # beyond 9: its 0.5 per drafted token (below PRIOR_EXTRA)
    c.record(5, 20.0)  # measured while the machine was busy: 10 plain steps
    assert c.relative(5) == pytest.approx(1 + 0.75 * 4)  # no dearer per drafted token than 3 tokens: still tried
    for _ in range(Costs.REFRESH):
        c.record(9, 10.0)
    assert c.wants_plain()  # a plain step is measured again now and then


def test_draft_length_maximises_tokens_per_plain_step():
    c = Costs()
    for n in range(1, 10):
        c.record(n, cpu_like(n))
    pacer = Pacer(costs=c)
    sure, unsure, hopeless = 0, 1, 2
    priors = {sure: 0.99, unsure: 0.7, hopeless: 0.4}
    assert pacer.draft_length([sure] * 8, priors) == 8
    # 0.7: (1 + 0.7 + 0.49 + ...) / (1 + 0.5 k) is best at k = 1 (1.13; k = 2: 1.10, k = 3: 1.01)
    assert pacer.draft_length([unsure] * 8, priors) == 1
    assert pacer.draft_length([hopeless] * 8, priors) == 0
    assert pacer.draft_length([sure, hopeless, hopeless], priors) == 1  # each token's own chance counts


def test_outcomes_move_the_chance_from_the_prior_and_fade():
    pacer = Pacer()
    assert pacer.acceptance(0, 0.8) == pytest.approx(0.8)
    for _ in range(8):
        pacer.observe(0, False)
    low = pacer.acceptance(0, 0.8)
    assert low == pytest.approx(0.8 * 4 / 12)
    pacer.record(1.0, 0, 0)
    pacer.tokens += 200  # 200 tokens later the failures weigh 0.99**200 of what they did
    assert low < pacer.acceptance(0, 0.8) < 0.8


def test_prompt_lookup_kinds_are_match_lengths():
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    d = PromptLookup(text + [99, 5, 6])  # ... 5 6 recurs: a 2-token match, followed by 7 8 9 ...
    assert d.match(3) == [2, 3, 4] and d.propose(3) == [7, 8, 9] and d.peek() == 7
    d = PromptLookup(text + [99, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # a 9-token match: LONG and beyond
    assert d.match(5) == [PromptLookup.LONG] * 5 and d.propose(5) == [11, 99, 2, 3, 4]
    assert len(d.match(100)) == 11  # all that follows the match, and no more
    d = PromptLookup(text + [99, 42])
    assert d.match(4) == [] and d.propose(4) == [] and d.peek() is None
