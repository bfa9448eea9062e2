"""Tool calls out of a model's answer, as it streams: the text before (and between) calls is content, each call
becomes an id, a name and its arguments' JSON text, streamed as OpenAI streams them (the name first, then pieces of
the arguments as they are generated).  What opens, closes and holds a call comes from the family's row of
:data:`edgelm.tools.formats.FORMATS`; nothing here knows a family by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from edgelm.types import ToolCall, ToolCallDelta

from .formats import ESCAPE, ToolFormat

_WS = " \t\r\n"


class Malformed(ValueError):
    """The text of a call region is not what the format writes."""


@dataclass
class Node:
    """A JSON value found in a text that may still be growing: ``end`` is None until the value is complete."""

    kind: str  # "object" | "array" | "string" | "scalar"
    start: int
    end: int | None = None
    items: list[tuple[Any, "Node | None"]] = field(default_factory=list)  # object: (key, value); array: (i, value)


def _ws(t: str, i: int) -> int:
    while i < len(t) and t[i] in _WS:
        i += 1
    return i


def scan(t: str, i: int = 0) -> tuple[Node | None, int]:
    """The JSON value starting at ``t[i]`` (after whitespace), complete or not; raises Malformed on a text that can
    never become JSON."""
    i = _ws(t, i)
    if i >= len(t):
        return None, i
    c = t[i]
    if c == "{":
        return _object(t, i)
    if c == "[":
        return _array(t, i)
    if c == '"':
        return _string(t, i)
    j = i
    while j < len(t) and t[j] not in ",]}" + _WS:
        j += 1
    if not re.fullmatch(r"-?[0-9.eE+\-]*|t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?", t[i:j]):
        raise Malformed(f"not a JSON value at {t[i:j]!r:.40}")
    return Node("scalar", i, j if j < len(t) else None), j


def _string(t: str, i: int) -> tuple[Node, int]:
    j = i + 1
    while j < len(t):
        if t[j] == "\\":
            j += 2
            continue
        if t[j] == '"':
            return Node("string", i, j + 1), j + 1
        j += 1
    return Node("string", i), len(t)


def _object(t: str, i: int) -> tuple[Node, int]:
    node = Node("object", i)
    j = _ws(t, i + 1)
    if j < len(t) and t[j] == "}":
        node.end = j + 1
        return node, j + 1
    while True:
        j = _ws(t, j)
        if j >= len(t):
            return node, j
        if t[j] != '"':
            raise Malformed(f"expected a key at {t[j:j + 20]!r}")
        key, j = _string(t, j)
        if key.end is None:
            return node, j
        name = json.loads(t[key.start:key.end])
        j = _ws(t, j)
        if j >= len(t):
            return node, j
        if t[j] != ":":
            raise Malformed(f"expected ':' at {t[j:j + 20]!r}")
        value, j = scan(t, j + 1)
        node.items.append((name, value))
        if value is None or value.end is None:
            return node, j
        j = _ws(t, j)
        if j >= len(t):
            return node, j
        if t[j] == ",":
            j += 1
        elif t[j] == "}":
            node.end = j + 1
            return node, j + 1
        else:
            raise Malformed(f"expected ',' or '}}' at {t[j:j + 20]!r}")


def _array(t: str, i: int) -> tuple[Node, int]:
    node = Node("array", i)
    j = _ws(t, i + 1)
    if j < len(t) and t[j] == "]":
        node.end = j + 1
        return node, j + 1
    while True:
        value, j = scan(t, j)
        node.items.append((len(node.items), value))
        if value is None or value.end is None:
            return node, j
        j = _ws(t, j)
        if j >= len(t):
            return node, j
        if t[j] == ",":
            j += 1
        elif t[j] == "]":
            node.end = j + 1
            return node, j + 1
        else:
            raise Malformed(f"expected ',' or ']' at {t[j:j + 20]!r}")


@dataclass
class Partial:
    """A call as far as it has been generated."""

    name: str | None
    arguments: str  # the arguments' JSON text so far
    complete: bool


def _call_of(t: str, node: Node | None, fmt: ToolFormat) -> Partial | None:
    if node is None:
        return None
    if node.kind != "object":
        raise Malformed("a call is not a JSON object")
    name, args = None, None
    for key, value in node.items:
        if key == "name" and value is not None and value.end is not None:
            if value.kind != "string":
                raise Malformed("the call's name is not a string")
            name = json.loads(t[value.start:value.end])
        elif key in (fmt.args_key, "arguments", "parameters") and value is not None:
            args = value
    if node.end is not None and args is None:  # a call with no arguments written: {}
        return Partial(name, "{}", True)
    text = "" if args is None else t[args.start:args.end if args.end is not None else len(t)]
    return Partial(name, text.rstrip(_WS) if args is not None and args.end is None else text,
                   node.end is not None)


_FG_CALL = re.compile(r"\s*call:([A-Za-z0-9_.\-]+)(\{.*)?", re.S)


def calls_in(region: str, fmt: ToolFormat, *, final: bool) -> list[Partial]:
    """The calls a region of the answer holds so far (``final``: nothing more will come)."""
    if fmt.body == "functiongemma":
        m = _FG_CALL.match(region)
        if m is None:
            if final or not "call:".startswith(region.strip()[:5]):
                raise Malformed(f"not a FunctionGemma call: {region!r:.40}")
            return []
        if m.group(2) is None and not final:
            return []  # the name may still be growing
        body = m.group(2) or ""
        done = final or fmt.end == ""
        if not done:
            return [Partial(m.group(1), "", False)]
        value, rest = functiongemma_parse(body, 0)
        if rest.strip():
            raise Malformed(f"text after a FunctionGemma call: {rest!r:.40}")
        if not isinstance(value, dict):
            raise Malformed("FunctionGemma arguments are not an object")
        return [Partial(m.group(1), json.dumps(value, ensure_ascii=False), True)]
    root, end = scan(region)
    if root is not None and root.end is not None and region[end:].strip(_WS):
        raise Malformed(f"text after the call: {region[end:]!r:.40}")
    if root is None:
        return []
    if fmt.body == "object":
        found = [_call_of(region, root, fmt)]
    elif fmt.body == "list":
        items = [v for _, v in root.items] if root.kind == "array" else [root]
        found = [_call_of(region, v, fmt) for v in items]
    else:  # wrapped: {"tool_call": {...}} or {"tool_calls": [...]}
        if root.kind != "object":
            raise Malformed("the answer is not a JSON object")
        found = []
        for key, value in root.items:
            if key == "tool_call":
                found.append(_call_of(region, value, fmt))
            elif key == "tool_calls" and value is not None:
                if value.kind != "array":
                    raise Malformed("tool_calls is not a list")
                found.extend(_call_of(region, v, fmt) for _, v in value.items)
            else:
                raise Malformed(f"unexpected key {key!r}")
    return [c for c in found if c is not None]


def functiongemma_parse(t: str, i: int) -> tuple[Any, str]:
    """A value in FunctionGemma's syntax at ``t[i]``: (the value, the text after it)."""
    value, j = _fg_value(t, i)
    return value, t[j:]


def _fg_value(t: str, i: int) -> tuple[Any, int]:
    i = _ws(t, i)
    if t.startswith(ESCAPE, i):
        j = t.find(ESCAPE, i + len(ESCAPE))
        if j < 0:
            raise Malformed("an <escape> string never closed")
        return t[i + len(ESCAPE):j], j + len(ESCAPE)
    if t.startswith("{", i):
        out: dict[str, Any] = {}
        j = _ws(t, i + 1)
        if t.startswith("}", j):
            return out, j + 1
        while True:
            k = t.find(":", j)
            if k < 0:
                raise Malformed("a FunctionGemma key without ':'")
            key = t[j:k].strip()
            out[key], j = _fg_value(t, k + 1)
            j = _ws(t, j)
            if t.startswith(",", j):
                j += 1
            elif t.startswith("}", j):
                return out, j + 1
            else:
                raise Malformed(f"expected ',' or '}}' at {t[j:j + 20]!r}")
    if t.startswith("[", i):
        items: list[Any] = []
        j = _ws(t, i + 1)
        if t.startswith("]", j):
            return items, j + 1
        while True:
            item, j = _fg_value(t, j)
            items.append(item)
            j = _ws(t, j)
            if t.startswith(",", j):
                j += 1
            elif t.startswith("]", j):
                return items, j + 1
            else:
                raise Malformed(f"expected ',' or ']' at {t[j:j + 20]!r}")
    m = re.compile(r"-?\d+(\.\d+)?([eE][+\-]?\d+)?|true|false|null").match(t, i)
    if m is None:
        raise Malformed(f"not a FunctionGemma value at {t[i:i + 20]!r}")
    return json.loads(m.group(0)), m.end()


class ToolCallParser:
    """Feed it the answer's text as it streams; it gives back the content to show and the call deltas.

    ``feed(text)`` -> (content, deltas); ``finish()`` -> (content, deltas) at the end of the answer; then
    :attr:`calls` holds the finished :class:`ToolCall` records.  A region that turns out not to be a call (a model
    writing the marker in prose, without a constraint) is given back as content."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._buf = ""  # content held back (it may be the start of a marker)
        self._region: str | None = None  # the call region being read (None: reading content)
        self._opener = ""  # the marker that opened it (given back if the region is not a call)
        self._at_start = True  # nothing but whitespace shown yet: a leading text may still open a call
        self._after_call = False  # whitespace after a call is not content
        self._sent: list[_Sent] = []  # per call of the open region: what has been streamed of it
        self._base = 0  # index of the region's first call

    # --- content ----------------------------------------------------------------------------------------

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        self._step(text, out, deltas, final=False)
        return "".join(out), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        self._step("", out, deltas, final=True)
        return "".join(out), deltas

    def _step(self, text: str, out: list[str], deltas: list[ToolCallDelta], *, final: bool) -> None:
        while True:
            if self._region is not None:
                text = self._in_region(text, deltas, out, final=final)
                if self._region is not None:
                    return
                continue  # the region closed: what came after it is content again
            self._buf += text
            text = ""
            buf = self._buf
            if self._after_call:
                buf = buf.lstrip(_WS)
                if not buf and not final:
                    self._buf = ""
                    return
                self._after_call = False
            if self._at_start and self.fmt.leading:
                stripped = buf.lstrip(_WS)
                lead = next((m for m in self.fmt.leading if stripped.startswith(m)), None)
                if lead is not None:
                    self._buf = ""
                    self._open("", stripped)
                    text = ""
                    continue
                if not final and any(m.startswith(stripped) for m in self.fmt.leading):
                    self._buf = buf  # only whitespace so far, or part of a leading text
                    return
            hit = self._find_start(buf)
            if hit is not None:
                i, marker = hit
                if buf[:i].strip(_WS):
                    out.append(buf[:i])
                self._at_start = False
                self._buf = ""
                self._open(marker, "")
                text = buf[i + len(marker):]
                continue
            keep = 0 if final else held_back(buf, self.fmt.starts)
            shown = buf[:len(buf) - keep]
            if shown:
                out.append(shown)
                if shown.strip(_WS):
                    self._at_start = False
            self._buf = buf[len(buf) - keep:]
            return

    def _find_start(self, buf: str) -> tuple[int, str] | None:
        best = None
        for marker in self.fmt.starts:
            i = buf.find(marker)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, marker)
        return best

    # --- calls ------------------------------------------------------------------------------------------

    def _open(self, marker: str, text: str) -> None:
        self._region, self._opener = text, marker
        self._sent = []
        self._base = len(self.calls)

    def _in_region(self, text: str, deltas: list[ToolCallDelta], out: list[str], *, final: bool) -> str:
        """Add ``text`` to the open region; returns what follows the region's end marker (content again)."""
        assert self._region is not None
        region = self._region + text
        rest = ""
        closed = final
        if self.fmt.end:
            j = region.find(self.fmt.end)
            if j >= 0:
                region, rest, closed = region[:j], region[j + len(self.fmt.end):], True
            elif not final:
                keep = held_back(region, (self.fmt.end,))
                # the end marker may be arriving: parse only what cannot be part of it
                self._region = region
                self._emit(region[:len(region) - keep] if keep else region, deltas, final=False)
                return ""
        self._region = region
        if not closed:
            self._emit(region, deltas, final=False)
            return ""
        try:
            self._emit(region, deltas, final=True)
        except Malformed:
            if any(s.name for s in self._sent):  # deltas went out: the calls stand as far as they got (cut short)
                self.calls.extend(ToolCall(s.id, s.name, s.arguments) for s in self._sent if s.name)
                self._sent = []
            else:
                out.append(self._opener + region + (self.fmt.end if rest or not final else ""))
        self._region = None
        self._after_call = bool(self.calls)
        self._at_start = False
        return rest

    def _emit(self, region: str, deltas: list[ToolCallDelta], *, final: bool) -> None:
        try:
            partial = calls_in(region, self.fmt, final=final)
        except Malformed:
            if final:
                raise
            return  # a region that may still become a call when more comes; judged at its end
        for k, call in enumerate(partial):
            while len(self._sent) <= k:
                self._sent.append(_Sent(self.fmt.new_id()))
            state = self._sent[k]
            if call.name is None:
                break  # later calls wait for this one's name
            if not state.name:
                state.name = call.name
                deltas.append(ToolCallDelta(self._base + k, "", id=state.id, name=call.name))
            if len(call.arguments) > len(state.arguments) and call.arguments.startswith(state.arguments):
                deltas.append(ToolCallDelta(self._base + k, call.arguments[len(state.arguments):]))
                state.arguments = call.arguments
        if final:
            self._finalize(partial)

    def _finalize(self, partial: list[Partial]) -> None:
        states = self._sent
        if len(states) < len(partial) or any(c.name is None or not c.complete for c in partial):
            raise Malformed("an unfinished call")
        for state in states[:len(partial)]:
            json.loads(state.arguments or "{}")  # what was streamed must be JSON
        self.calls.extend(ToolCall(s.id, s.name, s.arguments or "{}") for s in states[:len(partial)])
        self._sent = []


@dataclass
class _Sent:
    id: str
    name: str = ""
    arguments: str = ""


def held_back(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that may be the beginning of one of ``markers``: a stream holds it
    back until the next text says (a call marker here, a stop string in edgelm.model)."""
    keep = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), keep, -1):
            if text.endswith(m[:n]):
                keep = n
                break
    return keep


def parse(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    parser = ToolCallParser(fmt)
    a, _ = parser.feed(text)
    b, _ = parser.finish()
    return a + b, parser.calls
