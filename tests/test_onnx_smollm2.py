"""The real SmolLM2-135M-Instruct through the ONNX converter and the onnxruntime backend.

The Hugging Face checkpoint is the one tests/hf_fixtures.py derives from the embedded GGUF, so fp32 ONNX and the
GGUF hold the same weights: their greedy tokens must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import edgelm
import edgelm.quality
from edgelm.converters.onnx import convert_to_onnx
from edgelm.quality import perplexity

from .helpers import raw_greedy

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_src() -> Path:
    try:
        from .hf_fixtures import smollm2_hf_checkpoint
    except ImportError as exc:  # pragma: no cover - until the fixture module lands
        pytest.skip(f"tests/hf_fixtures.py is not available ({exc})")
    return Path(smollm2_hf_checkpoint())


@pytest.fixture(scope="module")
def smollm2_onnx(smollm2_src, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-onnx")
    made: dict[str, Path] = {}

    def get(quant: str) -> Path:
        if quant not in made:
            made[quant] = convert_to_onnx(smollm2_src, root / quant, quant)
        return made[quant]

    return get


def test_fp32_onnx_answers_paris(smollm2_onnx):
    """A golden answer only where the reference is sure of it: fp32 holds the GGUF's own weights."""
    with edgelm.load(smollm2_onnx("fp32"), threads=2, n_ctx=512) as m:
        c = m.chat(CAPITAL, temperature=0, max_tokens=16)
        assert "Paris" in c.text, c.text


# Top-1 agreement with fp32 on the built-in text (4 windows of 512 tokens).  Measured here: int8 0.963, int4 (GPTQ)
# 0.833.  Quantized answers to a borderline prompt flip between CPUs' int4/int8 kernels (AVX-only EPYC: int4 says
# "L'Étoile de la Légère" to the capital question) while the agreement and the perplexity ratio hold.
@pytest.mark.parametrize("quant, least", [("int8", 0.93), ("int4", 0.75)])
def test_quantized_smollm2_keeps_fp32s_greedy_choices(smollm2_onnx, quant, least):
    import numpy as np

    tops = {}
    for q in ("fp32", quant):
        with edgelm.load(smollm2_onnx(q), threads=2, n_ctx=512) as m:
            assert m.info.quantization == q and m.info.architecture == "llama"
            ids = m.tokenize(edgelm.quality.eval_text(), add_special=False)
            tops[q] = np.concatenate([m.top_tokens(ids[i : i + 512]) for i in range(0, 4 * 512, 512)])
    agreement = float(np.mean(tops[quant] == tops["fp32"]))
    assert agreement >= least, agreement


def test_fp32_onnx_and_gguf_agree_on_the_first_greedy_tokens(smollm2_onnx, default_gguf):
    with edgelm.load(default_gguf, n_ctx=512) as g:
        prompt = g.chat_tokens(CAPITAL)
        gguf_tokens = raw_greedy(g, prompt, 6)
    with edgelm.load(smollm2_onnx("fp32"), threads=2, n_ctx=512) as o:
        assert o.chat_tokens(CAPITAL) == prompt  # same tokenizer and template
        onnx_tokens = raw_greedy(o, prompt, 6)
    assert onnx_tokens == gguf_tokens


def test_int8_perplexity_within_two_percent_of_fp32(smollm2_onnx):
    ppl = {}
    for quant in ("fp32", "int8"):
        with edgelm.load(smollm2_onnx(quant), threads=2, n_ctx=512) as m:
            ppl[quant] = perplexity(m, windows=2).perplexity
    assert ppl["int8"] <= 1.02 * ppl["fp32"], ppl
