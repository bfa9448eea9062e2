"""Each speed technique against the plain path, measured in the same run (SmolLM2 by default).

- prompt reuse: time to first token of a chat's second turn on a ~1,000-token history, cached vs fresh model
  (goal >= 3x faster)
- speculative decoding (prompt-lookup): decode tokens/s vs plain greedy, alternated, with an identical-output check,
  on a copy task (goal >= 1.3x) and on free prose where nothing repeats (goal >= 0.97x: drafting steps aside)
- KV cache q8_0 vs f16: KV memory ratio and perplexity change

Usage: python benchmarks/bench_speed.py [MODEL.gguf] [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import edgelm
from edgelm.measure import evaluate
from edgelm.quality import eval_text


def median_ratio(pairs):
    return statistics.median(a / b for a, b in pairs if b > 0)


def prompt_reuse(model: str, runs: int, threads: int) -> None:
    text = eval_text()
    with edgelm.load(model, n_ctx=2048, threads=threads) as m:
        history = [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "Read this:\n" + text[:4200]}]
        first = m.chat(history, temperature=0, max_tokens=32)
        history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Summarise it."}]
        n = len(m.chat_tokens(history))
        fresh, cached = [], []
        for _ in range(runs):
            m.reset_cache()
            fresh.append(m.chat(history[:-2], temperature=0, max_tokens=32).timings.prompt_seconds)  # turn 1
            # turn 2 with the cache of turn 1, then turn 2 again from an empty cache
            cached.append(m.chat(history, temperature=0, max_tokens=1).timings.prompt_seconds)
            m.reset_cache()
            fresh[-1] = m.chat(history, temperature=0, max_tokens=1).timings.prompt_seconds
    f, c = statistics.median(fresh), statistics.median(cached)
    print(f"prompt reuse   history {n} tokens: TTFT fresh {f * 1000:.0f} ms, cached {c * 1000:.0f} ms "
          f"-> {f / c:.1f}x faster (goal >= 3x)")


# A copy task: plain prose the 135M model can repeat (it garbles the grammar listings of the evaluation text, and a
# copy the model cannot make is not a copy task).
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at six. He wound the clockwork, trimmed the wick, "
    "polished the great lens until it shone, and wrote the weather in a leather book: wind from the west, sea calm, "
    "two ships passing north. In the morning he walked the shore to collect driftwood for the stove, and in the "
    "afternoon he mended nets for the fishermen of the village, who paid him in bread, apples and news. Once a "
    "month the supply boat brought oil for the lamp, letters from his sister, and a newspaper that was always a "
    "week old. He read it slowly, one page each night, so that it lasted until the boat came again. In winter the "
    "storms kept the boat away for weeks, and then he rationed the oil, the bread and the pages alike."
)


# Where nothing repeats: free prose whose n-grams rarely recur, so drafts are mostly wrong; drafting must step aside
FREE_PROMPT = "Once upon a time, in a village by a cold northern sea, there lived a fox who"


def speculative(model: str, runs: int, threads: int) -> None:
    tasks = {"copy task": (f"Repeat the text exactly.\n\nText: {PASSAGE}\n\nRepeated text: {PASSAGE[:40]}", 1.3),
             "nothing repeats": (FREE_PROMPT, 0.97)}
    with edgelm.load(model, n_ctx=2048, threads=threads) as m:
        for task, (prompt, goal) in tasks.items():
            pairs, same, acceptance = [], True, []
            for i in range(runs):
                results = {}
                for mode in ((None, "prompt-lookup") if i % 2 else ("prompt-lookup", None)):  # alternated
                    m.reset_cache()
                    results[mode] = m.generate(prompt, temperature=0, max_tokens=128, speculative=mode)
                    if mode:  # read now: the plain run after it resets the counters
                        skipped = m.stats().get("speculative", {}).get("skipped", 0)
                plain, fast = results[None], results["prompt-lookup"]
                same &= fast.text == plain.text
                pairs.append((fast.timings.tokens_per_second(fast.usage.completion_tokens),
                              plain.timings.tokens_per_second(plain.usage.completion_tokens)))
                acceptance.append(fast.timings.draft_acceptance or 0.0)
            print(f"speculative    {task}: prompt-lookup {statistics.median(p[0] for p in pairs):.1f} tok/s vs plain "
                  f"{statistics.median(p[1] for p in pairs):.1f} -> {median_ratio(pairs):.2f}x (goal >= {goal}x); "
                  f"identical output: {same}; draft acceptance {statistics.median(acceptance):.2f}, "
                  f"{skipped} proposals skipped (not worth drafting) in the last prompt-lookup run")


def kv_cache(model: str, threads: int) -> None:
    f16, q8 = evaluate(model, kv_caches=["f16", "q8_0"], threads=threads, n_ctx=2048)
    print(f"kv cache q8_0  memory {q8.kv_cache_bytes / f16.kv_cache_bytes:.3f}x of f16 "
          f"({q8.kv_cache_bytes / 2**20:.1f} vs {f16.kv_cache_bytes / 2**20:.1f} MiB at n_ctx 2048); perplexity "
          f"{q8.perplexity:.3f} vs {f16.perplexity:.3f} ({(q8.perplexity / f16.perplexity - 1) * 100:+.2f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = str(args.model or edgelm.default_model_path())
    prompt_reuse(model, args.runs, args.threads)
    speculative(model, args.runs, args.threads)
    kv_cache(model, args.threads)


if __name__ == "__main__":
    main()
