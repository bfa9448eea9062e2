"""`edgelm pull`, `edgelm list`, `edgelm rm`: models by name and the local store."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import click

from edgelm import hub, store
from edgelm.declarations import by_name
from edgelm.plan import RECOMMEND
from edgelm.units import human_bytes

from .common import handle_errors
from .options import pop_given, table_options

# the device profile a pulled quantization must fit: recommend's --profile, with pull's own words
PULL = (dataclasses.replace(by_name(RECOMMEND)["profile"], help="Choose the quantization for this device profile (see "
                            "`edgelm devices`) instead of this machine."),)


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0, time.time() - ts)
    for unit, secs in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= secs:
            n = int(s // secs)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


@click.command("pull")
@click.argument("model")
@click.option("--revision", default=None, help="Branch, tag or commit to pull (default: main).")
@table_options(PULL)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the path.")
@handle_errors
def pull_command(model: str, revision: str | None, quiet: bool, **kwargs: Any) -> None:
    """Download MODEL (ORG/REPO[:QUANT]) from the Hugging Face Hub into its cache.

    For a GGUF repository QUANT picks the file by the quantization in its name (case-insensitive); without it the
    largest quantization that fits this machine's memory is taken, and a line says why.  Split files are fetched
    together.  For an ONNX repository the folder holding genai_config.json / edgelm.json (QUANT names a
    sub-folder when there are several).  An interrupted download resumes; every file is checked against its
    sha256 before use.  Uses the Hugging Face cache (HF_HOME, HF_HUB_CACHE); with HF_HUB_OFFLINE=1 only the cache.

    \b
    Examples:
      edgelm pull bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M
      edgelm pull bartowski/SmolLM2-135M-Instruct-GGUF             # the best that fits here
      edgelm pull unsloth/Qwen3-0.6B-GGUF --profile raspberry-pi-zero-2-w
      edgelm pull ORG/REPO:q8_0 --revision 4f3c2a1
      edgelm run bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M "Hi"  # pulls on first use, offline afterwards
    """
    profile = pop_given(kwargs, PULL).get("profile", PULL[0].default)
    pulled = hub.pull_model(model, revision, profile=profile, progress=not quiet)
    if quiet:
        click.echo(str(pulled.path))
        return
    if pulled.from_cache:
        click.echo(f"{pulled.name}: {pulled.reason}", err=True)
    got = f"downloaded {human_bytes(pulled.downloaded_bytes)}" if pulled.downloaded_bytes else "already in the cache"
    click.echo(f"{pulled.name} ({human_bytes(pulled.candidate.size_bytes)}, {got}, revision {pulled.revision[:12]})",
               err=True)
    click.echo(str(pulled.path))


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (with paths and revisions).")
@handle_errors
def list_command(as_json: bool) -> None:
    """List the models on this machine that edgelm can run.

    GGUF files and ONNX folders in the Hugging Face cache (pulled with `edgelm pull`, loaded by name, or
    downloaded by other tools), and the outputs of `edgelm convert`.  NAME is what `edgelm run`, `serve` and `rm`
    take.

    \b
    Examples:
      edgelm list
      edgelm list --json
    """
    rows = store.list_models()
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        click.echo("No models yet: `edgelm pull ORG/REPO:QUANT` downloads one, `edgelm convert` writes one.", err=True)
        return
    table = [("NAME", "QUANT", "SIZE", "LAST USED", "SOURCE")]
    table += [(r.name, r.quant or "-", human_bytes(r.size_bytes), _ago(r.last_used),
               "hub" if r.source == "hub" else "converted") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@click.command("rm")
@click.argument("names", nargs=-1)
@click.option("--stale", is_flag=True,
              help="Remove what killed conversions left (hidden .NAME.XXXXXXXX.convert/.part/.partial) next to "
              "converted outputs, and abandoned downloads in the Hugging Face cache.")
@click.option("--older-than", type=float, default=None, metavar="MINUTES",
              help="With --stale: only leftovers untouched this long (default 30).")
@click.option("-n", "--dry-run", is_flag=True, help="With --stale: show what would be removed.")
@handle_errors
def rm_command(names: tuple[str, ...], stale: bool, older_than: float | None, dry_run: bool) -> None:
    """Remove models from the local store.

    NAME is a name from `edgelm list`: ORG/REPO:QUANT removes that quantization from the Hugging Face cache,
    ORG/REPO the whole repository, a path a converted output.  With --stale, NAMES are extra folders to clean.

    \b
    Examples:
      edgelm rm bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M
      edgelm rm bartowski/SmolLM2-135M-Instruct-GGUF
      edgelm rm ./model-q4_k_m.gguf
      edgelm rm --stale
      edgelm rm --stale --older-than 5 ./models
    """
    if stale:
        seconds = store.STALE_AFTER_S if older_than is None else older_than * 60
        removed = store.remove_all_stale(list(names), seconds, dry_run=dry_run)
        for path in removed:
            click.echo(f"{'would remove' if dry_run else 'removed'} {path}")
        if not removed:
            click.echo("No stale temporaries.", err=True)
        return
    if not names:
        raise click.UsageError("Name a model to remove (see `edgelm list`), or pass --stale.")
    for name in names:
        for path in store.remove(name):
            click.echo(f"removed {path}")


COMMANDS = [pull_command, list_command, rm_command]
