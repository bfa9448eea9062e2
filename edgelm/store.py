"""The local store: what `edgelm list` shows and `edgelm rm` removes.

Two kinds of models live here: what `edgelm pull` (or loading ``ORG/REPO[:QUANT]`` by name) put in the Hugging Face
cache, found by scanning that cache (see :mod:`edgelm.hub`), and the outputs of `edgelm convert`, which the
conversion records here (:func:`record_output`).  The index is one small JSON file under ``$EDGELM_HOME`` (default
``$XDG_CACHE_HOME/edgelm``, i.e. ``~/.cache/edgelm``): recorded outputs, the folders conversions wrote into, when
each model was last loaded (:func:`touch`) and which cache blobs were already checked against their sha256.  It is
rewritten atomically (temporary file + rename) under a lock file, so concurrent writers do not lose each other's
entries, and a corrupt index is set aside and started afresh rather than failing a load.

Hooks the rest of edgelm calls:
  - :func:`record_output` after a conversion put its output in place;
  - :func:`touch` when a model is loaded ("last used");
  - :func:`remove_stale` before a conversion writes into a folder (removes what a killed conversion left there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("edgelm.store")

INDEX_VERSION = 1
INDEX_NAME = "store.json"
STALE_AFTER_S = 30 * 60  # a conversion's temporary left alone this long (and open nowhere) is a leftover
MAX_LAST_USED = 2000  # entries kept in the "last used" table (oldest dropped first)

# hidden temporaries of conversions: tempfile.mkdtemp/mkstemp(prefix=".{name}.", suffix=...) -> .out.gguf.k2j4_x9a.convert,
# and the fp32 reference an ONNX conversion scores against (TemporaryDirectory(prefix=".edgelm-ref-"))
STALE_NAME = re.compile(r"^\.(?:.+\.[a-z0-9_]{6,12}\.(?:convert|part|partial)|edgelm-ref-[a-z0-9_]{6,12})$")


def edgelm_home() -> Path:
    """edgelm's own folder: $EDGELM_HOME, else $XDG_CACHE_HOME/edgelm, else ~/.cache/edgelm (read at each call)."""
    if os.environ.get("EDGELM_HOME"):
        return Path(os.environ["EDGELM_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "edgelm"


def index_path() -> Path:
    return edgelm_home() / INDEX_NAME


def _key(path: str | os.PathLike[str]) -> str:
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock; msvcrt on Windows), held for one read-modify-write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # retries for ~10 s, then raises OSError
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if os.name == "nt":
            with contextlib.suppress(OSError):
                import msvcrt

                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)  # closing releases flock


@contextlib.contextmanager
def _update() -> Iterator[dict[str, Any]]:
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
    key = _key(path)
    now = time.time()
    with _update() as data:
        data["outputs"][key] = {"recorded": now}
        data["folders"][os.path.dirname(key)] = now


def touch(path: str | os.PathLike[str]) -> None:
    """Note that ``path`` was just loaded ("last used" in `edgelm list`).  Never raises: a read-only or full
    disk must not stop a model from loading."""
    try:
        key = _key(path)
        if any(STALE_NAME.match(part) for part in Path(key).parts):
            return  # a conversion checking its own temporary output: not a model anyone "used"
        with _update() as data:
            used = data["last_used"]
            used[key] = time.time()
            if len(used) > MAX_LAST_USED:
                for old in sorted(used, key=used.get)[: len(used) - MAX_LAST_USED]:
                    del used[old]
    except Exception as exc:  # noqa: BLE001 - bookkeeping only
        log.debug("could not record the use of %s: %s", path, exc)


def forget(*paths: str | os.PathLike[str]) -> None:
    """Drop ``paths`` (and anything under them) from the index."""
    keys = [_key(p) for p in paths]

    def gone(k: str) -> bool:
        return any(k == p or k.startswith(p + os.sep) for p in keys)

    with _update() as data:
        for table in ("outputs", "last_used", "verified"):
            for k in [k for k in data[table] if gone(k)]:
                del data[table][k]


def last_used(path: str | os.PathLike[str], index: dict[str, Any] | None = None) -> float | None:
    value = (index or read_index())["last_used"].get(_key(path))
    return float(value) if isinstance(value, (int, float)) else None


def is_verified(blob: str | os.PathLike[str], digest: str) -> bool:
    """Whether ``blob`` was already checked against ``digest`` and has not changed since (size, mtime)."""
    entry = read_index()["verified"].get(_key(blob))
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
        with _update() as data:
            data["verified"][_key(blob)] = {"digest": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError as exc:  # the check is redone next time
        log.debug("could not record the verification of %s: %s", blob, exc)


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
        with _update() as data:
            data["folders"][_key(folder)] = time.time()
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
    from .hub import hf_cache_dir

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
            from edgelm.formats.gguf import read_header

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
    try:
        from .hub import cached_models

        for c in cached_models():
            rows.append(StoredModel(name=c.name, format=c.format, quant=c.quant, size_bytes=c.size_bytes,
                                    last_used=last_used(c.path, index), path=str(c.path), source="hub",
                                    repo_id=c.repo_id, revision=c.revision, refs=list(c.refs)))
    except ImportError:  # huggingface_hub missing: only converted outputs
        pass
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
            with _update() as data:
                for key in gone:
                    data["outputs"].pop(key, None)
    return rows


def remove(name: str) -> list[Path]:
    """`edgelm rm NAME`: ``ORG/REPO:QUANT`` removes that quantization from the Hugging Face cache (its files, and
    the revision once nothing is left in it), ``ORG/REPO`` the whole repository, a path a converted output edgelm
    recorded.  Returns what was removed; raises ModelNotFoundError (listing the names) when nothing matches."""
    from .errors import InvalidParameterError, ModelNotFoundError

    if not isinstance(name, str) or not name.strip():
        raise InvalidParameterError(f"Invalid model name: {name!r}.", fix="Pass a name from `edgelm list`.",
                                    parameter="name", value=name)
    key = _key(name)
    outputs = read_index()["outputs"]
    if key in outputs:
        path = Path(key)
        if path.exists() or path.is_symlink():
            _delete(path)
        forget(key)
        return [path]
    from .hub import parse_reference, remove_cached

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
