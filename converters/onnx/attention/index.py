"""What the attention rewrite knows about a graph: who produces and who reads each tensor, and the value of each
small constant (initializers, ``Constant`` ops and the shape arithmetic on them, evaluated here).

Shared by the matcher (:mod:`.match`), the rewrite (:mod:`.rewrite`) and the norm fusion (:mod:`.norms`).
"""

from __future__ import annotations

import math
from typing import Any

from edgelm.formats.onnx_plain import SHARED_CACHE_OP

MS_DOMAIN, FUSED_OP = SHARED_CACHE_OP


class NoMatch(Exception):
    """A layer's attention is not the pattern :func:`.rewrite.fuse` rewrites (the message says where it differs)."""


class GraphIndex:
    """Index of a graph: producers, consumers, constants (with small constant subgraphs evaluated)."""

    def __init__(self, model: Any, dims: dict[str, list[Any]]) -> None:
        from onnx import numpy_helper

        self.model, self.graph, self.dims = model, model.graph, dims
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self._np = numpy_helper
        self._values: dict[str, Any] = {}

    def users(self, name: str) -> list[Any]:
        """Consumers of ``name`` that read more than its shape."""
        return [n for n in self.consumers.get(name, []) if n.op_type != "Shape"]

    def value(self, name: str, depth: int = 0) -> Any:
        """The value of ``name`` when it is a small constant (an initializer or ops on them), else None."""
        import numpy as np

        if name in self._values:
            return self._values[name]
        out = None
        if name in self.inits:
            t = self.inits[name]
            if math.prod(t.dims) <= 64:
                out = self._np.to_array(t)
        elif depth < 12 and name in self.producer:
            node = self.producer[name]
            if node.op_type == "Shape":  # the sizes that are fixed, as an object array (None elsewhere)
                d = self.dims.get(node.input[0])
                if d is not None:
                    a = attrs(node)
                    part = d[a.get("start", 0):a.get("end", len(d))]
                    shape = np.array([x if isinstance(x, int) and x > 0 else None for x in part], dtype=object)
                    if all(x is not None for x in shape):
                        shape = shape.astype(np.int64)
                    self._values[name] = shape
                    return shape
            args = [self.value(i, depth + 1) if i else None for i in node.input]
            if node.op_type == "Constant":
                from onnx import helper

                attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if "value" in attr and math.prod(attr["value"].dims) <= 64:
                    out = self._np.to_array(attr["value"])
            if args and args[0] is not None and args[0].dtype == object:  # picking from a partly known shape
                out = _pick(node, args)
                if out is not None and all(x is not None for x in out.reshape(-1)):
                    out = out.astype(np.int64)
            elif all(a is not None for a, i in zip(args, node.input) if i) and node.input:
                try:
                    from onnx import helper
                    from onnx.reference import ReferenceEvaluator

                    one = helper.make_graph([node], "c", [], [helper.make_tensor_value_info(o, 0, None)
                                                            for o in node.output])
                    feeds = {i: a for i, a in zip(node.input, args) if i}
                    for i, a in feeds.items():
                        one.initializer.append(self._np.from_array(np.asarray(a), i))
                    ref = ReferenceEvaluator(helper.make_model(one, opset_imports=self.model.opset_import))
                    res = ref.run(None, {})
                    out = np.asarray(res[list(node.output).index(name)])
                    if out.size > 64:
                        out = None
                except Exception:  # an op the reference evaluator lacks: not a constant for us
                    out = None
        self._values[name] = out
        return out

    def scalar(self, name: str) -> float | None:
        v = self.value(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 and v.dtype != object else None

    def init_of(self, name: str) -> str | None:
        """The initializer ``name`` is, directly or through Identity ops (the exporter's shared parameters)."""
        for _ in range(4):
            if name in self.inits:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def rank(self, name: str) -> int | None:
        d = self.dims.get(name)
        return len(d) if d is not None else None


def _pick(node: Any, args: list[Any]) -> Any:
    """Gather / Slice of a 1-d shape vector whose unknown sizes are None; None for anything else."""
    import numpy as np

    data = args[0]
    if data.ndim != 1:
        return None
    if node.op_type == "Gather" and attrs(node).get("axis", 0) == 0 and args[1] is not None:
        return np.asarray(data[np.asarray(args[1], np.int64)], dtype=object)
    if node.op_type == "Slice" and args[1] is not None and args[2] is not None and args[1].size == 1:
        if len(args) > 3 and args[3] is not None and int(args[3].reshape(-1)[0]) not in (0, -1):
            return None
        step = int(args[4].reshape(-1)[0]) if len(args) > 4 and args[4] is not None else 1
        start, end = int(args[1].reshape(-1)[0]), int(args[2].reshape(-1)[0])
        return np.asarray(data[start:max(min(end, 2**62), -2**62):step], dtype=object)
    return None


def attrs(node: Any) -> dict[str, Any]:
    """The attributes of ``node`` as Python values, by name."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
