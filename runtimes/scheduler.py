"""Running generations: one at a time in arrival order (:class:`Direct`), or many at once, batched (:class:`Scheduler`).

Both hand out :class:`TokenSource` objects: an iterator of token ids that :class:`edgelm.Model` turns into text,
which its consumer may close (done) and anyone may :meth:`~TokenSource.cancel` from another thread (a stop button,
a client that went away).  A scheduler's source can also be read without a thread of its own (:meth:`TokenSource.watch`:
an event loop is told when a token comes and reads it without blocking; the server does this).

The scheduler (continuous batching) runs one thread over a backend that holds N sequences and can decode a batch
mixing them (:class:`BatchDecoder`, the llama.cpp backend).  Every step decodes the next token of each generating
sequence and a chunk of any prompt still being read (chunked prefill: a long prompt does not freeze the running
streams), in one batch, or in two with the prompt first where llama.cpp would split them anyway; then it samples
each sequence that got logits with its own sampler.  Requests beyond N wait first-come first-served; a new one takes
the free sequence whose cached tokens share the longest prefix with its prompt (chat prefix reuse survives
concurrency), or else the one that keeps the active sequence ids consecutive (one pass over the weights per step); a
finished or cancelled one frees its sequence at once.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Protocol, Sequence

from edgelm.errors import BackendError, ModelClosedError

from .base import Seq, reusable_prefix

_DONE = object()
NO_TOKEN = -1  # what a watched source's next() gives while no token is ready (token ids are >= 0)
LOOKAHEAD = 8  # tokens a sequence may generate ahead of its consumer before it skips steps
# prompt tokens read per step while other sequences are generating: a long prompt is read in chunks this size, so
# the running streams get a token between chunks instead of freezing for the whole prompt
PREFILL_CHUNK = 128
# a cached prefix shorter than this (a BOS token, a short system line) is read again rather than chosen over a slot
# that keeps the active sequences consecutive: reading it costs a few steps' time once, a second run of sequence ids
# a pass over the weights every step for as long as the gap lasts
REUSE_MIN = 32
# after a step that gave a request its first token, the next step waits up to this long for that request's consumer
# to come back for more (it has then passed the token on: a server, to its socket).  With the next decode started at
# once, both CPUs of a small machine were busy and the consumer waited 1-4 ms for one in about a fifth of the
# requests; the wait costs the running streams the consumer's time once per request (~0.5 ms here)
HANDOVER_SECONDS = 0.003


class FifoLock:
    """A lock granted in arrival order; a waiter can be cancelled from another thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._line: collections.deque[object] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def busy(self) -> bool:
        return self._busy

    def acquire(self, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Wait for the lock; False (without it) when ``cancelled()`` turns true while waiting."""
        me = object()
        with self._cond:
            self._line.append(me)
            while self._busy or self._line[0] is not me:
                if cancelled():
                    self._line.remove(me)
                    self._cond.notify_all()
                    return False
                self._cond.wait(0.05)
            self._line.popleft()
            self._busy = True
            return True

    def try_acquire(self) -> bool:
        with self._cond:
            if self._busy or self._line:
                return False
            self._busy = True
            return True

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class TokenSource:
    """Token ids of one generation.  ``reused`` (prompt tokens taken from the cache) is known once the first token
    arrived.  ``close()`` is for the consumer; ``cancel()`` may be called from any thread: the iterator then ends."""

    reused: int = 0
    pushes: bool = False  # True: watch() works (the tokens come from another thread)

    def watch(self, notify: Callable[[], None]) -> None:
        """Read without blocking from now on: next() gives NO_TOKEN while no token is ready, and ``notify()`` is
        called (from the producing thread) after each token, the end or an error is queued.  Only where
        :attr:`pushes`; a source whose tokens are computed in next() itself (:class:`Direct`'s) cannot."""
        raise NotImplementedError(f"{type(self).__name__} computes its tokens in next(); read it in a thread.")

    def __iter__(self) -> "TokenSource":
        return self

    def __next__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def cancel(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# --- one at a time ----------------------------------------------------------------------------------------------

class _DirectSource(TokenSource):
    def __init__(self, engine: "Direct", tokens: list[int], params: Any) -> None:
        self.engine, self.tokens, self.params = engine, tokens, params
        self._cancelled = threading.Event()
        self._source: Generator[int, None, None] | None = None
        self._holding = False
        self._finished = False

    def __next__(self) -> int:
        if self._finished:
            raise StopIteration
        if self._source is None:
            engine = self.engine
            if not engine.lock.acquire(self._cancelled.is_set):
                self._finished = True
                raise StopIteration
            self._holding = True
            try:
                if engine.closed:
                    raise ModelClosedError("The model was closed.", fix="Load it again with edgelm.load().")
                self._source = engine.backend.generate(engine.seq, self.tokens, self.params)
                self.reused = engine.seq.reused
            except BaseException:
                self.close()
                raise
        if self._cancelled.is_set():
            self.close()
            raise StopIteration
        try:
            return next(self._source)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._finished = True
        if self._source is not None:
            source, self._source = self._source, None
            source.close()
        if self._holding:
            self._holding = False
            self.engine.lock.release()

    def cancel(self) -> None:
        self._cancelled.set()
        self.engine.lock.wake()


class Direct:
    """Generations one at a time on one sequence of ``backend``, granted in arrival order (onnxruntime, and
    llama.cpp with parallel=1: the fastest path for a single stream)."""

    pushes = False  # its sources compute their tokens in next(): they cannot be watched

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.seq = backend.sequences[0]
        self.lock = FifoLock()
        self.closed = False
        self.sources: "weakref.WeakSet[_DirectSource]" = weakref.WeakSet()

    def submit(self, tokens: Sequence[int], params: Any, limit: int) -> TokenSource:
        if self.closed:
            raise ModelClosedError("The model is closed.", fix="Load it again with edgelm.load().")
        source = _DirectSource(self, list(tokens), params)
        self.sources.add(source)
        return source

    def exclusive(self) -> "_Exclusive":
        return _Exclusive(self.lock, self.seq)

    def reset(self) -> None:
        with self.exclusive():
            self.backend.reset_cache()

    def snapshot(self) -> dict[str, Any]:
        return {"active": int(self.lock.busy), "waiting": self.lock.waiting, "slots": 1}

    def close(self, error: BaseException | None = None) -> None:
        """Refuse new generations, cancel the running and waiting ones, and wait until the running one let go."""
        self.closed = True
        for source in list(self.sources):
            source.cancel()
        self.lock.acquire()
        self.lock.release()


@dataclass
class _Exclusive:
    lock: FifoLock
    seq: Seq

    def __enter__(self) -> Seq:
        self.lock.acquire()
        return self.seq

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


# --- many at once, batched -------------------------------------------------------------------------------------

class BatchDecoder(Protocol):
    """What the scheduler needs from a backend (the llama.cpp backend implements it)."""

    n_ctx: int
    n_batch: int
    sequences: list[Seq]

    def decode_batch(self, parts: Sequence[tuple[Seq, Sequence[int], bool]]) -> list[int]:
        """Evaluate every (seq, tokens, want_logits) part in one batch; return for each part the batch row of
        its last token's logits (-1 when not wanted).  Raises BackendError (the parts' sequences are then
        rewound to what they held before)."""

    def sampler(self, params: Any, history: Sequence[int]) -> Any: ...

    def sample_row(self, sampler: Any, row: int) -> int: ...

    def rewind(self, seq: Seq, n: int) -> bool: ...

    def is_eog(self, token: int) -> bool: ...


class Request(TokenSource):
    """One generation in the scheduler: its prompt, sampler and limit; the tokens come through a queue."""

    pushes = True

    def __init__(self, scheduler: "Scheduler", tokens: list[int], sampler: Any, limit: int) -> None:
        self.scheduler = scheduler
        self.prompt = tokens
        self.sampler = sampler
        self.limit = limit
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.slot: Seq | None = None
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.last: int | None = None  # the last sampled token, not yet in the cache
        self.generated = 0
        self.taken = 0
        self.arrived = time.perf_counter()
        self._ended = False
        self.notify: Callable[[], None] | None = None
        self.back = threading.Event()  # the consumer came back for more after its first token (HANDOVER_SECONDS)

    def watch(self, notify: Callable[[], None]) -> None:
        self.notify = notify
        if not self.queue.empty():
            notify()

    def put(self, item: Any) -> None:
        """Queue a token, the end (_DONE) or an error for the consumer (any thread)."""
        self.queue.put(item)
        if self.notify is not None:
            self.notify()

    def __next__(self) -> int:
        if self._ended:
            raise StopIteration
        if self.taken == 1:
            self.back.set()
        if self.notify is not None:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return NO_TOKEN
        else:
            item = self.queue.get()
        if item is _DONE:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self.taken += 1
        if self.generated - self.taken == LOOKAHEAD - 1:
            self.scheduler.wake()  # it may have been waiting for this consumer
        return item

    def close(self) -> None:
        if not self._ended:
            self.cancel()
        self._ended = True

    def cancel(self) -> None:
        self.cancelled = True
        self.back.set()  # nobody to hand a first token to any more
        self.put(_DONE)  # a consumer blocked in next() wakes up at once
        self.scheduler.wake()


@dataclass
class SchedulerStats:
    active: int = 0
    waiting: int = 0
    slots: int = 0
    steps: int = 0
    tokens: int = 0  # generated tokens, all sequences
    prompt_tokens: int = 0  # prompt tokens evaluated
    last_batch: int = 0  # tokens in the last batch
    started: float = field(default_factory=time.monotonic)


class Scheduler:
    """Continuous batching over ``backend`` (a :class:`BatchDecoder` with several sequences)."""

    pushes = True  # its sources (Request) can be watched

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.slots: list[Seq] = list(backend.sequences)
        self._free: list[Seq] = list(self.slots)
        self._used_at = {id(s): 0.0 for s in self.slots}
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._cond = threading.Condition()
        self._step = threading.Lock()  # held for each step; exclusive() takes it to pause the loop
        self._closing: BaseException | None = None
        self.stats = SchedulerStats(slots=len(self.slots))
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)
        self._thread = threading.Thread(target=self._run, name="edgelm-scheduler", daemon=True)
        self._thread.start()

    # --- callers' side ---

    def submit(self, tokens: Sequence[int], params: Any, limit: int) -> Request:
        """Queue a generation of at most ``limit`` tokens after ``tokens``.  The sampler is made here, so a bad
        grammar fails this call alone."""
        sampler = self.backend.sampler(params, tokens)
        request = Request(self, list(tokens), sampler, limit)
        with self._cond:
            if self._closing is not None:
                sampler.close()
                raise ModelClosedError("The model is closed.", fix="Load it again with edgelm.load().")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def exclusive(self) -> "_SchedulerExclusive":
        """Pause the loop and lend a free sequence (scoring, saving a state): ``with scheduler.exclusive() as seq``."""
        return _SchedulerExclusive(self)

    def snapshot(self) -> dict[str, Any]:
        """What /metrics shows: active and waiting sequences, batch size, tokens/s over the last seconds."""
        s = self.stats
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t <= 10.0]
        rate = sum(n for _, n in recent) / (now - recent[0][0]) if len(recent) > 1 and now > recent[0][0] else 0.0
        return {"active": len(self._active), "waiting": len(self._waiting), "slots": s.slots, "steps": s.steps,
                "tokens": s.tokens, "prompt_tokens": s.prompt_tokens, "last_batch": s.last_batch,
                "tokens_per_second": round(rate, 1)}

    def reset(self) -> None:
        """Forget the caches of every sequence not generating now."""
        with self._step:
            with self._cond:
                free = list(self._free)
            for seq in free:
                self.backend.rewind(seq, 0)

    def close(self, error: BaseException | None = None) -> None:
        """Stop the loop; every running or waiting request ends with ``error`` (default: ModelClosedError)."""
        with self._cond:
            if self._closing is None:
                self._closing = error or ModelClosedError(
                    "The model was closed while this generation ran.", fix="Load it again with edgelm.load().")
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(30)
            with self._step:  # an exclusive user (scoring) finishes first
                pass

    # --- the loop ---

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._closing is None and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closing is not None:
                    self._fail_all(self._closing)
                    return
            with self._step:
                try:
                    progressed = self._step_once()
                except BaseException as exc:  # never let the loop die silently: fail what runs, keep serving
                    for r in list(self._active):
                        self._finish(r, exc if isinstance(exc, BackendError) else BackendError(
                            f"The scheduler failed: {exc}", fix="Try again; if it repeats, load the model again."))
                    progressed = True
            if not progressed:  # every sequence is waiting for its consumer
                with self._cond:
                    self._cond.wait(0.005)

    def _fail_all(self, error: BaseException) -> None:
        for r in list(self._active) + list(self._waiting):
            self._finish(r, error)
        self._waiting.clear()

    def _admit(self) -> None:
        with self._cond:
            while self._waiting and (self._waiting[0].cancelled or self._free):
                r = self._waiting.popleft()
                if r.cancelled:
                    r.sampler.close()
                    continue
                slot = max(self._free, key=lambda s: self._slot_rank(s, r.prompt))
                self._free.remove(slot)
                n = reusable_prefix(slot.tokens, r.prompt)
                if n < len(slot.tokens) and not (n > 0 and self.backend.rewind(slot, n)):
                    self.backend.rewind(slot, 0)
                    n = 0
                r.slot, r.reused, r.pending = slot, n, r.prompt[n:]
                slot.reused = n
                self._active.append(r)

    def _slot_rank(self, slot: Seq, prompt: list[int]) -> tuple[int, int, int, float]:
        """How good ``slot`` is for ``prompt`` (higher is better): a long cached prefix first; then the fewest runs
        of consecutive sequence ids among the active ones (llama.cpp evaluates a batch one run at a time: active
        sequences 0, 1 and 3 cost two passes over the weights per step, 0, 1 and 2 one); then any cached prefix;
        then the longest unused (its cache is the least likely to be asked for again)."""
        shared = reusable_prefix(slot.tokens, prompt)
        ids = {r.slot.id for r in self._active if r.slot is not None} | {slot.id}
        runs = sum(1 for i in ids if i - 1 not in ids)
        return (shared if shared >= REUSE_MIN else 0), -runs, shared, -self._used_at[id(slot)]

    def _step_once(self) -> bool:
        for r in [r for r in self._active if r.cancelled]:
            self._finish(r, None)
        self._admit()
        budget = self.backend.n_batch
        decoding: list[tuple[Request, list[int], bool]] = []
        prefill: list[tuple[Request, list[int], bool]] = []
        for r in self._active:  # the next token of every generating sequence whose consumer keeps up
            if r.last is not None and r.generated - r.taken < LOOKAHEAD and budget > 0:
                decoding.append((r, [r.last], True))
                budget -= 1
        if decoding:
            budget = min(budget, PREFILL_CHUNK)
        for r in self._active:  # then prompts, first come first served, in chunks that fill the batch
            if r.pending and budget > 0:
                chunk = r.pending[:budget]
                prefill.append((r, chunk, len(chunk) == len(r.pending)))
                budget -= len(chunk)
        if not decoding and not prefill:
            return False
        if decoding and any(len(toks) > 1 for _, toks, _ in prefill):
            # llama.cpp splits a batch over several KV streams into passes with as many tokens of each sequence:
            # next tokens and a longer prompt chunk never share a pass, so two calls cost what one would, and
            # reading the prompt first gives a request joining running streams its first token a pass sooner
            groups = [prefill, decoding]
        else:
            groups = [decoding + prefill]
        for group in groups:
            self._evaluate(group)
        return True

    def _evaluate(self, parts: list[tuple[Request, list[int], bool]]) -> None:
        """One batch: evaluate ``parts``, then sample and hand out the next token of each that asked for logits."""
        try:
            rows = self.backend.decode_batch([(r.slot, toks, want) for r, toks, want in parts])
        except BackendError as exc:
            for r, _, _ in parts:
                self._finish(r, exc)
            return
        s = self.stats
        s.steps += 1
        s.last_batch = sum(len(toks) for _, toks, _ in parts)
        now = time.monotonic()
        fresh = []
        for r, toks, _ in parts:
            if r.pending:
                r.pending = r.pending[len(toks):]
                s.prompt_tokens += len(toks)
            else:
                r.last = None  # that token is in the cache now
        for (r, toks, want), row in zip(parts, rows):
            if row < 0 or r.cancelled:
                continue
            token = self.backend.sample_row(r.sampler, row)
            r.generated += 1
            s.tokens += 1
            self._recent.append((now, 1))
            r.put(token)
            assert r.slot is not None  # an active request holds a slot
            if self.backend.is_eog(token) or r.generated >= r.limit or len(r.slot.tokens) >= self.backend.n_ctx:
                self._finish(r, None)
            else:
                r.last = token
                if r.generated == 1:
                    fresh.append(r)
        deadline = time.monotonic() + HANDOVER_SECONDS
        for r in fresh:  # the first tokens reach their consumers before the next decode takes the CPUs
            r.back.wait(max(0.0, deadline - time.monotonic()))

    def _finish(self, r: Request, error: BaseException | None) -> None:
        if r in self._active:
            self._active.remove(r)
            assert r.slot is not None  # an active request holds a slot
            with self._cond:
                self._free.append(r.slot)
                self._used_at[id(r.slot)] = time.monotonic()
        r.sampler.close()
        r.put(error if error is not None else _DONE)


class _SchedulerExclusive:
    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.seq: Seq | None = None

    def __enter__(self) -> Seq:
        s = self.s
        while True:
            s._step.acquire()
            with s._cond:
                if s._free:
                    self.seq = s._free.pop()
                    return self.seq
            s._step.release()  # every sequence is busy: let the loop run until one frees
            time.sleep(0.01)

    def __exit__(self, *exc: Any) -> None:
        s = self.s
        assert self.seq is not None  # entered
        with s._cond:
            s._free.append(self.seq)
            s._used_at[id(self.seq)] = time.monotonic()
        s._step.release()
