"""The llama.cpp backend with the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest

import edgelm

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "What is the capital of France?"}]


def test_info_describes_the_loaded_model(smollm, default_gguf):
    info = smollm.info
    assert info.path == str(default_gguf)
    assert (info.format, info.backend, info.architecture, info.quantization) == ("gguf", "llamacpp", "llama", "Q4_1")
    assert 130_000_000 < info.parameters < 140_000_000
    assert info.context_length == 2048 and info.trained_context_length == 8192
    assert info.size_bytes == default_gguf.stat().st_size


def test_chat_answers_the_capital_question(smollm):
    c = smollm.chat(CAPITAL, temperature=0, max_tokens=24)
    assert "Paris" in c.text
    assert c.finish_reason == "stop" and 3 <= c.usage.completion_tokens < 24  # a short answer that ends itself


def test_greedy_is_deterministic_and_stream_equals_generate(smollm):
    a = smollm.generate("The three primary colours are", temperature=0, max_tokens=24)
    streamed = "".join(ch.text for ch in smollm.stream("The three primary colours are", temperature=0, max_tokens=24))
    assert a.text == streamed and len(a.text) > 10


def test_seed_makes_sampling_repeatable(smollm):
    runs = [smollm.generate("Once upon a time", temperature=1.0, seed=7, max_tokens=20).text for _ in range(2)]
    other = smollm.generate("Once upon a time", temperature=1.0, seed=8, max_tokens=20).text
    assert runs[0] == runs[1]
    assert other != runs[0]


def test_stop_string_ends_generation_and_is_not_emitted(smollm):
    c = smollm.generate("Count: 1, 2, 3,", temperature=0, max_tokens=64, stop=["7"])
    assert c.finish_reason == "stop"
    assert "7" not in c.text and c.text.strip().startswith("4")


def test_max_tokens_limits_generation(smollm):
    c = smollm.generate("Count: 1, 2, 3,", temperature=0, max_tokens=5)
    assert c.usage.completion_tokens == 5 and c.finish_reason == "length"


def test_prompt_longer_than_context_is_a_typed_error(default_gguf):
    with edgelm.load(default_gguf, n_ctx=256) as m:
        with pytest.raises(edgelm.ContextLengthExceededError) as err:
            m.generate("word " * 300)
        assert err.value.n_ctx == 256 and err.value.prompt_tokens == len(m.tokenize("word " * 300))
        # the model still works afterwards
        assert m.generate("Hello", max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_tokenize_detokenize_round_trip_with_multibyte_text(smollm):
    text = "Hello 世界 🙂 café"
    ids = smollm.tokenize(text, add_special=False)
    assert smollm.detokenize(ids) == text
    # some tokens hold part of a character: this is what the streaming decoder must not split
    assert any(_invalid_utf8(smollm.token_bytes([t])) for t in ids)


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_streamed_chunks_never_hold_half_a_character(smollm):
    for prompt in ("Emoji list: 🙂 😀 😃 😄", "Chinese numbers: 一, 二, 三, 四,"):
        chunks = [c.text for c in smollm.stream(prompt, temperature=0, max_tokens=20)]
        text = "".join(chunks)
        assert all("\ufffd" not in c for c in chunks), chunks
        # the model did write multi-byte characters that its tokens split, so the check above means something
        ids = smollm.tokenize(text, add_special=False)
        assert any(_invalid_utf8(smollm.token_bytes([t])) for t in ids), text


def test_prefix_reuse_gives_the_same_answer_as_a_fresh_cache(smollm):
    first = smollm.chat(CAPITAL, temperature=0, max_tokens=16).text
    again = smollm.chat(CAPITAL, temperature=0, max_tokens=16).text  # reuses the cached prefix
    smollm.reset_cache()
    fresh = smollm.chat(CAPITAL, temperature=0, max_tokens=16).text
    assert first == again == fresh


def test_repeat_penalty_and_top_k_change_sampling_without_errors(smollm):
    c = smollm.generate("Count: 1, 2, 3,", temperature=0, max_tokens=16, repeat_penalty=1.5)
    plain = smollm.generate("Count: 1, 2, 3,", temperature=0, max_tokens=16)
    assert c.text != plain.text  # the penalty reached the sampler


def test_grammar_constrains_output(smollm):
    c = smollm.generate("Is the sky blue? Answer:", grammar='root ::= " yes" | " no"', temperature=0, max_tokens=8)
    assert c.text in (" yes", " no")


def test_bad_grammar_names_the_parameter(smollm):
    with pytest.raises(edgelm.InvalidParameterError) as err:
        smollm.generate("x", grammar="root ::= (", max_tokens=2)
    assert err.value.parameter == "grammar"


def test_quantized_kv_cache_loads_and_generates(default_gguf):
    with edgelm.load(default_gguf, n_ctx=512, kv_cache="q8_0") as m:
        assert m.info.extra["kv_cache"] == "q8_0"
        assert m.generate("The capital of France is", temperature=0, max_tokens=4).usage.completion_tokens >= 1
    with pytest.raises(edgelm.InvalidParameterError, match="kv_cache"):
        edgelm.load(default_gguf, kv_cache="q3_z")
