"""How each model family writes a tool call: one table (:data:`FORMATS`), read by the parser, the constraint builder
and the prompt preparation alike.  A family is recognised from its chat template's text (:func:`detect`); a template
with no tools branch gets the generic format (the tools described in a system message edgelm writes, the answer
either a call in JSON or a plain reply, as llama.cpp's generic format).

A row says what opens a call (``starts``: markers the model writes, consumed; ``leading``: texts that open a call only
at the start of the answer and belong to it), what closes it (``end``; "" = the end of the answer), how the call is
written (``body``), where the tools go in the prompt (``tools_in``), and how an earlier call is shown to the model
again (by the template, or written into the assistant's content by edgelm, ``calls_in_content``).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any, Sequence

BODIES = ("object", "list", "wrapped", "functiongemma")
TOOLS_IN = ("template", "system_field", "system_prompt")


@dataclass(frozen=True)
class ToolFormat:
    name: str
    families: str  # who writes it (documentation)
    detect: tuple[tuple[str, ...], ...]  # any group whose texts all appear in the chat template; () = the fallback
    starts: tuple[str, ...] = ()  # markers that open a call (consumed; the call follows)
    leading: tuple[str, ...] = ()  # texts that open a call only at the start of the answer (part of the call)
    end: str = ""  # marker that closes one call region ("" = the end of the answer)
    body: str = "object"  # "object": {"name", ARGS}; "list": a JSON list of those; "wrapped": the generic
    # {"tool_call": {...}} / {"tool_calls": [...]}; "functiongemma": call:NAME{key:<escape>text<escape>,...}
    args_key: str = "arguments"  # the key the family writes arguments under (Llama 3.1: "parameters")
    open_text: str = ""  # written between the start marker and the call (Hermes: a newline)
    close_text: str = ""  # written between the call and the end marker
    separator: str = ""  # written between two call regions
    parallel: bool = True  # the family can answer with several calls (Llama 3.1's template refuses more than one)
    tools_in: str = "template"  # "template": the template's tools variable; "system_field": the system message's
    # "tools" field, as JSON text (Phi-4-mini); "system_prompt": a system message edgelm writes (generic)
    calls_in_content: bool = False  # the template does not write an assistant's tool_calls: edgelm writes them
    # into its content, in the family's syntax
    call_id: str = "call"  # "call": call_ + 24 hex digits (OpenAI's); "alnum9": 9 letters or digits (Mistral's
    # templates refuse any other id)
    template: str = ""  # the known chat_template name that writes this format (edgelm/data/chat_templates/NAME.jinja)

    def __post_init__(self) -> None:
        assert self.body in BODIES and self.tools_in in TOOLS_IN, self

    @property
    def markers(self) -> tuple[str, ...]:
        """Every text that opens a call (the lazy constraint's triggers)."""
        return self.starts + self.leading

    def new_id(self) -> str:
        import secrets  # ~5 ms of imports (base64, hmac), wanted only once a call is made

        if self.call_id == "alnum9":
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return "call_" + secrets.token_hex(12)

    def write(self, calls: Sequence[tuple[str, Any]], *, ids: Sequence[str] = ()) -> str:
        """The text the family's model writes for ``calls`` ((name, arguments object) pairs): what an assistant
        message holds when the template does not write tool_calls itself, and what the tests parse back."""
        if self.body == "wrapped":
            items = [{"name": n, self.args_key: a} for n, a in calls]
            payload = {"tool_call": items[0]} if len(items) == 1 else {"tool_calls": items}
            return json.dumps(payload, ensure_ascii=False)
        if self.body == "list":
            items = [{"name": n, self.args_key: a} for n, a in calls]
            if self.call_id == "alnum9" and ids:
                items = [{**item, "id": i} for item, i in zip(items, ids)]
            return self.starts[0] + self.open_text + json.dumps(items, ensure_ascii=False) + self.close_text + self.end
        regions = []
        for name, args in calls:
            if self.body == "functiongemma":
                call = f"call:{name}{functiongemma_value(args)}"
            else:
                call = json.dumps({"name": name, self.args_key: args}, ensure_ascii=False)
            opener = self.starts[0] if self.starts else ""
            regions.append(opener + self.open_text + call + self.close_text + self.end)
        return self.separator.join(regions)


ESCAPE = "<escape>"


def functiongemma_value(value: Any) -> str:
    """A JSON value in FunctionGemma's syntax: strings between <escape> tokens, keys bare."""
    if isinstance(value, str):
        return ESCAPE + value + ESCAPE
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{functiongemma_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(functiongemma_value(v) for v in value) + "]"
    return json.dumps(value)


# Detection runs top to bottom: the first row whose markers the template holds wins (SmolLM3 and Hermes both write
# <tool_call>, Granite and Phi-4-mini both use <|tool_call|>: the more specific row comes first).
FORMATS: tuple[ToolFormat, ...] = (
    ToolFormat("smollm3", "SmolLM3", detect=(("<tool_call>", "xml_tools"),), starts=("<tool_call>",),
               end="</tool_call>", open_text="\n", close_text="\n", separator="\n", calls_in_content=True,
               template="smollm3"),
    ToolFormat("functiongemma", "FunctionGemma (Gemma 3 270M)", detect=(("<start_function_call>",),
               ("<start_function_declaration>",)), starts=("<start_function_call>",), end="<end_function_call>",
               body="functiongemma", template="functiongemma"),
    ToolFormat("granite", "Granite 3.x", detect=(("<|tool_call|>", "<|start_of_role|>"),), starts=("<|tool_call|>",),
               body="list", template="granite3"),
    ToolFormat("phi4", "Phi-4-mini", detect=(("<|tool_call|>",), ("<|tool|>",)), starts=("<|tool_call|>",),
               end="<|/tool_call|>", body="list", tools_in="system_field", calls_in_content=True,
               template="phi4-mini"),
    ToolFormat("hermes", "Hermes 2 Pro, Qwen 2.5, Qwen 3 (and their fine-tunes)", detect=(("<tool_call>",),),
               starts=("<tool_call>",), end="</tool_call>", open_text="\n", close_text="\n", separator="\n",
               template="hermes"),
    ToolFormat("mistral", "Mistral 7B v0.3, Mistral Nemo, Mixtral", detect=(("[TOOL_CALLS]",), ("[AVAILABLE_TOOLS]",)),
               starts=("[TOOL_CALLS]",), open_text=" ", body="list", call_id="alnum9", template="mistral-v3"),
    ToolFormat("llama3", "Llama 3.1, 3.2, 3.3", detect=(("<|python_tag|>",), ("<|start_header_id|>", "tools"),),
               starts=("<|python_tag|>",), leading=("{",), args_key="parameters", parallel=False,
               template="llama3.1"),
    ToolFormat("generic", "every other chat model (SmolLM2, Gemma 3, Phi-3, ...)", detect=(), leading=("{",),
               body="wrapped", tools_in="system_prompt", calls_in_content=True),
)

BY_NAME = {f.name: f for f in FORMATS}
GENERIC = BY_NAME["generic"]
TEMPLATE_NAMES = tuple(f.template for f in FORMATS if f.template)


def detect(template: str | None) -> ToolFormat:
    """The tool-call format a chat template writes; the generic one for a template without a tools branch."""
    text = template or ""
    for fmt in FORMATS:
        if any(all(marker in text for marker in group) for group in fmt.detect):
            return fmt
    return GENERIC
