"""The decode estimate of `edgelm.recommend(device="auto")` against decode measured in the same run, on this CPU.

For SmolLM2-135M Q4_1 as shipped (and, with --quants, files re-quantized from it with llama.cpp's quantizer):
the plan's estimate (its SIMD level, threads, measured bandwidth, bound), the measured decode tok/s (median of
--runs greedy generations of --tokens tokens at the plan's threads), and measured / estimated    (goal 0.67-1.5)
The load average is printed too: on a shared machine a busy neighbour slows decode, not the estimate.  Use the
output to calibrate DECODE_GFLOPS_PER_CORE in platforms/profiles.py for a CPU kind (AVX-only, AVX2, AVX-512, ...).

Usage: python benchmarks/bench_plan.py [--runs 5] [--tokens 128] [--quants q4_0,q8_0]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from pathlib import Path

import edgelm
from edgelm.platforms.profiles import SIMD_TITLES

PROMPT = "Count from one to a hundred in words: one, two,"


def requantize(src: Path, quant: str, folder: Path) -> Path:
    import llama_cpp

    out = folder / f"smollm2-{quant}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"quantizing to {quant} failed")
    return out


def measure(path: Path, threads: int, runs: int, tokens: int) -> list[float]:
    speeds = []
    with edgelm.load(path, threads=threads, n_ctx=1024) as m:
        m.generate(PROMPT, temperature=0, max_tokens=4)  # warm-up
        for _ in range(runs):
            m.reset_cache()
            c = m.generate(PROMPT, temperature=0, max_tokens=tokens)
            speeds.append(c.timings.tokens_per_second(c.usage.completion_tokens))
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--quants", default="", help="also re-quantize to these (q4_0, q8_0, q4_k_m, f16)")
    a = ap.parse_args()
    src = edgelm.default_model_path()
    with tempfile.TemporaryDirectory(prefix="edgelm-bench-plan-") as tmp:
        files = {"q4_1": src} | {q: requantize(src, q, Path(tmp)) for q in filter(None, a.quants.split(","))}
        print(f"{'file':<8} {'simd':<28} {'thr':>3} {'estimate':>8} {'bound':<16} {'measured':>8} {'ratio':>6}  load")
        for name, path in files.items():
            plan = edgelm.recommend(path, "auto")
            speeds = measure(path, plan.threads, a.runs, a.tokens)
            measured = statistics.median(speeds)
            print(f"{name:<8} {SIMD_TITLES[plan.simd][:28]:<28} {plan.threads:>3} {plan.tokens_per_second:>8.0f} "
                  f"{plan.bound_by:<16} {measured:>8.0f} {measured / plan.tokens_per_second:>6.2f}  "
                  f"{os.getloadavg()[0]:.1f}   (runs: {', '.join(f'{s:.0f}' for s in speeds)})", flush=True)
    print(time.strftime("%Y-%m-%d %H:%M:%S"), "goal: ratio 0.67-1.5 on an otherwise idle machine")


if __name__ == "__main__":
    main()
