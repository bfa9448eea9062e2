"""The rewrite itself: every layer's attention (as :mod:`.match` found it) becomes one GroupQueryAttention over a
shared cache buffer; where it can, the layer's rotary embedding moves into the op as cos/sin tables evaluated from the
graph's own rotary subgraph, and q, k and v made from one input become one packed MatMul.  After it, the residual
Add + RMSNorm pairs become SkipSimplifiedLayerNormalization (:mod:`.norms`).

All or nothing: :func:`fuse` changes the graph only when every layer matched, and returns an :class:`Undo` that puts
it back (the caller undoes a rewrite whose logits differ).
"""

from __future__ import annotations

import logging
from typing import Any

from ..quantize import drop_dead, live_nodes
from .index import FUSED_OP, MS_DOMAIN, GraphIndex, NoMatch, attrs
from .match import flat_consumer, flat_source, match_layer, projection, rotary_of
from .norms import fuse_skip_rms_norms

log = logging.getLogger("edgelm.converters.onnx")

HEAD_SIZE_MULTIPLE = 8  # onnxruntime's GroupQueryAttention refuses other head sizes


def fuse(model: Any, dims: dict[str, list[Any]], heads: int | None = None, *, positions: int | None = None
         ) -> dict[str, Any]:
    """Rewrite every layer's attention of ``model`` (in place) into GroupQueryAttention; returns what was done:
    ``{"attention": "GroupQueryAttention", "layers": n}``, or ``{"attention": "as exported", "reason": ...}`` with
    the graph unchanged.  ``dims``: the symbolic shape of every tensor (``quantize.symbolic_dims``); ``heads``:
    the query head count when the graph does not tell it; ``positions``: the context length, for which a layer's
    rotary embedding (Hugging Face's, full or partial) moves into the op as cos/sin tables (None: it stays as
    exported, before the op)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = GraphIndex(model, dims)
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    pasts = [n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")]
    if "attention_mask" not in inputs or not pasts:
        return {"attention": "as exported", "reason": "no attention_mask input or no past key/values"}
    plans = []
    try:
        for past_k in pasts:
            layer = past_k[len("past_key_values."):-len(".key")]
            past_v, present_k, present_v = f"past_key_values.{layer}.value", f"present.{layer}.key", \
                f"present.{layer}.value"
            if past_v not in inputs or present_k not in outputs or present_v not in outputs:
                raise NoMatch(f"layer {layer} lacks its value cache")
            plans.append(match_layer(g, past_k, past_v, present_k, present_v))
    except NoMatch as exc:
        return {"attention": "as exported", "reason": str(exc)}

    kd = [d.dim_value or None for d in inputs[pasts[0]].type.tensor_type.shape.dim]
    kv_heads, head_size = kd[1], kd[3]
    qd = dims.get(plans[0]["q"]) or []
    n_heads = qd[1] if len(qd) == 4 and isinstance(qd[1], int) and qd[1] > 0 else heads
    if not kv_heads or not head_size or not n_heads or n_heads % kv_heads:
        return {"attention": "as exported", "reason": f"head counts unknown or uneven (query {n_heads}, "
                f"cache {kv_heads} x {head_size})"}
    if head_size % HEAD_SIZE_MULTIPLE:
        return {"attention": "as exported", "reason": f"head size {head_size} is not a multiple of "
                f"{HEAD_SIZE_MULTIPLE} ({FUSED_OP} needs that)"}

    graph = model.graph
    new = [
        helper.make_node("ReduceSum", ["attention_mask", "edgelm_gqa_axis1"], ["edgelm_gqa_len"], keepdims=0,
                         name="edgelm_gqa/ReduceSum"),
        helper.make_node("Sub", ["edgelm_gqa_len", "edgelm_gqa_one"], ["edgelm_gqa_len1"], name="edgelm_gqa/Sub"),
        helper.make_node("Cast", ["edgelm_gqa_len1"], ["edgelm_gqa_seqlens_k"], to=6, name="edgelm_gqa/Cast"),
        helper.make_node("Shape", ["attention_mask"], ["edgelm_gqa_mask_shape"], name="edgelm_gqa/Shape"),
        helper.make_node("Gather", ["edgelm_gqa_mask_shape", "edgelm_gqa_one"], ["edgelm_gqa_total64"], axis=0,
                         name="edgelm_gqa/Gather"),
        helper.make_node("Cast", ["edgelm_gqa_total64"], ["edgelm_gqa_total"], to=6, name="edgelm_gqa/Cast_1"),
    ]
    mask_type = inputs["attention_mask"].type.tensor_type.elem_type
    one = np.array(1, dtype=helper.tensor_dtype_to_np_dtype(mask_type))
    consts = [numpy_helper.from_array(np.array([1], np.int64), "edgelm_gqa_axis1"),
              numpy_helper.from_array(np.array(1, np.int64), "edgelm_gqa_one"),
              numpy_helper.from_array(np.array([0, 0, -1], np.int64), "edgelm_gqa_bsd"),
              numpy_helper.from_array(np.array([0, 0, n_heads, head_size], np.int64), "edgelm_gqa_bsnh")]
    if one.dtype != np.int64:  # the Sub's operands must share the mask's type
        consts.append(numpy_helper.from_array(one.reshape(()), "edgelm_gqa_one_mask"))
        new[1].input[1] = "edgelm_gqa_one_mask"
    removed, tables, rotary_layers, packed_layers = set(), {}, 0, 0
    for i, p in enumerate(plans):
        pre = f"edgelm_gqa/{i}"
        rotary = []
        if positions:
            rq, rk = rotary_of(g, p["q"], head_size), rotary_of(g, p["k"], head_size)
            if rq and rk and (rq["cos"], rq["sin"], rq["rotary_dim"]) == (rk["cos"], rk["sin"], rk["rotary_dim"]):
                key = (rq["cos"], rq["sin"], rq["rotary_dim"])
                if key not in tables:  # the names of its cos/sin tables, once per rotary the layers share
                    values = _rotary_tables(g, *key, positions)
                    tables[key] = None if values is None else \
                        [f"edgelm_gqa_{name}_{len(tables) + 1}" for name in ("cos", "sin")]
                    if values is not None:
                        consts.extend(numpy_helper.from_array(v, n) for v, n in zip(values, tables[key]))
                if tables[key] is not None:
                    rotary = tables[key]
                    p["q"], p["k"] = rq["x"], rk["x"]
                    rotary_layers += 1
        flat = []
        for role, n in (("q", n_heads), ("k", kv_heads), ("v", kv_heads)):
            found = flat_source(g, p[role], n * head_size)
            if found is not None and found[1] != 1.0:
                if role == "v":  # a scale on the values is not the op's
                    found = None
                else:
                    p["scale"] *= found[1]
            flat.append(found[0] if found else None)
        packed = _packed_qkv(g, flat, pre) if all(flat) else None
        if packed is not None:  # the op splits q, k and v itself
            new.extend(packed[1])
            consts.extend(packed[2])
            flat = [packed[0], "", ""]
            packed_layers += 1
        for k, (role, src) in enumerate(zip("qkv", flat)):
            if src is None:
                new.append(helper.make_node("Transpose", [p[role]], [f"{pre}/{role}_bsnh"], perm=[0, 2, 1, 3],
                                            name=f"{pre}/{role}/Transpose"))
                new.append(helper.make_node("Reshape", [f"{pre}/{role}_bsnh", "edgelm_gqa_bsd"],
                                            [f"{pre}/{role}_bsd"], name=f"{pre}/{role}/Reshape"))
                flat[k] = f"{pre}/{role}_bsd"
        out = flat_consumer(g, p["context"], n_heads * head_size)
        if out is not None:  # the op's [batch, seq, hidden] output is what the old context became anyway
            removed.update(id(n) for n in out[1])
        new.append(helper.make_node(
            FUSED_OP, [*flat, *p["past"], "edgelm_gqa_seqlens_k", "edgelm_gqa_total", *rotary],
            [out[0] if out else f"{pre}/out", *p["present"]], domain=MS_DOMAIN, name=f"{pre}/{FUSED_OP}",
            num_heads=int(n_heads), kv_num_heads=int(kv_heads), scale=float(p["scale"]),
            **({"do_rotary": 1, "rotary_interleaved": 0} if rotary else {})))
        if out is None:
            new.append(helper.make_node("Reshape", [f"{pre}/out", "edgelm_gqa_bsnh"], [f"{pre}/out_bsnh"],
                                        name=f"{pre}/out/Reshape"))
            new.append(helper.make_node("Transpose", [f"{pre}/out_bsnh"], [p["context"]], perm=[0, 2, 1, 3],
                                        name=f"{pre}/out/Transpose"))
        removed.update(id(n) for n in p["remove"])
    try:
        nodes = _toposort([n for n in graph.node if id(n) not in removed] + new, {i.name for i in graph.input} |
                          {t.name for t in graph.initializer} | {t.name for t in consts})
    except NoMatch as exc:
        return {"attention": "as exported", "reason": str(exc)}
    nodes = live_nodes(nodes, {o.name for o in graph.output})
    cache = {name for p in plans for name in (*p["past"], *p["present"])}
    stale = sorted({i for n in nodes if n.op_type != FUSED_OP for i in n.input} & cache)
    if stale:  # e.g. a position computed from the cache's length, which is the buffer's size once shared
        return {"attention": "as exported", "reason": f"other ops than the attention read the cache ({stale[0]})"}
    undo = Undo(model)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    skip_norms = fuse_skip_rms_norms(model, dims)
    undo.dropped = drop_dead(graph)
    names = {o for n in graph.node for o in n.output}
    for v in list(graph.value_info):
        if v.name not in names:
            graph.value_info.remove(v)
    return {"attention": FUSED_OP, "layers": len(plans), "heads": int(n_heads), "kv_heads": int(kv_heads),
            "rotary_in_op": rotary_layers, "packed_qkv": packed_layers, "skip_rms_norms": skip_norms, "undo": undo}


def _rotary_tables(g: GraphIndex, cos: str, sin: str, rotary_dim: int, positions: int) -> tuple[Any, Any] | None:
    """GroupQueryAttention's cos/sin caches ``[positions, rotary_dim / 2]``: the graph's own cos and sin tensors
    evaluated for positions 0 .. positions - 1 (so any scaling the export computes is kept), or None when they
    depend on more than the positions or are not Hugging Face's duplicated halves."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes, seen, stack = [], set(), [cos, sin]
    while stack:
        name = stack.pop()
        node = g.producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(i for i in node.input if i)
    order = {id(n): i for i, n in enumerate(g.graph.node)}
    nodes.sort(key=lambda n: order[id(n)])
    used = {i for n in nodes for i in n.input}
    feeds_for = {"position_ids": lambda: np.arange(positions, dtype=np.int64)[None],
                 "input_ids": lambda: np.zeros((1, positions), np.int64),
                 "attention_mask": lambda: np.ones((1, positions), np.int64)}
    inputs = [i for i in g.graph.input if i.name in used]
    if any(i.name not in feeds_for for i in inputs) or any(g.inits[n].ByteSize() > 1 << 20 for n in used
                                                           if n in g.inits):
        return None
    sub = helper.make_graph(nodes, "rotary", inputs, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                      for n in (cos, sin)], [g.inits[n] for n in used if n in g.inits])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(helper.make_model(sub, opset_imports=g.model.opset_import).SerializeToString(),
                                       so, providers=["CPUExecutionProvider"])
        tables = session.run([cos, sin], {i.name: feeds_for[i.name]() for i in inputs})
    except Exception as exc:
        log.debug("rotary tables not evaluated: %s", exc)
        return None
    half = rotary_dim // 2
    out = []
    for t in tables:
        if t.size != positions * rotary_dim:
            return None
        t = t.reshape(positions, rotary_dim)
        if not np.allclose(t[:, :half], t[:, half:], rtol=1e-6, atol=1e-6):
            return None
        out.append(np.ascontiguousarray(t[:, :half], dtype=np.float32))
    return out[0], out[1]


def _packed_qkv(g: GraphIndex, srcs: list[str], prefix: str) -> tuple[str, list[Any], list[Any]] | None:
    """One [batch, seq, (heads + 2 kv heads) * head_size] tensor for the op's packed-QKV form: the input of the Split
    that made q, k and v, or one MatMul over the three projections' weights side by side (one pass over the layer's
    input instead of three); with the nodes and initializers to add.  None when q, k and v are made otherwise."""
    import numpy as np
    from onnx import helper, numpy_helper

    split = g.producer.get(srcs[0])
    if split is not None and split.op_type == "Split" and list(split.output) == srcs \
            and attrs(split).get("axis") in (-1, 2) and g.rank(split.input[0]) == 3:
        return split.input[0], [], []
    parts = [projection(g, name) for name in srcs]
    if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
        return None
    weights = [numpy_helper.to_array(g.inits[p[1]]) for p in parts]
    if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
        return None
    nodes = [helper.make_node("MatMul", [parts[0][0], f"{prefix}/qkv_weight"], [f"{prefix}/qkv"],
                              name=f"{prefix}/qkv/MatMul")]
    inits = [numpy_helper.from_array(np.concatenate(weights, axis=1), f"{prefix}/qkv_weight")]
    if any(p[2] for p in parts):
        biases = [numpy_helper.to_array(g.inits[p[2]]) if p[2] else np.zeros(w.shape[1], w.dtype)
                  for p, w in zip(parts, weights)]
        inits.append(numpy_helper.from_array(np.concatenate(biases), f"{prefix}/qkv_bias"))
        nodes[0].output[0] = f"{prefix}/qkv_matmul"
        nodes.append(helper.make_node("Add", [f"{prefix}/qkv_matmul", f"{prefix}/qkv_bias"], [f"{prefix}/qkv"],
                                      name=f"{prefix}/qkv/Add"))
    return f"{prefix}/qkv", nodes, inits


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    ready = set(available) | {""}
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise NoMatch(f"the rewritten graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    return out


class Undo:
    """What :func:`fuse` changed, to put the graph back as it was (nodes, value infos and opsets are small; of the
    initializers only the small constants the old attention used are dropped, and kept here)."""

    def __init__(self, model: Any) -> None:
        g = model.graph
        self.model = model
        self.nodes = [n.SerializeToString() for n in g.node]
        self.value_info = [v.SerializeToString() for v in g.value_info]
        self.opsets = [o.SerializeToString() for o in model.opset_import]
        self.initializers = {t.name for t in g.initializer}
        self.dropped: list[Any] = []

    def __call__(self) -> None:
        from onnx import NodeProto, OperatorSetIdProto, ValueInfoProto

        g = self.model.graph
        g.ClearField("node")
        g.node.extend(NodeProto.FromString(b) for b in self.nodes)
        g.ClearField("value_info")
        g.value_info.extend(ValueInfoProto.FromString(b) for b in self.value_info)
        self.model.ClearField("opset_import")
        self.model.opset_import.extend(OperatorSetIdProto.FromString(b) for b in self.opsets)
        for t in list(g.initializer):
            if t.name not in self.initializers:
                g.initializer.remove(t)
        g.initializer.extend(t for t in self.dropped if t.name in self.initializers)
