"""The attention rewrite of plain decoder graphs into onnxruntime's GroupQueryAttention (converters/onnx/attention/)
and the session loop's shared cache buffer (runtimes/onnx_session.py), on a small decoder graph written here the way
optimum exports attention: ``present = Concat(past, new)``, the keys and values repeated per query head
(Unsqueeze / Expand / Reshape), scaled scores, an additive causal + padding mask built from ``attention_mask``,
Softmax with a NaN guard, and the values' MatMul.  The real optimum exports (GPT-2, GPT-NeoX, OPT, Falcon, SmolLM2)
are the slow tests of test_optimum.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.converters.onnx import attention as onnx_attention
from edgelm.converters.onnx import quantize as onnx_quantize
from edgelm.formats import onnx_plain

from .helpers import raw_greedy

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD = 16, 8, 4, 2, 8


def attention_graph(*, alibi: bool = False, rotary: bool = False, seed: int = 0, head: int = HEAD) -> "object":
    """One decoder layer (grouped-query attention, 4 query heads over 2 cache heads) and a head; ``alibi`` adds a
    per-head bias to the scores (BLOOM's kind: not a mask, so the rewrite must refuse it); ``rotary`` rotates q and
    k as Hugging Face does (``x * cos + rotate_half(x) * sin``, cos and sin computed from ``position_ids``)."""
    from onnx import TensorProto, helper, numpy_helper

    HEAD = head  # noqa: N806
    rng = np.random.default_rng(seed)
    w = lambda *shape: rng.normal(scale=0.5, size=shape).astype(np.float32)  # noqa: E731
    inits = {"emb": w(VOCAB, HIDDEN), "wq": w(HIDDEN, HEADS * HEAD), "wk": w(HIDDEN, KV_HEADS * HEAD),
             "wv": w(HIDDEN, KV_HEADS * HEAD), "wo": w(HEADS * HEAD, HIDDEN), "head": w(HIDDEN, VOCAB),
             "q_shape": np.array([0, 0, HEADS, HEAD], np.int64), "kv_shape": np.array([0, 0, KV_HEADS, HEAD], np.int64),
             "rep": np.array([1, 1, HEADS // KV_HEADS, 1, 1], np.int64), "axis2": np.array([2], np.int64),
             "heads_shape": np.array([0, HEADS, -1, HEAD], np.int64), "flat": np.array([0, 0, HEADS * HEAD], np.int64),
             "scale": np.array(HEAD ** -0.25, np.float32), "zero": np.array(0.0, np.float32),
             "neg": np.array(-1e9, np.float32), "zero_i": np.array(0, np.int64), "one_i": np.array(1, np.int64),
             "i0": np.array([0], np.int64), "i1": np.array([1], np.int64), "axes01": np.array([0, 1], np.int64),
             "nan_fill": np.array(0.0, np.float32), "slopes": (np.arange(1, HEADS + 1, dtype=np.float32) * -0.1
                                                               ).reshape(1, HEADS, 1, 1)}
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "input_ids"], ["x"]),
        n("MatMul", ["x", "wq"], ["q2"]), n("Reshape", ["q2", "q_shape"], ["q3"]),
        n("Transpose", ["q3"], ["q4"], perm=[0, 2, 1, 3]),
        n("MatMul", ["x", "wk"], ["k2"]), n("Reshape", ["k2", "kv_shape"], ["k3"]),
        n("Transpose", ["k3"], ["k_new"], perm=[0, 2, 1, 3]),
        n("MatMul", ["x", "wv"], ["v2"]), n("Reshape", ["v2", "kv_shape"], ["v3"]),
        n("Transpose", ["v3"], ["v_new"], perm=[0, 2, 1, 3]),
        n("Concat", ["past_key_values.0.key", "k_rot" if rotary else "k_new"], ["present.0.key"], axis=-2),
        n("Concat", ["past_key_values.0.value", "v_new"], ["present.0.value"], axis=-2),
        # repeat the cache heads for the query heads
        n("Unsqueeze", ["present.0.key", "axis2"], ["k5"]), n("Expand", ["k5", "rep"], ["k5x"]),
        n("Reshape", ["k5x", "heads_shape"], ["k_all"]),
        n("Unsqueeze", ["present.0.value", "axis2"], ["v5"]), n("Expand", ["v5", "rep"], ["v5x"]),
        n("Reshape", ["v5x", "heads_shape"], ["v_all"]),
        n("Transpose", ["k_all"], ["kT"], perm=[0, 1, 3, 2]),
        n("Mul", ["q_rot" if rotary else "q4", "scale"], ["q_s"]),
        n("Mul", ["kT", "scale"], ["k_s"]),  # HEAD^-0.25 on each side
        n("MatMul", ["q_s", "k_s"], ["scores"]),
        # the mask: key j is visible to query i (absolute position L - S + i) when j <= L - S + i and not padding
        n("Shape", ["attention_mask"], ["mshape"]), n("Gather", ["mshape", "one_i"], ["L"]),
        n("Shape", ["input_ids"], ["ishape"]), n("Gather", ["ishape", "one_i"], ["S"]),
        n("Sub", ["L", "S"], ["P"]),
        n("Range", ["zero_i", "L", "one_i"], ["kpos"]), n("Range", ["P", "L", "one_i"], ["qpos"]),
        n("Unsqueeze", ["kpos", "i0"], ["kpos2"]), n("Unsqueeze", ["qpos", "i1"], ["qpos2"]),
        n("LessOrEqual", ["kpos2", "qpos2"], ["visible"]), n("Where", ["visible", "zero", "neg"], ["causal"]),
        n("Unsqueeze", ["causal", "axes01"], ["causal4"]),
        n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        n("Sub", ["maskf", "one_f"], ["pad0"]), n("Mul", ["pad0", "big"], ["pad"]),
        n("Unsqueeze", ["pad", "axes12"], ["pad4"]),
        n("Add", ["causal4", "pad4"], ["mask4"]),
    ]
    inits.update({"one_f": np.array(1.0, np.float32), "big": np.array(1e9, np.float32),
                  "axes12": np.array([1, 2], np.int64)})
    if rotary:  # cos/sin [batch, 1, seq, HEAD] from the positions; rotate_half by slices of the last axis
        half = HEAD // 2
        inits.update({"inv_freq": (10000.0 ** (-np.arange(half, dtype=np.float32) / half)).astype(np.float32),
                      "h0": np.array([0], np.int64), "h1": np.array([half], np.int64),
                      "h2": np.array([HEAD], np.int64), "last": np.array([-1], np.int64)})
        nodes += [n("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
                  n("Unsqueeze", ["pos_f", "last"], ["pos3"]), n("Mul", ["pos3", "inv_freq"], ["freqs"]),
                  n("Concat", ["freqs", "freqs"], ["emb2"], axis=-1),
                  n("Cos", ["emb2"], ["cos3"]), n("Sin", ["emb2"], ["sin3"]),
                  n("Unsqueeze", ["cos3", "i1"], ["cos"]), n("Unsqueeze", ["sin3", "i1"], ["sin"])]
        for x in ("q4", "k_new"):
            r = f"rot_{x[0]}"
            nodes += [n("Slice", [x, "h0", "h1", "last"], [f"{r}_lo"]),
                      n("Slice", [x, "h1", "h2", "last"], [f"{r}_hi"]),
                      n("Neg", [f"{r}_hi"], [f"{r}_neg"]),
                      n("Concat", [f"{r}_neg", f"{r}_lo"], [f"{r}_half"], axis=-1),
                      n("Mul", [x, "cos"], [f"{r}_c"]), n("Mul", [f"{r}_half", "sin"], [f"{r}_s"]),
                      n("Add", [f"{r}_c", f"{r}_s"], [f"{x[0]}_rot"])]
    scores = "scores"
    if alibi:
        nodes += [n("Mul", ["slopes", "kpos_f"], ["bias"]), n("Cast", ["kpos"], ["kpos_f"], to=TensorProto.FLOAT),
                  n("Add", ["scores", "bias"], ["scores_b"])]
        scores = "scores_b"
    nodes += [
        n("Add", [scores, "mask4"], ["masked"]), n("Softmax", ["masked"], ["probs"], axis=-1),
        n("IsNaN", ["probs"], ["nan"]), n("Where", ["nan", "nan_fill", "probs"], ["probs_ok"]),
        n("MatMul", ["probs_ok", "v_all"], ["ctx"]), n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "flat"], ["ctx2"]), n("MatMul", ["ctx2", "wo"], ["attn"]),
        n("Add", ["x", "attn"], ["h"]), n("MatMul", ["h", "head"], ["logits"]),
    ]
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"])]
    if rotary:
        inputs.append(helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]))
    outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", "sequence_length", VOCAB])]
    for kind in ("key", "value"):
        inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{kind}", f,
                                                    ["batch_size", KV_HEADS, "past_sequence_length", HEAD]))
        outputs.append(helper.make_tensor_value_info(f"present.0.{kind}", f,
                                                     ["batch_size", KV_HEADS, "total_sequence_length", HEAD]))
    ready, ordered = {i.name for i in inputs} | set(inits) | {""}, []
    while nodes:  # topological order (the rotary and bias nodes were appended after their readers)
        node = next(x for x in nodes if all(i in ready for i in x.input))
        nodes.remove(node)
        ordered.append(node)
        ready.update(node.output)
    graph = helper.make_graph(ordered, "attention", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _fused(model, **options) -> dict:
    return onnx_attention.fuse(model, onnx_quantize.symbolic_dims(model), heads=HEADS, **options)


def test_attention_is_rewritten_into_one_group_query_attention_with_the_same_logits():
    original = attention_graph()
    model = attention_graph()
    done = _fused(model)
    assert done.pop("undo") is not None
    assert done == {"attention": "GroupQueryAttention", "layers": 1, "heads": HEADS, "kv_heads": KV_HEADS,
                    "rotary_in_op": 0, "packed_qkv": 1, "skip_rms_norms": 0}
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("GroupQueryAttention") == 1
    assert not {"Concat", "Softmax", "Expand", "IsNaN", "Range"} & set(ops)  # the old attention and mask are gone
    gqa = next(node for node in model.graph.node if node.op_type == "GroupQueryAttention")
    scale = next(a.f for a in gqa.attribute if a.name == "scale")
    assert scale == pytest.approx(HEAD ** -0.5)  # HEAD^-0.25 on the query times HEAD^-0.25 on the keys
    # a prompt, then single tokens, the rewritten graph's cache in one buffer larger than the sequence
    assert onnx_attention.verify(original, model, vocab=VOCAB) is None


def test_rotary_embedding_moves_into_the_op_as_tables_of_the_graphs_own_cos_and_sin():
    original, model = attention_graph(rotary=True, head=16), attention_graph(rotary=True, head=16)
    done = _fused(model, positions=64)
    assert done["rotary_in_op"] == 1 and done["packed_qkv"] == 1
    ops = [node.op_type for node in model.graph.node]
    assert not {"Neg", "Cos", "Sin", "Slice"} & set(ops)  # the rotary subgraph is gone from the graph
    gqa = next(node for node in model.graph.node if node.op_type == "GroupQueryAttention")
    assert {a.name: a.i for a in gqa.attribute if a.name in ("do_rotary", "rotary_interleaved")} == {
        "do_rotary": 1, "rotary_interleaved": 0}
    tables = {t.name: t for t in model.graph.initializer}
    assert list(tables[gqa.input[7]].dims) == [64, 8]  # [positions, head_size / 2]
    assert onnx_attention.verify(original, model, vocab=VOCAB) is None
    # without the positions the rotary stays in the graph, before the op, and the logits still agree
    model = attention_graph(rotary=True, head=16)
    assert _fused(model)["rotary_in_op"] == 0
    assert onnx_attention.verify(original, model, vocab=VOCAB) is None


def test_verify_catches_a_rewrite_that_changes_the_logits():
    original, model = attention_graph(), attention_graph()
    _fused(model)
    gqa = next(node for node in model.graph.node if node.op_type == "GroupQueryAttention")
    next(a for a in gqa.attribute if a.name == "scale").f *= 1.5
    problem = onnx_attention.verify(original, model, vocab=VOCAB)
    assert problem is not None and "logits differ" in problem


def test_a_per_head_score_bias_is_not_a_mask_and_the_graph_stays_as_exported():
    model = attention_graph(alibi=True)
    before = model.SerializeToString()
    done = _fused(model)
    assert done["attention"] == "as exported" and "not a [batch, 1, q, kv] mask" in done["reason"]
    assert model.SerializeToString() == before


def test_a_head_size_the_fused_op_refuses_stays_as_exported():
    model = attention_graph(head=4)
    done = _fused(model)
    assert done == {"attention": "as exported", "reason": "head size 4 is not a multiple of 8 (GroupQueryAttention "
                    "needs that)"}


def _content(model) -> tuple:
    g = model.graph
    return ([n.SerializeToString() for n in g.node], sorted(t.SerializeToString() for t in g.initializer),
            [o.SerializeToString() for o in model.opset_import], [v.SerializeToString() for v in g.value_info])


def test_fuse_checked_puts_the_graph_back_when_the_logits_differ(monkeypatch):
    original, model = attention_graph(), attention_graph()
    before = _content(model)
    monkeypatch.setattr(onnx_attention, "compare", lambda *a, **k: "logits differ by 1 at step 0")
    done = onnx_attention.fuse_checked(model, original, heads=HEADS, vocab=VOCAB)
    assert done == {"attention": "as exported", "reason": "the rewritten graph's logits differ by 1 at step 0"}
    assert _content(model) == before
    monkeypatch.undo()
    assert onnx_attention.fuse_checked(model, original, heads=HEADS, vocab=VOCAB)["attention"] == "GroupQueryAttention"


def _folder(folder: Path, model) -> Path:
    import onnx

    from .onnx_helpers import tiny_tokenizer

    folder.mkdir(parents=True)
    onnx.save_model(model, str(folder / "model.onnx"))
    tiny_tokenizer(folder)
    (folder / "edgelm.json").write_text(json.dumps({
        "format": "edgelm-onnx", "version": 1, "name": "toy", "architecture": "LlamaForCausalLM",
        "quantization": "fp32", "context_length": 64, "vocab_size": VOCAB, "model_file": "model.onnx",
        "eos_token_ids": [], "exporter": {"name": "optimum-onnx"}}))
    return folder


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_session_loop_shares_one_cache_buffer_and_decodes_as_the_exported_graph(tmp_path, rotary):
    head = 16 if rotary else HEAD
    exported = _folder(tmp_path / "exported", attention_graph(rotary=rotary, head=head))
    model = attention_graph(rotary=rotary, head=head)
    done = _fused(model, positions=64)
    assert done["attention"] == "GroupQueryAttention" and done["rotary_in_op"] == int(rotary)
    fused = _folder(tmp_path / "fused", model)
    assert onnx_plain.session_io(fused / "model.onnx")["shared_buffer"] is True
    assert onnx_plain.session_io(exported / "model.onnx")["shared_buffer"] is False
    runs = {}
    for name, folder in (("exported", exported), ("fused", fused)):
        with edgelm.load(folder, threads=1, n_ctx=48, n_batch=2) as m:  # prompts in chunks of 2 after the first
            b = m.backend
            assert m.info.extra["kv_cache_shared_buffer"] is (name == "fused")
            prompt = [3, 7, 1, 9, 4]
            first = raw_greedy(m, prompt, 12)
            # a prompt sharing a prefix with what the cache holds: rewound (a shared buffer just forgets the tail)
            again = raw_greedy(m, prompt + first[:3] + [5], 8)
            assert b.sequences[0].reused == len(prompt) + 3
            scores = b.score(b.sequences[0], [2, 5, 6, 7])
            runs[name] = (first, again, scores)
            if name == "fused":
                kv = b.kv[0]
                assert kv.front is kv.back and kv.front.size == KV_HEADS * 48 * head  # one buffer of n_ctx positions
    assert runs["fused"][0] == runs["exported"][0]
    assert runs["fused"][1] == runs["exported"][1]
    np.testing.assert_allclose(runs["fused"][2], runs["exported"][2], rtol=1e-4, atol=1e-4)
