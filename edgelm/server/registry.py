"""The served models: loaded on first use, unloaded after `keep_alive` idle seconds, one FIFO queue each."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import edgelm
from edgelm.errors import UnknownModelNameError

DEFAULT_NAME = "smollm2-135m-instruct"


class FairSlot:
    """One generation at a time per model, granted in arrival order; a waiter that gives up leaves the line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._line: collections.deque[threading.Event] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def busy(self) -> bool:
        return self._busy

    def acquire(self, cancelled: threading.Event | None = None) -> bool:
        with self._lock:
            if not self._busy and not self._line:
                self._busy = True
                return True
            turn = threading.Event()
            self._line.append(turn)
        while not turn.wait(0.05):
            if cancelled is not None and cancelled.is_set():
                with self._lock:
                    if turn.is_set():  # granted just now: hand it on
                        break
                    self._line.remove(turn)
                    return False
        if cancelled is not None and cancelled.is_set():
            self.release()
            return False
        return True

    def try_acquire(self) -> bool:
        with self._lock:
            if self._busy or self._line:
                return False
            self._busy = True
            return True

    def release(self) -> None:
        with self._lock:
            if self._line:
                self._line.popleft().set()  # ownership passes straight to the next in line
            else:
                self._busy = False


@dataclass
class Entry:
    name: str
    path: Path | None  # None = the embedded default model
    slot: FairSlot = field(default_factory=FairSlot)
    model: Any = None
    last_used: float = 0.0
    expires_at: float = 0.0
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    load_seconds: float = 0.0


class Registry:
    def __init__(self, models: dict[str, str | Path | None] | None, *, keep_alive: float = 300.0,
                 load_kwargs: dict[str, Any] | None = None) -> None:
        if not models:
            models = {DEFAULT_NAME: None}
        self.entries = {name: Entry(name, Path(p) if p is not None else None) for name, p in models.items()}
        self.keep_alive = keep_alive
        self.load_kwargs = dict(load_kwargs or {})
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="edgelm-keep-alive", daemon=True)
        self._reaper.start()

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: Any) -> Entry:
        if not isinstance(name, str) or name not in self.entries:
            raise UnknownModelNameError(
                f"Model {name!r} is not served here.",
                fix=f"Use one of: {', '.join(self.entries)} (GET /v1/models or /api/tags lists them).", model=name)
        return self.entries[name]

    def load(self, e: Entry) -> Any:
        """The entry's model, loading it on first use.  Call while holding the entry's slot."""
        with e.load_lock:
            if e.model is not None and not e.model.closed and e.model.health().get("status") in ("lost", "degraded"):
                e.model.close()  # an RPC worker went away (edgelm.rpc): load again, which checks the workers first
            if e.model is None or e.model.closed:
                t = time.perf_counter()
                e.model = edgelm.load(e.path, **self.options_for(e))
                e.load_seconds = time.perf_counter() - t
            e.last_used = time.monotonic()
            e.expires_at = time.time() + self.keep_alive
            return e.model

    def options_for(self, e: Entry) -> dict[str, Any]:
        """The load options that apply to this entry's backend (one set of options serves GGUF and ONNX models)."""
        from edgelm import runtimes
        from edgelm.loader import options_for, resolve_model_path

        path = resolve_model_path(e.path)
        backend = self.load_kwargs.get("backend")
        name = runtimes.canonical_name(backend) if backend not in (None, "auto") else runtimes.detect_backend(path)
        return options_for(name, self.load_kwargs) if name else dict(self.load_kwargs)

    def touch(self, e: Entry) -> None:
        e.last_used = time.monotonic()
        e.expires_at = time.time() + self.keep_alive

    def _reap(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.keep_alive / 4))):
            now = time.monotonic()
            for e in self.entries.values():
                if e.model is not None and now - e.last_used > self.keep_alive and e.slot.try_acquire():
                    try:
                        with e.load_lock:
                            if e.model is not None:
                                e.model.close()
                                e.model = None
                    finally:
                        e.slot.release()

    def close(self) -> None:
        self._stop.set()
        for e in self.entries.values():
            if e.model is not None:
                e.model.close()
                e.model = None
