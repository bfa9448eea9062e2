"""The tool options of chat (declared once, like every option: :class:`ToolOptions`) and the checks of what a caller
passes: the tool list (OpenAI's shape, which Ollama shares) and ``tool_choice``.  Errors name the field."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from edgelm.declarations import by_name, from_dataclass, setting
from edgelm.errors import InvalidParameterError
from edgelm.params import GenerationKwargs

CHOICES = ("auto", "none", "required")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names (plus "." that Ollama allows)
_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@dataclass(frozen=True)
class ToolOptions:
    """Tool calling, on :meth:`edgelm.Model.chat` / ``stream_chat`` and the chat routes of the server (OpenAI: the
    request's fields; Ollama: ``tools`` in the request, ``tool_choice`` and ``parallel_tool_calls`` as ``options``
    keys, an edgelm extension since Ollama's API has no such fields)."""

    tools: tuple[dict[str, Any], ...] = setting(
        (), "Functions the model may call: OpenAI's [{\"type\": \"function\", \"function\": {\"name\", "
        "\"description\", \"parameters\": JSON Schema}}]. Calls come back in Completion.tool_calls, their arguments "
        "valid against the schema.", kind="object", openai=("tools",), example=(WEATHER,), default_factory=tuple)
    tool_choice: Any = setting(
        "auto", "auto (the model decides), none (no call), required (at least one call) or "
        "{\"type\": \"function\", \"function\": {\"name\": ...}} (that call).", kind="object",
        openai=("tool_choice",), ollama=("tool_choice",), example="required")
    parallel_tool_calls: bool = setting(
        True, "Allow several calls in one answer.", kind="bool", openai=("parallel_tool_calls",),
        ollama=("parallel_tool_calls",), example=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", validate_tools(self.tools))
        object.__setattr__(self, "tool_choice", validate_tool_choice(self.tool_choice, self.tools))
        if not isinstance(self.parallel_tool_calls, bool):
            raise InvalidParameterError(f"Invalid parallel_tool_calls: {self.parallel_tool_calls!r}.",
                                        fix="Pass true or false.", parameter="parallel_tool_calls",
                                        value=self.parallel_tool_calls)

    @property
    def active(self) -> bool:
        """True when the answer may hold calls (tools given and tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced(self) -> bool:
        """True when the answer must be a call (required, or a named tool): the whole output is constrained."""
        return self.active and self.tool_choice != "auto"

    @property
    def allowed(self) -> tuple[dict[str, Any], ...]:
        """The tools a call may name (one, for a named tool_choice)."""
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return tuple(t for t in self.tools if t["function"]["name"] == name)
        return self.tools


TOOLS = from_dataclass(ToolOptions)
TOOL_NAMES = tuple(f.name for f in fields(ToolOptions))
_BY_NAME = by_name(TOOLS)


class ChatKwargs(GenerationKwargs, total=False):
    """The keyword arguments of Model.chat/stream_chat/chat_batch: the generation parameters and the tool options
    (:class:`ToolOptions`; ``tests/test_options_declared_once.py`` checks they match)."""

    tools: Sequence[Mapping[str, Any]]
    tool_choice: str | Mapping[str, Any]
    parallel_tool_calls: bool


def split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], ToolOptions]:
    """(the generation parameters, the tool options) of chat's keyword arguments."""
    tool_args = {k: kwargs.pop(k) for k in list(kwargs) if k in _BY_NAME}
    tool_args = {k: v for k, v in tool_args.items() if v is not None}
    return kwargs, ToolOptions(**tool_args)


def _bad(parameter: str, value: Any, message: str, fix: str) -> InvalidParameterError:
    return InvalidParameterError(f"Invalid {parameter}: {message}", fix=fix, parameter=parameter, value=value)


_TOOL_FIX = ('Each tool is {"type": "function", "function": {"name": "get_weather", "description": "...", '
             '"parameters": {"type": "object", "properties": {...}}}}.')


def validate_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """The tools in OpenAI's shape, checked: a list of functions with unique names and JSON Schema parameters.
    A bare {"name", "parameters"} (no "function" wrapper) is accepted too."""
    if tools is None:
        return ()
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise _bad("tools", tools, f"{tools!r:.80} is not a list.", "Pass a list of tools. " + _TOOL_FIX)
    out = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise _bad(where, tool, f"{tool!r:.80} is not an object.", _TOOL_FIX)
        kind = tool.get("type", "function")
        if kind != "function":
            raise _bad(f"{where}.type", kind, f"{kind!r} is not supported.", 'Only "function" tools are.')
        function = tool.get("function", tool if "name" in tool else None)
        if not isinstance(function, Mapping):
            raise _bad(f"{where}.function", function, "missing or not an object.", _TOOL_FIX)
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(f"{where}.function.name", name, f"{name!r:.80} is not a function name.",
                       "A name is 1-64 letters, digits, '_', '-' or '.'.")
        if name in seen:
            raise _bad(f"{where}.function.name", name, f"{name!r} is given twice.", "Give each tool its own name.")
        seen.add(name)
        description = function.get("description", "")
        if description is not None and not isinstance(description, str):
            raise _bad(f"{where}.function.description", description, "not a string.", "Describe it in words.")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        check_schema(parameters, f"{where}.function.parameters")
        clean = {"name": name, "description": description or "", "parameters": dict(parameters)}
        if function.get("strict") is not None:
            clean["strict"] = function["strict"]
        out.append({"type": "function", "function": clean})
    return tuple(out)


def check_schema(schema: Any, parameter: str) -> None:
    """Refuse what is not a JSON Schema of an object (a call's arguments are an object)."""
    fix = 'Parameters are a JSON Schema object: {"type": "object", "properties": {"city": {"type": "string"}}}.'
    if not isinstance(schema, Mapping):
        raise _bad(parameter, schema, f"{schema!r:.80} is not a JSON Schema object.", fix)
    kind = schema.get("type", "object")
    if kind != "object":
        raise _bad(parameter, schema, f"type {kind!r}: a call's arguments are an object.", fix)
    _walk(schema, parameter, fix)
    try:
        import jsonschema  # optional: the full meta-schema check where it is installed
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise _bad(parameter + path, schema, f"not a valid JSON Schema ({exc.message}).", fix) from None


def _walk(schema: Any, where: str, fix: str) -> None:
    """The structural checks every schema gets (jsonschema, when installed, checks the rest)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise _bad(where, schema, f"{schema!r:.80} is not a schema.", fix)
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _TYPES:
            raise _bad(f"{where}.type", k, f"{k!r} is not a JSON Schema type.", f"Use one of {', '.join(_TYPES)}.")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, Mapping):
            raise _bad(f"{where}.properties", props, "not an object.", fix)
        for key, sub in props.items():
            _walk(sub, f"{where}.properties.{key}", fix)
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise _bad(f"{where}.required", required, "not a list of property names.", fix)
    if "items" in schema and not isinstance(schema["items"], (Mapping, bool, list)):
        raise _bad(f"{where}.items", schema["items"], "not a schema.", fix)


def validate_tool_choice(choice: Any, tools: tuple[dict[str, Any], ...]) -> Any:
    """"auto" | "none" | "required" | {"type": "function", "function": {"name": NAME}} (NAME one of the tools)."""
    fix = ('tool_choice is "auto", "none", "required" or {"type": "function", "function": {"name": ...}} naming '
           'one of the tools.')
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise _bad("tool_choice", choice, f"{choice!r}.", fix)
        if choice == "required" and not tools:
            raise _bad("tool_choice", choice, '"required" with no tools to call.', "Pass tools=[...] too.")
        return choice
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise _bad("tool_choice", choice, f"{choice!r:.80}.", fix)
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            raise _bad("tool_choice.function.name", name, f"{name!r} is not one of the tools "
                       f"({', '.join(names) or 'none given'}).", fix)
        return {"type": "function", "function": {"name": name}}
    raise _bad("tool_choice", choice, f"{choice!r:.80}.", fix)
