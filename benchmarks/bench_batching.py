"""Continuous batching, measured in one run against edgelm's own single stream and llama.cpp's server.

For each model (SmolLM2 Q4_1 as shipped, and a Q8_0 re-quantized from it), 2 threads:
- aggregate decode tok/s of 4 concurrent streams vs 1 stream, in-process and over HTTP   (goal >= 1.6x)
- each concurrent stream's greedy tokens vs its single-stream tokens, 16 prompts         (goal >= 15 of 16)
- time to first token of a request joining 3 running streams vs the same request idle    (goal <= 2x)
- one stream through the scheduler (parallel=4) vs the direct path (parallel=1)           (goal >= 0.97)
- time to first token over HTTP vs llama.cpp's own server, same model and prompt, a 0.2 s pause before each
  request, medians of alternated requests                                                (goal <= +2 ms)
- anchor: llama.cpp's server with -np 4, built from the llama.cpp that llama-cpp-python vendors (cached under
  ~/.cache/edgelm/bench/; skipped with a message where it cannot be built), up at the same time as edgelm's and
  measured alternately with it: edgelm's 4-stream aggregate over HTTP vs its own          (goal >= 1.0)
- --chosen: the file edgelm picks for 4 streams (`convert --quant auto --parallel 4 --max-ppl-increase 10%` from the
  derived HF checkpoint) served by edgelm, vs llama-server -np 4 serving the shipped Q4_1  (goal >= 1.15)

- --ttft: only the time to first token over HTTP, --ttft-requests to each server per model (default 31)

Usage: python benchmarks/bench_batching.py [--runs 3] [--tokens 96] [--threads 2] [--models q4_1,q8_0] [--ttft]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

import edgelm

PROMPTS = [
    "Count from one to two hundred, in words: one, two, three,", "The history of the Roman Empire began",
    "A recipe for bread: first, take", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.",
    "The three laws of thermodynamics are", "Once upon a time, in a small village,", "List of European capitals:",
    "To install Python on Linux, open a terminal and", "The mitochondria is", "Dear hiring manager, I am writing",
    "The rules of chess say that the bishop", "In 1969, the Apollo 11 mission", "Photosynthesis converts",
    "The best way to learn a language is", "SELECT name, age FROM users WHERE", "Water boils at",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- in-process ------------------------------------------------------------------------------------------------

def decode_rate(chunks) -> tuple[float, int, float]:
    """(decode seconds per token after the first, tokens, seconds to first token) of one stream."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for c in chunks:
        n += len(c.tokens)
        now = time.perf_counter()
        if first is None and c.tokens:
            first = now
        last = now
    return (last - first) / max(1, n - 1), n, (first or last) - t0


def aggregate(m, k: int, tokens: int) -> float:
    """Total generated tokens per second of k concurrent greedy streams (distinct prompts)."""
    out: list[int] = []
    streams = [m.stream(PROMPTS[i], temperature=0, max_tokens=tokens) for i in range(k)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda s=s: out.append(sum(len(c.tokens) for c in s))) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(out) / (time.perf_counter() - t0)


def step_cost(m, k: int, steps: int = 8, reps: int = 15) -> float:
    """Seconds of one llama_decode holding the next token of k sequences, straight on the backend (no scheduler,
    no sampling): what the CPU's kernels make of a batch.  Nothing else may run on ``m`` meanwhile."""
    backend = m.backend
    seqs = backend.sequences[:k]
    prompt = m.tokenize(PROMPTS[5])
    times = []
    for _ in range(reps):
        for seq in seqs:
            backend.rewind(seq, 0)
        backend.decode_batch([(seq, prompt, False) for seq in seqs])
        t0 = time.perf_counter()
        for step in range(steps):
            backend.decode_batch([(seq, [100 + step], True) for seq in seqs])
        times.append((time.perf_counter() - t0) / steps)
    for seq in seqs:
        backend.rewind(seq, 0)
    return statistics.median(times)


def identical(single, batched, tokens: int) -> tuple[int, list[str]]:
    want = [single.generate(p, temperature=0, max_tokens=tokens).tokens for p in PROMPTS]
    got = batched.generate_batch(PROMPTS, temperature=0, max_tokens=tokens)
    same, notes = 0, []
    for p, a, b in zip(PROMPTS, want, got):
        if a == b.tokens:
            same += 1
        else:
            at = next((i for i, (x, y) in enumerate(zip(a, b.tokens)) if x != y), min(len(a), len(b.tokens)))
            notes.append(f"{p[:30]!r}: first divergence at token {at}")
    return same, notes


def join_latency(m, tokens: int) -> tuple[float, float]:
    """(TTFT of a request alone, TTFT of the same request joining 3 running streams), medians of 3."""
    idle, joined = [], []
    for _ in range(3):
        m.reset_cache()
        idle.append(decode_rate(m.stream(PROMPTS[5], temperature=0, max_tokens=4))[2])
        m.reset_cache()
        running = [m.stream(PROMPTS[i], temperature=0, max_tokens=tokens) for i in range(3)]
        threads = [threading.Thread(target=lambda s=s: list(s)) for s in running]
        for t in threads:
            t.start()
        time.sleep(0.3)  # they are generating
        joined.append(decode_rate(m.stream(PROMPTS[5], temperature=0, max_tokens=4))[2])
        for t in threads:
            t.join()
    return statistics.median(idle), statistics.median(joined)


# --- over HTTP -------------------------------------------------------------------------------------------------

# one client with pooled keep-alive connections: the time to first token is the server's, not the cost of building
# a client (an SSL context, tens of milliseconds) and a connection per request
CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_keepalive_connections=16))


def http_stream(url: str, model: str, prompt: str, tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed /v1/completions request (usage from the last
    event, which both edgelm and llama.cpp's server send with stream_options.include_usage)."""
    import json

    t0 = time.perf_counter()
    first = None
    n = chunks = 0
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with CLIENT.stream("POST", f"{url}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if any(c.get("text") for c in event.get("choices") or []):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
    return first or 0.0, n or chunks


def http_aggregate(url: str, model: str, k: int, tokens: int) -> float:
    out: list[int] = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: out.append(http_stream(url, model, PROMPTS[i], tokens)[1]))
               for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(out) / (time.perf_counter() - t0)


def start(cmd: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start")


def llama_server() -> Path | None:
    """llama.cpp's server built from the sources llama-cpp-python vendors (the same llama.cpp), cached."""
    import llama_cpp

    version = llama_cpp.__version__
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgelm" / "bench"
    binary = home / f"llama-server-{version}"
    if binary.is_file():
        return binary
    if not shutil.which("cmake"):
        print("anchor     llama-server not built: cmake is missing")
        return None
    print(f"anchor     building llama-server from llama-cpp-python {version}'s sources (minutes, once)...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                            f"llama-cpp-python=={version}"], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode or not sdists:
            print(f"anchor     llama-server not built: could not download the sdist ({r.stderr.strip()[-200:]})")
            return None
        shutil.unpack_archive(sdists[0], tmp)
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        cfg = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]
        for cmd in (cfg, ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                print(f"anchor     llama-server not built: {' '.join(cmd[:3])} failed ({r.stderr.strip()[-300:]})")
                return None
        built = next(build.rglob("llama-server"), None)
        if built is None:
            print("anchor     llama-server not built: no binary came out")
            return None
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, binary)
    return binary


def bench_model(name: str, path: Path, args: argparse.Namespace) -> None:
    print(f"\n== {name}: {path.name}, {args.threads} threads ==", flush=True)
    t = args.tokens
    with edgelm.load(path, threads=args.threads, n_ctx=1024) as single, \
            edgelm.load(path, threads=args.threads, n_ctx=1024, parallel=4) as batched:
        aggregate(batched, 1, 8)  # warm up
        direct, sched, one, four = [], [], [], []
        for _ in range(args.runs):  # alternating, so drift on a noisy machine hits both
            direct.append(decode_rate(single.stream(PROMPTS[0], temperature=0, max_tokens=t))[0])
            sched.append(decode_rate(batched.stream(PROMPTS[0], temperature=0, max_tokens=t))[0])
            one.append(aggregate(batched, 1, t))
            four.append(aggregate(batched, 4, t))
        d, s = statistics.median(direct), statistics.median(sched)
        print(f"scheduler  one stream {1 / s:.1f} tok/s vs direct path {1 / d:.1f} -> {d / s:.3f} (goal >= 0.97)")
        o, f = statistics.median(one), statistics.median(four)
        print(f"in-process 4 streams {f:.1f} tok/s aggregate vs 1 stream {o:.1f} -> {f / o:.2f}x (goal >= 1.6)")
        c1, c4 = step_cost(batched, 1), step_cost(batched, 4)
        print(f"kernels    a step of 4 tokens costs {c4 / c1:.2f}x a step of 1 ({c4 * 1000:.1f} vs "
              f"{c1 * 1000:.1f} ms) on this CPU: on its kernels alone, 4 streams give {4 * c1 / c4:.2f}x one")
        same, notes = identical(single, batched, 48)
        print(f"identical  {same} of {len(PROMPTS)} prompts give the same greedy tokens batched (goal >= 15)")
        for note in notes:
            print(f"           {note}")
        idle, joined = join_latency(batched, t)
        print(f"joining    TTFT {joined * 1000:.0f} ms joining 3 running streams vs {idle * 1000:.0f} ms idle -> "
              f"{joined / idle:.2f}x (goal <= 2)")
    over_http(path, path, args)


TTFT_GOAL_MS = 2.0  # edgelm's time to first token over HTTP at most this much above llama-server's


def over_http(ours: Path, theirs: Path, args: argparse.Namespace, goal: float = 1.0, ttft_only: bool = False) -> None:
    """edgelm serving ``ours`` against llama-server serving ``theirs``, both with 4 slots."""
    t = args.tokens
    # both servers up at once and measured alternately, so drift on a noisy machine hits both alike
    binary = llama_server() if not args.no_anchor else None
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        servers["edgelm"] = start([sys.executable, "-m", "edgelm", "serve", f"bench={ours}", "--port", str(port),
                                   "--threads", str(args.threads), "--n-ctx", "1024", "--parallel", "4", "--no-ui"],
                                  url + "/health"), url
        if binary is not None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            servers["llama-server"] = start([str(binary), "-m", str(theirs), "--port", str(port), "-t",
                                             str(args.threads), "-c", "4096", "-np", "4", "--no-webui"],
                                            url + "/health"), url
        rates: dict[tuple[str, int], list[float]] = {}
        ttft: dict[str, list[float]] = {}
        for name, (_, url) in servers.items():
            http_aggregate(url, "bench", 1, 8)  # warm up
        for _ in range(0 if ttft_only else args.runs):
            for name, (_, url) in servers.items():
                for k in (1, 4):
                    time.sleep(0.2)  # the other server's idle threads stop spinning first
                    rates.setdefault((name, k), []).append(http_aggregate(url, "bench", k, t))
        for _ in range(args.ttft_requests):
            for name, (_, url) in servers.items():
                time.sleep(0.2)  # an idle pause, as between a user's messages: the compute threads are asleep
                ttft.setdefault(name, []).append(http_stream(url, "bench", PROMPTS[5], 2)[0])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    med = {key: statistics.median(v) for key, v in rates.items()}
    if not ttft_only:
        h1, h4 = med["edgelm", 1], med["edgelm", 4]
        print(f"HTTP       4 streams {h4:.1f} tok/s aggregate vs 1 stream {h1:.1f} -> {h4 / h1:.2f}x (goal >= 1.6)")
    ours_ttft = statistics.median(ttft["edgelm"])
    if "llama-server" not in servers:
        print(f"anchor     skipped; edgelm TTFT over HTTP {ours_ttft * 1000:.1f} ms")
        return
    theirs_ttft = statistics.median(ttft["llama-server"])
    quartiles = {name: statistics.quantiles(v, n=4) for name, v in ttft.items()}
    print(f"TTFT       HTTP edgelm {ours_ttft * 1000:.1f} ms vs llama-server {theirs_ttft * 1000:.1f} ms -> "
          f"{(ours_ttft - theirs_ttft) * 1000:+.1f} ms (goal <= +{TTFT_GOAL_MS:g} ms); medians of "
          f"{len(ttft['edgelm'])} alternated requests; quartiles edgelm "
          f"{quartiles['edgelm'][0] * 1000:.1f}-{quartiles['edgelm'][2] * 1000:.1f}, llama-server "
          f"{quartiles['llama-server'][0] * 1000:.1f}-{quartiles['llama-server'][2] * 1000:.1f} ms")
    if ttft_only:
        return
    l1, l4 = med["llama-server", 1], med["llama-server", 4]
    print(f"anchor     llama-server -np 4 on {theirs.name}: 1 stream {l1:.1f} tok/s, 4 streams {l4:.1f} "
          f"({l4 / l1:.2f}x); edgelm on {ours.name}: 1 stream {h1 / l1:.2f}x, 4 streams {h4 / l4:.2f}x its aggregate "
          f"(goal >= {goal})")


def chosen(args: argparse.Namespace, tmp: str) -> None:
    """edgelm's choice for 4 users against llama-server on the file as shipped: from the derived HF checkpoint,
    `convert --quant auto --parallel 4 --max-ppl-increase 10%` (perplexity against the f16 file), served with 4 slots,
    against llama-server -np 4 serving the Q4_1 GGUF."""
    from checkpoints import default_checkpoint

    out = Path(tmp) / "smollm2-for-4.gguf"
    report = edgelm.convert(str(default_checkpoint()), to="gguf", quant="auto", parallel=4, max_ppl_increase="10%",
                            output=str(out))
    print(f"\n== chosen for 4 streams: {report.quant} ({report.ppl_increase * 100:+.1f} % perplexity vs f16) ==")
    for row in report.tried:
        speed = f", {row['tokens_per_second']} tok/s to 4 streams" if "tokens_per_second" in row else ""
        print(f"           {row['quant']:7} {'kept' if row['kept'] else row.get('reason', '')}{speed}")
    over_http(out, edgelm.default_model_path(), args, goal=1.15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="q4_1,q8_0")
    ap.add_argument("--no-anchor", action="store_true", help="skip llama.cpp's server")
    ap.add_argument("--chosen", action="store_true", help="only edgelm's choice for 4 streams vs llama-server on Q4_1")
    ap.add_argument("--ttft", action="store_true", help="only the time to first token over HTTP vs llama-server")
    ap.add_argument("--ttft-requests", type=int, default=31, help="TTFT requests to each server per model")
    args = ap.parse_args()
    q4 = edgelm.default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        if args.chosen:
            chosen(args, tmp)
            return
        for name in args.models.split(","):
            if name == "q4_1":
                path = q4
            else:
                path = Path(tmp) / f"smollm2-{name}.gguf"
                edgelm.convert(str(q4), to="gguf", quant=name, output=str(path), eval=False)
            if args.ttft:
                print(f"\n== {name}: {path.name}, {args.threads} threads ==", flush=True)
                over_http(path, path, args, ttft_only=True)
            else:
                bench_model(name, path, args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
