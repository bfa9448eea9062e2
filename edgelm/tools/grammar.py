"""The grammar a tool call is generated under (Lark, as llguidance reads it): the family's call syntax around each
tool's JSON schema, so every call parses and its arguments validate.  ``required`` or a named tool constrains the
whole answer; ``auto`` constrains it lazily, from the family's call marker on (the answer before it is free), and for
a family whose call opens the answer (Llama's bare JSON, the generic format) the answer is either a call or a reply
that does not open like one.

Built from the family's row (:data:`edgelm.tools.formats.FORMATS`); a marker that is one special token of the
model's vocabulary is written as that token (``<[id]>``), so the model can produce it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from edgelm.constraints import JSON_OPTIONS, Constraint, closed_objects

from .formats import ESCAPE, ToolFormat
from .spec import ToolOptions

REPLY = r"/[^{\s][\s\S]*/"  # a plain reply: anything that does not open like a JSON call
REPLY_NOT_TAG = r"/[^{<\s][\s\S]*/"  # ... nor like a marker (Llama's <|python_tag|>, plain text in some vocabularies)


@dataclass(frozen=True)
class ToolGrammar:
    """``lark``: the grammar; ``triggers``: when not empty, it applies to what follows the first of these texts (the
    family's call marker: lazy, as :class:`edgelm.Constraint`'s trigger; the grammar then starts after it)."""

    lark: str
    triggers: tuple[str, ...] = ()

    def constraint(self) -> Constraint:
        return Constraint.lark(self.lark, trigger=self.triggers[0] if self.triggers else None)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def call_schema(tool: dict[str, Any], args_key: str) -> dict[str, Any]:
    function = tool["function"]
    # objects closed (as edgelm.Constraint's schemas): a small model would otherwise invent keys
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             args_key: closed_objects(function["parameters"])},
            "required": ["name", args_key], "additionalProperties": False, "x-guidance": JSON_OPTIONS}


def build(fmt: ToolFormat, options: ToolOptions, *, token: Callable[[str], int | None] = lambda _: None) -> ToolGrammar:
    """The grammar for ``options`` in ``fmt``; ``token(text)`` gives the id of a special token writing ``text``."""

    def lit(text: str) -> str:
        if not text:
            return ""
        tid = token(text)
        return f"<[{tid}]>" if tid is not None else _quote(text)

    tools = options.allowed
    parallel = options.parallel_tool_calls and fmt.parallel
    rules: list[str] = []
    names = []
    for i, tool in enumerate(tools):
        names.append(f"call_{i}")
        if fmt.body == "functiongemma":
            rules.append(f"call_{i}: {_quote('call:' + tool['function']['name'])} fg_{i}_args")
            rules.extend(_fg_rules(f"fg_{i}_args", tool["function"]["parameters"]))
        else:
            schema = json.dumps(call_schema(tool, fmt.args_key), ensure_ascii=False)
            rules.append(f"call_{i}: %json {schema}")
    rules.append("call: " + " | ".join(names))

    def seq(item: str, sep: str) -> str:
        return f"{item} ({sep} {item})*" if parallel else item

    triggers: tuple[str, ...] = ()
    if fmt.body == "wrapped":
        one = '"{\\"tool_call\\": " call "}"'
        many = '"{\\"tool_calls\\": [" call (", " call)* "]}"'
        body = f"{one} | {many}" if parallel else one
        start = f"start: {body}" if options.forced else f"start: {body} | reply\nreply: {REPLY}"
    elif fmt.body == "list":
        lazy = not options.forced
        items = seq("call", '", "')
        region = " ".join(x for x in ("" if lazy else lit(fmt.starts[0]), lit(fmt.open_text), '"["', items, '"]"',
                                      lit(fmt.close_text), lit(fmt.end)) if x)
        start = f"start: {region}"
        triggers = fmt.starts[:1] if lazy else ()
    else:
        lazy = not options.forced and not fmt.leading
        opener = lit(fmt.starts[0]) if fmt.starts else ""
        after = " ".join(x for x in (lit(fmt.open_text), "call", lit(fmt.close_text), lit(fmt.end)) if x)
        rules.append(f"after: {after}")
        rules.append(f"region: {opener} after" if opener else "region: after")
        first = "after" if lazy else "region"  # lazy: the grammar starts after the marker that triggered it
        sep = lit(fmt.separator)
        body = first + ((f" ({sep} region)*" if sep else " region*") if parallel else "")
        if fmt.leading:  # Llama: the answer opens with the call's JSON, or the python tag, or is a reply
            body = f"call | {body}"
            start = f"start: {body}" if options.forced else f"start: {body} | reply\nreply: {REPLY_NOT_TAG}"
        else:
            start = f"start: {body}"
            triggers = fmt.starts[:1] if lazy else ()
    return ToolGrammar("\n".join([start, *rules]) + "\n", triggers)


# --- FunctionGemma's value syntax (strings between <escape> tokens, bare keys) -----------------------------------

def _fg_rules(name: str, schema: Any) -> list[str]:
    rules: list[str] = []
    counter = [0]

    def fresh() -> str:
        counter[0] += 1
        return f"{name}_{counter[0]}"

    def value(s: Any) -> str:
        if not isinstance(s, dict) or s is True:
            return _fg_any(fresh(), rules)
        if "enum" in s:
            return "(" + " | ".join(_quote(_fg_scalar(v)) for v in s["enum"]) + ")"
        if "const" in s:
            return _quote(_fg_scalar(s["const"]))
        kind = s.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(value({**s, "type": k}) for k in kind) + ")"
        if kind == "string":
            return f'"{ESCAPE}" /[^<]*/ "{ESCAPE}"'
        if kind == "integer":
            return r"/-?(0|[1-9][0-9]{0,15})/"
        if kind == "number":
            return r"/-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,15})?/"
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = value(s.get("items", {}))
            r = fresh()
            rules.append(f'{r}: "[" ({item} ("," {item})*)? "]"')
            return r
        if kind == "object" or "properties" in s:
            return obj(s)
        return _fg_any(fresh(), rules)

    def obj(s: dict[str, Any]) -> str:
        props = list((s.get("properties") or {}).items())
        required = set(s.get("required") or ())
        r = fresh()
        if not props:
            rules.append(f'{r}: "{{" "}}"')
            return r
        # chain: tail_k = the properties from k on, each optional one may be left out, commas between those written
        tails = [fresh() for _ in props] + [None]
        for k, (key, sub) in enumerate(props):
            item = f'"{key}:" {value(sub)}'
            rest = tails[k + 1]
            later_required = any(p in required for p, _ in props[k + 1:])
            with_rest = f'{item} ("," {rest})' if rest and later_required else (
                f'{item} ("," {rest})?' if rest else item)
            if key in required:
                rules.append(f"{tails[k]}: {with_rest}")
            elif rest:
                rules.append(f"{tails[k]}: {with_rest} | {rest}")
            else:
                rules.append(f"{tails[k]}: {with_rest}")
        # with no property required, the empty object too
        body = tails[0] if any(p in required for p, _ in props) else f"{tails[0]}?"
        rules.append(f'{r}: "{{" {body} "}}"')
        return r

    top = value(schema)
    rules.append(f"{name}: {top}")
    return rules


def _fg_scalar(v: Any) -> str:
    return ESCAPE + v + ESCAPE if isinstance(v, str) else json.dumps(v)


def _fg_any(name: str, rules: list[str]) -> str:
    rules.append(f'{name}: "{ESCAPE}" /[^<]*/ "{ESCAPE}" | /-?[0-9]+(\\.[0-9]+)?/ | "true" | "false" | "null"')
    return name
