"""QDQ quantization of the static pair (:mod:`.static`): calibration ranges, encodings, and Quantize/Dequantize nodes.

Written here instead of onnxruntime's ``quantize_static`` because the pair needs things that tool does not
guarantee: the same encodings in both graphs (they share the host's KV window, so the prefill graph's KV codes must
mean what the decode graph reads), an 8-bit symmetric KV cache held as uint8 graph I/O, and encodings that travel
unchanged through data-movement ops (Reshape, Transpose, Concat of equal encodings, Gather from a table), which
an NPU compiler folds instead of requantizing.  The recipe (the QNN HTP one):

* activations: uint16, asymmetric, per tensor, from the calibration min/max (0 always representable);
  Softmax outputs [0, 1]; the attention mask [MASK_VALUE, 0].
* KV cache (each layer's new keys and values, and the window they join): uint8, symmetric (zero point 128).
* MatMul weights and the output head: uint8 symmetric per output channel (w8), or int4 symmetric per output channel
  from GPTQ (w4); the embedding table, norms and rotary tables: uint16 per tensor.

Only unsigned types on MatMul inputs: (uint16, uint8) for weights, (uint16, uint8) for scores x keys and
probabilities x values, which are the pairs HTP's MatMul takes (platforms/ep_rules/qnn-htp.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from edgelm.formats import static_pair

from .static import Graph, Node, to_proto

# ops whose output holds (a subset of) the values of their first input: the output keeps its encoding
PASS_THROUGH = ("Reshape", "Transpose", "Unsqueeze", "Tile", "Split", "Gather")


@dataclass(frozen=True)
class Encoding:
    scale: Any  # float, or a per-channel array
    zero_point: Any
    dtype: Any  # numpy dtype of the codes (uint8, uint16) or "int4"
    axis: int | None = None

    def record(self) -> dict[str, Any]:
        if self.axis is not None:
            return {"type": str(self.dtype), "axis": self.axis, "channels": int(np.size(self.scale))}
        return {"type": str(np.dtype(self.dtype)), "scale": float(self.scale), "zero_point": int(self.zero_point)}


def asymmetric(lo: float, hi: float, dtype: Any = np.uint16) -> Encoding:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = np.iinfo(dtype).max
    scale = max((hi - lo) / qmax, 1e-8)
    zp = int(np.clip(round(-lo / scale), 0, qmax))
    return Encoding(np.float32(scale), zp, np.dtype(dtype))


def symmetric_u8(absmax: float) -> Encoding:
    return Encoding(np.float32(max(float(absmax), 1e-8) / 127.0), 128, np.dtype(np.uint8))


def quantize_array(x: np.ndarray, enc: Encoding) -> np.ndarray:
    info = np.iinfo(enc.dtype)
    scale = enc.scale if enc.axis is None else np.expand_dims(enc.scale, tuple(i for i in range(x.ndim)
                                                                                if i != enc.axis))
    zp = enc.zero_point if enc.axis is None else np.expand_dims(np.asarray(enc.zero_point, np.float32),
                                                                tuple(i for i in range(x.ndim) if i != enc.axis))
    return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(enc.dtype)


def per_channel_u8(w: np.ndarray) -> tuple[np.ndarray, Encoding]:
    """Symmetric 8-bit per output channel of a [in, out] weight, stored as uint8 around 128."""
    scale = (np.maximum(np.abs(w).max(axis=0), 1e-8) / 127.0).astype(np.float32)
    codes = (np.clip(np.round(w / scale), -127, 127) + 128).astype(np.uint8)
    return codes, Encoding(scale, np.full(w.shape[1], 128, np.uint8), np.dtype(np.uint8), axis=1)


# --- calibration -------------------------------------------------------------------------------------------------

def float_tensors(g: Graph) -> list[str]:
    """The float tensors whose ranges the encodings need: every node output except those of PASS_THROUGH ops
    (they keep their input's encoding) and Softmax (fixed [0, 1])."""
    return [o for n in g.nodes if n.op not in PASS_THROUGH and n.op != "Softmax" for o in n.outputs]


def calibrate(g: Graph, windows: Iterable[Sequence[int]], shape: static_pair.PairShape, ar: int,
              session: Callable[[bytes, list[str]], Any], progress: Callable[[int], None] | None = None
              ) -> dict[str, tuple[float, float]]:
    """min/max of every float tensor of the fp32 AR-``ar`` graph ``g`` over the token ``windows``, each evaluated
    from an empty KV window in chunks of ``ar`` (so attention sees real context).  ``session(model_bytes,
    outputs)`` returns a callable ``run(feeds) -> list of arrays`` (onnxruntime, CPU)."""
    from onnx import TensorProto, helper

    names = [n for n in float_tensors(g) if n not in {o[0] for o in g.outputs}]  # present_* come anyway
    proto = to_proto(g)
    proto.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    wanted = [o[0] for o in g.outputs] + names
    run = session(proto.SerializeToString(), wanted)
    del proto
    ranges: dict[str, tuple[float, float]] = {}
    window = static_pair.KVWindow(shape, np.float32, (ar,))
    done = 0
    for tokens in windows:
        window.length = 0
        for start in range(0, len(tokens) - ar + 1, ar):  # whole chunks only: padding rows would skew the ranges
            window.prepare(tokens[start:start + ar], ar)
            outs = run(window.feeds(ar))
            for name, value in zip(wanted, outs):
                lo, hi = float(value.min()), float(value.max())
                old = ranges.get(name)
                ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            for i in range(shape.layers):
                window.new_keys[ar][i][...] = outs[1 + 2 * i]
                window.new_values[ar][i][...] = outs[2 + 2 * i]
            window.commit(ar, ar)
        done += 1
        if progress:
            progress(done)
    return ranges


# --- encodings and the QDQ graph ---------------------------------------------------------------------------------

def kv_encodings(ranges: dict[str, tuple[float, float]], layers: int) -> dict[str, Encoding]:
    """Symmetric uint8 per layer for keys and values (the window's past_* inputs take the same)."""
    out = {}
    for i in range(layers):
        for kind in ("key", "value"):
            lo, hi = ranges[f"present_{kind}.{i}"]
            enc = symmetric_u8(max(abs(lo), abs(hi)))
            out[f"present_{kind}.{i}"] = out[f"past_{kind}.{i}"] = enc
    return out


def encodings(g: Graph, ranges: dict[str, tuple[float, float]], layers: int) -> dict[str, Encoding]:
    """The encoding of every float tensor of ``g`` (inputs, initializers other than MatMul weights, node outputs)."""
    enc: dict[str, Encoding] = dict(kv_encodings(ranges, layers))
    enc["attention_mask"] = asymmetric(static_pair.MASK_VALUE, 0.0)
    for name, arr in g.initializers.items():
        if arr.dtype == np.float32 and name not in g.weights:
            enc[name] = asymmetric(arr.min(), arr.max())
    for n in g.nodes:
        first = enc.get(n.inputs[0]) if n.inputs else None
        for out in n.outputs:
            if out in enc:
                continue
            if n.op in PASS_THROUGH and first is not None:
                enc[out] = first
            elif n.op == "Concat" and all(enc.get(i) == first for i in n.inputs):
                enc[out] = first  # type: ignore[assignment]
            elif n.op == "Softmax":
                enc[out] = asymmetric(0.0, 1.0)
            else:
                enc[out] = asymmetric(*ranges[out])
    return enc


def quantize(g: Graph, enc: dict[str, Encoding], weight_codes: dict[str, tuple[np.ndarray, Encoding]]) -> Graph:
    """The QDQ graph of the fp32 ``g``: every float tensor goes through QuantizeLinear -> DequantizeLinear with its
    encoding, weights are stored as codes with a DequantizeLinear, the KV inputs and outputs are uint8."""
    from onnx import TensorProto as T

    q = Graph(g.name + "_qdq")
    q.weights = set()
    use: dict[str, str] = {}  # fp32 tensor name -> the name its consumers read in the QDQ graph

    def params(name: str, e: Encoding) -> tuple[str, str]:
        s, z = f"{name}.scale", f"{name}.zero_point"
        if e.axis is None:
            q.initializers[s] = np.asarray(e.scale, np.float32)
            q.initializers[z] = np.asarray(e.zero_point, dtype=e.dtype)
        else:
            q.initializers[s] = np.asarray(e.scale, np.float32)
            q.initializers[z] = np.asarray(e.zero_point)
        return s, z

    def dq(codes: str, name: str, e: Encoding, out: str) -> None:
        s, z = params(name, e)
        attrs = {"axis": e.axis} if e.axis is not None else {}
        q.nodes.append(_node("DequantizeLinear", [codes, s, z], out, f"{name}.dequantize", **attrs))
        use[name] = out

    def qdq(raw: str, name: str, e: Encoding, codes: str | None = None, out: str | None = None) -> None:
        s, z = params(name, e)
        codes = codes or f"{name}.q"
        q.nodes.append(_node("QuantizeLinear", [raw, s, z], codes, f"{name}.quantize"))
        q.nodes.append(_node("DequantizeLinear", [codes, s, z], out or f"{name}.dq", f"{name}.dequantize"))
        use[name] = out or f"{name}.dq"

    for name, arr in g.initializers.items():
        if name in weight_codes:
            codes, e = weight_codes[name]
            q.initializers[f"{name}.codes"] = codes
            dq(f"{name}.codes", name, e, f"{name}.dq")
            if e.dtype == "int4":
                q.int4 |= {f"{name}.codes", f"{name}.zero_point"}
        elif arr.dtype == np.float32:
            e = enc[name]
            q.initializers[f"{name}.codes"] = quantize_array(arr, e)
            dq(f"{name}.codes", name, e, f"{name}.dq")
        else:
            q.initializers[name] = arr
            use[name] = name
    kv_in = {n for n, _, _ in g.inputs if n.startswith("past_")}
    for name, elem, shape in g.inputs:
        if name in kv_in:
            q.inputs.append((name, T.UINT8, shape))
            dq(name, name, enc[name], f"{name}.dq")
        elif elem == T.FLOAT:
            q.inputs.append((name, elem, shape))
            qdq(name, name, enc[name])
        else:
            q.inputs.append((name, elem, shape))
            use[name] = name
    kv_out = {n for n, _, _ in g.outputs if n.startswith("present_")}
    for n in g.nodes:
        raw = [f"{o}.f" for o in n.outputs]
        node = _node(n.op, [use[i] for i in n.inputs], raw[0], f"{n.name}.op", **n.attrs)
        node.outputs = raw
        q.nodes.append(node)
        for o, r in zip(n.outputs, raw):
            if o in kv_out:
                qdq(r, o, enc[o], codes=o, out=f"{o}.dq")
            elif o == "logits":
                qdq(r, o, enc[o], out="logits")
            else:
                qdq(r, o, enc[o])
    for name, elem, shape in g.outputs:
        q.outputs.append((name, T.UINT8 if name in kv_out else elem, shape))
    return q


def _node(op: str, inputs: list[str], output: str, name: str | None = None, **attrs: Any) -> Any:
    return Node(op, inputs, [output], name or output, attrs)
