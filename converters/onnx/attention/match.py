"""Finding one layer's attention in a plain decoder graph, by following the data flow from its ``present.*`` cache
outputs (not by op names, which differ between architectures); and the pieces around it the rewrite can fold in:
Hugging Face's rotary embedding, the ``[batch, seq, hidden]`` tensors q, k and v were reshaped from, the projections
that made them, and the reshape that flattens the context again.

Every function only reads the graph (through a :class:`~.index.GraphIndex`); :func:`match_layer` raises
:class:`~.index.NoMatch` saying where a layer differs from the pattern, the others return None.
"""

from __future__ import annotations

from itertools import permutations
from typing import Any

from .index import GraphIndex, NoMatch, attrs

ROTARY_HALF_MULTIPLE = 8  # GroupQueryAttention refuses rotary tables (rotary_dim / 2 wide) of other widths
LAYOUT_OPS = {"Unsqueeze", "Expand", "Reshape", "Cast", "Identity"}
SCALE_OPS = {"Mul", "Div"}


def _scale_step(g: GraphIndex, node: Any, cur: str) -> float | None:
    """The factor a Mul/Div by a scalar constant applies to ``cur``, or None when ``node`` is not one."""
    if node.op_type not in SCALE_OPS or len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == cur else node.input[0]
    c = g.scalar(other)
    if c is None or (node.op_type == "Div" and node.input[0] != cur) or c == 0:
        return None
    return c if node.op_type == "Mul" else 1.0 / c


def _next(g: GraphIndex, name: str, what: str, besides: str | None = None) -> Any:
    """The one op that reads ``name`` (shape reads and ``besides`` ops aside); NoMatch naming ``what`` otherwise."""
    users = [u for u in g.users(name) if u.op_type != besides]
    if len(users) != 1:
        raise NoMatch(f"{what} feeds {len(users)} ops")
    return users[0]


def _follow_cache(g: GraphIndex, start: str, *, transposed: bool) -> tuple[Any, float]:
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
            perm = list(attrs(node).get("perm") or [])
            if perm != [0, 1, 3, 2]:
                raise NoMatch(f"{node.name} permutes {perm}")
            swaps += 1
        elif node.op_type not in LAYOUT_OPS or node.input[0] != cur:
            raise NoMatch(f"{cur} goes through {node.op_type} {node.name}")
        cur = node.output[0]
    raise NoMatch(f"{start}: no MatMul within 16 ops")


def _slice_of(g: GraphIndex, name: str) -> tuple[str, int, int] | None:
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


def _rotate_half_of(g: GraphIndex, name: str) -> tuple[str, int] | None:
    """(x, half) when ``name`` = Concat(-x[..., half:], x[..., :half]) on the last axis (Hugging Face's rotate_half)."""
    node = g.producer.get(name)
    if node is None or node.op_type != "Concat" or len(node.input) != 2 or attrs(node).get("axis") not in (-1, 3):
        return None
    neg = g.producer.get(node.input[0])
    if neg is None or neg.op_type != "Neg":
        return None
    upper, lower = _slice_of(g, neg.input[0]), _slice_of(g, node.input[1])
    if upper is None or lower is None or upper[0] != lower[0] or lower[1] != 0 or upper[1] != lower[2] \
            or upper[2] < 2 * lower[2]:
        return None
    return upper[0], lower[2]


def rotary_of(g: GraphIndex, name: str, head_size: int) -> dict[str, Any] | None:
    """When ``name`` is Hugging Face's rotary embedding of a tensor x (``x * cos + rotate_half(x) * sin`` on its first
    ``rotary_dim`` channels, the rest passed through): x, the cos and sin tensors, rotary_dim; else None."""
    rot, x_full, rotary_dim = name, None, None
    node = g.producer.get(name)
    if node is not None and node.op_type == "Concat" and len(node.input) == 2 and attrs(node).get("axis") in (-1, 3):
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


def flat_source(g: GraphIndex, name: str, width: int) -> tuple[str, float] | None:
    """The [batch, seq, heads * head_size] tensor ``name`` was made from by Reshape + Transpose(0, 2, 1, 3), if so,
    and the scalar it was multiplied by on the way (OPT scales the query before splitting the heads), else None."""
    t = g.producer.get(name)
    if t is None or t.op_type != "Transpose" or list(attrs(t).get("perm") or []) != [0, 2, 1, 3]:
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


def flat_consumer(g: GraphIndex, name: str, width: int) -> tuple[str, list[Any]] | None:
    """When the context ``name`` [batch, heads, seq, head_size] is only read by Transpose(0, 2, 1, 3) + Reshape to
    [batch, seq, heads * head_size]: that Reshape's output and the two nodes."""
    users = g.consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != "Transpose" or list(attrs(users[0]).get("perm") or []) != [0, 2, 1, 3]:
        return None
    t = users[0]
    users = g.consumers.get(t.output[0], [])
    if len(users) != 1 or users[0].op_type != "Reshape" or users[0].input[0] != t.output[0]:
        return None
    d = g.dims.get(users[0].output[0])
    return (users[0].output[0], [t, users[0]]) if d is not None and len(d) == 3 and d[2] == width else None


def projection(g: GraphIndex, name: str) -> tuple[str, str, str | None] | None:
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


def match_layer(g: GraphIndex, past_k: str, past_v: str, present_k: str, present_v: str) -> dict[str, Any]:
    """One layer's attention between its cache input/output pairs: the query, the new key and value (what the
    Concat appends), the context output, the scale of the scores (query, key and score scalings together), the nodes
    the op replaces and the cache names.  NoMatch saying where the layer differs from the pattern."""
    concat = {}
    for past, present in ((past_k, present_k), (past_v, present_v)):
        node = g.producer.get(present)
        if node is None or node.op_type != "Concat" or len(node.input) != 2 or node.input[0] != past \
                or attrs(node).get("axis") not in (2, -2):
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
            if attrs(node).get("axis", -1) not in (-1, 3):
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
