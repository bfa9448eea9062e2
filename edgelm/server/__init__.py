"""The local API: OpenAI- and Ollama-compatible token streaming over the library, as an ASGI app.

    from edgelm.server import create_app, BackgroundServer
    app = create_app({"smollm2": "model.gguf"}, api_key=None)
    with BackgroundServer(app, port=0) as server:      # in-process, e.g. inside a desktop program
        print(server.url)

`edgelm.serve(...)` / `edgelm serve` run it in the foreground with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypedDict

from edgelm.autoconvert import find_checkpoint, serve_checkpoint
from edgelm.errors import InsecureBindError, InvalidParameterError, ModelNotFoundError
from edgelm.hub import served_reference

from .errors import RequestError, ollama_error, openai_error, status_for
from .metrics import Metrics
from .registry import DEFAULT_NAME, Registry
from .ui import ui_routes  # the chat page: "/" and "/ui/{name}", no API key needed

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; type checkers ship typing_extensions

MAX_BODY_BYTES = 8 * 1024 * 1024


class ServerState:
    def __init__(self, registry: Registry, api_key: str | None, max_body_bytes: int) -> None:
        self.registry = registry
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
        self.started = int(time.time())

    def default_name(self) -> str | None:
        names = self.registry.names()
        return names[0] if len(names) == 1 else None


def model_names(paths: list[str] | None, *, parallel: int | None = None, threads: int | None = None,
                max_ppl_increase: str | float | None = None,
                progress: Callable[[str, float], None] | None = None) -> dict[str, Path | None]:
    """Served names for model paths: NAME=PATH, or the file (or folder) name without .gguf; a Hub id is served as
    typed.  A Hugging Face checkpoint (a folder, or a Hub id from the HF cache) is converted to GGUF once and its
    GGUF served (:func:`edgelm.autoconvert.serve_checkpoint`: the quantization that serves ``parallel`` streams
    fastest here within ``max_ppl_increase``; ``progress(message, fraction)`` hears the conversion and the choice)."""
    if not paths:
        return {DEFAULT_NAME: None}
    out: dict[str, Path | None] = {}
    for item in paths:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, Path(item).name.removesuffix(".gguf")
        checkpoint = find_checkpoint(path)
        if checkpoint is not None:  # converted once, then the GGUF is served under the source's name
            exists = Path(path).expanduser().exists()
            name = name if sep or exists else path  # a Hub id is served as typed
            path = str(serve_checkpoint(checkpoint, label=Path(path).name if exists else path, parallel=parallel,
                                        threads=threads, max_ppl_increase=max_ppl_increase,
                                        progress=progress).path)
        # --- models by name (edgelm.hub): ORG/REPO[:QUANT] pulled (or taken from the cache), served as typed ---
        path, name = served_reference(path, name if sep else None) or (path, name)
        # --- end of models by name ---
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise ModelNotFoundError(f"Model to serve not found: {p}.", fix="Check the path.", path=str(p))
        if name in out:
            raise InvalidParameterError(f"Two models would be served as {name!r}.", fix="Name them: NAME=PATH.",
                                        parameter="models", value=name)
        out[name] = p
    return out


def create_app(models: dict[str, Any] | list[str] | None = None, *, api_key: str | None = None,
               keep_alive: float = 300.0, cors_origins: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, load_kwargs: dict[str, Any] | None = None, ui: bool = True):
    """An ASGI app serving ``models`` ({name: path}, a list of paths, or None for the embedded default).

    ``ui``: serve the chat page at ``/`` (edgelm.server.ui); False answers ``/`` with plain text."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from . import ollama_api, openai_api  # they import starlette (the optional "serve" extra)

    if models is None or isinstance(models, list):  # a checkpoint among them is converted for load_kwargs' parallel
        models = model_names(models, parallel=(load_kwargs or {}).get("parallel"),
                             threads=(load_kwargs or {}).get("threads"))
    state = ServerState(Registry(models, keep_alive=keep_alive, load_kwargs=load_kwargs), api_key, max_body_bytes)

    def route(handler: Callable[..., Awaitable[Response]], dialect: str, name: str, *, body: bool = True):
        error_body = openai_error if dialect == "openai" else ollama_error

        async def endpoint(request: Request) -> Response:
            model = "-"
            try:
                _check_key(state, request)
                if body:
                    data = await _read_json(state, request)
                    model = str(data.get("model") or data.get("name") or "-")
                    response = await handler(request, data)
                else:
                    response = await handler(request)
                status = response.status_code
            except asyncio.CancelledError:
                state.metrics.request(name, model, 499)
                raise
            except Exception as exc:
                status = status_for(exc)
                response = JSONResponse(error_body(exc), status_code=status)
            state.metrics.request(name, model, status)
            return response

        return endpoint

    async def health(request: Request) -> Response:
        # a model split across RPC workers that lost one says so (edgelm.rpc): the server is then "degraded"
        checks = {e.name: e.model.health() for e in state.registry.entries.values() if e.model is not None}
        degraded = {name: h for name, h in checks.items() if h.get("status") in ("degraded", "lost")}
        return JSONResponse({"status": "degraded" if degraded else "ok", "models": state.registry.names(),
                             "loaded": [e.name for e in state.registry.entries.values() if e.model is not None],
                             **({"degraded": degraded} if degraded else {})})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(state.metrics.render(state.registry), media_type="text/plain; version=0.0.4")

    async def root(request: Request) -> Response:
        return PlainTextResponse("edgelm is running")

    routes = [
        *(ui_routes() if ui else [Route("/", root, methods=["GET", "HEAD"])]),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/chat/completions", route(openai_api.chat_completions, "openai", "chat_completions"),
              methods=["POST"]),
        Route("/v1/completions", route(openai_api.completions, "openai", "completions"), methods=["POST"]),
        Route("/v1/embeddings", route(openai_api.embeddings, "openai", "embeddings"), methods=["POST"]),
        Route("/v1/models", route(openai_api.list_models, "openai", "models", body=False)),
        Route("/api/chat", route(ollama_api.chat, "ollama", "api_chat"), methods=["POST"]),
        Route("/api/generate", route(ollama_api.generate, "ollama", "api_generate"), methods=["POST"]),
        Route("/api/embed", route(ollama_api.embed, "ollama", "api_embed"), methods=["POST"]),
        Route("/api/embeddings", route(ollama_api.embeddings, "ollama", "api_embeddings"), methods=["POST"]),
        Route("/api/tags", route(ollama_api.tags, "ollama", "api_tags", body=False)),
        Route("/api/show", route(ollama_api.show, "ollama", "api_show"), methods=["POST"]),
        Route("/api/ps", route(ollama_api.ps, "ollama", "api_ps", body=False)),
        Route("/api/version", route(ollama_api.version, "ollama", "api_version", body=False)),
    ]
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        yield
        state.registry.close()

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.edgelm = state
    return app


def _check_key(state: ServerState, request: Any) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), state.api_key.encode()):
        raise RequestError(401, "Missing or wrong API key.", code="invalid_api_key")


async def _read_json(state: ServerState, request: Any) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > state.max_body_bytes:
        raise RequestError(413, f"Request body of {int(length):,} bytes is over the limit of "
                                f"{state.max_body_bytes:,}.", code="request_too_large")
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > state.max_body_bytes:
            raise RequestError(413, f"Request body is over the limit of {state.max_body_bytes:,} bytes.",
                               code="request_too_large")
    request.state.body_bytes = len(raw)  # core.start: a small request starts its stream on the event loop
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise RequestError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Refuse a non-loopback bind without an API key unless ``insecure``; return a warning to print, if any."""
    if is_loopback(host):
        return None
    if api_key is None and not insecure:
        raise InsecureBindError(
            f"Binding {host} exposes the models to the network without an API key.",
            fix="Add --api-key KEY (clients send it as a Bearer token), or --insecure if that is really intended.",
            host=host)
    if api_key is None:
        return f"WARNING: serving on {host} without an API key: anyone who can reach this port can use the models."
    return None


class AppKwargs(TypedDict, total=False):
    """:func:`create_app`'s keyword options that :func:`serve` passes on (a test checks they match its signature)."""

    keep_alive: float
    cors_origins: list[str] | None
    max_body_bytes: int
    load_kwargs: dict[str, Any] | None
    ui: bool


def serve(models: dict[str, Any] | list[str] | None = None, *, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, insecure: bool = False, log_level: str = "warning",
          **app_options: Unpack[AppKwargs]) -> None:
    """Run the API in the foreground (blocking) with uvicorn; ``app_options`` are :func:`create_app`'s."""
    import uvicorn

    warning = check_bind(host, api_key, insecure)
    if warning:
        print(warning, flush=True)
    app = create_app(models, api_key=api_key, **app_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class BackgroundServer:
    """Run an app with uvicorn in a thread of this process (a desktop program's embedded server)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="edgelm-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"The server did not start on {self.url}.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["create_app", "serve", "BackgroundServer", "check_bind", "model_names"]
