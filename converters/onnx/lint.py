"""Check an ONNX graph against an NPU execution provider's rule table (platforms/ep_rules/*.json).

The rules: every tensor's dimensions static (graph I/O and every inferred intermediate), every op on the EP's list,
no int64 arithmetic, and for quantized (QDQ) graphs the MatMul input type pairs the hardware runs and, where the EP
runs integer graphs only (QNN HTP), every float input of a compute op coming from a DequantizeLinear.  The first
broken rule of each kind is reported with the node that breaks it; :func:`check` turns findings into a
:class:`~edgelm.errors.GraphLintError`, which fails the conversion with nothing left behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from edgelm.errors import GraphLintError
from edgelm.platforms.ep_rules import rule_table

# ops that only carry encodings or shapes; a float input of these need not come from a DequantizeLinear
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Finding:
    rules: str  # the rule table (qnn-htp, ...)
    rule: str  # static_shapes | ops | int64_arithmetic | matmul_pairs | qdq
    node: str
    op: str
    message: str


def _elem_names() -> dict[int, str]:
    from onnx import TensorProto as T

    return {T.FLOAT: "float32", T.FLOAT16: "float16", T.UINT8: "uint8", T.INT8: "int8", T.UINT16: "uint16",
            T.INT16: "int16", T.INT32: "int32", T.INT64: "int64", T.INT4: "int4", T.UINT4: "uint4",
            T.BOOL: "bool"}


def _infer(proto: Any) -> Any:
    """Shape inference on a copy without weights' data; ops ONNX has no schema for (SimplifiedLayerNormalization)
    are inferred as the standard op of the same shape behaviour."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        if node.op_type == "SimplifiedLayerNormalization":
            node.op_type = "LayerNormalization"
            del node.attribute[:]
            node.attribute.extend([onnx.helper.make_attribute("axis", -1)])
    return onnx.shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True)


def findings(proto: Any, table: str, *, quantized: bool | None = None) -> list[Finding]:
    """Every rule of ``table`` that ``proto`` (an onnx.ModelProto) breaks, at most one finding per rule and node."""
    rules = rule_table(table)
    names = _elem_names()
    g = proto.graph
    inferred = _infer(proto).graph
    types: dict[str, str] = {}
    dims: dict[str, list[Any]] = {}
    for vi in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        tt = vi.type.tensor_type
        types[vi.name] = names.get(tt.elem_type, str(tt.elem_type))
        dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim] \
            if tt.HasField("shape") else ["?"]
    for init in g.initializer:
        types[init.name] = names.get(init.data_type, str(init.data_type))
        dims[init.name] = list(init.dims)
    producer = {o: n for n in g.node for o in n.output}
    if quantized is None:
        quantized = any(n.op_type in _QDQ for n in g.node)
    out: list[Finding] = []

    def add(rule: str, node: Any, message: str) -> None:
        out.append(Finding(table, rule, node.name or node.output[0], node.op_type, message))

    allowed = set(rules["ops"])
    pairs = {tuple(p) for p in rules.get("matmul_pairs", ())}
    arith = set(rules.get("int64_arithmetic_ops", ()))
    for node in g.node:
        if node.op_type not in allowed or node.domain not in ("", "ai.onnx"):
            add("ops", node, f"op {node.domain + '.' if node.domain else ''}{node.op_type} is not on the "
                f"{rules['title']}'s list")
        if rules.get("static_shapes"):
            for t in list(node.input) + list(node.output):
                if not t:
                    continue
                d = dims.get(t)
                if d is None or any(not isinstance(x, int) or x <= 0 for x in d):
                    add("static_shapes", node, f"tensor {t!r} has dimensions {d if d is not None else '(unknown)'}; "
                        "every dimension must be a fixed number")
                    break
        if not rules.get("int64_arithmetic", True) and node.op_type in arith:
            if any(types.get(t) == "int64" for t in node.input if t):
                add("int64_arithmetic", node, f"{node.op_type} computes on int64 tensors")
        if not quantized:
            continue
        if node.op_type == "MatMul" and pairs:
            code_types = []
            for t in node.input[:2]:
                dq = producer.get(t)
                code_types.append(types.get(dq.input[0], "?") if dq is not None and dq.op_type == "DequantizeLinear"
                                  else types.get(t, "?"))
            if tuple(code_types) not in pairs:
                add("matmul_pairs", node, f"MatMul inputs are ({', '.join(code_types)}); the "
                    f"{rules['title']} takes {', '.join('(' + ', '.join(p) + ')' for p in sorted(pairs))}")
        if rules.get("quantized_ops_need_qdq") and node.op_type not in _QDQ:
            for t in node.input:
                p = producer.get(t)
                if t and types.get(t) == "float32" and (p is None or p.op_type != "DequantizeLinear") \
                        and t not in {i.name for i in g.initializer}:
                    add("qdq", node, f"float input {t!r} does not come from a DequantizeLinear")
                    break
    return out


def check(proto: Any, tables: Iterable[str], *, graph: str, quantized: bool | None = None) -> dict[str, str]:
    """Raise GraphLintError naming the first offending node of ``graph`` for any table; else {table: "passed"}."""
    result = {}
    for table in tables:
        found = findings(proto, table, quantized=quantized)
        if found:
            f = found[0]
            more = f" ({len(found) - 1} more findings)" if len(found) > 1 else ""
            raise GraphLintError(
                f"The {graph} graph breaks the {table} rule '{f.rule}' at node {f.node!r} ({f.op}): {f.message}{more}.",
                fix="This is a bug of the NPU export for this architecture: report it with the model's config.json; "
                "convert without --target npu meanwhile.", node=f.node, op=f.op, rule=f.rule, rules=table)
        result[table] = "passed"
    return result
