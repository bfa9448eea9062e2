"""Placing llama.cpp's compute threads (edgelm.native.team): decisions on a pretend system, then the real thing."""

from __future__ import annotations

import os
import threading

import pytest

from edgelm.native import team as team_mod
from edgelm.native.team import IDLE_SECONDS, Team


class FakeSystem:
    """Threads with a CPU each and a run time; records every affinity change."""

    def __init__(self, cpus: int, here: int, workers: dict[int, int], python: set[int] = frozenset({1})) -> None:
        self.cpus = set(range(cpus))
        self.here = here
        self.cpu_of = dict(workers)
        self.ran = {tid: 0 for tid in workers}
        self.python = set(python)
        self.masks: dict[int, set[int]] = {}
        self.calls: list[tuple[int, set[int]]] = []
        self.gone: set[int] = set()

    def tasks(self) -> list[int]:
        return sorted(self.python | set(self.cpu_of))

    def python_threads(self) -> set[int]:
        return set(self.python)

    def run_ns(self, tid: int) -> int:
        if tid in self.gone:
            raise OSError(tid)
        return self.ran[tid]

    def last_cpu(self, tid: int) -> int:
        if tid in self.gone:
            raise OSError(tid)
        return self.cpu_of[tid]

    def current_cpu(self) -> int:
        return self.here

    def affinity(self, tid: int) -> set[int]:
        return set(self.masks.get(tid, self.cpus))

    def set_affinity(self, tid: int, cpus: set[int]) -> None:
        self.calls.append((tid, set(cpus)))
        self.masks[tid] = set(cpus)
        if tid == 0 and self.here not in cpus:
            self.here = min(cpus)  # the calling thread moves at once


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def learned(system: FakeSystem, clock: Clock, running: set[int]) -> Team:
    """A team whose first decode ran the threads ``running``."""
    t = Team(system, clock)
    with t:
        for tid in running:
            system.ran[tid] += 1000
    return t


def decode_after(t: Team, system: FakeSystem, clock: Clock, pause: float) -> None:
    """One decode after ``pause`` seconds, with the affinity changes recorded from a clean slate."""
    system.calls.clear()
    clock.now += pause
    with t:
        pass


def test_learns_the_threads_that_ran_during_the_first_decode_and_not_python_threads():
    system = FakeSystem(cpus=4, here=0, workers={11: 1, 12: 2, 13: 3}, python={1, 2})
    t = learned(system, Clock(), running={11, 12})  # 13 is some other native thread that stayed asleep
    assert t.workers == [11, 12]


def test_a_worker_last_on_the_masters_cpu_is_pinned_to_a_free_one_for_that_decode_only():
    system = FakeSystem(cpus=2, here=1, workers={11: 0})
    clock = Clock()
    t = learned(system, clock, running={11})
    system.cpu_of[11] = 1  # the worker last ran where the master is now
    clock.now += 0.2  # an idle pause
    system.calls.clear()
    with t:
        assert system.calls == [(11, {0})]
    assert system.calls[-1] == (11, {0, 1})  # its whole mask again after the decode
    assert all(tid != 0 for tid, _ in system.calls)  # the master is never pinned
    assert t.moves == 1


def test_after_a_pause_a_worker_on_its_own_cpu_is_held_there_for_the_decode_and_after_a_short_one_nothing():
    """In a VM the kernel woke a worker next to its waker although its own CPU was idle (a halted vCPU counts as
    busy): so a worker where it should be is pinned there too, for that decode."""
    system = FakeSystem(cpus=2, here=0, workers={11: 1})
    clock = Clock()
    t = learned(system, clock, running={11})
    decode_after(t, system, clock, 0.2)
    assert system.calls == [(11, {1}), (11, {0, 1})] and t.moves == 0
    system.cpu_of[11] = 0  # shares the master's CPU, but the team decoded a moment ago: its threads are awake
    decode_after(t, system, clock, IDLE_SECONDS / 2)
    assert system.calls == []


def test_more_threads_than_cpus_are_left_to_the_kernel():
    system = FakeSystem(cpus=2, here=0, workers={11: 1, 12: 1})
    clock = Clock()
    t = learned(system, clock, running={11, 12})
    decode_after(t, system, clock, 1)
    assert system.calls == []


def test_two_workers_on_one_cpu_one_keeps_it_the_other_gets_a_free_one():
    system = FakeSystem(cpus=4, here=0, workers={11: 2, 12: 2})
    clock = Clock()
    t = learned(system, clock, running={11, 12})
    system.calls.clear()
    clock.now += 1
    with t:
        assert system.calls == [(11, {2}), (12, {1})]
    assert system.calls[2:] == [(11, {0, 1, 2, 3}), (12, {0, 1, 2, 3})]
    assert t.moves == 1


def test_a_worker_gone_makes_the_team_learn_again():
    system = FakeSystem(cpus=2, here=0, workers={11: 0})
    clock = Clock()
    t = learned(system, clock, running={11})
    system.gone.add(11)
    system.cpu_of[21], system.ran[21] = 1, 0  # libgomp made a new pool
    clock.now += 1
    with t:
        system.ran[21] += 500
    assert t.workers == [21]


@pytest.mark.skipif(team_mod.default_system() is None or len(os.sched_getaffinity(0)) < 2,
                    reason="thread placement needs Linux with /proc and at least 2 CPUs")
def test_real_llama_cpp_team_is_learned_and_a_crowded_master_moves(tmp_path):
    """The real llama.cpp OpenMP team on this machine: its worker is found by its first decode; with the master and
    the worker forced onto one CPU, the next decode after a pause runs the worker on another CPU."""
    import edgelm

    results: dict[str, object] = {}

    def run() -> None:  # a fresh thread: a master of its own (libgomp keeps one pool per master thread)
        model = edgelm.load(edgelm.default_model_path(), threads=2, n_ctx=256)
        system = team_mod.default_system()
        try:
            model.generate("Hello", max_tokens=2, temperature=0)
            t = team_mod.team()
            results["workers"] = list(t.workers or [])
            cpu = system.current_cpu()
            everything = system.affinity(0)
            for tid in t.workers or []:  # crowd the worker onto the master's CPU, then let it free again
                system.set_affinity(tid, {cpu})
            model.generate("Hello", max_tokens=2, temperature=0)
            for tid in t.workers or []:
                system.set_affinity(tid, everything)
            system.set_affinity(0, {cpu})
            system.set_affinity(0, everything)
            t.last_end = float("-inf")  # as after an idle pause
            before = t.moves
            model.generate("Hello", max_tokens=2, temperature=0)
            results["moved"] = t.moves - before
            results["masks after"] = [system.affinity(tid) == everything for tid in t.workers or []]
        finally:
            model.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert len(results["workers"]) >= 1  # threads=2: the master and (at least) its one worker
    assert results["moved"] == 1
    assert all(results["masks after"])  # nothing stays pinned
