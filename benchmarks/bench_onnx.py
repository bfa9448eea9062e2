"""edgelm's ONNX int4 decode speed against onnxruntime-genai's own int4 build run by onnxruntime-genai.

Both models come from the same Hugging Face checkpoint in this run: the reference with the plain
`python -m onnxruntime_genai.models.builder -p int4 -e cpu` (its defaults), edgelm's with `convert_to_onnx(...,
"int4")`.  The reference is decoded by a bare onnxruntime-genai Generator loop; edgelm's through the whole Model API
(`Model.stream_tokens`: UTF-8 decoding, stop handling, usage).  Both get the same threads and the same greedy
prompt; runs alternate and the medians are compared.  Goal: edgelm / genai decode ratio >= 1.0.

Usage: python benchmarks/bench_onnx.py HF_CHECKPOINT_DIR [--runs 7] [--tokens 128] [--threads N] [--keep DIR]
(with tests/hf_fixtures.py present, HF_CHECKPOINT_DIR defaults to the SmolLM2-135M-Instruct checkpoint it derives)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import edgelm
from edgelm.converters.onnx import convert_to_onnx
from edgelm.converters.onnx.builder import BUILDER_MODULE
from edgelm.converters.onnx.options import DEFAULT_ALGO
from edgelm.platforms import default_threads

from checkpoints import default_checkpoint  # benchmarks/checkpoints.py

PROMPT = "<|im_start|>user\nWrite a long story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"


def build_reference(src: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", BUILDER_MODULE, "-i", str(src), "-o", str(out), "-p", "int4", "-e", "cpu",
           "-c", str(out / ".cache")]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def genai_decode(folder: Path, ids: list[int], tokens: int, threads: int) -> tuple[float, float, list[int]]:
    """(prompt tok/s, decode tok/s, tokens) of a bare onnxruntime-genai loop."""
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + tokens + 8, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    out = [int(gen.get_next_tokens()[0])]
    t1 = time.perf_counter()
    for _ in range(tokens - 1):
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (tokens - 1) / (t2 - t1), out


def edgelm_decode(m: edgelm.Model, ids: list[int], tokens: int) -> tuple[float, float, int]:
    m.reset_cache()
    t0 = time.perf_counter()
    first = None
    n = 0
    for chunk in m.stream_tokens(ids, temperature=0, max_tokens=tokens):
        if first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    t2 = time.perf_counter()
    return len(ids) / (first - t0), (n - 1) / (t2 - first), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--keep", help="folder to keep both ONNX builds in (default: a temporary folder)")
    ap.add_argument("--algo", default=DEFAULT_ALGO,
                    help=f"edgelm's int4 rounding (default {DEFAULT_ALGO}, as edgelm convert): gptq, default, ...")
    a = ap.parse_args()
    src = Path(a.checkpoint) if a.checkpoint else default_checkpoint()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    ref, ours = work / "genai-int4", work / "edgelm-int4"
    if not ref.exists():
        t = time.perf_counter()
        build_reference(src, ref)
        print(f"genai builder int4: {time.perf_counter() - t:.1f} s")
    if not ours.exists():
        t = time.perf_counter()
        convert_to_onnx(src, ours, "int4", algo=a.algo)
        print(f"edgelm convert_to_onnx int4 (algo={a.algo}): {time.perf_counter() - t:.1f} s")
    m = edgelm.load(ours, threads=a.threads, n_ctx=1024)
    ids = m.tokenize(PROMPT, add_special=False, parse_special=True)
    g_pp, g_tg, e_pp, e_tg = [], [], [], []
    for i in range(a.runs):
        pp, tg, ref_tokens = genai_decode(ref, ids, a.tokens, a.threads)
        g_pp.append(pp)
        g_tg.append(tg)
        pp, tg, n = edgelm_decode(m, ids, a.tokens)
        e_pp.append(pp)
        e_tg.append(tg)
        print(f"run {i + 1}: genai {g_tg[-1]:.0f} tok/s, edgelm {e_tg[-1]:.0f} tok/s ({n} tokens)", flush=True)
    med = statistics.median
    print(f"\n{m.info.name} int4, {a.threads} threads, {a.tokens} tokens, {a.runs} runs, prompt {len(ids)} tokens")
    print(f"onnxruntime-genai (its own int4 build): prompt {med(g_pp):.0f} tok/s, decode {med(g_tg):.0f} tok/s")
    print(f"edgelm onnxruntime backend:            prompt {med(e_pp):.0f} tok/s, decode {med(e_tg):.0f} tok/s")
    print(f"decode ratio edgelm / genai: {med(e_tg) / med(g_tg):.3f}  (goal >= 1.0)")
    m.close()


if __name__ == "__main__":
    main()
