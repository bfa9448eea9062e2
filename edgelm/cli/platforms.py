"""`edgelm doctor`, `edgelm devices`, `edgelm recommend`."""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import click

from edgelm.converters.hf_gguf import converter_home, find_converter
from edgelm.converters.onnx.optimum import find_optimum, optimum_home
from edgelm.declarations import Setting, resolve
from edgelm.plan import RECOMMEND
from edgelm.planning import recommend
from edgelm.platforms import detect
from edgelm.platforms.profiles import profiles
from edgelm.cluster import LINKS, print_plan, recommend_cluster

from .common import handle_errors
from .options import pop_given, table_options

_CLUSTER = inspect.signature(recommend_cluster).parameters
# `edgelm recommend --workers ...` plans with recommend_cluster: its flags, with its defaults
CLUSTER_FLAGS = (
    Setting("workers", "str", None, "Plan a cluster: this device and N more boards (or these running workers) "
            "holding the layers (llama.cpp RPC; see `edgelm worker`).", cli=("--workers",), metavar="N|HOST:PORT,...",
            example="3"),
    Setting("worker_profile", "str", _CLUSTER["worker_profile"].default, "The workers' board, a profile [default: "
            "the same as --profile].", cli=("--worker-profile",), example="raspberry-pi-5-4gb"),
    Setting("link", "choice", _CLUSTER["link"].default, "The network between the boards (sets the per-token "
            "round-trip estimate).", choices=tuple(LINKS), cli=("--link",), example="wifi"),
    Setting("hop_ms", "float", _CLUSTER["hop_ms"].default, "Round trip per worker per token, in ms [default: the "
            "link's].", cli=("--hop-ms",), example=2.0),
)


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
    h = detect()
    found = find_converter()
    converter = {"installed": found is not None, "path": str(found[0]) if found else None,
                 "install": "edgelm install-converter", "default_folder": str(converter_home())}
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
    """List the device profiles `edgelm recommend --profile NAME` (and pull, --profile) plans for.

    Add a RAM size to a name to pick a variant, e.g. raspberry-pi-5-8gb or apple-m2-24gb.
    """
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
@table_options(RECOMMEND)  # --profile, --n-ctx, --parallel (edgelm.plan.RecommendOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@table_options(CLUSTER_FLAGS)  # --workers, --worker-profile, --link, --hop-ms (edgelm.cluster.recommend_cluster)
@handle_errors
def recommend_command(model: str | None, as_json: bool, **kwargs: Any) -> None:
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
      edgelm recommend ./SmolLM2-135M-Instruct --profile raspberry-pi-zero-2-w   # which quant to convert to
      edgelm recommend HuggingFaceTB/SmolLM2-135M-Instruct --profile x86-laptop-16gb --json
      edgelm recommend model-onnx/ --profile raspberry-pi-5-8gb
      edgelm recommend model.gguf --profile raspberry-pi-4-4gb
      edgelm recommend --profile raspberry-pi-zero-2-w --json
      edgelm recommend model.gguf --profile raspberry-pi-5-8gb --parallel 4
      edgelm recommend big.gguf --profile raspberry-pi-5-4gb --workers 3          # four boards, 1 GbE
      edgelm recommend big.gguf --workers 192.168.1.21:50052,192.168.1.22:50052  # running workers
    """
    options = pop_given(kwargs, RECOMMEND)
    cluster = pop_given(kwargs, CLUSTER_FLAGS)
    if "workers" in cluster:
        _recommend_cluster(model, options, cluster, as_json)
        return
    plan = recommend(model, **options)
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


def _recommend_cluster(model: str | None, options: dict[str, Any], cluster: dict[str, Any], as_json: bool) -> None:
    workers = cluster.pop("workers")
    count: int | list[str] = int(workers) if workers.strip().isdigit() else [workers]
    planned = resolve(RECOMMEND, options, "recommend option")
    plan = recommend_cluster(model, planned["profile"], workers=count, n_ctx=planned["n_ctx"], **cluster)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan, click.echo)
    if not plan.fits:
        sys.exit(8)  # as DoesNotFitError: the model does not fit these devices


COMMANDS = [doctor_command, devices_command, recommend_command]
