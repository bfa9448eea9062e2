"""The NPU export (`edgelm convert --to onnx --target npu`): quality of the QDQ pair against the fp32 pair of the same
shapes, and how long the conversion takes.

For each weight type (w8 = w8a16, w4 = w4a16 through GPTQ) the checkpoint is converted with the default shapes
(prefill 128, context 1,024) through `edgelm.convert`, which scores the output and the fp32 pair on held-out text
(the built-in text's first 4 windows of 512 tokens; the calibration reads its second half and the standard
library's docstrings).  Printed: perplexities, the ratio to fp32 (goals: w8a16 <= 1.10x, w4a16 <= 1.25x) and the
conversion's seconds (goal for w8a16: <= 600 s on 2 cores), with the load average, since the machine may be shared.
No NPU is involved: the numerics are onnxruntime's CPU EP running the QDQ graphs.

Usage: python benchmarks/bench_npu.py [HF_CHECKPOINT_DIR] [--weights w8 w4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import edgelm

from checkpoints import default_checkpoint  # benchmarks/checkpoints.py

GOALS = {"w8": 1.10, "w4": 1.25}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", type=Path)
    ap.add_argument("--weights", nargs="+", default=["w8", "w4"], choices=["w8", "w4"])
    ap.add_argument("--keep", type=Path, help="write the pairs here instead of a temporary folder")
    args = ap.parse_args()
    src = args.src or default_checkpoint()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-npu-"))
    print(f"checkpoint {src}; {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f}")
    rows = []
    try:
        for weights in args.weights:
            t0 = time.perf_counter()
            r = edgelm.convert(src, to="onnx", target="npu", weights=weights, output=root / f"npu-{weights}a16",
                               overwrite=True)
            wall = time.perf_counter() - t0
            ratio = r.perplexity / r.reference_perplexity
            rows.append((weights, r, ratio, wall, os.getloadavg()[0]))
            print(f"{r.quant}: perplexity {r.perplexity:.3f} vs fp32 pair {r.reference_perplexity:.3f} = "
                  f"{ratio:.3f}x (goal <= {GOALS[weights]:.2f}x) {'met' if ratio <= GOALS[weights] else 'MISSED'}; "
                  f"conversion {r.seconds:.0f} s (goal for w8a16 <= 600 s), with the quality report {wall:.0f} s; "
                  f"{r.size_bytes / 1e6:.0f} MB; CPU-EP decode {r.tokens_per_second} tok/s; "
                  f"load average {rows[-1][4]:.1f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| pair | perplexity | fp32 pair | ratio | goal | conversion s | size MB |")
    print("|---|---|---|---|---|---|---|")
    for weights, r, ratio, wall, load in rows:
        print(f"| {r.quant} | {r.perplexity:.2f} | {r.reference_perplexity:.2f} | {ratio:.3f}× | ≤ {GOALS[weights]:.2f}× "
              f"| {r.seconds:.0f} | {r.size_bytes / 1e6:.0f} |")


if __name__ == "__main__":
    main()
