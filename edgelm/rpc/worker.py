"""``edgelm worker``: serve this machine's memory and compute to other machines' models, as a llama.cpp RPC worker.

The worker is llama.cpp's own (``ggml_backend_rpc_start_server``, the code of its ``rpc-server`` program) from the
llama.cpp build edgelm uses, started in this process through ctypes: no second build, no program to find.  It serves
one client at a time; a client's model stays in the worker's memory until that client disconnects.

Security: the RPC protocol has no authentication and no encryption, and a client can make the worker allocate memory
and run computations.  The worker binds 127.0.0.1 unless told otherwise; bind a private network's address only, or
keep it on loopback and reach it through an SSH tunnel (docs/rpc.md).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgelm.errors import InvalidParameterError, WorkerStartError
from edgelm.platforms import available_memory, default_threads

from . import protocol

log = logging.getLogger("edgelm.rpc")

INSECURE_WARNING = (
    "edgelm worker is listening on {host}:{port}, which is not loopback. llama.cpp's RPC protocol has NO "
    "authentication and NO encryption: anyone who can reach this port can use this machine's memory and compute "
    "and read what it holds. Expose it only on a private network you trust, or bind 127.0.0.1 and use an SSH tunnel."
)


class InsecureWorkerWarning(UserWarning):
    pass


@dataclass(frozen=True)
class WorkerConfig:
    host: str
    port: int
    mem: int | None  # bytes the worker reports at most (None: what the machine has available)
    threads: int
    cache: str | None  # llama.cpp's tensor cache folder (large weights are kept there and not sent again)
    devices: tuple[str, ...]  # ggml devices served (names: CPU, CUDA0, ...)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def parse_size(value: object, *, parameter: str = "mem") -> int | None:
    """"2GB", "512MB", "1.5G", 2_000_000_000 -> bytes (binary units: 1 GB = 1024**3); None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "").removesuffix("IB").removesuffix("B")
        units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
        scale = units.get(text[-1:], 1)
        number = text[:-1] if text[-1:] in units else text
        try:
            size = float(number) * scale
        except ValueError:
            size = 0
        if size >= 1:
            return int(size)
    raise InvalidParameterError(f"Invalid {parameter}: {value!r}.", fix="Give a size such as 2GB, 512MB or 1.5G.",
                                parameter=parameter, value=value)


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WorkerStartError(f"Cannot listen on {host}:{port}: the host does not resolve ({exc}).",
                               fix="Use an address of this machine, e.g. 127.0.0.1 or its LAN address.",
                               host=host, port=port) from exc
    family, _, _, _, address = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ggml does: a just-closed port is fine
        s.bind(address)
    except OSError as exc:
        raise WorkerStartError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.",
                               fix="Another program (or worker) uses that port: pick another with --port, or stop it.",
                               host=host, port=port) from exc
    finally:
        s.close()


def configure(host: str = "127.0.0.1", port: int = protocol.DEFAULT_PORT, *, mem: object = None,
              threads: int | None = None, cache: str | os.PathLike[str] | None = None,
              devices: tuple[str, ...] | None = None) -> WorkerConfig:
    """Validate a worker's settings (typed errors) without starting anything."""
    if not isinstance(host, str) or not host or any(c.isspace() for c in host) or ":" in host:
        raise InvalidParameterError(f"Invalid host: {host!r}.", fix="Give an IPv4 address or a host name of this "
                                    "machine (llama.cpp's RPC server listens on IPv4).", parameter="host", value=host)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise InvalidParameterError(f"Invalid port: {port!r}.", fix="Use a port from 1 to 65535.", parameter="port",
                                    value=port)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InvalidParameterError(f"Invalid threads: {threads!r}.", fix="threads must be an integer >= 1.",
                                    parameter="threads", value=threads)
    cache_dir = None
    if cache is not None:
        path = Path(cache).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidParameterError(f"Cannot use {path} as the tensor cache: {exc.strerror or exc}.",
                                        fix="Give a writable folder.", parameter="cache", value=str(cache)) from exc
        cache_dir = str(path.resolve())
    return WorkerConfig(host, port, parse_size(mem), threads or default_threads(), cache_dir, tuple(devices or ()))


def default_cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "edgelm" / "rpc-cache"


def serve_worker(host: str = "127.0.0.1", port: int = protocol.DEFAULT_PORT, *, mem: object = None,
                 threads: int | None = None, cache: str | os.PathLike[str] | None = None,
                 devices: tuple[str, ...] | None = None,
                 ready: Callable[[WorkerConfig, list[dict[str, object]]], None] | None = None,
                 stop: threading.Event | None = None) -> None:
    """Run an RPC worker until ``stop`` is set or the process is interrupted (Ctrl-C, SIGTERM).

    host: the address to listen on; anything but loopback warns (InsecureWorkerWarning): RPC is unauthenticated.
    mem: cap on the memory the worker reports ("2GB"; the client's split keeps within it).
    threads: CPU threads for the computations [default: the performance cores].
    cache: a folder where llama.cpp keeps weights above 10 MB by hash, so reloading a model skips sending them.
    devices: ggml device names to serve (default: the GPUs, else the CPU, as llama.cpp's rpc-server).
    ready(config, devices): called once listening (devices: name, description, free and total bytes reported).
    """
    from edgelm.native import rpc as native_rpc

    cfg = configure(host, port, mem=mem, threads=threads, cache=cache, devices=devices)
    if not protocol.is_loopback(cfg.host):
        message = INSECURE_WARNING.format(host=cfg.host, port=cfg.port)
        warnings.warn(message, InsecureWorkerWarning, stacklevel=2)
    _check_port(cfg.host, cfg.port)
    try:
        native_rpc.registry()
    except Exception as exc:
        raise WorkerStartError(f"Cannot start a worker: {exc}", fix=getattr(exc, "fix", None)) from exc
    served = native_rpc.serving_devices()
    if cfg.devices:
        by_name = {d.name.lower(): d for d in native_rpc.local_devices()}
        missing = [n for n in cfg.devices if n.lower() not in by_name]
        if missing:
            raise InvalidParameterError(f"Unknown device(s): {', '.join(missing)}.",
                                        fix=f"Use some of: {', '.join(d.name for d in by_name.values())}.",
                                        parameter="devices", value=list(cfg.devices))
        served = [by_name[n.lower()] for n in cfg.devices]
    for d in served:
        cpu = d.name.upper().startswith("CPU")
        native_rpc.cap_memory(d, cfg.mem, available_memory if cpu else None)
    facts = [{"name": d.name, "description": d.description, "free": native_rpc.device(d.handle).free,
              "total": native_rpc.device(d.handle).total} for d in served]
    failed: list[BaseException] = []

    def run() -> None:
        try:
            native_rpc.start_server(cfg.endpoint, cfg.cache, cfg.threads, served)
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)
        failed.append(WorkerStartError(f"The worker on {cfg.endpoint} stopped: llama.cpp's RPC server returned.",
                                       fix="See the lines above; check that the port is free.",
                                       host=cfg.host, port=cfg.port))

    thread = threading.Thread(target=run, name="edgelm-rpc-server", daemon=True)
    thread.start()
    _wait_listening(cfg, thread)
    threading.Thread(target=_keep_alive_loop, args=(cfg, thread), name="edgelm-rpc-keepalive", daemon=True).start()
    if ready is not None:
        ready(cfg, facts)
    stop = stop or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.2):
            if not thread.is_alive():
                raise failed[-1] if failed else WorkerStartError(f"The worker on {cfg.endpoint} stopped.")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    # the server thread blocks in accept()/recv() inside llama.cpp and cannot be stopped from Python: the caller
    # ends the process (the CLI does); a library caller gets control back, the port stays bound until exit.


def _wait_listening(cfg: WorkerConfig, thread: threading.Thread, timeout: float = 30.0) -> None:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise WorkerStartError(f"The worker could not listen on {cfg.endpoint}.",
                                   fix="Check the address and that the port is free.", host=cfg.host, port=cfg.port)
        try:
            with socket.create_connection((host, cfg.port), timeout=0.5):
                return  # (the server sees a client that closes at once, and serves the next)
        except OSError:
            time.sleep(0.05)
    raise WorkerStartError(f"The worker did not start listening on {cfg.endpoint} within {timeout:g} s.",
                           fix="Check the output above.", host=cfg.host, port=cfg.port)


def _keep_alive_loop(cfg: WorkerConfig, thread: threading.Thread) -> None:
    """Keep-alive on accepted connections: a client whose host vanished is dropped in seconds, so the worker
    (one client at a time) can serve the next one instead of waiting forever."""
    from edgelm.native import rpc as native_rpc

    done: set[tuple[int, tuple[str, int]]] = set()
    while thread.is_alive():
        try:
            current = set(native_rpc.server_connections(cfg.port))
            for fd, peer in current - done:
                native_rpc.keep_alive([fd])
            done = current
        except Exception:  # pragma: no cover - best effort
            pass
        time.sleep(1.0)


def print_banner(cfg: WorkerConfig, devices: list[dict[str, object]], out: Callable[[str], None] = print) -> None:
    mb = 1024**2
    out(f"edgelm worker listening on {cfg.endpoint} ({cfg.threads} threads, tensor cache "
        f"{cfg.cache or 'off'})")
    for d in devices:
        out(f"  {d['name']}: {d['description']}, reports {int(d['free']) // mb} MB free of {int(d['total']) // mb} MB"
            + (" (capped by --mem)" if cfg.mem else ""))
    out(f"use it from another machine: edgelm run MODEL \"...\" --workers {cfg.endpoint}")
    sys.stdout.flush()
