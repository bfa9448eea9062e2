"""`edgelm.load`: find the model, pick the backend and device, hand back a :class:`Model`.

Finding the model (the default one, a path, or a Hub name) is :func:`edgelm.sources.resolve_model_path`; the loader
calls down into it (and into :mod:`edgelm.store` to note the use), never the other way round.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import runtimes
from .chat_templates import apply as apply_chat_template
from .chat_templates import resolve as resolve_chat_template
from .default_model import default_model_path
from .errors import InvalidParameterError, UnsupportedModelError
from .formats import disk_size
from .model import Model
from .params import GenerationParams
from .platforms import DEVICES, runtime_defaults
from .settings import BACKEND, LoadKwargs, Setting, load_settings
from .sources import resolve_model_path
from .store_index import touch
from .types import ModelInfo

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; type checkers ship typing_extensions

log = logging.getLogger("edgelm")


def _backend_for(path: Path, backend: Any) -> str:
    if not isinstance(backend, str):
        raise InvalidParameterError(f"Invalid backend: {backend!r}.", fix="Pass a backend name or 'auto'.",
                                    parameter="backend", value=backend)
    if backend != "auto":
        return runtimes.canonical_name(backend)
    name = runtimes.detect_backend(path)
    if name is None:
        raise UnsupportedModelError(
            f"{path} is neither a GGUF file nor an ONNX model folder.",
            fix="Pass a .gguf file or a folder written by `edgelm convert --to onnx`; name the backend "
            "explicitly with backend=... if the format is detected wrongly.",
            path=str(path),
        )
    return name


def check_load_options(options: dict[str, Any], backend: str | None = None) -> dict[str, Any]:
    """Validate load options by name against edgelm.settings.LOAD: an unknown name, or (when ``backend`` is given)
    an option that backend does not honour, raises InvalidParameterError naming it and the valid ones."""
    table = {s.name: s for s in load_settings()}
    for name in options:
        if name not in table:
            raise InvalidParameterError(f"Unknown load option {name!r}.",
                                        fix=f"Use one of: {', '.join(table)}.", parameter=name, value=options[name])
    if backend is not None:
        for name, value in options.items():
            s = table[name]
            if s.backends is not None and backend not in s.backends and value != s.default:
                valid = [t.name for t in table.values() if t.backends is None or backend in t.backends]
                raise InvalidParameterError(
                    f"{name} is not an option of the {backend} backend (it is for {', '.join(s.backends)}).",
                    fix=f"Drop {name}=..., or use a model for {', '.join(s.backends)}. The {backend} backend takes: "
                    f"{', '.join(valid)}.", parameter=name, value=value)
    return options


def options_for(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that ``backend`` honours (a server loading several models with one set of
    options); dropped ones are logged."""
    table = {s.name: s for s in load_settings()}
    kept = {}
    for name, value in options.items():
        s = table.get(name)
        if s is not None and s.backends is not None and backend not in s.backends:
            if value != s.default:
                log.warning("%s=%r does not apply to the %s backend; ignored for this model.", name, value, backend)
            continue
        kept[name] = value
    return kept


def load(model: str | os.PathLike[str] | None = None, *,
         defaults: GenerationParams | dict[str, Any] | None = None,
         progress: Callable[[float], Any] | None = None, **options: Unpack[LoadKwargs]) -> Model:
    """Load a model for inference.

    model: a .gguf file, an ONNX model folder, or None / "default" for the embedded SmolLM2-135M-Instruct.
    defaults: generation parameters used when a call does not give them (a GenerationParams or a dict).
    progress: called with a fraction from 0.0 to 1.0 as the model loads, in the loading thread (a desktop app
      loads in a worker thread and forwards it to its progress bar): 0.0 first, 1.0 once the model is ready;
      llama.cpp reports the steps between as it reads the weights.
    options: load settings (edgelm.settings.load_settings(); an unknown one raises InvalidParameterError):
    """
    path = resolve_model_path(model)
    if progress is not None:
        progress(0.0)
    given: dict[str, Any] = dict(options)  # the typed keywords, checked by name and value below
    check_load_options(given)
    name = _backend_for(path, given.pop("backend", BACKEND.default))
    cls = runtimes.get_backend(name)
    check_load_options(given, name if name in runtimes.BUILTIN else None)
    values: dict[str, Any] = {s.name: given.get(s.name, s.default) for s in load_settings() if s.name != "backend"}
    _check_types(values)
    if values["chat_template"] is not None:  # a bad name or Jinja text fails before anything loads
        resolve_chat_template(values["chat_template"])
    resolved = runtime_defaults(name, values["device"], threads=values["threads"])
    values.update(threads=resolved.threads, device=resolved.device,
                  n_gpu_layers=resolved.n_gpu_layers if values["n_gpu_layers"] is None else values["n_gpu_layers"])
    if values["draft_model"] is not None:
        values["draft_model"] = str(values["draft_model"])
    load_options = runtimes.LoadOptions(**values, providers=resolved.providers, progress=progress)
    if isinstance(defaults, dict):
        defaults = GenerationParams().merged(**defaults)
    if load_options.workers or load_options.tensor_split is not None:  # split across RPC workers, in a child process
        if load_options.parallel > 1:
            raise InvalidParameterError(
                f"parallel={load_options.parallel} with RPC workers is not supported: a model split across workers "
                "runs in a child process that serves one sequence at a time.",
                fix="Use parallel=1 with workers=, or batch on one machine.", parameter="parallel",
                value=load_options.parallel)

        from .runtimes.remote import load_with_workers  # off the cold path of a model on this machine

        load_options.progress = None  # a function does not cross into the child process: 0.0 and 1.0 only
        instance = load_with_workers(cls, path, load_options)
    else:
        instance = cls.load(path, load_options)
    try:
        if load_options.chat_template is not None:  # the user's chat format, checked against this vocabulary
            instance.chat_template = apply_chat_template(load_options.chat_template, instance)
        facts = instance.describe()
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
            size_bytes=disk_size(path),
            device=facts.get("device", load_options.device),
            threads=load_options.threads,
            capabilities=instance.capabilities.to_dict(),
            extra=facts.get("extra", {}),
        )
    except BaseException:
        instance.close()
        raise
    touch(path)  # "last used" in `edgelm list` (edgelm.store); never raises
    loaded = Model(instance, info, defaults)
    if progress is not None:
        progress(1.0)
    return loaded


def _check_types(values: dict[str, Any]) -> None:
    """Type and range checks of the load settings every backend shares (backends check their own further)."""
    def bad(name: str, expected: str) -> InvalidParameterError:
        return InvalidParameterError(f"Invalid {name}: {values[name]!r}.", fix=f"{name} must be {expected}.",
                                     parameter=name, value=values[name])

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if values["device"] not in DEVICES:
        raise InvalidParameterError(f"Invalid device: {values['device']!r}.", fix=f"Use one of: {', '.join(DEVICES)}.",
                                    parameter="device", value=values["device"])
    if values["threads"] is not None and (not is_int(values["threads"]) or values["threads"] < 1):
        raise bad("threads", "an integer >= 1")
    if values["n_ctx"] is not None and (not is_int(values["n_ctx"]) or values["n_ctx"] < 8):
        raise bad("n_ctx", "an integer >= 8")
    if values["n_gpu_layers"] is not None and (not is_int(values["n_gpu_layers"]) or values["n_gpu_layers"] < -1):
        raise bad("n_gpu_layers", "an integer >= -1 (-1 = all)")
    if not is_int(values["n_batch"]) or values["n_batch"] < 1:
        raise bad("n_batch", "an integer >= 1")
    if not is_int(values["max_draft"]) or values["max_draft"] < 1:
        raise bad("max_draft", "an integer >= 1")
    if not is_int(values["parallel"]) or not 1 <= values["parallel"] <= 256:
        raise bad("parallel", "an integer from 1 to 256")
    for name in ("use_mmap",):
        if not isinstance(values[name], bool):
            raise bad(name, "True or False")
    for name in ("flash_attn", "extra_buffers"):
        if values[name] is not None and not isinstance(values[name], bool):
            raise bad(name, "True, False or None")
    table = {s.name: s for s in load_settings()}
    for name in ("kv_cache", "speculative"):
        if values[name] is not None and values[name] not in table[name].choices:
            raise bad(name, f"one of {', '.join(table[name].choices)}")


def inspect(model: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A model's facts from its header or manifest alone, without loading it (no runtime needed)."""
    path = resolve_model_path(model)
    name = runtimes.detect_backend(path)
    if name is None:
        raise UnsupportedModelError(
            f"{path} is neither a GGUF file nor an ONNX model folder.",
            fix="Pass a .gguf file or a folder written by `edgelm convert --to onnx`.",
            path=str(path),
        )
    return runtimes.inspect(path, name)


def _document() -> None:
    lines = []
    for s in load_settings():
        lines.append(f"      {s.name} (default {s.default_text()}): {s.help}")
    load.__doc__ = (load.__doc__ or "") + "\n" + "\n".join(lines) + "\n"


_document()

__all__ = ["load", "inspect", "default_model_path", "resolve_model_path", "check_load_options", "options_for",
           "Setting"]
