"""The `edgelm` command: a thin layer over the library API.

Each command lives in its own module and calls the library's defining modules; errors are mapped to messages and
exit codes through :data:`EXIT_CODES` (edgelm.cli.common; set EDGELM_DEBUG=1 to see the traceback instead).
"""

from __future__ import annotations

import click

from edgelm.version import __version__

from . import batch, bundle, compress, convert, generate, measure, platforms, rpc, serve, store
from .common import EXIT_CODES, exit_code_for, handle_errors, with_progress


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="edgelm")
def main() -> None:
    """edgelm: run language models on edge devices.

    \b
    Quick start (the embedded SmolLM2-135M-Instruct needs no download):
      edgelm run "What is the capital of France?"
      edgelm chat
      edgelm info model.gguf --json

    Every command has --help.  Set EDGELM_DEBUG=1 for tracebacks instead of one-line errors.
    """


for _module in (generate, batch, convert, compress, measure, platforms, serve, rpc, store, bundle):
    for _command in _module.COMMANDS:
        main.add_command(_command)

__all__ = ["main", "EXIT_CODES", "exit_code_for", "handle_errors", "with_progress"]
