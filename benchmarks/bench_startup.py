"""Cold start: edgelm against a raw llama-cpp-python script on the same GGUF, each in a fresh process, alternated.

Three pairs, each timed as a whole child process (interpreter start included), medians over --runs:
- `import edgelm` against `import llama_cpp`, timed inside the child     (goal: edgelm <= 150 ms)
- `edgelm.load(...)` + one generated token against `llama_cpp.Llama(...)` + one token      (goal: <= 1.2x)
- `edgelm run --raw MODEL "Hi" -n 1` against a script doing the same with llama_cpp            (goal: <= 1.3x)

Both sides run from compiled bytecode, as installed packages do (pip compiles them at install; an editable
checkout under PYTHONDONTWRITEBYTECODE=1 would otherwise compile edgelm's modules in every child): the children
write and read their bytecode under a temporary PYTHONPYCACHEPREFIX, filled by the warm-up runs.  The CLI is the
console script next to this interpreter (a version manager's shim, e.g. pyenv's, is a shell script that adds its
own start-up to every call).

Usage: python benchmarks/bench_startup.py [MODEL.gguf] [--runs 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import edgelm

# the import alone, timed inside the child (its interpreter start is not edgelm's)
IMPORT_EDGELM = "import time; t = time.perf_counter(); import edgelm; print(time.perf_counter() - t)"
IMPORT_RAW = "import time; t = time.perf_counter(); import llama_cpp; print(time.perf_counter() - t)"
LOAD_EDGELM = """
import sys, edgelm
m = edgelm.load(sys.argv[1], threads=int(sys.argv[2]), n_ctx=512)
m.generate("Hi", max_tokens=1, temperature=0)
"""
LOAD_RAW = """
import sys, llama_cpp
m = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]), verbose=False)
m.create_completion("Hi", max_tokens=1, temperature=0)
"""


ENV = dict(os.environ)


def seconds(cmd: list[str]) -> float:
    """The child's wall time, or the time it printed itself (the import pair)."""
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=ENV).stdout
    took = time.perf_counter() - t
    printed = out.strip().splitlines()[-1:] if "import time" in " ".join(cmd) else []
    return float(printed[0]) if printed else took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = str(args.model or edgelm.default_model_path())
    py = sys.executable
    ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    cache = ENV["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="bench-startup-pyc-")
    script = Path(py).parent / "edgelm"
    cli = str(script) if script.is_file() else shutil.which("edgelm") or "edgelm"
    pairs = {
        "import": ([py, "-c", IMPORT_EDGELM], [py, "-c", IMPORT_RAW]),
        "load + first token": ([py, "-c", LOAD_EDGELM, path, str(args.threads)],
                               [py, "-c", LOAD_RAW, path, str(args.threads)]),
        # --raw: the same two-token prompt as the raw script (a chat template would add a system prompt to read)
        "CLI run -n 1": ([cli, "run", "--raw", path, "Hi", "-n", "1", "-t", "0", "--threads", str(args.threads)],
                         [py, "-c", LOAD_RAW, path, str(args.threads)]),
    }
    try:
        goals = {"import": None, "load + first token": 1.2, "CLI run -n 1": 1.3}
        for name, (ours, raw) in pairs.items():
            seconds(ours), seconds(raw)  # warm the page cache and compile the bytecode for both
            a, b = [], []
            for _ in range(args.runs):  # alternated, so the machine's drift hits both alike
                a.append(seconds(ours))
                b.append(seconds(raw))
            ma, mb = statistics.median(a), statistics.median(b)
            goal = goals[name]
            verdict = (f"goal edgelm <= 0.150 s: {'met' if ma <= 0.150 else 'NOT met'}" if goal is None else
                       f"goal <= {goal}x: {'met' if ma / mb <= goal else 'NOT met'}")
            print(f"{name:<20} edgelm {ma:6.3f} s   raw {mb:6.3f} s   ratio {ma / mb:5.2f}   ({verdict})")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
