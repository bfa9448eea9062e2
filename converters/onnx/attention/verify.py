"""Checking a rewritten graph against the exported one: both run on the same random tokens (a prompt, then single
tokens), the rewritten one with its cache in one buffer larger than the sequence, past and present bound to it as
edgelm's runtime binds them; their last logits must agree."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


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
