"""``--target npu``: a Hugging Face checkpoint -> the static-shape prefill + decode pair NPU execution providers take.

Steps: build the fp32 pair (:mod:`.static`); for w8a16 / w4a16 calibrate the fp32 prefill graph on the calibration
text and write the QDQ pair (:mod:`.qdq`; w4 weights rounded by GPTQ, :mod:`.gptq`, per output channel); lint both
graphs against every NPU rule table (:mod:`.lint`, platforms/ep_rules); write the folder and its manifest
(:mod:`edgelm.formats.static_pair`).  The fp32 pair is also the reference the quality report measures against.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgelm.errors import ConversionError, InvalidParameterError, OutputExistsError
from edgelm.formats import ensure_free_space, hf, onnx_folder, static_pair
from edgelm.platforms.ep_rules import ep_rules
from edgelm.quality import eval_text
from edgelm.version import __version__

from .. import Progress, Verify
from ..calibration import calibration_text
from . import gptq, lint, qdq, static
from .options import OnnxOptions, read_calibration

log = logging.getLogger("edgelm.converters.onnx")

CALIBRATION_WINDOWS = 8  # windows of the calibration text, each evaluated from an empty KV window
CALIBRATION_WINDOW = 512  # tokens per window (fewer when the context is smaller)
CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
           "generation_config.json", "config.json")


def npu_calibration_text() -> tuple[str, str]:
    """The built-in mixed calibration text and how the manifest names it: the standard library's docstrings and
    the second half of the built-in evaluation text (perplexity is scored on its first 2,048 tokens, well inside
    the first half, so the report measures text the calibration never saw)."""
    ev = eval_text()
    return (calibration_text() + "\n\n" + ev[len(ev) // 2:],
            "built-in: Python standard library docstrings + the second half of edgelm/data/eval.txt")


def check_options(opts: OnnxOptions) -> None:
    if opts.prefill < 2 or opts.context < opts.prefill or opts.context % 8:
        raise InvalidParameterError(
            f"Invalid NPU shapes: prefill={opts.prefill}, context={opts.context}.",
            fix="Use prefill >= 2 and a context that is a multiple of 8 and at least the prefill (e.g. 128 / 1024).",
            parameter="context", value=opts.context)


def convert_npu(source_dir: Path, output: Path, quant: str, config: dict[str, Any], opts: OnnxOptions, *,
                overwrite: bool, report: Progress, verify: Verify | None) -> Path:
    """Write the pair for ``quant`` (w8a16, w4a16 or fp32) to ``output`` (temporary folder, renamed when linted
    and checked)."""
    check_options(opts)
    spec = static.Spec.of(config, source_dir)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"The output {output} already exists.",
                                    fix="Choose another output folder, or pass overwrite=True (--overwrite).",
                                    path=str(output))
        if not (output / onnx_folder.MANIFEST).exists():
            raise OutputExistsError(f"The output {output} exists and is not an edgelm ONNX folder; refusing to "
                                    "replace it.", fix="Choose another output folder.", path=str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    per_param = {"fp32": 4.2, "w8a16": 1.5, "w4a16": 1.0}[quant]
    ensure_free_space(output.parent, int(hf.count_parameters(source_dir) * per_param) + 16 * 2**20,
                      f"Converting to {quant} for NPUs")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        write_pair(source_dir, tmp, quant, config, spec, opts, report)
        if verify is not None:
            report("Checking that the pair decodes on this machine", 0.95)
            verify(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"Wrote {output}", 1.0)
    return output


def write_pair(source_dir: Path, folder: Path, quant: str, config: dict[str, Any], spec: static.Spec,
               opts: OnnxOptions, report: Progress) -> dict[str, Any]:
    t0 = time.perf_counter()
    ar, ctx = opts.prefill, opts.context
    report(f"Reading {source_dir.name} and building the static AR-{ar} / AR-1 graphs (context {ctx})", 0.02)
    weights = static.load_weights(source_dir)
    shared = static.shared_initializers(spec, weights, ctx)
    del weights
    prefill, decode = static.build(spec, shared, ar, ctx), static.build(spec, shared, 1, ctx)
    calibration: dict[str, Any] | None = None
    encodings: dict[str, Any] | None = None
    if quant != "fp32":
        text, label = npu_calibration_text() if opts.calibration is None else \
            (read_calibration(opts.calibration) or "", str(opts.calibration))
        windows = calibration_windows(source_dir, text, ar, ctx)
        shape = static_pair.PairShape(spec.layers, spec.kv_heads, spec.head_size, ctx, spec.vocab)
        report(f"Calibrating activation ranges on {len(windows)} windows of {len(windows[0])} tokens", 0.1)
        ranges = qdq.calibrate(prefill, windows, shape, ar, _session(),
                               progress=lambda k: report(f"Calibrating: window {k}/{len(windows)}",
                                                         0.1 + 0.4 * k / len(windows)))
        report(f"Rounding weights ({quant})", 0.5)
        codes = weight_codes(source_dir, spec, shared, quant, prefill.weights, text, report)
        enc = qdq.encodings(prefill, ranges, spec.layers)
        prefill = qdq.quantize(prefill, enc, codes)
        decode = qdq.quantize(decode, qdq.encodings(decode, ranges, spec.layers), codes)
        calibration = {"text": label, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                       "windows": len(windows), "tokens_per_window": len(windows[0])}
        kv = qdq.kv_encodings(ranges, spec.layers)
        encodings = {
            "activations": "uint16 asymmetric per tensor (calibration min/max)",
            "weights": ("uint8 symmetric per output channel (zero point 128)" if quant == "w8a16" else
                        "int4 symmetric per output channel (GPTQ); lm_head uint8 per channel"),
            "embedding": "uint16 per tensor", "kv_cache": "uint8 symmetric per layer (zero point 128)",
            "kv": {name: e.record() for name, e in kv.items() if name.startswith("past_")},
        }
    report("Linting both graphs against the NPU execution providers' rules", 0.8)
    graphs = {static_pair.PREFILL_FILE: prefill, static_pair.DECODE_FILE: decode}
    lint_result: dict[str, Any] = {}
    for file_name, g in graphs.items():
        proto = static.to_proto(g, location="-", external={  # weights as references: the lint reads no data
            n: (0, 0) for n, a in g.initializers.items() if a.nbytes >= static.EXTERNAL_MIN_BYTES})
        lint_result[file_name] = lint.check(proto, ep_rules(), graph=file_name, quantized=quant != "fp32")
    report("Writing the graphs and their shared weight file", 0.85)
    written = static.write_pair(folder, graphs)
    for name in CARRIED:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, folder / name)
    manifest = make_manifest(source_dir, folder, config, spec, quant, opts, prefill, decode, written, calibration,
                             encodings, lint_result, time.perf_counter() - t0)
    (folder / onnx_folder.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    onnx_folder.check_folder(folder)
    return manifest


def calibration_windows(source_dir: Path, text: str, ar: int, ctx: int) -> list[list[int]]:
    """CALIBRATION_WINDOWS windows of whole AR chunks, spread evenly over ``text``."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(source_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    length = max(ar, min(CALIBRATION_WINDOW, ctx) // ar * ar)
    if len(ids) < length:
        raise InvalidParameterError(f"The calibration text has {len(ids)} tokens, fewer than one window of "
                                    f"{length}.", fix="Pass a longer --calibration text.", parameter="calibration",
                                    value=len(ids))
    n = max(1, min(CALIBRATION_WINDOWS, len(ids) // length))
    stride = (len(ids) - length) // max(1, n - 1) if n > 1 else 0
    return [ids[k * stride:k * stride + length] for k in range(n)]


def _session() -> Callable[[bytes, list[str]], Any]:
    import onnxruntime as ort

    def make(model: bytes, outputs: list[str]) -> Any:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run(outputs, feeds)

    return make


def weight_codes(source_dir: Path, spec: static.Spec, shared: dict[str, np.ndarray], quant: str,
                 names: set[str], text: str, report: Progress) -> dict[str, tuple[np.ndarray, qdq.Encoding]]:
    """name -> (codes, encoding) of every MatMul weight: uint8 per channel (w8), or GPTQ int4 per channel for the
    decoder's matrices (w4; the output head stays 8-bit)."""
    codes = {n: qdq.per_channel_u8(shared[n]) for n in sorted(names)}
    if quant == "w4a16":
        codes.update(gptq_int4(source_dir, spec, text, report))
    return codes


def gptq_int4(source_dir: Path, spec: static.Spec, text: str, report: Progress
              ) -> dict[str, tuple[np.ndarray, qdq.Encoding]]:
    """GPTQ (:mod:`.gptq`) with one block per row, i.e. a symmetric int4 scale per output channel."""
    import torch

    try:
        model, tokenizer = gptq._load(source_dir)
        batches = gptq.calibration_batches(tokenizer, text, gptq.DEFAULT_SAMPLES, 512)
        found = gptq.quantize_model(model, batches, block_size=0, symmetric=True,
                                    progress=lambda m, f: report(m, 0.5 + 0.25 * f))
    except (ImportError, RuntimeError, ValueError, OSError) as exc:
        raise ConversionError(f"GPTQ could not quantize {source_dir}: {exc}",
                              fix="Use --weights w8, or check that the checkpoint loads with transformers.") from exc
    prefix = gptq._decoder_layers(model)[0]
    scale_q = 1.0 / np.sqrt(spec.head_size)
    out = {}
    for i in range(spec.layers):
        for name, module in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                             ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
                             ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
                             ("down_proj", "mlp.down_proj")):
            q = found[f"{prefix}.{i}.{module}"]
            if q.bits != 4:
                continue
            zeros = q.zeros.to(torch.float32).numpy()[:, 0]
            values = q.codes.to(torch.float32).numpy() - zeros[:, None]  # symmetric: zero point 8 -> -8..7
            scale = q.scales.to(torch.float32).numpy()[:, 0] * (scale_q if name == "q_proj" else 1.0)
            codes = np.ascontiguousarray(np.clip(values, -8, 7).astype(np.int8).T)
            out[f"l{i}.{name}"] = (codes, qdq.Encoding(scale.astype(np.float32),
                                                       np.zeros(len(scale), np.int8), "int4", axis=1))
    return out


def make_manifest(source_dir: Path, folder: Path, config: dict[str, Any], spec: static.Spec, quant: str,
                  opts: OnnxOptions, prefill: static.Graph, decode: static.Graph, written: dict[str, Any],
                  calibration: dict[str, Any] | None, encodings: dict[str, Any] | None, lint_result: dict[str, Any],
                  seconds: float) -> dict[str, Any]:
    gen = {}
    if (source_dir / "generation_config.json").is_file():
        gen = json.loads((source_dir / "generation_config.json").read_text(encoding="utf-8"))
    eos = list(dict.fromkeys(onnx_folder.token_ids(gen.get("eos_token_id"))
                             + onnx_folder.token_ids(config.get("eos_token_id"))))
    name = config.get("_name_or_path") or source_dir.name
    return {
        **onnx_folder.manifest_head(config, name=name, quant=quant, quantization_options=(
            {"weights": quant[:2], "activations": "uint16", "kv_cache": "uint8", "op": "QDQ",
             "algo": "gptq" if quant == "w4a16" else "per-channel"} if quant != "fp32" else None)),
        "execution_provider": "npu",
        "graph_target": "static pair (NPU execution providers)",
        "parameters": hf.count_parameters(source_dir),
        "context_length": opts.context,
        "context": opts.context,
        "vocab_size": spec.vocab,
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_ids": eos,
        "pad_token_id": config.get("pad_token_id"),
        "model_file": static_pair.PREFILL_FILE,
        "external_data": [written["weights_file"]],
        "graphs": {
            "prefill": {"file": static_pair.PREFILL_FILE, "ar": opts.prefill, **static.io_record(prefill)},
            "decode": {"file": static_pair.DECODE_FILE, "ar": 1, **static.io_record(decode)},
        },
        "kv_cache": {"layers": spec.layers, "kv_heads": spec.kv_heads, "attention_heads": spec.heads,
                     "head_size": spec.head_size, "layout": "static window: keys [1, kv_heads, head_size, context], "
                     "values [1, kv_heads, context, head_size]",
                     "dtype": "float32" if quant == "fp32" else "uint8", "shared_buffer": False},
        "attention_mask": {"value": static_pair.MASK_VALUE, "columns": "[0, context) the window, "
                           "[context, context + AR) the run's own tokens"},
        "encodings": encodings,
        "calibration": calibration,
        "lint": {"rules": {n: r["title"] for n, r in ep_rules().items()}, "graphs": lint_result},
        "chat_template": "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else None,
        "exporter": {"name": static_pair.EXPORTER, "version": __version__},
        "export_seconds": round(seconds, 1),
    }
