"""llama.cpp's RPC backend (ggml-rpc), process-wide, through ctypes.

The backend is found in this process's llama.cpp when llama-cpp-python was built with ``-DGGML_RPC=on``; otherwise
the module that ``edgelm install-rpc`` compiled for this very build (``libggml-rpc``, llama.cpp's own
``ggml/src/ggml-rpc`` sources from the same llama-cpp-python release, linked against its ``libggml-base``) is loaded
with ``ggml_backend_load``.  Either way it is reached through the backend registry (``ggml_backend_reg_by_name("RPC")``
and ``ggml_backend_reg_get_proc_address``), as llama.cpp's own tools do, so one code path serves both.

Functions used, as this llama.cpp declares them (ggml/include/ggml-rpc.h, RPC protocol 7.0.0):
  ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
  void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir, size_t n_threads,
                                     size_t n_devices, ggml_backend_dev_t * devices);

Traps (read in ggml-rpc.cpp): the client aborts the whole process (GGML_ABORT) when a connection fails or breaks,
and it never times out a read.  So: edgelm talks to a worker in Python first (:mod:`edgelm.rpc.protocol`), runs a
model split across workers in a child process (:mod:`edgelm.runtimes.isolated`), and turns on TCP keep-alive and a
user timeout on the child's worker sockets (:func:`keep_alive`) so a vanished host ends in seconds, not never.

Imports llama_cpp: import this module only where llama.cpp is needed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from edgelm.errors import BackendError, BackendNotInstalledError

from . import llamacpp as native  # before llama_cpp: it sets up OpenMP first
from .llamacpp import llama_cpp
from llama_cpp import _ctypes_extensions as _ext
from .rpc_module import INSTALL_HINT, installed_module

log = logging.getLogger("edgelm.rpc")

LIB_DIR = Path(llama_cpp.__file__).resolve().parent / "lib"

# enum ggml_backend_dev_type
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, DEVICE_ACCEL = 0, 1, 2, 3
# struct ggml_backend_device { struct ggml_backend_device_i iface; reg; context; }: get_memory is iface's 3rd pointer
_GET_MEMORY_SLOT = 2

_vp, _cp, _sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
_GET_MEMORY = ctypes.CFUNCTYPE(None, _vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz))
_ADD_SERVER = ctypes.CFUNCTYPE(_vp, _cp)
_START_SERVER = ctypes.CFUNCTYPE(None, _cp, _cp, _sz, _sz, ctypes.POINTER(_vp))


class _Ggml:
    """The ggml functions edgelm needs, bound once (libggml: the registry; libggml-base: devices)."""

    def __init__(self) -> None:
        ggml = _ext.load_shared_library("ggml", LIB_DIR)
        base = _ext.load_shared_library("ggml-base", LIB_DIR)

        def bind(lib: ctypes.CDLL, name: str, res: object, *args: object) -> Callable:
            f = getattr(lib, name)
            f.restype, f.argtypes = res, list(args)
            return f

        self.load = bind(ggml, "ggml_backend_load", _vp, _cp)
        self.reg_by_name = bind(ggml, "ggml_backend_reg_by_name", _vp, _cp)
        self.dev_count = bind(ggml, "ggml_backend_dev_count", _sz)
        self.dev_get = bind(ggml, "ggml_backend_dev_get", _vp, _sz)
        self.proc = bind(base, "ggml_backend_reg_get_proc_address", _vp, _vp, _cp)
        self.reg_dev_count = bind(base, "ggml_backend_reg_dev_count", _sz, _vp)
        self.reg_dev_get = bind(base, "ggml_backend_reg_dev_get", _vp, _vp, _sz)
        self.dev_name = bind(base, "ggml_backend_dev_name", _cp, _vp)
        self.dev_description = bind(base, "ggml_backend_dev_description", _cp, _vp)
        self.dev_type = bind(base, "ggml_backend_dev_type", ctypes.c_int, _vp)
        self.dev_memory = bind(base, "ggml_backend_dev_memory", None, _vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz))


_lock = threading.Lock()
_ggml: _Ggml | None = None
_loaded_module: Path | None = None  # the module edgelm loaded, when the RPC backend was not built in
_keep: list[object] = []  # ctypes callbacks that C holds pointers to: they must live as long as the process


def ggml() -> _Ggml:
    global _ggml
    with _lock:
        if _ggml is None:
            native.init()
            _ggml = _Ggml()
        return _ggml


@dataclass(frozen=True)
class Availability:
    available: bool  # the RPC backend is in this process's llama.cpp, or a module for this build is installed
    built_in: bool  # llama-cpp-python was built with -DGGML_RPC=on
    module: str | None  # the module edgelm install-rpc made for this build (None: not installed)
    loaded: bool  # already registered in this process

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def availability() -> Availability:
    """Whether RPC can be used here, without loading anything new into the process."""
    g = ggml()
    registered = bool(g.reg_by_name(b"RPC"))
    built_in = registered and _loaded_module is None
    module = installed_module()
    return Availability(available=built_in or module is not None or registered, built_in=built_in,
                        module=str(module) if module else (str(_loaded_module) if _loaded_module else None),
                        loaded=registered)


def registry() -> int:
    """The RPC backend registry of this process: built in, or the installed module loaded now (once)."""
    global _loaded_module
    g = ggml()
    reg = g.reg_by_name(b"RPC")
    if reg:
        return reg
    with _lock:
        reg = g.reg_by_name(b"RPC")
        if reg:
            return reg
        module = installed_module()
        if module is None:
            raise BackendNotInstalledError(
                f"llama.cpp's RPC backend is not in this llama-cpp-python {native.version()} build, and no RPC module "
                "was built for it.",
                fix=INSTALL_HINT, backend="rpc", extra="llamacpp")
        native.clear_log()
        reg = g.load(str(module).encode())
        if not reg or not g.reg_by_name(b"RPC"):
            raise BackendError(
                f"Loading the RPC module {module} into llama.cpp failed: {native.recent_errors() or 'no reason given'}.",
                fix="Rebuild it for this llama-cpp-python: edgelm install-rpc --force", path=str(module))
        _loaded_module = module
        log.debug("loaded llama.cpp's RPC backend from %s", module)
        return reg


def _function(name: str, prototype: type) -> Callable:
    address = ggml().proc(registry(), name.encode())
    if not address:
        raise BackendError(f"llama.cpp's RPC backend has no {name}.",
                           fix="Rebuild the RPC module for this llama-cpp-python: edgelm install-rpc --force")
    return prototype(address)


@dataclass(frozen=True)
class Device:
    """A ggml backend device (a worker's devices appear here as RPC0, RPC1, ...)."""

    handle: int
    name: str
    description: str
    free: int
    total: int


def device(handle: int) -> Device:
    g = ggml()
    free, total = _sz(), _sz()
    g.dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
    return Device(handle, (g.dev_name(handle) or b"").decode(), (g.dev_description(handle) or b"").decode(),
                  free.value, total.value)


def add_worker(endpoint: str) -> list[Device]:
    """Register a worker ``host:port`` with llama.cpp and return its devices.

    Connects at once and **aborts the process** if the worker does not answer: check it with
    :func:`edgelm.rpc.protocol.query` first, and run this in the process that may die (the model's child)."""
    add = _function("ggml_backend_rpc_add_server", _ADD_SERVER)
    reg = add(endpoint.encode())
    if not reg:
        raise BackendError(f"The worker {endpoint} reports no devices.", fix="Check the worker's output.",
                           endpoint=endpoint)
    g = ggml()
    return [device(g.reg_dev_get(reg, i)) for i in range(g.reg_dev_count(reg))]


def local_devices() -> list[Device]:
    g = ggml()
    return [device(g.dev_get(i)) for i in range(g.dev_count())]


def serving_devices() -> list[Device]:
    """What a worker offers, as llama.cpp's rpc-server chooses: its GPUs, else its CPU."""
    g = ggml()
    handles = [g.dev_get(i) for i in range(g.dev_count())]
    gpus = [h for h in handles if g.dev_type(h) not in (DEVICE_CPU, DEVICE_ACCEL)]
    cpus = [h for h in handles if g.dev_type(h) == DEVICE_CPU]
    return [device(h) for h in (gpus or cpus[:1])]


def cap_memory(dev: Device, cap: int | None, available: Callable[[], int | None] | None = None) -> None:
    """Make ``dev`` report at most ``cap`` bytes (free and total), and as free no more than ``available()`` (this
    machine's available memory: llama.cpp's CPU device reports all physical memory as free).

    Done by replacing the device's ``get_memory`` in its interface table (a static, writable struct in ggml), so the
    worker's answer to a client's memory query (RPC_CMD_GET_DEVICE_MEMORY) says it.  Process-wide: for workers."""
    slots = (ctypes.c_void_p * (_GET_MEMORY_SLOT + 1)).from_address(dev.handle)
    original = _GET_MEMORY(slots[_GET_MEMORY_SLOT])

    @_GET_MEMORY
    def get_memory(handle: int, free: ctypes.Array, total: ctypes.Array) -> None:  # called from C
        original(handle, free, total)
        try:
            limit = cap if cap is not None else total[0]
            avail = available() if available is not None else None
            total[0] = min(total[0], limit)
            free[0] = min(free[0], limit, avail if avail is not None else limit)
        except Exception:  # never raise through C
            pass

    _keep.append(get_memory)
    slots[_GET_MEMORY_SLOT] = ctypes.cast(get_memory, ctypes.c_void_p).value


def start_server(endpoint: str, cache_dir: str | None, threads: int, devices: Iterable[Device]) -> None:
    """ggml_backend_rpc_start_server: serve ``devices`` on ``endpoint`` (host:port), one client at a time.  Blocks
    (returns only when the listening socket fails); the GIL is released meanwhile."""
    start = _function("ggml_backend_rpc_start_server", _START_SERVER)
    devs = list(devices)
    array = (ctypes.c_void_p * len(devs))(*[d.handle for d in devs])
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(devs), array)


# --- the sockets ggml opened: keep-alive, and whether a peer has gone -------------------------------------------

def _socket_fds() -> list[int]:
    if os.path.isdir("/proc/self/fd"):
        fds = [int(n) for n in os.listdir("/proc/self/fd") if n.isdigit()]
    else:  # macOS and others: look through the low descriptors
        fds = list(range(3, 1024))
    out = []
    for fd in fds:
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                out.append(fd)
        except OSError:
            pass
    return out


def _tcp_sockets() -> Iterator[tuple[int, socket.socket]]:
    """(fd, a duplicate socket object) for each of this process's TCP sockets; the duplicate is closed after use."""
    for fd in _socket_fds():
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                yield fd, s
        finally:
            s.close()  # closes the duplicate only


def connected_sockets(peers: Iterable[tuple[str, int]]) -> list[tuple[int, tuple[str, int]]]:
    """(fd, peer) of this process's TCP sockets connected to any of ``peers`` ((ip, port) pairs)."""
    wanted = {(ip, int(port)) for ip, port in peers}
    found = []
    for fd, s in _tcp_sockets():
        try:
            peer = s.getpeername()[:2]
        except OSError:
            continue
        if (peer[0], peer[1]) in wanted:
            found.append((fd, (peer[0], int(peer[1]))))
    return found


def server_connections(port: int) -> list[tuple[int, tuple[str, int]]]:
    """(fd, peer) of this process's accepted TCP connections on local ``port`` (a worker's clients)."""
    found = []
    for fd, s in _tcp_sockets():
        try:
            if s.getsockname()[1] == port:
                peer = s.getpeername()[:2]  # raises for the listening socket
                found.append((fd, (peer[0], int(peer[1]))))
        except OSError:
            pass
    return found


def keep_alive(fds: Iterable[int], *, idle_s: int = 2, interval_s: int = 1, count: int = 3,
               user_timeout_ms: int = 6000) -> None:
    """TCP keep-alive and a user timeout on sockets ggml opened: a worker whose host vanishes (power, cable, Wi-Fi)
    then fails the connection in about idle + count x interval seconds, and ggml's blocked read returns."""
    for fd in fds:
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPALIVE", idle_s), ("TCP_KEEPINTVL", interval_s),
                                ("TCP_KEEPCNT", count), ("TCP_USER_TIMEOUT", user_timeout_ms)):
                opt = getattr(socket, name, None)
                if opt is not None and not (name == "TCP_KEEPALIVE" and sys.platform.startswith("linux")):
                    try:
                        s.setsockopt(socket.IPPROTO_TCP, opt, value)
                    except OSError:
                        pass
        finally:
            s.close()


def peer_closed(fd: int) -> bool:
    """True when the peer of socket ``fd`` has closed it (a read would see end-of-file) or it failed; never
    consumes data (MSG_PEEK)."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return True
    try:
        # MSG_DONTWAIT, not setblocking(False): the blocking flag belongs to the socket ggml reads from too
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing to read
    except OSError:
        return True
    finally:
        s.close()
