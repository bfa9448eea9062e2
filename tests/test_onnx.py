"""ONNX converter and onnxruntime backend on tiny random checkpoints (llama, qwen3) made in the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.converters.onnx import convert_to_onnx
from edgelm.formats.onnx_folder import check_folder
from edgelm.errors import (ContextLengthExceededError, ExecutionProviderError, InvalidModelFileError,
                           InvalidParameterError, InvalidSourceError, ModelNotFoundError, OutputExistsError,
                           UnknownQuantizationError, UnsafeWeightsError, UnsupportedModelError, ConversionError)
from edgelm.params import GenerationParams
from edgelm.runtimes.onnx import OnnxBackend
from edgelm.runtimes.onnx_providers import choose_provider
from edgelm.runtimes.sampling import NumpySampler
from edgelm.runtimes.tokenizer_json import gpt2_byte_decoder

from .helpers import raw_greedy
from .onnx_helpers import tiny_checkpoint

# --- fast: checks that need no conversion ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_src(tmp_path_factory) -> Path:
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("src") / "tiny-llama")


def test_unknown_quantization_is_refused(tiny_llama_src, tmp_path):
    with pytest.raises(UnknownQuantizationError, match="int3.*int4, int8, fp16, fp32"):
        convert_to_onnx(tiny_llama_src, tmp_path / "out", "int3")
    assert not (tmp_path / "out").exists()


def test_source_without_config_or_tokenizer_or_safetensors(tiny_llama_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_src, src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(InvalidSourceError, match="no tokenizer.json"):
        convert_to_onnx(src, tmp_path / "out", "int4")
    (src / "config.json").unlink()
    with pytest.raises(InvalidSourceError, match="no config.json"):
        convert_to_onnx(src, tmp_path / "out", "int4")
    with pytest.raises(InvalidSourceError, match="not a folder"):
        convert_to_onnx(tmp_path / "nowhere", tmp_path / "out", "int4")
    assert list(tmp_path.iterdir()) == [src]  # nothing written next to the output


def test_pickle_only_weights_are_refused(tiny_llama_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_src, src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        convert_to_onnx(src, tmp_path / "out", "int4")


def test_unsupported_architecture_names_the_supported_ones(tiny_llama_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM.*LlamaForCausalLM.*GGUF"):
        convert_to_onnx(src, tmp_path / "out", "int4")


def test_existing_output_is_not_replaced_without_overwrite(tiny_llama_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_to_onnx(tiny_llama_src, out, "int4")
    with pytest.raises(OutputExistsError, match="not an edgelm ONNX folder"):
        convert_to_onnx(tiny_llama_src, out, "int4", overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"


def test_bad_quantization_options(tiny_llama_src, tmp_path):
    with pytest.raises(InvalidParameterError, match="block_size"):
        convert_to_onnx(tiny_llama_src, tmp_path / "o", "int4", block_size=48)
    with pytest.raises(InvalidParameterError, match="accuracy_level"):
        convert_to_onnx(tiny_llama_src, tmp_path / "o", "int4", accuracy_level=7)
    with pytest.raises(InvalidParameterError, match="bits"):
        convert_to_onnx(tiny_llama_src, tmp_path / "o", "int4", bits=3)


def test_provider_choice():
    cpu_only = ["CPUExecutionProvider"]
    assert choose_provider("cpu", None, cpu_only) == ("CPUExecutionProvider", None)
    assert choose_provider("cuda", None, ["CUDAExecutionProvider", *cpu_only]) == ("CUDAExecutionProvider", None)
    assert choose_provider("gpu", None, ["DmlExecutionProvider", *cpu_only])[0] == "DmlExecutionProvider"
    assert choose_provider("npu", None, ["QNNExecutionProvider", *cpu_only])[0] == "QNNExecutionProvider"
    with pytest.raises(ExecutionProviderError, match="onnxruntime-gpu") as err:
        choose_provider("cuda", None, cpu_only)
    assert err.value.provider == "CUDAExecutionProvider"
    with pytest.raises(ExecutionProviderError, match="onnxruntime-qnn"):
        choose_provider("qnn", None, cpu_only)
    with pytest.raises(ExecutionProviderError, match="onnxruntime-directml"):
        choose_provider("directml", None, cpu_only)
    # a platform preference that cannot be met falls back to CPU and says why
    provider, why = choose_provider("auto", ["CoreMLExecutionProvider", "CPUExecutionProvider"][:1], cpu_only,
                                    system="Darwin")
    assert provider == "CPUExecutionProvider" and "CoreMLExecutionProvider" in why and "Darwin" in why
    assert "install onnxruntime on macOS" in why
    assert choose_provider("auto", ["XnnpackExecutionProvider", "CPUExecutionProvider"],
                           ["XnnpackExecutionProvider", *cpu_only]) == ("XnnpackExecutionProvider", None)


def test_gpt2_byte_table_is_a_bijection():
    table = gpt2_byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["A"] == 0x41


def _sample(params, logits, history=(), n=1):
    s = NumpySampler(params, list(history), 4096)
    return [s(np.asarray(logits, dtype=np.float32)) for _ in range(n)]


def test_sampler_follows_llama_cpp_semantics():
    logits = np.array([1.0, 3.0, 2.9, -5.0, 0.5])
    assert _sample(GenerationParams(temperature=0), logits) == [1]
    # repeat penalty divides positive logits of recent tokens: token 1 falls below token 2
    assert _sample(GenerationParams(temperature=0, repeat_penalty=1.5), logits, history=[1]) == [2]
    assert _sample(GenerationParams(temperature=0, repeat_penalty=1.5, repeat_last_n=1), logits, history=[1, 0]) == [1]
    assert _sample(GenerationParams(temperature=0, presence_penalty=0.5), logits, history=[1]) == [2]
    assert _sample(GenerationParams(temperature=0, frequency_penalty=0.06), logits, history=[1, 1]) == [2]
    # top_k=1 is greedy whatever the temperature
    assert set(_sample(GenerationParams(temperature=5.0, top_k=1), logits, n=50)) == {1}
    # min_p keeps tokens with p >= min_p * p_max: here only 1 and 2
    assert set(_sample(GenerationParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5), logits, n=200)) == {1, 2}
    # top_p: the smallest set whose probability reaches p
    assert set(_sample(GenerationParams(temperature=1.0, top_k=0, top_p=0.45, min_p=0.0), logits, n=100)) == {1}
    assert set(_sample(GenerationParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0), logits, n=200)) == {1, 2}
    wide = set(_sample(GenerationParams(temperature=3.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), logits, n=400))
    assert wide >= {0, 1, 2, 4}
    seeded = [_sample(GenerationParams(temperature=1.0, seed=9, top_k=0, min_p=0), logits, n=30) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_folder_checks_before_loading(tmp_path):
    with pytest.raises(ModelNotFoundError, match="edgelm.json"):
        check_folder(tmp_path)
    (tmp_path / "edgelm.json").write_text("{not json")
    with pytest.raises(InvalidModelFileError, match="not valid JSON"):
        check_folder(tmp_path)


# --- slow: real conversions with onnxruntime-genai's builder and decoding with onnxruntime ---------------------


def _convert(src: Path, out: Path, quant: str) -> Path:
    steps = []
    convert_to_onnx(src, out, quant, progress=lambda msg, frac: steps.append((msg, frac)))
    assert steps[0][1] == 0.0 and steps[-1][1] == 1.0
    assert all(a[1] <= b[1] for a, b in zip(steps, steps[1:])), steps
    return out


@pytest.fixture(scope="module")
def onnx_models(tiny_llama_src, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    qwen_src = tiny_checkpoint("qwen3", root / "tiny-qwen3-src", seed=1)
    return {
        "llama-int4": _convert(tiny_llama_src, root / "llama-int4", "int4"),
        "llama-fp32": _convert(tiny_llama_src, root / "llama-fp32", "fp32"),
        "llama-fp16": _convert(tiny_llama_src, root / "llama-fp16", "fp16"),
        "qwen3-int4": _convert(qwen_src, root / "qwen3-int4", "int4"),
        "qwen3-fp32": _convert(qwen_src, root / "qwen3-fp32", "fp32"),
        "qwen3-src": qwen_src,
        "llama-src": tiny_llama_src,
    }


def _torch_greedy(src: Path, ids: list[int], n: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                             min_new_tokens=n)
    return out[0, len(ids):].tolist()


@pytest.mark.slow
def test_output_folder_is_self_contained(onnx_models):
    out = onnx_models["llama-int4"]
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
            "edgelm.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]
    m = json.loads((out / "edgelm.json").read_text())
    assert m["architecture"] == "LlamaForCausalLM" and m["quantization"] == "int4"
    assert m["quantization_options"]["block_size"] == 32 and m["quantization_options"]["symmetric"] is True
    assert m["context_length"] == 256 and m["bos_token_id"] == 1 and m["eos_token_ids"] == [2]
    assert m["kv_cache"]["layers"] == 2 and m["kv_cache"]["kv_heads"] == 2 and m["kv_cache"]["head_size"] == 32
    from edgelm.loader import inspect

    info = inspect(out)
    assert (info["format"], info["architecture"], info["quantization"]) == ("onnx", "llama", "int4")
    assert info["chat_template"] is True


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp32_greedy_tokens_equal_transformers(onnx_models, arch):
    with edgelm.load(onnx_models[f"{arch}-fp32"], threads=2) as m:
        assert m.info.backend == "onnxruntime" and m.info.quantization == "fp32"
        ids = m.tokenize("The object of the", add_special=False)
        mine = raw_greedy(m, ids, 12)
    assert mine == _torch_greedy(onnx_models[f"{arch}-src"], ids, 12)


@pytest.mark.slow
def test_sliding_window_model_runs_past_its_window_and_below_it(tmp_path):
    """Gemma 2 (sliding window on alternate layers): onnxruntime's attention needs a KV cache at least as long as
    the window, whatever n_ctx is; past the window the tokens still equal transformers'."""
    src = tiny_checkpoint("gemma2", tmp_path / "src", seed=2, sliding_window=16)
    out = _convert(src, tmp_path / "gemma2-fp32", "fp32")
    with edgelm.load(out, threads=2, n_ctx=64) as m:
        ids = m.tokenize("The object of the", add_special=False)
        mine = raw_greedy(m, ids, 40)  # prompt + 40 > the 16-token window + slack
        # the same prompt again: the positions to rewind to have left the window's cache, so it starts afresh
        again = raw_greedy(m, ids, 40)
        scored = m.score(ids + mine)  # 44 tokens in one go, then back to an empty cache
        assert np.array_equal(scored, m.score(ids + mine))
        assert raw_greedy(m, ids, 40) == mine
    assert mine == again == _torch_greedy(src, ids, 40)
    with edgelm.load(out, threads=1, n_ctx=10) as m:  # a context shorter than the window
        assert m.info.context_length == 10
        c = m.generate("The object", temperature=0, max_tokens=50)
        assert c.finish_reason == "length" and 0 < c.usage.prompt_tokens + c.usage.completion_tokens <= 10


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_int4_model_generates_streams_and_chats(onnx_models, arch):
    with edgelm.load(onnx_models[f"{arch}-int4"], threads=2) as m:
        info = m.info
        assert (info.format, info.backend, info.architecture, info.quantization) == ("onnx", "onnxruntime", arch, "int4")
        assert info.device == "cpu" and info.extra["execution_provider"] == "CPUExecutionProvider"
        assert info.context_length == 256 and info.threads == 2
        c = m.generate("The object", temperature=0, max_tokens=16)
        assert (c.finish_reason == "length") == (c.usage.completion_tokens == 16), c
        streamed = "".join(ch.text for ch in m.stream("The object", temperature=0, max_tokens=16))
        assert streamed == c.text
        s1 = m.chat([{"role": "user", "content": "Hello"}], temperature=0.9, seed=5, max_tokens=12)
        s2 = m.chat([{"role": "user", "content": "Hello"}], temperature=0.9, seed=5, max_tokens=12)
        assert s1.text == s2.text and s1.usage.prompt_tokens > 5


@pytest.mark.slow
def test_tokenize_detokenize_and_special_tokens(onnx_models):
    with edgelm.load(onnx_models["llama-int4"], threads=1) as m:
        text = "Héllo wörld — naïve 日本語 🙂"
        ids = m.tokenize(text, add_special=False)
        assert m.detokenize(ids) == text
        # bytes of a multi-byte character spread over several tokens rejoin exactly
        assert m.token_bytes(ids) == text.encode()
        assert m.tokenize("<|im_end|>", parse_special=True) == [2]
        assert len(m.tokenize("<|im_end|>", parse_special=False)) > 1
        assert m.is_eog(2) and not m.is_eog(ids[0])
        assert m.token_bytes([2]) == b""  # control tokens have no text
        assert m.apply_chat_template([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")
        assert (m.backend.bos_token, m.backend.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.slow
def test_prompt_reuse_gives_the_same_tokens(onnx_models):
    with edgelm.load(onnx_models["llama-fp32"], threads=2) as m:
        prompt = m.tokenize("The object of the", add_special=False)
        first = raw_greedy(m, prompt, 8)
        longer = prompt + first[:4]
        again = m.stream_tokens(longer, temperature=0, max_tokens=4)
        chunks = list(again)
        # everything cached but the last token is reused
        assert chunks[-1].usage.cached_tokens == len(prompt) + 3
        assert [t for c in chunks for t in c.tokens] == first[4:8]
        # sampled path after an interrupted greedy one
        m.reset_cache()
        fresh = raw_greedy(m, prompt, 6, repeat_penalty=1.0001)
        assert fresh == first[:6]


@pytest.mark.slow
def test_stop_strings_limits_and_context_errors(onnx_models):
    with edgelm.load(onnx_models["llama-int4"], threads=1, n_ctx=32) as m:
        assert m.n_ctx == 32
        long = "word " * 40
        with pytest.raises(ContextLengthExceededError) as err:
            m.generate(long, max_tokens=4)
        assert err.value.n_ctx == 32
        c = m.generate("The", temperature=0)  # no max_tokens: runs to the end of the context
        used = c.usage.prompt_tokens + c.usage.completion_tokens
        assert used <= 32 and (c.finish_reason == "length") == (used == 32), c
        full = m.generate("The", temperature=0, max_tokens=12).text
        assert len(full) > 4
        stop = full[3:5]
        cut = m.generate("The", temperature=0, max_tokens=12, stop=[stop])
        assert stop not in cut.text and full.startswith(cut.text) and cut.finish_reason == "stop"
        # GBNF goes through llguidance on this backend; a bad grammar fails naming the parameter
        assert m.generate("The", grammar='root ::= "a"+', temperature=0, max_tokens=3).text.strip("a") == ""
        with pytest.raises(InvalidParameterError, match="grammar"):
            m.generate("The", grammar='root ::= (', max_tokens=2)
    with pytest.raises(InvalidParameterError, match="n_ctx=1000"):
        edgelm.load(onnx_models["llama-int4"], n_ctx=1000)


@pytest.mark.slow
def test_perplexity_matches_transformers(onnx_models):
    import torch
    import transformers

    with edgelm.load(onnx_models["llama-fp32"], threads=2) as m:
        ids = m.tokenize(edgelm.quality.eval_text()[:3000], add_special=False)[:100]
        ours = m.score(ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(onnx_models["llama-src"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3)


@pytest.mark.slow
def test_requested_provider_that_is_missing_names_the_package(onnx_models):
    with pytest.raises(ExecutionProviderError, match="onnxruntime-gpu"):
        edgelm.load(onnx_models["llama-int4"], device="cuda")


@pytest.mark.slow
def test_broken_folders_give_clear_errors(onnx_models, tmp_path):
    good = onnx_models["llama-int4"]
    cases = {
        "no-data": (lambda d: (d / "model.onnx.data").unlink(), ModelNotFoundError, "model.onnx.data"),
        "truncated": (lambda d: _truncate(d / "model.onnx.data"), InvalidModelFileError, "truncated"),
        "corrupt": (lambda d: (d / "model.onnx").write_bytes(b"\x00garbage" * 10), InvalidModelFileError,
                    "not a readable ONNX"),
        "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), ModelNotFoundError, "tokenizer.json"),
        "no-model": (lambda d: (d / "model.onnx").unlink(), ModelNotFoundError, "model.onnx"),
    }
    for name, (damage, error, text) in cases.items():
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        with pytest.raises(error, match=text):
            edgelm.load(d, backend="onnxruntime")


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


@pytest.mark.slow
def test_failed_export_leaves_nothing_behind(tiny_llama_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size"] = 96  # the weights no longer fit the config
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="model builder failed"):
        convert_to_onnx(src, tmp_path / "out", "int4", algo="default")
    with pytest.raises(ConversionError, match="GPTQ could not load"):
        convert_to_onnx(src, tmp_path / "out", "int4", algo="gptq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.slow
def test_overwrite_replaces_an_earlier_conversion(onnx_models, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(onnx_models["llama-int4"], out)
    convert_to_onnx(onnx_models["llama-src"], out, "int8", overwrite=True)
    assert json.loads((out / "edgelm.json").read_text())["quantization"] == "int8"
    assert OnnxBackend.accepts(out) and OnnxBackend.accepts(out / "model.onnx")
    with edgelm.load(out, threads=1) as m:
        assert m.info.quantization == "int8"
        assert m.generate("The", temperature=0, max_tokens=4).usage.completion_tokens >= 1


@pytest.mark.slow
def test_operator_or_opset_the_runtime_lacks_is_unsupported_model(onnx_models, tmp_path):
    import onnx

    for name in ("unknown-op", "future-opset"):
        d = tmp_path / name
        shutil.copytree(onnx_models["llama-int4"], d)
        proto = onnx.load(str(d / "model.onnx"), load_external_data=False)
        if name == "unknown-op":
            proto.graph.node[-1].op_type = "NoSuchOperator"
            proto.graph.node[-1].domain = "com.microsoft"
        else:
            for o in proto.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = 99
        onnx.save(proto, str(d / "model.onnx"))
        with pytest.raises(UnsupportedModelError, match="cannot run .* on CPUExecutionProvider") as err:
            edgelm.load(d)
        assert "upgrade onnxruntime" in str(err.value)


@pytest.mark.slow
def test_cli_info_and_run_on_an_onnx_folder(onnx_models):
    from .conftest import run_cli

    r = run_cli("info", str(onnx_models["llama-int4"]), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["format"], info["architecture"], info["quantization"]) == ("onnx", "llama", "int4")
    r = run_cli("run", str(onnx_models["llama-int4"]), "Hello", "-t", "0", "-n", "4")
    assert r.returncode == 0, r.stderr
    r = run_cli("run", str(onnx_models["llama-int4"]), "Hello", "--device", "cuda")
    assert r.returncode == 5 and "onnxruntime-gpu" in r.stderr


@pytest.mark.slow
def test_fp16_decodes_on_cpu_like_fp32(onnx_models):
    tokens = {}
    for quant in ("fp32", "fp16"):
        with edgelm.load(onnx_models[f"llama-{quant}"], threads=2) as m:
            assert m.info.quantization == quant and m.info.extra["execution_provider"] == "CPUExecutionProvider"
            ids = m.tokenize("The object of the", add_special=False)
            tokens[quant] = raw_greedy(m, ids, 6)
    assert tokens["fp16"] == tokens["fp32"]


def test_sentencepiece_style_token_bytes():
    """Llama-2/Mistral/Gemma-style vocabularies: '▁' is a space and <0xNN> tokens are single raw bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from edgelm.runtimes.tokenizer_json import TokenText

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "▁a", "▁ab"):
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁a", "b")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<s>", "</s>"])
    spec = json.loads(tok.to_str())
    text = TokenText(spec, tok)
    ids = tok.encode("ab 日", add_special_tokens=False).ids
    assert b"".join(text(i) for i in ids) == " ab 日".encode()
    assert [text(i) for i in ids][-3:] == [b"\xe6", b"\x97", b"\xa5"]  # one raw byte each, never split text
    assert text(1) == b"" and text(2) == b""  # control tokens


@pytest.mark.slow
def test_plain_onnxruntime_genai_folder_loads_without_a_manifest(onnx_models, tmp_path):
    d = tmp_path / "genai-model"
    shutil.copytree(onnx_models["llama-int4"], d)
    (d / "edgelm.json").unlink()
    with edgelm.load(onnx_models["llama-int4"], threads=1) as m:
        want = m.generate("The object", temperature=0, max_tokens=6).text
    with edgelm.load(d, threads=1) as m:
        assert (m.info.format, m.info.quantization, m.info.architecture) == ("onnx", "int4", "llama")
        assert m.info.extra["quantization_options"]["bits"] == 4
        assert m.generate("The object", temperature=0, max_tokens=6).text == want


def test_not_enough_disk_space_is_refused_before_writing(tiny_llama_src, tmp_path, monkeypatch):
    import collections

    from edgelm.errors import InsufficientDiskSpaceError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDiskSpaceError, match="MiB"):
        convert_to_onnx(tiny_llama_src, tmp_path / "out", "fp32")
    assert list(tmp_path.iterdir()) == []
