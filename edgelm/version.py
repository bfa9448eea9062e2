"""edgelm's version, as installed (one place: the package, the CLI's --version and the server's /api/version)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("edgelm")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
