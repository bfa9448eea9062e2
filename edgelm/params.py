"""Generation parameters: one validated record shared by the library, the CLI and the server."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable, TypedDict

from .constraints import Constraint
from .declarations import setting
from .errors import InvalidParameterError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and stopping settings, each declared once with its surfaces (see :mod:`edgelm.declarations`).

    ``temperature=0`` is greedy decoding.  ``top_k=0``, ``top_p=1`` and ``min_p=0`` switch those filters off.
    ``max_tokens=None`` generates until an end-of-generation token or the end of the context window.
    ``stop`` strings end generation and are never part of the output.
    """

    max_tokens: int | None = setting(
        None, "Stop after this many generated tokens [default: no limit but the context window].", kind="int",
        cli=("-n", "--max-tokens"), openai=("max_tokens", "max_completion_tokens"), ollama=("num_predict",), example=16)
    temperature: float = setting(
        0.8, "Sampling temperature; 0 = greedy decoding.", kind="float", cli=("-t", "--temperature"),
        openai=("temperature",), ollama=("temperature",), example=0.0)
    top_p: float = setting(
        0.95, "Nucleus sampling: keep the most likely tokens whose probabilities add up to this, in (0, 1].",
        kind="float", cli=("--top-p",), openai=("top_p",), ollama=("top_p",), example=0.5)
    top_k: int = setting(
        40, "Keep only the k most likely tokens; 0 disables.", kind="int", cli=("--top-k",), openai=("top_k",),
        ollama=("top_k",), example=5)
    min_p: float = setting(
        0.05, "Drop tokens less likely than min_p times the most likely one, in [0, 1].", kind="float",
        cli=("--min-p",), openai=("min_p",), ollama=("min_p",), example=0.1)
    repeat_penalty: float = setting(
        1.0, "Divide the logits of recently seen tokens by this (1.0 disables).", kind="float",
        cli=("--repeat-penalty",), openai=("repeat_penalty",), ollama=("repeat_penalty",), example=1.1)
    repeat_last_n: int = setting(
        64, "How many recent tokens the penalties look at (-1 = the whole context, 0 = none).", kind="int",
        cli=("--repeat-last-n",), openai=("repeat_last_n",), ollama=("repeat_last_n",), example=32)
    presence_penalty: float = setting(
        0.0, "Subtract this from the logits of tokens already present, in [-2, 2].", kind="float",
        cli=("--presence-penalty",), openai=("presence_penalty",), ollama=("presence_penalty",), example=0.5)
    frequency_penalty: float = setting(
        0.0, "Subtract this times the count of each token already present, in [-2, 2].", kind="float",
        cli=("--frequency-penalty",), openai=("frequency_penalty",), ollama=("frequency_penalty",), example=0.5)
    seed: int | None = setting(
        None, "Sampling seed, for repeatable output [default: random].", kind="int", cli=("--seed",),
        openai=("seed",), ollama=("seed",), example=7)
    stop: tuple[str, ...] = setting(
        (), "Stop at this string (it is not part of the output); repeatable.", kind="strings", cli=("--stop",),
        openai=("stop",), ollama=("stop",), example=("\n\n",), default_factory=tuple)
    grammar: str | None = setting(
        None, "GBNF grammar the output must follow (llama.cpp backend); on the command line @FILE reads it from a "
        "file.", kind="grammar", cli=("--grammar",), openai=("grammar",), ollama=("grammar",),
        example='root ::= "yes" | "no"')
    constraint: Constraint | None = setting(
        None, "Structured output: the text must match this edgelm.Constraint (a JSON schema, any JSON object, a "
        "regex, a Lark or GBNF grammar; lazily after a trigger string), on every backend.  On the command line "
        "--json-schema takes a JSON schema (or @FILE); the server maps response_format and Ollama's format to it.",
        kind="constraint", cli=("--json-schema",), example=Constraint("json_object"))
    speculative: str | None = setting(
        None, "Speculative decoding for greedy generation: prompt-lookup or draft (with a draft model); the output "
        "is identical to plain greedy (llama.cpp with parallel=1; elsewhere, and when sampling, it is not applied).", kind="choice", choices=("prompt-lookup", "draft"), cli=("--speculative",),
        openai=("speculative",), ollama=("speculative",), example="prompt-lookup")

    def __post_init__(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Iterable):
            stop = tuple(stop)
        else:
            raise _bad("stop", stop, "a string or a list of strings")
        for s in stop:
            if not isinstance(s, str) or s == "":
                raise _bad("stop", stop, "non-empty strings")
        object.__setattr__(self, "stop", stop)
        self._validate()

    def _validate(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise _bad("max_tokens", self.max_tokens, "an integer >= 1 (or None for no limit)")
        _number("temperature", self.temperature, lo=0.0)
        _number("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise _bad("top_k", self.top_k, "an integer >= 0 (0 disables it)")
        _number("min_p", self.min_p, lo=0.0, hi=1.0)
        _number("repeat_penalty", self.repeat_penalty, lo=0.0, lo_open=True)
        if not _is_int(self.repeat_last_n) or self.repeat_last_n < -1:
            raise _bad("repeat_last_n", self.repeat_last_n, "an integer >= -1 (-1 = whole context)")
        _number("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _number("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise _bad("seed", self.seed, "an integer in [0, 2**32) or None for a random seed")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise _bad("grammar", self.grammar, "GBNF grammar text")
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise _bad("constraint", self.constraint, "an edgelm.Constraint (Constraint.json_schema(schema), "
                           ".json_object(), .regex(r), .lark(text), .gbnf(text)) or None")
            if self.grammar is not None:
                raise InvalidParameterError(
                    "grammar= and constraint= were both given; the output can follow only one of them.",
                    fix="Pass the GBNF grammar as constraint=Constraint.gbnf(text), or drop one.",
                    parameter="constraint", value=self.constraint.kind)
            self.constraint.checked()
        if self.speculative not in (None, "prompt-lookup", "draft"):
            raise _bad("speculative", self.speculative, 'None, "prompt-lookup" or "draft"')

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def merged(self, **overrides: Any) -> "GenerationParams":
        """A copy with ``overrides`` applied and validated.  An unknown name raises InvalidParameterError; ``None``
        is a value like any other (max_tokens=None: no limit; temperature=None is refused)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidParameterError(
                f"Unknown generation parameter {unknown[0]!r}.",
                fix=f"Use one of: {', '.join(sorted(names))}.",
                parameter=unknown[0],
                value=overrides[unknown[0]],
            )
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        data["constraint"] = self.constraint.to_dict() if self.constraint is not None else None
        return data


def _bad(name: str, value: Any, expected: str) -> InvalidParameterError:
    return InvalidParameterError(
        f"Invalid value for {name}: {value!r}.", fix=f"{name} must be {expected}.", parameter=name, value=value
    )


def _number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    if not _is_number(value) or math.isnan(value):
        raise _bad(name, value, "a number")
    ok = True
    if lo is not None:
        ok = value > lo if lo_open else value >= lo
    if hi is not None:
        ok = ok and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        rng = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise _bad(name, value, f"a number in {rng}")


PARAMETER_NAMES = tuple(f.name for f in fields(GenerationParams))


class GenerationKwargs(TypedDict, total=False):
    """The keyword arguments of Model.generate/stream/chat/stream_chat: the fields of :class:`GenerationParams`
    (written out for editors and type checkers; ``tests/test_options_declared_once.py`` checks they match)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: str | Iterable[str] | None
    grammar: str | None
    constraint: Constraint | None
    speculative: str | None
