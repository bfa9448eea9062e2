"""The local API against in-process streaming on the same model, measured in the same run.

- decode tokens/s streamed over HTTP (openai client, chat completions) vs in-process  (goal >= 0.95)
- added time to first token, median                                                   (goal <= 15 ms)
- aggregate tokens/s with 4 concurrent streams vs 1                                    (must not collapse)
- server RSS after 500 requests vs after 10                                            (goal < 10 % growth)
- anchor: llama-cpp-python's own server on the same GGUF, when its [server] extra is installed

Usage: python benchmarks/bench_server.py [MODEL.gguf] [--runs 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai

import edgelm

PROMPT = [{"role": "user", "content": "Count from one to two hundred, in words."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))


def http_stream(client: openai.OpenAI, model: str, tokens: int) -> tuple[float, float, int]:
    """(time to first content, decode seconds per token, chunks) of one streamed chat completion."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=tokens, temperature=0,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    return first - t0, (last - first) / max(1, n - 1), n


def local_stream(m: edgelm.Model, tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in m.stream_chat(PROMPT, max_tokens=tokens, temperature=0):
        if chunk.text:
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    return first - t0, (last - first) / max(1, n - 1), n


def aggregate(client: openai.OpenAI, model: str, streams: int, tokens: int) -> float:
    counts = []

    def one(i: int) -> None:
        r = client.completions.create(model=model, prompt=f"Story {i}: Once upon a time", max_tokens=tokens, seed=i,
                                      temperature=0.8)
        counts.append(r.usage.completion_tokens)

    t = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = str(args.model or edgelm.default_model_path())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = shutil.which("edgelm") or sys.executable
    cmd = [exe] if exe != sys.executable else [sys.executable, "-m", "edgelm"]
    server = start([*cmd, "serve", f"bench={path}", "--port", str(port), "--threads", str(args.threads),
                    "--n-ctx", "1024"], url + "/health")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        m = edgelm.load(path, threads=args.threads, n_ctx=1024)
        http_stream(client, "bench", 8)
        local_stream(m, 8)  # warm-ups
        h_ttft, h_tpt, l_ttft, l_tpt = [], [], [], []
        for _ in range(args.runs):  # alternate, so load on the machine hits both alike
            a, b, _ = http_stream(client, "bench", args.tokens)
            c, d, _ = local_stream(m, args.tokens)
            h_ttft.append(a), h_tpt.append(b), l_ttft.append(c), l_tpt.append(d)
        m.close()
        ratio = statistics.median(l_tpt) / statistics.median(h_tpt)
        print(f"decode     HTTP {1 / statistics.median(h_tpt):.1f} tok/s vs in-process "
              f"{1 / statistics.median(l_tpt):.1f} -> {ratio:.3f} (goal >= 0.95)")
        added = statistics.median(a - c for a, c in zip(h_ttft, l_ttft)) * 1000
        print(f"TTFT       HTTP {statistics.median(h_ttft) * 1000:.1f} ms vs in-process "
              f"{statistics.median(l_ttft) * 1000:.1f} ms -> added {added:.1f} ms median (goal <= 15 ms)")
        one = statistics.median(aggregate(client, "bench", 1, 64) for _ in range(3))
        four = statistics.median(aggregate(client, "bench", 4, 64) for _ in range(3))
        print(f"concurrent 4 streams {four:.1f} tok/s aggregate vs 1 stream {one:.1f} -> {four / one:.2f} "
              "(queued fairly per model: ~1.0 expected, must not collapse)")
        for _ in range(10):
            client.completions.create(model="bench", prompt="Hi", max_tokens=4)
        r10 = rss(server.pid)
        for i in range(490):
            client.completions.create(model="bench", prompt=f"Hi {i}", max_tokens=4)
        r500 = rss(server.pid)
        print(f"memory     server RSS {r10 / 2**20:.1f} MB after 10 requests, {r500 / 2**20:.1f} MB after 500 -> "
              f"{(r500 / r10 - 1) * 100:+.1f} % (goal < 10 %)")
    finally:
        server.terminate()
        server.wait(10)
    anchor(path, args)


def anchor(path: str, args: argparse.Namespace) -> None:
    try:
        import llama_cpp.server.app  # noqa: F401  (needs fastapi, sse-starlette, starlette-context)
    except ImportError as exc:
        print(f"anchor     llama-cpp-python's server not run: {exc} (pip install 'llama-cpp-python[server]')")
        return
    port = free_port()
    # its AMX buffers crash on AMX CPUs (see bench_llamacpp.py): run it with extra buffers off, like edgelm
    code = ("import llama_cpp, llama_cpp.llama_cpp as b, runpy, sys\n"
            "from edgelm.native.llamacpp import amx_present\n"
            "o = b.llama_model_default_params\n"
            "def p():\n    x = o(); x.use_extra_bufts = not amx_present(); return x\n"
            "b.llama_model_default_params = p\n"
            f"sys.argv = ['x', '--model', {path!r}, '--port', '{port}', '--n_threads', '{args.threads}',"
            " '--n_ctx', '1024', '--model_alias', 'bench']\n"
            "runpy.run_module('llama_cpp.server', run_name='__main__')\n")
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-c", code], url + "/v1/models")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        http_stream(client, "bench", 8)
        runs = [http_stream(client, "bench", args.tokens) for _ in range(args.runs)]
        print(f"anchor     llama-cpp-python server: {1 / statistics.median(r[1] for r in runs):.1f} tok/s, "
              f"TTFT {statistics.median(r[0] for r in runs) * 1000:.1f} ms")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
