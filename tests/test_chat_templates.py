"""Chat templates, honestly (issue 16): a model whose files carry no chat template is never chatted with through a
format it does not have.  Chat raises NoChatTemplateError (its fix names chat_template= and generate); a template
the user names must have its special tokens in the model's vocabulary; `edgelm run` completes plainly and says so;
the server answers chat with 400 and keeps serving completions.

Fast tests use the scripted backend (tests/fakes.py, whose <|im_start|>/<|im_end|> are control tokens); slow ones
the real SmolLM2 GGUF on llama.cpp with its tokenizer.chat_template removed from the header.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import edgelm
from edgelm import runtimes
from edgelm.chat_templates import NAMES, TEMPLATES, resolve, special_tokens
from edgelm.cli import exit_code_for, main
from edgelm.errors import InvalidParameterError, NoChatTemplateError
from edgelm.model import Model
from edgelm.server.errors import status_for
from edgelm.types import ModelInfo

from .conftest import run_cli
from .fakes import EOS, FakeBackend

HI = [{"role": "user", "content": "Hi"}]


# --- the fake backend ------------------------------------------------------------------------------------------

@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A .fake model file (loaded through edgelm.load) whose backend has no chat template."""
    runtimes.register_backend("fake", FakeBackend)
    monkeypatch.setattr(FakeBackend, "template", None)
    monkeypatch.setattr(FakeBackend, "script", [1, 2, EOS])
    FakeBackend.loaded.clear()
    path = tmp_path / "base.fake"
    path.write_text("a|b|c", encoding="utf-8")
    yield path
    runtimes.unregister_backend("fake")


def _prompt(backend: FakeBackend) -> str:
    return backend.text_of(backend.calls[-1][0])


def test_known_names_resolve_case_insensitively_and_unknown_ones_are_refused():
    assert NAMES == ("chatml", "llama3", "gemma", "mistral", "phi3", "hermes", "llama3.1", "mistral-v3", "phi4-mini",
                     "granite3", "smollm3", "functiongemma")  # the last ones: tool-calling families (edgelm.tools)
    assert resolve("Gemma") == ("gemma", TEMPLATES["gemma"])
    assert resolve("{{ messages[0]['content'] }}")[0] == "custom"
    with pytest.raises(InvalidParameterError, match="gemmma") as err:
        resolve("gemmma")
    assert "chatml, llama3, gemma, mistral, phi3" in str(err.value) and err.value.parameter == "chat_template"
    with pytest.raises(InvalidParameterError, match="does not parse"):
        resolve("{% for m in messages %}{{ m")
    for bad in (None, "", 3):
        with pytest.raises(InvalidParameterError):
            resolve(bad)


def test_each_known_template_writes_its_own_markers():
    assert special_tokens(TEMPLATES["chatml"]) == ["<|im_start|>", "<|im_end|>"]
    assert special_tokens(TEMPLATES["llama3"], bos_token="<|begin_of_text|>") == [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert special_tokens(TEMPLATES["gemma"], bos_token="<bos>") == ["<start_of_turn>", "<end_of_turn>"]
    assert special_tokens(TEMPLATES["phi3"]) == ["<|system|>", "<|end|>", "<|user|>", "<|assistant|>"]
    assert special_tokens(TEMPLATES["mistral"], bos_token="<s>", eos_token="</s>") == []  # [INST] is plain text
    from edgelm.chat import render

    gemma = render(TEMPLATES["gemma"], [{"role": "system", "content": "Be brief."}, *HI], bos_token="<bos>")
    assert gemma == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    mistral = render(TEMPLATES["mistral"], [*HI, {"role": "assistant", "content": "Hello"}, *HI], bos_token="<s>",
                     eos_token="</s>")
    assert mistral == "<s>[INST] Hi [/INST] Hello</s>[INST] Hi [/INST]"


def test_a_model_without_a_template_refuses_chat_and_still_completes():
    backend = FakeBackend([b"</s>", b"Hello"])
    backend.chat_template = None
    backend.script = [1, EOS]
    m = Model(backend, ModelInfo(path="/models/base.gguf", format="gguf", backend="fake", architecture="gemma3",
                                 quantization="Q4_K_M", parameters=1, context_length=64))
    assert m.chat_template is None
    for call in (lambda: m.chat(HI), lambda: m.stream_chat(HI), lambda: m.chat_batch([HI, HI]),
                 lambda: m.apply_chat_template(HI)):
        with pytest.raises(NoChatTemplateError) as err:
            call()  # raised at call time, before any token is evaluated
        assert isinstance(err.value, edgelm.EdgelmError) and isinstance(err.value, ValueError)
        text = str(err.value)
        assert "base.gguf has no chat template" in text and "tokenizer.chat_template" in text
        assert "chat_template=" in text and "generate()" in text and "chatml, llama3, gemma, mistral, phi3" in text
    assert backend.calls == []
    assert m.generate("Hi").text == "Hello"
    assert exit_code_for(NoChatTemplateError("x")) == 4 and status_for(NoChatTemplateError("x")) == 400


def test_chat_template_names_a_format_for_a_template_less_model(fake):
    with edgelm.load(fake, chat_template="chatml") as m:
        assert m.chat_template == TEMPLATES["chatml"]
        assert m.chat(HI).text == "ab"
        backend = FakeBackend.loaded[-1]
        assert _prompt(backend) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert backend.calls[-1][0][0] == 500  # <|im_start|> went in as one control token, not as text
    custom = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    with edgelm.load(fake, chat_template=custom) as m:
        m.chat(HI)
        assert _prompt(FakeBackend.loaded[-1]) == "<|im_start|>Hi"


def test_a_template_whose_tokens_the_vocabulary_lacks_is_refused_naming_them(fake):
    with pytest.raises(InvalidParameterError) as err:
        edgelm.load(fake, chat_template="gemma")
    text = str(err.value)
    assert "<start_of_turn>, <end_of_turn>" in text and "chat_template=gemma" in text
    assert "has the tokens of: chatml" in text  # the known templates this vocabulary can take
    assert err.value.missing == ["<start_of_turn>", "<end_of_turn>"]
    assert FakeBackend.loaded[-1].closed  # nothing left half-loaded
    with pytest.raises(InvalidParameterError, match=r"<\|turn\|>"):
        edgelm.load(fake, chat_template="{% for m in messages %}<|turn|>{{ m['content'] }}{% endfor %}")
    FakeBackend.loaded.clear()
    with pytest.raises(InvalidParameterError, match="Unknown chat template name 'chatlm'"):
        edgelm.load(fake, chat_template="chatlm")
    assert FakeBackend.loaded == []  # a bad name fails before the model loads


def test_a_user_template_replaces_the_models_own(fake, monkeypatch):
    monkeypatch.setattr(FakeBackend, "template", "{{ messages[0]['content'] }}!")
    with edgelm.load(fake) as m:
        m.chat(HI)
        assert _prompt(FakeBackend.loaded[-1]) == "Hi!"
    with edgelm.load(fake, chat_template="chatml") as m:
        m.chat(HI)
        assert _prompt(FakeBackend.loaded[-1]).startswith("<|im_start|>user\nHi")


def test_run_completes_plainly_and_says_so_in_one_line(fake, tmp_path):
    r = CliRunner().invoke(main, ["run", str(fake), "Once upon a time"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "ab\n"
    notice = r.stderr.strip().splitlines()
    assert len(notice) == 1 and "has no chat template: running a plain completion" in notice[0]
    assert "--chat-template" in notice[0]
    assert _prompt(FakeBackend.loaded[-1]) == "Once upon a time"
    r = CliRunner().invoke(main, ["run", str(fake), "--raw", "Once upon a time"])
    assert r.exit_code == 0 and r.stderr == ""  # asked for plain completion: nothing to say
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}{% endfor %}")
    r = CliRunner().invoke(main, ["run", str(fake), "Hi", "--chat-template", f"@{jinja}"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert _prompt(FakeBackend.loaded[-1]) == "<|im_start|>user:Hi"
    r = CliRunner().invoke(main, ["run", str(fake), "Hi", "--chat-template", str(tmp_path / "absent.jinja")])
    assert r.exit_code == 2 and "Unknown chat template name" in r.stderr
    r = CliRunner().invoke(main, ["run", str(fake), "Hi", "--chat-template", f"@{tmp_path / 'absent.jinja'}"])
    assert r.exit_code == 2 and "cannot read the chat template file" in r.stderr
    r = CliRunner().invoke(main, ["run", str(fake), "Hi", "--system", "Be brief."])  # a system message needs a format
    assert r.exit_code == 4 and "has no chat template" in r.stderr


def test_chat_command_exits_with_the_typed_error(fake):
    r = CliRunner().invoke(main, ["chat", str(fake)], input="Hi\n")
    assert r.exit_code == 4 and r.stdout == ""
    assert "has no chat template" in r.stderr and "--chat-template" in r.stderr
    r = CliRunner().invoke(main, ["chat", str(fake), "--chat-template", "chatml"], input="Hi\n")
    assert r.exit_code == 0 and r.stdout == "ab\n", r.output


def test_the_server_refuses_chat_with_400_and_serves_completions(fake):
    from edgelm.server import BackgroundServer, create_app

    with BackgroundServer(create_app({"base": fake})) as server:
        url = server.url
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "base", "messages": HI}, timeout=30)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "no_chat_template" and error["type"] == "invalid_request_error"
        assert "chat_template=" in error["message"] and "generate()" in error["message"]
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "base", "messages": HI, "stream": True}, timeout=30)
        assert r.status_code == 400  # refused before the stream starts, not as an error event inside it
        r = httpx.post(f"{url}/api/chat", json={"model": "base", "messages": HI}, timeout=30)
        assert r.status_code == 400 and "has no chat template" in r.json()["error"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "Hi"}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"
        r = httpx.post(f"{url}/api/generate", json={"model": "base", "prompt": "Hi", "raw": True, "stream": False},
                       timeout=30)
        assert r.status_code == 200 and r.json()["response"] == "ab"
        # without raw, Ollama formats the prompt with the model's template; with none, the prompt is completed as
        # it is (Ollama's bare "{{ .Prompt }}")...
        r = httpx.post(f"{url}/api/generate", json={"model": "base", "prompt": "Hi", "stream": False}, timeout=30)
        assert r.status_code == 200 and r.json()["response"] == "ab"
        assert _prompt(FakeBackend.loaded[-1]) == "Hi"
        # ... but a system message needs a chat format
        r = httpx.post(f"{url}/api/generate", json={"model": "base", "prompt": "Hi", "system": "Be brief.",
                                                    "stream": False}, timeout=30)
        assert r.status_code == 400 and "has no chat template" in r.json()["error"]
    with BackgroundServer(create_app({"base": fake}, load_kwargs={"chat_template": "chatml"})) as server:
        # Ollama clients read the template from /api/show: the one named at serve time, before and after loading
        r = httpx.post(f"{server.url}/api/show", json={"model": "base"}, timeout=30)
        assert r.status_code == 200 and "<|im_start|>" in r.json()["template"]
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "base", "messages": HI}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab"
        r = httpx.post(f"{server.url}/api/show", json={"model": "base"}, timeout=30)
        assert r.status_code == 200 and "<|im_start|>" in r.json()["template"]


# --- the real model: SmolLM2's GGUF without its template ---------------------------------------------------------

def without_chat_template(src: Path, dst: Path, key: str = "tokenizer.chat_template") -> Path:
    """Copy the GGUF ``src`` to ``dst`` with the metadata entry ``key`` left out (header rewritten, tensor data
    copied as is at the new aligned offset; tensor offsets are relative to it)."""
    from edgelm.formats.gguf import DEFAULT_ALIGNMENT, _Reader, read_header

    header = read_header(src)
    alignment = int(header.metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
    with open(src, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, src)
        r.pos = 8
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        kept = []
        for _ in range(n_kv):
            start = r.pos
            name = r.string()
            r.value(r.scalar("<I"))
            if name != key:
                kept.append(bytes(buf[start:r.pos]))
        assert len(kept) == n_kv - 1, f"{src} has no {key}"
        infos_start = r.pos
        for _ in range(n_tensors):  # name, n_dims, dims, type, offset
            r.string()
            n_dims = r.scalar("<I")
            r.pos += 8 * n_dims + 4 + 8
        infos = bytes(buf[infos_start:r.pos])
        head = bytes(buf[:8]) + struct.pack("<QQ", n_tensors, len(kept)) + b"".join(kept) + infos
        head += b"\0" * (-len(head) % alignment)
        tmp = dst.with_suffix(".part")
        with open(tmp, "wb") as out:
            out.write(head)
            data = memoryview(buf)[header.data_offset:]
            out.write(data)
            data.release()
    tmp.rename(dst)
    return dst


@pytest.fixture(scope="session")
def base_gguf(default_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct with no chat template in its file (a stand-in for a base model), once per session."""
    path = without_chat_template(default_gguf, tmp_path_factory.mktemp("no-template") / "smollm2-no-template.gguf")
    from edgelm.formats.gguf import read_header

    assert read_header(path).chat_template is None and read_header(default_gguf).chat_template is not None
    return path


SYSTEM_AND_QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
@pytest.mark.timeout(160)
def test_real_model_without_template_refuses_chat_and_chatml_restores_it(base_gguf, smollm):
    with edgelm.load(base_gguf, n_ctx=512) as m:
        with pytest.raises(NoChatTemplateError, match="chat_template=") as err:
            m.chat(SYSTEM_AND_QUESTION)
        assert "generate()" in str(err.value) and "no tokenizer.chat_template in the GGUF" in str(err.value)
        c = m.generate("The capital of France is", max_tokens=8, temperature=0)
        assert c.usage.completion_tokens > 0 and c.text.strip()
    with edgelm.load(base_gguf, n_ctx=2048, chat_template="chatml") as m:  # the n_ctx of the smollm fixture
        # SmolLM2's own template renders a conversation with a system message as plain ChatML: same tokens, same
        # greedy answer as the original file (both evaluated from an empty cache)
        smollm.reset_cache()
        tokens = m.chat_tokens(SYSTEM_AND_QUESTION)
        assert tokens == smollm.chat_tokens(SYSTEM_AND_QUESTION)
        assert tokens.count(m.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]) == 3
        ours = m.chat(SYSTEM_AND_QUESTION, max_tokens=16, temperature=0)
        theirs = smollm.chat(SYSTEM_AND_QUESTION, max_tokens=16, temperature=0)
        assert ours.text == theirs.text and ours.finish_reason == theirs.finish_reason


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_real_model_refuses_templates_whose_tokens_it_lacks(base_gguf):
    with pytest.raises(InvalidParameterError) as err:
        edgelm.load(base_gguf, n_ctx=512, chat_template="gemma")
    assert "<start_of_turn>" in str(err.value) and "<end_of_turn>" in str(err.value)
    assert "has the tokens of: chatml" in str(err.value)
    with pytest.raises(InvalidParameterError, match=r"<\|start_header_id\|>"):
        edgelm.load(base_gguf, n_ctx=512, chat_template="llama3")


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_real_run_completes_plainly_and_chat_exits_with_the_error(base_gguf):
    r = run_cli("run", str(base_gguf), "The capital of France is", "-n", "8", "-t", "0", "--n-ctx", "512")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    notes = [line for line in r.stderr.splitlines() if "chat template" in line]
    assert len(notes) == 1 and "running a plain completion" in notes[0]
    assert "<|im_start|>" not in r.stdout and "<|im_end|>" not in r.stdout
    r = run_cli("chat", str(base_gguf), "--n-ctx", "512", input="Hi\n")
    assert r.returncode == 4 and "has no chat template" in r.stderr and "--chat-template" in r.stderr
    r = run_cli("run", str(base_gguf), "What is the capital of France?", "-n", "12", "-t", "0", "--n-ctx", "512",
                "--chat-template", "chatml")
    assert r.returncode == 0 and "chat template" not in r.stderr and r.stdout.strip(), r.stderr
    r = run_cli("run", str(base_gguf), "Hi", "--n-ctx", "512", "--chat-template", "gemma")
    assert r.returncode == 2 and "<start_of_turn>" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_real_server_answers_chat_with_400_to_the_official_clients(base_gguf):
    import ollama
    import openai

    from edgelm.server import BackgroundServer, create_app

    app = create_app({"base": base_gguf}, load_kwargs={"n_ctx": 512, "parallel": 1})
    with BackgroundServer(app) as server:
        oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model="base", messages=SYSTEM_AND_QUESTION, max_tokens=8)
        assert err.value.status_code == 400 and err.value.code == "no_chat_template"
        assert "chat_template=" in str(err.value) and "generate()" in str(err.value)
        with pytest.raises(openai.BadRequestError):
            oai.chat.completions.create(model="base", messages=SYSTEM_AND_QUESTION, max_tokens=8, stream=True)
        done = oai.completions.create(model="base", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert done.choices[0].text.strip() and done.usage.completion_tokens > 0
        oll = ollama.Client(host=server.url)
        with pytest.raises(ollama.ResponseError) as err:
            oll.chat(model="base", messages=SYSTEM_AND_QUESTION)
        assert err.value.status_code == 400 and "has no chat template" in err.value.error
        raw = oll.generate(model="base", prompt="The capital of France is", raw=True,
                           options={"num_predict": 8, "temperature": 0})
        plain = oll.generate(model="base", prompt="The capital of France is",
                             options={"num_predict": 8, "temperature": 0})
        assert raw.response.strip() and plain.response == raw.response  # no template: the prompt as it is


# --- the onnxruntime backend: an ONNX folder whose tokenizer files carry no template -----------------------------

@pytest.fixture(scope="module")
def onnx_base(tmp_path_factory) -> Path:
    """A tiny random llama exported to ONNX (fp32), then stripped of chat_template.jinja and the tokenizer_config
    entry: what a base model's export looks like."""
    import json

    from edgelm.converters.onnx import convert_to_onnx

    from .onnx_helpers import tiny_checkpoint

    root = tmp_path_factory.mktemp("onnx-no-template")
    out = convert_to_onnx(tiny_checkpoint("llama", root / "src"), root / "model", "fp32")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_onnx_model_without_template_refuses_chat_until_one_is_named(onnx_base):
    with edgelm.load(onnx_base, backend="onnxruntime", threads=1) as m:
        assert m.chat_template is None
        with pytest.raises(NoChatTemplateError, match="no chat_template.jinja"):
            m.chat(HI)
        assert m.generate("The object", max_tokens=4, temperature=0).usage.completion_tokens > 0
    with edgelm.load(onnx_base, backend="onnxruntime", threads=1, chat_template="chatml") as m:
        tokens = m.chat_tokens(HI)
        start = m.tokenize("<|im_start|>", add_special=False, parse_special=True)
        assert len(start) == 1 and tokens.count(start[0]) == 2  # the user turn and the assistant's
        assert m.chat(HI, max_tokens=4, temperature=0).usage.prompt_tokens == len(tokens)
    with pytest.raises(InvalidParameterError, match="<start_of_turn>, <end_of_turn>"):
        edgelm.load(onnx_base, backend="onnxruntime", threads=1, chat_template="gemma")
