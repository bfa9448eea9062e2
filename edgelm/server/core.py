"""The one streaming path both APIs use: a model's blocking stream run in a worker thread, bridged to asyncio.

The worker waits its turn in the model's FIFO slot, loads the model on first use, and runs the library stream.
A client that goes away sets `cancelled`; the worker then closes the stream, so generation stops within a token,
and hands the model to the next request.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

from edgelm.errors import InvalidParameterError
from edgelm.types import Chunk

from .registry import Entry, Registry

_END = object()


@dataclass
class Generation:
    """A running generation: the first event is already known (so errors become proper statuses)."""

    entry: Entry
    first: Chunk
    queue: asyncio.Queue
    cancelled: threading.Event
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
            self.cancelled.set()  # client gone (or done): stop the worker at its next token


async def start(registry: Registry, entry: Entry, build: Callable[[Any], Iterator[Chunk]]) -> Generation:
    """Queue for the model, start the stream ``build(model)`` and wait for its first chunk (or its error)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    holder: dict[str, Any] = {}

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        if not entry.slot.acquire(cancelled):
            put(_END)
            return
        stream = None
        try:
            model = registry.load(entry)
            holder["model"] = model
            stream = build(model)
            for chunk in stream:
                put(chunk)
                if cancelled.is_set():
                    break
        except BaseException as exc:  # delivered to the request; never lost in the thread
            put(exc)
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()
            registry.touch(entry)
            entry.slot.release()
            put(_END)

    threading.Thread(target=work, name=f"edgelm-gen-{entry.name}", daemon=True).start()
    try:
        first = await queue.get()
    except asyncio.CancelledError:
        cancelled.set()
        raise
    if isinstance(first, BaseException):
        raise first
    if first is _END:
        raise asyncio.CancelledError()
    return Generation(entry, first, queue, cancelled, holder.get("model"))


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
