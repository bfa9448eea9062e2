"""The store's index: one small JSON file under ``$EDGELM_HOME`` that the store, the Hub cache and the loader write.

It records the outputs of `edgelm convert` (:func:`record_output`), the folders conversions wrote into, when each
model was last loaded (:func:`touch`) and which Hugging Face cache blobs were already checked against their sha256
(:func:`is_verified`, :func:`mark_verified`).  ``$EDGELM_HOME`` defaults to ``$XDG_CACHE_HOME/edgelm``, i.e.
``~/.cache/edgelm``.  The file is rewritten atomically (temporary file + rename) under a lock file, so concurrent
writers do not lose each other's entries, and a corrupt index is set aside and started afresh rather than failing a
load.

This is the bottom of the store: :mod:`edgelm.hub` (verified blobs) and :mod:`edgelm.loader` (last used) write here,
and :mod:`edgelm.store` (list, remove, stale temporaries) sits above the Hub cache and reads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .home import edgelm_home, write_atomic

log = logging.getLogger("edgelm.store")

INDEX_VERSION = 1
INDEX_NAME = "store.json"
MAX_LAST_USED = 2000  # entries kept in the "last used" table (oldest dropped first)

# hidden temporaries of conversions: tempfile.mkdtemp/mkstemp(prefix=".{name}.", suffix=...) ->
# .out.gguf.k2j4_x9a.convert, and the fp32 reference an ONNX conversion scores against
# (TemporaryDirectory(prefix=".edgelm-ref-")); the store removes them, and their use is never recorded
STALE_NAME = re.compile(r"^\.(?:.+\.[a-z0-9_]{6,12}\.(?:convert|part|partial)|edgelm-ref-[a-z0-9_]{6,12})$")


def index_path() -> Path:
    return edgelm_home() / INDEX_NAME


def path_key(path: str | os.PathLike[str]) -> str:
    # absolute but not resolved: a model pulled into the HF cache is known by its snapshot path, not by its blob
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


# --- the index file -------------------------------------------------------------------------------------

def _empty() -> dict[str, Any]:
    return {"version": INDEX_VERSION, "outputs": {}, "folders": {}, "last_used": {}, "verified": {}}


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _empty()
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        # a torn or hand-edited index must not break loading models: keep a copy to look at, start afresh
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".corrupt"))
        log.warning("edgelm's store index %s was unreadable (%s); it was moved to %s.corrupt and a new one started.",
                    path, exc, path.name)
        return _empty()
    out = _empty()
    for key in ("outputs", "folders", "last_used", "verified"):
        if isinstance(data.get(key), dict):
            out[key] = data[key]
    return out


def _write(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True), durable=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock; msvcrt on Windows), held for one read-modify-write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # retries for ~10 s, then raises OSError
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if sys.platform == "win32":
            with contextlib.suppress(OSError):
                import msvcrt

                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)  # closing releases flock


@contextlib.contextmanager
def update() -> Iterator[dict[str, Any]]:
    """Read the index, let the caller change it, write it back atomically, all under the lock."""
    home = edgelm_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / INDEX_NAME
    with _file_lock(home / (INDEX_NAME + ".lock")):
        data = _read(path)
        yield data
        _write(path, data)


def read_index() -> dict[str, Any]:
    """The index as it is now (a copy; empty if there is none)."""
    return _read(index_path())


# --- hooks ----------------------------------------------------------------------------------------------

def record_output(path: str | os.PathLike[str]) -> None:
    """Remember a conversion's output (a GGUF file or an ONNX folder) so `edgelm list` shows it and `edgelm rm`
    can remove it; its folder is remembered too, for `edgelm rm --stale`."""
    key = path_key(path)
    now = time.time()
    with update() as data:
        data["outputs"][key] = {"recorded": now}
        data["folders"][os.path.dirname(key)] = now


def touch(path: str | os.PathLike[str]) -> None:
    """Note that ``path`` was just loaded ("last used" in `edgelm list`).  Never raises: a read-only or full
    disk must not stop a model from loading."""
    try:
        key = path_key(path)
        if any(STALE_NAME.match(part) for part in Path(key).parts):
            return  # a conversion checking its own temporary output: not a model anyone "used"
        with update() as data:
            used = data["last_used"]
            used[key] = time.time()
            if len(used) > MAX_LAST_USED:
                for old in sorted(used, key=used.get)[: len(used) - MAX_LAST_USED]:
                    del used[old]
    except Exception as exc:  # noqa: BLE001 - bookkeeping only
        log.debug("could not record the use of %s: %s", path, exc)


def forget(*paths: str | os.PathLike[str]) -> None:
    """Drop ``paths`` (and anything under them) from the index."""
    keys = [path_key(p) for p in paths]

    def gone(k: str) -> bool:
        return any(k == p or k.startswith(p + os.sep) for p in keys)

    with update() as data:
        for table in ("outputs", "last_used", "verified"):
            for k in [k for k in data[table] if gone(k)]:
                del data[table][k]


def last_used(path: str | os.PathLike[str], index: dict[str, Any] | None = None) -> float | None:
    value = (index or read_index())["last_used"].get(path_key(path))
    return float(value) if isinstance(value, (int, float)) else None


def is_verified(blob: str | os.PathLike[str], digest: str) -> bool:
    """Whether ``blob`` was already checked against ``digest`` and has not changed since (size, mtime)."""
    entry = read_index()["verified"].get(path_key(blob))
    if not isinstance(entry, dict):
        return False
    try:
        st = os.stat(blob)
    except OSError:
        return False
    return entry.get("digest") == digest and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns


def mark_verified(blob: str | os.PathLike[str], digest: str) -> None:
    try:
        st = os.stat(blob)
        with update() as data:
            data["verified"][path_key(blob)] = {"digest": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError as exc:  # the check is redone next time
        log.debug("could not record the verification of %s: %s", blob, exc)
