"""Every user-facing setting, declared once: its type, default, description and its name on each surface.

Generation settings are the fields of :class:`edgelm.GenerationParams` (their metadata, made by :func:`setting`);
load settings are :data:`LOAD`.  The library validates against these tables, and every other surface derives from
them: the click options of ``run``/``chat``/``serve``/``bench`` (:mod:`edgelm.cli.options`), the OpenAI request
fields and the Ollama ``options`` keys the server accepts, and ``--help`` texts with their defaults.  A new
setting is one entry here (plus its validation and its use); ``tests/test_settings.py`` walks the tables and checks
every surface.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# the kinds of value a setting takes; each surface knows how to read each kind
KINDS = ("int", "float", "bool", "str", "choice", "strings", "grammar", "path", "paths", "template")


@dataclass(frozen=True)
class Setting:
    name: str  # the library name (keyword argument)
    kind: str  # one of KINDS
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    cli: tuple[str, ...] = ()  # click flags, e.g. ("-n", "--max-tokens"); () = not on the command line
    openai: tuple[str, ...] = ()  # OpenAI request fields that set it (several: aliases)
    ollama: tuple[str, ...] = ()  # Ollama "options" keys that set it
    example: Any = None  # a valid value other than the default (tests walk the tables with it)
    backends: tuple[str, ...] | None = None  # load settings: the backends that honour it (None: every backend)

    @property
    def flag(self) -> str | None:
        """The long command-line flag (--max-tokens), or None."""
        return next((f for f in self.cli if f.startswith("--")), None)

    def default_text(self) -> str:
        if self.default is None or self.default == ():
            return "none"
        if self.kind == "bool":
            return "on" if self.default else "off"
        return str(self.default)


def setting(default: Any, help: str, *, kind: str, choices: tuple[str, ...] = (), cli: tuple[str, ...] = (),
            openai: tuple[str, ...] = (), ollama: tuple[str, ...] = (), example: Any = None,
            default_factory: Any = None) -> Any:
    """A dataclass field carrying its :class:`Setting` declaration (everything but the name) as metadata."""
    assert kind in KINDS, kind
    meta = {"setting": dict(kind=kind, help=help, choices=choices, cli=cli, openai=openai, ollama=ollama,
                            example=example)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def from_dataclass(cls: type) -> tuple[Setting, ...]:
    """The settings declared on ``cls``'s fields with :func:`setting`."""
    out = []
    for f in fields(cls):
        meta = f.metadata.get("setting")
        if meta is None:
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        out.append(Setting(name=f.name, default=default, **meta))
    return tuple(out)


def generation() -> tuple[Setting, ...]:
    from .params import GenerationParams

    return from_dataclass(GenerationParams)


def _kv_types() -> tuple[str, ...]:
    from .formats.gguf import KV_CACHE_TYPES

    return KV_CACHE_TYPES


def _devices() -> tuple[str, ...]:
    from .platforms import DEVICES

    return DEVICES


def _load() -> tuple[Setting, ...]:
    llama = ("llamacpp",)
    return (
        Setting("backend", "str", "auto", "auto (by file format), llamacpp or onnxruntime.", cli=("--backend",),
                example="llamacpp"),
        Setting("device", "choice", "auto", "Where to run: auto (the best this machine and build offer), cpu, gpu, "
                "metal, cuda, ...", choices=_devices(), cli=("--device",), example="cpu"),
        Setting("threads", "int", None, "CPU threads [default: the performance cores this process may use].",
                cli=("--threads",), example=2),
        Setting("n_ctx", "int", None, "Context window in tokens [default: the model's trained length, capped at "
                "4096].", cli=("--n-ctx",), example=512),
        Setting("n_gpu_layers", "int", None, "Layers offloaded to the GPU (-1 = all) [default: all where the build "
                "supports a GPU here, else 0].", cli=("--n-gpu-layers",), example=0, backends=llama),
        Setting("use_mmap", "bool", True, "Map the model file into memory instead of reading it.",
                cli=("--mmap/--no-mmap",), example=False, backends=llama),
        Setting("flash_attn", "bool", None, "Flash attention [default: llama.cpp decides; on for a quantized KV "
                "cache].", cli=("--flash-attn/--no-flash-attn",), example=True, backends=llama),
        Setting("kv_cache", "choice", None, "KV cache element type: f16, q8_0 (about half the memory), q4_0, ... "
                "[default: f16].", choices=_kv_types(), cli=("--kv-cache",), example="q8_0", backends=llama),
        Setting("parallel", "int", 1, "Sequences generated at the same time, batched (continuous batching): "
                "concurrent calls from several threads, server requests and generate_batch share the model; each "
                "gets the full n_ctx (KV memory grows with it). `edgelm serve` chooses it from memory when not "
                "given.", cli=("--parallel", "-np"), example=4, backends=llama),
        Setting("chat_template", "template", None, "The chat format to talk to the model in, replacing the one in "
                "its file: a known name (chatml, llama3, gemma, mistral, phi3) or Jinja text (@file.jinja on the "
                "command line). Its special tokens must be in the model's vocabulary. [default: the model's own; a "
                "model without one is not chatted with]", cli=("--chat-template",), example="chatml"),
        Setting("n_batch", "int", 512, "Tokens evaluated per batch while reading a prompt.", cli=("--n-batch",),
                example=256),
        # on the command line this is the generation setting of the same name (--speculative)
        Setting("speculative", "choice", None, "Default drafting for greedy generation: prompt-lookup (n-gram drafts "
                "from the prompt) or draft (needs draft_model); output identical to plain greedy.",
                choices=("prompt-lookup", "draft"), example="prompt-lookup", backends=llama),
        Setting("draft_model", "path", None, "A smaller GGUF with the same tokenizer, for speculative decoding.",
                cli=("--draft-model",), example="small.gguf", backends=llama),
        Setting("max_draft", "int", 8, "Most tokens drafted per verification step (speculative decoding).",
                cli=("--max-draft",), example=4, backends=llama),
        Setting("extra_buffers", "bool", None, "llama.cpp's repacked weight buffers [default: on, except on CPUs "
                "with AMX where they crash].", cli=("--extra-buffers/--no-extra-buffers",), example=False,
                backends=llama),
        Setting("workers", "strings", (), "RPC workers (`edgelm worker` on other machines) to split the model's "
                "layers across, as HOST:PORT (repeat the flag, or separate with commas); layers go to the workers by "
                "the memory each reports, what does not fit stays here.", cli=("--workers",),
                example=["127.0.0.1:50052"], backends=llama),
        Setting("tensor_split", "str", None, "With workers: the share of layers for this machine and each worker, "
                "in that order, e.g. 0,1,1 (library: a list of numbers) [default: by the workers' reported memory].",
                cli=("--tensor-split",), example="0,1,1", backends=llama),
    )


_LOAD: tuple[Setting, ...] | None = None


def load_settings() -> tuple[Setting, ...]:
    global _LOAD
    if _LOAD is None:
        _LOAD = _load()
    return _LOAD


def by_name(settings: tuple[Setting, ...]) -> dict[str, Setting]:
    return {s.name: s for s in settings}


def field_table(settings: tuple[Setting, ...], surface: str) -> dict[str, str]:
    """Request field (surface "openai") or option key ("ollama") -> setting name."""
    return {alias: s.name for s in settings for alias in getattr(s, surface)}
