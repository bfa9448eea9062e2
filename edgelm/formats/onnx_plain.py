"""Plain decoder graphs in an ONNX model folder: optimum-onnx's exports, which edgelm's own onnxruntime loop runs
(:mod:`edgelm.runtimes.onnx_session`), as opposed to onnxruntime-genai's builder graphs (:mod:`.onnx_folder`).

Such a folder is an ordinary edgelm ONNX folder (:mod:`.onnx_folder`: ``edgelm.json``, ``model.onnx`` +
``model.onnx.data``, tokenizer files) without ``genai_config.json``; its manifest's ``exporter`` names optimum-onnx
(``onnx_folder.exporter_kind``) and its ``inputs`` / ``kv_cache`` record the graph's I/O, read from the graph itself
by :func:`session_io`.  Everything here reads files; nothing loads onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelFileError, UnsupportedModelError

from .onnx_folder import manifest_head, token_ids

# the op whose present outputs are its past inputs' buffer (onnxruntime's GroupQueryAttention appends the new keys and
# values in place when both are bound to one buffer): a graph whose every present comes from one shares the cache
SHARED_CACHE_OP = ("com.microsoft", "GroupQueryAttention")


def make_session_manifest(folder: Path, config: dict[str, Any], *, name: str, quant: str, parameters: int,
                          quantization_options: dict[str, Any] | None, exporter: dict[str, Any],
                          generation_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a folder whose plain decoder graph (optimum-onnx's export: input_ids, attention_mask,
    position_ids, past_key_values.* in; logits, present.* out) edgelm's own onnxruntime loop runs.  The graph's I/O
    names and KV layout are read from ``model.onnx`` itself (see :func:`session_io`)."""
    io = session_io(folder / "model.onnx")
    gen_cfg = generation_config or {}
    text_cfg = config.get("text_config") or config
    eos = list(dict.fromkeys(token_ids(gen_cfg.get("eos_token_id")) + token_ids(config.get("eos_token_id"))))
    kv = io["kv"]
    heads = query_heads(config) or 0
    return {
        **manifest_head(config, name=name, quant=quant, quantization_options=quantization_options),
        "execution_provider": "cpu",
        "graph_target": "cpu",
        "parameters": parameters,
        "context_length": int(next((text_cfg[k] for k in ("max_position_embeddings", "n_positions", "seq_length",
                                                           "max_sequence_length") if text_cfg.get(k)), 2048)),
        "vocab_size": io["vocab_size"] or int(text_cfg.get("vocab_size") or 0) or None,
        "bos_token_id": gen_cfg.get("bos_token_id", config.get("bos_token_id")),
        "eos_token_ids": eos,
        "pad_token_id": config.get("pad_token_id"),
        "model_file": "model.onnx",
        "external_data": sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.startswith("model.onnx.")),
        "inputs": io["inputs"],
        "kv_cache": {
            "layers": len(kv), "kv_heads": io["kv_heads"], "attention_heads": heads or io["kv_heads"],
            "head_size": io["head_size"], "layout": io["layout"], "shared_buffer": io["shared_buffer"],
            "sequence_axis": io["sequence_axis"], "dtype": io["dtype"],
            "past": [k["past"] for k in kv], "present": [k["present"] for k in kv],
        },
        "chat_template": "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else None,
        "exporter": exporter,
    }


def query_heads(config: dict[str, Any]) -> int | None:
    """The attention (query) head count of a Hugging Face config, under the names architectures give it."""
    text_cfg = config.get("text_config") or config
    return int(text_cfg.get("num_attention_heads") or text_cfg.get("n_head") or text_cfg.get("num_heads") or 0) or None


def session_io(model_file: Path) -> dict[str, Any]:
    """The I/O of a plain decoder graph, read without its weights: ``inputs`` (the non-cache input names), ``kv``
    (each past_key_values.* input with its present.* output, static dims, sequence axis), the cache's element type,
    head count and size, the vocabulary (the logits' last dim), and ``shared_buffer``: whether every present output
    comes from a :data:`SHARED_CACHE_OP` (then past and present are one buffer of the context's length, updated in
    place; otherwise present is ``Concat(past, new)``).  UnsupportedModelError when the graph has no
    KV cache inputs (exported without cache: every token would re-run the whole prompt)."""
    import onnx

    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:
        raise InvalidModelFileError(f"{model_file} is not a readable ONNX model ({type(exc).__name__}: {exc}).",
                                    fix="The file is corrupt or truncated: convert the model again.",
                                    path=str(model_file)) from exc
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {i.name: i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}}
    outputs = {o.name: o for o in proto.graph.output}
    past = [n for n in inputs if n.startswith(("past_key_values.", "past_key_values_"))]
    if "input_ids" not in inputs or "logits" not in outputs:
        raise UnsupportedModelError(f"{model_file} is not a text decoder graph (no input_ids input or logits output).",
                                    fix="Export a causal language model (task text-generation-with-past).",
                                    path=str(model_file))
    if not past:
        raise UnsupportedModelError(
            f"{model_file} has no past key/value inputs: it was exported without a KV cache, so every new token "
            "would evaluate the whole text again.", fix="Export it with a cache: `edgelm convert SRC --to onnx "
            "--exporter optimum` (optimum-cli's --task text-generation-with-past).", path=str(model_file))
    kv = []
    for name in past:
        present = "present" + name[len("past_key_values"):]
        if present not in outputs:
            raise UnsupportedModelError(f"{model_file} has input {name} but no output {present}.",
                                        fix="Export the model again with optimum-onnx (text-generation-with-past).",
                                        path=str(model_file))
        shape = dims(inputs[name])
        seq_axes = [i for i, d in enumerate(shape) if isinstance(d, str) and "sequence" in d]
        if len(seq_axes) != 1 or any(isinstance(d, str) for i, d in enumerate(shape) if i not in (0, seq_axes[0])):
            raise UnsupportedModelError(f"{model_file}: the cache input {name} has shape {shape}; edgelm needs one "
                                        "batch axis first, one sequence axis and fixed other sizes.",
                                        fix="Convert the model to GGUF instead.", path=str(model_file))
        kv.append({"past": name, "present": present, "shape": [0 if isinstance(d, str) else d for d in shape],
                   "sequence_axis": seq_axes[0], "elem_type": inputs[name].type.tensor_type.elem_type})
    first = kv[0]
    dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}.get(first["elem_type"])
    if dtype is None or any(k["elem_type"] != first["elem_type"] for k in kv):
        raise UnsupportedModelError(f"{model_file}: KV cache element type {first['elem_type']} is not float32/float16.",
                                    fix="Export the model in fp32.", path=str(model_file))
    shape = first["shape"]
    bnsh = len(shape) == 4 and first["sequence_axis"] == 2
    makers = {o: (n.domain, n.op_type) for n in proto.graph.node for o in n.output}
    shared = bnsh and all(makers.get(k["present"]) == SHARED_CACHE_OP for k in kv)
    logits = dims(outputs["logits"])
    return {
        "inputs": [n for n in inputs if n not in past],
        "kv": [{k: v for k, v in item.items() if k != "elem_type"} for item in kv],
        "dtype": dtype,
        "sequence_axis": first["sequence_axis"],
        "layout": "BNSH" if bnsh else "x".join(str(d or "S") for d in shape),
        "kv_heads": shape[1] if bnsh else None,
        "head_size": shape[3] if bnsh else None,
        "vocab_size": logits[-1] if logits and isinstance(logits[-1], int) else None,
        "shared_buffer": shared,
    }
