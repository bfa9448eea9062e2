"""A Hub id that names a Hugging Face checkpoint (config.json + safetensors, not GGUF or ONNX): its facts for a plan,
from the snapshot in the cache or, online, from the Hub itself by range requests (no weights downloaded).

GGUF and ONNX repositories are not planned from here: they are pulled (:mod:`edgelm.hub.download`) and planned from
the file, as `edgelm.load` would run them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HubError, UnsupportedModelError
from ..formats import hf
from ..optional import available
from ..plan import ModelFacts, config_facts
from .cache import find_cached, hf_cache_dir, hub_endpoint, hub_offline
from .reference import parse_reference


def hub_checkpoint(name: str) -> Path | ModelFacts | None:
    """A Hub id naming a Hugging Face checkpoint: its snapshot folder in the HF cache, or (online, not cached) its
    facts read from the Hub (config.json and the safetensors headers, by range requests: no weights downloaded).
    None when ``name`` is no Hub id, or names a GGUF / ONNX repository (edgelm.hub pulls those)."""
    ref = parse_reference(name)
    if ref is None or ref.quant or not available("huggingface_hub"):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.repo_id, hf.CONFIG, cache_dir=str(hf_cache_dir()))
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        if _runnable_files(snapshot):
            return None
        if hf.is_checkpoint(snapshot):
            return snapshot
    if hub_offline():
        return None  # edgelm.hub says what is missing from the cache
    if find_cached(ref, verify=False) is not None:
        return None  # a GGUF or ONNX copy in the cache: edgelm.hub serves it, without asking the Hub
    return _remote_checkpoint(ref.repo_id, hub_endpoint(), str(hf_cache_dir()))


def _runnable_files(snapshot: Path) -> bool:
    return any(any(snapshot.rglob(pattern)) for pattern in ("*.gguf", "edgelm.json", "genai_config.json"))


def _remote_checkpoint(repo_id: str, endpoint: str, cache: str) -> ModelFacts | None:
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(endpoint=endpoint, library_name="edgelm")
    try:
        info = api.model_info(repo_id, timeout=10)
        files = [s.rfilename for s in info.siblings or []]
        if any(f.endswith(".gguf") or f.rsplit("/", 1)[-1] in ("edgelm.json", "genai_config.json") for f in files):
            return None
        if hf.CONFIG not in files or not any(f.endswith(".safetensors") for f in files):
            return None
        config = hf.read_config(Path(hf_hub_download(repo_id, hf.CONFIG, cache_dir=cache, endpoint=endpoint)).parent)
        meta = api.get_safetensors_metadata(repo_id)
    except Exception as exc:  # the Hub unreachable, a gated repository, ...: edgelm.hub reports it
        if isinstance(exc, (UnsupportedModelError, HubError)):
            raise
        return None
    headers = [{name: {"dtype": t.dtype, "shape": t.shape, "data_offsets": t.data_offsets}
                for name, t in fm.tensors.items()} for fm in meta.files_metadata.values()]
    return config_facts(repo_id, config, hf.tensor_summary(headers), repo_id)
