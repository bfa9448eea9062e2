"""`edgelm batch`."""

from __future__ import annotations

import sys
from typing import Any

import click

from edgelm import loader
from edgelm.batch import run_file
from edgelm.plan import default_parallel
from edgelm.sources import resolve_model_path

from .common import handle_errors
from .options import generation_options, load_options, pop_generation, pop_load


@click.command("batch")
@click.argument("input_path", metavar="INPUT.jsonl", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output JSONL file.")
@click.option("-m", "--model", default=None, help="A .gguf file, an ONNX folder or ORG/REPO:QUANT [default: the "
              "embedded SmolLM2-135M-Instruct].")
@click.option("--overwrite", is_flag=True, help="Start again instead of resuming an existing output.")
@load_options()
@generation_options
@handle_errors
def batch_command(input_path: str, output: str, model: str | None, overwrite: bool, **kwargs: Any) -> None:
    """Answer every line of INPUT.jsonl, several at a time, into an output JSONL file in input order.

    Each input line is {"prompt": "..."} (plain completion) or {"messages": [...]} (chat), with an optional "id"
    and optional settings ("temperature", "max_tokens", ...) for that line.  Each output line has "index", "id" and
    "text", "finish_reason", "usage" — or "error" for a line that failed alone.  A GGUF model batches --parallel
    sequences at a time (default: as many as memory allows, up to 4).  An interrupted run resumes: run the same
    command again.

    \b
    Examples:
      edgelm batch notes.jsonl -o tags.jsonl -t 0 -n 32
      edgelm batch questions.jsonl -o answers.jsonl -m model.gguf --parallel 8 --n-ctx 2048
    """
    params = pop_generation(kwargs)
    load = pop_load(kwargs)
    if "parallel" not in load and load.get("backend", "auto") in ("auto", "llamacpp"):
        load["parallel"] = default_parallel(resolve_model_path(model), n_ctx=load.get("n_ctx"),
                                            kv_cache=load.get("kv_cache"))
        if load["parallel"] == 1:
            load.pop("parallel")
    with loader.load(model, **load) as m, click.progressbar(length=1, label="answering",
                                                            file=sys.stderr) as bar:
        state = {"done": 0}

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - state["done"])
            state["done"] = done

        counts = run_file(m, input_path, output, overwrite=overwrite, progress=progress, **params)
    click.echo(f"{counts['done']} answered, {counts['errors']} failed, {counts['skipped']} already done "
               f"(of {counts['total']}) -> {output}", err=True)


COMMANDS = [batch_command]
