"""llama.cpp, process-wide: its log goes to :mod:`logging` (and a ring buffer that explains load failures), the
backend is initialised once, and the build's facts (GPU offload, AMX) are read here.

This is the one doorway to llama-cpp-python: every edgelm module that needs llama.cpp imports this module before
``llama_cpp`` (or takes ``llama_cpp`` from here), so the OpenMP wait policy below is in place when llama.cpp's
libraries, and libgomp with them, load.  Importing it loads llama.cpp: import it only where llama.cpp is needed.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
from typing import MutableMapping

# The spin count must be set before libgomp loads; it loads with llama.cpp's libraries, on `import llama_cpp` below.
SPIN_COUNT = "10000"


def configure_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """Give llama.cpp's OpenMP threads a short spin before they sleep, unless the user chose a wait policy.

    llama.cpp (OPENMP = 1 in llama-cpp-python's build) syncs its threads at every operation of a forward pass with
    an OpenMP barrier, and how a thread waits there decides the speed: libgomp's default spins for about 300,000
    rounds (milliseconds) before it sleeps, which is fastest on an idle machine and pathological on a loaded one (a
    waiting thread burns the core its partner needs: decoding ran 20-50x slower on 2-core machines under load);
    OMP_WAIT_POLICY=PASSIVE (sleep at once) is safe under load but pays a futex wake-up at each of hundreds of
    barriers per token: 0.6-0.65x the tokens/s on an idle machine.  A short spin (10,000 rounds, a fraction of a
    millisecond) catches a barrier on an idle machine and gives the core up soon under load: measured 1.5x PASSIVE's
    single-stream decode idle, and no worse than PASSIVE with two CPU hogs.  Longer spins make the first token after
    an idle pause a little faster but 100,000 already stalled for over 25 s under two hogs.  Read by libgomp once,
    when it loads; a process that loaded llama.cpp before edgelm keeps its own setting.  Set OMP_WAIT_POLICY or
    GOMP_SPINCOUNT yourself to choose otherwise: then edgelm sets neither.
    """
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT


configure_openmp()

import llama_cpp  # noqa: E402  (after the OpenMP set-up above)

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
