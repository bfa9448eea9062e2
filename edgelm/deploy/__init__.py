"""Offline bundles for a device (``edgelm bundle``, ``edgelm verify``): :mod:`.api` builds and checks them,
:mod:`.crossbuild` compiles llama.cpp for the device's CPU, :mod:`.wheels` gathers the device's wheels,
:mod:`.manifest` hashes every file, :mod:`.scripts` writes install.sh, the launcher and the systemd unit."""

from __future__ import annotations

from .api import BUNDLE, BundleOptions, BundleReport, VerifyReport, bundle, verify_bundle

__all__ = ["bundle", "verify_bundle", "BundleOptions", "BundleReport", "VerifyReport", "BUNDLE"]
