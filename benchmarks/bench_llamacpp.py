"""edgelm's overhead over raw llama-cpp-python: stream 128 tokens through both, alternating, same GGUF and threads.

Prints the median time per decoded token of each and their ratio (goal: edgelm / raw <= 1.03).
Usage: python benchmarks/bench_llamacpp.py [MODEL.gguf] [--runs 7] [--tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp

import edgelm
from edgelm.native.llamacpp import amx_present

PROMPT = "Count from one to two hundred, in words: one, two, three,"


def patch_raw_params() -> None:
    """Give raw llama_cpp.Llama the same model params edgelm uses (its AMX buffers crash on AMX CPUs)."""
    if not amx_present():
        return
    bindings = llama_cpp.llama_cpp  # the module llama_cpp.Llama calls through
    original = bindings.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    bindings.llama_model_default_params = params


def time_stream(chunks, count_tokens) -> tuple[float, int]:
    """Seconds per decoded token after the first, and the tokens decoded.

    Chunks are not always tokens (llama_cpp.Llama holds text back while it checks stop strings), so the tokens are
    counted by re-tokenizing the streamed text.
    """
    first = last = None
    parts = []
    for chunk in chunks:
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        parts.append(chunk.text if hasattr(chunk, "text") else chunk["choices"][0]["text"])
    n = count_tokens("".join(parts))
    return (last - first) / max(1, n - 1), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = str(args.model or edgelm.default_model_path())
    patch_raw_params()
    m = edgelm.load(path, threads=args.threads, n_ctx=1024)
    # flash attention on in both: edgelm lets llama.cpp decide (it enables it on CPU), Llama defaults to off
    raw = llama_cpp.Llama(path, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True,
                          verbose=False)
    def count(text: str) -> int:
        return len(m.tokenize(text, add_special=False))

    ours, theirs = [], []
    for i in range(args.runs + 1):  # run 0 warms both up and is not counted
        a, na = time_stream(m.stream(PROMPT, max_tokens=args.tokens, temperature=0), count)
        raw.reset()
        b, nb = time_stream(raw.create_completion(PROMPT, max_tokens=args.tokens, temperature=0, stream=True), count)
        if i:
            ours.append(a)
            theirs.append(b)
        print(f"run {i}: edgelm {1 / a:7.1f} tok/s ({na} tokens)   llama_cpp.Llama {1 / b:7.1f} tok/s ({nb} tokens)")
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"\nmedian decode: edgelm {1 / mo:.1f} tok/s, llama_cpp.Llama {1 / mt:.1f} tok/s")
    print(f"time-per-token ratio edgelm / llama_cpp.Llama = {mo / mt:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
