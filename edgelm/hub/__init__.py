"""Models by name: ``ORG/REPO[:QUANT]`` pulled from the Hugging Face Hub into its cache, like `ollama pull`.

    path = edgelm.pull("bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")   # the .gguf in the HF cache
    m = edgelm.load("bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")      # pulls on first use, then offline

A GGUF repository gives one file per quantization; ``:QUANT`` picks it by name (case-insensitive, matched against
the quantization in the file names, or a file name itself); without it the largest that fits this device is taken
(weights + KV cache + runtime overhead with head-room: :func:`edgelm.recommend`'s own arithmetic).  Split files
(``name-00001-of-00003.gguf``) are fetched together and the first part returned (llama.cpp opens the rest).  An
ONNX repository (``edgelm.json`` or ``genai_config.json`` at the top or in a sub-folder) gives that folder.

Downloads go through huggingface_hub (its HTTP client, headers, token, progress bars and cache layout: HF_HOME,
HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_OFFLINE, all read at each call).  Unlike ``hf_hub_download`` (which starts a
killed download over), a partial download is kept as ``blobs/<sha256>.incomplete`` and resumed with a range
request; every file is checked against its LFS sha256 (or git blob id) before it is used, and one that does not
match is deleted and reported (:class:`~edgelm.errors.DownloadCorruptError`).  Loading by name uses the cached copy
without asking the Hub; ``edgelm pull`` asks for the newest revision.

One module per job, each importing only those above it in this list (and :mod:`edgelm.plan`, :mod:`edgelm.store_index`
below the package):

- :mod:`.reference`  -- ``ORG/REPO[:QUANT]`` parsed (:class:`Reference`, :func:`parse_reference`);
- :mod:`.choice`     -- what a repository offers (:func:`candidates`, :func:`quant_label`) and which to fetch
  (:func:`choose`: by name, or the largest that fits the device);
- :mod:`.progress`   -- progress bars and notes;
- :mod:`.verify`     -- files checked against their sha256 / git id (:func:`verify_cached`);
- :mod:`.cache`      -- the Hugging Face cache: where it is, :func:`find_cached`, :func:`cached_models`,
  :func:`remove_cached`;
- :mod:`.download`   -- :func:`pull`, :func:`pull_model`, and the hooks the loader and the server call
  (:func:`resolve_reference`, :func:`served_reference`);
- :mod:`.checkpoint` -- a Hub id naming a Hugging Face checkpoint: its facts for a plan, without the weights.
"""

from __future__ import annotations

from .cache import (DEFAULT_ENDPOINT, CachedModel, Pulled, cached_labels, cached_models, find_cached, hf_cache_dir,
                    hub_endpoint, hub_offline, remove_cached)
from .checkpoint import hub_checkpoint
from .choice import Candidate, Choice, candidates, choose, quant_label
from .download import API_TIMEOUT_S, pull, pull_model, resolve_reference, served_reference
from .progress import Progress, ProgressFn
from .reference import Reference, as_reference, parse_reference
from .verify import verify_cached

__all__ = [
    "Reference", "parse_reference", "as_reference",
    "Candidate", "Choice", "candidates", "choose", "quant_label",
    "Progress", "ProgressFn", "verify_cached",
    "DEFAULT_ENDPOINT", "hf_cache_dir", "hub_endpoint", "hub_offline", "Pulled", "find_cached", "cached_labels",
    "CachedModel", "cached_models", "remove_cached",
    "API_TIMEOUT_S", "pull", "pull_model", "resolve_reference", "served_reference",
    "hub_checkpoint",
]
