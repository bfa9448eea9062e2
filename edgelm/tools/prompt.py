"""A conversation with tools, made ready for the model's own chat template: the tools go where the family's template
reads them (its ``tools`` variable, as transformers passes it; the system message's "tools" field; or a system
message edgelm writes for a template without a tools branch), earlier calls and their results go in the shape the
template expects (arguments as objects, as transformers' templates take them; written into the content where the
template has no place for them)."""

from __future__ import annotations

import json
from typing import Any, Mapping

from edgelm.errors import InvalidParameterError

from .formats import ToolFormat
from .spec import ToolOptions


def _bad(parameter: str, value: Any, message: str, fix: str) -> InvalidParameterError:
    return InvalidParameterError(f"Invalid {parameter}: {message}", fix=fix, parameter=parameter, value=value)


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise _bad(where, value, f"not JSON ({exc.msg}).", "Send the arguments the model gave, unchanged.") from None
    if not isinstance(value, Mapping):
        raise _bad(where, value, "not an object.", "A call's arguments are a JSON object.")
    return dict(value)


def calls_of(message: Mapping[str, Any], i: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls in OpenAI's shape, their arguments as objects (OpenAI sends JSON text,
    Ollama an object); errors name the field."""
    raw = message.get("tool_calls") or []
    if not isinstance(raw, list):
        raise _bad(f"messages[{i}].tool_calls", raw, "not a list.", "Send the tool_calls the model gave.")
    out = []
    for j, call in enumerate(raw):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise _bad(where, call, "no function name.", 'A call is {"id", "type": "function", "function": '
                       '{"name", "arguments"}}.')
        out.append({"id": str(call.get("id") or f"call_{i}_{j}"), "type": "function",
                    "function": {"name": function["name"],
                                 "arguments": _arguments(function.get("arguments", {}), where + ".function.arguments")}})
    return out


def prepare(messages: list[dict[str, Any]], options: ToolOptions, fmt: ToolFormat) -> tuple[list[dict[str, Any]],
                                                                                              dict[str, Any]]:
    """(messages, extra template variables) to render ``messages`` with ``options``' tools in ``fmt``."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        message = dict(message)
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = calls_of(message, i)
            names.update({c["id"]: c["function"]["name"] for c in calls})
            if fmt.calls_in_content:
                written = fmt.write([(c["function"]["name"], c["function"]["arguments"]) for c in calls],
                                    ids=[c["id"] for c in calls])
                content = message.get("content") or ""
                message = {"role": "assistant", "content": (content + "\n" if content else "") + written}
            else:
                message["tool_calls"] = calls
        elif message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            name = message.get("name") or message.get("tool_name") or names.get(str(call_id), "")
            message = {**message, "name": name}
            if fmt.tools_in == "system_prompt":  # a template with no tools branch: the result as a user turn
                result = {"tool_response": {"name": name, "content": message.get("content", "")}}
                if out and out[-1].get("role") == "user" and out[-1].get("_tool_result"):
                    out[-1]["content"] += "\n" + json.dumps(result, ensure_ascii=False)
                    continue
                message = {"role": "user", "content": json.dumps(result, ensure_ascii=False), "_tool_result": True}
        out.append(message)
    for message in out:
        message.pop("_tool_result", None)
    extra: dict[str, Any] = {}
    if not options.active:
        return out, extra
    functions = [t["function"] for t in options.tools]
    if fmt.tools_in == "template":
        extra["tools"] = [dict(t) for t in options.tools]
    elif fmt.tools_in == "system_field":
        out = _with_system(out, "You are a helpful assistant with some tools.")
        out[0]["tools"] = json.dumps(functions, ensure_ascii=False)
    else:
        out = _with_system(out, "")
        system = out[0]
        text = generic_system_prompt(functions, options, fmt)
        system["content"] = (system["content"] + "\n\n" + text) if system["content"] else text
    return out, extra


def _with_system(messages: list[dict[str, Any]], default: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        return [dict(messages[0])] + messages[1:]
    return [{"role": "system", "content": default}] + messages


def generic_system_prompt(functions: list[dict[str, Any]], options: ToolOptions, fmt: ToolFormat) -> str:
    """The system message that describes the tools to a model whose template has no tools branch."""
    listed = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    one = '{"tool_call": {"name": "<function name>", "%s": {<arguments>}}}' % fmt.args_key
    many = '{"tool_calls": [{"name": "<function name>", "%s": {<arguments>}}, ...]}' % fmt.args_key
    how = f"To call a function, answer with only this JSON: {one}"
    if options.parallel_tool_calls:
        how += f" (several calls: {many})"
    if options.forced:
        return f"You have these functions:\n{listed}\n{how}."
    return f"You have these functions:\n{listed}\n{how}. Otherwise answer the user in plain text."
