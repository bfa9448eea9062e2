"""Remove decoder blocks from a GGUF file directly: tensors ``blk.N.*`` of the removed blocks left out, the others
renumbered, ``{arch}.block_count`` (and any per-block metadata array) updated; every other byte is copied.

Why: the measurements compare the original with models that only lack some blocks (the pruned-not-healed model,
each point of the chart).  Converting each from a Hugging Face checkpoint costs a child process with torch, seconds
to minutes; cutting the original's q8_0 GGUF gives the same file (q8_0 quantizes each row on its own, so a kept
block's tensors are the same bytes either way) in milliseconds.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Sequence

from edgelm.formats.gguf import _ARRAY, _SCALARS, _Reader, read_header

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_UINT32, _ALIGN_KEY = 4, "general.alignment"


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def drop_blocks(src: str | os.PathLike[str], dst: str | os.PathLike[str], drop: Sequence[int]) -> Path:
    """Write ``dst``: the GGUF ``src`` without the decoder blocks ``drop`` (indices in ``src``)."""
    header = read_header(src)
    arch = header.architecture
    n = int(header.metadata.get(f"{arch}.block_count", 0))
    removed = set(int(i) for i in drop)
    if not n or not removed <= set(range(n)):
        raise ValueError(f"{src}: cannot remove blocks {sorted(removed)} of {n}")
    kept = [i for i in range(n) if i not in removed]
    renumber = {old: new for new, old in enumerate(kept)}
    alignment = int(header.metadata.get(_ALIGN_KEY, 32) or 32)

    with open(src, "rb") as fh:
        buf = fh.read(header.data_offset)
        r = _Reader(buf, Path(src))
        r.pos = 4 + 4 + 8 + 8
        kv = bytearray()
        for _ in range(len(header.metadata)):
            start = r.pos
            key = r.string()
            type_id = r.scalar("<I")
            value_at = r.pos
            value = r.value(type_id)
            if key == f"{arch}.block_count":
                kv += _string(key) + struct.pack("<I", type_id) + struct.pack(_scalar(type_id), len(kept))
            elif (type_id == _ARRAY and isinstance(value, tuple) and len(value) == n
                  and struct.unpack_from("<I", buf, value_at)[0] in _SCALARS):
                item = struct.unpack_from("<I", buf, value_at)[0]  # a per-block array (e.g. head counts)
                kept_values = struct.pack(f"<{len(kept)}{_SCALARS[item][1:]}", *(value[i] for i in kept))
                kv += (_string(key) + struct.pack("<IIQ", type_id, item, len(kept)) + kept_values)
            else:
                kv += buf[start:r.pos]
        infos = bytearray()
        pieces: list[tuple[int, int]] = []  # (offset in src data, bytes) in the new order
        offset = 0
        count = 0
        for t in header.tensors:
            m = _BLOCK.match(t.name)
            name = t.name
            if m:
                block = int(m.group(1))
                if block in removed:
                    continue
                name = f"blk.{renumber[block]}.{m.group(2)}"
            nbytes = t.n_bytes
            if nbytes is None:
                raise ValueError(f"{src}: tensor {t.name} has a type this writer does not know")
            infos += _string(name) + struct.pack("<I", len(t.shape)) + b"".join(struct.pack("<Q", d) for d in t.shape)
            infos += struct.pack("<IQ", t.type_id, offset)
            pieces.append((t.offset, nbytes))
            offset += (nbytes + alignment - 1) // alignment * alignment
            count += 1
        head = b"GGUF" + struct.pack("<IQQ", header.version, count, len(header.metadata)) + bytes(kv) + bytes(infos)
        head += b"\0" * (-len(head) % alignment)

        out = Path(dst)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as w:
                w.write(head)
                for src_offset, nbytes in pieces:
                    fh.seek(header.data_offset + src_offset)
                    w.write(fh.read(nbytes))
                    w.write(b"\0" * (-nbytes % alignment))
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    read_header(out)  # the result checks as a whole file
    return out


def _scalar(type_id: int) -> str:
    return _SCALARS.get(type_id, "<I")
