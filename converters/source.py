"""Conversion sources: a local folder or file, or a Hugging Face Hub id resolved through the HF cache."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from edgelm.errors import HubError, InvalidSourceError, UnsafeWeightsError
from edgelm.optional import require

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
    hub = require("huggingface_hub", extra="convert", purpose="Converting from a Hub id")
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    offline = hub_offline()
    # read the cache location now, not when huggingface_hub was first imported (the environment may have changed)
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if "HF_HOME" in os.environ
                                                else None)
    try:
        folder = hub.snapshot_download(text, revision=revision, local_files_only=offline, cache_dir=cache,
                                       allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                       "*.gguf", "*.py", "*.bin"])
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


PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")


def read_checkpoint(source_dir: Path, *, tokenizer_files: tuple[str, ...], tokenizer_why: str,
                    allow_pickle: bool = False) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint folder, after checking that it names an architecture, has one of
    ``tokenizer_files`` and has weights it is safe to read.  Pickle weights (*.bin, *.pt) can run code when loaded:
    refused unless ``allow_pickle``."""
    if not source_dir.is_dir():
        raise InvalidSourceError(f"{source_dir} is not a folder.", fix="Pass a Hugging Face checkpoint folder "
                                 "(config.json, *.safetensors, tokenizer files).", path=str(source_dir))
    cfg_path = source_dir / "config.json"
    if not cfg_path.is_file():
        raise InvalidSourceError(f"{source_dir} has no config.json, so it is not a Hugging Face checkpoint.",
                                 fix="Pass the folder that holds config.json and the weights.", path=str(source_dir))
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSourceError(f"{cfg_path} is not valid JSON ({exc}).", fix="Restore the file from the source.",
                                 path=str(cfg_path)) from exc
    if not isinstance(config, dict) or not config.get("architectures"):
        raise InvalidSourceError(f"{cfg_path} names no architecture (the 'architectures' list is missing).",
                                 fix="Use the config.json the model was published with.", path=str(cfg_path))
    if not any((source_dir / name).is_file() for name in tokenizer_files):
        raise InvalidSourceError(
            f"{source_dir} has no {' / '.join(tokenizer_files)}; {tokenizer_why}.",
            fix="Copy the tokenizer files from the original model, or save them with transformers: "
            "AutoTokenizer.from_pretrained(original).save_pretrained(folder).", path=str(source_dir))
    if not any(source_dir.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in source_dir.glob(pattern))
        if not pickles:
            raise InvalidSourceError(f"{source_dir} has no weights (*.safetensors).",
                                     fix="Pass a complete checkpoint folder.", path=str(source_dir))
        if not allow_pickle:
            raise UnsafeWeightsError(
                f"{source_dir} holds only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded.",
                fix="Convert them to safetensors from a source you trust (transformers: model.save_pretrained(dir)), "
                "or pass --allow-pickle (allow_pickle=True) if you trust this one.", path=str(source_dir))
    return config
