"""int4 quality on text the calibration never saw: every ONNX setting against fp32, and llama.cpp's q4_k_m.

For each setting (fp32, fp16, int8, int4 round-to-nearest, int4 GPTQ with every matrix 4-bit (edgelm's default int4),
int4 GPTQ with mixed_precision=True (8-bit input embedding and late MLP down projections), llama.cpp f16 and q4_k_m from the same weights), converted from the same Hugging Face
checkpoint (or reused from --keep), it prints perplexity on the built-in evaluation text (Python Language Reference) and on
an out-of-domain text (default: the GPL-3 licence text as Debian/Ubuntu ship it, /usr/share/common-licenses/GPL-3),
each with its ratio to fp32 (the ONNX fp32 export; the q4_k_m row against llama.cpp's f16 of the same weights),
the size on disk, and decode tokens/s as a ratio to "int4-gptq-plain" (the default int4), decoded
alternately in one process with the same threads and prompt, medians.  The calibration text is edgelm's default
(Python docstrings), never the evaluation texts.

Goal (issue 18): int4 GPTQ within 1.12x of fp32 on the out-of-domain text, decode >= 0.9x the plain GPTQ int4,
in-domain ratio <= 1.10x.

Usage: python benchmarks/bench_int4_quality.py [HF_DIR] [--ood FILE] [--runs 5] [--tokens 128] [--threads N]
       [--keep DIR] [--only fp32,int4-gptq ...]
(with tests/hf_fixtures.py present, HF_DIR defaults to the SmolLM2-135M-Instruct checkpoint it derives)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import edgelm
from edgelm.converters.onnx import convert_to_onnx
from edgelm.platforms import default_threads
from edgelm.quality import perplexity

from checkpoints import default_checkpoint  # benchmarks/checkpoints.py

PROMPT = "<|im_start|>user\nWrite a long story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_OOD = Path("/usr/share/common-licenses/GPL-3")
REFERENCE = "int4-gptq-plain"  # decode speed ratios are against this: the default int4


def settings() -> dict[str, dict]:
    """name -> how to convert it (ONNX options, or a GGUF type)."""
    return {
        "fp32": {"onnx": "fp32"},
        "fp16": {"onnx": "fp16"},
        "int8": {"onnx": "int8", "algo": "default"},
        "int4-rtn": {"onnx": "int4", "algo": "default"},
        REFERENCE: {"onnx": "int4", "algo": "gptq", "mixed_precision": False},
        "int4-gptq": {"onnx": "int4", "algo": "gptq", "mixed_precision": True},
        "gguf-f16": {"gguf": "f16"},
        "gguf-q4_k_m": {"gguf": "q4_k_m"},
    }


def build(src: Path, out: Path, how: dict) -> float:
    t = time.perf_counter()
    if "onnx" in how:
        convert_to_onnx(src, out, how["onnx"], **{k: v for k, v in how.items() if k != "onnx"})
    else:
        edgelm.convert(str(src), to="gguf", quant=how["gguf"], output=str(out), eval=False)
    return time.perf_counter() - t


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def decode(m: edgelm.Model, ids: list[int], tokens: int) -> float:
    m.reset_cache()
    first = None
    n = 0
    for chunk in m.stream_tokens(ids, temperature=0, max_tokens=tokens):
        if first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return (n - 1) / (time.perf_counter() - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--ood", type=Path, default=DEFAULT_OOD, help=f"out-of-domain text file (default {DEFAULT_OOD})")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--keep", help="folder to keep the converted models in, and reuse them from (default: temporary)")
    ap.add_argument("--only", help="comma-separated settings to run (default: all)")
    a = ap.parse_args()
    if not a.ood.is_file():
        sys.exit(f"No out-of-domain text at {a.ood}: pass --ood FILE (any long English text of another kind than "
                 "the Python reference, e.g. a licence).")
    ood = a.ood.read_text(encoding="utf-8")
    src = Path(a.checkpoint) if a.checkpoint else default_checkpoint()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-int4-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    todo = settings()
    if a.only:
        wanted = a.only.split(",")
        todo = {k: v for k, v in todo.items() if k in wanted or (k in ("fp32", "gguf-f16") and
                                                                  any(w.startswith("gguf") == (k == "gguf-f16")
                                                                      for w in wanted))}
    rows: dict[str, dict] = {}
    for name, how in todo.items():
        out = work / (name + (".gguf" if "gguf" in how else ""))
        row = rows[name] = {"convert_s": None}
        if not out.exists():
            print(f"converting {name} ...", flush=True)
            row["convert_s"] = build(src, out, how)
        row["size"] = size(out)
        with edgelm.load(out, threads=a.threads, n_ctx=1024) as m:
            row["ppl_in"] = perplexity(m).perplexity
            row["ppl_ood"] = perplexity(m, ood).perplexity
        print(f"{name}: perplexity {row['ppl_in']:.3f} / {row['ppl_ood']:.3f} (built-in / out-of-domain), "
              f"{row['size'] / 1e6:.1f} MB", flush=True)
    speeds: dict[str, list[float]] = {name: [] for name in rows if name not in ("fp32", "fp16", "gguf-f16")}
    models = {name: edgelm.load(work / (name + (".gguf" if name.startswith("gguf") else "")), threads=a.threads,
                                n_ctx=1024) for name in speeds}
    for i in range(a.runs):
        for name, m in models.items():
            ids = m.tokenize(PROMPT, add_special=False, parse_special=True)
            speeds[name].append(decode(m, ids, a.tokens))
        print(f"run {i + 1}: " + ", ".join(f"{n} {s[-1]:.0f}" for n, s in speeds.items()), flush=True)
    for m in models.values():
        m.close()
    med = {name: statistics.median(s) for name, s in speeds.items()}
    ref_speed = med.get(REFERENCE)
    print(f"\n{src.name}, out-of-domain text {a.ood}, {a.threads} threads, decode medians of {a.runs} x {a.tokens} "
          "tokens\n")
    print("| setting | built-in ppl | vs fp32 | out-of-domain ppl | vs fp32 | size MB | decode tok/s | vs "
          f"{REFERENCE} | convert s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        ref = rows.get("gguf-f16" if name.startswith("gguf") else "fp32")
        ratio = (lambda k: f"{row[k] / ref[k]:.3f}x" if ref else "")  # noqa: E731
        speed = med.get(name)
        tok_s = f"{speed:.0f}" if speed else ""
        vs = f"{speed / ref_speed:.3f}" if speed and ref_speed else ""
        seconds = f"{row['convert_s']:.0f}" if row["convert_s"] else ""
        print(f"| {name} | {row['ppl_in']:.3f} | {ratio('ppl_in')} | {row['ppl_ood']:.3f} | {ratio('ppl_ood')} | "
              f"{row['size'] / 1e6:.1f} | {tok_s} | {vs} | {seconds} |")


if __name__ == "__main__":
    main()
