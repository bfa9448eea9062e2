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
