"""Embeddings: Model.embed on the real llama.cpp against llama-cpp-python's own Llama.embed, and the HTTP routes
(/v1/embeddings, /api/embed, /api/embeddings) through the official `openai` and `ollama` clients."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

import edgelm
from edgelm import runtimes

from .fakes import EOS, FakeBackend

TEXTS = [f"Note {i}: the {animal} sat near the {place} while it rained." for i, (animal, place) in
         enumerate([(a, p) for a in ("cat", "dog", "heron", "trout") for p in ("river", "barn", "library")])]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --- fast: what the library refuses before any model work ---------------------------------------------------

@pytest.fixture
def fake_model(tmp_path):
    runtimes.register_backend("fake", FakeBackend)
    FakeBackend.script = [1, EOS]
    path = tmp_path / "m.fake"
    path.write_text("a|b|c", encoding="utf-8")
    yield path
    runtimes.unregister_backend("fake")


def test_a_backend_that_cannot_embed_says_which_can(fake_model):
    with edgelm.load(fake_model) as m:
        with pytest.raises(edgelm.UnsupportedModelError, match="fake backend cannot embed.*GGUF"):
            m.embed("hello")


# --- slow: the real model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(default_gguf):
    with edgelm.load(default_gguf, n_ctx=512, threads=2) as m:
        yield m


@pytest.mark.slow
@pytest.mark.parametrize("pooling,llama_pooling", [("mean", 1), ("cls", 2), ("last", 3)])
def test_vectors_equal_llama_cpp_pythons_own(model, default_gguf, pooling, llama_pooling):
    import llama_cpp

    ours = model.embed(TEXTS, pooling=pooling, normalize=False)
    assert ours.shape == (len(TEXTS), 576) and ours.dtype == np.float32
    ref = llama_cpp.Llama(str(default_gguf), embedding=True, pooling_type=llama_pooling, n_ctx=512, n_batch=512,
                          n_ubatch=512, n_threads=2, verbose=False)
    try:
        theirs = np.array(ref.embed(TEXTS, normalize=False), dtype=np.float32)
    finally:
        ref.close()
    assert cosines(ours, theirs).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1), rtol=1e-3)


@pytest.mark.slow
def test_packing_and_normalizing(model):
    together = model.embed(TEXTS)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([model.embed(t) for t in TEXTS])
    assert cosines(together, one_by_one).min() >= 0.999  # packing rounds differently, nothing more
    # token lists embed as the text they tokenize to
    tokens = [model.tokenize(t) for t in TEXTS[:3]]
    assert cosines(model.embed(tokens), together[:3]).min() >= 0.99999
    # different texts give different vectors
    assert cosines(together[:1].repeat(len(TEXTS) - 1, 0), together[1:]).max() < 0.9999


@pytest.mark.slow
def test_bad_inputs_name_their_index(model):
    with pytest.raises(edgelm.InvalidParameterError, match=r"Input 1 is empty") as err:
        model.embed(["fine", ""])
    assert err.value.parameter == "input[1]"
    with pytest.raises(edgelm.InvalidParameterError, match=r"Input 0 holds token id 999999"):
        model.embed([[1, 2, 999999]])
    with pytest.raises(edgelm.InvalidParameterError, match="pooling"):
        model.embed("x", pooling="max")
    long_text = "word " * 700
    with pytest.raises(edgelm.ContextLengthExceededError, match=r"Input 1 has \d+ tokens.*512") as err:
        model.embed(["short", long_text])
    assert err.value.index == 1
    cut = model.embed(long_text, truncate=True)
    first = model.embed([model.tokenize(long_text)[:512]])
    assert cosines(cut, first)[0] >= 0.99999


@pytest.mark.slow
def test_embedding_beside_a_generation_leaves_it_alone(model):
    prompt = "The three primary colours are"
    alone = model.generate(prompt, temperature=0, max_tokens=24).text
    stop = threading.Event()

    def embed_loop():
        while not stop.is_set():
            model.embed(TEXTS[:4])

    t = threading.Thread(target=embed_loop)
    t.start()
    try:
        beside = model.generate(prompt, temperature=0, max_tokens=24).text
    finally:
        stop.set()
        t.join()
    assert beside == alone


# --- slow: HTTP with the official clients -------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    from .test_server import Server

    s = Server("--n-ctx", "512", "--keep-alive", "600")
    yield s
    s.stop()


NAME = "smollm2-135m-instruct"


@pytest.mark.slow
def test_openai_client_embeddings(server, model):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    got = client.embeddings.create(model=NAME, input=TEXTS[:5])  # the client asks for base64 and decodes it
    vectors = np.array([d.embedding for d in got.data])
    assert [d.index for d in got.data] == list(range(5))
    assert cosines(vectors, model.embed(TEXTS[:5])).min() >= 0.99999
    assert got.usage.prompt_tokens == sum(len(model.tokenize(t)) for t in TEXTS[:5]) == got.usage.total_tokens
    floats = client.embeddings.create(model=NAME, input=TEXTS[0], encoding_format="float")
    assert cosines(np.array([floats.data[0].embedding]), vectors[:1])[0] >= 0.99999
    by_tokens = client.embeddings.create(model=NAME, input=[model.tokenize(TEXTS[0])])
    assert cosines(np.array([by_tokens.data[0].embedding]), vectors[:1])[0] >= 0.99999

    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model=NAME, input=[])
    with pytest.raises(openai.BadRequestError, match="2049 inputs; at most 2048"):
        client.embeddings.create(model=NAME, input=["x"] * 2049)
    with pytest.raises(openai.BadRequestError, match=r"Input 1 has \d+ tokens") as err:
        client.embeddings.create(model=NAME, input=["short", "word " * 700])
    assert err.value.body["param"] == "input[1]"
    with pytest.raises(openai.BadRequestError, match="Input 2 is empty"):
        client.embeddings.create(model=NAME, input=["a", "b", ""])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


@pytest.mark.slow
def test_ollama_client_embed(server, model):
    import ollama

    client = ollama.Client(host=server.url)
    got = client.embed(model=NAME, input=TEXTS[:3])
    vectors = np.array(got.embeddings)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cosines(vectors, model.embed(TEXTS[:3])).min() >= 0.99999
    assert got.prompt_eval_count == sum(len(model.tokenize(t)) for t in TEXTS[:3])
    long_text = "word " * 700
    cut = client.embed(model=NAME, input=long_text)  # truncate defaults to true, as Ollama's
    assert cut.prompt_eval_count == 512
    with pytest.raises(ollama.ResponseError, match="Input 0 has") as err:
        client.embed(model=NAME, input=long_text, truncate=False)
    assert err.value.status_code == 400

    old = client.embeddings(model=NAME, prompt=TEXTS[0])  # the older route: not normalized
    raw = np.array(old.embedding)
    assert abs(np.linalg.norm(raw) - 1.0) > 0.01
    assert cosines(raw[None], vectors[:1])[0] >= 0.99999


@pytest.mark.slow
def test_ollama_keep_alive_zero_unloads_after_the_request(server):
    import ollama

    client = ollama.Client(host=server.url)
    client.embed(model=NAME, input="load me", keep_alive=0)
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/api/ps").json()["models"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(server.url + "/api/ps").json()["models"] == []
    client.embed(model=NAME, input="load me again", keep_alive="10m")
    ps = httpx.get(server.url + "/api/ps").json()["models"]
    assert [m["name"] for m in ps] == [NAME]
    r = httpx.post(server.url + "/api/embed", json={"model": NAME, "input": "x", "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


def test_ollama_keep_alive_durations():
    from edgelm.server.errors import RequestError
    from edgelm.server.ollama_api import keep_alive_seconds

    assert keep_alive_seconds(None) is None
    assert keep_alive_seconds(0) == 0 and keep_alive_seconds("0") == 0
    assert keep_alive_seconds(90) == 90 and keep_alive_seconds("90") == 90
    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds("1.5s") == 1.5 and keep_alive_seconds("250ms") == 0.25
    assert keep_alive_seconds(-1) == float("inf") == keep_alive_seconds("-1m")
    for bad in ("soon", "5 minutes", "5mx", True, [1]):
        with pytest.raises(RequestError, match="keep_alive"):
            keep_alive_seconds(bad)
