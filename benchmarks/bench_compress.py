"""Compression (issue 14): speed and quality of SmolLM2-135M-Instruct with decoder blocks / MLP neurons removed.

Targets (the issue's): a compressed model at >= 1.15x the decode tokens/s of the original (q8_0 GGUF both, same run)
whose perplexity is <= 1.10x the original's on the built-in text and on a text of another kind not used for
calibration (the GPL-3 licence found on disk, else Python's LICENSE), within a 30-minute compression budget; and,
at the same size, healed beats plain removal.

Runs `edgelm.compress` once per method on the same blocks (the distillation run chooses them; the others get the
same list): plain removal (heal none), least-squares healing (linear), and distillation (linear, then KL on logits
for --budget).  Each report measures q8_0 GGUFs of the original and of the result (perplexity with llama.cpp, decode
tokens/s in child processes, alternating).  Then the frontier: size, decode speed and perplexity of the original
at f16 / q8_0 / q4_k_m against the distilled result at q8_0 / q4_k_m.

Usage: python benchmarks/bench_compress.py [HF_DIR] [--drop-layers 4] [--prune-mlp 0] [--budget 30m]
       [--methods none,linear,distill] [--keep DIR] [--threads 2] [--json out.json]
Without HF_DIR: SmolLM2-135M-Instruct derived from the embedded GGUF (tests/hf_fixtures.py, cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import edgelm
from edgelm.measure import bench, evaluate

ROOT = Path(__file__).resolve().parent.parent


def other_text() -> tuple[str, str]:
    """(name, text): licence prose, a kind of text the calibration (Python docstrings) does not contain."""
    candidates = [Path("/usr/share/common-licenses/GPL-3")]
    site = Path(sysconfig.get_paths()["purelib"])
    candidates += sorted(site.glob("*/COPYING*")) + sorted(site.glob("*.dist-info/licenses/COPYING*"))
    candidates.append(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 12_000:
            return str(path), text
    sys.exit("no licence text of 12 kB or more found on disk")


def measure(models: dict[str, Path], other: str, threads: int | None, rounds: int = 2) -> dict[str, dict]:
    """Perplexity (built-in, other) and median decode tokens/s per GGUF, models alternating in child processes."""
    load = {"threads": threads} if threads else {}
    out = {name: {"size_mb": path.stat().st_size / 1e6,
                  "ppl_builtin": evaluate(str(path), **load)[0].perplexity,
                  "ppl_other": evaluate(str(path), text=other, **load)[0].perplexity, "tps": []}
           for name, path in models.items()}
    for _ in range(rounds):
        for name, path in models.items():
            out[name]["tps"].append(bench([str(path)], runs=3, prompt_tokens=64, gen_tokens=64, n_ctx=512,
                                          **load)[0].tokens_per_second)
    for row in out.values():
        row["tps"] = statistics.median(row["tps"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?")
    ap.add_argument("--drop-layers", type=int, default=4)
    ap.add_argument("--prune-mlp", default=None, help='e.g. "10%%"')
    ap.add_argument("--budget", default="30m")
    ap.add_argument("--methods", default="none,linear,distill")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", default=None, help="keep the compressed checkpoints in this folder")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args()
    if args.source:
        src = Path(args.source)
    else:
        from checkpoints import default_checkpoint  # benchmarks/checkpoints.py

        src = default_checkpoint()
    other_name, other = other_text()
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "other.txt").write_text(other, encoding="utf-8")
        reports, drop = {}, args.drop_layers
        for method in sorted(methods, key=lambda m: m != "distill"):  # distillation first: it chooses the blocks
            t0 = time.perf_counter()
            r = edgelm.compress(str(src), str(work / method), drop_layers=drop, prune_mlp=args.prune_mlp,
                                heal=method, budget=args.budget if method == "distill" else None,
                                eval_text=str(work / "other.txt"), overwrite=True, threads=args.threads,
                                progress=_progress(method))
            drop = r.dropped_layers
            reports[method] = r
            print(f"\n{method}: {time.perf_counter() - t0:.0f} s\n{r.table()}\n", flush=True)

        print(f"\nSmolLM2-135M-Instruct, {len(drop)} blocks removed ({', '.join(map(str, drop))})"
              + (f", MLP {args.prune_mlp} narrower" if args.prune_mlp else "") + f"; other text: {other_name}")
        print(f"{'method':8} {'ppl built-in':>13} {'ratio':>6} {'ppl other':>10} {'ratio':>6} {'decode x':>9} "
              f"{'seconds':>8}  target: >= 1.15x decode at <= 1.10x perplexity on both")
        for method, r in reports.items():
            b, o = r.perplexity["built-in"], r.perplexity["other.txt"]
            rb, ro = b["compressed"] / b["original"], o["compressed"] / o["original"]
            ok = r.speedup >= 1.15 and rb <= 1.10 and ro <= 1.10
            print(f"{method:8} {b['compressed']:13.3f} {rb:6.3f} {o['compressed']:10.3f} {ro:6.3f} "
                  f"{r.speedup:9.3f} {r.seconds.get('total', 0):8.0f}  {'met' if ok else 'not met'}")
        print(f"original {b['original']:13.3f} {1:6.3f} {o['original']:10.3f} {1:6.3f} {1:9.3f}")

        best = reports.get("distill") or reports.get("linear") or next(iter(reports.values()))
        frontier = _frontier(src, Path(best.output), work, other, args.threads)
        print("\nfrontier (sizes of the GGUF files; decode tokens/s medians, models alternating in child processes)")
        print(f"{'model':22} {'size MB':>8} {'decode t/s':>11} {'x':>6} {'ppl built-in':>13} {'x':>6} "
              f"{'ppl other':>10} {'x':>6}")
        ref = frontier["original f16"]
        for name, row in frontier.items():
            print(f"{name:22} {row['size_mb']:8.1f} {row['tps']:11.1f} {row['tps'] / ref['tps']:6.2f} "
                  f"{row['ppl_builtin']:13.3f} {row['ppl_builtin'] / ref['ppl_builtin']:6.3f} "
                  f"{row['ppl_other']:10.3f} {row['ppl_other'] / ref['ppl_other']:6.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"reports": {m: r.to_dict() for m, r in reports.items()},
                                                   "frontier": frontier, "other_text": other_name}, indent=2))


def _frontier(src: Path, compressed: Path, work: Path, other: str, threads: int | None) -> dict[str, dict]:
    files = {}
    for name, folder, quant in (("original f16", src, "f16"), ("original q8_0", src, "q8_0"),
                                ("original q4_k_m", src, "q4_k_m"), ("compressed q8_0", compressed, "q8_0"),
                                ("compressed q4_k_m", compressed, "q4_k_m")):
        path = work / f"{name.replace(' ', '-')}.gguf"
        edgelm.convert(str(folder), to="gguf", quant=quant, output=str(path), overwrite=True, eval=False)
        files[name] = path
    return measure(files, other, threads)


def _progress(label: str):
    state = {"last": -1.0, "message": ""}

    def report(message: str, fraction: float) -> None:
        now = time.monotonic()
        if message.split(":")[0] != state["message"] or now - state["last"] > 60:
            print(f"  [{label}] {fraction:5.1%} {message}", file=sys.stderr, flush=True)
            state["last"], state["message"] = now, message.split(":")[0]

    return report


if __name__ == "__main__":
    main()
