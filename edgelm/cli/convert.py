"""`edgelm convert`."""

from __future__ import annotations

import json
from typing import Any

import click

from . import handle_errors


@click.command("convert")
@click.argument("src")
@click.option("--to", "to", type=click.Choice(["gguf", "onnx"]), default="gguf", show_default=True)
@click.option("-q", "--quant", default="q4_k_m", show_default=True,
              help="GGUF: any llama.cpp type (q8_0, q6_k, q5_k_m, q4_k_m, q4_0, f16, ...); ONNX: int4, int8, fp16, "
                   "fp32; or auto (with --max-size / --max-ppl-increase).")
@click.option("-o", "--output", required=True, help="Output .gguf file, or folder for ONNX.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a Hub id.")
@click.option("--max-ppl-increase", default=None,
              help='Fail (and keep no output) when perplexity rises more than this, e.g. "5%".')
@click.option("--max-size", default=None, help='Largest acceptable output, e.g. "120MB" (with --quant auto).')
@click.option("--no-eval", is_flag=True, help="Skip the quality and speed measurements.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def convert_command(src: str, to: str, quant: str, output: str, overwrite: bool, revision: str | None,
                    max_ppl_increase: str | None, max_size: str | None, no_eval: bool, as_json: bool) -> None:
    """Convert SRC to GGUF or quantized ONNX and report what it cost in quality.

    SRC is a Hugging Face model folder or Hub id (HF cache used; HF_HUB_OFFLINE=1 for cache only), or for GGUF
    output a .gguf to re-quantize.  The output is written to a temporary file and renamed at the end: a failed or
    interrupted conversion leaves nothing behind.  Then it is loaded and scored: perplexity on the built-in text
    against the unquantized reference, decode tokens/s and peak memory.

    \b
    Examples:
      edgelm convert model-f16.gguf --quant q4_k_m -o model-q4_k_m.gguf
      edgelm convert ./my-hf-model --to onnx --quant int4 -o model-onnx/
      edgelm convert model-f16.gguf --quant auto --max-size 120MB --max-ppl-increase 5% -o small.gguf
    """
    import edgelm.conversion as conv

    with click.progressbar(length=100, label=f"converting to {to} {quant}", file=click.get_text_stream("stderr"),
                           show_eta=False, item_show_func=lambda s: s) as bar:
        state = {"done": 0}

        def progress(message: str, fraction: float) -> None:
            target = int(max(0.0, min(1.0, fraction)) * 100)
            bar.update(max(0, target - state["done"]), message)
            state["done"] = max(state["done"], target)

        report = conv.convert(src, to=to, quant=quant, output=output, overwrite=overwrite, revision=revision,
                              eval=not no_eval, max_ppl_increase=max_ppl_increase, max_size=max_size,
                              progress=progress)
        bar.update(100 - state["done"], "done")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print(report)


def _print(r: Any) -> None:
    click.echo(f"output       {r.output}")
    click.echo(f"format       {r.format} {r.quant} ({r.architecture})")
    bpw = f", {r.bits_per_weight:.2f} bits/weight" if r.bits_per_weight else ""
    click.echo(f"size         {r.size_bytes / 1e6:.1f} MB{bpw}, written in {r.seconds:.1f} s")
    if r.perplexity is not None:
        click.echo(f"perplexity   {r.perplexity:.3f} vs {r.reference_perplexity:.3f} for {r.reference} "
                   f"({r.ppl_increase * 100:+.2f} %)")
        click.echo(f"speed        {r.tokens_per_second:.1f} tokens/s decode, peak RSS {r.peak_rss / 2**20:.0f} MB")
    if r.tried:
        click.echo("tried        " + "; ".join(
            f"{t['quant']}: {'kept' if t['kept'] else t.get('reason', 'rejected')}" for t in r.tried))


COMMANDS = [convert_command]
