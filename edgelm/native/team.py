"""Where llama.cpp's compute threads run: a decode after an idle pause starts with its threads on distinct CPUs.

llama.cpp (OPENMP = 1 in llama-cpp-python's build) computes a forward pass with a team: the thread that calls
llama_decode (the master) and OpenMP workers that libgomp keeps per master thread, asleep between decodes.  When a
decode starts, the kernel wakes each worker on a CPU of its choosing, and after an idle pause it often chooses the
CPU the master is running on (measured on a 2-CPU VM, kernel 6.18: in half the server requests after a 0.2 s pause
the master and the worker then took turns on one CPU for ~10 ms, until the load balancer moved one; the decode of
one token took 16-20 ms instead of 8).  Moving the master away is not enough: in a VM the kernel counts a halted
vCPU as busy and woke the worker next to its waker even when its previous CPU was idle.  So before a decode that
follows an idle pause, :meth:`Team.spread` pins each worker to a CPU of its own, other than the master's (its last
CPU when that is free), for that decode only: the workers' masks are restored after it, and the master is never
pinned.

A master's workers are learned on its first decode under :func:`decoding`: the threads of this process that are not
Python threads and ran during that decode (their run time in /proc/self/task/*/schedstat grew).  Everything here is
Linux (/proc, sched_setaffinity); elsewhere, or where /proc cannot be read, nothing is done.  The operating system is
reached through :class:`System`, so tests can pretend to be any placement.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from typing import Callable, Protocol

IDLE_SECONDS = 0.01  # a pause after which libgomp's workers have gone to sleep (they spin ~10,000 rounds: edgelm
# sets GOMP_SPINCOUNT, native/llamacpp.py), so their placement is the kernel's choice again at the next decode


class System(Protocol):
    """What :class:`Team` asks the operating system."""

    def tasks(self) -> list[int]:
        """Thread ids of this process."""

    def python_threads(self) -> set[int]:
        """Native ids of the threads Python knows."""

    def run_ns(self, tid: int) -> int:
        """Nanoseconds ``tid`` has run; raises OSError when the thread is gone."""

    def last_cpu(self, tid: int) -> int:
        """The CPU ``tid`` runs on or last ran on; raises OSError when the thread is gone."""

    def current_cpu(self) -> int:
        """The CPU the calling thread runs on."""

    def affinity(self, tid: int) -> set[int]:
        """CPUs ``tid`` may run on (0: the calling thread)."""

    def set_affinity(self, tid: int, cpus: set[int]) -> None:
        """Let ``tid`` run only on ``cpus`` (0: the calling thread, which moves at once)."""


class LinuxSystem:
    """/proc/self/task, sched_getcpu and sched_setaffinity."""

    def __init__(self) -> None:
        self._getcpu: Callable[[], int] | None = None
        try:  # glibc and musl both export it; a vDSO call, far cheaper than reading /proc/thread-self/stat
            self._getcpu = ctypes.CDLL(None).sched_getcpu
        except (OSError, AttributeError):
            pass

    def tasks(self) -> list[int]:
        return [int(t) for t in os.listdir("/proc/self/task")]

    def python_threads(self) -> set[int]:
        return {t.native_id for t in threading.enumerate() if t.native_id is not None}

    def run_ns(self, tid: int) -> int:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            return int(f.read().split()[0])

    def last_cpu(self, tid: int) -> int:
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[36])  # field 39, "processor"; the name may hold spaces

    def current_cpu(self) -> int:
        if self._getcpu is not None:
            return int(self._getcpu())
        return self.last_cpu(threading.get_native_id())

    def affinity(self, tid: int) -> set[int]:
        return set(os.sched_getaffinity(tid))

    def set_affinity(self, tid: int, cpus: set[int]) -> None:
        os.sched_setaffinity(tid, cpus)


def default_system() -> System | None:
    """The running system where placement works (Linux with a readable /proc/self/task), else None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        system = LinuxSystem()
        system.run_ns(system.tasks()[0])
        system.last_cpu(threading.get_native_id())
        return system
    except (OSError, ValueError, IndexError):
        return None


class Team:
    """The calling thread's OpenMP team (libgomp keeps one per master thread): ``with team:`` around a decode."""

    def __init__(self, system: System, clock: Callable[[], float] = time.perf_counter) -> None:
        self.system = system
        self.clock = clock
        self.workers: list[int] | None = None  # None: not learned yet
        self.last_end = float("-inf")  # when this thread's last decode ended
        self.moves = 0  # workers placed away from their last CPU so far (tests read it)
        self._pinned: list[tuple[int, set[int]]] = []
        self._before: dict[int, int] | None = None

    # --- learning the workers ---

    def _run_times(self) -> dict[int, int]:
        python = self.system.python_threads()
        times = {}
        for tid in self.system.tasks():
            if tid in python:
                continue
            with contextlib.suppress(OSError, ValueError):
                times[tid] = self.system.run_ns(tid)
        return times

    def _learn(self, before: dict[int, int]) -> None:
        after = self._run_times()
        self.workers = sorted(t for t, ns in after.items() if ns > before.get(t, 0))

    # --- placing them ---

    def spread(self) -> list[tuple[int, set[int]]]:
        """Pin each worker to a CPU of its own, not this thread's, for the coming decode: its last CPU when that is
        free, else a free one.  Returns the workers and their masks, for :meth:`release` after the decode; nothing
        when the team has more threads than CPUs to give them."""
        if not self.workers:
            return []
        system = self.system
        try:
            here = system.current_cpu()
            last = {tid: system.last_cpu(tid) for tid in self.workers}
            masks = {tid: system.affinity(tid) for tid in self.workers}
        except (OSError, ValueError):  # a worker is gone (libgomp made a new pool): learn the team again
            self.workers = None
            return []
        taken = {here}
        choice: dict[int, int] = {}
        for tid, cpu in last.items():  # a worker where it was, if no other team member is there
            if cpu not in taken and cpu in masks[tid]:
                choice[tid] = cpu
                taken.add(cpu)
        for tid in last:  # the others on free CPUs
            if tid not in choice:
                free = sorted(masks[tid] - taken)
                if not free:
                    return []
                choice[tid] = free[0]
                taken.add(free[0])
        pinned: list[tuple[int, set[int]]] = []
        try:
            for tid, cpu in choice.items():
                system.set_affinity(tid, {cpu})
                pinned.append((tid, masks[tid]))
                self.moves += cpu != last[tid]
        except OSError:  # gone meanwhile: free the others and learn the team again
            self.release(pinned)
            self.workers = None
            return []
        return pinned

    def release(self, pinned: list[tuple[int, set[int]]]) -> None:
        """Give the workers :meth:`spread` pinned their own masks again."""
        for tid, mask in pinned:
            with contextlib.suppress(OSError):
                self.system.set_affinity(tid, mask)

    # around a decode (``with team:``): learns the workers on the thread's first one, spreads the team after an
    # idle pause (two syscalls per worker, and one /proc read); a class, not a generator, since it wraps every
    # prompt and scheduler step (~0.3 us when there is nothing to do)

    def __enter__(self) -> "Team":
        self._pinned = self.spread() if self.clock() - self.last_end > IDLE_SECONDS else []
        self._before = self._run_times() if self.workers is None else None  # (spread() forgets a team whose
        return self  # thread is gone)

    def __exit__(self, *exc: object) -> None:
        if self._pinned:
            self.release(self._pinned)
        if self._before is not None:
            with contextlib.suppress(OSError, ValueError):
                self._learn(self._before)
        self.last_end = self.clock()


_local = threading.local()
_system: System | None | bool = False  # False: not looked up yet


def team() -> Team | None:
    """The calling thread's team (None where placement is not available)."""
    global _system
    found = getattr(_local, "team", None)
    if found is not None:
        return found
    if _system is False:
        _system = default_system()
    if _system is None:
        return None
    _local.team = Team(_system)  # type: ignore[arg-type]
    return _local.team


_NOTHING = contextlib.nullcontext()


def decoding() -> "Team | contextlib.nullcontext[None]":
    """``with decoding():`` around a llama_decode that may follow an idle pause (a prompt, a scheduler step): the
    calling thread's :class:`Team`, or nothing where placement is not available."""
    return team() or _NOTHING
