"""Hugging Face checkpoints for the converter tests, made here (the Hub is out of reach).

`smollm2_hf_checkpoint()` derives SmolLM2-135M-Instruct from the embedded Q4_1 GGUF with transformers (dequantized
to fp32, so it holds exactly the GGUF's weights), fixes the tokenizer files that derivation gets wrong (see
shared FACTS: GPT-2 byte-level BPE, bos 1 / eos 2 / pad 2, no SentencePiece leftovers), and caches the result under
~/.cache/edgelm-tests (EDGELM_TEST_CACHE overrides), built once under a file lock and renamed into place.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

VERSION = 1


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGELM_TEST_CACHE", Path.home() / ".cache" / "edgelm-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_hf_checkpoint() -> Path:
    target = cache_dir() / f"smollm2-135m-instruct-hf-v{VERSION}"
    if (target / "config.json").exists():
        return target
    with open(cache_dir() / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes: one builds, the others wait and reuse
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir()))
            try:
                _derive(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _derive(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import edgelm

    gguf = edgelm.default_model_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # drop the GGUF quantization_config: the weights are plain fp32 now
    data = loaded.config.to_dict()
    data.pop("quantization_config", None)
    config = type(loaded.config).from_dict(data)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _fix_tokenizer(out)


def _fix_tokenizer(out: Path) -> None:
    """SmolLM2 is plain GPT-2 byte-level BPE: undo the SentencePiece-isms a GGUF-derived tokenizer may carry."""
    (out / "tokenizer.model").unlink(missing_ok=True)  # a copy of the GGUF, not a SentencePiece model
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"]["byte_fallback"] = False
    tj["model"]["unk_token"] = None
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj["post_processor"] = None
    if isinstance(tj.get("pre_tokenizer"), dict) and tj["pre_tokenizer"].get("type") == "ByteLevel":
        tj["pre_tokenizer"]["add_prefix_space"] = False
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc.update({"add_bos_token": False, "add_prefix_space": False, "bos_token": "<|im_start|>",
               "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"})
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((out / name).read_text(encoding="utf-8"))
        cfg.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
        (out / name).write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def tiny_checkpoint(arch: str, folder: Path) -> Path:
    """A tiny random checkpoint of ``arch`` (see tests/onnx_helpers.py for the architectures it knows)."""
    from .onnx_helpers import tiny_checkpoint as make

    return make(arch, folder)


# --- tiny random checkpoints for the GGUF converter -----------------------------------------------------------
# llama.cpp's converter must recognise the tokenizer: a byte-level BPE tokenizer is identified by a hash of how it
# splits a check text, so the BPE ones reuse SmolLM2's real tokenizer (recognised as "smollm"); the others carry a
# small SentencePiece model trained here, which the converter reads directly.  Qwen2 and Phi-3 use SentencePiece
# because transformers 5 loads qwen2/phi3 tokenizers through their own classes, which re-split text differently
# from SmolLM2's tokenizer.json (hash not recognised).

GGUF_ARCHS = {  # HF model type -> (transformers classes, tokenizer kind, llama.cpp architecture)
    "llama": ("LlamaConfig", "LlamaForCausalLM", "bpe", "llama"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "bpe", "llama"),  # llama.cpp runs Mistral as llama
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "spm", "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "bpe", "qwen3"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "spm", "gemma2"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "bpe", "gemma3"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "spm", "phi3"),
}


def _sentencepiece_tokenizer(folder: Path) -> int:
    """Train a 512-piece SentencePiece BPE model on the built-in evaluation text (about a second)."""
    import io

    import sentencepiece as spm

    from edgelm.quality import eval_text

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(eval_text().splitlines()), model_writer=buf, vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True}))
    return 512


def write_tokenizer(folder: Path, kind: str) -> tuple[int, dict[str, int]]:
    """Put a tokenizer llama.cpp's converter recognises in ``folder``: SmolLM2's byte-level BPE (``"bpe"``) or a
    512-piece SentencePiece model trained here (``"spm"``); returns the vocabulary size and the special token ids."""
    if kind == "bpe":
        src = smollm2_hf_checkpoint()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy2(src / name, folder / name)
        return 49152, dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return _sentencepiece_tokenizer(folder), dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)


def tiny_gguf_checkpoint(model_type: str, folder: Path, *, safetensors: bool = True) -> Path:
    """A random 2-layer ``model_type`` checkpoint (hidden 64) with a tokenizer llama.cpp's converter recognises."""
    import torch
    import transformers

    config_cls, model_cls, tokenizer, _ = GGUF_ARCHS[model_type]
    folder.mkdir(parents=True, exist_ok=True)
    vocab, ids = write_tokenizer(folder, tokenizer)
    extra = {"head_dim": 16} if model_type.startswith(("gemma", "qwen3")) else {}
    if model_type == "mistral":
        extra["sliding_window"] = None
    config = getattr(transformers, config_cls)(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=512, **ids, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # larger than init's 0.02: the random model prefers some tokens clearly (no greedy ties)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    model.save_pretrained(folder)
    if not safetensors:  # the old pickle format (transformers 5 always writes safetensors)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder
