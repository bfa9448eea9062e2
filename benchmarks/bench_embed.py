"""Embeddings, measured in one run against llama-cpp-python's own Llama.embed on the same model.

- vectors: cosine of every input's edgelm vector with Llama.embed's, same pooling (mean, cls, last)   (goal >= 0.9999)
- 32 short inputs: edgelm Model.embed vs Llama.embed, inputs per second, in-process                  (goal >= 1.0x)
- the same over HTTP: POST /v1/embeddings to `edgelm serve` vs Llama.embed in-process               (goal >= 0.9x)
- 1,000 inputs over HTTP in requests of 10: the rate of the last hundred vs the first hundred, and the
  server's resident memory after the first hundred and at the end                                   (steady, flat)

Usage: python benchmarks/bench_embed.py [--runs 7] [--threads 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

import edgelm

POOLING = {"mean": 1, "cls": 2, "last": 3}  # llama.cpp's pooling types
TOPICS = ["the harbour at dawn", "a recipe for rye bread", "why the sky is blue", "sorting a list in Python",
          "the rules of chess", "a letter to a landlord", "the Apollo 11 landing", "how vaccines work"]


def texts(n: int, offset: int = 0) -> list[str]:
    return [f"Note {offset + i}: a few words about {TOPICS[(offset + i) % len(TOPICS)]}, written on day "
            f"{(offset + i) % 31 + 1}." for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reference(path: Path, pooling: str, threads: int):
    import llama_cpp

    return llama_cpp.Llama(str(path), embedding=True, pooling_type=POOLING[pooling], n_ctx=2048, n_batch=2048,
                           n_ubatch=2048, n_threads=threads, n_threads_batch=threads, verbose=False)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


class Server:
    def __init__(self, path: Path, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("edgelm")
        cmd = [exe] if exe else [sys.executable, "-m", "edgelm"]
        self.proc = subprocess.Popen([*cmd, "serve", f"m={path}", "--port", str(self.port), "--threads",
                                      str(threads), "--n-ctx", "2048", "--parallel", "1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("edgelm serve did not start")
            time.sleep(0.1)

    def embed(self, client: httpx.Client, inputs: list[str]) -> None:
        r = client.post(self.url + "/v1/embeddings", json={"model": "m", "input": inputs})
        r.raise_for_status()
        assert len(r.json()["data"]) == len(inputs)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: the embedded SmolLM2)")
    args = ap.parse_args()
    path = args.model or edgelm.default_model_path()
    batch = texts(32)
    print(f"model {path.name}, {args.threads} threads, {args.runs} runs, medians")

    with edgelm.load(path, threads=args.threads, n_ctx=2048, parallel=1) as m:
        print("\nvectors vs Llama.embed (same pooling, same 32 inputs):")
        for pooling in POOLING:
            ours = m.embed(batch, pooling=pooling, normalize=False)
            ref = reference(path, pooling, args.threads)
            theirs = np.array(ref.embed(batch, normalize=False), dtype=np.float32)
            ref.close()
            worst = cosines(ours, theirs).min()
            print(f"  {pooling:5} min cosine {worst:.7f}  {'ok' if worst >= 0.9999 else 'MISSED (goal >= 0.9999)'}")

        ref = reference(path, "mean", args.threads)
        server = Server(path, args.threads)
        try:
            with httpx.Client(timeout=120) as client:
                m.embed(batch), ref.embed(batch), server.embed(client, batch)  # warm-up (the server loads its model)
                ours, theirs, http = [], [], []
                for _ in range(args.runs):  # alternating, so drift in the machine's load hits all three alike
                    for rates, embed in ((ours, m.embed), (theirs, ref.embed),
                                         (http, lambda b: server.embed(client, b))):
                        t = time.perf_counter()
                        embed(batch)
                        rates.append(len(batch) / (time.perf_counter() - t))
                base = statistics.median(theirs)
                n_tokens = sum(len(m.tokenize(t)) for t in batch)
                print(f"\n32 short inputs ({n_tokens} tokens), inputs/s:")
                print(f"  Llama.embed (in-process)    {base:8.1f}")
                r = statistics.median(ours) / base
                print(f"  edgelm Model.embed          {statistics.median(ours):8.1f}  {r:.3f}x  "
                      f"{'ok' if r >= 1.0 else 'MISSED (goal >= 1.0x)'}")
                r = statistics.median(http) / base
                print(f"  edgelm /v1/embeddings HTTP  {statistics.median(http):8.1f}  {r:.3f}x  "
                      f"{'ok' if r >= 0.9 else 'MISSED (goal >= 0.9x)'}")

                print("\n1,000 inputs over HTTP, requests of 10:")
                rates, rss = [], []
                for i in range(100):
                    t = time.perf_counter()
                    server.embed(client, texts(10, offset=i * 10))
                    rates.append(10 / (time.perf_counter() - t))
                    if i in (9, 99):
                        rss.append(rss_mb(server.proc.pid))
                first, last = statistics.median(rates[:10]), statistics.median(rates[-10:])
                print(f"  inputs/s first hundred {first:.1f}, last hundred {last:.1f} ({last / first:.2f}x)")
                print(f"  server RSS after 100 inputs {rss[0]:.1f} MB, after 1,000 {rss[1]:.1f} MB "
                      f"({rss[1] - rss[0]:+.1f} MB)")
        finally:
            server.stop()
            ref.close()


if __name__ == "__main__":
    main()
