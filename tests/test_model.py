"""The Model layer over a scripted backend: decoding, stop strings, limits and errors, exactly as users see them."""

from __future__ import annotations

import threading
import time

import pytest

import edgelm
from edgelm import runtimes
from edgelm.model import Model
from edgelm.types import ModelInfo

from .fakes import EOS, FakeBackend

SMILE = "🙂".encode("utf-8")  # 4 bytes
KANJI = "世".encode("utf-8")  # 3 bytes
VOCAB = [b"</s>", b"Hello", b" wor", b"ld", SMILE[:1], SMILE[1:3], SMILE[3:], KANJI[:2], KANJI[2:], b".", b" STOP", b"ST", b"OP"]


def make(script: list[int], n_ctx: int = 64, vocab: list[bytes] = VOCAB) -> tuple[Model, FakeBackend]:
    backend = FakeBackend(vocab, n_ctx=n_ctx)
    backend.script = script
    info = ModelInfo(path="fake", format="fake", backend="fake", architecture="fake", quantization="none",
                     parameters=1, context_length=n_ctx)
    return Model(backend, info), backend


def texts(chunks) -> list[str]:
    return [c.text for c in chunks]


def test_stream_yields_text_and_final_chunk_has_usage():
    m, _ = make([1, 2, 3, EOS])
    chunks = list(m.stream("Hi", max_tokens=10))
    assert "".join(texts(chunks)) == "Hello world"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage.prompt_tokens == 2 and last.usage.completion_tokens == 3
    assert last.usage.total_tokens == 5
    assert last.timings is not None and last.timings.total_seconds > 0


def test_multibyte_characters_are_never_split_across_chunks():
    m, _ = make([1, 4, 5, 6, 7, 8, 9, EOS])
    chunks = texts(m.stream("x"))
    assert "".join(chunks) == "Hello🙂世."
    for c in chunks:
        assert "\ufffd" not in c
    assert "🙂" in chunks and "世" in chunks  # each whole character arrives in one chunk


def test_invalid_bytes_at_the_end_become_one_replacement_character():
    m, _ = make([1, 4, EOS])  # an emoji cut after its first byte
    assert m.generate("x").text == "Hello\ufffd"


def test_a_character_cut_by_max_tokens_is_dropped_not_garbled():
    m, _ = make([1, 4, 5, 6, EOS])
    c = m.generate("x", max_tokens=3)  # "Hello" + 2 of the emoji's 3 tokens
    assert c.text == "Hello" and c.finish_reason == "length"


def test_max_tokens_gives_finish_reason_length():
    m, backend = make([1, 2, 3, 9, EOS])
    c = m.generate("x", max_tokens=2)
    assert c.text == "Hello wor" and c.finish_reason == "length" and c.usage.completion_tokens == 2
    assert backend.stopped_early  # the backend's generator was closed, not drained


def test_stop_string_is_not_emitted_even_across_tokens():
    m, _ = make([1, 11, 12, 2, 3, EOS])  # "Hello" + "ST" + "OP" + " world"
    chunks = list(m.stream("x", stop=["STOP"]))
    assert "".join(texts(chunks)) == "Hello"
    assert chunks[-1].finish_reason == "stop"
    assert all("ST" not in t for t in texts(chunks))  # the held-back partial never leaks


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    m, _ = make([1, 11, 2, 3, EOS])  # "HelloST world": "ST" looked like the start of "STOP"
    assert m.generate("x", stop=["STOP"]).text == "HelloST world"


def test_earliest_of_several_stops_wins():
    m, _ = make([1, 2, 3, 9, EOS])
    assert m.generate("x", stop=["ld", "wor"]).text == "Hello "


def test_prompt_longer_than_context_is_an_error_not_truncation():
    m, backend = make([1, EOS], n_ctx=8)
    with pytest.raises(edgelm.ContextLengthExceededError) as err:
        m.generate("x" * 8)
    assert err.value.prompt_tokens == 8 and err.value.n_ctx == 8
    assert "8 tokens" in str(err.value) and "n_ctx" in str(err.value)
    assert isinstance(err.value, ValueError)
    assert backend.calls == []  # nothing was run


def test_generation_stops_at_the_end_of_the_context():
    m, _ = make([1, 2, 3, 9, 9, 9, EOS], n_ctx=5)
    c = m.generate("abc")  # 3 prompt tokens, room for 2
    assert c.usage.completion_tokens == 2 and c.finish_reason == "length"


@pytest.mark.parametrize(
    "params, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.2}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"seed": -3}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
def test_invalid_parameters_name_the_parameter(params, name):
    m, backend = make([1, EOS])
    with pytest.raises(edgelm.InvalidParameterError) as err:
        m.generate("x", **params)
    assert err.value.parameter == name
    assert name in str(err.value)
    assert isinstance(err.value, ValueError)
    assert backend.calls == []


def test_errors_are_raised_at_call_time_not_at_first_iteration():
    m, _ = make([1, EOS])
    with pytest.raises(edgelm.InvalidParameterError):
        m.stream("x", temperature=-1)  # no next() needed


def test_empty_prompt_is_an_error():
    m, _ = make([1, EOS])
    with pytest.raises(edgelm.InvalidParameterError, match="empty"):
        m.generate("")


def test_chat_uses_the_template_and_validates_messages():
    m, backend = make([1, EOS])
    assert m.chat([{"role": "user", "content": "Hi"}]).text == "Hello"
    prompt = backend.text_of(backend.calls[-1][0])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # the fake's template: ChatML
    with pytest.raises(edgelm.InvalidParameterError, match=r"messages\[0\]\.role"):
        m.chat([{"role": "wizard", "content": "Hi"}])
    with pytest.raises(edgelm.InvalidParameterError, match="messages"):
        m.chat([])


def test_model_template_is_rendered_with_bos_and_generation_prompt():
    m, backend = make([1, EOS])
    backend.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}" \
                            "{% if add_generation_prompt %}[assistant]{% endif %}"
    assert m.apply_chat_template([{"role": "user", "content": "Q"}]) == "<s>[user]Q[assistant]"


def test_closed_model_refuses_work_and_closes_backend():
    with make([1, EOS])[0] as m:
        backend = m._backend
    assert backend.closed and m.closed
    with pytest.raises(edgelm.ModelClosedError):
        m.generate("x")


def test_abandoned_stream_releases_the_model_for_other_threads():
    m, backend = make([1, 2, 3, 9, EOS])
    stream = m.stream("x")
    next(stream)
    stream.close()
    assert backend.stopped_early
    done = []
    t = threading.Thread(target=lambda: done.append(m.generate("x").text))
    t.start()
    t.join(5)
    assert done == ["Hello world."]


def test_the_model_is_free_once_the_last_chunk_is_out():
    m, _ = make([1, EOS])
    stream = m.stream("x")
    chunks = [next(stream), next(stream)]
    assert chunks[-1].finish_reason == "stop"  # the caller holds the suspended stream, and yet:
    done = []
    t = threading.Thread(target=lambda: done.append(m.generate("y").finish_reason))
    t.start()
    t.join(5)
    assert done == ["stop"]


def test_cancel_from_another_thread_ends_the_stream():
    m, backend = make([1, 2, 3, 9, 1, 2, 3, 9, EOS])
    stream = m.stream("x")
    first = next(stream)
    threading.Thread(target=stream.cancel).start()
    rest = list(stream)
    assert first.text and rest[-1].finish_reason == "cancelled"
    assert backend.stopped_early
    assert m.generate("again").finish_reason == "stop"  # the model is free


def test_waiting_generations_run_in_arrival_order():
    m, backend = make([1, EOS])
    holder = m.stream("first")
    next(holder)  # holds the model
    order = []
    threads = []
    for name in "abcd":
        t = threading.Thread(target=lambda name=name: order.append(m.generate(name).text and name))
        t.start()
        threads.append(t)
        time.sleep(0.1)  # each is waiting before the next arrives
    holder.close()
    for t in threads:
        t.join(5)
    assert order == list("abcd")


def test_close_while_streaming_ends_the_stream_with_an_error():
    m, _ = make([1, 2, 3, 9, EOS])
    stream = m.stream("x")
    next(stream)
    waiting = m.stream("y")
    closer = threading.Thread(target=m.close)
    closer.start()
    with pytest.raises(edgelm.ModelClosedError):
        list(stream)
    closer.join(5)
    assert not closer.is_alive()
    with pytest.raises(edgelm.ModelClosedError):
        list(waiting)


def test_generate_batch_keeps_input_order_and_reports_progress():
    m, backend = make([1, EOS])
    seen = []
    out = m.generate_batch(["a", "bb", "ccc"], progress=lambda done, total: seen.append((done, total)))
    assert [c.usage.prompt_tokens for c in out] == [1, 2, 3]
    assert seen[-1] == (3, 3) and len(seen) == 3


def test_load_by_registered_backend_and_auto_detection(tmp_path):
    path = tmp_path / "m.fake"
    path.write_text("Hi|!", encoding="utf-8")
    FakeBackend.script = [1, 2, EOS]
    runtimes.register_backend("fake", FakeBackend)
    try:
        with edgelm.load(path, n_ctx=32) as m:  # backend="auto" asks FakeBackend.accepts
            assert m.info.backend == "fake" and m.info.context_length == 32
            assert m.generate("x").text == "Hi!"
        with edgelm.load(path, backend="fake") as m:
            assert m.info.format == "fake"
    finally:
        runtimes.unregister_backend("fake")
        FakeBackend.script = []


def test_missing_model_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(edgelm.ModelNotFoundError) as err:
        edgelm.load(missing)
    assert str(missing) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_backend_lists_the_known_ones(default_gguf):
    with pytest.raises(edgelm.UnknownBackendError, match="llamacpp"):
        edgelm.load(default_gguf, backend="tensorflow")


def test_missing_optional_backend_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if `pip install edgelm[onnx]` was never run
    with pytest.raises(edgelm.BackendNotInstalledError) as err:
        runtimes.get_backend("onnxruntime")
    assert 'edgelm[onnx]' in str(err.value)
    assert isinstance(err.value, ImportError)


def test_unrecognised_file_is_refused_before_any_backend_runs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(edgelm.UnsupportedModelError, match="neither a GGUF"):
        edgelm.load(path)


@pytest.mark.parametrize("kwargs, name", [({"threads": 0}, "threads"), ({"n_ctx": 2}, "n_ctx"),
                                          ({"device": "tpu9000"}, "device")])
def test_invalid_load_options_name_the_option(default_gguf, kwargs, name):
    with pytest.raises(edgelm.InvalidParameterError) as err:
        edgelm.load(default_gguf, **kwargs)
    assert err.value.parameter == name
