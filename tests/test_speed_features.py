"""Prompt reuse, saved prompt caches, speculative decoding, KV-cache quantization, bench and eval (real llama.cpp)."""

from __future__ import annotations

import json

import pytest

import edgelm

from .conftest import run_cli

pytestmark = pytest.mark.slow

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at six. He wound the clockwork, trimmed the "
    "wick, polished the great lens until it shone, and wrote the weather in a leather book: wind from the west, "
    "sea calm, two ships passing north. In the morning he walked the shore to collect driftwood for the stove."
)
COPY_PROMPT = f"Repeat the text exactly.\n\nText: {PASSAGE}\n\nRepeated: The lighthouse keeper"


def greedy(m, prompt, **kw):
    m.reset_cache()
    return m.generate(prompt, temperature=0, max_tokens=60, **kw)


def test_prompt_lookup_output_is_identical_to_plain_greedy(smollm):
    plain = greedy(smollm, COPY_PROMPT)
    fast = greedy(smollm, COPY_PROMPT, speculative="prompt-lookup")
    assert fast.text == plain.text and fast.usage == plain.usage
    stats = smollm.stats()["speculative"]
    assert stats["mode"] == "prompt-lookup" and stats["accepted"] > 10  # drafts really were used
    # and the completion's timings say so (plain decoding drafts nothing)
    assert (fast.timings.drafted_tokens, fast.timings.accepted_tokens) == (stats["drafted"], stats["accepted"])
    assert 0 < fast.timings.draft_acceptance <= 1 and plain.timings.draft_acceptance is None


def test_speculation_is_not_applied_when_sampling(smollm):
    greedy(smollm, COPY_PROMPT, speculative="prompt-lookup")
    assert "speculative" in smollm.stats()
    c = smollm.generate(COPY_PROMPT, temperature=0.7, seed=1, max_tokens=10, speculative="prompt-lookup")
    assert c.usage.completion_tokens > 0 and "speculative" not in smollm.stats()


def test_draft_model_gives_identical_output(default_gguf):
    with edgelm.load(default_gguf, n_ctx=1024) as plain_model:
        plain = greedy(plain_model, COPY_PROMPT)
    with edgelm.load(default_gguf, n_ctx=1024, draft_model=default_gguf) as m:
        assert m.info.extra["speculative"] == "draft"
        out = greedy(m, COPY_PROMPT)
        assert out.text == plain.text
        assert m.stats()["speculative"]["accepted"] > 0


def test_draft_mode_without_draft_model_is_refused(smollm):
    with pytest.raises(edgelm.InvalidParameterError, match="draft_model"):
        smollm.generate("x", temperature=0, speculative="draft")


def test_second_chat_turn_reuses_the_cached_history(smollm):
    history = [{"role": "system", "content": "You are a helpful assistant. " + PASSAGE * 3},
               {"role": "user", "content": "Who climbs the stairs?"}]
    smollm.reset_cache()
    first = smollm.chat(history, temperature=0, max_tokens=12)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "When?"}]
    second = smollm.chat(history, temperature=0, max_tokens=4)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens - 1  # only the new turn needs evaluating
    assert second.usage.prompt_tokens > second.usage.cached_tokens


def test_saved_state_restores_in_a_fresh_model(default_gguf, tmp_path):
    question = [{"role": "system", "content": "You are a helpful assistant. " + PASSAGE},
                {"role": "user", "content": "What does the keeper polish?"}]
    state = tmp_path / "prompt.kv"
    with edgelm.load(default_gguf, n_ctx=1024) as m1:
        first = m1.chat(question, temperature=0, max_tokens=16)
        saved = m1.save_state(state)
        assert saved == first.usage.prompt_tokens + first.usage.completion_tokens - 1
        again = m1.chat(question, temperature=0, max_tokens=16)  # answered from the cache
    with edgelm.load(default_gguf, n_ctx=1024) as m2:
        assert m2.load_state(state) == saved
        restored = m2.chat(question, temperature=0, max_tokens=16)
        assert restored.text == again.text
        # the restored cache held the question and the first answer: the whole prompt but its last token was reused
        assert restored.usage.cached_tokens == first.usage.prompt_tokens - 1


def test_state_of_another_model_or_kv_type_is_refused(default_gguf, tmp_path):
    state = tmp_path / "s.kv"
    with edgelm.load(default_gguf, n_ctx=512) as m:
        m.generate("Hello there", max_tokens=2, temperature=0)
        m.save_state(state)
    with edgelm.load(default_gguf, n_ctx=512, kv_cache="q8_0") as m:
        with pytest.raises(edgelm.StateMismatchError, match="kv_cache"):
            m.load_state(state)
    other = tmp_path / "other.gguf"
    data = bytearray(default_gguf.read_bytes())
    name = b"Smollm2 135M 8k Lc100K Mix1 Ep2"
    at = data.index(name)
    data[at : at + len(name)] = b"Another model name, same length"
    other.write_bytes(bytes(data))
    with edgelm.load(other, n_ctx=512) as m:
        with pytest.raises(edgelm.StateMismatchError, match="saved for model") as err:
            m.load_state(state)
        assert isinstance(err.value, ValueError)
    junk = tmp_path / "junk.kv"
    junk.write_bytes(b"not a state")
    with edgelm.load(default_gguf, n_ctx=512) as m:
        with pytest.raises(edgelm.StateMismatchError, match="not an edgelm state"):
            m.load_state(junk)


def test_quantized_kv_cache_halves_its_memory(default_gguf):
    with edgelm.load(default_gguf, n_ctx=1024) as m:
        f16 = m.info.extra["kv_cache_bytes"]
    with edgelm.load(default_gguf, n_ctx=1024, kv_cache="q8_0") as m:
        q8 = m.info.extra["kv_cache_bytes"]
    assert f16 == 30 * 1024 * 3 * (64 + 64) * 2  # layers * ctx * kv heads * (k+v head dims) * 2 bytes
    assert 0.5 < q8 / f16 < 0.56


def test_bench_cli_reports_the_figures(tmp_path):
    png = tmp_path / "bench.png"
    r = run_cli("bench", "--runs", "1", "--prompt-tokens", "32", "-n", "8", "--n-ctx", "256", "--json",
                "--plot", str(png))
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    for key in ("prompt_tokens_per_second", "tokens_per_second", "time_to_first_token", "peak_rss", "load_seconds"):
        assert row[key] > 0, key
    assert row["prompt_tokens"] == 32 and row["peak_rss"] > 50 * 2**20
    assert png.read_bytes().startswith(b"\x89PNG")


def test_bench_peak_memory_is_the_child_own_not_the_callers(default_gguf):
    from edgelm.measure import bench

    ballast = bytearray(1 << 30)  # a caller holding 1 GiB (getrusage in the child would start from it)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    (row,) = bench([str(default_gguf)], runs=1, prompt_tokens=16, gen_tokens=4, n_ctx=256)
    assert 50 * 2**20 < row.peak_rss < 700 * 2**20  # the 98 MB model, llama.cpp and Python
    del ballast


def test_eval_cli_compares_kv_cache_types(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(PASSAGE * 12)
    r = run_cli("eval", "--text", str(text), "--window", "128", "--windows", "2", "--kv-cache", "f16",
                "--kv-cache", "q8_0", "--json")
    assert r.returncode == 0, r.stderr
    f16, q8 = json.loads(r.stdout)
    assert f16["kv_cache"] == "f16" and q8["kv_cache"] == "q8_0"
    assert 1.0 < f16["perplexity"] < 20  # a repeated passage is easy to predict
    assert abs(q8["perplexity"] / f16["perplexity"] - 1) < 0.05
    assert q8["kv_cache_bytes"] < f16["kv_cache_bytes"]


def test_eval_on_too_short_text_is_a_clear_error(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Too short.")
    r = run_cli("eval", "--text", str(text))
    assert r.returncode == 2 and "fewer than one window" in r.stderr
