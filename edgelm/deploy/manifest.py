"""A bundle's manifest: the sha256 and size of every file, and the facts the device side checks.

``manifest.json`` holds the facts (model, licence, chat template, plan, target) and ``files``: path -> sha256 and
size, for every file of the bundle but itself and ``SHA256SUMS``.  ``SHA256SUMS`` repeats the hashes in the format
``sha256sum --check`` reads (install.sh checks with it, so the device needs no Python to refuse a damaged copy) and
covers manifest.json too.  :func:`check_files` is the same check in Python (``edgelm verify``): changed, missing and
extra files, each named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from edgelm.errors import BundleCorruptError

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
FORMAT = "edgelm-bundle/1"
CHUNK = 1 << 20

Progress = Callable[[str, float], None]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(root: Path) -> Iterator[str]:
    """Every regular file under ``root`` as a POSIX relative path, sorted; the manifest and SHA256SUMS left out."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in (MANIFEST, SUMS):
            yield rel


def hash_files(root: Path, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    names = list(bundle_files(root))
    out = {}
    for i, rel in enumerate(names):
        if progress:
            progress(f"hashing {rel}", i / max(1, len(names)))
        path = root / rel
        out[rel] = {"sha256": sha256(path), "size": path.stat().st_size}
    return out


def write(root: Path, facts: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    """Write manifest.json (``facts`` + the hash of every file) and SHA256SUMS into ``root``; return the manifest."""
    manifest = {"format": FORMAT, **facts, "files": hash_files(root, progress)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    lines = [f"{entry['sha256']}  {rel}" for rel, entry in manifest["files"].items()]
    lines.append(f"{sha256(root / MANIFEST)}  {MANIFEST}")
    (root / SUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def read(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleCorruptError(f"{root} has no {MANIFEST}: it is not an edgelm bundle (or an incomplete copy).",
                                 fix="Pass the folder `edgelm bundle -o` wrote, copied whole.",
                                 files=[MANIFEST]) from None
    except ValueError as exc:
        raise BundleCorruptError(f"{path} is not valid JSON ({exc}).", fix="Copy the bundle again.",
                                 files=[MANIFEST]) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"),
                                                                                            dict):
        raise BundleCorruptError(f"{path} is not an {FORMAT} manifest (format {manifest.get('format')!r}).",
                                 fix="Build the bundle again with this edgelm version.", files=[MANIFEST])
    return manifest


def check_files(root: Path, manifest: dict[str, Any], progress: Progress | None = None) -> int:
    """Raise BundleCorruptError naming every file that differs from the manifest, is missing, or is not in it;
    return the number of files checked."""
    expected: dict[str, dict[str, Any]] = manifest["files"]
    changed, missing = [], []
    for i, (rel, entry) in enumerate(expected.items()):
        if progress:
            progress(f"checking {rel}", i / max(1, len(expected)))
        path = root / rel
        if not path.is_file():
            missing.append(rel)
        elif path.stat().st_size != entry["size"] or sha256(path) != entry["sha256"]:
            changed.append(rel)
    extra = [rel for rel in bundle_files(root) if rel not in expected]
    sums = root / SUMS
    if sums.is_file():
        listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0]
                  for line in sums.read_text(encoding="utf-8").splitlines() if "  " in line}
        if listed.get(MANIFEST) != sha256(root / MANIFEST):
            changed.append(MANIFEST)
    else:
        missing.append(SUMS)
    if changed or missing or extra:
        parts = [f"{label}: {', '.join(names)}" for label, names in
                 (("changed", changed), ("missing", missing), ("not in the manifest", extra)) if names]
        raise BundleCorruptError(f"The bundle {root} does not match its manifest ({'; '.join(parts)}).",
                                 fix="Copy the bundle again from the machine that built it (or build it again with "
                                 "`edgelm bundle`); never edit a bundle in place.",
                                 files=changed + missing + extra, changed=changed, missing=missing, extra=extra)
    return len(expected)
