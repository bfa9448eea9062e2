"""The local store: what `edgelm list` shows and `edgelm rm` removes.

Two kinds of models live here: what `edgelm pull` (or loading ``ORG/REPO[:QUANT]`` by name) put in the Hugging Face
cache, found by scanning that cache (see :mod:`edgelm.hub.cache`), and the outputs of `edgelm convert`, which the
conversion records in the store's index (:mod:`edgelm.store_index`: one small JSON file under ``$EDGELM_HOME``,
which also remembers when each model was last loaded and which cache blobs were already checked).

The store sits above the Hub cache (it lists and removes what is there) and below the loader; the index sits below
both, so the Hub and the loader write to it without importing the store.

Hooks the rest of edgelm calls (the first two defined in :mod:`edgelm.store_index`, re-exported here):
  - :func:`record_output` after a conversion put its output in place;
  - :func:`touch` when a model is loaded ("last used");
  - :func:`remove_stale` before a conversion writes into a folder (removes what a killed conversion left there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidParameterError, ModelNotFoundError
from .formats.gguf import read_header
from .hub import cached_models, hf_cache_dir, parse_reference, remove_cached
from .optional import available
# the index file and its hooks live one layer down (edgelm.hub and edgelm.loader write to it); re-exported here
from .store_index import (INDEX_NAME, INDEX_VERSION, MAX_LAST_USED, STALE_NAME, edgelm_home, forget,  # noqa: F401
                          index_path, is_verified, last_used, mark_verified, path_key, read_index, record_output,
                          touch, update)

log = logging.getLogger("edgelm.store")

STALE_AFTER_S = 30 * 60  # a conversion's temporary left alone this long (and open nowhere) is a leftover


# --- stale temporaries of killed conversions ------------------------------------------------------------

def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def paths_in_use() -> set[str] | None:
    """Every path a process of ours has open, mapped, as its working folder or on its command line (Linux /proc);
    None where this cannot be known (then only the age of a temporary decides)."""
    proc = Path("/proc")
    if not sys.platform.startswith("linux") or not proc.is_dir():
        return None
    found: set[str] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        base = proc / pid
        with contextlib.suppress(OSError):
            cwd = os.readlink(base / "cwd")
            found.add(cwd)
        with contextlib.suppress(OSError):
            for fd in os.listdir(base / "fd"):
                with contextlib.suppress(OSError):
                    found.add(os.readlink(base / "fd" / fd))
        with contextlib.suppress(OSError):
            for line in (base / "maps").read_text(errors="replace").splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    found.add(parts[5].removesuffix(" (deleted)"))
        with contextlib.suppress(OSError):
            args = (base / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(base / "cwd")
            for raw in args:
                arg = raw.decode(errors="replace")
                if arg:
                    # "--outfile=/x/.y.abc.convert/f.gguf" as well as plain (possibly relative) paths
                    value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
                    found.add(os.path.normpath(os.path.join(cwd, value)))
    return found


def _used(path: Path, in_use: set[str] | None) -> bool:
    if not in_use:
        return False
    key = os.path.abspath(path)
    return any(p == key or p.startswith(key + os.sep) for p in in_use)


def find_stale(folder: str | os.PathLike[str], older_than: float = STALE_AFTER_S,
               in_use: set[str] | None = None) -> list[Path]:
    """Hidden temporaries of conversions in ``folder`` (``.out.gguf.XXXXXXXX.convert``, ``.out.gguf.XXXXXXXX.part``,
    ``.out-onnx.XXXXXXXX.partial``, ``.edgelm-ref-XXXXXXXX``) untouched for ``older_than`` seconds and open nowhere."""
    base = Path(folder).expanduser()
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    now = time.time()
    out = []
    for entry in entries:
        if not STALE_NAME.match(entry.name):
            continue
        try:
            if now - _newest_mtime(entry) < older_than:
                continue
        except OSError:
            continue
        if in_use is None:
            in_use = paths_in_use()
        if _used(entry, in_use):
            continue
        out.append(entry)
    return sorted(out)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale(folder: str | os.PathLike[str], older_than: float = STALE_AFTER_S) -> list[Path]:
    """Remove what killed conversions left in ``folder`` (see :func:`find_stale`) and return what was removed.
    The folder is remembered, so `edgelm rm --stale` looks there too.  Call before a conversion writes there."""
    with contextlib.suppress(OSError):
        with update() as data:
            data["folders"][path_key(folder)] = time.time()
    removed = []
    for path in find_stale(folder, older_than):
        try:
            _delete(path)
            removed.append(path)
        except OSError as exc:
            log.warning("could not remove the stale temporary %s: %s", path, exc)
    return removed


def stale_folders() -> list[Path]:
    """Folders conversions wrote into (and the folders of recorded outputs)."""
    data = read_index()
    folders = set(data["folders"]) | {os.path.dirname(k) for k in data["outputs"]}
    return sorted(Path(f) for f in folders)


def remove_all_stale(folders: list[str | os.PathLike[str]] | None = None, older_than: float = STALE_AFTER_S,
                     *, dry_run: bool = False) -> list[Path]:
    """`edgelm rm --stale`: stale conversion temporaries in every known folder (plus ``folders``), and downloads
    into the Hugging Face cache that were abandoned (``blobs/*.incomplete`` untouched for ``older_than``)."""
    in_use = paths_in_use()
    found: list[Path] = []
    for folder in dict.fromkeys([*stale_folders(), *(Path(f).expanduser() for f in folders or [])]):
        found += find_stale(folder, older_than, in_use=in_use if in_use is not None else set())
    now = time.time()
    for partial in sorted(hf_cache_dir().glob("*/blobs/*.incomplete")):
        with contextlib.suppress(OSError):
            if now - partial.stat().st_mtime >= older_than and not _used(partial, in_use):
                found.append(partial)
    if dry_run:
        return found
    removed = []
    for path in found:
        try:
            _delete(path)
            removed.append(path)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)
    return removed


# --- list and remove ------------------------------------------------------------------------------------

@dataclass
class StoredModel:
    """One row of `edgelm list`."""

    name: str  # what `edgelm run/rm` take: ORG/REPO:QUANT for the Hub cache, the path for a converted output
    format: str  # gguf | onnx
    quant: str | None
    size_bytes: int
    last_used: float | None  # seconds since the epoch, None if never loaded
    path: str
    source: str  # "hub" | "converted"
    repo_id: str | None = None
    revision: str | None = None  # commit
    refs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _output_facts(path: Path) -> tuple[str, str | None, int] | None:
    """(format, quantization, size) of a converted output, or None if it is gone or not a model."""
    try:
        if path.is_file():
            try:
                quant: str | None = read_header(path).quantization
            except Exception:  # noqa: BLE001 - listed anyway, quant unknown
                quant = None
            return "gguf", quant, path.stat().st_size
        if path.is_dir():
            quant = None
            manifest = path / "edgelm.json"
            if manifest.is_file():
                with contextlib.suppress(Exception):
                    quant = json.loads(manifest.read_text(encoding="utf-8")).get("quantization")
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            return "onnx", quant, size
    except OSError:
        return None
    return None


def list_models() -> list[StoredModel]:
    """Models edgelm can run that are on this machine: GGUF files and ONNX folders in the Hugging Face cache, and
    the converted outputs edgelm recorded (those deleted by hand are dropped).  Stale temporaries are never listed."""
    index = read_index()
    rows: list[StoredModel] = []
    for c in cached_models() if available("huggingface_hub") else []:  # without huggingface_hub: outputs only
        rows.append(StoredModel(name=c.name, format=c.format, quant=c.quant, size_bytes=c.size_bytes,
                                last_used=last_used(c.path, index), path=str(c.path), source="hub",
                                repo_id=c.repo_id, revision=c.revision, refs=list(c.refs)))
    gone = []
    for key in sorted(index["outputs"]):
        facts = _output_facts(Path(key))
        if facts is None:
            gone.append(key)
            continue
        fmt, quant, size = facts
        rows.append(StoredModel(name=key, format=fmt, quant=quant, size_bytes=size, last_used=last_used(key, index),
                                path=key, source="converted"))
    if gone:
        with contextlib.suppress(OSError):
            with update() as data:
                for key in gone:
                    data["outputs"].pop(key, None)
    return rows


def remove(name: str) -> list[Path]:
    """`edgelm rm NAME`: ``ORG/REPO:QUANT`` removes that quantization from the Hugging Face cache (its files, and
    the revision once nothing is left in it), ``ORG/REPO`` the whole repository, a path a converted output edgelm
    recorded.  Returns what was removed; raises ModelNotFoundError (listing the names) when nothing matches."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidParameterError(f"Invalid model name: {name!r}.", fix="Pass a name from `edgelm list`.",
                                    parameter="name", value=name)
    key = path_key(name)
    outputs = read_index()["outputs"]
    if key in outputs:
        path = Path(key)
        if path.exists() or path.is_symlink():
            _delete(path)
        forget(key)
        return [path]
    ref = parse_reference(name)
    removed = remove_cached(ref) if ref is not None else []
    if removed:
        forget(*removed)
        return removed
    names = sorted({m.name for m in list_models()})
    if Path(name).expanduser().exists():
        raise ModelNotFoundError(
            f"{name} is not a model edgelm recorded (only `edgelm convert` outputs and pulled models are removed).",
            fix="Delete it yourself if you mean to; `edgelm list` shows what `edgelm rm` can remove.", path=name)
    raise ModelNotFoundError(
        f"No model called {name!r} in the local store.",
        fix=(f"`edgelm list` shows the names: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}."
             if names else "The store is empty: `edgelm pull ORG/REPO:QUANT` downloads a model."), path=name)
