"""Tiny random Hugging Face checkpoints for the ONNX tests (made here, no download).

A byte-level BPE tokenizer is trained on the built-in evaluation text (a few hundred merges, milliseconds) and a
2-layer model with random weights is saved with transformers; the result converts like a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(folder: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgelm.quality import eval_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([eval_text()], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_bos_token": False,
        "model_max_length": 256, "chat_template": CHAT_TEMPLATE}))


def tiny_checkpoint(arch: str, folder: Path, seed: int = 0, sliding_window: int = 16, tied: bool = False) -> Path:
    """A random 2-layer ``arch`` ("llama", "qwen3", "phi" or "gemma2", whose first layer attends to the last
    ``sliding_window`` tokens only) checkpoint with a 512-token byte-level BPE vocabulary; ``tied``: the input
    embedding is the output head."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(folder)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=tied)
    if arch == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif arch == "qwen3":
        config, cls = transformers.Qwen3Config(head_dim=32, **common), transformers.Qwen3ForCausalLM
    elif arch == "gemma2":
        config = transformers.Gemma2Config(head_dim=32, sliding_window=sliding_window, **common)
        cls = transformers.Gemma2ForCausalLM
    elif arch == "phi":  # Phi-1/2: dense / fc1 / fc2 / final_layernorm, biases everywhere
        config, cls = transformers.PhiConfig(**common), transformers.PhiForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # larger than init's 0.02 so the random model prefers some tokens strongly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder
