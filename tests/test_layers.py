"""The house rules of imports (docs/architecture.md): one-way layers, no cycles, first-party imports at module
level, llama.cpp loaded through its one doorway; and the static checks (import-linter, ruff, mypy) pyproject
configures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .layers import COLD_PATH_DEFERRED, ROOT, cycles, heavy_modules, module_graph, stage


@pytest.fixture(scope="module")
def graph():
    return module_graph()


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return stage(tmp_path_factory.mktemp("staged"))


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        pytest.fail(f"{name} is not installed: the README's test command installs it (pip install -e \".[dev]\").")
    return path


def test_no_import_cycles_counting_imports_inside_functions(graph):
    _, imports = graph
    found = cycles(imports)
    detail = []
    for comp in found:
        members = set(comp)
        detail.append(" <-> ".join(comp) + ": " + "; ".join(
            f"{i.importer}:{i.line} imports {i.imported}{' (in a function)' if i.lazy else ''}"
            for i in imports if i.first_party and i.importer in members and i.imported in members))
    assert not found, "import cycles (move what both sides need down a layer):\n" + "\n".join(detail)


def test_first_party_imports_inside_functions_only_reach_heavy_modules(graph):
    """A first-party import inside a function is allowed only where the module it imports loads a heavy or optional
    third-party package (llama.cpp, onnxruntime, torch, ...), or is one kept off the cold start's path on purpose
    (tests/layers.py COLD_PATH_DEFERRED): everything else is imported at module level, where the layers contract and
    a reader see it."""
    _, imports = graph
    allowed = heavy_modules(imports) | set(COLD_PATH_DEFERRED)
    bad = [f"{i.importer}:{i.line} imports {i.imported}" for i in imports
           if i.first_party and i.lazy and i.imported not in allowed]
    assert not bad, "import these at module level:\n" + "\n".join(bad)


def test_no_module_imports_the_package_root(graph):
    """edgelm/__init__ re-exports the public API from every layer: a submodule importing it closes a cycle."""
    _, imports = graph
    bad = [f"{i.importer}:{i.line}" for i in imports if i.first_party and i.imported == "edgelm"]
    assert not bad, "import from the defining module instead of `edgelm`:\n" + "\n".join(bad)


def test_heavy_packages_are_not_imported_by_import_edgelm(graph):
    _, imports = graph
    heavy = heavy_modules(imports)
    eager: dict[str, set[str]] = {}
    for i in imports:
        if i.first_party and not i.lazy:
            eager.setdefault(i.importer, set()).add(i.imported)
    seen, todo = set(), ["edgelm"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(eager.get(mod, ()))
    assert not (seen & heavy), f"`import edgelm` would load a heavy package through: {sorted(seen & heavy)}"


def test_llama_cpp_is_loaded_through_edgelm_native_llamacpp(graph):
    """libgomp reads its spin setting once, when llama.cpp's libraries load: every module importing llama_cpp
    imports edgelm.native.llamacpp (which sets it) first, in the same scope."""
    mods, imports = graph
    bad = []
    for imp in imports:
        if imp.first_party or imp.imported != "llama_cpp" or imp.importer == "edgelm.native.llamacpp":
            continue
        before = [i for i in imports if i.importer == imp.importer and i.first_party
                  and i.imported == "edgelm.native.llamacpp" and i.line <= imp.line and i.lazy == imp.lazy]
        if not before:
            bad.append(f"{imp.importer}:{imp.line}")
    assert not bad, ("import llama_cpp after edgelm.native.llamacpp (`from edgelm.native.llamacpp import llama_cpp`):"
                     "\n" + "\n".join(bad))


def test_import_edgelm_sets_no_environment_variable():
    code = ("import os; before = dict(os.environ); import edgelm; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_openmp_spin_is_set_only_where_the_user_chose_no_wait_policy():
    from edgelm.native.llamacpp import SPIN_COUNT, configure_openmp

    env: dict[str, str] = {}
    configure_openmp(env)
    assert env == {"GOMP_SPINCOUNT": SPIN_COUNT}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(chosen)
        configure_openmp(env)
        assert env == chosen


def test_import_linter_contracts_hold(staged):
    env = dict(os.environ, PYTHONPATH=str(staged))
    proc = subprocess.run([_tool("lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=staged)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: " in proc.stdout and " broken" in proc.stdout and "0 broken" in proc.stdout, proc.stdout


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow  # mypy reads the packages and their stubs: ~30-60 s
def test_mypy_is_clean(staged):
    env = dict(os.environ, MYPYPATH=str(staged))
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(staged / ".mypy_cache")], capture_output=True, text=True,
                          env=env, cwd=staged)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
