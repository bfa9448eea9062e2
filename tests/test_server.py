"""The local API as clients use it: a real `edgelm serve` process on loopback, the official `openai` and `ollama`
packages and curl, unchanged."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from .conftest import run_cli
from .helpers import stop_process

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"
CAPITAL = [{"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("edgelm")
        cmd = [exe] if exe else [sys.executable, "-m", "edgelm"]
        self.proc = subprocess.Popen([*cmd, "serve", "--port", str(self.port), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "EDGELM_DEBUG": ""})
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stdout.read()}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def server():
    s = Server("--n-ctx", "512", "--keep-alive", "600")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oll(server):
    import ollama

    return ollama.Client(host=server.url)


def test_openai_chat_answers_and_counts(oai):
    r = oai.chat.completions.create(model=NAME, messages=CAPITAL, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_stream_equals_non_stream_and_reports_usage(oai):
    full = oai.chat.completions.create(model=NAME, messages=CAPITAL, temperature=0, max_tokens=20)
    chunks = list(oai.chat.completions.create(model=NAME, messages=CAPITAL, temperature=0, max_tokens=20, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_completions_with_stop_and_length(oai):
    r = oai.completions.create(model=NAME, prompt="Count: 1, 2, 3,", temperature=0, max_tokens=40, stop=["7"])
    assert r.choices[0].finish_reason == "stop" and "7" not in r.choices[0].text
    r = oai.completions.create(model=NAME, prompt="Count: 1, 2, 3,", temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=NAME, prompt="Count: 1, 2, 3,", temperature=0, max_tokens=12, stream=True))
    assert streamed.strip().startswith("4")


def test_openai_models_list(oai):
    assert [m.id for m in oai.models.list()] == [NAME]


def test_json_mode_output_always_parses(oai):
    r = oai.chat.completions.create(
        model=NAME, temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}])
    assert r.choices[0].finish_reason == "stop"
    json.loads(r.choices[0].message.content)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = oai.chat.completions.create(
        model=NAME, temperature=0, max_tokens=40, messages=CAPITAL,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["city"], str)


def test_openai_errors_are_typed(oai):
    import openai

    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=CAPITAL)  # never silently another model
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 600}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=NAME, messages=CAPITAL, temperature="hot")
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:  # a schema that is not one: 400 naming the field
        oai.chat.completions.create(model=NAME, messages=CAPITAL, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}})
    assert err.value.body["param"] == "response_format.json_schema.schema" and "foo" in err.value.message


def test_raw_http_errors(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (9 * 1024 * 1024))
    assert r.status_code == 413
    r = httpx.post(server.url + "/api/chat", json={"model": "../../etc/passwd", "messages": CAPITAL})
    assert r.status_code == 404 and "error" in r.json()


def test_ollama_client_chat_generate_and_metadata(oll):
    r = oll.chat(model=NAME, messages=CAPITAL, options={"temperature": 0, "num_predict": 20})
    assert "Paris" in r.message.content and r.done and r.done_reason == "stop" and r.eval_count > 2
    parts = list(oll.chat(model=NAME, messages=CAPITAL, options={"temperature": 0, "num_predict": 20}, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and parts[-1].prompt_eval_count > 10
    g = oll.generate(model=NAME, prompt="Count: 1, 2, 3,", raw=True, options={"temperature": 0, "num_predict": 5})
    assert g.response.strip().startswith("4") and g.done_reason == "length"
    assert [m.model for m in oll.list().models] == [NAME]
    show = oll.show(NAME)
    assert show.details.quantization_level == "Q4_1" and "im_start" in show.template
    assert NAME in [m.model for m in oll.ps().models]
    assert httpx.get(oll._client.base_url.join("/api/version")).json()["version"]


def test_ollama_format_json(oll):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = oll.chat(model=NAME, format=schema, options={"temperature": 0, "num_predict": 200},
                 messages=[{"role": "user", "content": "A JSON object describing a cat."}])
    assert r.done_reason == "stop"  # the grammar let the model finish the object
    assert set(json.loads(r.message.content)) == {"name", "age"}


def test_ollama_unknown_model(oll):
    import ollama

    with pytest.raises(ollama.ResponseError) as err:
        oll.chat(model="llama3", messages=CAPITAL)
    assert err.value.status_code == 404


def test_curl_streams_server_sent_events(server):
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    body = json.dumps({"model": NAME, "messages": CAPITAL, "stream": True, "max_tokens": 8, "temperature": 0})
    out = subprocess.run([curl, "-sN", server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=60).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    assert json.loads(events[1])["choices"][0]["delta"]["content"]


def test_concurrent_requests_all_complete(oai):
    results = []

    def ask(i):
        r = oai.completions.create(model=NAME, prompt=f"Story {i}: Once upon a time", max_tokens=16, seed=i)
        results.append(r.usage.completion_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4 and all(n > 0 for n in results)


def _queue_depth(server) -> int:
    text = httpx.get(server.url + "/metrics").text
    return int(next(line for line in text.splitlines() if line.startswith("edgelm_queue_depth")).split()[-1])


def test_disconnect_stops_generation_and_frees_the_model(server, oai):
    body = {"model": NAME, "prompt": "Count from one to a thousand in words:", "max_tokens": 400, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break  # the client goes away after two tokens of 400
    deadline = time.monotonic() + 3  # 400 tokens would keep the model busy for several seconds
    while _queue_depth(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _queue_depth(server) == 0
    r = oai.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert "edgelm_requests_total" in httpx.get(server.url + "/metrics").text


def test_api_key_is_required_when_set():
    import openai

    s = Server("--api-key", "sekret", "--n-ctx", "256")
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in client.models.list()] == [NAME]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        s.stop()


def test_keep_alive_unloads_idle_models():
    s = Server("--keep-alive", "1", "--n-ctx", "256")
    try:
        httpx.post(s.url + "/api/generate", json={"model": NAME, "prompt": "Hi", "stream": False,
                                                  "options": {"num_predict": 2}}, timeout=60)
        assert httpx.get(s.url + "/health").json()["loaded"] == [NAME]
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").json()["loaded"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(s.url + "/health").json()["loaded"] == []
        r = httpx.post(s.url + "/api/generate", json={"model": NAME, "prompt": "Hi", "stream": False,
                                                      "options": {"num_predict": 2}}, timeout=60)
        assert r.json()["eval_count"] == 2  # reloaded on demand
    finally:
        s.stop()


def test_non_loopback_bind_without_key_is_refused():
    r = run_cli("serve", "--host", "0.0.0.0", "--port", str(_free_port()))
    assert r.returncode == 10 and "--api-key" in r.stderr


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_examples_openai_client_and_curl_run_against_the_server(server):
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "openai_client.py"), server.url], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    r = subprocess.run(["bash", os.path.join(EXAMPLES, "curl.sh"), server.url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "data: [DONE]" in r.stdout and '"done": true' in r.stdout, r.stderr


def test_embedded_server_example_streams_an_answer():
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "embedded_server.py"), "Name a colour."],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "[embedded server on http://127.0.0.1:" in r.stdout
    assert len(r.stdout.split("Name a colour.", 1)[1].strip()) > 10
