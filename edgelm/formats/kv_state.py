"""The saved prompt-cache file (``Model.save_state``): one sequence's KV cache and the tokens it holds.

Layout: ``EDGELMKV`` magic, a 4-byte little-endian header length, a JSON header (format version, the identity of
the model/KV type/build it belongs to, token and byte counts), the tokens as int32, then the runtime's opaque
state bytes.  Written to a temporary file and renamed, so a failure never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgelm.errors import StateMismatchError

MAGIC = b"EDGELMKV"
VERSION = 1


def write(path: Path, identity: dict[str, Any], tokens: list[int], blob: bytes | memoryview) -> None:
    import numpy as np

    path = Path(path)
    ids = np.asarray(tokens, dtype=np.int32)
    header = json.dumps({"version": VERSION, **identity, "n_tokens": len(ids), "n_bytes": len(blob)}).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + len(header).to_bytes(4, "little") + header)
            fh.write(ids.tobytes())
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path) -> tuple[dict[str, Any], list[int], bytes]:
    """(header, tokens, state bytes) of a state file; StateMismatchError when it is not one."""
    import numpy as np

    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise StateMismatchError(f"{path} is not an edgelm state file.", fix="Pass a file written by save_state().",
                                 path=str(path))
    n = int.from_bytes(data[8:12], "little")
    try:
        meta = json.loads(data[12 : 12 + n])
        n_tokens = int(meta["n_tokens"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateMismatchError(f"{path} has a corrupt header ({exc}).", fix="Save the state again.",
                                 path=str(path)) from exc
    if int(meta.get("version", 0)) > VERSION:
        raise StateMismatchError(f"{path} was written by a newer edgelm (state version {meta.get('version')}).",
                                 fix="Upgrade edgelm, or save the state again with this one.", path=str(path))
    start = 12 + n
    if len(data) < start + 4 * n_tokens:
        raise StateMismatchError(f"{path} is truncated.", fix="Save the state again.", path=str(path))
    tokens = np.frombuffer(data, dtype=np.int32, count=n_tokens, offset=start).tolist()
    return meta, tokens, data[start + 4 * n_tokens :]


def check_identity(path: Path, meta: dict[str, Any], mine: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Raise StateMismatchError naming the first of ``keys`` where the file's identity differs from ``mine``."""
    for key in keys:
        if meta.get(key) != mine.get(key):
            theirs = meta.get(f"{key}_name", meta.get(key))
            ours = mine.get(f"{key}_name", mine.get(key))
            raise StateMismatchError(f"The state in {path} was saved for {key} {theirs!r}, not {ours!r}.",
                                     fix="Rebuild the state with this model (run the prompt and save_state again).",
                                     path=str(path), mismatch=key)
