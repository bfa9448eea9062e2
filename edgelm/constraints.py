"""Structured output: a :class:`Constraint` the generated text must match, and the :class:`Guide` that enforces it
token by token on any backend.

One engine for every backend: llguidance (the constraint engine llama.cpp and guidance use).  A constraint is a
frozen value (kind, source text, optional trigger) that the library, the CLI and the server build the same way::

    Constraint.json_schema({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    Constraint.json_object()               # any JSON object (OpenAI's response_format json_object)
    Constraint.regex(r"(yes|no)")
    Constraint.lark('start: "a"+')         # llguidance's Lark dialect (%json{...} embeds a JSON schema)
    Constraint.gbnf('root ::= "yes" | "no"')

A JSON schema's objects that list ``properties`` are closed (``additionalProperties: false``) unless the schema
says otherwise, as llama.cpp does.  Each constructor compiles the grammar at once (no tokenizer needed), so a bad schema, regex or grammar raises
:class:`~edgelm.errors.InvalidParameterError` before a model is touched.

``trigger`` makes it lazy (as llama.cpp's lazy grammars for tool calls): the output is free until the generated
text contains ``trigger``; from there, the text after the trigger must match the grammar, and once the grammar is
complete only an end-of-generation token is allowed, so generation stops.  If the bytes that came with the trigger's
last token cannot start the grammar, that occurrence is ignored and the output stays free until the next one.

A backend turns a constraint into a :class:`Guide` over its own vocabulary (an llguidance ``LLTokenizer`` the
backend builds once): ``guide.mask(logits)`` sets the logits of forbidden tokens to -inf in place before sampling,
``guide.accept(token)`` moves it on after.  Computing a mask takes tens of microseconds for a JSON schema over a
49k vocabulary (measured: benchmarks/bench_structured.py), small beside a decode step, so it runs inline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .errors import BackendError, InvalidParameterError
from .optional import require

if TYPE_CHECKING:
    import numpy as np

KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf")
# JSON as OpenAI and llama-server write it under a schema: no free whitespace between tokens (a small model would
# otherwise fill the output with newlines), ", " and ": " as separators
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_WHAT = {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regular expression",
         "lark": "Lark grammar", "gbnf": "GBNF grammar"}


def _bad(parameter: str, value: Any, message: str, fix: str) -> InvalidParameterError:
    shown = value if not isinstance(value, str) or len(value) <= 200 else value[:200] + "..."
    return InvalidParameterError(message, fix=fix, parameter=parameter, value=shown)


def _llguidance() -> Any:
    return require("llguidance", extra="llamacpp", purpose="Structured output (constraint=, response_format, "
                   "format)", install='Install it with: pip install llguidance (or pip install "edgelm[llamacpp]")')


@dataclass(frozen=True)
class Constraint:
    """What the generated text must match: ``kind`` (one of :data:`KINDS`), its ``source`` text (a JSON schema as
    JSON text, a regex, a Lark or GBNF grammar; empty for json_object) and an optional lazy ``trigger``.

    Build one with the constructors (they check the grammar at once); the value is hashable and picklable."""

    kind: str
    source: str = ""
    trigger: str | None = None

    KINDS: ClassVar[tuple[str, ...]] = KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise _bad("constraint", self.kind, f"Unknown constraint kind {self.kind!r}.",
                       f"Use one of: {', '.join(KINDS)} (Constraint.json_schema(...), .regex(...), ...).")
        if not isinstance(self.source, str):
            raise _bad("constraint", self.source, f"The {_WHAT[self.kind]} must be text, not "
                       f"{type(self.source).__name__}.", "Pass it as a str (a schema as a dict to json_schema()).")
        if self.trigger is not None and (not isinstance(self.trigger, str) or not self.trigger):
            raise _bad("trigger", self.trigger, f"Invalid trigger {self.trigger!r}.",
                       "trigger must be a non-empty string, or None to constrain the whole output.")

    # --- constructors ---------------------------------------------------------------------------------------------

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, *, trigger: str | None = None) -> "Constraint":
        """Output that parses as JSON and validates against ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise _bad("json_schema", schema, f"The JSON schema is not valid JSON: {exc}.",
                           "Pass a JSON Schema object (a dict, or its JSON text).") from None
        if not isinstance(schema, dict):
            raise _bad("json_schema", schema, f"A JSON schema must be an object, not {type(schema).__name__}.",
                       'Pass a JSON Schema object, e.g. {"type": "object", "properties": {...}}.')
        try:
            source = json.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise _bad("json_schema", schema, f"The JSON schema cannot be written as JSON: {exc}.",
                       "Use only JSON values (dict, list, str, numbers, bools, None) in the schema.") from None
        return cls("json_schema", source, trigger).checked("json_schema")

    @classmethod
    def json_object(cls, *, trigger: str | None = None) -> "Constraint":
        """Output that parses as a JSON object (any keys and values)."""
        return cls("json_object", "", trigger).checked("json_object")

    @classmethod
    def regex(cls, pattern: str, *, trigger: str | None = None) -> "Constraint":
        """Output that matches ``pattern`` as a whole (Rust regex syntax, as llguidance reads it)."""
        return cls("regex", pattern, trigger).checked("regex")

    @classmethod
    def lark(cls, grammar: str, *, trigger: str | None = None) -> "Constraint":
        """Output that the Lark ``grammar`` (llguidance's dialect; start rule ``start``) derives."""
        return cls("lark", grammar, trigger).checked("lark")

    @classmethod
    def gbnf(cls, grammar: str, *, trigger: str | None = None) -> "Constraint":
        """Output that the GBNF ``grammar`` (llama.cpp's format; start rule ``root``) derives."""
        return cls("gbnf", grammar, trigger).checked("gbnf")

    # --- the grammar ----------------------------------------------------------------------------------------------

    def checked(self, parameter: str = "constraint") -> "Constraint":
        """This constraint, once its grammar compiled; a bad one raises InvalidParameterError naming ``parameter``."""
        self.grammar(parameter)
        return self

    def grammar(self, parameter: str = "constraint") -> str:
        """The llguidance grammar (compiled once per distinct constraint)."""
        grammar, error = _compile(self.kind, self.source)
        if error:
            raise _bad(parameter, self.source if self.kind != "json_object" else self.kind,
                       f"The {_WHAT[self.kind]} cannot be used for constrained generation: {error.strip()}",
                       _FIX[self.kind])
        return grammar

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "trigger": self.trigger}


_FIX = {
    "json_schema": "Pass a valid JSON Schema (draft 2020-12 keywords: type, properties, required, items, enum, "
                   "minimum/maximum, ...).",
    "json_object": "This should not happen: report it.",
    "regex": "Check the regular expression's syntax (Rust regex syntax: no look-around or back-references).",
    "lark": "Check the grammar's syntax (llguidance's Lark: the start rule is called 'start').",
    "gbnf": "Check the GBNF syntax; the start rule must be called 'root'.",
}


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
                  "unevaluatedItems", "propertyNames")


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists ``properties`` and says
    nothing about others, as llama.cpp's schema converter does: a small model otherwise invents keys until the
    token limit.  Say ``"additionalProperties": true`` to allow them.  Members of ``allOf`` are left open (closing
    each part would refuse the other parts' keys)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(v) for v in out[key]]
    for key in _SUBSCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [{k: closed_objects(v) if k in _SUBSCHEMA_MAPS else v for k, v in part.items()}
                        if isinstance(part, dict) else part for part in out["allOf"]]
    return out


@lru_cache(maxsize=256)
def _compile(kind: str, source: str) -> tuple[str, str]:
    """(llguidance grammar, error message or "")."""
    llg = _llguidance()
    matcher = llg.LLMatcher
    try:
        if kind == "json_schema":
            grammar = matcher.grammar_from_json_schema(closed_objects(json.loads(source)), defaults=JSON_OPTIONS)
        elif kind == "json_object":
            grammar = matcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(source)
        elif kind == "lark":
            grammar = matcher.grammar_from_lark(source)
        else:
            if not source.strip():
                return "", "the grammar is empty"
            grammar = llg.grammar_from("gbnf", source)
    except (ValueError, TypeError) as exc:  # llguidance raises ValueError for text it cannot convert
        return "", str(exc)
    except Exception as exc:  # the GBNF converter raises its own parse errors
        return "", f"{type(exc).__name__}: {exc}"
    return grammar, matcher.validate_grammar(grammar)


# --- enforcing a constraint -----------------------------------------------------------------------------------------


def tokenizer_from_tokenizer_json(text: str, *, n_vocab: int, eos_tokens: list[int]) -> Any:
    """An llguidance tokenizer from a Hugging Face tokenizer.json's text (the ONNX backends)."""
    llg = _llguidance()
    return llg.LLTokenizer(text, n_vocab=n_vocab, eos_token=eos_tokens)


class Guide:
    """One generation under a :class:`Constraint`, over a backend's vocabulary (an llguidance ``LLTokenizer``).

    Before each sample, :meth:`mask` sets the logits of the tokens the constraint forbids to -inf (in place);
    after it, :meth:`accept` moves the matcher on.  With a trigger, nothing is masked until the generated text
    contains it.  ``token_bytes`` gives a token's text bytes (to find the trigger)."""

    def __init__(self, constraint: Constraint, tokenizer: Any, token_bytes: Callable[[int], bytes]) -> None:
        import numpy as np

        self.constraint = constraint
        self._grammar = constraint.grammar()
        self._tokenizer = tokenizer
        self._token_bytes = token_bytes
        self._words = np.zeros((tokenizer.vocab_size + 31) // 32, dtype=np.int32)
        self._trigger = constraint.trigger.encode("utf-8") if constraint.trigger is not None else None
        self._seen = bytearray()  # lazy: the generated bytes that may still hold the start of the trigger
        self.matcher: Any = None
        self.triggered = self._trigger is None
        if self._trigger is None:
            self.matcher = self._new_matcher()

    def _new_matcher(self) -> Any:
        llg = _llguidance()
        matcher = llg.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        if matcher.is_error():
            raise _bad("constraint", self.constraint.source, f"The {_WHAT[self.constraint.kind]} cannot be used with "
                       f"this model's vocabulary: {matcher.get_error()}", _FIX[self.constraint.kind])
        return matcher

    @property
    def active(self) -> bool:
        """True while the output is constrained (always, unless a trigger has not been seen yet)."""
        return self.matcher is not None

    def mask(self, logits: "np.ndarray") -> None:
        """Forbid (-inf) the logits of the tokens the constraint does not allow next; a no-op while lazy."""
        matcher = self.matcher
        if matcher is None:
            return
        import numpy as np

        words = self._words
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        n = logits.shape[0]
        allowed = np.unpackbits(words.view(np.uint8), count=min(n, words.size * 32), bitorder="little")
        if allowed.shape[0] < n:  # logits beyond the tokenizer's vocabulary (padding rows): never allowed
            logits[allowed.shape[0]:] = -np.inf
        logits[: allowed.shape[0]][allowed == 0] = -np.inf

    def accept(self, token: int) -> None:
        """The sampled ``token`` was chosen: move the matcher on (or, while lazy, look for the trigger)."""
        matcher = self.matcher
        if matcher is not None:
            if not matcher.consume_token(token) and not matcher.is_stopped():
                raise BackendError(f"The constraint rejected token {token} it had allowed: {matcher.get_error()}.",
                                   fix="Report this with the constraint and the model; drop the constraint to "
                                   "generate meanwhile.")
            return
        seen = self._seen
        seen += self._token_bytes(token)
        trigger = self._trigger
        assert trigger is not None
        at = seen.find(trigger)
        if at < 0:
            del seen[: max(0, len(seen) - len(trigger) + 1)]  # keep only what may start the trigger
            return
        rest = bytes(seen[at + len(trigger):])
        matcher = self._new_matcher()
        if rest and not matcher.consume_tokens(self._tokenizer.tokenize_bytes(rest)):
            del seen[: at + 1]  # this occurrence cannot start the grammar: stay free, look further on
            return
        self.matcher = matcher
        self.triggered = True
        seen.clear()

    @property
    def done(self) -> bool:
        """True once the grammar is complete and only an end-of-generation token may follow."""
        return self.matcher is not None and self.matcher.is_stopped()
