"""llama.cpp, process-wide: its log goes to :mod:`logging` (and a ring buffer that explains load failures), the
backend is initialised once, and the build's facts (GPU offload, AMX) are read here.

Imports llama_cpp: import this module only where llama.cpp is needed.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading

import llama_cpp

log = logging.getLogger("edgelm.llamacpp")

_recent_log: collections.deque[str] = collections.deque(maxlen=40)
# ggml_log_level: NONE=0 DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5 (continues the previous line)
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = logging.DEBUG


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    try:
        msg = text.decode("utf-8", errors="replace")
        py_level = _LEVELS.get(level, _last_level)
        _last_level = py_level
        _recent_log.append(msg)
        for listener in _listeners:  # e.g. edgelm.rpc.attach reading where llama.cpp put each layer
            listener(level, msg)
        if log.isEnabledFor(py_level) and msg.strip():
            log.log(py_level, msg.rstrip())
    except Exception:  # never raise through C
        pass


_listeners: list = []  # callables (ggml level, text) that see every line llama.cpp logs, whatever the log level


def add_listener(listener) -> None:
    _listeners.append(listener)


def remove_listener(listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


_init_lock = threading.Lock()
_initialized = False


def init() -> None:
    """Route llama.cpp's log to `logging` and initialise its backends (once per process)."""
    global _initialized
    with _init_lock:
        if not _initialized:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _initialized = True


def clear_log() -> None:
    _recent_log.clear()


def recent_errors() -> str:
    """The last few lines llama.cpp logged, errors first: what to put in a message when a call failed."""
    lines = [line.strip() for line in _recent_log if line.strip()]
    interesting = [line for line in lines if any(w in line.lower() for w in ("error", "unknown", "fail", "invalid"))]
    return " | ".join((interesting or lines)[-4:])


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


def amx_present() -> bool:
    """True when this build runs llama.cpp's AMX kernels (Intel Sapphire Rapids and newer)."""
    return "AMX_INT8 = 1" in system_info()


def version() -> str:
    return getattr(llama_cpp, "__version__", "unknown")
