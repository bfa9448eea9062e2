"""Rewrite the attention of a plain decoder graph (optimum-onnx's export) into onnxruntime's GroupQueryAttention.

optimum's graphs spell attention out op by op: ``present = Concat(past, new)`` along the sequence axis, the keys and
values repeated per query head (``Unsqueeze`` / ``Expand`` / ``Reshape``), ``MatMul`` for the scores, an additive
mask built from ``attention_mask`` in every layer, ``Softmax``, a NaN guard (``IsNaN`` / ``Where``) and a second
``MatMul``.  Each decode step therefore copies the whole cache once (the Concat) and, for grouped-query models,
expands it again, and runs a few dozen small ops per layer.  onnxruntime-genai's builder writes one
``com.microsoft.GroupQueryAttention`` per layer instead, which appends the new keys and values into a preallocated
cache in place (past and present share one buffer) and masks causally from the sequence lengths.

:func:`fuse` finds, for every layer, the subgraph between ``(q, k_new, v_new, past_key, past_value)`` and the
attention's context output, by following the data flow from the layer's ``present.*`` Concat outputs (not by op
names, which differ between architectures), and replaces it with one GroupQueryAttention.  A layer matches when:

* the keys reach the score ``MatMul`` through layout ops (Transpose of the last two axes exactly once, Unsqueeze /
  Expand / Reshape of the head repetition, Cast) and scalar scaling, and the values reach the context ``MatMul`` the
  same way (no transpose);
* between the scores and ``Softmax`` there is only scalar scaling, an additive mask of shape ``[batch, 1, q, kv]``
  (or a ``Where`` masked fill) and casts; after it at most the NaN guard, casts or Dropout;
* the query is a 4-d ``[batch, heads, q, head_size]`` tensor (after scalar scaling, which joins the scale).

Within the same rewrite, Hugging Face's rotary embedding moves into the op (cos/sin tables evaluated from the graph's
own rotary subgraph), q, k and v made from one input become one packed MatMul, and each residual Add followed by an
RMSNorm becomes one ``SkipSimplifiedLayerNormalization``: the graph the builder would have written.

An additive term with a head axis (BLOOM's ALiBi) is not a mask and does not match.  The rewrite is all or nothing:
if one layer does not match, the graph is left as exported (edgelm's loop runs it with two cache buffers), and the
caller records why.  :func:`verify` then compares the rewritten graph with the exported one on random tokens (a
prompt, then single-token steps, the rewritten one with a cache buffer larger than the sequence as the runtime binds
it) before the conversion keeps it.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from edgelm.formats.onnx_plain import SHARED_CACHE_OP

log = logging.getLogger("edgelm.converters.onnx")

MS_DOMAIN, FUSED_OP = SHARED_CACHE_OP
HEAD_SIZE_MULTIPLE = 8  # onnxruntime's GroupQueryAttention refuses other head sizes
ROTARY_HALF_MULTIPLE = 8  # ... and rotary tables (rotary_dim / 2 wide) of other widths
LAYOUT_OPS = {"Unsqueeze", "Expand", "Reshape", "Cast", "Identity"}
SCALE_OPS = {"Mul", "Div"}


class NoMatch(Exception):
    """A layer's attention is not the pattern :func:`fuse` rewrites (the message says where it differs)."""


class _Graph:
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
                    a = _attrs(node)
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
    if node.op_type == "Gather" and _attrs(node).get("axis", 0) == 0 and args[1] is not None:
        return np.asarray(data[np.asarray(args[1], np.int64)], dtype=object)
    if node.op_type == "Slice" and args[1] is not None and args[2] is not None and args[1].size == 1:
        if len(args) > 3 and args[3] is not None and int(args[3].reshape(-1)[0]) not in (0, -1):
            return None
        step = int(args[4].reshape(-1)[0]) if len(args) > 4 and args[4] is not None else 1
        start, end = int(args[1].reshape(-1)[0]), int(args[2].reshape(-1)[0])
        return np.asarray(data[start:max(min(end, 2**62), -2**62):step], dtype=object)
    return None


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _scale_step(g: _Graph, node: Any, cur: str) -> float | None:
    """The factor a Mul/Div by a scalar constant applies to ``cur``, or None when ``node`` is not one."""
    if node.op_type not in SCALE_OPS or len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == cur else node.input[0]
    c = g.scalar(other)
    if c is None or (node.op_type == "Div" and node.input[0] != cur) or c == 0:
        return None
    return c if node.op_type == "Mul" else 1.0 / c


def _next(g: _Graph, name: str, what: str, besides: str | None = None) -> Any:
    """The one op that reads ``name`` (shape reads and ``besides`` ops aside); NoMatch naming ``what`` otherwise."""
    users = [u for u in g.users(name) if u.op_type != besides]
    if len(users) != 1:
        raise NoMatch(f"{what} feeds {len(users)} ops")
    return users[0]


def _follow_cache(g: _Graph, start: str, *, transposed: bool) -> tuple[Any, float]:
    """From a present output, follow its single data path to the MatMul that reads it as the right operand; the
    scalar scale applied on the way.  ``transposed``: the path must swap the last two axes exactly once."""
    cur, scale, swaps = start, 1.0, 0
    for _ in range(16):
        node = _next(g, cur, cur)
        if node.op_type == "MatMul":
            if node.input[1] != cur or node.input[0] == cur:
                raise NoMatch(f"{cur} is not the right operand of {node.name}")
            if swaps != (1 if transposed else 0):
                raise NoMatch(f"{start} reaches {node.name} with {swaps} transposes")
            return node, scale
        factor = _scale_step(g, node, cur)
        if factor is not None:
            scale *= factor
        elif node.op_type == "Transpose":
            perm = list(_attrs(node).get("perm") or [])
            if perm != [0, 1, 3, 2]:
                raise NoMatch(f"{node.name} permutes {perm}")
            swaps += 1
        elif node.op_type not in LAYOUT_OPS or node.input[0] != cur:
            raise NoMatch(f"{cur} goes through {node.op_type} {node.name}")
        cur = node.output[0]
    raise NoMatch(f"{start}: no MatMul within 16 ops")


def _slice_of(g: _Graph, name: str) -> tuple[str, int, int] | None:
    """(data, start, end) when ``name`` is a Slice of its input's last axis with constant bounds (step 1)."""
    node = g.producer.get(name)
    if node is None or node.op_type != "Slice" or len(node.input) < 3:
        return None
    args = [g.value(i) if i else None for i in node.input[1:]]
    if any(a is None or a.size != 1 for a in args[:2]) or (len(args) > 3 and args[3] is not None
                                                          and int(args[3].reshape(-1)[0]) != 1):
        return None
    rank = g.rank(node.input[0])
    axis = int(args[2].reshape(-1)[0]) if len(args) > 2 and args[2] is not None else 0
    if rank is None or axis not in (-1, rank - 1):
        return None
    return node.input[0], int(args[0].reshape(-1)[0]), int(args[1].reshape(-1)[0])


def _rotate_half_of(g: _Graph, name: str) -> tuple[str, int] | None:
    """(x, half) when ``name`` = Concat(-x[..., half:], x[..., :half]) on the last axis (Hugging Face's rotate_half)."""
    node = g.producer.get(name)
    if node is None or node.op_type != "Concat" or len(node.input) != 2 or _attrs(node).get("axis") not in (-1, 3):
        return None
    neg = g.producer.get(node.input[0])
    if neg is None or neg.op_type != "Neg":
        return None
    upper, lower = _slice_of(g, neg.input[0]), _slice_of(g, node.input[1])
    if upper is None or lower is None or upper[0] != lower[0] or lower[1] != 0 or upper[1] != lower[2] \
            or upper[2] < 2 * lower[2]:
        return None
    return upper[0], lower[2]


def _rotary_of(g: _Graph, name: str, head_size: int) -> dict[str, Any] | None:
    """When ``name`` is Hugging Face's rotary embedding of a tensor x (``x * cos + rotate_half(x) * sin`` on its first
    ``rotary_dim`` channels, the rest passed through): x, the cos and sin tensors, rotary_dim; else None."""
    from itertools import permutations

    rot, x_full, rotary_dim = name, None, None
    node = g.producer.get(name)
    if node is not None and node.op_type == "Concat" and len(node.input) == 2 and _attrs(node).get("axis") in (-1, 3):
        rest = _slice_of(g, node.input[1])  # partial rotary: Concat(rotary(x[..., :rd]), x[..., rd:])
        if rest is None:
            return None
        x_full, rotary_dim = rest[0], rest[1]
        rot = node.input[0]
    add = g.producer.get(rot)
    if add is None or add.op_type != "Add":
        return None
    for m1, m2 in permutations(add.input):
        a, b = g.producer.get(m1), g.producer.get(m2)
        if a is None or b is None or a.op_type != "Mul" or b.op_type != "Mul":
            continue
        for x, cos in permutations(a.input):
            for r, sin in permutations(b.input):
                half = _rotate_half_of(g, r)
                if half is None or half[0] != x:
                    continue
                if x_full is not None:  # x must be x_full[..., :rd]
                    first = _slice_of(g, x)
                    if first is None or first[0] != x_full or first[1] != 0 or first[2] != rotary_dim \
                            or 2 * half[1] != rotary_dim:
                        return None
                    x = x_full
                elif 2 * half[1] != head_size:
                    return None
                if half[1] % ROTARY_HALF_MULTIPLE:
                    return None
                return {"x": x, "cos": cos, "sin": sin, "rotary_dim": 2 * half[1]}
    return None


def _flat_source(g: _Graph, name: str, width: int) -> tuple[str, float] | None:
    """The [batch, seq, heads * head_size] tensor ``name`` was made from by Reshape + Transpose(0, 2, 1, 3), if so,
    and the scalar it was multiplied by on the way (OPT scales the query before splitting the heads), else None."""
    t = g.producer.get(name)
    if t is None or t.op_type != "Transpose" or list(_attrs(t).get("perm") or []) != [0, 2, 1, 3]:
        return None
    r = g.producer.get(t.input[0])
    if r is None or r.op_type != "Reshape":
        return None
    src, factor = r.input[0], 1.0
    node = g.producer.get(src)
    if node is not None and node.op_type in SCALE_OPS and len(g.users(src)) == 1:
        for operand in node.input:
            step = _scale_step(g, node, operand)
            if step is not None:
                src, factor = operand, step
                break
    d = g.dims.get(src)
    return (src, factor) if d is not None and len(d) == 3 and d[2] == width else None


def _flat_consumer(g: _Graph, name: str, width: int) -> tuple[str, list[Any]] | None:
    """When the context ``name`` [batch, heads, seq, head_size] is only read by Transpose(0, 2, 1, 3) + Reshape to
    [batch, seq, heads * head_size]: that Reshape's output and the two nodes."""
    users = g.consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != "Transpose" or list(_attrs(users[0]).get("perm") or []) != [0, 2, 1, 3]:
        return None
    t = users[0]
    users = g.consumers.get(t.output[0], [])
    if len(users) != 1 or users[0].op_type != "Reshape" or users[0].input[0] != t.output[0]:
        return None
    d = g.dims.get(users[0].output[0])
    return (users[0].output[0], [t, users[0]]) if d is not None and len(d) == 3 and d[2] == width else None


def _projection(g: _Graph, name: str) -> tuple[str, str, str | None] | None:
    """(x, weight, bias) when ``name`` = x @ weight (+ bias), the weight a 2-d and the bias a 1-d initializer."""
    node, bias = g.producer.get(name), None
    if node is not None and node.op_type == "Add":
        for mm, b in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            b = g.init_of(b)
            if b is not None and len(g.inits[b].dims) == 1 and g.producer.get(mm) is not None \
                    and g.producer[mm].op_type == "MatMul":
                node, bias = g.producer[mm], b
                break
        else:
            return None
    weight = g.init_of(node.input[1]) if node is not None and node.op_type == "MatMul" else None
    if weight is None or len(g.inits[weight].dims) != 2:
        return None
    return node.input[0], weight, bias


def _packed_qkv(g: _Graph, srcs: list[str], prefix: str) -> tuple[str, list[Any], list[Any]] | None:
    """One [batch, seq, (heads + 2 kv heads) * head_size] tensor for the op's packed-QKV form: the input of the Split
    that made q, k and v, or one MatMul over the three projections' weights side by side (one pass over the layer's
    input instead of three); with the nodes and initializers to add.  None when q, k and v are made otherwise."""
    import numpy as np
    from onnx import helper, numpy_helper

    split = g.producer.get(srcs[0])
    if split is not None and split.op_type == "Split" and list(split.output) == srcs \
            and _attrs(split).get("axis") in (-1, 2) and g.rank(split.input[0]) == 3:
        return split.input[0], [], []
    parts = [_projection(g, name) for name in srcs]
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


def _match_layer(g: _Graph, past_k: str, past_v: str, present_k: str, present_v: str) -> dict[str, Any]:
    concat = {}
    for past, present in ((past_k, present_k), (past_v, present_v)):
        node = g.producer.get(present)
        if node is None or node.op_type != "Concat" or len(node.input) != 2 or node.input[0] != past \
                or _attrs(node).get("axis") not in (2, -2):
            raise NoMatch(f"{present} is not Concat({past}, new) on the sequence axis")
        concat[present] = node
    scores, k_scale = _follow_cache(g, present_k, transposed=True)
    context, v_scale = _follow_cache(g, present_v, transposed=False)
    if v_scale != 1.0:
        raise NoMatch("the values are scaled")
    # the query: back from the scores MatMul through scalar scaling
    q, q_scale = scores.input[0], 1.0
    for _ in range(4):
        node = g.producer.get(q)
        if node is None or node.op_type not in SCALE_OPS or len(g.users(q)) != 1:
            break
        for operand in node.input:
            factor = _scale_step(g, node, operand)
            if factor is not None:
                q_scale, q = q_scale * factor, operand
                break
        else:
            break
    if g.rank(q) != 4:
        raise NoMatch(f"the query {q} is not 4-d ({g.dims.get(q)})")
    # scores -> Softmax
    cur, s_scale = scores.output[0], 1.0
    for _ in range(12):
        node = _next(g, cur, f"the scores {cur}")
        if node.op_type == "Softmax":
            if _attrs(node).get("axis", -1) not in (-1, 3):
                raise NoMatch(f"{node.name} is not over the last axis")
            break
        factor = _scale_step(g, node, cur)
        if factor is not None:
            s_scale *= factor
        elif node.op_type == "Add":
            other = node.input[1] if node.input[0] == cur else node.input[0]
            d = g.dims.get(other)
            if d is None or len(d) != 4 or d[1] != 1:
                raise NoMatch(f"{node.name} adds {other} of shape {d}, not a [batch, 1, q, kv] mask")
        elif node.op_type == "Where":
            if cur not in node.input[1:] or node.input[0] == cur:
                raise NoMatch(f"{node.name} is not a masked fill of the scores")
        elif node.op_type not in ("Cast", "Identity"):
            raise NoMatch(f"the scores go through {node.op_type} {node.name}")
        cur = node.output[0]
    else:
        raise NoMatch("no Softmax after the scores")
    # Softmax -> context MatMul
    cur = node.output[0]
    for _ in range(8):
        node = _next(g, cur, f"the probabilities {cur}", besides="IsNaN")
        if node is context:
            if node.input[0] != cur:
                raise NoMatch(f"{cur} is not the left operand of {node.name}")
            break
        if node.op_type == "Where":
            cond = g.producer.get(node.input[0])
            if cond is None or cond.op_type != "IsNaN" or node.input[2] != cur:
                raise NoMatch(f"{node.name} is not a NaN guard")
        elif node.op_type not in ("Cast", "Identity", "Dropout"):
            raise NoMatch(f"the probabilities go through {node.op_type} {node.name}")
        cur = node.output[0]
    else:
        raise NoMatch("the probabilities do not reach the values' MatMul")
    out = context.output[0]
    if g.rank(out) != 4:
        raise NoMatch(f"the context {out} is not 4-d")
    return {"q": q, "k": concat[present_k].input[1], "v": concat[present_v].input[1], "context": out,
            "scale": q_scale * k_scale * s_scale, "remove": [concat[present_k], concat[present_v], context],
            "past": (past_k, past_v), "present": (present_k, present_v)}


def _rotary_tables(g: _Graph, cos: str, sin: str, rotary_dim: int, positions: int) -> tuple[Any, Any] | None:
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

    g = _Graph(model, dims)
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
            plans.append(_match_layer(g, past_k, past_v, present_k, present_v))
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
            rq, rk = _rotary_of(g, p["q"], head_size), _rotary_of(g, p["k"], head_size)
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
            found = _flat_source(g, p[role], n * head_size)
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
        out = _flat_consumer(g, p["context"], n_heads * head_size)
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
    from ..quantize import drop_dead, live_nodes

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
    undo = _Undo(model)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    skip_norms = _fuse_skip_rms_norms(model, dims)
    undo.dropped = drop_dead(graph)
    names = {o for n in graph.node for o in n.output}
    for v in list(graph.value_info):
        if v.name not in names:
            graph.value_info.remove(v)
    return {"attention": FUSED_OP, "layers": len(plans), "heads": int(n_heads), "kv_heads": int(kv_heads),
            "rotary_in_op": rotary_layers, "packed_qkv": packed_layers, "skip_rms_norms": skip_norms, "undo": undo}


def _fuse_skip_rms_norms(model: Any, dims: dict[str, list[Any]]) -> int:
    """Residual Add + RMSNorm (as Hugging Face writes it: ``w * (x / sqrt(mean(x ** 2) + eps))``, the residual sum
    also read by the next Add) -> one ``SkipSimplifiedLayerNormalization`` that returns both, as the builder writes
    it (onnxruntime fuses the norm alone, not the Add).  Returns how many were fused; the graph changes in place
    (the caller drops the dead nodes)."""
    from onnx import TensorProto, helper

    g = _Graph(model, dims)
    replace: dict[int, Any] = {}
    removed: set[int] = set()
    for pow_node in list(model.graph.node):
        if pow_node.op_type != "Pow" or g.scalar(pow_node.input[1]) != 2.0:
            continue
        x = pow_node.input[0]
        cast, r = g.producer.get(x), x
        if cast is not None and cast.op_type == "Cast":
            if _attrs(cast).get("to") != TensorProto.FLOAT or len(g.consumers.get(cast.input[0], [])) != 1:
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
        axes = None if node is None else (_attrs(node).get("axes") or
                                          (list(g.value(node.input[1]).reshape(-1)) if len(node.input) > 1
                                           and g.value(node.input[1]) is not None else None))
        if node is None or [int(a) for a in axes or []] not in ([-1], [2]) or _attrs(node).get("keepdims", 1) != 1:
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
            if _attrs(back).get("to") != TensorProto.FLOAT:
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


def _only_user(g: _Graph, name: str, op_type: str) -> Any:
    """The one op reading ``name`` when it is an ``op_type``, else None."""
    users = g.consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


class _Undo:
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


def fuse_checked(model: Any, original: Any, *, heads: int | None, vocab: int, positions: int | None = None
                 ) -> dict[str, Any]:
    """:func:`fuse`, then :func:`verify` against ``original`` (the exported graph: a path or a ModelProto); a graph
    whose logits differ is put back as it was, and tried once more with the rotary embedding left outside the op.
    Returns what :func:`fuse` did (without its undo), or why not."""
    from ..quantize import symbolic_dims

    dims = symbolic_dims(model)
    problem = reference = None
    for rotary_positions in dict.fromkeys((positions, None)):
        result = fuse(model, dims, heads, positions=rotary_positions)
        undo = result.pop("undo", None)
        if undo is None:
            return result
        try:
            reference = reference or reference_logits(original, vocab=vocab)  # the exported graph runs once
            problem = compare(model, reference)
        except Exception as exc:  # onnxruntime refused to run it: as much a mismatch as wrong logits
            problem = f"run failed ({str(exc).strip().splitlines()[0][:300]})"
        except BaseException:
            undo()
            raise
        if problem is None:
            return result
        undo()
        log.info("attention rewrite (rotary %s) rejected: %s", "in the op" if rotary_positions else "outside",
                 problem)
    return {"attention": "as exported", "reason": f"the rewritten graph's {problem}"}


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


def verify(original: Any, fused: Any, *, vocab: int, steps: int = 3, prompt: int = 5,
           rtol: float = 2e-3) -> str | None:
    """Run ``original`` and ``fused`` (ModelProtos, or paths) on the same random tokens: a prompt, then ``steps``
    single tokens; ``fused`` with its cache in one buffer larger than the sequence, past and present bound to it as
    the runtime does.  None when the logits agree, else what differs."""
    return compare(fused, reference_logits(original, vocab=vocab, steps=steps, prompt=prompt), rtol=rtol)


def reference_logits(original: Any, *, vocab: int, steps: int = 3, prompt: int = 5) -> tuple[list, list]:
    """The random token chunks of :func:`verify` (a prompt, then ``steps`` single tokens) and the last logits
    ``original`` gives after each, its cache fed back as it grows."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, max(2, vocab), size=prompt + steps).tolist()
    chunks = [ids[:prompt]] + [[t] for t in ids[prompt:]]
    s = _session(original)
    past = [i for i in s.get_inputs() if i.name.startswith("past_key_values.")]
    cache = {i.name: np.zeros(_cache_shape(i, 0), np.float32) for i in past}
    expected, n = [], 0
    for chunk in chunks:
        out = s.run(["logits"] + ["present" + i.name[len("past_key_values"):] for i in past],
                    {**_feeds(s, chunk, n), **cache})
        expected.append(out[0][0, -1])
        cache = {i.name: v for i, v in zip(past, out[1:])}
        n += len(chunk)
    return chunks, expected


def compare(fused: Any, reference: tuple[list, list], *, rtol: float = 2e-3) -> str | None:
    """Run ``fused`` on :func:`reference_logits`' chunks, its cache in one buffer larger than the sequence bound as
    past and present; None when its logits agree with the reference's, else what differs."""
    import numpy as np

    chunks, expected = reference
    s = _session(fused)
    vocab = len(expected[0])
    capacity = sum(len(c) for c in chunks) + 4
    buffers = {i.name: np.zeros(_cache_shape(i, capacity), np.float32) for i in s.get_inputs()
               if i.name.startswith("past_key_values.")}
    b = s.io_binding()
    for name, buf in buffers.items():
        b.bind_input(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        b.bind_output("present" + name[len("past_key_values"):], "cpu", 0, np.float32, list(buf.shape),
                      buf.ctypes.data)
    n = 0
    for step, chunk in enumerate(chunks):
        for k, v in _feeds(s, chunk, n).items():
            b.bind_cpu_input(k, v)
        logits = np.empty((1, len(chunk), vocab), np.float32)
        b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        s.run_with_iobinding(b)
        got = logits[0, -1]
        want = expected[step]
        err = float(np.max(np.abs(got - want)))
        if not np.isfinite(err) or err > rtol * max(1.0, float(np.max(np.abs(want)))):
            return f"logits differ by {err:.3g} at step {step} (largest logit {float(np.max(np.abs(want))):.3g})"
        n += len(chunk)
    return None


def _feeds(session: Any, chunk: list[int], n: int) -> dict[str, Any]:
    """input_ids, attention_mask (and position_ids where the graph takes them) for ``chunk`` after ``n`` tokens."""
    import numpy as np

    f = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, n + len(chunk)), np.int64)}
    if "position_ids" in {i.name for i in session.get_inputs()}:
        f["position_ids"] = np.arange(n, n + len(chunk), dtype=np.int64)[None]
    return f


def _cache_shape(arg: Any, n: int) -> list[int]:
    """A past_key_values input's shape for batch 1 and ``n`` positions (its named sizes are the free ones)."""
    return [1 if k == 0 else (n if isinstance(d, str) or not d else d) for k, d in enumerate(arg.shape)]


def _session(model: Any) -> Any:
    """An onnxruntime CPU session of ``model`` (a path, or a ModelProto: over protobuf's 2 GB limit it goes through
    a temporary file, removed once the session has read it)."""
    import shutil

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if isinstance(model, (str, Path)):
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    if model.ByteSize() < 2_000_000_000:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    folder = Path(tempfile.mkdtemp(prefix="edgelm-verify-"))
    try:
        onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        onnx.load_external_data_for_model(model, str(folder))  # saving moved the weights out of the caller's proto
        for t in model.graph.initializer:
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
        return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
