"""Speculative decoding steps aside where it does not pay (issue 28): the pacer judges from this generation's own
seconds per token, read from an injected clock here, so the tests count steps instead of timing the machine."""

from __future__ import annotations

from edgelm.runtimes.base import Seq
from edgelm.runtimes.speculative import Pacer, speculative_loop


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Script:
    """A verifier whose greedy text is ``text`` (token i+1 follows token i) and whose evaluation of n tokens costs
    ``cost(n)`` seconds on the fake clock: a batched step is cheap per token, as on a CPU."""

    def __init__(self, text: list[int], clock: FakeClock, cost=lambda n: 1.0 + 0.5 * (n - 1)) -> None:
        self.text, self.clock, self.cost = text, clock, cost
        self.n_ctx = 10_000
        self.rows: list[int] = []
        self.sizes: list[int] = []

    def evaluate(self, seq: Seq, tokens, *, all_logits: bool) -> None:
        self.clock.now += self.cost(len(tokens))
        self.sizes.append(len(tokens))
        start = len(seq.tokens)
        seq.tokens.extend(tokens)
        self.rows = [self.text[min(start + i + 1, len(self.text) - 1)] for i in range(len(tokens))]

    def argmax(self, row: int) -> int:
        return self.rows[row]

    def rewind(self, seq: Seq, n: int) -> bool:
        del seq.tokens[n:]
        return True

    def is_eog(self, token: int) -> bool:
        return False


class Drafter:
    """Proposes the true continuation (``right``) or tokens that are never right."""

    def __init__(self, script: Script, seq: Seq, right: bool) -> None:
        self.script, self.seq, self.right = script, seq, right

    def append(self, token: int) -> None:
        pass

    def propose(self, k: int) -> list[int]:
        pos = len(self.seq.tokens) + 1
        return self.script.text[pos:pos + k] if self.right else [-1] * k


def run(right: bool, n: int = 400, cost=None):
    clock = FakeClock()
    script = Script(list(range(10_000)), clock, **({"cost": cost} if cost else {}))
    seq = Seq(0)
    seq.tokens.extend([0])
    script.rows = [1]
    stats: dict = {}
    loop = speculative_loop(script, seq, Drafter(script, seq, right), 8, stats, Pacer(clock))
    out = [next(loop) for _ in range(n)]
    return out, stats, script


def test_output_is_the_greedy_text_whether_drafts_are_right_or_wrong():
    for right in (True, False):
        out, _, _ = run(right)
        assert out == list(range(1, 401))


def test_wrong_drafts_are_paused_and_retried_less_and_less_often():
    _, stats, script = run(right=False, n=2000)
    rounds_with_drafts = sum(1 for s in script.sizes if s > 1)
    assert stats["paused"] >= 3
    # after the first judgement each retry costs MIN_ROUNDS rounds and the pauses double: a few dozen rounds at most
    assert rounds_with_drafts <= 60, rounds_with_drafts
    assert stats["accepted"] == 0


def test_right_drafts_are_never_paused():
    _, stats, script = run(right=True, n=2000)
    assert stats["paused"] == 0
    assert stats["accepted"] > 1500
    assert sum(1 for s in script.sizes if s == 1) <= 2  # the one plain step measured to compare with


def test_drafting_that_costs_as_much_as_plain_steps_is_paused():
    """A backend where a batch of n costs n plain steps: even right drafts only break even, never pay."""
    _, stats, _ = run(right=False, n=500, cost=lambda n: float(n))
    assert stats["paused"] >= 1


def test_pause_resets_to_short_once_drafting_pays_again():
    pacer = Pacer(FakeClock())
    pacer.record(1.0, 0, 1)  # a plain step: 1 s
    for _ in range(Pacer.MIN_ROUNDS):
        pacer.record(4.0, 3, 1)  # 4 s per token with drafts: slower
    assert pacer.paused == 1 and pacer.pause == Pacer.FIRST_PAUSE
    while not pacer.wants_drafts():
        pass
    for _ in range(Pacer.MIN_ROUNDS):
        pacer.record(2.0, 3, 4)  # 0.5 s per token: faster
    assert pacer.paused == 1 and pacer.next_pause == Pacer.FIRST_PAUSE
