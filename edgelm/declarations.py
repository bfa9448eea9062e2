"""How an option is declared once: :class:`Setting` (its type, default, help and its name on each surface),
:func:`setting` (the same, as a dataclass field's metadata) and :func:`resolve` (the library's check of keyword
arguments against a table: unknown names refused, defaults filled in).

The tables themselves live next to what they configure: generation parameters on
:class:`edgelm.params.GenerationParams`, load settings on :class:`edgelm.settings.LoadOptions`, compression on
:class:`edgelm.compression.api.CompressOptions`, conversion on :class:`edgelm.conversion.ConvertOptions`, planning
on :class:`edgelm.plan.RecommendOptions`.  Every surface derives from them: the click options
(:mod:`edgelm.cli.options`), the server's request fields, the ``--help`` defaults.  This module sits below all of
them, so the declarations and the records that use them import it and never each other.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import InvalidParameterError

# the kinds of value a setting takes; each surface knows how to read each kind
#   "ints": a number or a list of numbers (on the command line: 4, or 12,14,17)
#   "object": a library-only value (a record, a callable): never on the command line
#   "constraint": an edgelm.Constraint (on the command line: a JSON schema's text, or @FILE)
KINDS = ("int", "float", "bool", "str", "choice", "strings", "grammar", "path", "paths", "template", "ints", "object",
         "constraint")

REQUIRED: Any = MISSING  # a dataclass field's ``resolved`` value that must be given (LoadOptions.threads)


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
    metavar: str | None = None  # the command line's name for the value (N|HOST:PORT,...)

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
            backends: tuple[str, ...] | None = None, metavar: str | None = None, default_factory: Any = None,
            resolved: Any = None) -> Any:
    """A dataclass field carrying its :class:`Setting` declaration (everything but the name) as metadata.

    ``resolved``: for a record that holds resolved values (LoadOptions: what a backend receives), the field's own
    default when it differs from the user-facing ``default`` ("auto" resolves to a device; REQUIRED: no default,
    the resolver always gives it).  Both are declared here, on the one line of the setting."""
    assert kind in KINDS, kind
    meta = {"setting": dict(kind=kind, help=help, choices=choices, cli=cli, openai=openai, ollama=ollama,
                            example=example, backends=backends, metavar=metavar)}
    if resolved is not None:
        meta["setting"]["default"] = default
        if resolved is REQUIRED:
            return field(metadata=meta)
        return field(default=resolved, metadata=meta)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def from_dataclass(cls: type) -> tuple[Setting, ...]:
    """The settings declared on ``cls``'s fields with :func:`setting`, in field order."""
    out = []
    for f in fields(cls):
        meta = f.metadata.get("setting")
        if meta is None:
            continue
        meta = dict(meta)
        if "default" not in meta:
            meta["default"] = f.default_factory() if f.default_factory is not MISSING else f.default
        out.append(Setting(name=f.name, **meta))
    return tuple(out)


def by_name(settings: tuple[Setting, ...]) -> dict[str, Setting]:
    return {s.name: s for s in settings}


def field_table(settings: tuple[Setting, ...], surface: str) -> dict[str, str]:
    """Request field (surface "openai") or option key ("ollama") -> setting name."""
    return {alias: s.name for s in settings for alias in getattr(s, surface)}


def check_names(settings: tuple[Setting, ...], given: dict[str, Any], what: str) -> None:
    """Refuse a keyword that is not in the table, naming the valid ones (a typo fails at once, not silently)."""
    names = [s.name for s in settings]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InvalidParameterError(f"Unknown {what} {unknown[0]!r}.", fix=f"Use one of: {', '.join(names)}.",
                                    parameter=unknown[0], value=given[unknown[0]])


def resolve(settings: tuple[Setting, ...], given: dict[str, Any], what: str) -> dict[str, Any]:
    """Every setting of the table by name: the given value, else the declared default; unknown names refused."""
    check_names(settings, given, what)
    return {s.name: given.get(s.name, s.default) for s in settings}
