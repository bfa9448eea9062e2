"""Weight quantization of a plain ONNX decoder graph (optimum-onnx's export) with onnxruntime's MatMulNBits.

Three steps, all on the ``onnx`` protobuf in this process:

1. :func:`prepare` makes every weight a constant MatMul operand the quantizer can see: ``Gemm`` with a constant
   weight (GPT-2's Conv1D, OPT) becomes ``MatMul`` + ``Add``, and a ``Transpose`` of a constant (a tied output head
   reading the embedding table: GPT-2, SmolLM2) is folded into a transposed copy, so the head is quantized too
   (otherwise it stays fp32 and is a fifth of SmolLM2's decode time).  :func:`fold_shapes` then replaces the
   run-time shape arithmetic symbolic shape inference can settle by constants (SmolLM2: 3,153 -> 2,163 nodes after
   onnxruntime's optimizations, identical outputs, decode steps 1.13x faster).
2. :func:`quantize` runs onnxruntime's ``MatMulNBitsQuantizer`` (round to nearest, int4 or int8, ``block_size``,
   symmetric or not, ``accuracy_level``).
3. With ``algo="gptq"`` (int4, symmetric), each MatMulNBits weight is then replaced by GPTQ's: the inputs of every
   quantized MatMul are captured while the fp32 graph runs the calibration windows (one run per window, all
   inputs at once), their Hessians accumulated, and each weight rounded by :func:`edgelm.converters.onnx.gptq.quantize`
   with the block scales of round-to-nearest ("static groups"), so the graph, the kernels and the speed are those of
   step 2.  onnxruntime's own GPTQ config re-runs the whole model once per distinct MatMul input (121 times per
   window for SmolLM2), which is impractical on a CPU; the Hessians here come from the fp32 model rather than from
   the model quantized so far (the builder path's GPTQ is sequential), a small difference in quality.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .. import Progress
from ..calibration import calibration_text
from .gptq import quantize as gptq_quantize

log = logging.getLogger("edgelm.converters.onnx")


def prepare(model: Any) -> dict[str, int]:
    """Rewrite ``model`` (an onnx ModelProto, in place) so that every weight is a constant MatMul operand; returns
    what was changed (counts of Gemm and Transpose rewrites)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    changed = {"gemm": 0, "transpose": 0}
    new_nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Transpose" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            table = numpy_helper.to_array(inits[node.input[0]])
            perm = attrs.get("perm") or [1, 0]
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.transpose(perm)),
                                                             node.output[0]))
            changed["transpose"] += 1
            continue  # the output name now names a constant
        if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits \
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0):
            b_name = node.input[1]
            if attrs.get("transB", 0):
                w = numpy_helper.to_array(inits[b_name]).T
                b_name = f"{b_name}_T"
                if b_name not in inits:
                    inits[b_name] = numpy_helper.from_array(np.ascontiguousarray(w), b_name)
                    graph.initializer.append(inits[b_name])
            out = node.output[0]
            has_bias = len(node.input) > 2 and node.input[2]
            mm_out = f"{out}_matmul" if has_bias else out
            new_nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=f"{node.name}_MatMul"))
            if has_bias:
                new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}_Add"))
            changed["gemm"] += 1
            continue
        new_nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    outputs = {o.name for o in graph.output}
    for t in list(graph.initializer):
        if t.name not in used and t.name not in outputs:
            graph.initializer.remove(t)
    return changed


def quantize(model: Any, bits: int, *, block_size: int, symmetric: bool, accuracy_level: int | None) -> Any:
    """Round-to-nearest MatMulNBits weights for every constant MatMul (onnxruntime's quantizer); returns the model."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level or None, op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


def gptq_weights(fp32: Any, quantized: Any, windows: Sequence[Sequence[int]], *, block_size: int,
                 damp: float = 0.01, progress: Progress | None = None) -> int:
    """Replace the int4 weights of ``quantized`` (made from ``fp32`` by :func:`quantize`, symmetric) with GPTQ's,
    calibrated on ``windows`` of token ids run through ``fp32``; returns the number of weights replaced."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    report = progress or (lambda message, fraction: None)
    inits = {t.name: t for t in fp32.graph.initializer}
    targets: dict[str, list[Any]] = {}  # activation name -> MatMul nodes reading it with a constant weight
    for node in fp32.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            targets.setdefault(node.input[0], []).append(node)
    qnodes = {n.name: n for n in quantized.graph.node if n.op_type == "MatMulNBits"}
    qinits = {t.name: t for t in quantized.graph.initializer}

    probe = type(fp32)()
    probe.CopyFrom(fp32)
    existing = {o.name for o in probe.graph.output}
    for name in targets:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # folds constants; keeps graph outputs
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds_spec = {i.name: i for i in session.get_inputs()}
    names = list(targets)
    hessians = {name: None for name in names}
    for w, ids in enumerate(windows):
        report(f"GPTQ: calibration window {w + 1}/{len(windows)}", 0.4 * w / len(windows))
        feed = _empty_cache_feed(feeds_spec, ids)
        values = session.run(names, feed)
        for name, x in zip(names, values):
            x = x.reshape(-1, x.shape[-1]).astype(np.float32)
            h = (2.0 / len(windows)) * (x.T @ x)
            hessians[name] = h if hessians[name] is None else hessians[name] + h
    del session, probe
    replaced = 0
    todo = [(name, node) for name, nodes in targets.items() for node in nodes]
    for i, (name, node) in enumerate(todo):
        qnode = qnodes.get(f"{node.name}_Q4")
        if qnode is None or len(qnode.input) != 3:  # not quantized, or asymmetric (zero points)
            continue
        report(f"GPTQ: weight {i + 1}/{len(todo)}", 0.4 + 0.6 * i / len(todo))
        w = numpy_helper.to_array(inits[node.input[1]])  # [K, N]
        k, n = w.shape
        if k % block_size:
            continue
        codes, scales, _, _ = gptq_quantize(torch.from_numpy(np.ascontiguousarray(w.T)).float(),
                                            torch.from_numpy(hessians[name]).float(), block_size, True, damp)
        c = codes.numpy().astype(np.uint8).reshape(n, k // block_size, block_size)
        packed = (c[:, :, 0::2] | (c[:, :, 1::2] << 4)).astype(np.uint8)
        b_init, s_init = qinits[qnode.input[1]], qinits[qnode.input[2]]
        if tuple(b_init.dims) != packed.shape:
            continue
        b_init.CopyFrom(numpy_helper.from_array(packed, b_init.name))
        dtype = numpy_helper.to_array(s_init).dtype
        s_init.CopyFrom(numpy_helper.from_array(scales.numpy().astype(dtype).reshape(tuple(s_init.dims)),
                                                s_init.name))
        replaced += 1
    return replaced


def _empty_cache_feed(spec: dict[str, Any], ids: Sequence[int]) -> dict[str, Any]:
    """Inputs for one window of ``ids`` from an empty cache."""
    import numpy as np

    n = len(ids)
    feed: dict[str, Any] = {"input_ids": np.asarray([ids], dtype=np.int64)}
    if "attention_mask" in spec:
        feed["attention_mask"] = np.ones((1, n), dtype=np.int64)
    if "position_ids" in spec:
        feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
    for name, arg in spec.items():
        if name.startswith("past_key_values"):
            shape = [1 if i == 0 else (0 if isinstance(d, str) or d is None else d) for i, d in enumerate(arg.shape)]
            feed[name] = np.zeros(shape, dtype=np.float16 if "float16" in arg.type else np.float32)
    return feed


def calibration_windows(folder: Path, text: str | None, context_length: int, samples: int = 16,
                        seq_len: int = 512) -> list[list[int]]:
    """``samples`` windows of token ids spread over the calibration text (GPTQ's built-in text unless ``text``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text or calibration_text(), add_special_tokens=False).ids
    seq_len = max(8, min(seq_len, context_length, len(ids)))
    samples = max(1, min(samples, len(ids) // seq_len))
    stride = len(ids) // samples
    return [ids[i * stride:i * stride + seq_len] for i in range(samples)]


def fold_shapes(model: Any) -> dict[str, int]:
    """Replace shape arithmetic that symbolic shape inference can settle by constants (``model`` is changed in place).

    optimum's graphs compute every Reshape target from ``Shape`` -> ``Gather`` -> ``Unsqueeze`` -> ``Concat`` chains
    at run time: about 2,000 of SmolLM2's 3,150 nodes after onnxruntime's own optimizations, each costing a few
    microseconds per decode step.  With the symbolic shapes of every tensor known, a ``Shape`` of a fixed-size tensor,
    a ``Gather`` of a fixed dimension, and a ``Reshape`` whose target has at most one unknown size (written -1) or
    sizes copied from its input (written 0) need no run-time arithmetic; onnxruntime folds what then feeds only on
    constants when it loads the graph.  The batch and sequence sizes stay free."""
    import numpy as np
    from onnx import helper, numpy_helper
    graph = model.graph
    for node in list(graph.node):  # Constant nodes -> initializers, so the folding below sees their values
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            t.name = node.output[0]
            graph.initializer.append(t)
            graph.node.remove(node)
    dims = symbolic_dims(model)
    consts = {t.name for t in graph.initializer}
    inits = {t.name: t for t in graph.initializer}
    shape_of: dict[str, tuple[str, int]] = {}  # Shape output -> (its input, start)
    changed = {"shape": 0, "gather": 0, "reshape": 0}
    new_nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Shape":
            d = dims.get(node.input[0])
            if d is not None:
                start, end = attrs.get("start", 0), attrs.get("end", len(d))
                part = d[start:end]
                if part and all(isinstance(x, int) and x > 0 for x in part):
                    graph.initializer.append(numpy_helper.from_array(np.array(part, np.int64), node.output[0]))
                    consts.add(node.output[0])
                    changed["shape"] += 1
                    continue
                shape_of[node.output[0]] = (node.input[0], start if start >= 0 else start + len(d))
        elif node.op_type == "Gather" and node.input[0] in shape_of and node.input[1] in consts \
                and attrs.get("axis", 0) == 0:
            idx_init = inits.get(node.input[1])
            source, start = shape_of[node.input[0]]
            d = dims.get(source)
            if idx_init is not None and d is not None:
                idx = numpy_helper.to_array(idx_init)
                picked = [d[start + int(i) if int(i) >= 0 else len(d) + int(i)] for i in np.atleast_1d(idx)]
                if all(isinstance(x, int) and x > 0 for x in picked):
                    value = np.array(picked, np.int64).reshape(idx.shape)
                    graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                    consts.add(node.output[0])
                    changed["gather"] += 1
                    continue
        elif node.op_type == "Reshape" and node.input[1] not in consts and not attrs.get("allowzero", 0):
            src, out = dims.get(node.input[0]), dims.get(node.output[0])
            if src is not None and out is not None and all(x is not None for x in out):
                target = []
                for i, x in enumerate(out):
                    if isinstance(x, int) and x > 0:
                        target.append(x)
                    elif i < len(src) and src[i] == x:
                        target.append(0)  # copied from the input's same axis
                    else:
                        target.append(-1)
                if target.count(-1) <= 1:
                    name = f"{node.output[0]}_edgelm_shape"
                    graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), name))
                    consts.add(name)
                    node.input[1] = name
                    changed["reshape"] += 1
        new_nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    drop_dead(graph)
    return changed


def symbolic_dims(model: Any) -> dict[str, list[Any]]:
    """Every tensor's shape by onnxruntime's symbolic shape inference: ints, dim names, or None where unknown."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    dims: dict[str, list[Any]] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            dims[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return dims


def live_nodes(nodes: Sequence[Any], outputs: set[str]) -> list[Any]:
    """The nodes (in topological order) that something in ``outputs`` depends on."""
    needed, keep = set(outputs), []
    for node in reversed(list(nodes)):
        if any(o in needed for o in node.output) or not node.output:
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def drop_dead(graph: Any) -> list[Any]:
    """Remove nodes and initializers nothing reads (the shape chains a folded Reshape no longer uses); returns copies
    of the initializers removed."""
    keep = live_nodes(graph.node, {o.name for o in graph.output})
    graph.ClearField("node")
    graph.node.extend(keep)
    needed = {i for n in keep for i in n.input} | {o.name for o in graph.output}
    removed = []
    for t in list(graph.initializer):
        if t.name not in needed:
            copy = type(t)()
            copy.CopyFrom(t)
            removed.append(copy)
            graph.initializer.remove(t)
    return removed
