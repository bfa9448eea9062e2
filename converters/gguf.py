"""GGUF output: llama.cpp's own quantizer (through llama-cpp-python) re-quantizes a GGUF to any type it offers.

Writes to a temporary file next to the target and renames it at the end: an interrupted or failed run (Ctrl-C
included) leaves nothing at the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from edgelm.errors import (BackendNotInstalledError, ConversionError, InsufficientDiskSpaceError, OutputExistsError,
                           UnknownQuantizationError)
from edgelm.runtimes.gguf import FILE_TYPES, read_header

# output types by name (llama_ftype ids), as users type them: q4_k_m, Q8_0, f16, ...
QUANTS: dict[str, int] = {name.lower(): ftype for ftype, name in FILE_TYPES.items() if name not in ("MXFP4_MOE",)}
# approximate bits per weight of each type, to check disk space before writing
BPW = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5, "q5_0": 5.5,
       "q5_1": 6.0, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q4_1": 5.0}


def quant_id(name: str) -> int:
    key = str(name).strip().lower()
    if key not in QUANTS:
        raise UnknownQuantizationError(f"Unknown GGUF quantization {name!r}.",
                                       fix=f"Use one of: {', '.join(sorted(QUANTS))}.", quant=name)
    return QUANTS[key]


def requantize(source: Path, output: Path, quant: str, *, overwrite: bool = False, threads: int | None = None,
               progress: Callable[[str, float], None] | None = None,
               verify: Callable[[Path], None] | None = None) -> Path:
    """Write ``source`` (a GGUF) re-quantized to ``quant`` at ``output``.

    ``verify(path)`` runs on the finished temporary file before it is renamed to ``output``; raising there leaves
    nothing at ``output``."""
    ftype = quant_id(quant)
    header = read_header(source)  # a malformed source is refused before llama.cpp sees it
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendNotInstalledError("GGUF quantization needs llama-cpp-python.",
                                       fix='pip install "edgelm[llamacpp]"') from exc
    from edgelm.runtimes.llamacpp import _init_backend

    _init_backend()  # llama.cpp's log goes to `logging`, not the terminal
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise OutputExistsError(f"The output {output} already exists.", fix="Choose another path or pass --overwrite.",
                                path=str(output))
    folder = output.parent if str(output.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    need = int(header.parameters * BPW.get(quant.lower(), 16) / 8 * 1.05) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise InsufficientDiskSpaceError(f"{folder} has {free / 1e6:.0f} MB free; the {quant} file needs about "
                                         f"{need / 1e6:.0f} MB.", fix="Free some space or write elsewhere.")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if progress:
            progress(f"quantizing to {quant.upper()} with llama.cpp", 0.1)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.nthread = threads or 0
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConversionError(f"llama.cpp could not quantize {source} to {quant.upper()} (code {rc}).",
                                  fix="Some types need an importance matrix or a higher-precision source (f16).",
                                  quant=quant)
        read_header(tmp)  # what was written is whole
        if verify:
            verify(tmp)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    if progress:
        progress("written", 1.0)
    return output


def check_runs(path: Path, timeout: float = 300) -> None:
    """Load ``path`` with the llama.cpp backend and decode a few tokens, in a child process (llama.cpp aborts the
    process on some bad files).  A file this llama.cpp cannot load or run is a ConversionError that says why."""
    import json
    import subprocess
    import sys

    code = "from edgelm.converters.gguf import _check_child; _check_child()"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"Loading the converted {path.name} did not finish in {timeout:.0f} s.",
                              fix="Check the file with `edgelm info`.") from exc
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    result = json.loads(last[0]) if last and last[0].startswith("{") else {}
    if proc.returncode == 0 and result.get("ok"):
        return
    header = read_header(path)
    import llama_cpp

    why = result.get("error") or (f"the process died with signal {-proc.returncode}" if proc.returncode < 0 else
                                  " | ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit {proc.returncode}")
    raise ConversionError(
        f"The converted file ({header.architecture}, {header.quantization}) does not run on the llama.cpp in "
        f"llama-cpp-python {llama_cpp.__version__}: {why}",
        fix="The converter may know an architecture or tokenizer this llama.cpp does not: upgrade llama-cpp-python "
        '(pip install -U "edgelm[llamacpp]"), or install the converter version edgelm is tested with '
        "(`edgelm install-converter --force`).", architecture=header.architecture)


def _check_child() -> None:
    import json
    import sys

    from edgelm.errors import EdgelmError
    from edgelm.loader import load

    try:
        with load(sys.argv[1], backend="llamacpp", n_ctx=64, threads=1) as model:
            model.generate("Hello", max_tokens=2, temperature=0)
    except EdgelmError as exc:
        print(json.dumps({"ok": False, "error": exc.message}))
        sys.exit(1)
    print(json.dumps({"ok": True}))
