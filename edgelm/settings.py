"""Every user-facing setting, declared once: its type, default, description and its name on each surface.

Generation settings are the fields of :class:`edgelm.params.GenerationParams`; load settings are the fields of
:class:`LoadOptions` (what :func:`edgelm.load` hands a backend) plus :data:`BACKEND`.  Each field carries its
declaration (:func:`edgelm.declarations.setting`); the tables :data:`GENERATION` and :data:`LOAD` are read from
them.  The library validates against these tables, and every other surface derives from them: the click options
of ``run``/``chat``/``serve``/``bench`` (:mod:`edgelm.cli.options`), the OpenAI request fields and the Ollama
``options`` keys the server accepts, the keyword names of ``edgelm.load`` (:class:`LoadKwargs`), and ``--help``
texts with their defaults.  A new setting is one field here (plus its validation and its use);
``tests/test_settings.py`` walks the tables and checks every surface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypedDict

from .declarations import KINDS, REQUIRED, Setting, by_name, field_table, from_dataclass, setting
from .formats.gguf import KV_CACHE_TYPES
from .params import GenerationParams

# the compute devices a model can be loaded on (`--device`; edgelm.platforms resolves "auto")
DEVICES = ("auto", "cpu", "gpu", "metal", "cuda", "vulkan", "npu", "coreml", "qnn", "nnapi", "directml", "xnnpack")

LLAMA = ("llamacpp",)

BACKEND = Setting("backend", "str", "auto", "auto (by file format), llamacpp or onnxruntime.", cli=("--backend",),
                  example="llamacpp")


@dataclass(kw_only=True)
class LoadOptions:
    """What :func:`edgelm.load` resolved before handing a model to a backend; each field a load setting.

    ``setting(default, ...)`` is what a user gets when they do not give it; ``resolved=`` is the field's value in a
    record built without the resolver (a backend loading a draft model, a test): "auto" becomes a device, None a
    thread count, by :func:`edgelm.platforms.runtime_defaults`.
    """

    device: str = setting(
        "auto", "Where to run: auto (the best this machine and build offer), cpu, gpu, metal, cuda, ...",
        kind="choice", choices=DEVICES, cli=("--device",), example="cpu", resolved="cpu")
    threads: int = setting(
        None, "CPU threads [default: the performance cores this process may use].", kind="int", cli=("--threads",),
        example=2, resolved=REQUIRED)
    n_ctx: int | None = setting(
        None, "Context window in tokens [default: the model's trained length, capped at 4096].", kind="int",
        cli=("--n-ctx",), example=512)
    n_gpu_layers: int = setting(
        None, "Layers offloaded to the GPU (-1 = all) [default: all where the build supports a GPU here, else 0].",
        kind="int", cli=("--n-gpu-layers",), example=0, backends=LLAMA, resolved=0)
    use_mmap: bool = setting(
        True, "Map the model file into memory instead of reading it.", kind="bool", cli=("--mmap/--no-mmap",),
        example=False, backends=LLAMA)
    flash_attn: bool | None = setting(
        None, "Flash attention [default: llama.cpp decides; on for a quantized KV cache].", kind="bool",
        cli=("--flash-attn/--no-flash-attn",), example=True, backends=LLAMA)
    kv_cache: str | None = setting(
        None, "KV cache element type: f16, q8_0 (about half the memory), q4_0, ... [default: f16].", kind="choice",
        choices=KV_CACHE_TYPES, cli=("--kv-cache",), example="q8_0", backends=LLAMA)
    parallel: int = setting(
        1, "Sequences generated at the same time, batched (continuous batching): concurrent calls from several "
        "threads, server requests and generate_batch share the model; each gets the full n_ctx (KV memory grows "
        "with it). `edgelm serve` chooses it from memory when not given.", kind="int", cli=("--parallel", "-np"),
        example=4, backends=LLAMA)
    chat_template: str | None = setting(
        None, "The chat format to talk to the model in, replacing the one in its file: a known name (chatml, "
        "llama3, gemma, mistral, phi3; or a tool-calling family's, which picks its call format too: hermes, "
        "llama3.1, mistral-v3, phi4-mini, granite3, smollm3, functiongemma) or Jinja text (@file.jinja on the "
        "command line). Its special tokens must be in the model's vocabulary. [default: the model's own; a model without one is not chatted with]",
        kind="template", cli=("--chat-template",), example="chatml")
    n_batch: int = setting(
        512, "Tokens evaluated per batch while reading a prompt.", kind="int", cli=("--n-batch",), example=256)
    # on the command line this is the generation setting of the same name (--speculative)
    speculative: str | None = setting(
        None, "Default drafting for greedy generation: prompt-lookup (n-gram drafts from the prompt) or draft "
        "(needs draft_model); output identical to plain greedy.", kind="choice", choices=("prompt-lookup", "draft"),
        example="prompt-lookup", backends=LLAMA)
    draft_model: str | None = setting(
        None, "A smaller GGUF with the same tokenizer, for speculative decoding.", kind="path",
        cli=("--draft-model",), example="small.gguf", backends=LLAMA)
    max_draft: int = setting(
        8, "Most tokens drafted per verification step (speculative decoding).", kind="int", cli=("--max-draft",),
        example=4, backends=LLAMA)
    extra_buffers: bool | None = setting(
        None, "llama.cpp's repacked weight buffers [default: on, except on CPUs with AMX where they crash].",
        kind="bool", cli=("--extra-buffers/--no-extra-buffers",), example=False, backends=LLAMA)
    workers: Sequence[str] = setting(
        (), "RPC workers (`edgelm worker` on other machines) to split the model's layers across, as HOST:PORT "
        "(repeat the flag, or separate with commas); layers go to the workers by the memory each reports, what "
        "does not fit stays here.", kind="strings", cli=("--workers",), example=["127.0.0.1:50052"], backends=LLAMA)
    tensor_split: Any = setting(
        None, "With workers: the share of layers for this machine and each worker, in that order, e.g. 0,1,1 "
        "(library: a list of numbers) [default: by the workers' reported memory].", kind="str",
        cli=("--tensor-split",), example="0,1,1", backends=LLAMA)
    # resolved only: not a user setting
    providers: Sequence[str] | None = None  # onnxruntime execution providers, in order of preference
    extra: dict[str, Any] = field(default_factory=dict)  # options of third-party backends
    # progress(fraction) while the weights load, from the loading thread (a desktop app's progress bar);
    # edgelm.load reports 0.0 and 1.0 itself, a backend that can reports the steps between (llama.cpp)
    progress: Callable[[float], Any] | None = None


GENERATION: tuple[Setting, ...] = from_dataclass(GenerationParams)
LOAD: tuple[Setting, ...] = (BACKEND, *from_dataclass(LoadOptions))


class LoadKwargs(TypedDict, total=False):
    """The keyword arguments of :func:`edgelm.load` (the names of :data:`LOAD`; a test checks they match)."""

    backend: str
    device: str
    threads: int | None
    n_ctx: int | None
    n_gpu_layers: int | None
    use_mmap: bool
    flash_attn: bool | None
    kv_cache: str | None
    parallel: int
    chat_template: str | None
    n_batch: int
    speculative: str | None
    draft_model: str | None
    max_draft: int
    extra_buffers: bool | None
    workers: Sequence[str]
    tensor_split: Any


def generation() -> tuple[Setting, ...]:
    """The generation settings (:data:`GENERATION`)."""
    return GENERATION


def load_settings() -> tuple[Setting, ...]:
    """The load settings (:data:`LOAD`)."""
    return LOAD


__all__ = ["KINDS", "Setting", "setting", "from_dataclass", "by_name", "field_table", "DEVICES", "BACKEND",
           "LoadOptions", "LoadKwargs", "GENERATION", "LOAD", "generation", "load_settings"]
