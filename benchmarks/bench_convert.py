"""Hugging Face -> GGUF conversion: seconds and peak memory per output type, and the size / perplexity curve.

For each output type, `edgelm.convert` runs on the same checkpoint (llama.cpp's converter to 16 bits, then
llama.cpp's quantizer, then the quality report).  Measured in the same run, as references:
- llama.cpp's converter run by hand (`convert_hf_to_gguf.py --outtype f16`): edgelm's f16 conversion time over it;
- the converter's fixed cost (python + torch + transformers + the tokenizer, no tensors): the converter's peak RSS
  minus that, over the f16 file size, is what the lazy conversion holds (goal: well below 2x the f16 size).

Usage: python benchmarks/bench_convert.py [HF_DIR] [--quants f16,q8_0,...] [--runs 3] [--plot bench_convert.png]
Without HF_DIR: SmolLM2-135M-Instruct derived from the embedded GGUF (tests/hf_fixtures.py, cached).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import edgelm
from edgelm.converters.hf_gguf import _LAUNCHER, _PEAK, converter_env, find_converter

ROOT = Path(__file__).resolve().parent.parent
QUANTS = "f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0,q3_k_m,q2_k"


def peak_rss_of(script: str, args: list[str], env: dict[str, str]) -> tuple[int, float]:
    """Run a Python script file; (its peak RSS from VmHWM, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, script, *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {script} {' '.join(args)}\n{proc.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith(_PEAK))
    return peak, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?")
    ap.add_argument("--quants", default=QUANTS)
    ap.add_argument("--runs", type=int, default=3, help="conversions per type for the time medians")
    ap.add_argument("--plot", default="bench_convert.png")
    args = ap.parse_args()
    if args.source:
        src = Path(args.source)
    else:
        from checkpoints import default_checkpoint  # benchmarks/checkpoints.py

        src = default_checkpoint()
    found = find_converter()
    if found is None:
        sys.exit("llama.cpp's converter is not installed: run `edgelm install-converter`.")
    script, own_path = found
    env = converter_env(script, own_path)

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp_path = Path(tmp)
        # references: the converter by hand, and its fixed cost
        raw_times, raw_rss = [], []
        for _ in range(args.runs):
            rss, secs = peak_rss_of(str(script), [str(src), "--outfile", str(tmp_path / "raw.gguf"), "--outtype",
                                                  "f16"], env)
            raw_times.append(secs)
            raw_rss.append(rss)
        f16_size = (tmp_path / "raw.gguf").stat().st_size
        fixed = tmp_path / "fixed_cost.py"
        fixed.write_text("import torch, transformers, numpy, sentencepiece, yaml\n"
                         f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({str(src)!r})\n")
        base_rss, _ = peak_rss_of(str(fixed), [], env)

        rows = []
        for quant in args.quants.split(","):
            times, report = [], None
            for i in range(args.runs):  # report.seconds: converter + quantizer + run check, not the evaluation
                out = tmp_path / f"{quant}.gguf"
                report = edgelm.convert(str(src), to="gguf", quant=quant, output=str(out), overwrite=True,
                                        eval=(i == args.runs - 1))
                times.append(report.seconds)
                out.unlink()
            rows.append((quant, statistics.median(times), report))
            print(f"{quant:7} {report.size_bytes / 1e6:7.1f} MB {report.bits_per_weight:5.2f} bpw  "
                  f"ppl {report.perplexity:7.3f} ({report.ppl_increase * 100:+6.2f} % vs {report.reference})  "
                  f"{report.tokens_per_second:6.1f} tok/s", flush=True)

    print()
    print(f"source {src} ({f16_size / 1e6:.0f} MB as f16), {args.runs} conversions per type, medians")
    print(f"{'type':7} {'convert s':>9} {'conv. RSS MB':>12} {'size MB':>8} {'bpw':>5} {'ppl':>8} {'vs ref':>8} "
          f"{'decode tok/s':>12}")
    for quant, secs, r in rows:
        print(f"{quant:7} {secs:9.1f} {r.conversion_peak_rss / 2**20:12.0f} {r.size_bytes / 1e6:8.1f} "
              f"{r.bits_per_weight:5.2f} {r.perplexity:8.3f} {r.ppl_increase * 100:+7.2f}% {r.tokens_per_second:12.1f}")
    raw = statistics.median(raw_times)
    f16 = next((secs for quant, secs, _ in rows if quant == "f16"), None)
    if f16:
        print(f"\nf16: edgelm {f16:.1f} s (converter + load/run check) vs llama.cpp's converter by hand {raw:.1f} s "
              f"-> ratio {f16 / raw:.2f}")
    peak = max(r.conversion_peak_rss for _, _, r in rows)
    print(f"converter peak RSS {peak / 2**20:.0f} MB (by hand: {statistics.median(raw_rss) / 2**20:.0f} MB); "
          f"its fixed cost (torch + transformers + tokenizer) {base_rss / 2**20:.0f} MB; "
          f"held for the model {(peak - base_rss) / 2**20:.0f} MB = {(peak - base_rss) / f16_size:.2f}x the f16 file "
          "(goal: well below 2x)")
    plot(rows, args.plot)


def plot(rows, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install \"edgelm[bench]\"): no chart")
        return
    rows = sorted(rows, key=lambda row: row[2].size_bytes)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    sizes = [r.size_bytes / 1e6 for _, _, r in rows]
    ppls = [r.perplexity for _, _, r in rows]
    ax.plot(sizes, ppls, "o-")
    for (quant, _, r), x, y in zip(rows, sizes, ppls):
        ax.annotate(quant, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ref = rows[-1][2]
    ax.axhline(ref.reference_perplexity, color="grey", linestyle="--", linewidth=0.8,
               label=f"reference ({ref.reference})")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("perplexity on the built-in text (lower is better)")
    ax.set_title("Quantization: size vs quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
