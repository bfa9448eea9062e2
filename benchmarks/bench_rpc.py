"""A model split across llama.cpp RPC workers against the same model run here, measured in the same run.

1. One loopback worker holding every layer vs the model in this process: decode tokens/s, alternating runs (goal:
   worker / local >= 0.9; what remains is the protocol's cost per token, and edgelm's child process).
2. Two workers whose --mem caps force a split: greedy tokens identical to local, and their speed (on a machine with
   few cores the two workers' threads and this process fight for the same cores, which separate boards would not;
   RPC pools memory, it does not add speed).
3. Load time with one worker, without and with the worker's tensor cache (--cache: weights above 10 MB are sent
   once and then found by hash).

Usage: python benchmarks/bench_rpc.py [MODEL.gguf] [--runs 5] [--tokens 128] [--threads 2] [--json]
Needs the RPC backend (edgelm install-rpc).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import edgelm

PROMPT = "Count from one to two hundred, in words: one, two, three,"


class Worker:
    def __init__(self, threads: int, mem: str | None = None, cache: str | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "edgelm", "worker", "--port", str(self.port), "--threads", str(threads)]
        cmd += ["--mem", mem] if mem else []
        cmd += ["--cache", cache] if cache else []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                if "edgelm worker listening on" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120):
            self.stop()
            raise RuntimeError("the worker did not start")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def decode(m: edgelm.Model, tokens: int) -> tuple[float, list[int]]:
    """(seconds per token after the first, the token ids), streaming greedy from a fresh cache."""
    m.reset_cache()
    first = last = None
    ids: list[int] = []
    for chunk in m.stream(PROMPT, max_tokens=tokens, temperature=0):
        now = time.perf_counter()
        first = first or now
        last = now
        ids.extend(chunk.tokens)
    return (last - first) / max(1, len(ids) - 1), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loads", type=int, default=3, help="loads per variant in part 3")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object at the end")
    args = ap.parse_args()
    path = str(args.model or edgelm.default_model_path())
    opts = {"n_ctx": 512, "threads": args.threads}
    out: dict[str, object] = {"model": os.path.basename(path), "threads": args.threads, "tokens": args.tokens,
                              "cpus": os.cpu_count()}

    # 1. one worker holding every layer vs local (and vs local in a child process: edgelm's isolation alone)
    from edgelm.runtimes import LoadOptions
    from edgelm.runtimes.isolated import IsolatedBackend

    local = edgelm.load(path, **opts)
    child = edgelm.Model(IsolatedBackend.start("llamacpp", Path(path), LoadOptions(**opts)), local.info)
    w = Worker(args.threads)
    remote = edgelm.load(path, workers=[w.endpoint], **opts)
    parts = remote.info.extra["rpc"]["parts"]
    assert parts[1]["n_layers"] == 30 and parts[1]["output_layer"], parts
    loc, iso, rem = [], [], []
    ref = None
    for i in range(args.runs + 1):  # run 0 warms them up
        a, ids_local = decode(local, args.tokens)
        c, ids_child = decode(child, args.tokens)
        b, ids_remote = decode(remote, args.tokens)
        ref = ref or ids_local
        assert ids_remote == ids_local == ids_child == ref, "greedy tokens differ from local"
        if i:
            loc.append(a)
            iso.append(c)
            rem.append(b)
        print(f"run {i}: local {1 / a:7.1f} tok/s   local in a child process {1 / c:7.1f} tok/s   "
              f"one worker (every layer) {1 / b:7.1f} tok/s")
    ml, mc, mr = statistics.median(loc), statistics.median(iso), statistics.median(rem)
    out["local_tok_s"], out["child_tok_s"], out["one_worker_tok_s"] = round(1 / ml, 1), round(1 / mc, 1), round(1 / mr, 1)
    out["one_worker_ratio"], out["child_ratio"] = round(ml / mr, 3), round(ml / mc, 3)
    out["per_token_cost_ms"] = round((mr - ml) * 1000, 3)
    print(f"\nmedian decode: local {1 / ml:.1f} tok/s, local in a child process {1 / mc:.1f} tok/s, one loopback "
          f"worker {1 / mr:.1f} tok/s")
    print(f"ratio worker / local = {ml / mr:.3f}  (goal >= 0.9); cost per token {1000 * (mr - ml):.2f} ms, of which "
          f"the child process {1000 * (mc - ml):.2f} ms")
    remote.close()
    child.close()
    w.stop()

    # 2. two capped workers: split, same tokens
    a_w, b_w = Worker(args.threads, mem="180MB"), Worker(args.threads, mem="180MB")
    split = edgelm.load(path, workers=[a_w.endpoint, b_w.endpoint], **opts)
    layers = [(p["device"], p["n_layers"], p["output_layer"]) for p in split.info.extra["rpc"]["parts"]]
    times = []
    for i in range(args.runs + 1):
        t, ids = decode(split, args.tokens)
        assert ids == ref, "the split model's greedy tokens differ from local"
        if i:
            times.append(t)
        print(f"run {i}: two workers (split) {1 / t:7.1f} tok/s")
    ms = statistics.median(times)
    out["two_workers_tok_s"], out["two_workers_ratio"] = round(1 / ms, 1), round(ml / ms, 3)
    out["two_workers_layers"] = layers
    print(f"\nsplit {layers}: median {1 / ms:.1f} tok/s ({ml / ms:.2f}x local), greedy tokens identical to local")
    print(f"note: {os.cpu_count()} CPUs here: this process and both workers' {args.threads} threads share them; "
          "separate boards would not fight for cores.")
    split.close()
    a_w.stop()
    b_w.stop()
    local.close()

    # 3. load time, with and without the worker's tensor cache
    with tempfile.TemporaryDirectory() as cache:
        plain, cached = Worker(args.threads), Worker(args.threads, cache=cache)

        def load_seconds(endpoint: str) -> float:
            t = time.perf_counter()
            with edgelm.load(path, workers=[endpoint], **opts):
                return time.perf_counter() - t

        cold = load_seconds(cached.endpoint)  # fills the cache
        without = [load_seconds(plain.endpoint) for _ in range(args.loads)]
        warm = [load_seconds(cached.endpoint) for _ in range(args.loads)]
        cached_files = len(os.listdir(cache))
        plain.stop()
        cached.stop()
    out["load_s_without_cache"] = round(statistics.median(without), 2)
    out["load_s_cache_cold"] = round(cold, 2)
    out["load_s_cache_warm"] = round(statistics.median(warm), 2)
    print(f"\nload with one worker: {statistics.median(without):.2f} s without the tensor cache, {cold:.2f} s filling it, "
          f"{statistics.median(warm):.2f} s with it warm ({cached_files} tensor(s) cached: only tensors above 10 MB go "
          "by hash)")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
