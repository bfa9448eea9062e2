"""A backend that runs in a child process: when native code there aborts, this process lives on with a typed error.

Why: llama.cpp's RPC client calls ``abort()`` when a worker's connection breaks (``RPC_STATUS_ASSERT`` in
ggml-rpc.cpp), from whichever thread noticed, with no way to recover the call in flight.  A model split across
workers therefore runs in a child (``python -c ...`` on the same interpreter, never ``multiprocessing``'s re-import of
``__main__``); this proxy forwards the backend protocol to it over a socket pair, one request at a time, and turns
the child's end into the error its caller chose (for workers: :class:`edgelm.errors.WorkerLostError`, naming the
worker that went away).  Later calls raise the same error at once; :meth:`IsolatedBackend.health` says so.

The protocol is the backend's own: any public method of the child's backend is forwarded (a generator comes back as
a remote iterator, stepped one item per request, so the caller stops it exactly where it stops reading).
:class:`Seq` arguments travel as their ids, and every reply carries the sequences' changes, so ``seq.tokens`` here
matches the child's KV cache.  Token pieces and end-of-generation flags ride along with generated tokens and are
cached, so ``token_bytes``/``is_eog`` per streamed token cost no round trip.  Cost per streamed token: one round
trip of a few tens of microseconds.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator as _IteratorABC
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

from edgelm.errors import BackendError, EdgelmError

from . import get_backend
from .base import Capabilities, LoadOptions, Seq

log = logging.getLogger("edgelm.isolated")

# what the child needs to know beyond the protocol: attributes copied once after loading
_ATTRIBUTES = ("name", "n_ctx", "bos_token", "eos_token", "chat_template", "n_vocab")


class _SeqRef:
    __slots__ = ("id",)

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id


def _encode_error(exc: BaseException) -> tuple:
    if isinstance(exc, EdgelmError):
        details = {}
        for k, v in exc.details.items():
            try:
                pickle.dumps(v)
                details[k] = v
            except Exception:
                details[k] = repr(v)
        return ("edgelm", type(exc).__module__, type(exc).__qualname__, exc.message, exc.fix, details)
    return ("other", type(exc).__name__, str(exc), "".join(traceback.format_exception(exc))[-2000:])


def _decode_error(payload: tuple) -> BaseException:
    if payload[0] == "edgelm":
        _, module, qualname, message, fix, details = payload
        try:
            cls = getattr(importlib.import_module(module), qualname)
            exc = cls.__new__(cls)
            EdgelmError.__init__(exc, message, fix=fix, **details)
            return exc
        except Exception:
            return BackendError(message, fix=fix)
    _, name, text, tb = payload
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    log.debug("child traceback:\n%s", tb)
    return BackendError(f"The model's process failed: {name}: {text}.", fix="Set EDGELM_DEBUG=1 for details.")


class IsolatedBackend:
    """The backend protocol, forwarded to a backend loaded in a child process."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, hello: dict[str, Any],
                 on_exit: Callable[[str], BaseException], stderr_tail: collections.deque,
                 describe_hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self._proc = proc
        self._describe_hook = describe_hook
        self._conn = conn
        self._lock = threading.RLock()
        self._on_exit = on_exit
        self._stderr = stderr_tail
        self._failure: BaseException | None = None
        self._closed = False
        for name in _ATTRIBUTES:
            if name in hello["attributes"]:
                setattr(self, name, hello["attributes"][name])
        self.capabilities = Capabilities(**hello["capabilities"])
        self.sequences = [Seq(i) for i in range(hello["sequences"])]
        self._methods = set(hello["methods"])
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self.child_pid = proc.pid

    # --- starting -------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, backend: str, path: Path, options: LoadOptions, *,
              on_exit: Callable[[str], BaseException] | None = None, env: dict[str, str] | None = None,
              describe_hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> "IsolatedBackend":
        """Load ``path`` with backend ``backend`` (a name for edgelm.runtimes.get_backend, or "module:Class") in a
        child process.

        ``on_exit(reason)`` makes the error raised when the child ends unexpectedly (``reason``: its exit status
        and the last lines it wrote); ``describe_hook(facts)`` may add to what describe() returns."""
        parent_sock, child_sock = socket.socketpair()
        code = "import sys; from edgelm.runtimes.isolated import child_main; child_main(int(sys.argv[1]))"
        tail: collections.deque = collections.deque(maxlen=30)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(child_sock.fileno())], pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})}, start_new_session=True)  # Ctrl-C reaches the parent only
        finally:
            child_sock.close()
        threading.Thread(target=_drain, args=(proc, tail), name="edgelm-isolated-output", daemon=True).start()
        conn = Connection(parent_sock.detach())
        default_exit = on_exit or (lambda reason: BackendError(f"The model's process ended: {reason}.",
                                                               fix="Load the model again."))
        try:
            conn.send(("load", backend, str(path), options))
            hello = _reply(conn, proc, default_exit, tail)
        except BaseException:
            _stop(proc, conn)
            raise
        return cls(proc, conn, hello, default_exit, tail, describe_hook)

    # --- the channel ----------------------------------------------------------------------------------------

    def _request(self, message: tuple, timeout: float | None = None) -> Any:
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise BackendError("The model's process was closed.", fix="Load the model again.")
            try:
                self._conn.send(message)
                if timeout is not None and not self._conn.poll(timeout):
                    # an idle child that does not answer is stuck: end it (a late answer would desynchronise us)
                    self._proc.kill()
                    raise EOFError("no answer")
                kind, value, seqs, tokens = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._failure = self._lost()
                raise self._failure from exc
            self._sync(seqs, tokens)
            if kind == "err":
                raise _decode_error(value)
            return value

    def _lost(self) -> BaseException:
        try:
            status = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            status = self._proc.wait()
        time.sleep(0.05)  # the output thread's last lines
        return self._on_exit(_reason(status, self._stderr))

    def _sync(self, seqs: dict[int, tuple], tokens: dict[int, tuple[bytes, bool]]) -> None:
        for seq_id, (op, values, reused) in seqs.items():
            seq = self.sequences[seq_id]
            if op == "+":
                seq.tokens.extend(values)
            else:
                seq.tokens[:] = values
            seq.reused = reused
        for token, (piece, eog) in tokens.items():
            self._pieces[token] = piece
            self._eog[token] = eog

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_SeqRef(a.id) if isinstance(a, Seq) else a for a in args)
        value = self._request(("call", name, args, kwargs))
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "__iterator__":
            return self._iterate(value[1])
        return value

    def _iterate(self, handle: int) -> Iterator[Any]:
        try:
            while True:
                done, item = self._request(("next", handle))
                if done:
                    return
                yield item
        finally:
            if self._failure is None and not self._closed:
                try:
                    self._request(("close_iter", handle))
                except BaseException:
                    pass

    def __getattr__(self, name: str) -> Any:
        # forward the child's public methods (the protocol may grow; nothing else is forwarded)
        if name.startswith("_") or name not in self.__dict__.get("_methods", ()):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)

    # --- the protocol's hot path ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self._call("tokenize", text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._call("token_bytes", token)
        return piece

    def is_eog(self, token: int) -> bool:
        value = self._eog.get(token)
        if value is None:
            value = self._eog[token] = self._call("is_eog", token)
        return value

    def detokenize(self, tokens: Any) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def generate(self, seq: Seq, tokens: Any, params: Any) -> Generator[int, None, None]:
        return self._call("generate", seq, list(tokens), params)

    def describe(self) -> dict[str, Any]:
        facts = self._call("describe")
        facts.setdefault("extra", {})["process"] = {"isolated": True, "pid": self.child_pid}
        return self._describe_hook(facts) if self._describe_hook is not None else facts

    # --- lifecycle ------------------------------------------------------------------------------------------

    @property
    def failure(self) -> BaseException | None:
        """The error that ended the child, or None while it runs."""
        if self._failure is None and not self._closed and self._proc.poll() is not None:
            with self._lock:
                if self._failure is None:
                    self._failure = self._lost()
        return self._failure

    def health(self) -> dict[str, Any]:
        """{"status": "ok" | "degraded" | "lost" | "closed", ...}: "lost" once the child has ended (the model must be
        loaded again); while it runs and is idle, the child's own check (for workers: are their connections open)."""
        failure = self.failure
        if failure is not None:
            return {"status": "lost", "error": str(failure), "pid": self.child_pid}
        if self._closed:
            return {"status": "closed"}
        if not self._lock.acquire(blocking=False):  # busy generating: it was fine a token ago
            return {"status": "ok", "pid": self.child_pid, "busy": True}
        try:
            report = self._request(("health",), timeout=5.0)
        except BaseException as exc:  # the check itself found the child gone
            return {"status": "lost", "error": str(exc), "pid": self.child_pid}
        finally:
            self._lock.release()
        return {"pid": self.child_pid, **report}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._failure is None:
                try:
                    self._conn.send(("exit",))
                except OSError:
                    pass
            _stop(self._proc, self._conn)
        for seq in self.sequences:
            seq.tokens.clear()

    def __del__(self) -> None:
        try:
            if not self._closed:
                _stop(self._proc, self._conn, grace=0.5)
        except Exception:
            pass


def _reply(conn: Connection, proc: subprocess.Popen, on_exit: Callable[[str], BaseException],
           tail: collections.deque) -> Any:
    try:
        kind, value, _, _ = conn.recv()
    except (EOFError, OSError) as exc:
        try:
            status = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        time.sleep(0.05)
        raise on_exit(_reason(status, tail)) from exc
    if kind == "err":
        raise _decode_error(value)
    return value


def _reason(status: int, tail: collections.deque) -> str:
    import signal

    what = (f"killed by {signal.Signals(-status).name}" if status < 0 and -status in signal.Signals._value2member_map_
            else f"exit status {status}")
    lines = [re.sub(r"^\S*\.(?:c|cpp|h):\d+: ", "", line.strip()) for line in tail if line.strip()][-2:]
    return what + (f": {' | '.join(lines)}" if lines else "")


def _drain(proc: subprocess.Popen, tail: collections.deque) -> None:
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        tail.append(line)
        log.debug("[child %d] %s", proc.pid, line)


def _stop(proc: subprocess.Popen, conn: Connection, grace: float = 5.0) -> None:
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        conn.close()
    except OSError:
        pass


# --- the child ------------------------------------------------------------------------------------------------

class _Host:
    """The child's side: the backend, its open iterators, and what the parent has been told."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.backend: Any = None
        self.iterators: dict[int, Iterator[Any]] = {}
        self.next_handle = 0
        self.sent_tokens: dict[int, list[int]] = {}
        self.sent_reused: dict[int, int] = {}
        self.sent_pieces: set[int] = set()
        self.workers: Any = ()

    def seq_changes(self) -> dict[int, tuple]:
        out = {}
        for seq in getattr(self.backend, "sequences", ()):
            old = self.sent_tokens.get(seq.id, [])
            new = seq.tokens
            if new == old and self.sent_reused.get(seq.id) == seq.reused:
                continue
            if len(new) >= len(old) and new[: len(old)] == old:
                out[seq.id] = ("+", list(new[len(old):]), seq.reused)
            else:
                out[seq.id] = ("=", list(new), seq.reused)
            self.sent_tokens[seq.id] = list(new)
            self.sent_reused[seq.id] = seq.reused
        return out

    def token_facts(self, item: Any) -> dict[int, tuple[bytes, bool]]:
        if type(item) is int and item not in self.sent_pieces and item >= 0:
            self.sent_pieces.add(item)
            return {item: (self.backend.token_bytes(item), bool(self.backend.is_eog(item)))}
        return {}

    def reply(self, kind: str, value: Any, tokens: dict | None = None) -> None:
        self.conn.send((kind, value, self.seq_changes() if self.backend is not None else {}, tokens or {}))

    def load(self, backend_name: str, path: str, options: LoadOptions) -> None:
        if ":" in backend_name:  # module:Class (a backend that is not registered by name in a fresh process)
            module, _, attr = backend_name.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            cls = get_backend(backend_name)
        self.backend = cls.load(Path(path), options)
        self.workers = options.workers
        b = self.backend
        methods = [n for n in dir(b) if not n.startswith("_") and callable(getattr(b, n, None))]
        self.reply("ok", {
            "attributes": {n: getattr(b, n) for n in _ATTRIBUTES if hasattr(b, n)},
            "capabilities": b.capabilities.to_dict(),
            "sequences": len(b.sequences),
            "methods": methods,
        })

    def call(self, name: str, args: tuple, kwargs: dict) -> None:
        seqs = {s.id: s for s in self.backend.sequences}
        args = tuple(seqs[a.id] if isinstance(a, _SeqRef) else a for a in args)
        value = getattr(self.backend, name)(*args, **kwargs)
        if isinstance(value, _IteratorABC):
            handle = self.next_handle
            self.next_handle += 1
            self.iterators[handle] = value
            self.reply("ok", ("__iterator__", handle))
        else:
            self.reply("ok", value)

    def step(self, handle: int) -> None:
        try:
            item = next(self.iterators[handle])
        except StopIteration:
            self.iterators.pop(handle, None)
            self.reply("ok", (True, None))
            return
        self.reply("ok", (False, item), self.token_facts(item))

    def health(self) -> None:
        report: dict[str, Any] = {"status": "ok"}
        if self.workers:
            from edgelm.rpc.attach import check_workers

            report = check_workers(self.workers)
        self.reply("ok", report)

    def close_iter(self, handle: int) -> None:
        it = self.iterators.pop(handle, None)
        if it is not None and hasattr(it, "close"):
            it.close()
        self.reply("ok", None)


def child_main(fd: int) -> None:
    """The child process: serve one backend until told to exit or the parent goes away."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort here is expected: no core files
    except (ImportError, ValueError, OSError):
        pass
    # die with the parent, even while stuck in a native call (a worker that went silent); not PR_SET_PDEATHSIG,
    # which fires when the parent *thread* that started us ends (the server loads models from request threads)
    parent = os.getppid()

    def orphan_watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphan_watch, name="edgelm-orphan-watch", daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    conn = Connection(fd)
    host = _Host(conn)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        op = message[0]
        if op == "exit":
            break
        try:
            if op == "load":
                host.load(*message[1:])
            elif op == "call":
                host.call(*message[1:])
            elif op == "next":
                host.step(message[1])
            elif op == "close_iter":
                host.close_iter(message[1])
            elif op == "health":
                host.health()
            else:
                host.reply("err", _encode_error(BackendError(f"unknown request {op!r}")))
        except BaseException as exc:  # every failure goes to the parent, typed
            try:
                host.reply("err", _encode_error(exc))
            except (EOFError, OSError):
                break
            if op == "load":
                break
    if host.backend is not None:
        try:
            host.backend.close()
        except Exception:
            pass
    os._exit(0)  # skip interpreter teardown: llama.cpp's RPC threads may still hold sockets
