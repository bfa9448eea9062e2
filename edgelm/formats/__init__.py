"""File formats edgelm reads and writes, one module each, and the facts that come with them.

``gguf`` (header reader, type tables, bits per weight, attention shape and the KV-size formula), ``onnx_folder``
(the ONNX model folder: manifest, validation, KV length), ``hf`` (Hugging Face checkpoint folders: config,
safetensors headers), ``kv_state`` (saved prompt caches).  Runtimes, converters, plans and the CLI import these;
nothing here imports them back.  Only the standard library and numpy are needed at import time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgelm.errors import InsufficientDiskSpaceError


def disk_size(path: str | Path) -> int:
    """Bytes a model file or folder takes (a folder: every file under it)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def ensure_free_space(where: str | Path, need: int, what: str) -> None:
    """Raise :class:`InsufficientDiskSpaceError` unless ``where`` has ``need`` bytes free for ``what``."""
    free = shutil.disk_usage(where).free
    if free < need:
        raise InsufficientDiskSpaceError(
            f"{what} needs about {need / 2**20:.0f} MiB in {where}, but only {free / 2**20:.0f} MiB is free.",
            fix="Free some space, or write the output to another disk.", needed=need, free=free, path=str(where))
