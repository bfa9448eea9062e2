"""`edgelm compress`."""

from __future__ import annotations

import json
import signal
from typing import Any

import click

from edgelm.compression.api import COMPRESS, compress
from edgelm.compression.report import plot as plot_report

from .common import handle_errors, with_progress
from .options import pop_given, table_options


@click.command("compress")
@click.argument("src")
@click.option("-o", "--output", required=True, help="Output folder (a Hugging Face checkpoint).")
@table_options(COMPRESS)  # --drop-layers, --heal, --budget, ... (edgelm.compression.api.CompressOptions)
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of perplexity against blocks removed (measures each count: slower).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def compress_command(src: str, output: str, plot: str | None, as_json: bool, **kwargs: Any) -> None:
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
    def terminated(signum: int, frame: Any) -> None:  # `kill` acts as Ctrl-C: a checkpoint, no temporary folder
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    options = pop_given(kwargs, COMPRESS)
    if plot is not None:
        options["curve"] = True
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
