"""The model families `edgelm.compress` knows, as data.

Compression edits a checkpoint in place of its own format: it removes whole decoder blocks and narrows every MLP, then
saves a checkpoint of the same architecture with a smaller ``num_hidden_layers`` / ``intermediate_size``.  That is
only sound for families whose decoder block is exactly: RMSNorm -> attention (q/k/v/o projections) -> residual add ->
RMSNorm -> gated MLP (gate/up/down projections) -> residual add, with nothing else tied to a layer's index.  The
least-squares healing folds its correction into ``mlp.down_proj``, the last linear map before a residual add, which
also needs that shape (Gemma's norm after the MLP breaks it; Phi-3 fuses gate and up into one matrix).

Each family is verified by the tests on a tiny random checkpoint: the compressed output loads in transformers,
computes what the original computes with those blocks skipped, and generates; Llama and Qwen2 outputs are also
converted to GGUF with llama.cpp's converter and run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgelm.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    label: str
    # config keys holding a layer count or index bound that must follow the layers kept (Qwen: layers at or past
    # max_window_layers use a sliding window when use_sliding_window is on)
    layer_bound_keys: tuple[str, ...] = ()
    # config keys holding one entry per layer (kept entries only are written back)
    per_layer_keys: tuple[str, ...] = ("layer_types",)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama (also SmolLM2, TinyLlama, Llama 2/3)"),
    Family("mistral", "Mistral"),
    Family("qwen2", "Qwen2 / Qwen2.5", layer_bound_keys=("max_window_layers",)),
    Family("qwen3", "Qwen3 (dense)", layer_bound_keys=("max_window_layers",)),
)}

# the modules every decoder layer must have (checked on the loaded model: a variant that differs is refused)
LAYER_MODULES = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_of(config: dict[str, Any], where: str) -> Family:
    """The family of a checkpoint's config.json, or UnsupportedModelError naming it and the supported list."""
    model_type = str(config.get("model_type") or "?")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else "?"
    if config.get("is_encoder_decoder") or not str(arch).endswith("ForCausalLM"):
        kind = "an encoder-decoder model" if config.get("is_encoder_decoder") else "not a decoder-only causal LM"
        raise UnsupportedModelError(
            f"{where} is {arch} ({model_type}), {kind}; compression works on decoder-only language models of the "
            f"families {supported()}.", fix="Pass a causal language model checkpoint of one of those families.",
            architecture=arch, model_type=model_type)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"{where} is {arch} (model_type {model_type!r}), which edgelm cannot compress; supported families: "
            f"{supported()}.", fix="Compress a model of one of those families, or quantize this one with "
            "`edgelm convert` instead.", architecture=arch, model_type=model_type)
    return family
