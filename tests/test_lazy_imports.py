"""Cold start: `import edgelm` and a CLI command import only what they use (issue 28), and the lazy tables that
make it so (edgelm.exports, edgelm.cli.COMMAND_MODULES) cannot drift from the modules they name."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import click
import pytest

import edgelm
from edgelm.cli import COMMAND_MODULES, main
from edgelm.exports import LAZY

# what `import edgelm` and `edgelm run` must not load: the public API's other layers, the server, the converters
NOT_AT_IMPORT = ("edgelm.loader", "edgelm.model", "edgelm.server", "edgelm.conversion", "edgelm.compression",
                 "edgelm.hub", "edgelm.cluster", "edgelm.plan", "importlib.metadata")
NOT_FOR_RUN = ("edgelm.server", "edgelm.conversion", "edgelm.compression", "edgelm.cluster", "edgelm.measure",
               "edgelm.cli.serve", "edgelm.cli.convert", "starlette", "uvicorn")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_edgelm_loads_only_errors_and_types():
    loaded = _modules_after("import edgelm")
    assert "edgelm.errors" in loaded and "edgelm.types" in loaded
    assert not loaded & set(NOT_AT_IMPORT), sorted(loaded & set(NOT_AT_IMPORT))


def test_every_public_name_resolves_to_its_defining_module():
    for name, target in LAZY.items():
        module, _, attribute = target.partition(":")
        assert getattr(edgelm, name) is getattr(importlib.import_module(module), attribute or name), name
    assert set(edgelm.__all__) <= set(dir(edgelm))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edgelm.nope  # noqa: B018


def test_cli_command_table_matches_every_module():
    seen = {}
    for module_name in sorted(set(COMMAND_MODULES.values())):
        module = importlib.import_module(f"edgelm.cli.{module_name}")
        for command in module.COMMANDS:
            seen[command.name] = module_name
    assert seen == COMMAND_MODULES
    assert set(main.all_commands()) == set(COMMAND_MODULES)
    assert main.get_command(click.Context(main), "no-such-command") is None


def test_run_imports_neither_the_server_nor_the_converters():
    loaded = _modules_after("from click.testing import CliRunner\nfrom edgelm.cli import main\n"
                            "r = CliRunner().invoke(main, ['run', '--help'])\nassert r.exit_code == 0, r.output")
    assert "edgelm.cli.generate" in loaded
    assert not loaded & set(NOT_FOR_RUN), sorted(loaded & set(NOT_FOR_RUN))


def test_help_and_version_list_every_command():
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMAND_MODULES:
        assert f"  {name}" in result.output
    version = CliRunner().invoke(main, ["--version"])
    assert version.exit_code == 0 and edgelm.__version__ in version.output


# what loading a local GGUF and generating must not import (tests/layers.py COLD_PATH_DEFERRED says why for each)
NOT_FOR_A_LOCAL_LOAD = ("edgelm.plan", "edgelm.hub", "edgelm.rpc", "edgelm.rpc.attach", "edgelm.runtimes.remote",
                        "edgelm.tools.formats", "edgelm.tools.grammar", "edgelm.tools.parse", "edgelm.tools.prompt",
                        "edgelm.measure", "edgelm.store")


@pytest.mark.slow
def test_loading_a_local_file_imports_no_planner_hub_rpc_or_tools():
    loaded = _modules_after(f"import edgelm\nm = edgelm.load({str(edgelm.default_model_path())!r}, n_ctx=256)\n"
                            "m.generate('Hi', max_tokens=2, temperature=0)\nm.close()")
    assert "edgelm.runtimes.llamacpp" in loaded and "edgelm.tools.spec" in loaded
    assert not loaded & set(NOT_FOR_A_LOCAL_LOAD), sorted(loaded & set(NOT_FOR_A_LOCAL_LOAD))
    # with stop strings, the held-back helper (edgelm.tools.parse) comes along, and nothing else of the tools
    with_stop = _modules_after(f"import edgelm\nm = edgelm.load({str(edgelm.default_model_path())!r}, n_ctx=256)\n"
                               "m.generate('Hi', max_tokens=2, temperature=0, stop=['zz'])")
    assert "edgelm.tools.parse" in with_stop and "edgelm.tools.grammar" not in with_stop
