"""Click options derived from :mod:`edgelm.settings`: one declaration per setting, every command the same flags.

    @generation_options            # -n/--max-tokens, -t/--temperature, ... (GenerationParams)
    @load_options()                # --backend, --device, --threads, --n-ctx, --kv-cache, ... (settings.LOAD)
    def command(..., **kwargs):
        params = pop_generation(kwargs)     # only what was given: the library's defaults stay the defaults
        load = pop_load(kwargs)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from edgelm.settings import Setting, generation, load_settings


class GrammarText(click.ParamType):
    """GBNF text, or @FILE to read it from a file (as curl does for data)."""

    name = "GBNF|@FILE"
    what = "grammar"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        if isinstance(value, str) and value.startswith("@"):
            path = Path(value[1:]).expanduser()
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                self.fail(f"cannot read the {self.what} file {path}: {exc}", param, ctx)
        return value


class TemplateText(GrammarText):
    """A chat template's known name or Jinja text, or @FILE to read it from a file (edgelm.chat_templates)."""

    name = "NAME|@FILE"
    what = "chat template"


def _option(s: Setting) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    help_text = s.help if "[default:" in s.help else f"{s.help} [default: {s.default_text()}]"
    kwargs: dict[str, Any] = {"default": None, "help": help_text}
    if s.kind == "int":
        kwargs["type"] = int
    elif s.kind == "float":
        kwargs["type"] = float
    elif s.kind == "choice":
        kwargs["type"] = click.Choice(list(s.choices), case_sensitive=False)
    elif s.kind == "strings":
        kwargs["multiple"] = True
        kwargs["default"] = ()
    elif s.kind == "grammar":
        kwargs["type"] = GrammarText()
    elif s.kind == "template":
        kwargs["type"] = TemplateText()
    elif s.kind in ("path", "paths"):
        kwargs["type"] = click.Path(dir_okay=True)
        kwargs["multiple"] = s.kind == "paths"
    elif s.kind == "bool":
        kwargs["type"] = bool if "/" not in s.flag else None
    return click.option(*s.cli, s.name, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def _decorate(settings: tuple[Setting, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for s in reversed(settings):
            if s.cli:
                func = _option(s)(func)
        return func

    return decorate


def generation_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every generation parameter (GenerationParams), named as in the library."""
    return _decorate(generation())(func)


def some_generation_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Only the generation parameters ``names`` (a command that fixes the others itself)."""
    return _decorate(tuple(s for s in generation() if s.name in names))


def load_options(*, skip: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every load setting (settings.LOAD) but ``skip`` (a command that declares one its own way)."""
    return _decorate(tuple(s for s in load_settings() if s.name not in skip))


def _pop(kwargs: dict[str, Any], settings: tuple[Setting, ...]) -> dict[str, Any]:
    out = {}
    for s in settings:
        if not s.cli or s.name not in kwargs:
            continue
        value = kwargs.pop(s.name)
        if s.kind in ("strings", "paths"):
            value = list(value) or None
        if value is not None:
            out[s.name] = value
    return out


def pop_generation(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generation parameters given on the command line (None/empty ones are left to the library)."""
    return _pop(kwargs, generation())


def pop_load(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The load settings given on the command line."""
    return _pop(kwargs, load_settings())
