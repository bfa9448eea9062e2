"""The package as it is installed, and its import graph, for the layer and cycle tests (tests/test_layers.py).

pyproject maps ``edgelm.runtimes``, ``edgelm.converters`` and ``edgelm.platforms`` to top-level folders, which
static tools (import-linter's grimp, mypy) cannot see through an editable install.  :func:`stage` lays the
packages out as a wheel would (read from pyproject's package-dir and packages, so it follows the build), and
:func:`module_graph` reads every import statement of every module, those inside functions too.
"""

from __future__ import annotations

import ast
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

# third-party packages that are slow to import or optional: imported only inside the functions that need them
HEAVY = ("llama_cpp", "onnxruntime", "onnxruntime_genai", "onnx", "onnx_ir", "torch", "transformers",
         "huggingface_hub", "tokenizers", "safetensors", "gguf", "optimum", "accelerate", "matplotlib", "starlette",
         "uvicorn", "openvino", "PySide6", "PyInstaller", "llguidance", "jsonschema", "sentencepiece")


def package_folders() -> dict[str, Path]:
    """Each package's import name -> its source folder, as pyproject tells setuptools."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool.get("package-dir", {})
    out = {}
    for pkg in tool["packages"]:
        # the longest mapped prefix decides where a package lives (edgelm.runtimes -> runtimes/)
        prefix = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            folder = ROOT / pkg.replace(".", "/")
        else:
            folder = ROOT / dirs[prefix] / pkg[len(prefix) + 1:].replace(".", "/") if pkg != prefix else \
                ROOT / dirs[prefix]
        out[pkg] = folder
    return out


def stage(target: Path) -> Path:
    """Copy the packages' .py files into ``target`` in their installed layout; returns ``target``."""
    for pkg, folder in package_folders().items():
        dest = target / pkg.replace(".", "/")
        dest.mkdir(parents=True, exist_ok=True)
        for src in folder.glob("*.py"):
            shutil.copy2(src, dest / src.name)
        if (folder / "py.typed").exists():
            shutil.copy2(folder / "py.typed", dest / "py.typed")
    return target


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str  # module name (first-party: the module itself; third-party: the top-level package)
    line: int
    lazy: bool  # inside a function (or a class body's method)
    first_party: bool


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in package_folders().items():
        for src in folder.glob("*.py"):
            mods[pkg if src.stem == "__init__" else f"{pkg}.{src.stem}"] = src
    return mods


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if not level:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def module_graph() -> tuple[dict[str, Path], list[Import]]:
    """Every first-party module and every import statement in it (function-level ones marked lazy)."""
    mods = _modules()
    imports: list[Import] = []

    def first_party_module(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.stem == "__init__"
        lazy_nodes = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for sub in ast.walk(node):
                    lazy_nodes.add(id(sub))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module, node.level, name, is_package)
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if subs and len(subs) == len(node.names) else [base] + subs
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top == "edgelm":
                    resolved = first_party_module(target)
                    if resolved is None or resolved == name:
                        continue
                    imports.append(Import(name, resolved, node.lineno, id(node) in lazy_nodes, True))
                elif top:
                    imports.append(Import(name, top, node.lineno, id(node) in lazy_nodes, False))
    return mods, imports


def cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), counting lazy imports too."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.first_party:
            edges.setdefault(imp.importer, set()).add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


# First-party modules kept off the cold path of `edgelm.load` / `edgelm run` on a model file on this machine (issue 28:
# a CLI call, a desktop app's launch and a Pi's slow Python pay for every module imported): their importers may
# import them inside the function that needs them, as they do the heavy ones.  Each with where it is deferred.
COLD_PATH_DEFERRED = {
    "edgelm.hub": "edgelm.sources, edgelm.planning: only a name that is not a local path goes to the Hub cache",
    "edgelm.runtimes.remote": "edgelm.loader: only a load with workers= splits the model across RPC workers",
    "edgelm.tools.formats": "edgelm.model: a chat without tools reads no call formats",
    "edgelm.tools.prompt": "edgelm.model: only a chat with tools or earlier calls rewrites the messages",
    "edgelm.tools.grammar": "edgelm.model: only a chat with tools builds the calls' grammar",
    "edgelm.tools.parse": "edgelm.model: only a chat with tools, or stop strings (held_back), parses the answer",
}


def heavy_modules(imports: list[Import]) -> set[str]:
    """First-party modules whose import loads a heavy third-party package (directly or through other modules'
    module-level imports): these are the ones other modules may import lazily."""
    eager: dict[str, set[str]] = {}
    heavy = set()
    for imp in imports:
        if imp.lazy:
            continue
        if imp.first_party:
            eager.setdefault(imp.importer, set()).add(imp.imported)
        elif imp.imported in HEAVY:
            heavy.add(imp.importer)
    changed = True
    while changed:
        changed = False
        for mod, deps in eager.items():
            if mod not in heavy and deps & heavy:
                heavy.add(mod)
                changed = True
    return heavy
