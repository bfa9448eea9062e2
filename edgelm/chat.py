"""Chat templates: the model's own Jinja template, rendered the way Hugging Face transformers renders it.

Both backends share this: the llama.cpp backend reads the template from the GGUF metadata, the onnxruntime
backend from chat_template.jinja or tokenizer_config.json; a template the user names at load
(edgelm.chat_templates) replaces it.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

from .errors import InvalidParameterError, NoChatTemplateError, UnsupportedModelError

# There is no fallback template: a model without one is never chatted with through a format it does not have
# (edgelm.model raises NoChatTemplateError; the user may name one, see edgelm.chat_templates).

ROLES = ("system", "user", "assistant", "tool", "developer")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the OpenAI-style message list and return plain dicts; errors name the bad entry."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidParameterError(
            f"Invalid messages: {messages!r:.80}.",
            fix='Pass a non-empty list like [{"role": "user", "content": "Hi"}].',
            parameter="messages",
            value=messages,
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParameterError(
                f"Invalid messages[{i}]: {message!r:.80} is not an object.",
                fix='Each message is {"role": ..., "content": ...}.',
                parameter=f"messages[{i}]",
                value=message,
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidParameterError(
                f"Invalid messages[{i}].role: {role!r}.",
                fix=f"role must be one of {', '.join(ROLES)}.",
                parameter=f"messages[{i}].role",
                value=role,
            )
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            texts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
            if len(texts) != len(content):
                raise InvalidParameterError(
                    f"Invalid messages[{i}].content: only text parts are supported by text models.",
                    fix="Send text content only.",
                    parameter=f"messages[{i}].content",
                    value=content,
                )
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidParameterError(
                f"Invalid messages[{i}].content: {content!r:.80}.",
                fix="content must be a string.",
                parameter=f"messages[{i}].content",
                value=content,
            )
        out.append({**message, "role": role, "content": content})
    return out


def _raise_exception(message: str) -> None:
    raise UnsupportedModelError(f"The model's chat template refused the conversation: {message}",
                                fix="Check the order of roles (many templates need user/assistant to alternate).")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except Exception as exc:  # jinja2.TemplateSyntaxError and friends
        raise UnsupportedModelError(
            f"The model's chat template does not parse: {exc}.", fix="Use generate() with your own prompt format."
        ) from exc


def render(
    template: str,
    messages: Any,
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    msgs = validate_messages(messages)
    if not template:
        raise NoChatTemplateError("No chat template to render the conversation with.",
                                  fix="Pass chat_template= (a Jinja string or a known name: chatml, llama3, gemma, "
                                  "mistral, phi3), or use generate() for plain completion.")
    compiled = _compile(template)
    return compiled.render(
        messages=msgs, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt, **extra
    )
