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

log = logging.getLogger("edgelm.converters.onnx")

from edgelm.formats.onnx_plain import SHARED_CACHE_OP

MS_DOMAIN, FUSED_OP = SHARED_CACHE_OP
HEAD_SIZE_MULTIPLE = 8  # onnxruntime's GroupQueryAttention refuses other head sizes
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
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

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


def _follow_cache(g: _Graph, start: str, *, transposed: bool) -> tuple[Any, float]:
    """From a present output, follow its single data path to the MatMul that reads it as the right operand; the
    scalar scale applied on the way.  ``transposed``: the path must swap the last two axes exactly once."""
    cur, scale, swaps = start, 1.0, 0
    for _ in range(16):
        users = g.users(cur)
        if len(users) != 1:
            raise NoMatch(f"{cur} feeds {len(users)} ops")
        node = users[0]
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
        users = g.users(cur)
        if len(users) != 1:
            raise NoMatch(f"the scores {cur} feed {len(users)} ops")
        node = users[0]
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
        users = [u for u in g.users(cur) if u.op_type != "IsNaN"]
        if len(users) != 1:
            raise NoMatch(f"the probabilities {cur} feed {len(users)} ops")
        node = users[0]
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


def fuse(model: Any, dims: dict[str, list[Any]], heads: int | None = None) -> dict[str, Any]:
    """Rewrite every layer's attention of ``model`` (in place) into GroupQueryAttention; returns what was done:
    ``{"attention": "GroupQueryAttention", "layers": n}``, or ``{"attention": "as exported", "reason": ...}`` with
    the graph unchanged.  ``dims``: the symbolic shape of every tensor (``onnx_quantize.symbolic_dims``); ``heads``:
    the query head count when the graph does not tell it."""
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
    removed = set()
    for i, p in enumerate(plans):
        pre = f"edgelm_gqa/{i}"
        flat = []
        for role in ("q", "k", "v"):
            new.append(helper.make_node("Transpose", [p[role]], [f"{pre}/{role}_bsnh"], perm=[0, 2, 1, 3],
                                        name=f"{pre}/{role}/Transpose"))
            new.append(helper.make_node("Reshape", [f"{pre}/{role}_bsnh", "edgelm_gqa_bsd"], [f"{pre}/{role}_bsd"],
                                        name=f"{pre}/{role}/Reshape"))
            flat.append(f"{pre}/{role}_bsd")
        new.append(helper.make_node(
            FUSED_OP, [*flat, *p["past"], "edgelm_gqa_seqlens_k", "edgelm_gqa_total"],
            [f"{pre}/out", *p["present"]], domain=MS_DOMAIN, name=f"{pre}/{FUSED_OP}", num_heads=int(n_heads),
            kv_num_heads=int(kv_heads), scale=float(p["scale"])))
        new.append(helper.make_node("Reshape", [f"{pre}/out", "edgelm_gqa_bsnh"], [f"{pre}/out_bsnh"],
                                    name=f"{pre}/out/Reshape"))
        new.append(helper.make_node("Transpose", [f"{pre}/out_bsnh"], [p["context"]], perm=[0, 2, 1, 3],
                                    name=f"{pre}/out/Transpose"))
        removed.update(id(n) for n in p["remove"])
    from .onnx_quantize import drop_dead, live_nodes

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
    undo.dropped = drop_dead(graph)
    names = {o for n in graph.node for o in n.output}
    for v in list(graph.value_info):
        if v.name not in names:
            graph.value_info.remove(v)
    return {"attention": FUSED_OP, "layers": len(plans), "heads": int(n_heads), "kv_heads": int(kv_heads),
            "undo": undo}


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
        g.initializer.extend(self.dropped)


def fuse_checked(model: Any, original: Any, *, heads: int | None, vocab: int) -> dict[str, Any]:
    """:func:`fuse`, then :func:`verify` against ``original`` (the exported graph: a path or a ModelProto); a graph
    whose logits differ is put back as it was.  Returns what :func:`fuse` did (without its undo), or why not."""
    from .onnx_quantize import symbolic_dims

    result = fuse(model, symbolic_dims(model), heads)
    undo = result.pop("undo", None)
    if undo is None:
        return result
    try:
        problem = verify(original, model, vocab=vocab)
    except BaseException:
        undo()
        raise
    if problem:
        undo()
        return {"attention": "as exported", "reason": f"the rewritten graph's {problem}"}
    return result


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
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, max(2, vocab), size=prompt + steps).tolist()
    chunks = [ids[:prompt]] + [[t] for t in ids[prompt:]]

    def feeds(s: Any, chunk: list[int], n: int) -> dict[str, Any]:
        names = {i.name for i in s.get_inputs()}
        f = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, n + len(chunk)), np.int64)}
        if "position_ids" in names:
            f["position_ids"] = np.arange(n, n + len(chunk), dtype=np.int64)[None]
        return f

    s = _session(original)
    past = [i for i in s.get_inputs() if i.name.startswith("past_key_values.")]
    shape = lambda i, n: [1 if k == 0 else (n if isinstance(d, str) or not d else d)  # noqa: E731
                          for k, d in enumerate(i.shape)]
    cache = {i.name: np.zeros(shape(i, 0), np.float32) for i in past}
    expected, n = [], 0
    for chunk in chunks:
        out = s.run(["logits"] + ["present" + i.name[len("past_key_values"):] for i in past],
                    {**feeds(s, chunk, n), **cache})
        expected.append(out[0][0, -1])
        cache = {i.name: v for i, v in zip(past, out[1:])}
        n += len(chunk)
    del s
    s = _session(fused)
    capacity = len(ids) + 4
    buffers = {i.name: np.zeros(shape(i, capacity), np.float32) for i in past}
    b = s.io_binding()
    for name, buf in buffers.items():
        b.bind_input(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        b.bind_output("present" + name[len("past_key_values"):], "cpu", 0, np.float32, list(buf.shape),
                      buf.ctypes.data)
    n = 0
    for step, chunk in enumerate(chunks):
        for k, v in feeds(s, chunk, n).items():
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
