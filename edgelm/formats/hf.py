"""Hugging Face checkpoint folders: config.json and safetensors headers, read without loading any weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def safetensors_header(path: Path) -> dict:
    """The JSON header of one .safetensors file (tensor names, dtypes, shapes, offsets)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def count_parameters(folder: Path) -> int:
    """Parameter count of a checkpoint from its safetensors headers (no weights are read); 0 without any."""
    total = 0
    for f in Path(folder).glob("*.safetensors"):
        for name, t in safetensors_header(f).items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total
