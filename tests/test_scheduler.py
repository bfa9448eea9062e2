"""The scheduler's choices, on a recording stand-in for llama.cpp's batch decoder (fast: no model).

What the real decoder does with those choices (tokens, speed) is tested in test_batching.py and measured in
benchmarks/bench_batching.py."""

from __future__ import annotations

import threading
import time

from edgelm.runtimes.base import Seq
from edgelm.runtimes import scheduler
from edgelm.runtimes.scheduler import NO_TOKEN, REUSE_MIN, Scheduler


class _Sampler:
    def close(self) -> None:
        pass


class RecordingDecoder:
    """Holds N sequences; every decode_batch is recorded; each step takes a millisecond; tokens never end."""

    n_ctx = 4096
    n_batch = 512

    def __init__(self, n: int) -> None:
        self.sequences = [Seq(i) for i in range(n)]
        self.batches: list[list[int]] = []  # the sequence ids of each batch, in the order given
        self.go = threading.Event()
        self.go.set()

    def decode_batch(self, parts):
        self.go.wait()
        time.sleep(0.001)
        self.batches.append([seq.id for seq, _, _ in parts])
        rows, j = [], 0
        for seq, tokens, want in parts:
            seq.tokens.extend(tokens)
            j += len(tokens)
            rows.append(j - 1 if want else -1)
        return rows

    def sampler(self, params, history):
        return _Sampler()

    def sample_row(self, sampler, row):
        return 7

    def rewind(self, seq, n):
        del seq.tokens[n:]
        return True

    def is_eog(self, token):
        return False


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_new_request_keeps_the_active_sequences_consecutive():
    """llama.cpp evaluates a batch one run of consecutive sequence ids at a time: with 0 running and 1, 2, 3 free,
    a newcomer takes 1 (one pass per step), not 3, though 3 went unused longest."""
    dec = RecordingDecoder(4)
    s = Scheduler(dec)
    try:
        reqs = [s.submit([100 + i], None, 10_000) for i in range(4)]
        wait_for(lambda: all(r.slot is not None for r in reqs))
        by_slot = {r.slot.id: r for r in reqs}
        for sid in (3, 2, 1):  # 3 frees first: the least recently used
            by_slot[sid].cancel()
            time.sleep(0.01)
        wait_for(lambda: len(s._free) == 3)
        new = s.submit([200], None, 10_000)
        wait_for(lambda: new.slot is not None)
        assert new.slot.id == 1
    finally:
        s.close()


def admit_together(s, dec, prompts, limit):
    """Submit ``prompts`` while the decoder is held, so one step admits them all, in order; run them to the end."""
    dec.go.clear()
    time.sleep(0.01)
    reqs = [s.submit(p, None, limit) for p in prompts]
    dec.go.set()
    for r in reqs:
        for _ in r:
            pass
    return reqs


def test_a_long_cached_prefix_still_wins_over_consecutive_ids():
    """Chat prefix reuse first: a conversation coming back takes its slot even where that leaves a gap."""
    dec = RecordingDecoder(4)
    s = Scheduler(dec)
    try:
        running = s.submit([1], None, 10_000)
        wait_for(lambda: running.slot is not None)
        history = list(range(1000, 1000 + REUSE_MIN + 8))
        done = admit_together(s, dec, [[10], [11], history], 3)
        home = done[2].slot.id
        assert sorted([running.slot.id] + [r.slot.id for r in done]) == [0, 1, 2, 3] and home == 3
        back = s.submit(history + [5, 6], None, 10_000)
        wait_for(lambda: back.slot is not None)
        assert back.slot.id == home and back.reused == len(history)
    finally:
        s.close()


def test_a_short_shared_prefix_does_not_outweigh_a_pass_per_step():
    """A few shared tokens are read again rather than leave a gap among the active sequence ids."""
    dec = RecordingDecoder(4)
    s = Scheduler(dec)
    try:
        running = s.submit([1], None, 10_000)
        wait_for(lambda: running.slot is not None)
        done = admit_together(s, dec, [[20], [21], [9, 8, 7]], 2)
        assert [r.slot.id for r in done] == [1, 2, 3] and running.slot.id == 0
        new = s.submit([9, 8, 7, 6], None, 10_000)  # shares 3 tokens with slot 3, fewer than REUSE_MIN
        wait_for(lambda: new.slot is not None)
        assert new.slot.id == 1 and new.reused == 0
    finally:
        s.close()


def test_a_short_shared_prefix_is_reused_where_no_gap_is_at_stake():
    """The same short prompt again, nothing running: it goes back to the slot that holds it (not the least recently
    used one, which would read the prompt again)."""
    dec = RecordingDecoder(4)
    s = Scheduler(dec)
    try:
        prompt = [9, 8, 7, 6, 5]
        first = admit_together(s, dec, [prompt], 2)[0]
        again = admit_together(s, dec, [prompt], 2)[0]
        assert again.slot.id == first.slot.id and again.reused == len(prompt) - 1
    finally:
        s.close()


def test_a_prompt_joining_running_streams_is_read_first_in_its_own_batch():
    """Next tokens and a longer prompt chunk never share a pass in llama.cpp: the prompt goes first, alone, so the
    newcomer's first token comes a pass sooner; a one-token prompt rides along with the running streams."""
    dec = RecordingDecoder(4)
    s = Scheduler(dec)
    try:
        def read(r):  # a consumer that keeps up (the scheduler skips a sequence whose reader lags)
            threading.Thread(target=lambda: [None for _ in r], daemon=True).start()
            return r

        running = read(s.submit([1], None, 10_000))
        wait_for(lambda: running.generated > 3)
        joiner = read(s.submit([5, 6, 7, 8, 9], None, 10_000))
        wait_for(lambda: joiner.generated > 1)
        short = read(s.submit([3], None, 10_000))
        wait_for(lambda: short.generated > 1)
        batches = list(dec.batches)
        j = next(i for i, b in enumerate(batches) if joiner.slot.id in b)
        assert batches[j] == [joiner.slot.id] and batches[j + 1] == [running.slot.id]
        k = next(i for i, b in enumerate(batches) if short.slot.id in b)
        assert sorted(batches[k]) == sorted([running.slot.id, joiner.slot.id, short.slot.id])
        for r in (running, joiner, short):
            r.cancel()
    finally:
        s.close()


def test_a_watched_request_never_blocks_and_says_when_a_token_or_the_end_came():
    """What the server's event loop relies on: next() gives NO_TOKEN at once while nothing is ready, notify() is
    called after every token and after the end, and the tokens and the end come as they would in a thread."""
    dec = RecordingDecoder(2)
    dec.go.clear()  # hold the first step
    s = Scheduler(dec)
    try:
        r = s.submit([1, 2], None, 3)
        calls = []
        r.watch(lambda: calls.append(r.generated))
        assert next(r) == NO_TOKEN and calls == []
        dec.go.set()
        wait_for(lambda: len(calls) >= 4)  # three tokens, then the end
        assert calls[:3] == [1, 2, 3]
        tokens = []
        while True:
            try:
                token = next(r)
            except StopIteration:
                break
            assert token != NO_TOKEN  # everything was queued before this loop
            tokens.append(token)
        assert tokens == [7, 7, 7]
    finally:
        s.close()


def test_watching_after_a_token_came_notifies_at_once():
    dec = RecordingDecoder(1)
    s = Scheduler(dec)
    try:
        r = s.submit([1], None, 1)
        wait_for(lambda: r.generated == 1)
        calls = []
        r.watch(lambda: calls.append(1))
        assert calls and next(r) == 7
    finally:
        s.close()


def test_the_step_after_a_first_token_waits_for_its_consumer_to_pass_it_on(monkeypatch):
    """The next decode would take the CPUs the consumer needs to pass the first token on (a server: to its socket),
    so it waits until the consumer comes back for more."""
    monkeypatch.setattr(scheduler, "HANDOVER_SECONDS", 60.0)  # longer than this test: only the consumer ends it
    dec = RecordingDecoder(1)
    s = Scheduler(dec)
    try:
        r = s.submit([1, 2], None, 5)
        assert next(r) == 7  # the first token
        steps = len(dec.batches)
        time.sleep(0.05)
        assert len(dec.batches) == steps  # held while the consumer has not come back
        assert next(r) == 7  # back for more: the steps go on
        wait_for(lambda: r.generated == 5)
    finally:
        s.close()


def test_a_consumer_that_does_not_come_back_holds_the_steps_only_briefly(monkeypatch):
    monkeypatch.setattr(scheduler, "HANDOVER_SECONDS", 0.01)
    dec = RecordingDecoder(1)
    s = Scheduler(dec)
    try:
        r = s.submit([1, 2], None, 100)
        assert next(r) == 7
        wait_for(lambda: r.generated == scheduler.LOOKAHEAD + 1)  # then it waits for the reader, as any stream
    finally:
        s.close()
