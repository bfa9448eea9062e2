"""Click options derived from the option tables (:mod:`edgelm.declarations`): one declaration per option, every
command the same flags.

    @generation_options            # -n/--max-tokens, -t/--temperature, ... (GenerationParams)
    @load_options()                # --backend, --device, --threads, --n-ctx, --kv-cache, ... (settings.LOAD)
    def command(..., **kwargs):
        params = pop_generation(kwargs)     # only what was given: the library's defaults stay the defaults
        load = pop_load(kwargs)

    @table_options(COMPRESS)       # any table: compress, convert, recommend
    def command(..., **kwargs):
        options = pop_given(kwargs, COMPRESS)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from edgelm.constraints import Constraint
from edgelm.declarations import Setting
from edgelm.errors import InvalidParameterError
from edgelm.settings import GENERATION, LOAD


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


class JsonSchemaText(GrammarText):
    """A JSON schema's text, or @FILE to read it from a file: the "constraint" kind (an edgelm.Constraint)."""

    name = "SCHEMA|@FILE"
    what = "JSON schema"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, Constraint):
            return value
        try:
            return Constraint.json_schema(super().convert(value, param, ctx))
        except InvalidParameterError as exc:
            self.fail(str(exc), param, ctx)


class Ints(click.ParamType):
    """A number, or numbers separated by commas (12,14,17): the "ints" kind."""

    name = "N|N,N,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> int | list[int]:
        if isinstance(value, (int, list)):
            return value
        text = str(value).strip()
        try:
            if "," in text or text.startswith("["):
                return [int(v) for v in text.strip("[]").split(",") if v.strip()]
            return int(text)
        except ValueError:
            self.fail(f"{value!r}: use a number (4) or numbers separated by commas (12,14,17).", param, ctx)


def _option(s: Setting, required: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    help_text = s.help if "[default:" in s.help or required else f"{s.help} [default: {s.default_text()}]"
    kwargs: dict[str, Any] = {"default": None, "help": help_text, "required": required or None}
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
    elif s.kind == "constraint":
        kwargs["type"] = JsonSchemaText()
    elif s.kind == "template":
        kwargs["type"] = TemplateText()
    elif s.kind in ("path", "paths"):
        kwargs["type"] = click.Path(dir_okay=True)
        kwargs["multiple"] = s.kind == "paths"
    elif s.kind == "ints":
        kwargs["type"] = Ints()
    elif s.kind == "bool" and "/" not in (s.flag or ""):
        kwargs["is_flag"] = True  # --overwrite: on when given
    if s.metavar:
        kwargs["metavar"] = s.metavar
    return click.option(*s.cli, s.name, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def _decorate(settings: tuple[Setting, ...], required: tuple[str, ...] = ()
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for s in reversed(settings):
            if s.cli:
                func = _option(s, s.name in required)(func)
        return func

    return decorate


def table_options(settings: tuple[Setting, ...], *, skip: tuple[str, ...] = (), required: tuple[str, ...] = ()
                  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click option for each setting of ``settings`` that has a flag, but ``skip``, in the table's order;
    ``required``: those the command line must give (the library refuses their default)."""
    return _decorate(tuple(s for s in settings if s.name not in skip), required)


def generation_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every generation parameter (GenerationParams), named as in the library."""
    return _decorate(GENERATION)(func)


def some_generation_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Only the generation parameters ``names`` (a command that fixes the others itself)."""
    return _decorate(tuple(s for s in GENERATION if s.name in names))


def load_options(*, skip: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every load setting (settings.LOAD) but ``skip`` (a command that declares one its own way)."""
    return table_options(LOAD, skip=skip)


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


def pop_given(kwargs: dict[str, Any], settings: tuple[Setting, ...]) -> dict[str, Any]:
    """The options of ``settings`` given on the command line (None/empty ones are left to the library)."""
    return _pop(kwargs, settings)


def pop_generation(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generation parameters given on the command line (None/empty ones are left to the library)."""
    return _pop(kwargs, GENERATION)


def pop_load(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The load settings given on the command line."""
    return _pop(kwargs, LOAD)
