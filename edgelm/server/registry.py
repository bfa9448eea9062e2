"""The served models: loaded on first use, unloaded after `keep_alive` idle seconds with no request in flight.

Each model queues its own requests in arrival order (or batches them, loaded with parallel=N); the registry only
counts the requests in flight, so the keep-alive reaper never unloads a model someone is waiting for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm import loader, runtimes
from edgelm.errors import UnknownModelNameError
from edgelm.loader import options_for
from edgelm.plan import default_parallel
from edgelm.sources import resolve_model_path

DEFAULT_NAME = "smollm2-135m-instruct"


@dataclass
class Entry:
    name: str
    path: Path | None  # None = the embedded default model
    users: int = 0  # requests in flight (waiting or generating)
    lock: threading.Lock = field(default_factory=threading.Lock)
    model: Any = None
    last_used: float = 0.0
    expires_at: float = 0.0
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    load_seconds: float = 0.0
    keep_alive: float | None = None  # seconds, set by a request (Ollama's keep_alive); None: the registry's


def _lost(model: Any) -> bool:
    """Whether an open model lost an RPC worker (edgelm.rpc): it must be loaded again."""
    return model.health().get("status") in ("lost", "degraded")


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

    def begin(self, e: Entry) -> None:
        """A request for ``e`` is in flight (the reaper leaves its model alone until :meth:`end`)."""
        with e.lock:
            e.users += 1

    def end(self, e: Entry) -> None:
        with e.lock:
            e.users -= 1
        self.touch(e)

    def load(self, e: Entry) -> Any:
        """The entry's model, loading it on first use.  Call between :meth:`begin` and :meth:`end`."""
        with e.load_lock:
            if e.model is not None and not e.model.closed and _lost(e.model):
                e.model.close()  # an RPC worker went away (edgelm.rpc): load again, which checks the workers first
            if e.model is None or e.model.closed:
                t = time.perf_counter()
                e.model = loader.load(e.path, **self.options_for(e))
                e.load_seconds = time.perf_counter() - t
            self.touch(e)
            return e.model

    def loaded(self, e: Entry) -> Any:
        """The entry's model when it is loaded, open and healthy, else None (loads nothing: see :meth:`load`).  Call
        between :meth:`begin` and :meth:`end`."""
        model = e.model
        if model is None or model.closed or _lost(model):
            return None
        self.touch(e)
        return model

    def options_for(self, e: Entry) -> dict[str, Any]:
        """The load options that apply to this entry's backend (one set of options serves GGUF and ONNX models)."""
        path = resolve_model_path(e.path)
        backend = self.load_kwargs.get("backend")
        name = runtimes.canonical_name(backend) if backend not in (None, "auto") else runtimes.detect_backend(path)
        options = options_for(name, self.load_kwargs) if name else dict(self.load_kwargs)
        if name == "llamacpp" and "parallel" not in options and not options.get("workers"):
            # a server batches: as many sequences as memory allows
            options["parallel"] = default_parallel(path, n_ctx=options.get("n_ctx"), kv_cache=options.get("kv_cache"))
        return options

    def keep_alive_of(self, e: Entry) -> float:
        return self.keep_alive if e.keep_alive is None else e.keep_alive

    def touch(self, e: Entry) -> None:
        e.last_used = time.monotonic()
        e.expires_at = time.time() + self.keep_alive_of(e)

    def _reap(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.keep_alive / 4))):  # a request's keep_alive: within 1 s
            now = time.monotonic()
            for e in self.entries.values():
                if e.model is None or now - e.last_used <= self.keep_alive_of(e):
                    continue
                with e.lock:
                    if e.users:
                        continue
                    with e.load_lock:
                        if e.model is not None:
                            e.model.close()
                            e.model = None

    def close(self) -> None:
        self._stop.set()
        for e in self.entries.values():
            if e.model is not None:
                e.model.close()
                e.model = None
