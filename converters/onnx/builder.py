"""Running onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``) in a child process:
its arguments from the options, its log turned into progress, its failures into typed errors.

The builder writes one decoder graph with onnxruntime's fused contrib ops (GroupQueryAttention,
SkipSimplifiedLayerNormalization, MatMulNBits for 4/8-bit weights, GatherBlockQuantized embeddings), a preallocated KV
cache layout (``past_present_share_buffer``) and a ``genai_config.json`` that onnxruntime-genai's decode loop reads.
It imports torch and transformers: a crash there must not take the caller with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from edgelm.errors import ConversionError
from edgelm.optional import require

from .. import Progress
from ..process import run_streaming
from .options import OnnxOptions

BUILDER_MODULE = "onnxruntime_genai.models.builder"


def builder_target(quant: str, opts: OnnxOptions) -> str:
    """The builder's -e: its CPU fp16 graph (MultiHeadAttention + casts) fails to decode in onnxruntime 1.32
    ('Shape mismatch attempting to re-use buffer'), while its CUDA fp16 graph (GroupQueryAttention) runs on the
    CPU provider too and gives fp32's greedy tokens; fp16 for CPU is therefore built as that graph."""
    if quant == "fp16" and opts.execution_provider == "cpu":
        return "cuda"
    return opts.execution_provider


def builder_args(source_dir: Path, out: Path, cache: Path, quant: str, opts: OnnxOptions) -> list[str]:
    args = [sys.executable, "-m", BUILDER_MODULE, "-i", str(source_dir), "-o", str(out), "-p", quant,
            "-e", builder_target(quant, opts), "-c", str(cache)]
    extra = ["hf_token=false"]
    if quant in ("int4", "int8"):
        extra += [f"block_size={opts.block_size}", f"is_symmetric={str(bool(opts.symmetric)).lower()}"]
        if opts.accuracy_level:
            extra.append(f"accuracy_level={opts.accuracy_level}")
        if opts.algo and opts.algo not in ("default", "gptq"):
            extra.append(f"algo_config={opts.algo}")
    if opts.algo == "gptq":  # the GPTQ checkpoint's head is already int4, in a layout the embedding cannot share
        extra.append("shared_embeddings=false")
    elif not opts.symmetric and quant in ("int4", "int8"):
        # the builder's asymmetric GatherBlockQuantized embedding shared with lm_head does not load in
        # onnxruntime 1.32 (uint8 output type error): keep input and output embeddings separate
        extra.append("shared_embeddings=false")
    extra += [f"{k}={v}" for k, v in (opts.builder_options or {}).items()]
    return args + ["--extra_options", *extra]


_SAVING = re.compile(r"(\d+)/(\d+) \[")


def run_builder(source_dir: Path, out: Path, quant: str, opts: OnnxOptions, report: Progress) -> None:
    require("onnxruntime_genai", extra="convert", purpose="ONNX conversion (onnxruntime-genai's model builder)")
    cache = out / ".builder-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = builder_args(source_dir, out, cache, quant, opts)
    tail: list[str] = []
    last = 0.0

    def on_line(line: str) -> None:
        nonlocal last
        tail.append(line)
        del tail[:-30]
        step = _fraction(line)
        if step is not None and step[1] - last >= 0.05:
            last = step[1]
            report(*step)

    timeout = opts.timeout
    rc = run_streaming(cmd, env, on_line, timeout=timeout, timeout_error=lambda: ConversionError(
        f"The ONNX exporter ran longer than timeout={timeout} s and was stopped.",
        fix="Allow more time (timeout=...)."))
    shutil.rmtree(cache, ignore_errors=True)
    if rc != 0:
        reason = next((line for line in reversed(tail) if re.search(r"Error|Exception|error:", line)), None)
        raise ConversionError(
            f"onnxruntime-genai's model builder failed (exit code {rc}) converting {source_dir} to {quant}: "
            f"{reason or ' | '.join(tail[-3:])}",
            fix="Check that the checkpoint loads with transformers (>= 5) and that its architecture is supported; "
            "run `python -m onnxruntime_genai.models.builder` by hand to see the whole log.",
            returncode=rc, log="\n".join(tail))
    if not (out / "model.onnx").is_file() or not (out / "genai_config.json").is_file():
        raise ConversionError(f"The model builder finished but wrote no model.onnx/genai_config.json in {out}.",
                              fix="Run `python -m onnxruntime_genai.models.builder` by hand to see why.",
                              log="\n".join(tail))
    if builder_target(quant, opts) != opts.execution_provider:  # run where it was asked for, not on the build target
        cfg_path = out / "genai_config.json"
        genai = json.loads(cfg_path.read_text(encoding="utf-8"))
        genai["model"]["decoder"].setdefault("session_options", {})["provider_options"] = []
        cfg_path.write_text(json.dumps(genai, indent=4), encoding="utf-8")


def _fraction(line: str) -> tuple[str, float] | None:
    """Map the builder's log lines to overall progress: reading weights, quantizing, then saving tensors."""
    m = _SAVING.search(line)
    if m and line.startswith("Saving"):
        done, total = int(m.group(1)), int(m.group(2))
        return f"Writing tensors {done}/{total}", 0.6 + 0.3 * done / max(total, 1)
    if "Loading weights" in line or "Reading" in line:
        return "Reading weights", 0.1
    if "start to quantize" in line:
        return "Quantizing weights (MatMulNBits)", 0.3
    return None
