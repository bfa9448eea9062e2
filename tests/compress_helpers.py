"""Tiny random checkpoints for the compression tests: 6 decoder blocks (so middle ones can go), hidden 64, a
512-piece SentencePiece tokenizer llama.cpp's converter reads.  (llama.cpp converts Qwen3 only with a byte-level
BPE tokenizer: ``tokenizer="bpe"`` copies SmolLM2's, which costs deriving SmolLM2 once per test session, see
tests/hf_fixtures.py; the tests that never convert a Qwen3 checkpoint to GGUF do not need it.)"""

from __future__ import annotations

import json
from pathlib import Path

ARCHS = {  # model type -> (config class, model class, tokenizer)
    "llama": ("LlamaConfig", "LlamaForCausalLM", "spm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "spm"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "spm"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "spm"),
}


def tiny_model(model_type: str, folder: Path, *, layers: int = 6, hidden: int = 64, intermediate: int = 256,
               seed: int = 0, tokenizer: str | None = None) -> Path:
    import torch
    import transformers

    from .hf_fixtures import write_tokenizer

    config_cls, model_cls, default_tokenizer = ARCHS[model_type]
    folder.mkdir(parents=True, exist_ok=True)
    vocab, ids = write_tokenizer(folder, tokenizer or default_tokenizer)
    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    if model_type == "mistral":
        extra["sliding_window"] = None
    config = getattr(transformers, config_cls)(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=512, tie_word_embeddings=False, **ids, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # larger than init's 0.02: a random model whose blocks each matter (no greedy ties)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25 if "embed" in name or "lm_head" in name else 0.12)
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({**ids, "max_new_tokens": 16}))
    return folder
