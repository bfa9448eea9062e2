"""The one streaming path both APIs use: a model's stream run in a worker thread, bridged to asyncio.

The worker loads the model on first use and runs the library stream; the model itself queues requests in arrival
order, or batches them (a model loaded with parallel=N).  A client that goes away cancels its stream from the event
loop's side (ChunkStream.cancel is thread-safe), so a waiting request leaves the queue and a running one stops
within a step, freeing its sequence.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from edgelm.constraints import Constraint
from edgelm.errors import InvalidParameterError
from edgelm.types import Chunk

from .errors import RequestError
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


async def call(registry: Registry, entry: Entry, fn: Callable[[Any], Any]) -> Any:
    """``fn(model)`` in a worker thread, the model loaded on first use and kept while it runs."""

    def work() -> Any:
        registry.begin(entry)
        try:
            return fn(registry.load(entry))
        finally:
            registry.end(entry)

    return await asyncio.to_thread(work)


MAX_EMBED_INPUTS = 2048  # inputs one embeddings request may hold (as OpenAI's API)


@dataclass
class Embedded:
    vectors: Any  # float32 [inputs, n_embd]
    prompt_tokens: int


def embed_inputs(model: Any, inputs: Any, *, param: str, truncate: bool, normalize: bool,
                 pooling: str = "mean") -> Embedded:
    """What both APIs' embedding routes do: check the inputs (errors name the index), tokenize once, embed."""
    if isinstance(inputs, (str, bytes)) or (isinstance(inputs, list) and inputs and
                                            all(isinstance(x, int) and not isinstance(x, bool) for x in inputs)):
        inputs = [inputs]  # one string, or one token list
    if not isinstance(inputs, list) or not inputs:
        raise InvalidParameterError(f"{param} is empty or not a string or list: {inputs!r:.80}.",
                                    fix="Send a string, a list of strings, or token lists.", parameter=param,
                                    value=inputs)
    if len(inputs) > MAX_EMBED_INPUTS:
        raise InvalidParameterError(f"{param} holds {len(inputs)} inputs; at most {MAX_EMBED_INPUTS} are embedded "
                                    "per request.", fix="Split them over several requests.", parameter=param,
                                    value=len(inputs))
    tokens = model.embedding_tokens(inputs)
    limit = model.embed_limit
    vectors = model.embed(tokens, pooling=pooling, normalize=normalize, truncate=truncate)
    return Embedded(vectors, sum(min(len(t), limit) for t in tokens))


def json_constraint(schema: Any, *, param: str) -> Constraint:
    """The constraint for a JSON answer: any JSON object (``schema`` None), else JSON valid under ``schema``; a
    schema that is not one is a 400 naming the request field ``param``."""
    try:
        return Constraint.json_object() if schema is None else Constraint.json_schema(schema)
    except InvalidParameterError as exc:
        raise RequestError(400, f"{param}: {exc} {exc.fix}", param=param) from None
