"""Where models come from stays one-way: plan < hub < store, sources < loader (edgelm/hub/__init__.py, STYLE.md).

Every first-party import counts, those inside functions too, as grimp / import-linter count them (a name imported
from a package counts as that submodule when it is one).  The test reads the source; it imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the package's folders (pyproject maps these three to top-level folders)
FOLDERS = {"edgelm": ROOT / "edgelm", "edgelm.runtimes": ROOT / "runtimes", "edgelm.converters": ROOT / "converters",
           "edgelm.platforms": ROOT / "platforms"}

# bottom to top: each may import those before it, never one after it
ORDER = ["edgelm.default_model", "edgelm.store_index", "edgelm.plan", "edgelm.hub", "edgelm.store", "edgelm.sources",
         "edgelm.loader"]
# the files whose first-party imports must all sit at module level
MODULE_LEVEL = ["edgelm.default_model", "edgelm.store_index", "edgelm.plan", "edgelm.hub", "edgelm.store",
                "edgelm.sources", "edgelm.loader"]


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "edgelm" and parts[0] in ("runtimes", "converters", "platforms"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, bool]]:
    """(first-party module imported, at module level?) for each import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    base = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [_owner(a.name) for a in node.names if a.name.split(".")[0] == "edgelm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = base
                for _ in range(node.level - 1):
                    target = target.rpartition(".")[0]
                target = f"{target}.{node.module}" if node.module else target
            else:
                target = node.module or ""
            if target.split(".")[0] != "edgelm":
                continue
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else _owner(target) for a in node.names]
        found += [(n, id(node) in top) for n in names if n and n != module]
    return found


GRAPH = {m: {n for n, _ in _imports(m)} for m in MODULES}


def _cycles() -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int | None:
    for i, name in enumerate(ORDER):
        if module == name or module.startswith(name + "."):
            return i
    return None


def test_where_models_come_from_is_in_no_import_cycle():
    for comp in _cycles():
        ours = sorted(m for m in comp if _layer(m) is not None)
        assert not ours, f"{ours} are in an import cycle: {sorted(comp)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) is not None))
def test_each_imports_only_what_is_below_it(module):
    above = sorted(n for n in GRAPH[module] if (_layer(n) or -1) > _layer(module))
    assert not above, f"{module} imports {above}, which sit above it ({' < '.join(ORDER)})"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if any(m == n or m.startswith(n + ".")
                                                                     for n in MODULE_LEVEL)))
def test_first_party_imports_at_module_level(module):
    lazy = sorted({n for n, top in _imports(module) if not top})
    assert not lazy, f"{module} imports {lazy} inside a function: move it to the top (or the shared part down)"
    assert "edgelm" not in GRAPH[module], f"{module} imports the package root (which re-exports everything)"
