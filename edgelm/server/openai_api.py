"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models (a thin adapter over
core)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgelm.chat import validate_messages
from edgelm.model import collect
from edgelm.params import GenerationParams
from edgelm.settings import field_table, generation
from edgelm.tools.spec import TOOLS, split

from . import core
from .errors import RequestError, openai_error

# OpenAI request field -> GenerationParams name, from edgelm.settings (top_k, min_p, repeat_penalty, grammar, ... are
# llama.cpp-server-style extensions)
FIELDS = field_table(generation(), "openai")


def params_from(body: dict[str, Any]) -> dict[str, Any]:
    params = {FIELDS[k]: v for k, v in body.items() if k in FIELDS and v is not None}
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(400, f"n={n!r} is not supported: one choice per request.", param="n")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            params["constraint"] = core.json_constraint(None, param="response_format")
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise RequestError(400, "response_format.json_schema.schema must be a JSON Schema object.",
                                   param="response_format.json_schema.schema")
            params["constraint"] = core.json_constraint(spec["schema"], param="response_format.json_schema.schema")
        elif kind != "text":
            raise RequestError(400, f"Unsupported response_format {fmt!r}.", param="response_format")
    GenerationParams().merged(**params)  # validate now: errors name the field, before any model is loaded
    return params


# OpenAI request field -> tool option (tools, tool_choice, parallel_tool_calls), from edgelm.tools.spec
TOOL_FIELDS = field_table(TOOLS, "openai")


def tool_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """The request's tool options, checked now (a bad tool is a 400 naming its field, before any model loads)."""
    given = {TOOL_FIELDS[k]: v for k, v in body.items() if k in TOOL_FIELDS and v is not None}
    split(dict(given))
    return given


def _stream_options(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options") or {}
    return bool(isinstance(opts, dict) and opts.get("include_usage"))


async def chat_completions(request: Request, body: dict[str, Any]) -> Response:
    app = request.app.state.edgelm
    entry = app.registry.entry(body.get("model", app.default_name()))
    messages = validate_messages(body.get("messages"))
    params = params_from(body)
    tools = tool_kwargs(body)
    gen = await core.start(app.registry, entry, lambda m: m.stream_chat(messages, **params, **tools),
                           size=request.state.body_bytes)
    return await _respond(app, entry.name, gen, body, chat=True)


async def completions(request: Request, body: dict[str, Any]) -> Response:
    app = request.app.state.edgelm
    entry = app.registry.entry(body.get("model", app.default_name()))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(400, "prompt must be a string.", param="prompt")
    params = params_from(body)
    gen = await core.start(app.registry, entry, lambda m: m.stream(prompt, **params), size=request.state.body_bytes)
    return await _respond(app, entry.name, gen, body, chat=False)


async def _respond(app: Any, name: str, gen: core.Generation, body: dict[str, Any], *, chat: bool) -> Response:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    if not body.get("stream"):
        chunks = [chunk async for chunk in gen.chunks()]
        done = collect(iter(chunks))
        last = chunks[-1]
        app.metrics.generation(name, last)
        text = done.text
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if done.tool_calls:
            message = {"role": "assistant", "content": text or None,
                       "tool_calls": [c.to_dict() for c in done.tool_calls]}
        choice = ({"index": 0, "message": message, "finish_reason": last.finish_reason}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason})
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": name, "choices": [choice],
                             "usage": last.usage.to_dict()})
    include_usage = _stream_options(body)

    def event(choice: dict[str, Any] | None, usage: Any = None) -> str:
        data = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": name,
                "choices": [choice] if choice is not None else []}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def sse():
        last = None
        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async for chunk in gen.chunks():
                last = chunk
                if chunk.text:
                    yield event({"index": 0, "delta": {"content": chunk.text}, "finish_reason": None} if chat else
                                {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": None})
                for delta in chunk.tool_calls:  # one call piece per event, as OpenAI streams them
                    yield event({"index": 0, "delta": {"tool_calls": [delta.to_dict()]}, "finish_reason": None})
            yield event({"index": 0, "delta": {}, "finish_reason": last.finish_reason} if chat else
                        {"index": 0, "text": "", "logprobs": None, "finish_reason": last.finish_reason},
                        usage=None)
            if include_usage:
                yield event(None, usage=last.usage.to_dict())
            app.metrics.generation(name, last)
        except Exception as exc:  # after the first byte: end the stream with an error event, never hang
            yield f"data: {json.dumps(openai_error(exc))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def embeddings(request: Request, body: dict[str, Any]) -> Response:
    """input: a string, a list of strings, a token list or a list of them; encoding_format float (default) or
    base64 (little-endian float32, what the official client asks for); vectors are L2-normalized, mean-pooled
    (extension: "pooling": "mean" | "last" | "cls")."""
    app = request.app.state.edgelm
    entry = app.registry.entry(body.get("model", app.default_name()))
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError(400, f"Unsupported encoding_format {fmt!r}: use \"float\" or \"base64\".",
                           param="encoding_format")
    if "input" not in body:
        raise RequestError(400, "input is required: a string, a list of strings, or token lists.", param="input")
    pooling = body.get("pooling") or "mean"
    dims = body.get("dimensions")
    done = await core.call(app.registry, entry, lambda m: core.embed_inputs(
        m, body["input"], param="input", truncate=False, normalize=True, pooling=pooling))
    if dims is not None and dims != done.vectors.shape[1]:
        raise RequestError(400, f"dimensions={dims!r}: this model's embeddings have {done.vectors.shape[1]}.",
                           param="dimensions")
    data = []
    for i, v in enumerate(done.vectors):
        vector: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if fmt == "base64"
                       else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return JSONResponse({"object": "list", "data": data, "model": entry.name,
                         "usage": {"prompt_tokens": done.prompt_tokens, "total_tokens": done.prompt_tokens}})


async def list_models(request: Request) -> Response:
    app = request.app.state.edgelm
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": app.started, "owned_by": "edgelm"} for name in app.registry.names()]})
