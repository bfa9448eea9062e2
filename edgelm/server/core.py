"""The one streaming path both APIs use: a model's stream run in a worker thread, bridged to asyncio.

The worker loads the model on first use and runs the library stream; the model itself queues requests in arrival
order, or batches them (a model loaded with parallel=N).  A client that goes away cancels its stream from the event
loop's side (ChunkStream.cancel is thread-safe), so a waiting request leaves the queue and a running one stops
within a step, freeing its sequence.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from edgelm.errors import InvalidParameterError
from edgelm.types import Chunk

from .registry import Entry, Registry

_END = object()


@dataclass
class _Handle:
    """What the event loop shares with the worker: the stream, once it exists, and the cancellation."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled.set()
            stream = self.stream
        if stream is not None:
            stream.cancel()


@dataclass
class Generation:
    """A running generation: the first event is already known (so errors become proper statuses)."""

    entry: Entry
    first: Chunk
    queue: asyncio.Queue
    handle: _Handle
    model: Any

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Every chunk; raises the worker's exception if the stream fails after it began."""
        try:
            yield self.first
            if self.first.finish_reason is not None:
                return
            while True:
                item = await self.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.handle.cancel()  # client gone (or done): the stream stops at once and frees its place


async def start(registry: Registry, entry: Entry, build: Callable[[Any], Iterator[Chunk]]) -> Generation:
    """Start the stream ``build(model)`` and wait for its first chunk (or its error)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    handle = _Handle()
    holder: dict[str, Any] = {}

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        registry.begin(entry)
        stream = None
        try:
            model = registry.load(entry)
            holder["model"] = model
            with handle.lock:
                if handle.cancelled.is_set():
                    return
                stream = handle.stream = build(model)
            for chunk in stream:
                put(chunk)
        except BaseException as exc:  # delivered to the request; never lost in the thread
            put(exc)
        finally:
            if stream is not None:
                stream.close()
            registry.end(entry)
            put(_END)

    threading.Thread(target=work, name=f"edgelm-gen-{entry.name}", daemon=True).start()
    try:
        first = await queue.get()
    except asyncio.CancelledError:
        handle.cancel()
        raise
    if isinstance(first, BaseException):
        raise first
    if first is _END:
        raise asyncio.CancelledError()
    return Generation(entry, first, queue, handle, holder.get("model"))


def json_grammar(kind: str, schema: Any = None) -> str:
    """A GBNF grammar whose every output parses as JSON (matching ``schema`` when given)."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if kind == "json_object":
        return JSON_GBNF
    if not isinstance(schema, dict):
        raise InvalidParameterError("The JSON schema must be an object.", fix="Send a JSON Schema object.",
                                    parameter="response_format.json_schema.schema", value=schema)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        raise InvalidParameterError(f"Unsupported JSON schema: {exc}.", fix="Use a simpler schema.",
                                    parameter="response_format.json_schema.schema", value=schema) from exc
