"""`edgelm worker`, `edgelm install-rpc`: split a model across machines with llama.cpp's RPC workers."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import click

from edgelm.rpc import protocol
from edgelm.rpc.build import install_rpc
from edgelm.rpc.worker import INSECURE_WARNING, InsecureWorkerWarning, default_cache_dir, print_banner, serve_worker

from .common import handle_errors


@click.command("worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback is reachable by others: RPC has no authentication "
                   "(a warning is printed); use a private network, or keep 127.0.0.1 and an SSH tunnel.")
@click.option("--port", default=50052, show_default=True, type=int, help="TCP port to listen on.")
@click.option("--mem", default=None, metavar="SIZE",
              help="Most memory to offer (e.g. 2GB); clients split layers by what the worker reports "
                   "[default: the memory available now].")
@click.option("--threads", type=int, default=None, help="CPU threads [default: the performance cores].")
@click.option("--cache", "cache", default=None, is_flag=False, flag_value="", metavar="DIR",
              help="Keep weights (tensors above 10 MB) in DIR by hash, so reloading a model does not send them again; "
                   "--cache alone uses ~/.cache/edgelm/rpc-cache.")
@click.option("--device", "devices", multiple=True, metavar="NAME",
              help="ggml device to serve (repeatable) [default: the GPUs, else the CPU].")
@handle_errors
def worker_command(host: str, port: int, mem: str | None, threads: int | None, cache: str | None,
                   devices: tuple[str, ...]) -> None:
    """Serve this machine's memory and compute to models loaded elsewhere with --workers (llama.cpp RPC).

    Runs llama.cpp's RPC server from the llama.cpp build edgelm uses.  A model loaded with
    --workers HOST:PORT,... puts its layers on the workers by the memory each reports; this machine then holds and
    computes its share.  One client at a time.  Ctrl-C stops it.

    \b
    Examples:
      edgelm worker                                   # 127.0.0.1:50052, for an SSH tunnel
      edgelm worker --host 192.168.1.21 --mem 3GB     # on a private network (prints a warning)
      edgelm worker --port 50053 --threads 4 --cache  # keep large weights between loads
    and on the machine that runs the model:
      edgelm run model.gguf "Hello" --workers 192.168.1.21:50052,192.168.1.22:50052
    """
    def ready(cfg: Any, facts: list[dict[str, object]]) -> None:
        print_banner(cfg, facts, click.echo)

    cache_dir = None if cache is None else (cache or str(default_cache_dir()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureWorkerWarning)  # said below, louder
        if not protocol.is_loopback(host):
            click.secho("!" * 100, fg="red", err=True)
            click.secho("WARNING: " + INSECURE_WARNING.format(host=host, port=port), fg="red", bold=True, err=True)
            click.secho("!" * 100, fg="red", err=True)
        try:
            serve_worker(host, port, mem=mem, threads=threads, cache=cache_dir, devices=devices or None, ready=ready)
        except KeyboardInterrupt:
            click.echo("\nworker stopped.", err=True)
    sys.stdout.flush()
    os._exit(0)  # llama.cpp's server thread blocks in accept(): leave without waiting for it


@click.command("install-rpc")
@click.option("--source", default=None, type=click.Path(exists=True),
              help="The llama-cpp-python sdist (.tar.gz) or a llama.cpp tree to build from [default: fetched with pip, "
                   "usually from pip's cache].")
@click.option("--force", is_flag=True, help="Rebuild even if a module for this llama-cpp-python exists.")
@handle_errors
def install_rpc_command(source: str | None, force: bool) -> None:
    """Build llama.cpp's RPC backend for the installed llama-cpp-python (for `edgelm worker` and --workers).

    Compiles ggml-rpc (two C++ files of the llama.cpp release that llama-cpp-python vendors, about 10 s of CPU)
    into a module for this very build, checks it in a child process, and keeps it under
    ~/.cache/edgelm/tools/ggml-rpc/.  Nothing to do when llama-cpp-python was built with -DGGML_RPC=on.
    Needs a C++ compiler.  Run it on every machine: the one with the model and each worker.

    \b
    Examples:
      edgelm install-rpc
      edgelm install-rpc --source llama_cpp_python-0.3.36.tar.gz   # offline
    """
    module = install_rpc(force=force, source=source, progress=lambda message, fraction: click.echo(message, err=True))
    click.echo(f"RPC backend: {module if module else 'built into llama-cpp-python'}")


COMMANDS = [worker_command, install_rpc_command]
