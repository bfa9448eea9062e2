"""Tool calling through a real `edgelm serve`, with the official clients unchanged: OpenAI's (its tool-call objects,
its raw stream and its streaming helper that accumulates tool-call deltas) and Ollama's, on both backends (the
default GGUF on llama.cpp, its fp32 ONNX export on onnxruntime); bad tools answered 400 naming the field."""

from __future__ import annotations

import json

import httpx
import pytest

from edgelm.tools.spec import WEATHER

from .test_server import NAME, Server

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["llamacpp", "onnxruntime"])
def server(request, tmp_path_factory):
    args = ["--n-ctx", "2048", "--keep-alive", "600"]
    if request.param == "onnxruntime":
        from edgelm.converters.onnx import convert_to_onnx

        from .hf_fixtures import smollm2_hf_checkpoint

        path = convert_to_onnx(smollm2_hf_checkpoint(), tmp_path_factory.mktemp("onnx") / "fp32", "fp32")
        args = [f"{NAME}={path}", *args]
    s = Server(*args)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def oll(server):
    import ollama

    return ollama.Client(host=server.url, timeout=600)


def _city(arguments) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert set(args) == {"city"} and isinstance(args["city"], str) and args["city"]
    return args["city"]


@pytest.mark.timeout(600)
def test_openai_probe_required_call_plain_and_streamed(oai):
    r = oai.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    city = _city(call.function.arguments)
    # the raw stream, as OpenAI sends it: index, id, type and name first, then pieces of the arguments
    deltas, finish = [], None
    for chunk in oai.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="required",
                                             temperature=0, max_tokens=64, stream=True):
        if chunk.choices and chunk.choices[0].delta.tool_calls:
            deltas.extend(chunk.choices[0].delta.tool_calls)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == "" and rest
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert _city("".join(d.function.arguments for d in rest)) == city and finish == "tool_calls"
    # the client's own accumulation of streamed tool calls
    with oai.chat.completions.stream(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="required",
                                     temperature=0, max_tokens=64) as stream:
        done_events = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [e.name for e in done_events] == ["get_weather"] and _city(done_events[0].arguments) == city
    accumulated = final.choices[0].message.tool_calls[0]
    assert accumulated.function.name == "get_weather" and _city(accumulated.function.arguments) == city
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.timeout(600)
def test_ollama_probe_tool_calls_plain_and_streamed(oll):
    options = {"temperature": 0, "num_predict": 64, "tool_choice": "required"}  # tool_choice: edgelm's extension
    r = oll.chat(model=NAME, messages=ASK, tools=[WEATHER], options=options)
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    city = _city(call.function.arguments)
    assert r.done_reason == "stop"
    streamed = [c for part in oll.chat(model=NAME, messages=ASK, tools=[WEATHER], options=options, stream=True)
                for c in (part.message.tool_calls or [])]
    assert [c.function.name for c in streamed] == ["get_weather"] and _city(streamed[0].function.arguments) == city

    def get_weather(city: str) -> str:
        """Current weather in a city.

        Args:
          city: The city's name
        """
        return "sunny"

    # a Python function as the tool, as the client's documentation shows
    r = oll.chat(model=NAME, messages=ASK, tools=[get_weather], options=options)
    assert r.message.tool_calls[0].function.name == "get_weather"
    _city(r.message.tool_calls[0].function.arguments)


@pytest.mark.timeout(900)
def test_agent_loop_over_both_dialects(oai, oll):
    messages = list(ASK)
    r = oai.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_tokens=64)
    call = r.choices[0].message.tool_calls[0]
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 18 degrees C."}]
    answer = oai.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=32)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    # Ollama's shape of the same turn: the call's arguments as an object, the result by tool_name
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "content": "Sunny, 18 degrees C.", "tool_name": "get_weather"}]
    r = oll.chat(model=NAME, messages=history, tools=[WEATHER],
                 options={"temperature": 0, "num_predict": 32, "tool_choice": "none"})
    assert r.message.content and not r.message.tool_calls


@pytest.mark.parametrize("body, param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "txt"}}}}}]}, "tools[0].function.parameters.properties.x.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name"),
])
def test_bad_tools_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
    ollama_body = {"model": NAME, "messages": ASK, "tools": body["tools"]}
    if "tool_choice" in body:
        ollama_body["options"] = {"tool_choice": body["tool_choice"]}
    r = httpx.post(server.url + "/api/chat", json=ollama_body, timeout=60)
    assert r.status_code == 400 and param in r.json()["error"], r.text
