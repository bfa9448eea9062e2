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

The modules, by job: :mod:`.index` (producers, consumers and small constants of a graph), :mod:`.match` (one layer's
attention, its rotary embedding, its q/k/v projections), :mod:`.rewrite` (:func:`fuse`: the GroupQueryAttention
nodes, rotary tables, packed QKV), :mod:`.norms` (residual Add + RMSNorm fusion), :mod:`.verify` (the logits check).
:func:`fuse_checked`, here, is what the exporter calls: fuse, verify, and undo what does not agree.
"""

from __future__ import annotations

import logging
from typing import Any

from ..quantize import symbolic_dims
from .index import FUSED_OP, MS_DOMAIN, NoMatch
from .rewrite import fuse
from .verify import compare, reference_logits, verify

__all__ = ["FUSED_OP", "MS_DOMAIN", "NoMatch", "compare", "fuse", "fuse_checked", "reference_logits", "verify"]

log = logging.getLogger("edgelm.converters.onnx")


def fuse_checked(model: Any, original: Any, *, heads: int | None, vocab: int, positions: int | None = None
                 ) -> dict[str, Any]:
    """:func:`fuse`, then :func:`verify` against ``original`` (the exported graph: a path or a ModelProto); a graph
    whose logits differ is put back as it was, and tried once more with the rotary embedding left outside the op.
    Returns what :func:`fuse` did (without its undo), or why not."""
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
