"""Structured output: decode speed under a JSON schema against unconstrained decoding, in one run, on both backends,
and llama.cpp's own server's ratio for the same schema.

- edgelm, llama.cpp backend (SmolLM2 Q4_1 as shipped) and onnxruntime backend (int4 ONNX converted from the same
  checkpoint, round-to-nearest): decode tok/s of a chat answer constrained by SCHEMA vs the same prompt unconstrained, runs
  alternating, medians                                                                          (goal >= 0.9x)
- anchor: llama.cpp's server (built from the llama.cpp llama-cpp-python vendors, as bench_batching.py does; its
  response_format json_schema becomes a GBNF grammar) with the same schema and prompt, its own timings'
  predicted_per_second, same runs                                         (goal: edgelm's ratio >= llama-server's)
- time to first token with 10 tools in the request, edgelm's server vs llama-server: :func:`ttft_with_tools`
  (--tools-ttft; meaningful once edgelm renders tools into the prompt: it reports both servers' prompt sizes)

Decode speed is measured after the first token (prompt evaluation excluded), both constrained and not, so the ratio
is the per-token cost of the token masks (llguidance) and nothing else.

Usage: python benchmarks/bench_structured.py [--runs 5] [--tokens 128] [--threads 2] [--onnx DIR] [--no-onnx]
       [--no-anchor] [--tools-ttft]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

import edgelm
from edgelm import Constraint

from bench_batching import free_port, llama_server, start  # benchmarks/bench_batching.py

# an answer long enough to measure (a list of at least 12 records), small enough for a 135M model to fill
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array", "minItems": 12, "maxItems": 20,
            "items": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 16},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "city": {"type": "string", "maxLength": 16},
                "member": {"type": "boolean"}},
                "required": ["name", "age", "city", "member"]},
        },
    },
    "required": ["people"],
}
MESSAGES = [{"role": "user", "content": "List twelve people as JSON: name, age, city, and whether they are members."}]

# ten tools of the usual shape (a name, a description, a JSON schema of the arguments), for the time to first token
TEN_TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {p: {"type": t, "description": f"The {p}."} for p, t in props},
        "required": [props[0][0]]}}}
    for name, desc, props in [
        ("get_weather", "Get the current weather in a city.", [("city", "string"), ("unit", "string")]),
        ("get_time", "Get the local time in a time zone.", [("timezone", "string")]),
        ("search_web", "Search the web and return the top results.", [("query", "string"), ("count", "integer")]),
        ("send_email", "Send an email.", [("to", "string"), ("subject", "string"), ("body", "string")]),
        ("create_event", "Create a calendar event.", [("title", "string"), ("start", "string"), ("minutes", "integer")]),
        ("convert_currency", "Convert an amount between currencies.", [("amount", "number"), ("from", "string"),
                                                                        ("to", "string")]),
        ("read_file", "Read a text file.", [("path", "string")]),
        ("run_sql", "Run a read-only SQL query.", [("query", "string")]),
        ("set_timer", "Set a timer.", [("seconds", "integer"), ("label", "string")]),
        ("translate", "Translate text.", [("text", "string"), ("target_language", "string")]),
    ]
]


def decode_rate(m: edgelm.Model, constraint: Constraint | None, tokens: int) -> tuple[float, int]:
    """(decode tok/s after the first token, tokens) of one greedy chat answer, in-process."""
    first = last = None
    n = 0
    for c in m.stream_chat(MESSAGES, temperature=0, max_tokens=tokens, constraint=constraint):
        now = time.perf_counter()
        if c.tokens:
            n += len(c.tokens)
            if first is None:
                first = now
                n_first = n
            last = now
    if first is None or last is None or last <= first:
        return 0.0, n
    return (n - n_first) / (last - first), n


def bench_backend(label: str, m: edgelm.Model, runs: int, tokens: int) -> float:
    schema = Constraint.json_schema(SCHEMA)
    decode_rate(m, schema, 8)  # warm: the vocabulary's llguidance tokenizer is built once per model
    decode_rate(m, None, 8)
    free, bound, counts = [], [], []
    for _ in range(runs):
        free.append(decode_rate(m, None, tokens)[0])
        rate, n = decode_rate(m, schema, tokens)
        bound.append(rate)
        counts.append(n)
    f, b = statistics.median(free), statistics.median(bound)
    print(f"{label:<11} unconstrained {f:6.1f} tok/s, JSON schema {b:6.1f} tok/s ({statistics.median(counts):.0f} "
          f"tokens) -> {b / f:.3f}x  (goal >= 0.9)", flush=True)
    return b / f


def server_decode(url: str, schema: dict | None, tokens: int) -> tuple[float, str]:
    """llama-server's own decode tok/s (its timings.predicted_per_second) for one greedy chat answer."""
    body: dict = {"messages": MESSAGES, "temperature": 0, "max_tokens": tokens}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "people", "schema": schema}}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    data = r.json()
    return float(data["timings"]["predicted_per_second"]), data["choices"][0]["message"]["content"]


def bench_anchor(gguf: Path, runs: int, tokens: int, threads: int) -> float | None:
    binary = llama_server()
    if binary is None:
        return None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([str(binary), "-m", str(gguf), "--port", str(port), "-t", str(threads), "-c", "2048", "-np", "1",
                  "--jinja"], url + "/health")
    try:
        server_decode(url, SCHEMA, 8)
        free, bound = [], []
        for _ in range(runs):
            free.append(server_decode(url, None, tokens)[0])
            rate, text = server_decode(url, SCHEMA, tokens)
            bound.append(rate)
        f, b = statistics.median(free), statistics.median(bound)
        print(f"anchor      llama-server unconstrained {f:6.1f} tok/s, JSON schema {b:6.1f} tok/s -> {b / f:.3f}x",
              flush=True)
        return b / f
    finally:
        proc.terminate()
        proc.wait(10)


def ttft_with_tools(edgelm_url: str, llama_url: str, model: str, runs: int = 5, tools: list | None = None
                    ) -> dict[str, float]:
    """Median time to first streamed token of a chat request carrying ``tools`` (default TEN_TOOLS), edgelm's
    server vs llama-server (started with --jinja), requests alternating; prints both and each side's prompt size
    (a side that does not render the tools into its prompt shows far fewer prompt tokens).  Returns
    {"edgelm": seconds, "llama-server": seconds}."""
    tools = TEN_TOOLS if tools is None else tools
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out: dict[str, list[float]] = {"edgelm": [], "llama-server": []}
    prompt_tokens: dict[str, int] = {}
    for i in range(runs):
        for side, url in (("edgelm", edgelm_url), ("llama-server", llama_url)):
            # a different first message each run: neither server may answer from a cached prompt
            body = {"model": model, "messages": [{"role": "system", "content": f"Request {i}."}, *messages],
                    "tools": tools, "temperature": 0, "max_tokens": 4, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first = None
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    delta = (event.get("choices") or [{}])[0].get("delta") or {}
                    if first is None and (delta.get("content") or delta.get("tool_calls")):
                        first = time.perf_counter() - t0
                    if event.get("usage"):
                        prompt_tokens[side] = event["usage"]["prompt_tokens"]
            out[side].append(first if first is not None else time.perf_counter() - t0)
    med = {side: statistics.median(v) for side, v in out.items()}
    print(f"TTFT tools  10 tools: edgelm {med['edgelm'] * 1000:.1f} ms ({prompt_tokens.get('edgelm')} prompt tokens) "
          f"vs llama-server {med['llama-server'] * 1000:.1f} ms ({prompt_tokens.get('llama-server')} prompt tokens)",
          flush=True)
    return med


def bench_tools_ttft(gguf: Path, runs: int, threads: int) -> None:
    binary = llama_server()
    if binary is None:
        return
    p1, p2 = free_port(), free_port()
    ours = start([sys.executable, "-m", "edgelm", "serve", f"smollm={gguf}", "--port", str(p1), "--threads",
                  str(threads), "--n-ctx", "4096"], f"http://127.0.0.1:{p1}/health")
    theirs = start([str(binary), "-m", str(gguf), "--port", str(p2), "-t", str(threads), "-c", "4096", "-np", "1",
                    "--jinja"], f"http://127.0.0.1:{p2}/health")
    try:
        ttft_with_tools(f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}", "smollm", runs)
    finally:
        for proc in (ours, theirs):
            proc.terminate()
            proc.wait(10)


def onnx_model(path: str | None, keep: Path) -> Path:
    if path:
        return Path(path)
    from checkpoints import default_checkpoint  # benchmarks/checkpoints.py
    from edgelm.converters.onnx import convert_to_onnx

    out = keep / "smollm2-int4"
    print("onnx        converting SmolLM2 to int4 ONNX, round-to-nearest (once per run; --onnx DIR reuses one)...",
          flush=True)
    convert_to_onnx(default_checkpoint(), out, "int4", algo="rtn")  # the ratio does not depend on the rounding
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", help="an int4 ONNX folder of SmolLM2 (default: convert one)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--tools-ttft", action="store_true", help="also time the first token with 10 tools")
    args = ap.parse_args()
    gguf = edgelm.default_model_path()
    print(f"structured output: {args.runs} runs x {args.tokens} tokens, {args.threads} threads, greedy; schema: a "
          "list of >= 12 records", flush=True)
    with edgelm.load(gguf, n_ctx=2048, threads=args.threads) as m:
        ours = bench_backend("llama.cpp", m, args.runs, args.tokens)
    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as tmp:
            with edgelm.load(onnx_model(args.onnx, Path(tmp)), n_ctx=2048, threads=args.threads) as m:
                bench_backend("onnxruntime", m, args.runs, args.tokens)
    if not args.no_anchor:
        theirs = bench_anchor(gguf, args.runs, args.tokens, args.threads)
        if theirs is not None:
            print(f"vs anchor   edgelm llama.cpp ratio {ours:.3f} vs llama-server's {theirs:.3f} -> "
                  f"{'met' if ours >= theirs else 'NOT met'} (goal: >=)", flush=True)
    if args.tools_ttft:
        bench_tools_ttft(gguf, args.runs, args.threads)


if __name__ == "__main__":
    main()
