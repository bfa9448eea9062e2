"""The static-shape decoder graph of ``--target npu``: one Llama-family decoder written op by op with fixed shapes.

Why a graph of its own instead of the builder's: NPU compilers (QNN HTP, OpenVINO NPU, VitisAI) take no dynamic
dimension, no GroupQueryAttention / MatMulNBits / RotaryEmbedding contrib op and no int64 arithmetic.  Written
here from the checkpoint's tensors, every op is one the EP rule tables list (platforms/ep_rules/*.json):
Gather, SimplifiedLayerNormalization (RMSNorm as one op: split into x², mean and rsqrt it loses too much once
quantized), MatMul, Reshape, Transpose, Split, Neg, Concat, Mul, Add, Sigmoid, Softmax, Tile, Unsqueeze.  The I/O
contract is :mod:`edgelm.formats.static_pair`'s.  The graph is built as a :class:`Graph` (nodes and numpy
initializers), which :mod:`.qdq` quantizes and :func:`write_pair` serializes with one shared weight file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import UnsupportedModelError
from edgelm.formats import static_pair

# Hugging Face architectures this graph writes (plain Llama blocks: no attention bias, no q/k norms)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
OPSET = 21  # uint16 QuantizeLinear/DequantizeLinear are standard ONNX from opset 21


@dataclass
class Spec:
    """The decoder's shape, from config.json."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float
    tied: bool

    @classmethod
    def of(cls, config: dict[str, Any], source: Path) -> "Spec":
        arch = config["architectures"][0]
        if arch not in ARCHITECTURES or config.get("attention_bias") or config.get("mlp_bias"):
            raise UnsupportedModelError(
                f"The NPU export writes Llama-family decoders ({', '.join(ARCHITECTURES)}, no biases); {source} is "
                f"{arch}.", fix="Convert without --target npu, or to GGUF.", architecture=arch, path=str(source))
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise UnsupportedModelError(f"The NPU export writes plain rotary embeddings; {source} uses "
                                        f"{rope.get('rope_type')!r} scaling.", fix="Convert without --target npu.",
                                        architecture=arch, path=str(source))
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_size=int(config.get("head_dim") or hidden // heads),
                   intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                   eps=float(config.get("rms_norm_eps") or 1e-6),
                   rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
                   tied=bool(config.get("tie_word_embeddings", False)))


def load_weights(source: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32 numpy (bf16/fp16 checkpoints read through torch)."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for path in sorted(source.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).float().numpy()
    return out


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """A graph under construction: nodes in order, numpy initializers, graph I/O as (name, elem type, shape)."""

    name: str
    nodes: list[Node] = field(default_factory=list)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[tuple[str, int, list[int]]] = field(default_factory=list)
    outputs: list[tuple[str, int, list[int]]] = field(default_factory=list)
    weights: set[str] = field(default_factory=set)  # MatMul weight matrices [in, out] (quantized per channel)
    int4: set[str] = field(default_factory=set)  # initializers held as int8 numpy arrays, stored as ONNX INT4

    def add(self, op: str, inputs: list[str], name: str, n_out: int = 1, **attrs: Any) -> Any:
        outs = [name] if n_out == 1 else [f"{name}:{k}" for k in range(n_out)]
        self.nodes.append(Node(op, inputs, outs, name, attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, value: Any, dtype: Any = np.int64) -> str:
        if name not in self.initializers:
            self.initializers[name] = np.asarray(value, dtype=dtype)
        return name


def rope_tables(spec: Spec, positions: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, spec.head_size, 2, dtype=np.float64) / spec.head_size))
    freqs = np.outer(np.arange(positions, dtype=np.float64), inv)
    emb = np.concatenate([freqs, freqs], axis=1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def shared_initializers(spec: Spec, weights: dict[str, np.ndarray], context: int) -> dict[str, np.ndarray]:
    """The initializers both graphs read, by name: MatMul weights as [in, out] (the attention scale folded into the
    query projection), norms, rotary tables, embedding and output head."""
    out: dict[str, np.ndarray] = {}
    embed = weights["model.embed_tokens.weight"]
    out["embed_tokens"] = embed
    head = embed if spec.tied or "lm_head.weight" not in weights else weights["lm_head.weight"]
    out["lm_head"] = np.ascontiguousarray(head.T)
    out["rope_cos"], out["rope_sin"] = rope_tables(spec, context)
    scale = 1.0 / np.sqrt(spec.head_size)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out[f"l{i}.input_norm"] = weights[p + "input_layernorm.weight"]
        out[f"l{i}.post_norm"] = weights[p + "post_attention_layernorm.weight"]
        out[f"l{i}.q_proj"] = np.ascontiguousarray(weights[p + "self_attn.q_proj.weight"].T * scale)
        for name, key in (("k_proj", "self_attn.k_proj"), ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
                          ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"), ("down_proj", "mlp.down_proj")):
            out[f"l{i}.{name}"] = np.ascontiguousarray(weights[p + key + ".weight"].T)
    out["final_norm"] = weights["model.norm.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


MATMUL_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(spec: Spec, shared: dict[str, np.ndarray], ar: int, context: int) -> Graph:
    """The AR-``ar`` graph (fp32) over the ``shared`` initializers."""
    from onnx import TensorProto as T

    g = Graph(f"decoder_ar{ar}")
    g.initializers.update(shared)
    g.weights = {f"l{i}.{w}" for i in range(spec.layers) for w in MATMUL_WEIGHTS} | {"lm_head"}
    nh, nkv, hd = spec.heads, spec.kv_heads, spec.head_size
    group = nh // nkv
    total = context + ar
    g.inputs = [("input_ids", T.INT32, [1, ar]), ("position_ids", T.INT32, [1, ar]),
                ("attention_mask", T.FLOAT, [1, 1, ar, total])]
    for i in range(spec.layers):
        g.inputs += [(f"past_key.{i}", T.FLOAT, [1, nkv, hd, context]),
                     (f"past_value.{i}", T.FLOAT, [1, nkv, context, hd])]
    g.outputs = [("logits", T.FLOAT, [1, ar, spec.vocab])]
    ax1 = g.const("axes_1", [1])
    x = g.add("Gather", ["embed_tokens", "input_ids"], "embed")
    cos = g.add("Unsqueeze", [g.add("Gather", ["rope_cos", "position_ids"], "rope.cos_rows"), ax1], "rope.cos")
    sin = g.add("Unsqueeze", [g.add("Gather", ["rope_sin", "position_ids"], "rope.sin_rows"), ax1], "rope.sin")
    mask = g.add("Tile", ["attention_mask", g.const("mask_repeats", [1, 1, group, 1])], "mask.tiled")
    halves = g.const("rope_halves", [hd // 2, hd // 2])
    heads_shape = g.const("shape_heads", [1, ar, nh, hd])
    kv_shape = g.const("shape_kv_heads", [1, ar, nkv, hd])
    grouped = g.const("shape_grouped", [1, nkv, group * ar, hd])
    ungrouped = g.const("shape_ungrouped", [1, nh, ar, hd])
    flat = g.const("shape_flat", [1, ar, nh * hd])

    def rope(t: str, name: str) -> str:
        x1, x2 = g.add("Split", [t, halves], f"{name}.split", n_out=2, axis=-1)
        rotated = g.add("Concat", [g.add("Neg", [x2], f"{name}.neg"), x1], f"{name}.rotated", axis=-1)
        return g.add("Add", [g.add("Mul", [t, cos], f"{name}.cos"), g.add("Mul", [rotated, sin], f"{name}.sin")],
                     name)

    for i in range(spec.layers):
        p = f"l{i}"
        h = g.add("SimplifiedLayerNormalization", [x, f"{p}.input_norm"], f"{p}.input_norm.out", axis=-1,
                  epsilon=spec.eps, stash_type=1)
        q = g.add("Transpose", [g.add("Reshape", [g.add("MatMul", [h, f"{p}.q_proj"], f"{p}.q"), heads_shape],
                                      f"{p}.q.heads")], f"{p}.q.bnsh", perm=[0, 2, 1, 3])
        q = g.add("Reshape", [rope(q, f"{p}.q.rope"), grouped], f"{p}.q.grouped")
        k = g.add("Transpose", [g.add("Reshape", [g.add("MatMul", [h, f"{p}.k_proj"], f"{p}.k"), kv_shape],
                                      f"{p}.k.heads")], f"{p}.k.bnsh", perm=[0, 2, 1, 3])
        k = g.add("Transpose", [rope(k, f"{p}.k.rope")], f"present_key.{i}", perm=[0, 1, 3, 2])
        v = g.add("Transpose", [g.add("Reshape", [g.add("MatMul", [h, f"{p}.v_proj"], f"{p}.v"), kv_shape],
                                      f"{p}.v.heads")], f"present_value.{i}", perm=[0, 2, 1, 3])
        g.outputs += [(f"present_key.{i}", T.FLOAT, [1, nkv, hd, ar]), (f"present_value.{i}", T.FLOAT, [1, nkv, ar, hd])]
        keys = g.add("Concat", [f"past_key.{i}", k], f"{p}.keys", axis=3)
        values = g.add("Concat", [f"past_value.{i}", v], f"{p}.values", axis=2)
        scores = g.add("Add", [g.add("MatMul", [q, keys], f"{p}.scores"), mask], f"{p}.scores.masked")
        probs = g.add("Softmax", [scores], f"{p}.probs", axis=-1)
        attn = g.add("Reshape", [g.add("MatMul", [probs, values], f"{p}.attn"), ungrouped], f"{p}.attn.heads")
        attn = g.add("Reshape", [g.add("Transpose", [attn], f"{p}.attn.bsnh", perm=[0, 2, 1, 3]), flat],
                     f"{p}.attn.flat")
        x = g.add("Add", [x, g.add("MatMul", [attn, f"{p}.o_proj"], f"{p}.o")], f"{p}.attn.residual")
        h = g.add("SimplifiedLayerNormalization", [x, f"{p}.post_norm"], f"{p}.post_norm.out", axis=-1,
                  epsilon=spec.eps, stash_type=1)
        gate = g.add("MatMul", [h, f"{p}.gate_proj"], f"{p}.gate")
        act = g.add("Mul", [gate, g.add("Sigmoid", [gate], f"{p}.gate.sigmoid")], f"{p}.gate.silu")
        act = g.add("Mul", [act, g.add("MatMul", [h, f"{p}.up_proj"], f"{p}.up")], f"{p}.mlp.act")
        x = g.add("Add", [x, g.add("MatMul", [act, f"{p}.down_proj"], f"{p}.down")], f"{p}.mlp.residual")
    h = g.add("SimplifiedLayerNormalization", [x, "final_norm"], "final_norm.out", axis=-1, epsilon=spec.eps,
              stash_type=1)
    g.add("MatMul", [h, "lm_head"], "logits")
    return g


def to_proto(g: Graph, *, external: dict[str, tuple[int, int]] | None = None, location: str = "") -> Any:
    """The ModelProto of ``g``; initializers named in ``external`` (name -> (offset, length) in ``location``) are
    left as references to the shared weight file instead of carrying their data."""
    import onnx
    from onnx import helper, numpy_helper

    external = external or {}
    inits = []
    for name, arr in g.initializers.items():
        if name in g.int4 and name not in external:
            inits.append(helper.make_tensor(name, onnx.TensorProto.INT4, list(arr.shape), arr.flatten().tolist()))
        elif name in external:
            t = onnx.TensorProto(name=name, dims=list(arr.shape),
                                 data_type=onnx.TensorProto.INT4 if name in g.int4 else
                                 helper.np_dtype_to_tensor_dtype(arr.dtype))
            t.data_location = onnx.TensorProto.EXTERNAL
            offset, length = external[name]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
        else:
            inits.append(numpy_helper.from_array(arr, name))
    nodes = [helper.make_node(n.op, n.inputs, n.outputs, name=n.name, **n.attrs) for n in g.nodes]
    graph = helper.make_graph(nodes, g.name, [helper.make_tensor_value_info(*i) for i in g.inputs],
                              [helper.make_tensor_value_info(*o) for o in g.outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10,
                             producer_name="edgelm")


# initializers at least this large go to the shared weight file; the rest (shapes, scales) stay in each graph
EXTERNAL_MIN_BYTES = 1024


def write_pair(folder: Path, graphs: dict[str, Graph]) -> dict[str, Any]:
    """Write each graph (file name -> Graph) into ``folder``; initializers with the same name and bytes are stored
    once in the shared weight file.  Returns {"weights_file", "weights_bytes"}."""
    import onnx

    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    with open(folder / static_pair.WEIGHTS_FILE, "wb") as f:
        for g in graphs.values():
            for name, arr in g.initializers.items():
                if arr.nbytes < EXTERNAL_MIN_BYTES or name in offsets:
                    continue
                pad = (-position) % 64  # aligned, so onnxruntime can map it
                f.write(b"\0" * pad)
                position += pad
                data = pack_int4(arr) if name in g.int4 else np.ascontiguousarray(arr).tobytes()
                f.write(data)
                offsets[name] = (position, len(data))
                position += len(data)
    for file_name, g in graphs.items():
        external = {n: offsets[n] for n, a in g.initializers.items() if n in offsets}
        for n in external:
            if n not in g.int4 and g.initializers[n].nbytes != external[n][1]:
                raise ValueError(f"initializer {n} differs between the graphs")
        onnx.save(to_proto(g, external=external, location=static_pair.WEIGHTS_FILE), str(folder / file_name))
    return {"weights_file": static_pair.WEIGHTS_FILE, "weights_bytes": position}


def pack_int4(arr: np.ndarray) -> bytes:
    """ONNX INT4 storage: two values per byte, the first in the low nibble."""
    flat = (np.ascontiguousarray(arr).reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def io_record(g: Graph) -> dict[str, Any]:
    """The manifest's record of a graph's I/O: name -> {shape, type}."""
    from onnx import helper

    def rec(items: list[tuple[str, int, list[int]]]) -> dict[str, Any]:
        return {n: {"shape": s, "type": str(np.dtype(helper.tensor_dtype_to_np_dtype(t)))} for n, t, s in items}

    return {"inputs": rec(g.inputs), "outputs": rec(g.outputs)}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"
