"""Checking files from the Hub: a blob is named after its sha256 (LFS files) or git blob id (small files), so its
content is checked against its own name; the store's index remembers what was checked, until the blob changes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from ..errors import DownloadCorruptError
from ..store_index import is_verified, mark_verified
from .progress import Progress, bar


def digest(path: Path, etag: str, progress: Progress = False) -> str:
    """sha256 (LFS files) or git blob sha1 (small files), as the Hub's etag for the file is one or the other."""
    size = path.stat().st_size
    if len(etag) == 40:
        h = hashlib.sha1(b"blob %d\0" % size)  # noqa: S324 - git's object id, not a security hash
    else:
        h = hashlib.sha256()
    shown = bar(progress, f"checking {path.name[:24]}", size) if size > (256 << 20) else None
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
            if shown is not None:
                shown.update(len(chunk))
    if shown is not None:
        shown.close()
    return h.hexdigest()


def checkable(etag: str) -> bool:
    """Whether ``etag`` is a sha256 or a git blob id (a content hash to check against), not some other ETag."""
    return bool(re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", etag))


def _blob_of(pointer: Path) -> Path:
    """The repository's ``blobs/<etag>`` entry a snapshot file links to: the first symlink hop only (that entry may
    itself link into huggingface_hub's shared store, whose names are Xet hashes, not sha256)."""
    if not pointer.is_symlink():
        return pointer  # no symlinks on this system: huggingface_hub copied the file into the snapshot
    return Path(os.path.abspath(pointer.parent / os.readlink(pointer)))


def verify_cached(pointer: Path, name: str = "ORG/REPO:QUANT") -> None:
    """Check a cached file against the sha256 (or git blob id) its blob is named after, once per change of the blob
    (remembered in edgelm's store index).  A mismatch deletes the blob and the snapshot's link to it and raises."""
    blob = _blob_of(pointer)
    etag = blob.name
    if not checkable(etag) or is_verified(blob, etag):
        return
    actual = digest(blob, etag)
    if actual != etag:
        with contextlib.suppress(OSError):
            blob.unlink()
        with contextlib.suppress(OSError):
            pointer.unlink()
        raise DownloadCorruptError(
            f"The cached file {pointer} does not match its {'sha256' if len(etag) == 64 else 'git id'} ({actual} "
            f"instead of {etag}): it was truncated or corrupted, and has been deleted.",
            fix=f"Pull it again: edgelm pull {name}", path=str(pointer), expected=etag, actual=actual)
    mark_verified(blob, etag)
