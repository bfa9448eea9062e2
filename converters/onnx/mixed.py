"""Post-export graph surgery: a few MatMulNBits weights at 8 bits in an otherwise 4-bit graph.

onnxruntime-genai's model builder imports a GPTQ checkpoint with one bit width for every layer.  GPTQ
(``converters/onnx/gptq.py``) may choose to keep the few matrices whose 4-bit rounding costs most at 8 bits; it writes
those as ordinary 4-bit placeholders in the checkpoint (so the builder imports it unchanged) and their 8-bit codes
in :data:`INT8_FILE` beside it.  :func:`apply_int8` then replaces the placeholders in the exported graph: same node,
same inputs and outputs, ``bits=8`` and the 8-bit weight and scales (symmetric: no zero points, onnxruntime's
default zero point for 8 bits is 128).  An input embedding looked up in the head
(``converters.onnx.graph.embed_from_head``, GatherBlockQuantized) is switched to the 8-bit rows too, so call this after
that.  MatMulNBits runs 8-bit weights with the same kernels family; a down projection of SmolLM2 costs ~1.0-1.5x its
4-bit time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgelm.errors import ConversionError

# in the GPTQ checkpoint folder, safetensors named otherwise (the builder reads every *.safetensors there):
# "<module>.codes" (uint8 [N, K], offset 128), "<module>.scales" (float32 [N, K / block])
INT8_FILE = "edgelm-int8.st"

_LAYER = re.compile(r"^(?:model\.(?:language_model\.)?)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def node_name(module: str) -> str:
    """The builder's MatMulNBits node for a Hugging Face linear module (q/k/v share one fused node)."""
    if module == "lm_head":
        return "/lm_head/MatMulNBits"
    m = _LAYER.match(module)
    if not m:
        raise ValueError(f"no MatMulNBits node known for module {module!r}")
    index, block, name = m.groups()
    if block == "self_attn":
        return f"/model/layers.{index}/attn/{'qkv_proj' if name in _QKV else name}/MatMulNBits"
    return f"/model/layers.{index}/mlp/{name}/MatMulNBits"


def group(module: str) -> list[str]:
    """The modules that must change bit width together with ``module`` (q, k and v are one node)."""
    m = _LAYER.match(module)
    if m and m.group(3) in _QKV:
        return [module.rsplit(".", 1)[0] + "." + name for name in _QKV]
    return [module]


def read_int8(checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """module -> (codes uint8 [N, K], scales float32 [N, K / block]) from a GPTQ checkpoint's INT8_FILE ({} if
    there is none)."""
    path = Path(checkpoint) / INT8_FILE
    if not path.is_file():
        return {}
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    return {name[: -len(".codes")]: (tensors[name], tensors[name[: -len(".codes")] + ".scales"])
            for name in tensors if name.endswith(".codes")}


def apply_int8(folder: Path, weights: dict[str, tuple[Any, Any]]) -> list[str]:
    """Rewrite the MatMulNBits nodes of ``weights``' modules in ``folder/model.onnx`` as 8-bit; return the node names
    rewritten.  Every node is checked (exists, 4-bit, same N and K, all of q/k/v present) before anything is
    written: a mismatch raises ConversionError and leaves the folder as it was."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if not weights:
        return []
    path = Path(folder) / "model.onnx"
    model = onnx.load(str(path))  # with its external data: every tensor is written again below
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}
    plan: dict[str, tuple[Any, Any]] = {}
    for module in weights:
        try:
            node_name(module)
        except ValueError as exc:
            raise _mismatch(str(exc)) from exc
        if node_name(module) in plan:
            continue
        members = group(module)
        missing = [m for m in members if m not in weights]
        if missing:
            raise _mismatch(f"{node_name(module)} holds {', '.join(members)}: 8-bit weights for {missing[0]} missing")
        codes = np.concatenate([np.asarray(weights[m][0], dtype=np.uint8) for m in members], axis=0)
        scales = np.concatenate([np.asarray(weights[m][1], dtype=np.float32) for m in members], axis=0)
        plan[node_name(module)] = (codes, scales)
    for name, (codes, scales) in plan.items():
        node = nodes.get(name)
        if node is None or node.op_type != "MatMulNBits":
            raise _mismatch(f"the graph has no MatMulNBits node {name!r}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k = codes.shape
        block = int(attrs["block_size"])
        if (attrs.get("N"), attrs.get("K")) != (n, k) or scales.shape != (n, k // block) or attrs.get("bits") != 4:
            raise _mismatch(f"{name}: the graph's node is {attrs.get('bits')}-bit {attrs.get('N')}x{attrs.get('K')}, "
                             f"the 8-bit weight {n}x{k} with scales {scales.shape}")
        for other in graph.node:
            if other is not node and node.input[1] in other.input and not _embedding_lookup(graph, other):
                raise _mismatch(f"{name}'s weight is also read by {other.name} ({other.op_type})")
    for name, (codes, scales) in plan.items():
        node = nodes[name]
        n, k = codes.shape
        block = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "block_size")
        weight, scale = inits[node.input[1]], inits[node.input[2]]
        weight.CopyFrom(numpy_helper.from_array(codes.reshape(n, k // block, block), weight.name))
        dtype = numpy_helper.to_array(scale).dtype  # keep the graph's scale type (float32 or float16)
        scale.CopyFrom(numpy_helper.from_array(scales.astype(dtype).reshape(numpy_helper.to_array(scale).shape),
                                               scale.name))
        if len(node.input) > 3 and node.input[3]:
            zero_points = node.input[3]
            del node.input[3:]
            if not any(zero_points in other.input for other in graph.node):
                graph.initializer.remove(inits[zero_points])
        for a in node.attribute:
            if a.name == "bits":
                a.i = 8
        for reshape in [other for other in graph.node if other is not node and weight.name in other.input]:
            # the input embedding looked up in this head (converters.onnx.graph.embed_from_head): read 8-bit rows now
            shape = inits[reshape.input[1]]
            shape.CopyFrom(numpy_helper.from_array(np.array([n, k], dtype=np.int64), shape.name))
            gather = _embedding_lookup(graph, reshape)
            for a in gather.attribute:
                if a.name == "bits":
                    a.i = 8
    data = [p for p in Path(folder).iterdir() if p.name.startswith("model.onnx.")]
    for p in data:
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return sorted(plan)


def _embedding_lookup(graph: Any, node: Any) -> Any:
    """The GatherBlockQuantized that ``node`` (a Reshape of a head's weight to [rows, bytes]) feeds, or None."""
    if node.op_type != "Reshape":
        return None
    users = [n for n in graph.node if node.output[0] in n.input]
    if len(users) == 1 and users[0].op_type == "GatherBlockQuantized" and users[0].input[0] == node.output[0]:
        return users[0]
    return None


def _mismatch(what: str) -> Exception:
    return ConversionError(f"The exported graph does not take GPTQ's 8-bit weights: {what}.",
                           fix="Convert with int8=0 (all 4-bit), or algo='default'.")
