"""The Hugging Face cache, as edgelm reads it: where it is (HF_HUB_CACHE, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE, all
read at each call, never at import), what models it holds, finding one without the network, and removing one.

The layout is huggingface_hub's own (``models--ORG--REPO/{blobs,snapshots,refs}``), so a cache filled by
huggingface_hub, transformers or `hf download` serves edgelm too, and the other way round.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import DoesNotFitError, HubError
from ..optional import require
from ..plan import RECOMMEND_DEFAULTS, ModelFacts, file_facts
from .choice import Candidate, Choice, candidates, choose, match
from .reference import Reference, as_reference
from .verify import verify_cached

DEFAULT_ENDPOINT = "https://huggingface.co"


# --- environment (read at each call, never at import) ----------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "huggingface" / "hub"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def hf() -> ModuleType:
    """huggingface_hub, or BackendNotInstalledError naming the "hub" extra."""
    return require("huggingface_hub", extra="hub", purpose="Loading models by name (ORG/REPO[:QUANT])",
                   install='Install it with: pip install "edgelm[hub]" (or pass a local file or folder).')


def storage_dir(cache: Path, repo_id: str) -> Path:
    """A repository's folder in the cache: ``models--ORG--REPO``."""
    return cache / ("models--" + repo_id.replace("/", "--"))


# --- finding a model in the cache (no network) ------------------------------------------------------------

def _snapshot_files(snapshot: Path) -> dict[str, int]:
    out = {}
    for p in snapshot.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():  # follows the symlink to the blob; a broken one is skipped
                out[p.relative_to(snapshot).as_posix()] = p.stat().st_size
    return out


def _cached_commits(storage: Path, revision: str | None) -> list[str]:
    snapshots = storage / "snapshots"
    if not snapshots.is_dir():
        return []
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return [revision] if (snapshots / revision).is_dir() else []
    ref = storage / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
        return [commit] if (snapshots / commit).is_dir() else []
    if revision:
        return []
    # pulled only at other revisions: the newest snapshot
    return [p.name for p in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True) if p.is_dir()]


@dataclass
class Pulled:
    """What :func:`edgelm.hub.pull_model` fetched (or :func:`find_cached` found in the cache)."""

    path: Path  # the .gguf (first part) or the ONNX folder, in the cache's snapshot folder
    reference: Reference
    candidate: Candidate
    revision: str  # commit
    reason: str
    downloaded_bytes: int = 0
    from_cache: bool = False

    @property
    def name(self) -> str:
        """The name it is served and listed under: ORG/REPO:QUANT."""
        return f"{self.reference.repo_id}:{self.candidate.label}" if self.candidate.label else self.reference.repo_id


def find_cached(ref: Reference | str, revision: str | None = None, *, profile: str = RECOMMEND_DEFAULTS.profile,
                host: Any = None, verify: bool = True) -> Pulled | None:
    """``ref`` in the Hugging Face cache (no network), checked against its sha256; None if it is not there."""
    ref = as_reference(ref)
    cache = hf_cache_dir()
    storage = storage_dir(cache, ref.repo_id)
    for commit in _cached_commits(storage, revision):
        snapshot = storage / "snapshots" / commit
        cands = [c for c in candidates(_snapshot_files(snapshot)) if not c.missing]
        if ref.quant:
            found = match(ref, cands)
            if len(found) != 1:
                continue
            choice = Choice(found[0], f"{found[0].label or 'the ONNX folder'} from the cache.")
        elif not cands:
            continue
        else:
            try:
                choice = choose(ref, cands, facts=lambda c: _local_facts(snapshot, c), profile=profile, host=host,
                                where=f"the cached copy of {ref.repo_id}")
            except (HubError, DoesNotFitError):
                continue
        c = choice.candidate
        if verify:
            for f in c.files:
                verify_cached(snapshot / f, f"{ref.repo_id}:{c.label}" if c.label else ref.repo_id)
        path = snapshot / c.entry if c.entry != "." else snapshot
        return Pulled(path, ref, c, commit, choice.reason, from_cache=True)
    return None


def _local_facts(snapshot: Path, c: Candidate) -> ModelFacts:
    return file_facts(snapshot / c.entry)


def cached_labels(ref: Reference) -> list[str]:
    """The quantizations (or ONNX folders) of ``ref.repo_id`` the cache has, at any revision."""
    storage = storage_dir(hf_cache_dir(), ref.repo_id)
    labels: set[str] = set()
    for commit in _cached_commits(storage, None):
        labels |= {c.label or "(top folder)" for c in candidates(_snapshot_files(storage / "snapshots" / commit))
                   if not c.missing}
    return sorted(labels)


# --- listing and removing cached models ------------------------------------------------------------------

@dataclass
class CachedModel:
    name: str
    format: str
    quant: str | None
    size_bytes: int
    path: Path
    repo_id: str
    revision: str
    refs: list[str]
    files: list[Any]  # huggingface_hub CachedFileInfo


def cached_models() -> list[CachedModel]:
    """GGUF files and ONNX folders in the Hugging Face cache (huggingface_hub's cache scan), complete ones only."""
    hf()
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except (CacheNotFound, ValueError):
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            by_path = {f.file_path.relative_to(rev.snapshot_path).as_posix(): f for f in rev.files}
            for c in candidates({p: f.size_on_disk for p, f in by_path.items()}):
                if c.missing:
                    continue
                name = f"{repo.repo_id}:{c.label}" if c.label else repo.repo_id
                path = rev.snapshot_path / c.entry if c.entry != "." else rev.snapshot_path
                out.append(CachedModel(name, c.format, c.quant, c.size_bytes, path, repo.repo_id, rev.commit_hash,
                                       sorted(rev.refs), [by_path[p] for p in c.files]))
    return out


def remove_cached(ref: Reference) -> list[Path]:
    """Remove ``ref`` from the Hugging Face cache through huggingface_hub's cache API: ``ORG/REPO`` every revision,
    ``ORG/REPO:QUANT`` that quantization's files (a revision left empty goes too).  Returns the paths removed."""
    hf()
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = hf_cache_dir()
    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, ValueError):
        return []
    repos = [r for r in info.repos if r.repo_type == "model" and r.repo_id.lower() == ref.repo_id.lower()]
    if not repos:
        return []
    if ref.quant is None:
        revisions = [rev for r in repos for rev in r.revisions]
        info.delete_revisions(*(rev.commit_hash for rev in revisions)).execute()
        return [r.repo_path for r in repos]
    matched = [m for m in cached_models() if m.repo_id.lower() == ref.repo_id.lower()
               and (m.quant or "").lower() == ref.quant.lower() or m.name.lower() == ref.name.lower()]
    if not matched:
        return []
    files = [f for m in matched for f in m.files]
    info.delete_files(*files).execute()
    removed = [m.path for m in matched]
    # a revision with nothing left in it goes too (with its refs), so the cache stays consistent
    info = scan_cache_dir(cache)
    empty = [rev.commit_hash for r in info.repos if r.repo_id.lower() == ref.repo_id.lower()
             for rev in r.revisions if not rev.files]
    if empty:
        info.delete_revisions(*empty).execute()
    return removed
