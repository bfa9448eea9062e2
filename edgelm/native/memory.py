"""Giving freed native memory back to the operating system.

A closed model frees its weights and KV cache, but glibc's allocator keeps freed heap pages for reuse, so the
process's RSS stays high (a desktop app that unloads a model should shrink; measured: 65 MB instead of 50 MB after
closing the default model).  :func:`trim_heap` asks glibc to return them; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import sys

_libc: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: not glibc


def trim_heap() -> bool:
    """Return free heap pages to the OS (glibc's malloc_trim); False where that is not available."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:  # glibc's soname; ctypes.util.find_library would fork `ldconfig -p` to find it
                libc = ctypes.CDLL("libc.so.6")
                _libc = libc if hasattr(libc, "malloc_trim") else False
            except OSError:  # not glibc (musl: no malloc_trim)
                pass
    if _libc is False:
        return False
    return bool(_libc.malloc_trim(0))  # type: ignore[union-attr]
