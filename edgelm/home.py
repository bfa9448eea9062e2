"""edgelm's own folder on this machine (the store's index, measured step costs, header indexes, converted models).

It sits in the bottom layer so that every layer, the file formats included, finds the folder the same way.
"""

from __future__ import annotations

import os
from pathlib import Path


def edgelm_home() -> Path:
    """edgelm's own folder: $EDGELM_HOME, else $XDG_CACHE_HOME/edgelm, else ~/.cache/edgelm (read at each call)."""
    if os.environ.get("EDGELM_HOME"):
        return Path(os.environ["EDGELM_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "edgelm"
