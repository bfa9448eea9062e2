"""`edgelm bench` and `edgelm eval`."""

from __future__ import annotations

import json
from typing import Any

import click

from edgelm import measure

from .common import handle_errors
from .options import load_options, pop_generation, pop_load, some_generation_options


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


@click.command("bench")
@click.argument("models", nargs=-1)
@click.option("--runs", type=int, default=3, show_default=True, help="Measured runs per model (after one warm-up).")
@click.option("--prompt-tokens", type=int, default=256, show_default=True, help="Prompt length.")
@click.option("-n", "--tokens", "gen_tokens", type=int, default=64, show_default=True, help="Tokens to generate.")
@click.option("--kv-cache", "kv_caches", multiple=True,
              help="KV cache type(s) to compare, e.g. --kv-cache f16 --kv-cache q8_0 [default: f16].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also write a PNG chart here.")
@load_options(skip=("kv_cache",))
@some_generation_options("speculative")
@handle_errors
def bench_command(models: tuple[str, ...], kv_caches: tuple[str, ...], as_json: bool, plot: str | None,
                  runs: int, prompt_tokens: int, gen_tokens: int, **kwargs: Any) -> None:
    """Measure load time, prompt and decode speed, time to first token and peak memory.

    Each model (default: the embedded one) runs in its own process; figures are medians of --runs runs, with
    min-max.  Several MODELS and --kv-cache types are compared side by side.

    \b
    Examples:
      edgelm bench
      edgelm bench a.gguf b.gguf --json
      edgelm bench --kv-cache f16 --kv-cache q8_0 --plot bench.png
      edgelm bench --speculative prompt-lookup --threads 2

    Load options as for `edgelm run`; --n-ctx defaults to 2048 here.
    """
    speculative = pop_generation(kwargs).get("speculative")
    load = pop_load(kwargs)
    load.setdefault("n_ctx", 2048)
    results = measure.bench(list(models) or None, kv_caches=list(kv_caches) or [None], runs=runs,
                            prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, speculative=speculative, **load)
    if plot:
        measure.plot(results, plot)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        head = f"{'model':<28} {'quant':<7} {'kv':<5} {'load s':>7} {'prompt t/s':>11} {'decode t/s':>11} " \
               f"{'TTFT ms':>8} {'peak RSS MB':>12} {'KV MB':>7}"
        click.echo(head)
        for r in results:
            click.echo(f"{r.model[:28]:<28} {r.quantization:<7} {r.kv_cache:<5} {r.load_seconds:>7.2f} "
                       f"{r.prompt_tokens_per_second:>11.1f} {r.tokens_per_second:>11.1f} "
                       f"{r.time_to_first_token * 1000:>8.0f} {_mb(r.peak_rss):>12} {_mb(r.kv_cache_bytes):>7}")
        click.secho(f"medians of {results[0].runs} runs; {results[0].prompt_tokens} prompt tokens, "
                    f"{results[0].generated_tokens} generated, {results[0].threads} threads", dim=True)
    if plot:
        click.secho(f"chart written to {plot}", dim=True, err=True)


@click.command("eval")
@click.argument("model", required=False)
@click.option("--text", "text_file", type=click.File("r", encoding="utf-8"), default=None,
              help="Score this text file instead of the built-in evaluation text.")
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per scored window.")
@click.option("--windows", type=int, default=4, show_default=True, help="Windows to score (0 = all).")
@click.option("--kv-cache", "kv_caches", multiple=True,
              help="KV cache type(s) to compare, e.g. --kv-cache f16 --kv-cache q8_0 [default: f16].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@load_options(skip=("kv_cache",))
@handle_errors
def eval_command(model: str | None, text_file: Any, window: int, windows: int, kv_caches: tuple[str, ...],
                 as_json: bool, **kwargs: Any) -> None:
    """Perplexity of MODEL (default: the embedded one) on the built-in text or --text FILE.

    Lower is better.  With several --kv-cache types, prints each one's change against the first.

    \b
    Examples:
      edgelm eval model.gguf
      edgelm eval model.gguf --text my_corpus.txt --windows 0
      edgelm eval --kv-cache f16 --kv-cache q8_0 --kv-cache q4_0
    """
    text = text_file.read() if text_file else None
    results = measure.evaluate(model, text=text, window=window, windows=windows or None,
                               kv_caches=list(kv_caches) or [None], **pop_load(kwargs))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    base = results[0]
    click.echo(f"{'kv cache':<9} {'perplexity':>11} {'change':>8} {'KV MB':>7} {'tokens':>7}")
    for r in results:
        change = (r.perplexity / base.perplexity - 1) * 100
        click.echo(f"{r.kv_cache:<9} {r.perplexity:>11.3f} {change:>+7.2f}% {_mb(r.kv_cache_bytes):>7} "
                   f"{r.tokens_scored:>7}")
    click.secho(f"{base.model}: {base.windows} windows of {base.window} tokens (second halves scored)", dim=True)


COMMANDS = [bench_command, eval_command]
