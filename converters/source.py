"""Conversion sources: a local folder or file, or a Hugging Face Hub id resolved through the HF cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgelm.errors import BackendNotInstalledError, HubError, InvalidSourceError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(src: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """A local path as it is; a Hub id ("org/name") as its snapshot folder in the HF cache, downloaded unless
    HF_HUB_OFFLINE is set (then only the cache is used)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    text = str(src)
    if not HUB_ID.match(text):
        raise InvalidSourceError(f"Conversion source not found: {path} does not exist and is not a Hub id.",
                                 fix="Pass a Hugging Face model folder, a .gguf file, or an id like org/name.",
                                 path=str(path))
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as exc:
        raise BackendNotInstalledError("Hub ids need huggingface-hub, which is not installed.",
                                       fix='pip install "edgelm[convert]"') from exc
    offline = hub_offline()
    # read the cache location now, not when huggingface_hub was first imported (the environment may have changed)
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if "HF_HOME" in os.environ
                                                else None)
    try:
        folder = snapshot_download(text, revision=revision, local_files_only=offline, cache_dir=cache,
                                   allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.gguf",
                                                   "*.py", "*.bin"])
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise HubError(f"{text}{'@' + revision if revision else ''} is not in the Hugging Face cache and {why}.",
                       fix="Download it once on a connected machine (huggingface-cli download ID), copy the HF cache "
                       "(HF_HOME), or pass a local folder.", repo=text) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise HubError(f"Hub id {text!r} (revision {revision or 'main'}) was not found: {exc}.",
                       fix="Check the id and revision, and HF_TOKEN for gated models.", repo=text) from exc
    except Exception as exc:  # network failures
        raise HubError(f"Could not fetch {text!r} from the Hugging Face Hub: {exc}.",
                       fix="Set HF_HUB_OFFLINE=1 to use the cache only, or pass a local folder.", repo=text) from exc
    return Path(folder)
