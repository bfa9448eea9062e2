"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON), /api/embed, /api/embeddings, /api/tags, /api/show,
/api/ps, /api/version."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgelm.chat import validate_messages
from edgelm.chat_templates import resolve
from edgelm.formats.gguf import read_header
from edgelm.loader import inspect
from edgelm.model import collect
from edgelm.params import GenerationParams
from edgelm.settings import field_table, generation
from edgelm.tools.spec import TOOLS, split
from edgelm.version import __version__

from . import core
from .errors import RequestError, ollama_error

# Ollama "options" key -> GenerationParams name, from edgelm.settings
OPTIONS = field_table(generation(), "ollama")
# ... -> tool option (tool_choice, parallel_tool_calls: edgelm's extensions; tools is a request field), edgelm.tools
TOOL_OPTIONS = field_table(TOOLS, "ollama")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def params_from(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "options must be an object.", param="options")
    params = {OPTIONS[k]: v for k, v in options.items() if k in OPTIONS and v is not None}
    if params.get("max_tokens") in (-1, -2):  # Ollama's "no limit"
        params.pop("max_tokens")
    fmt = body.get("format")
    if fmt == "json":
        params["constraint"] = core.json_constraint(None, param="format")
    elif isinstance(fmt, dict):
        params["constraint"] = core.json_constraint(fmt, param="format")
    elif fmt not in (None, ""):
        raise RequestError(400, f"Unsupported format {fmt!r}: use \"json\" or a JSON schema.", param="format")
    GenerationParams().merged(**params)
    return params


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a duration ("5m", "1h30m", "90s"); negative: keep loaded
    forever (inf); 0: unload once the request is done.  None when the request does not say."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = sign * float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise RequestError(400, f"keep_alive {value!r} is not a duration: use seconds or e.g. \"5m\", "
                                        "\"1h\", \"-1\" (forever).", param="keep_alive") from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise RequestError(400, f"keep_alive {value!r} is not a duration: use seconds or e.g. \"5m\".",
                           param="keep_alive")
    return float("inf") if seconds < 0 else seconds


def _entry(app: Any, body: dict[str, Any]) -> Any:
    """The model a request names, with the request's keep_alive applied to it."""
    entry = app.registry.entry(body.get("model"))
    keep = keep_alive_seconds(body.get("keep_alive"))
    if keep is not None:
        entry.keep_alive = keep
    return entry


async def chat(request: Request, body: dict[str, Any]) -> Response:
    app = request.app.state.edgelm
    entry = _entry(app, body)
    messages = validate_messages(body.get("messages"))
    params = params_from(body)
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    tools = {TOOL_OPTIONS[k]: v for k, v in options.items() if k in TOOL_OPTIONS and v is not None}
    if body.get("tools") is not None:
        tools["tools"] = body["tools"]
    split(dict(tools))  # a bad tool is a 400 naming its field, before any model loads
    started = time.perf_counter()
    gen = await core.start(app.registry, entry, lambda m: m.stream_chat(messages, **params, **tools),
                           size=request.state.body_bytes)
    return await _respond(app, entry, gen, body, chat=True, started=started)


def _ollama_calls(calls: Any) -> list[dict[str, Any]]:
    """Ollama's message.tool_calls: the arguments as an object."""
    return [{"function": {"name": c.name, "arguments": json.loads(c.arguments or "{}")}} for c in calls]


async def generate(request: Request, body: dict[str, Any]) -> Response:
    app = request.app.state.edgelm
    entry = _entry(app, body)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise RequestError(400, "prompt must be a string.", param="prompt")
    params = params_from(body)
    if body.get("raw"):
        build = lambda m: m.stream(prompt, **params)  # noqa: E731
    else:  # like Ollama: the prompt goes through the model's template as a user message
        system = body.get("system")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        validate_messages(messages)

        def build(m: Any) -> Any:
            # a model without a chat template completes the prompt as it is (Ollama's bare "{{ .Prompt }}"); a
            # system message needs a chat format, so then the request fails with 400 (NoChatTemplateError)
            if m.chat_template is None and not system:
                return m.stream(prompt, **params)
            return m.stream_chat(messages, **params)
    started = time.perf_counter()
    gen = await core.start(app.registry, entry, build, size=request.state.body_bytes)
    return await _respond(app, entry, gen, body, chat=False, started=started)


async def _respond(app: Any, entry: Any, gen: core.Generation, body: dict[str, Any], *, chat: bool,
                   started: float) -> Response:
    load_ns = int(entry.load_seconds * 1e9)

    def piece(text: str) -> dict[str, Any]:
        base = {"model": entry.name, "created_at": _now()}
        return {**base, "message": {"role": "assistant", "content": text}} if chat else {**base, "response": text}

    def final(text: str, last: Any) -> dict[str, Any]:
        t, u = last.timings, last.usage
        # Ollama ends an answer with calls as any other ("stop")
        reason = "stop" if last.finish_reason == "tool_calls" else last.finish_reason
        return {**piece(text), "done": True, "done_reason": reason,
                "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": load_ns,
                "prompt_eval_count": u.prompt_tokens, "prompt_eval_duration": int(t.prompt_seconds * 1e9),
                "eval_count": u.completion_tokens, "eval_duration": int(t.generation_seconds * 1e9)}

    if body.get("stream", True) is False:
        chunks = [chunk async for chunk in gen.chunks()]
        done, last = collect(iter(chunks)), chunks[-1]
        app.metrics.generation(entry.name, last)
        out = final(done.text, last)
        if done.tool_calls:
            out["message"]["tool_calls"] = _ollama_calls(done.tool_calls)
        return JSONResponse(out)

    async def ndjson():
        last = None
        seen: list[Any] = []  # every chunk with call pieces: Ollama streams each call whole, once it is complete
        try:
            async for chunk in gen.chunks():
                last = chunk
                if chunk.tool_calls:
                    seen.append(chunk)
                if chunk.finish_reason is None and chunk.text:
                    yield json.dumps({**piece(chunk.text), "done": False}, ensure_ascii=False) + "\n"
            text = last.text
            if seen:
                calls = collect(iter([*seen, last] if last not in seen else seen)).tool_calls
                if text:
                    yield json.dumps({**piece(text), "done": False}, ensure_ascii=False) + "\n"
                    text = ""
                line = {**piece(""), "done": False}
                line["message"]["tool_calls"] = _ollama_calls(calls)
                yield json.dumps(line, ensure_ascii=False) + "\n"
            yield json.dumps(final(text, last), ensure_ascii=False) + "\n"
            app.metrics.generation(entry.name, last)
        except Exception as exc:  # after the first byte: a final error line, never a hung connection
            yield json.dumps(ollama_error(exc)) + "\n"

    return StreamingResponse(ndjson(), media_type="application/x-ndjson")


async def embed(request: Request, body: dict[str, Any]) -> Response:
    """input: a string or a list of them; truncate (default true) cuts inputs to what the model embeds; vectors
    are L2-normalized and mean-pooled, as Ollama's."""
    app = request.app.state.edgelm
    entry = _entry(app, body)
    if "input" not in body:
        raise RequestError(400, "input is required: a string or a list of strings.", param="input")
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise RequestError(400, f"truncate must be true or false, not {truncate!r}.", param="truncate")
    started = time.perf_counter()
    done = await core.call(app.registry, entry, lambda m: core.embed_inputs(
        m, body["input"], param="input", truncate=truncate, normalize=True))
    return JSONResponse({"model": entry.name, "embeddings": done.vectors.tolist(),
                         "total_duration": int((time.perf_counter() - started) * 1e9),
                         "load_duration": int(entry.load_seconds * 1e9), "prompt_eval_count": done.prompt_tokens})


async def embeddings(request: Request, body: dict[str, Any]) -> Response:
    """The older route: one prompt, one vector, not normalized (as Ollama's /api/embeddings)."""
    app = request.app.state.edgelm
    entry = _entry(app, body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "prompt must be a non-empty string.", param="prompt")
    done = await core.call(app.registry, entry, lambda m: core.embed_inputs(
        m, prompt, param="prompt", truncate=True, normalize=False))
    return JSONResponse({"embedding": done.vectors[0].tolist()})


def _details(facts: dict[str, Any]) -> dict[str, Any]:
    params = facts.get("parameters") or 0
    return {"format": facts.get("format"), "family": facts.get("architecture"), "families": [facts.get("architecture")],
            "parameter_size": f"{params / 1e6:.0f}M" if params < 1e9 else f"{params / 1e9:.1f}B",
            "quantization_level": facts.get("quantization")}


def _facts(entry: Any) -> dict[str, Any]:
    return inspect(entry.path)


async def tags(request: Request) -> Response:
    app = request.app.state.edgelm
    models = []
    for e in app.registry.entries.values():
        facts = _facts(e)
        models.append({"name": e.name, "model": e.name, "modified_at": _now(), "size": facts.get("size_bytes", 0),
                       "digest": "", "details": _details(facts)})
    return JSONResponse({"models": models})


async def show(request: Request, body: dict[str, Any]) -> Response:
    app = request.app.state.edgelm
    entry = app.registry.entry(body.get("model") or body.get("name"))
    facts = _facts(entry)
    template = ""
    chosen = app.registry.load_kwargs.get("chat_template")  # --chat-template replaces the file's own
    if entry.model is not None and not entry.model.closed:
        template = entry.model.chat_template or ""
    elif chosen is not None:
        template = resolve(chosen)[1]
    elif facts.get("format") == "gguf":
        template = read_header(facts["path"]).chat_template or ""
    info = {f"general.{k}": v for k, v in facts.items() if isinstance(v, (str, int, float, bool))}
    return JSONResponse({"modelfile": f"FROM {facts['path']}", "parameters": "", "template": template,
                         "details": _details(facts), "model_info": info,
                         "capabilities": (["completion", "embedding"] if facts.get("format") == "gguf" else ["completion"])
                         + (["tools"] if template else [])})  # any chat model calls tools (edgelm.tools)


async def ps(request: Request) -> Response:
    app = request.app.state.edgelm
    out = []
    for e in app.registry.entries.values():
        if e.model is not None:
            facts = _facts(e)
            out.append({"name": e.name, "model": e.name, "size": facts.get("size_bytes", 0), "digest": "",
                        "details": _details(facts), "size_vram": 0,
                        "expires_at": (datetime.fromtimestamp(e.expires_at, timezone.utc).isoformat()
                                       if e.expires_at != float("inf") else "2318-08-26T00:00:00Z")})
    return JSONResponse({"models": out})


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})
