"""Tiny random checkpoints of architectures onnxruntime-genai's builder lacks (GPT-2, GPT-NeoX, OPT, BLOOM, Falcon),
made in the test with transformers configs (no download), for the optimum-onnx exporter and the session runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .onnx_helpers import tiny_tokenizer

# model type -> (config class, model class, config fields beyond the common ones)
OPTIMUM_ARCHS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=128, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                      max_position_embeddings=256, rotary_pct=0.5)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, max_position_embeddings=256,
                 word_embed_proj_dim=128)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=128, n_layer=2, n_head=4)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                    multi_query=True, new_decoder_architecture=False, alibi=False, parallel_attn=True, bias=False)),
}


def tiny_optimum_checkpoint(model_type: str, folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random 2-layer ``model_type`` checkpoint (hidden 128) with a 512-token byte-level BPE vocabulary;
    ``overrides``: other config fields."""
    import torch
    import transformers

    config_cls, model_cls, extra = OPTIMUM_ARCHS[model_type]
    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(folder)
    config = getattr(transformers, config_cls)(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                               **{**extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # larger than init's 0.02 so the random model prefers some tokens strongly (no greedy ties)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder
