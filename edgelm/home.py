"""edgelm's own folder on this machine (the store's index, measured step costs, header indexes, converted models).

It sits in the bottom layer so that every layer, the file formats included, finds the folder the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def edgelm_home() -> Path:
    """edgelm's own folder: $EDGELM_HOME, else $XDG_CACHE_HOME/edgelm, else ~/.cache/edgelm (read at each call)."""
    if os.environ.get("EDGELM_HOME"):
        return Path(os.environ["EDGELM_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "edgelm"


def write_atomic(path: Path, text: str, *, durable: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all: into a temporary file of its own beside it (two
    processes never share one), then renamed over it; ``durable`` flushes it to the disk first (fsync), for a file
    whose loss would lose the user's bookkeeping.  The folder is made if missing; on failure the temporary is gone
    and the error raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
