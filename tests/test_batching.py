"""Continuous batching on the real SmolLM2 with llama.cpp: several sequences in one context, in-process and served.

Speed is the benchmark's business (benchmarks/bench_batching.py); these tests check behaviour: nothing lost, order
kept, each request's failures its own, cancellation and closing that never hang, prefix reuse per sequence.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

import edgelm

pytestmark = pytest.mark.slow

COUNT = "Count from one to a thousand: 1, 2, 3, 4, 5,"  # a prompt the model keeps continuing
PROMPTS = ["The capital of France is", "Once upon a time", "Python is a programming language that",
           "List three colours:"]


@pytest.fixture(scope="module")
def batched(default_gguf):
    with edgelm.load(default_gguf, n_ctx=512, parallel=4) as m:
        yield m


def test_info_and_plan_count_every_sequence(batched, default_gguf):
    assert batched.capabilities.max_sequences == 4 and batched.info.extra["parallel"] == 4
    with edgelm.load(default_gguf, n_ctx=512) as single:
        assert batched.info.extra["kv_cache_bytes"] == 4 * single.info.extra["kv_cache_bytes"]
    one = edgelm.recommend(default_gguf, n_ctx=512)
    four = edgelm.recommend(default_gguf, n_ctx=512, parallel=4)
    assert four.memory_breakdown["kv_cache"] == 4 * one.memory_breakdown["kv_cache"]
    assert four.load_kwargs()["parallel"] == 4


def test_one_stream_through_the_scheduler_equals_the_direct_path(batched, smollm):
    for prompt in PROMPTS[:2]:
        direct = smollm.generate(prompt, temperature=0, max_tokens=16)
        through = batched.generate(prompt, temperature=0, max_tokens=16)
        assert through.tokens == direct.tokens and through.text == direct.text


def test_generate_batch_keeps_input_order(batched):
    prompts = PROMPTS * 2
    out = batched.generate_batch(prompts, temperature=0, max_tokens=8)
    assert [c.usage.prompt_tokens for c in out] == [len(batched.tokenize(p)) for p in prompts]
    # the same prompt gives the same greedy answer wherever it ran in the batch
    assert [c.text for c in out[:4]] == [c.text for c in out[4:]]


def test_many_threads_all_complete_in_arrival_order(batched):
    """32 concurrent requests with 4 sequences: none lost; they start in the order they arrived."""
    starts: dict[int, float] = {}
    results: dict[int, edgelm.Completion] = {}
    streams = []
    for i in range(32):  # submitted in order from this thread: arrival order is i
        streams.append(batched.stream(PROMPTS[i % 4], temperature=0.7, seed=i, max_tokens=6))

    def consume(i: int) -> None:
        chunks = []
        for chunk in streams[i]:
            if not chunks:
                starts[i] = time.perf_counter()
            chunks.append(chunk)
        results[i] = edgelm.collect(iter(chunks))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(32))
    assert all(r.usage.completion_tokens >= 1 for r in results.values())
    # first come, first served: request i+4 needs a sequence freed after request i took one, so it starts later
    assert all(starts[i] < starts[i + 4] for i in range(28)), sorted(starts, key=starts.get)
    assert batched.stats()["sequences"]["active"] == 0


def test_abandoned_streams_free_their_sequences(batched):
    for _ in range(5):
        s = batched.stream(COUNT, temperature=0, max_tokens=400)
        assert next(s).finish_reason is None  # still generating
        s.close()  # the consumer stops early
    deadline = time.monotonic() + 10
    while batched.stats()["sequences"]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batched.stats()["sequences"]["active"] == 0
    c = batched.generate(PROMPTS[0], temperature=0, max_tokens=4)
    assert c.usage.completion_tokens == 4


def test_a_bad_request_fails_alone(batched):
    running = batched.stream("Count slowly: one, two,", temperature=0, max_tokens=24)
    next(running)
    with pytest.raises(edgelm.InvalidParameterError, match="grammar"):
        batched.generate("x", grammar="root ::= (", max_tokens=2)
    with pytest.raises(edgelm.ContextLengthExceededError):
        batched.generate("word " * 600, max_tokens=2)
    rest = list(running)
    assert rest[-1].finish_reason in ("length", "stop") and rest[-1].usage.completion_tokens >= 1


def test_a_long_prompt_does_not_freeze_running_streams(batched):
    """Chunked prefill: while a 450-token prompt is read, the running stream keeps getting tokens."""
    running = batched.stream("Count: 1, 2, 3,", temperature=0, max_tokens=120)
    next(running)
    got_during: list[float] = []
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 50)
    assert 400 < len(batched.tokenize(long_prompt)) < 500
    joined = batched.stream(long_prompt, temperature=0, max_tokens=2)
    first_of_long = threading.Event()

    def watch() -> None:
        next(joined)
        first_of_long.set()
        list(joined)

    t = threading.Thread(target=watch)
    t.start()
    for chunk in running:
        if not first_of_long.is_set():
            got_during.append(time.perf_counter())
    t.join(60)
    assert len(got_during) >= 2  # tokens kept coming while the long prompt was read in chunks


def test_chat_prefix_reuse_survives_concurrency(batched):
    a = [{"role": "user", "content": "Tell me about the moon. " * 20}]
    b = [{"role": "user", "content": "Tell me about the sea. " * 20}]
    first = batched.chat_batch([a, b], temperature=0, max_tokens=8)
    a2 = a + [{"role": "assistant", "content": first[0].text}, {"role": "user", "content": "And?"}]
    b2 = b + [{"role": "assistant", "content": first[1].text}, {"role": "user", "content": "And?"}]
    second = batched.chat_batch([a2, b2], temperature=0, max_tokens=4)
    for before, after in zip(first, second):  # each conversation found its own cached sequence
        assert after.usage.cached_tokens >= before.usage.prompt_tokens - 1, (before.usage, after.usage)


def test_a_batch_given_out_of_sequence_order_gives_each_part_its_own_logits(batched):
    """The backend reorders a batch by sequence id (one pass over the weights in llama.cpp); each part still gets
    the logits row of its own last token, and a part that wants none gets -1."""
    backend = batched.backend
    a, b, c = (batched.tokenize(p) for p in PROMPTS[:3])
    with batched._engine.exclusive():  # the scheduler pauses; its sequences are ours until we rewind them
        s1, s2, s3 = backend.sequences[1:4]
        try:
            alone = []
            for seq, toks in ((s3, a), (s1, b)):
                backend.rewind(seq, 0)
                alone.append(backend.argmax(backend.decode_batch([(seq, toks, True)])[0]))
                backend.rewind(seq, 0)
            backend.rewind(s2, 0)
            rows = backend.decode_batch([(s3, a, True), (s2, c, False), (s1, b, True)])
            assert rows[1] == -1 and [backend.argmax(rows[0]), backend.argmax(rows[2])] == alone
            assert (s3.tokens, s2.tokens, s1.tokens) == (a, c, b)
        finally:
            for seq in (s1, s2, s3):
                backend.rewind(seq, 0)


def test_cancel_from_another_thread(batched):
    s = batched.stream(COUNT, temperature=0, max_tokens=400)
    assert next(s).finish_reason is None
    threading.Timer(0.2, s.cancel).start()
    chunks = list(s)
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].usage.completion_tokens < 400


def test_closing_the_model_ends_running_streams_with_an_error(default_gguf):
    m = edgelm.load(default_gguf, n_ctx=256, parallel=2)
    streams = [m.stream(COUNT, temperature=0, max_tokens=200) for _ in range(3)]
    assert next(streams[0]).finish_reason is None
    errors = []

    def consume(s) -> None:
        try:
            list(s)
        except edgelm.ModelClosedError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    m.close()
    for t in threads:
        t.join(10)
    assert time.monotonic() - t0 < 10 and not any(t.is_alive() for t in threads)
    assert len(errors) == 3


def test_server_batches_and_reports_sequences(default_gguf):
    from edgelm.server import BackgroundServer, create_app

    app = create_app({"m": default_gguf}, load_kwargs={"n_ctx": 512, "parallel": 3})
    with BackgroundServer(app) as server:
        url = server.url
        results = []

        def ask(i: int) -> None:
            r = httpx.post(f"{url}/v1/completions", timeout=300,
                           json={"model": "m", "prompt": PROMPTS[i % 4], "max_tokens": 12, "temperature": 0})
            results.append(r.status_code)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        seen = 0.0
        while any(t.is_alive() for t in threads):
            text = httpx.get(f"{url}/metrics").text
            for line in text.splitlines():
                if line.startswith('edgelm_active_sequences{model="m"}'):
                    seen = max(seen, float(line.split()[-1]))
            time.sleep(0.05)
        assert results == [200] * 6
        assert seen >= 2  # several sequences ran at once
        bad = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x", "grammar": "root ::= ("},
                         timeout=60)
        assert bad.status_code == 400 and "grammar" in bad.text
        assert "edgelm_sequence_slots{model=\"m\"} 3" in httpx.get(f"{url}/metrics").text


def test_batch_command_resumes(tmp_path, default_gguf):
    from .conftest import run_cli

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": PROMPTS[i % 4], "max_tokens": 4})
                             for i in range(6)) + "\n" + json.dumps({"messages": "not a list"}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "id": "q0", "text": "kept"}) + "\n" + '{"index": 1, "id"')  # killed run
    r = run_cli("batch", str(src), "-o", str(out), "-m", str(default_gguf), "--n-ctx", "256", "--parallel", "2",
                "-t", "0")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(7))
    assert lines[0]["text"] == "kept"  # resumed, not redone
    assert all(line["usage"]["completion_tokens"] >= 1 for line in lines[1:6])
    assert lines[6]["error"]["code"] == "invalid_parameter"  # a bad line fails alone
    assert "5 answered, 1 failed, 1 already done" in r.stderr
