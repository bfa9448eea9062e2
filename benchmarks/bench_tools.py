"""Tool calling over HTTP: time to first token with 10 tools in the prompt, edgelm against llama.cpp's own server
(llama-server --jinja, built from the llama.cpp llama-cpp-python vendors, as bench_batching builds it), both serving
the same GGUF and measured alternately in the same run; and the time to a complete, valid call under
tool_choice="required" on both.

    python benchmarks/bench_tools.py [--model model.gguf] [--runs 5] [--threads 2]

Every request starts its system message with a new number, so neither server reuses a cached prompt: the time to
first token is the whole prompt (tools included) read, plus the first token.  Prompt sizes differ (each server
writes its own tool instructions for a template with no tools branch), so they are printed too.  Figures go to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import free_port, llama_server, start  # noqa: E402  (the same llama-server build, cached)

import edgelm  # noqa: E402

CLIENT = httpx.Client(timeout=600)


def tools(n: int = 10) -> list[dict]:
    """n small, distinct tools, as an agent would offer (a string, an enum, a number each)."""
    out = []
    for i, (name, what) in enumerate([("get_weather", "the current weather in a city"),
                                      ("get_time", "the local time in a city"),
                                      ("search_web", "web pages about a query"),
                                      ("send_email", "an e-mail to someone"),
                                      ("add_event", "an event to the calendar"),
                                      ("convert_currency", "an amount from one currency to another"),
                                      ("translate", "a text into another language"),
                                      ("set_timer", "a timer"),
                                      ("read_file", "a file's text"),
                                      ("play_music", "a song or an artist")][:n]):
        out.append({"type": "function", "function": {"name": name, "description": f"Get or do {what}.",
                                                     "parameters": {"type": "object", "properties": {
                                                         "text": {"type": "string", "description": "What it is about"},
                                                         "unit": {"type": "string", "enum": ["a", "b", "c"]},
                                                         "count": {"type": "integer", "minimum": 1}},
                                                         "required": ["text"]}}})
    return out


def request(url: str, nonce: int, choice: str, max_tokens: int) -> tuple[float, float, int, dict | None]:
    """(time to first streamed piece, time to the end, prompt tokens, the first call or None) of one request; a
    server that drops the connection gives (nan, nan, 0, None) and the run goes on."""
    try:
        return _request(url, nonce, choice, max_tokens)
    except httpx.HTTPError as exc:
        print(f"failed     {url}: {type(exc).__name__}: {exc}", flush=True)
        return float("nan"), float("nan"), 0, None


def _request(url: str, nonce: int, choice: str, max_tokens: int) -> tuple[float, float, int, dict | None]:
    body = {"model": "bench", "stream": True, "temperature": 0, "max_tokens": max_tokens, "tools": tools(),
            "tool_choice": choice, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": f"Request {nonce}. You are a helpful assistant."},
                         {"role": "user", "content": "What is the weather in Paris?"}]}
    t0 = time.perf_counter()
    first = None
    prompt = 0
    calls: dict[int, dict] = {}
    with CLIENT.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for choice_ in event.get("choices") or []:
                delta = choice_.get("delta") or {}
                if (delta.get("content") or delta.get("tool_calls")) and first is None:
                    first = time.perf_counter() - t0
                for d in delta.get("tool_calls") or []:
                    call = calls.setdefault(d.get("index", 0), {"name": "", "arguments": ""})
                    call["name"] += (d.get("function") or {}).get("name") or ""
                    call["arguments"] += (d.get("function") or {}).get("arguments") or ""
            if event.get("usage"):
                prompt = event["usage"]["prompt_tokens"]
    end = time.perf_counter() - t0
    return first or end, end, prompt, calls.get(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a GGUF [default: the embedded SmolLM2]")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or edgelm.default_model_path()
    binary = llama_server()
    if binary is None:
        sys.exit("llama-server could not be built here: no anchor to compare with")
    servers = {}
    try:
        port = free_port()
        servers["edgelm"] = (start([sys.executable, "-m", "edgelm", "serve", f"bench={path}", "--port", str(port),
                                    "--threads", str(args.threads), "--n-ctx", "4096", "--parallel", "1",
                                    "--no-ui"], f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}")
        port = free_port()
        servers["llama-server"] = (start([str(binary), "-m", str(path), "--port", str(port), "-t", str(args.threads),
                                          "-c", "4096", "-np", "1", "--jinja", "--no-webui"],
                                         f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}")
        ttft: dict[str, list[float]] = {n: [] for n in servers}
        done: dict[str, list[float]] = {n: [] for n in servers}
        prompts: dict[str, int] = {}
        valid: dict[str, int] = {n: 0 for n in servers}
        for name, (_, url) in servers.items():  # warm up
            request(url, 0, "auto", 4)
        for run in range(1, args.runs + 1):  # alternating, so drift on a noisy machine hits both
            for name, (_, url) in servers.items():
                first, _, prompts[name], _ = request(url, run, "auto", 4)
                ttft[name].append(first)
                _, end, _, call = request(url, 1000 + run, "required", 96)
                done[name].append(end)
                try:
                    ok = call is not None and call["name"] and isinstance(json.loads(call["arguments"])["text"], str)
                except (ValueError, KeyError, TypeError):
                    ok = False
                valid[name] += bool(ok)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    ours, theirs = statistics.median(ttft["edgelm"]), statistics.median(ttft["llama-server"])
    print(f"model      {path.name}, {args.threads} threads, {args.runs} runs, 10 tools, medians")
    print(f"TTFT       edgelm {ours * 1000:.0f} ms ({prompts['edgelm']} prompt tokens) vs llama-server "
          f"{theirs * 1000:.0f} ms ({prompts['llama-server']} prompt tokens) -> {ours / theirs:.2f}x")
    per_e = ours / max(prompts["edgelm"], 1) * 1000
    per_l = theirs / max(prompts["llama-server"], 1) * 1000
    print(f"per token  edgelm {per_e:.2f} ms vs llama-server {per_l:.2f} ms of prompt -> {per_e / per_l:.2f}x")
    de, dl = statistics.median(done["edgelm"]), statistics.median(done["llama-server"])
    print(f"required   a complete call in {de * 1000:.0f} ms (valid {valid['edgelm']}/{args.runs}) vs llama-server "
          f"{dl * 1000:.0f} ms (valid {valid['llama-server']}/{args.runs}) -> {de / dl:.2f}x")


if __name__ == "__main__":
    main()
