"""Residual Add + RMSNorm -> one ``SkipSimplifiedLayerNormalization``, as onnxruntime-genai's builder writes it
(onnxruntime's own graph optimizer fuses the norm alone, not the Add before it)."""

from __future__ import annotations

from typing import Any

from .index import MS_DOMAIN, GraphIndex, attrs


def fuse_skip_rms_norms(model: Any, dims: dict[str, list[Any]]) -> int:
    """Residual Add + RMSNorm (as Hugging Face writes it: ``w * (x / sqrt(mean(x ** 2) + eps))``, the residual sum
    also read by the next Add) -> one ``SkipSimplifiedLayerNormalization`` that returns both, as the builder writes
    it (onnxruntime fuses the norm alone, not the Add).  Returns how many were fused; the graph changes in place
    (the caller drops the dead nodes)."""
    from onnx import TensorProto, helper

    g = GraphIndex(model, dims)
    replace: dict[int, Any] = {}
    removed: set[int] = set()
    for pow_node in list(model.graph.node):
        if pow_node.op_type != "Pow" or g.scalar(pow_node.input[1]) != 2.0:
            continue
        x = pow_node.input[0]
        cast, r = g.producer.get(x), x
        if cast is not None and cast.op_type == "Cast":
            if attrs(cast).get("to") != TensorProto.FLOAT or len(g.consumers.get(cast.input[0], [])) != 1:
                continue
            r = cast.input[0]
        else:
            cast = None
        add = g.producer.get(r)
        if add is None or add.op_type != "Add" or any(i in g.inits for i in add.input) \
                or any(g.rank(i) != 3 or g.dims.get(i) != g.dims.get(add.input[0]) for i in add.input):
            continue
        chain = [pow_node]
        node = _only_user(g, pow_node.output[0], "ReduceMean")
        axes = None if node is None else (attrs(node).get("axes") or
                                          (list(g.value(node.input[1]).reshape(-1)) if len(node.input) > 1
                                           and g.value(node.input[1]) is not None else None))
        if node is None or [int(a) for a in axes or []] not in ([-1], [2]) or attrs(node).get("keepdims", 1) != 1:
            continue
        chain.append(node)
        node = _only_user(g, node.output[0], "Add")
        eps = None if node is None else g.scalar(next((i for i in node.input if i != chain[-1].output[0]), ""))
        if eps is None:
            continue
        chain.append(node)
        node = _only_user(g, node.output[0], "Sqrt")
        inv = None if node is None else _only_user(g, node.output[0], "Div")
        if inv is None or inv.input[1] != node.output[0] or g.scalar(inv.input[0]) != 1.0:
            continue
        chain += [node, inv]
        node = _only_user(g, inv.output[0], "Mul")
        if node is None or x not in node.input:
            continue
        chain.append(node)
        out = node.output[0]
        back = _only_user(g, out, "Cast")
        if back is not None:
            if attrs(back).get("to") != TensorProto.FLOAT:
                continue
            chain.append(back)
            out = back.output[0]
        scale = _only_user(g, out, "Mul")
        weight = None if scale is None else next((i for i in scale.input if i != out), None)
        if weight is None or weight not in g.inits or len(g.inits[weight].dims) != 1:
            continue
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], weight],
                                 [scale.output[0], "", "", x], domain=MS_DOMAIN, epsilon=float(eps),
                                 name=f"{add.name}/SkipSimplifiedLayerNormalization")
        replace[id(add)] = fused
        removed.update(id(n) for n in chain + [scale] + ([cast] if cast is not None else []))
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in model.graph.node if id(n) not in removed]
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return len(replace)


def _only_user(g: GraphIndex, name: str, op_type: str) -> Any:
    """The one op reading ``name`` when it is an ``op_type``, else None."""
    users = g.consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None
