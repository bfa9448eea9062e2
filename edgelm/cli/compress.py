"""`edgelm compress`."""

from __future__ import annotations

import json
import signal
from typing import Any

import click

from . import handle_errors, with_progress


def _drop(value: str | None) -> int | list[int] | None:
    if value is None:
        return None
    text = value.strip()
    try:
        if "," in text or text.startswith("["):
            return [int(v) for v in text.strip("[]").split(",") if v.strip()]
        return int(text)
    except ValueError:
        from edgelm.errors import InvalidParameterError

        raise InvalidParameterError(f"Invalid --drop-layers {value!r}.", fix="Use a number of blocks (4) or block "
                                    "indices separated by commas (12,14,17).", parameter="drop_layers",
                                    value=value) from None


@click.command("compress")
@click.argument("src")
@click.option("-o", "--output", required=True, help="Output folder (a Hugging Face checkpoint).")
@click.option("--drop-layers", default=None,
              help="Decoder blocks to remove: a number (the best-scored are chosen) or indices like 12,14,17.")
@click.option("--target-speedup", type=float, default=None,
              help="Remove the fewest blocks whose estimated decode speed-up reaches this, e.g. 1.2.")
@click.option("--max-ppl-increase", default=None,
              help='Remove the most blocks within this estimated perplexity increase, e.g. "10%"; checked on the '
                   "result (exit code 7, nothing written, when over).")
@click.option("--prune-mlp", default=None, help='Share of MLP neurons removed in every block, e.g. "25%".')
@click.option("--heal", type=click.Choice(["none", "linear", "distill"]), default="distill", show_default=True,
              help="none: just remove; linear: least-squares refit (seconds); distill: linear, then logit "
                   "distillation from the original within --budget.")
@click.option("--budget", default="30m", show_default=True,
              help='Time for the whole compression ("30m", "90s", "1.5h"), or distillation tokens ("200k", "1M").')
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="UTF-8 text like what the model will see (default: Python's docstrings).")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
              help="A UTF-8 text file scored besides the built-in text (use text not in --calibration).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--resume/--no-resume", default=None,
              help="Continue an interrupted run (default: automatic when its work folder has the same settings); "
                   "--no-resume starts afresh.")
@click.option("--revision", default=None, help="Hub revision when SRC is a Hub id.")
@click.option("--no-eval", is_flag=True, help="Skip the GGUF measurements (perplexity, speed).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of perplexity against blocks removed (measures each count: slower).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch and the llama.cpp measurements [default: the cores available].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def compress_command(src: str, output: str, drop_layers: str | None, target_speedup: float | None,
                     max_ppl_increase: str | None, prune_mlp: str | None, heal: str, budget: str,
                     calibration: str | None, eval_text: str | None, overwrite: bool, resume: bool | None,
                     revision: str | None, no_eval: bool, plot: str | None, threads: int | None, seed: int,
                     as_json: bool) -> None:
    """Make a model smaller and faster: remove decoder blocks and MLP neurons, heal, and measure the cost.

    SRC is a Hugging Face checkpoint folder or Hub id (Llama, Mistral, Qwen2, Qwen3 families); the output is a
    checkpoint of the same architecture with fewer blocks / narrower MLPs, which `edgelm convert` turns into GGUF
    or ONNX.  Blocks are scored on calibration text (angular distance, and the KL divergence of the model without
    each block, before and after healing); the first and last are never removed.  Healing: a least-squares refit
    folded into the weights, then logit distillation from the original (torch, CPU) within --budget, with a
    checkpoint every 5 minutes in a hidden folder next to the output; running the same command again resumes.
    Ctrl-C stops at the next step boundary (after a checkpoint); the output is written to a temporary folder and
    renamed at the end, so it is never half-written.  The report compares q8_0 GGUFs of the original, the pruned
    model before healing and the result: perplexity (llama.cpp) and decode tokens/s (each in its own process).

    \b
    Examples:
      edgelm compress ./SmolLM2-135M-Instruct --drop-layers 4 -o smollm2-26l
      edgelm compress ./model --target-speedup 1.2 --budget 30m -o model-fast --eval-text notes.txt
      edgelm compress ./model --drop-layers 2 --prune-mlp 10% --heal linear -o model-small
      edgelm compress ./model --drop-layers 12,14 --heal distill --budget 200k -o model-small --plot ppl.png
      edgelm compress ./model --max-ppl-increase 10% --calibration my-domain.txt -o model-small
      edgelm convert model-small --quant q8_0 -o model-small-q8_0.gguf
    """
    from edgelm.compression import compress
    from edgelm.compression.report import plot as plot_report

    def terminated(signum: int, frame: Any) -> None:  # `kill` acts as Ctrl-C: a checkpoint, no temporary folder
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    options = dict(drop_layers=_drop(drop_layers), target_speedup=target_speedup, max_ppl_increase=max_ppl_increase,
                   prune_mlp=prune_mlp, heal=heal, budget=budget, calibration=calibration, eval_text=eval_text,
                   overwrite=overwrite, resume=resume, revision=revision, measure=not no_eval,
                   curve=plot is not None, seed=seed, threads=threads)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        report = with_progress("compressing", lambda progress: compress(src, output, progress=progress, **options))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if plot:
        plot_report(report, plot)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(report.table())
    if plot:
        click.echo(f"chart         {plot}")


COMMANDS: list[Any] = [compress_command]
