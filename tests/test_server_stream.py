"""How the server reads a stream (edgelm.server.core): a batched model's small request on the event loop, with no
thread of its own; a large request, or one that loads the model, in a worker thread.  The real llama.cpp model in
an in-process server, the official openai client over HTTP."""

from __future__ import annotations

import threading

import openai
import pytest

import edgelm
from edgelm.server import BackgroundServer, core, create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served():
    app = create_app({"m": str(edgelm.default_model_path())},
                     load_kwargs={"threads": 2, "n_ctx": 512, "parallel": 2}, ui=False)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield app, client


def _gen_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("edgelm-gen-")]


def _stream_and_look(client, **extra) -> tuple[str, list[str]]:
    """Stream a completion; the generation threads alive once the first text arrived; the text."""
    for t in threading.enumerate():  # an earlier request's thread may still be finishing after its last event
        if t.name.startswith("edgelm-gen-"):
            t.join(30)
    seen: list[str] | None = None
    text = ""
    for event in client.completions.create(model="m", prompt="Once upon a time", max_tokens=24, temperature=0,
                                           stream=True, **extra):
        piece = event.choices[0].text if event.choices else ""
        if piece and seen is None:
            seen = _gen_threads()
        text += piece
    return text, seen or []


def test_a_loaded_batched_model_streams_from_the_event_loop_a_large_request_from_a_thread(served):
    app, client = served
    first, during_load = _stream_and_look(client)  # loads the model: in a worker thread
    assert during_load == ["edgelm-gen-m"]
    again, during = _stream_and_look(client)
    assert during == []  # no thread for this request
    padded, during_large = _stream_and_look(client, extra_body={"user": "x" * (core.INLINE_BUILD_BYTES + 1)})
    assert during_large == ["edgelm-gen-m"]
    assert first == again == padded  # greedy: the same answer on every path
    assert app.state.edgelm.registry.entries["m"].users == 0  # every request ended


def test_a_stream_read_on_the_event_loop_ends_with_an_error_event_when_the_model_closes(served):
    app, client = served
    entry = app.state.edgelm.registry.entries["m"]
    client.completions.create(model="m", prompt="Hi", max_tokens=1)  # loaded
    events = client.completions.create(model="m", prompt="Count from one to a thousand in words:", max_tokens=400,
                                       temperature=0, stream=True)
    with pytest.raises(openai.APIError, match="closed"):
        for i, event in enumerate(events):
            if i == 2:
                entry.model.close()
    assert entry.users == 0
    assert client.completions.create(model="m", prompt="Hi", max_tokens=2).usage.completion_tokens == 2  # reloaded


def test_a_client_leaving_a_stream_read_on_the_event_loop_frees_its_sequence(served):
    app, client = served
    client.completions.create(model="m", prompt="Hi", max_tokens=1)
    model = app.state.edgelm.registry.entries["m"].model
    with client.completions.with_streaming_response.create(model="m", prompt="Count to a thousand:", max_tokens=400,
                                                           stream=True) as response:
        for i, _line in enumerate(response.iter_lines()):
            if i >= 4:
                break  # the client goes away after a few tokens of 400
    deadline = threading.Event()
    for _ in range(200):  # the scheduler frees the sequence within a step
        if model.stats()["sequences"]["active"] == 0:
            break
        deadline.wait(0.02)
    assert model.stats()["sequences"]["active"] == 0
    assert app.state.edgelm.registry.entries["m"].users == 0


def test_the_server_runs_on_uvicorns_c_parser_and_event_loop_that_the_serve_extra_installs():
    """httptools and uvloop are in the serve extra for the time to first token (benchmarks/RESULTS.md): uvicorn
    picks them by itself when they are installed; this fails if they are not, or if the server stops letting it."""
    import sys

    server = BackgroundServer(create_app({"m": str(edgelm.default_model_path())}, ui=False))
    config = server.server.config
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    if sys.platform != "win32":
        import uvloop

        assert config.get_loop_factory() is uvloop.new_event_loop


def test_a_stream_whose_event_loop_closed_does_not_fail_the_models_thread():
    """The scheduler's thread calls notify after every token: a server that stopped (its loop closed) while a
    stream ran must not make that call raise there, where it would end the scheduler."""
    import asyncio

    class Stream:
        def watch(self, notify):
            self.notify = notify

    stream = Stream()
    loop = asyncio.new_event_loop()

    async def make():
        return core._Watched(None, None, stream)

    loop.run_until_complete(make())
    loop.close()
    stream.notify()  # no RuntimeError("Event loop is closed")
