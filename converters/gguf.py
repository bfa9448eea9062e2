"""The GGUF target: Hugging Face checkpoint -> 16-bit GGUF (llama.cpp's converter, :mod:`.hf_gguf`) -> any type
llama.cpp's quantizer offers (through llama-cpp-python); a GGUF source is re-quantized directly.

Writes to a temporary file next to the target and renames it at the end: an interrupted or failed run (Ctrl-C
included) leaves nothing at the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgelm.errors import (ConversionError, InvalidParameterError, InvalidSourceError, OutputExistsError,
                           UnknownQuantizationError)
from edgelm.formats import ensure_free_space, hf
from edgelm.formats.gguf import FILE_TYPES, file_type_bpw, is_gguf, read_header
from edgelm.optional import require

from . import Progress, Staged, Verify, as_is
from .hf_gguf import check_hf_source, hf_to_gguf

# output types by name (llama_ftype ids), as users type them: q4_k_m, Q8_0, f16, ...
QUANTS: dict[str, int] = {name.lower(): ftype for ftype, name in FILE_TYPES.items() if name not in ("MXFP4_MOE",)}


@dataclass(frozen=True)
class GGUFOptions:
    threads: int | None = None  # threads for llama.cpp's quantizer (default: all cores)
    timeout: float | None = None  # seconds llama.cpp's HF -> GGUF converter may run

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InvalidParameterError(f"Invalid threads: {self.threads!r}.", fix="threads must be an integer >= 1.",
                                        parameter="threads", value=self.threads)


def quant_id(name: str) -> int:
    key = str(name).strip().lower()
    if key not in QUANTS:
        raise UnknownQuantizationError(f"Unknown GGUF quantization {name!r}.",
                                       fix=f"Use one of: {', '.join(sorted(QUANTS))}.", quant=name)
    return QUANTS[key]


def requantize(source: Path, output: Path, quant: str, *, overwrite: bool = False, threads: int | None = None,
               progress: Progress | None = None, verify: Verify | None = None) -> Path:
    """Write ``source`` (a GGUF) re-quantized to ``quant`` at ``output``.

    ``verify(path)`` runs on the finished temporary file before it is renamed to ``output``; raising there leaves
    nothing at ``output``."""
    ftype = quant_id(quant)
    header = read_header(source)  # a malformed source is refused before llama.cpp sees it
    llama_cpp = require("llama_cpp", extra="llamacpp", purpose="GGUF quantization")
    from edgelm.native import llamacpp as native  # here, not at the top: it imports llama_cpp

    native.init()  # llama.cpp's log goes to `logging`, not the terminal
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise OutputExistsError(f"The output {output} already exists.", fix="Choose another path or pass --overwrite.",
                                path=str(output))
    folder = output.parent if str(output.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    need = int(header.parameters * file_type_bpw(quant) / 8 * 1.05) + (1 << 20)
    ensure_free_space(folder, need, f"The {quant} file")
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private: the output gets the user's usual permissions
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    if progress:
        progress("written", 1.0)
    return output


class GGUFTarget:
    name = "gguf"
    options = GGUFOptions
    auto_quants = ("q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0")

    def check_quant(self, quant: str, options: Any = None, given: bool = True) -> str:
        quant_id(quant)
        return str(quant).strip().lower()

    @contextlib.contextmanager
    def stage(self, source: Path, name: str, quant: str, out: Path, options: GGUFOptions, *, allow_pickle: bool,
              progress: Progress) -> Iterator[Staged]:
        if source.is_file() and is_gguf(source):
            yield Staged(source, source, f"the source {name}")
            return
        if not (source.is_dir() and (source / "config.json").is_file()):
            raise InvalidSourceError(f"{source} is neither a GGUF file nor a Hugging Face folder (no config.json).",
                                     fix="Pass a model folder with config.json, or a .gguf to re-quantize.",
                                     path=str(source))
        check_hf_source(source, allow_pickle=allow_pickle)
        out.parent.mkdir(parents=True, exist_ok=True)
        params = hf.count_parameters(source) or sum(f.stat().st_size for f in source.glob("*.bin")) // 2
        bytes_16 = 4 if quant == "f32" else 2
        ensure_free_space(out.parent, params * bytes_16 * 2 + (16 << 20), f"Converting {source.name}")
        outtype = quant if quant in ("f32", "bf16") else "auto"
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".convert", dir=out.parent))
        try:
            path = tmp / f"{source.name}-{outtype}.gguf"
            run = hf_to_gguf(source, path, outtype, allow_pickle=allow_pickle, timeout=options.timeout,
                             progress=lambda message, fraction: progress(message, 0.5 * fraction))
            header = read_header(path)
            yield Staged(source, path, f"{header.quantization} GGUF of {name}", run.seconds, run.peak_rss)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write(self, staged: Staged, quant: str, out: Path, options: GGUFOptions, *, overwrite: bool,
              progress: Progress, verify: Verify | None) -> Path:
        return requantize(staged.path, out, quant, overwrite=overwrite, threads=options.threads, verify=verify,
                          progress=lambda message, fraction: progress(message, 0.5 + 0.1 * fraction))

    def reference(self, staged: Staged, out: Path, quant: str | None) -> contextlib.AbstractContextManager[Path]:
        return as_is(staged.path)

    def method(self, out: Path) -> str | None:
        return None


TARGET = GGUFTarget()
