"""`edgelm doctor`, `edgelm devices`, `edgelm recommend`."""

from __future__ import annotations

import json
from typing import Any

import click

from . import handle_errors


def _gb(n: int | None) -> str:
    return "?" if not n else f"{n / 1024**3:.1f} GB"


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON (keys: os, arch, cpu, memory, ...).")
@handle_errors
def doctor_command(as_json: bool) -> None:
    """Describe this machine and what edgelm can use on it, and how to fix what is missing.

    \b
    Shows: OS and architecture, CPU model, features (AVX2/AVX-512/NEON/dotprod/i8mm) and cores, memory, board,
    GPUs, what the installed llama.cpp build supports, onnxruntime's execution providers, NPU hints, and whether
    llama.cpp's Hugging Face -> GGUF converter is installed.

    \b
    Examples:
      edgelm doctor
      edgelm doctor --json | jq .backends
    """
    from edgelm.platforms import detect

    from edgelm.converters.hf_gguf import converter_home, find_converter

    h = detect()
    found = find_converter()
    converter = {"installed": found is not None, "path": str(found[0]) if found else None,
                 "install": "edgelm install-converter", "default_folder": str(converter_home())}
    from edgelm.converters.onnx.optimum import find_optimum, optimum_home

    home = find_optimum()
    optimum = {"installed": home is not None, "path": str(home or optimum_home()),
               "install": "edgelm install-converter --optimum"}
    if as_json:
        click.echo(json.dumps({**h.to_dict(), "gguf_converter": converter, "optimum_onnx": optimum}, indent=2))
        return
    cpu, mem = h.cpu, h.memory
    click.echo(f"system      {h.os} {h.arch}" + (f" - {h.board}" if h.board else ""))
    click.echo(f"cpu         {cpu.get('model')}: {cpu.get('cores_logical')} logical cores, "
               f"{cpu.get('performance_cores')} performance + {cpu.get('efficiency_cores')} efficiency, "
               f"{cpu.get('cores_usable')} usable by this process")
    click.echo(f"features    {', '.join(cpu.get('features') or []) or 'none detected'}")
    click.echo(f"memory      {_gb(mem.get('total'))} total, {_gb(mem.get('available'))} available")
    gpus = [k for k, v in h.gpu.items() if v is True]
    click.echo(f"gpu         {', '.join(gpus) or 'none'}")
    llama = h.backends["llamacpp"]
    if llama.get("installed"):
        offload = [k for k in ("metal", "cuda", "vulkan") if llama.get(k)]
        click.echo(f"llama.cpp   llama-cpp-python {llama.get('version')}: GPU offload "
                   f"{'yes (' + ', '.join(offload) + ')' if llama.get('gpu_offload') else 'no'}, "
                   f"BLAS {'yes' if llama.get('blas') else 'no'}")
        rpc = llama.get("rpc") or {}
        click.echo("rpc         " + ("llama.cpp RPC backend built into llama-cpp-python" if rpc.get("built_in") else
                                     f"llama.cpp RPC backend module {rpc['module']}" if rpc.get("available") else
                                     "llama.cpp RPC backend not built (edgelm install-rpc; needed only to split a "
                                     "model across machines: edgelm worker, --workers)"))
    else:
        click.echo("llama.cpp   not installed")
    onnx = h.backends["onnxruntime"]
    click.echo(f"onnxruntime {onnx.get('version')}: {', '.join(onnx.get('providers', []))}" if onnx.get("installed")
               else "onnxruntime not installed")
    if h.npu:
        click.echo(f"npu         {'; '.join(h.npu)}")
    click.echo(f"HF -> GGUF  {'llama.cpp converter at ' + converter['path'] if found else 'converter not installed'}"
               f"{'' if found else ' (edgelm install-converter; needed only to convert Hugging Face models to GGUF)'}")
    click.echo(f"HF -> ONNX  {'optimum-onnx at ' + str(home) if home else 'optimum-onnx not installed'}"
               f"{'' if home else ' (edgelm install-converter --optimum; needed only for architectures the ONNX builder lacks)'}")
    if h.missing:
        click.secho("\nmissing:", bold=True)
        for item in h.missing:
            click.echo(f"  {item['what']}\n    fix: {item['fix']}")
    else:
        click.secho("\nnothing missing for this machine", fg="green")


@click.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
@handle_errors
def devices_command(as_json: bool) -> None:
    """List the device profiles `edgelm recommend --device NAME` plans for.

    Add a RAM size to a name to pick a variant, e.g. raspberry-pi-5-8gb or apple-m2-24gb.
    """
    from edgelm.platforms.profiles import profiles

    table = profiles()
    if as_json:
        click.echo(json.dumps(list(table.values()), indent=2))
        return
    click.echo(f"{'name':<24} {'RAM (GB)':<14} {'bandwidth':>10} {'cores':>6}  accelerators / backends")
    for name, p in table.items():
        ram = "/".join(f"{g:g}" for g in p["ram_gb"])
        cores = p["cores"]["performance"] + p["cores"]["efficiency"]
        acc = ", ".join(p["accelerators"]) or "cpu"
        click.echo(f"{name:<24} {ram:<14} {p['memory_bandwidth_gbs']:>6.1f} GB/s {cores:>6}  {acc}; "
                   f"{', '.join(p['backends'])}")


@click.command("recommend")
@click.argument("model", required=False)
@click.option("--device", default="auto", show_default=True,
              help="A profile from `edgelm devices` (e.g. raspberry-pi-5-8gb), or auto for this machine.")
@click.option("--n-ctx", type=int, default=None, help="Context window wanted [default: the model's, up to 4096].")
@click.option("--parallel", "-np", type=int, default=1, show_default=True,
              help="Sequences generated at the same time (a server's concurrent requests), each with its own KV cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--workers", default=None, metavar="N|HOST:PORT,...",
              help="Plan a cluster: this device and N more boards (or these running workers) holding the layers "
                   "(llama.cpp RPC; see `edgelm worker`).")
@click.option("--worker-device", default=None, help="The workers' board, a profile [default: the same as --device].")
@click.option("--link", type=click.Choice(["ethernet", "wifi", "loopback"]), default="ethernet", show_default=True,
              help="The network between the boards (sets the per-token round-trip estimate).")
@click.option("--hop-ms", type=float, default=None, help="Round trip per worker per token, in ms [default: the link's].")
@handle_errors
def recommend_command(model: str | None, device: str, n_ctx: int | None, parallel: int, as_json: bool,
                      workers: str | None, worker_device: str | None, link: str, hop_ms: float | None) -> None:
    """Plan how to run MODEL on a device: backend, quantization, n_ctx, threads, memory and expected speed.

    MODEL is a .gguf file, an ONNX folder, or a Hugging Face checkpoint (a folder with config.json and
    *.safetensors, or a Hub id found in the Hugging Face cache; HF_HUB_OFFLINE=1 works).  For a checkpoint, every
    quantization it could be converted to is listed (size, memory, fits, tokens/s) and the recommended one is
    marked, with the `edgelm convert` command that makes it.  Only headers are read, never the weights.

    Memory is weights + KV cache at that n_ctx + runtime overhead, and must fit the device with head-room;
    speed is estimated from the device's memory bandwidth and the bytes read per token, or from its compute where
    that binds first (CPUs without AVX2).  When nothing fits, says by how much.

    \b
    Examples:
      edgelm recommend ./SmolLM2-135M-Instruct --device raspberry-pi-zero-2-w   # which quant to convert to
      edgelm recommend HuggingFaceTB/SmolLM2-135M-Instruct --device x86-laptop-16gb --json
      edgelm recommend model-onnx/ --device raspberry-pi-5-8gb
      edgelm recommend model.gguf --device raspberry-pi-4-4gb
      edgelm recommend --device raspberry-pi-zero-2-w --json
      edgelm recommend model.gguf --device raspberry-pi-5-8gb --parallel 4
      edgelm recommend big.gguf --device raspberry-pi-5-4gb --workers 3          # four boards, 1 GbE
      edgelm recommend big.gguf --workers 192.168.1.21:50052,192.168.1.22:50052  # running workers
    """
    if workers is not None:
        _recommend_cluster(model, device, n_ctx, as_json, workers, worker_device, link, hop_ms)
        return
    from edgelm.plan import recommend

    plan = recommend(model, device, n_ctx=n_ctx, parallel=parallel)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
        return
    b = plan.memory_breakdown
    if plan.source_format == "hf":
        _print_quantizations(plan)
    click.echo(f"device      {plan.device_title}")
    click.echo(f"backend     {plan.backend} ({plan.format}), {plan.threads} threads"
               + (", all layers on the GPU" if plan.n_gpu_layers else ""))
    click.echo(f"quant       {plan.quant}" + (f"   -> {plan.convert_command}" if plan.convert_command
                                             and plan.source_format != "hf" else ""))
    click.echo(f"n_ctx       {plan.n_ctx} (KV cache {plan.kv_cache})"
               + (f", {plan.parallel} sequences at a time" if plan.parallel > 1 else ""))
    click.echo(f"memory      {plan.memory_bytes / 2**20:.0f} MB of {plan.device_memory_bytes / 2**20:.0f} MB usable "
               f"(weights {b['weights'] / 2**20:.0f}, KV {b['kv_cache'] / 2**20:.0f}, "
               f"runtime {b['overhead'] / 2**20:.0f})")
    click.echo(f"speed       ~{plan.tokens_per_second:.0f} tokens/s decode (bound by {plan.bound_by})")
    for note in plan.notes:
        click.echo(f"note        {note}")
    if plan.source_format == "hf":
        click.echo(f"\nconvert     {plan.convert_command}")


def _print_quantizations(plan: Any) -> None:
    """The table of a checkpoint plan: one line per quantization, the recommended one marked."""
    click.echo(f"model       {plan.model} (Hugging Face checkpoint)")
    click.echo(f"\n  {'format':<6} {'quant':<7} {'size':>9} {'memory':>9} {'n_ctx':>6} {'KV':<5} {'fits':<4} "
               f"{'tokens/s':>8}")
    for r in plan.quantizations:
        mark = "*" if r["recommended"] else " "
        click.echo(f"{mark} {r['format']:<6} {r['quant']:<7} {r['size_bytes'] / 2**20:>6.0f} MB "
                   f"{r['memory_bytes'] / 2**20:>6.0f} MB {r['n_ctx']:>6} {r['kv_cache']:<5} "
                   f"{'yes' if r['fits'] else 'no':<4} {r['tokens_per_second']:>8.0f}")
    click.echo("  (* recommended; memory = weights + KV cache at that n_ctx + runtime)\n")


def _recommend_cluster(model: str | None, device: str, n_ctx: int | None, as_json: bool, workers: str,
                       worker_device: str | None, link: str, hop_ms: float | None) -> None:
    import sys

    from edgelm.rpc.cluster import print_plan, recommend_cluster

    count: int | list[str] = int(workers) if workers.strip().isdigit() else [workers]
    plan = recommend_cluster(model, device, workers=count, worker_device=worker_device, n_ctx=n_ctx, link=link,
                             hop_ms=hop_ms)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan, click.echo)
    if not plan.fits:
        sys.exit(8)  # as DoesNotFitError: the model does not fit these devices


COMMANDS = [doctor_command, devices_command, recommend_command]
