"""The one streaming path both APIs use: a model's stream, read by the event loop or by a worker thread.

A batched model (parallel=N: the llama.cpp scheduler) already loaded and a request of at most INLINE_BUILD_BYTES
are started on the event loop itself: the prompt is tokenized and submitted there, and the loop is told by the
scheduler's thread when a token came (ChunkStream.watch), so the first token reaches the socket without a thread hop
(measured: a thread per request cost ~0.5 ms of the time to first token, and 1-4 ms more in the requests where it
waited for a CPU while the next decode ran).  Otherwise a worker thread loads the model on first use, starts the
stream and reads it (a one-at-a-time model computes its tokens in the reading thread); the model itself queues
requests in arrival order, or batches them.  A client that goes away cancels its stream from the event loop's side
(ChunkStream.cancel is thread-safe), so a waiting request leaves the queue and a running one stops within a step,
freeing its sequence.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from edgelm.constraints import Constraint
from edgelm.errors import InvalidParameterError
from edgelm.model import WAITING
from edgelm.types import Chunk

from .errors import RequestError
from .registry import Entry, Registry

_END = object()
# a request body up to this size starts its stream on the event loop (tokenizing 8 KB of text takes ~2 ms here;
# 32 KB ~8 ms, which would hold up every other stream's tokens): larger ones start in a worker thread
INLINE_BUILD_BYTES = 8192


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


class _Threaded:
    """Chunks a worker thread reads (and, first, loads the model and starts the stream)."""

    def __init__(self, registry: Registry, entry: Entry, make: Callable[[], Any], handle: _Handle) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, item)

        def work() -> None:
            stream = None
            try:
                with handle.lock:
                    if handle.cancelled.is_set():
                        return
                    stream = handle.stream = make()
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

    async def next(self) -> Any:
        return await self.queue.get()

    def close(self) -> None:
        pass  # the thread closes the stream and ends the request


class _Watched:
    """Chunks the event loop reads itself, woken by the model's thread when a token came."""

    def __init__(self, registry: Registry, entry: Entry, stream: Any) -> None:
        loop = asyncio.get_running_loop()
        self.registry, self.entry, self.stream = registry, entry, stream
        self.ready = asyncio.Event()
        self.closed = False

        def notify() -> None:  # on the model's thread, which must not fail for a reader that is gone
            try:
                loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:  # the loop is closed (the server stopped): nobody reads this stream any more
                pass

        stream.watch(notify)

    async def next(self) -> Any:
        try:
            while True:
                self.ready.clear()
                chunk = next(self.stream)
                if chunk is not WAITING:
                    return chunk
                await self.ready.wait()
        except StopIteration:
            return _END
        except Exception as exc:
            return exc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.close()
            self.registry.end(self.entry)


@dataclass
class Generation:
    """A running generation: the first event is already known (so errors become proper statuses; the response
    headers are not sent earlier either: sent while the prompt was read, they and the client's reading of them took
    the CPUs from the decode, 8 -> 20 ms for a one-token Q8_0 prompt here)."""

    entry: Entry
    first: Chunk
    feed: Any  # _Threaded | _Watched
    handle: _Handle

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Every chunk; raises the stream's exception if it fails after it began."""
        try:
            yield self.first
            if self.first.finish_reason is not None:
                return
            while True:
                item = await self.feed.next()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.handle.cancel()  # client gone (or done): the stream stops at once and frees its place
            self.feed.close()

    def __del__(self) -> None:  # a response never sent (the client left first): free the place all the same
        try:
            self.handle.cancel()
            self.feed.close()
        except Exception:
            pass


async def start(registry: Registry, entry: Entry, build: Callable[[Any], Iterator[Chunk]], *,
                size: int = 0) -> Generation:
    """Start the stream ``build(model)`` and wait for its first chunk (or its error); ``size``: the request body's
    bytes (see INLINE_BUILD_BYTES)."""
    handle = _Handle()
    registry.begin(entry)
    try:
        # only a batched model (an in-process llama.cpp one, whose health check is immediate) is started here
        model = entry.model
        model = registry.loaded(entry) if size <= INLINE_BUILD_BYTES and model is not None and model.watchable else None
        feed: Any
        if model is not None:
            handle.stream = build(model)  # its errors are statuses; nothing was started
            feed = _Watched(registry, entry, handle.stream)
        else:
            feed = _Threaded(registry, entry, lambda: build(registry.load(entry)), handle)
    except BaseException:
        registry.end(entry)
        raise
    try:
        first = await feed.next()
    except asyncio.CancelledError:
        handle.cancel()
        feed.close()
        raise
    if isinstance(first, BaseException) or first is _END:
        feed.close()
        if first is _END:
            raise asyncio.CancelledError()
        raise first
    return Generation(entry, first, feed, handle)


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
