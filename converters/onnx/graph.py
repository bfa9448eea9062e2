"""Surgery on the graphs the model builder writes (with the onnx package), for what its options cannot ask for."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def embed_from_head(folder: Path) -> bool:
    """For a checkpoint whose input embedding is its output head (tied): the GPTQ import writes the head as int4
    MatMulNBits but keeps a float copy of the table for the input embedding (SmolLM2: 113 MB of 205 MB).  Look the
    embedding up in the int4 head instead (GatherBlockQuantized, as the builder's own round-to-nearest export does),
    so the model is as small as that one.  Symmetric heads only (zero points all 8, the kernels' default); False,
    leaving the model as it is, when the graph is not the expected one."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))  # with its external data: every tensor is written again below
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight"), None)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"), None)
    if gather is None or head is None or len(head.input) < 3 or not all(i in inits for i in head.input[1:]):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    qweight = inits[head.input[1]]
    n, blocks, blob = qweight.dims
    table = inits["model.embed_tokens.weight"]
    if attrs.get("bits") != 4 or n != table.dims[0] or attrs.get("K") != table.dims[1] or \
            attrs["K"] != blocks * attrs["block_size"]:
        return False
    if len(head.input) > 3 and head.input[3]:
        if not np.all(numpy_helper.to_array(inits[head.input[3]]) == 0x88):  # two 4-bit zero points of 8 a byte
            return False
        graph.initializer.remove(inits[head.input[3]])
        del head.input[3:]
    scales = inits[head.input[2]]
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales).reshape(n, blocks), scales.name))
    shape_name = "/model/embed_tokens/head_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([n, blocks * blob], dtype=np.int64), shape_name))
    graph.initializer.remove(table)
    reshaped = "/model/embed_tokens/Reshape/output_0"
    at = list(graph.node).index(gather)
    lookup = helper.make_node("GatherBlockQuantized", [reshaped, gather.input[1], scales.name], list(gather.output),
                              name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft", bits=4,
                              block_size=attrs["block_size"], gather_axis=0, quantize_axis=1)
    graph.node.remove(gather)
    graph.node.insert(at, lookup)
    graph.node.insert(at, helper.make_node("Reshape", [qweight.name, shape_name], [reshaped],
                                           name="/model/embed_tokens/Reshape"))
    data = [p for p in folder.iterdir() if p.name.startswith("model.onnx.")]
    for p in data:
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return True


def embed_int8(folder: Path, block_size: int = 32) -> bool:
    """Look the input embedding up in an 8-bit copy of its float table (GatherBlockQuantized, symmetric, a scale per
    ``block_size`` values, onnxruntime's implied zero point 128) instead of the float table or the int4 head.

    For a tied model the GPTQ import keeps a float table beside the int4 head; reading the embedding from the int4
    head (:func:`embed_from_head`) is the smallest model, but every token then enters the network with the head's
    4-bit rounding error, which GPTQ fitted to the head's job (scoring), not the embedding's.  An 8-bit table is
    near-lossless (SmolLM2: 28 MB instead of 113 MB fp32) and costs no decode time (one row per token).  False,
    leaving the model as it is, when the graph has no Gather on a float ``model.embed_tokens.weight``."""
    import onnx
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight"), None)
    table = inits.get("model.embed_tokens.weight")
    if gather is None or table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or \
            table.dims[1] % block_size:
        return False
    codes, scales = int8_blocks(numpy_helper.to_array(table), block_size)
    data_name, scales_name = "model.embed_tokens.weight_q8", "model.embed_tokens.scales_q8"
    graph.initializer.remove(table)
    graph.initializer.append(numpy_helper.from_array(codes, data_name))
    graph.initializer.append(numpy_helper.from_array(scales, scales_name))
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(at, helper.make_node("GatherBlockQuantized", [data_name, gather.input[1], scales_name],
                                           list(gather.output), name="/model/embed_tokens/GatherBlockQuantized",
                                           domain="com.microsoft", bits=8, block_size=block_size, gather_axis=0,
                                           quantize_axis=1))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for p in [p for p in folder.iterdir() if p.name.startswith("model.onnx.")]:
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return True


def int8_blocks(table: "np.ndarray", block_size: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Symmetric 8-bit blocks along the last axis: (codes uint8 [rows, cols] stored with offset 128, scales float32
    [rows, cols / block_size]); value = (code - 128) * scale."""
    import numpy as np

    rows, cols = table.shape
    blocks = table.astype(np.float32).reshape(rows, cols // block_size, block_size)
    scales = np.abs(blocks).max(axis=2) / 127
    scales[scales == 0] = 1
    codes = np.clip(np.rint(blocks / scales[:, :, None]), -127, 127) + 128
    return codes.astype(np.uint8).reshape(rows, cols), scales.astype(np.float32)
