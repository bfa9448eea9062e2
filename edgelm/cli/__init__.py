"""The `edgelm` command: a thin layer over the library API.

Each command lives in its own module and calls the library's defining modules; errors are mapped to messages and
exit codes through :data:`EXIT_CODES` (edgelm.cli.common; set EDGELM_DEBUG=1 to see the traceback instead).
"""

from __future__ import annotations

import importlib
import click

from .common import EXIT_CODES, exit_code_for, handle_errors, with_progress

# command -> the module under edgelm.cli that defines it (in its COMMANDS). A command's module is imported only
# when that command runs, so `edgelm run` does not pay for the server, the converters or the Hub client;
# tests/test_cli_lazy.py checks this table against every module's COMMANDS.
COMMAND_MODULES = {
    "run": "generate", "chat": "generate", "info": "generate",
    "batch": "batch",
    "convert": "convert", "install-converter": "convert",
    "compress": "compress",
    "bench": "measure", "eval": "measure",
    "doctor": "platforms", "devices": "platforms", "recommend": "platforms",
    "serve": "serve",
    "worker": "rpc", "install-rpc": "rpc",
    "pull": "store", "list": "store", "rm": "store",
    "bundle": "bundle", "verify": "bundle", "install-cross-toolchain": "bundle",
}


class LazyGroup(click.Group):
    """A click group whose commands are imported from :data:`COMMAND_MODULES` when first looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMAND_MODULES:
            module = importlib.import_module(f"{__name__}.{COMMAND_MODULES[name]}")
            for command in module.COMMANDS:
                self.add_command(command)
        return self.commands.get(name)

    def all_commands(self) -> dict[str, click.Command]:
        """Every command, all their modules imported (for tests and tools that walk the whole CLI)."""
        ctx = click.Context(self)
        return {name: command for name in COMMAND_MODULES if (command := self.get_command(ctx, name)) is not None}


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(None, "-V", "--version", package_name="edgelm", prog_name="edgelm")
def main() -> None:
    """edgelm: run language models on edge devices.

    \b
    Quick start (the embedded SmolLM2-135M-Instruct needs no download):
      edgelm run "What is the capital of France?"
      edgelm chat
      edgelm info model.gguf --json

    Every command has --help.  Set EDGELM_DEBUG=1 for tracebacks instead of one-line errors.
    """


__all__ = ["main", "COMMAND_MODULES", "EXIT_CODES", "exit_code_for", "handle_errors", "with_progress"]
