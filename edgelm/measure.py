"""`edgelm.bench` and `edgelm.evaluate`: speed, memory and quality of models on this machine.

Each benchmarked configuration runs in a fresh child process, so load time and peak RSS are that model's alone
(not the sum of everything loaded before it).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from . import errors, loader
from .errors import EdgelmError, InvalidParameterError
from .optional import require
from .formats.gguf import read_header
from .platforms import cpu_signature
from .platforms.process import peak_rss_bytes
from .quality import eval_text, perplexity
from .home import edgelm_home, write_atomic


@dataclass(frozen=True)
class BenchResult:
    model: str
    backend: str
    quantization: str
    kv_cache: str
    n_ctx: int
    threads: int
    load_seconds: float
    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_second: float  # medians over the runs
    tokens_per_second: float
    time_to_first_token: float
    peak_rss: int  # bytes, of the process that loaded and ran only this model
    kv_cache_bytes: int | None = None
    runs: int = 0
    spread: dict[str, list[float]] = field(default_factory=dict)  # metric -> [min, max]
    speculative: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bench_one(model: str | None, runs: int, prompt_tokens: int, gen_tokens: int, load_kwargs: dict[str, Any],
               speculative: str | None, prompt: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = loader.load(model, **load_kwargs)
    load_seconds = time.perf_counter() - t0
    with m:
        if prompt is None:
            ids = m.tokenize(eval_text(), add_special=False)[:prompt_tokens]
        else:
            ids = m.tokenize(prompt, add_special=False)
        if len(ids) + gen_tokens >= m.n_ctx:
            raise InvalidParameterError(
                f"{len(ids)} prompt + {gen_tokens} generated tokens do not fit n_ctx={m.n_ctx}.",
                fix="Use a smaller --prompt-tokens/--tokens or a larger --n-ctx.", parameter="prompt_tokens",
                value=len(ids),
            )
        pp, tg, ttft, gen = [], [], [], []
        for i in range(runs + 1):  # run 0 warms caches up and is not counted
            m.reset_cache()
            last = None
            for chunk in m.stream_tokens(ids, max_tokens=gen_tokens, temperature=0, speculative=speculative):
                last = chunk
            if i == 0:
                continue
            t, u = last.timings, last.usage
            ttft.append(t.prompt_seconds)
            pp.append(u.prompt_tokens / t.prompt_seconds if t.prompt_seconds else 0.0)
            tg.append(t.tokens_per_second(u.completion_tokens))
            gen.append(u.completion_tokens)
        info = m.info
        return BenchResult(
            model=info.name or os.path.basename(info.path),
            backend=info.backend,
            quantization=info.quantization,
            kv_cache=str(info.extra.get("kv_cache", "f16")),
            n_ctx=info.context_length,
            threads=info.threads,
            load_seconds=load_seconds,
            prompt_tokens=len(ids),
            generated_tokens=int(statistics.median(gen)),
            prompt_tokens_per_second=statistics.median(pp),
            tokens_per_second=statistics.median(tg),
            time_to_first_token=statistics.median(ttft),
            peak_rss=peak_rss_bytes(),
            kv_cache_bytes=info.extra.get("kv_cache_bytes"),
            runs=runs,
            spread={"prompt_tokens_per_second": [min(pp), max(pp)], "tokens_per_second": [min(tg), max(tg)],
                    "time_to_first_token": [min(ttft), max(ttft)]},
            speculative=speculative or info.extra.get("speculative"),
        ).to_dict()


def bench(
    models: Sequence[str | None] | str | None = None,
    *,
    runs: int = 3,
    prompt_tokens: int = 256,
    gen_tokens: int = 64,
    kv_caches: Iterable[str | None] = (None,),
    speculative: str | None = None,
    prompt: str | None = None,
    isolate: bool = True,
    **load_kwargs: Any,
) -> list[BenchResult]:
    """Benchmark each model (default: the embedded one) for each KV cache type; medians of ``runs`` runs.

    ``prompt`` replaces the built-in prompt (the first ``prompt_tokens`` tokens of the evaluation text).
    ``isolate=False`` runs in this process (peak_rss then covers everything this process did).
    """
    if models is None or isinstance(models, str):
        models = [models]
    if not isinstance(runs, int) or runs < 1:
        raise InvalidParameterError(f"Invalid runs: {runs!r}.", fix="runs must be an integer >= 1.",
                                    parameter="runs", value=runs)
    for name, value in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens)):
        if not isinstance(value, int) or value < 1:
            raise InvalidParameterError(f"Invalid {name}: {value!r}.", fix=f"{name} must be an integer >= 1.",
                                        parameter=name, value=value)
    jobs = [(model, runs, prompt_tokens, gen_tokens, {**load_kwargs, "kv_cache": kv}, speculative, prompt)
            for model in models for kv in kv_caches]
    results = []
    for job in jobs:
        if isolate:
            data = _in_child(job)
        else:
            data = _bench_one(*job)
        results.append(BenchResult(**data))
    return results


def _in_child(job: tuple[Any, ...]) -> dict[str, Any]:
    """Run one benchmark in a fresh interpreter (a plain subprocess: no re-import of the caller's __main__)."""
    code = "from edgelm.measure import _child_main; _child_main()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    data = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    if data is None:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise errors.BackendError(f"The benchmark process failed: {tail[0]}", fix="Run with isolate=False to debug.")
    if "error" in data:  # a typed error in the child is the same typed error here
        cls = getattr(errors, data["error"]["type"], errors.EdgelmError)
        raise cls(data["error"]["message"], **data["error"]["details"])
    return data


def _child_main() -> None:
    try:
        out = _bench_one(*json.load(sys.stdin))
    except EdgelmError as exc:
        details = {k: v for k, v in exc.details.items() if isinstance(v, (str, int, float, bool, type(None)))}
        out = {"error": {"type": type(exc).__name__, "message": str(exc), "details": details}}
    print(json.dumps(out))


@dataclass(frozen=True)
class EvalResult:
    model: str
    kv_cache: str
    perplexity: float
    tokens_scored: int
    windows: int
    window: int
    kv_cache_bytes: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(model: str | None = None, *, text: str | None = None, window: int = 512, windows: int | None = 4,
             kv_caches: Iterable[str | None] = (None,), **load_kwargs: Any) -> list[EvalResult]:
    """Perplexity of ``model`` on ``text`` (default: the built-in evaluation text), per KV cache type."""
    out = []
    for kv in kv_caches:
        t0 = time.perf_counter()
        with loader.load(model, kv_cache=kv, **{"n_ctx": max(window, 512), **load_kwargs}) as m:
            r = perplexity(m, text, window=window, windows=windows)
            out.append(EvalResult(
                model=m.info.name or os.path.basename(m.info.path), kv_cache=str(m.info.extra.get("kv_cache", "f16")),
                perplexity=r.perplexity, tokens_scored=r.tokens_scored, windows=r.windows, window=r.window,
                kv_cache_bytes=m.info.extra.get("kv_cache_bytes"), seconds=time.perf_counter() - t0,
            ))
    return out


def plot(results: Sequence[BenchResult], path: str) -> None:
    """A bar chart of decode and prompt tokens/s per configuration (needs matplotlib: edgelm[bench])."""
    matplotlib = require("matplotlib", extra="bench", purpose="--plot (a chart of the results)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r.model}\n{r.quantization} kv={r.kv_cache}" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.2 * len(results) + 2), 4))
    for ax, key, title in ((axes[0], "tokens_per_second", "decode tokens/s"),
                           (axes[1], "prompt_tokens_per_second", "prompt tokens/s")):
        values = [getattr(r, key) for r in results]
        lows = [v - r.spread.get(key, [v, v])[0] for v, r in zip(values, results)]
        highs = [r.spread.get(key, [v, v])[1] - v for v, r in zip(values, results)]
        ax.bar(range(len(values)), values, yerr=[lows, highs], capsize=4, color="#4a7ebb")
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_title(f"{title} (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- batched step costs: what several users cost on this CPU -----------------------------------------------------

STEP_COSTS_NAME = "step-costs.json"
STEP_PROMPT = 64  # tokens in the cache before the timed steps (a serving sequence is never empty)


def step_seconds(model: str | os.PathLike[str], sizes: Sequence[int] = (1, 4), *, threads: int | None = None,
                 runs: int = 7, cache: bool = True) -> dict[int, float]:
    """Median seconds of one llama.cpp step of ``n`` tokens, for each ``n`` in ``sizes``: the cost of serving ``n``
    streams at once.  A weight type whose batched kernel is cheap here (llama.cpp repacks some types for AVX2,
    AVX-512 and NEON) serves several users faster than its one-stream speed suggests.  Measured once per file,
    CPU and thread count, then read from $EDGELM_HOME/step-costs.json (keyed by the file's size and mtime, which a
    rename keeps, so a conversion's measurement serves the file it keeps)."""
    path = os.path.abspath(os.fspath(model))
    st = os.stat(path)
    key = f"{st.st_size}|{st.st_mtime_ns}|{cpu_signature()}|{threads}"
    store = edgelm_home() / STEP_COSTS_NAME
    known: dict[str, Any] = {}
    if cache:
        try:
            known = json.loads(store.read_text())
        except (OSError, ValueError):
            known = {}
    have = known.get(key, {})
    if all(str(n) in have for n in sizes):
        return {n: float(have[str(n)]) for n in sizes}
    m = loader.load(path, threads=threads, n_ctx=STEP_PROMPT + max(sizes) + 8, backend="llamacpp")
    with m:
        backend, seq = m.backend, m.backend.sequences[0]
        ids = (m.tokenize(eval_text(), add_special=False) * 2)[:STEP_PROMPT + max(sizes)]
        backend.evaluate(seq, ids[:STEP_PROMPT])
        out = {}
        for n in sizes:
            times = []
            for i in range(runs + 1):  # the first of each size warms up and is not counted
                t = time.perf_counter()
                backend.evaluate(seq, ids[STEP_PROMPT:STEP_PROMPT + n])
                if i:
                    times.append(time.perf_counter() - t)
                backend.rewind(seq, STEP_PROMPT)
            out[n] = statistics.median(times)
    if cache:
        header = read_header(path)
        known[key] = {**have, **{str(n): s for n, s in out.items()}, "quant": header.quantization,
                      "architecture": header.architecture, "parameters": header.parameters}
        with contextlib.suppress(OSError):
            write_atomic(store, json.dumps(known, indent=1))
    return out


def measured_alternatives(model: str | os.PathLike[str], parallel: int, *,
                          threads: int | None = None) -> list[dict[str, Any]]:
    """Other quantizations of the same model (architecture and parameter count) measured on this CPU, faster than
    ``model`` at ``parallel`` streams, fastest first: {"quant", "speedup"}.  Only what :func:`step_seconds` has
    measured (a conversion with parallel > 1 measures every candidate); nothing is assumed about unmeasured types."""
    try:
        known = json.loads((edgelm_home() / STEP_COSTS_NAME).read_text())
    except (OSError, ValueError):
        return []
    header, cpu = read_header(model), cpu_signature()
    others = [entry for key, entry in known.items()
              if key.split("|", 2)[2] == f"{cpu}|{threads}" and str(parallel) in entry
              and entry.get("architecture") == header.architecture and entry.get("parameters") == header.parameters
              and entry.get("quant") != header.quantization]
    if not others:
        return []  # nothing to compare with: the model itself is not timed
    ours = streams_per_second(step_seconds(model, (1, parallel), threads=threads), parallel)
    out: dict[str, float] = {}
    for entry in others:
        speedup = streams_per_second({parallel: float(entry[str(parallel)])}, parallel) / ours
        if speedup > 1.05:  # within the noise of one measurement each: not worth a hint
            out[entry["quant"]] = max(speedup, out.get(entry["quant"], 0.0))
    return [{"quant": q, "speedup": round(s, 2)} for q, s in sorted(out.items(), key=lambda kv: -kv[1])]


def streams_per_second(costs: dict[int, float], parallel: int) -> float:
    """Tokens per second to ``parallel`` streams from :func:`step_seconds`' figures (one token each per step)."""
    return parallel / costs[parallel]
