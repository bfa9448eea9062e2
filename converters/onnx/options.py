"""The ONNX target's options: one typed record, checked once, and the choice algo="auto" makes."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidParameterError, UnknownQuantizationError, UnsupportedModelError
from edgelm.formats import hf
from edgelm.formats.onnx_folder import QUANTS
from edgelm.formats.static_pair import NPU_QUANTS
from edgelm.platforms import detect

from .gptq import unimportable_tensor

log = logging.getLogger("edgelm.converters.onnx")

# weight quantization methods (MatMulNBits): the builder's round-to-nearest or llama.cpp-style k-quant search (the
# *_last variants keep the output projection at 8 bits), or edgelm's GPTQ (converters/onnx/gptq.py)
ALGOS = ("auto", "default", "rtn", "rtn_last", "k_quant", "k_quant_last", "k_quant_mixed", "gptq")
# auto: GPTQ for int4 when the fp32 model fits comfortably in this machine's memory, round-to-nearest otherwise
DEFAULT_ALGO = "auto"
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
# who writes the graph: onnxruntime-genai's model builder, optimum-onnx (converters/onnx/optimum.py), or auto: the
# builder for the architectures it supports (converters/onnx/export.py ARCHITECTURES), optimum for the others
EXPORTERS = ("auto", "genai", "optimum")
# what the graph is for: None (the builder's / optimum's dynamic graph for CPU and GPU EPs) or "npu" (the static
# prefill + decode pair of converters/onnx/npu.py); the NPU pair's weights: w8 (per channel) or w4 (GPTQ)
TARGETS = ("npu",)
NPU_WEIGHTS = ("w8", "w4")


@dataclass(frozen=True)
class OnnxOptions:
    """Options of an ONNX conversion (all optional).

    block_size: weights per quantization block for int4/int8 (16, 32, 64, 128, 256).
    symmetric: symmetric int4/int8 quantization (no zero points).
    accuracy_level: MatMulNBits compute type for activations: 1 fp32, 2 fp16, 3 bf16, 4 int8 (dynamic per-block int8
      quantization of activations, the fastest on CPUs).
    algo: how weights are rounded: gptq (int4: GPTQ calibrated on the standard library's docstrings; minutes on a
      CPU, same decode speed), default/rtn (round to nearest), k_quant (llama.cpp-style scale search), *_last (int8
      output head), k_quant_mixed (int8 for the most sensitive layers, slower).  auto: gptq for int4 when the fp32
      model takes under a quarter of the free memory (falling back to round to nearest, with a warning, if GPTQ
      fails), round to nearest otherwise.
    calibration: with algo="gptq", a UTF-8 text file to calibrate on instead (text like what the model will see).
    mixed_precision: with algo="gptq", keep the input embedding and the MLP down projections of the last third of
      the layers at 8 bits (SmolLM2, GPL-3 text: 1.155x -> 1.106x fp32 perplexity, built-in text 1.077x -> 1.075x,
      0.97x the decode speed, 92 -> 128 MB); False (default: int4 stays small): every matrix 4-bit, a tied
      embedding read from the int4 head.
    execution_provider: the EP the graph is built for: cpu, cuda, dml, webgpu.
    builder_options: more ``--extra_options key=value`` pairs for the model builder.
    timeout: seconds the exporter may run.
    exporter: auto (onnxruntime-genai's builder where it supports the architecture, optimum-onnx otherwise), genai or
      optimum (installed apart: `edgelm install-converter --optimum`; decoded by edgelm's own onnxruntime loop).
    target: "npu" writes the static-shape prefill + decode pair NPU execution providers take (QDQ, 16-bit
      activations, 8-bit KV; converters/onnx/npu.py) instead of the dynamic graph; quant is then w8a16, w4a16
      (from ``weights``) or fp32.  prefill: tokens per prefill run (AR-N).  context: the KV window the host keeps.
      weights: w8 (8-bit per channel) or w4 (GPTQ int4 per channel).  calibration: the text the activation ranges
      are measured on (default: a built-in mix, see npu.npu_calibration_text).
    """

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    algo: str = DEFAULT_ALGO
    calibration: str | None = None
    mixed_precision: bool = False
    execution_provider: str = "cpu"
    builder_options: dict[str, Any] | None = None
    timeout: float | None = None
    exporter: str = "auto"
    target: str | None = None
    prefill: int = 128
    context: int = 1024
    weights: str = "w8"

    def __post_init__(self) -> None:
        if self.target is not None and self.target not in TARGETS:
            raise _bad("target", self.target, f"Use {', '.join(TARGETS)}, or leave it out for CPU/GPU graphs.")
        if self.weights not in NPU_WEIGHTS:
            raise _bad("weights", self.weights, f"Use {' or '.join(NPU_WEIGHTS)}.")
        for name in ("prefill", "context"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "Use a positive number of tokens.")
        if self.exporter not in EXPORTERS:
            raise _bad("exporter", self.exporter, f"Use one of: {', '.join(EXPORTERS)}.")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise _bad("block_size", self.block_size, "Use 16, 32, 64, 128 or 256.")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise _bad("accuracy_level", self.accuracy_level,
                       "Use 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8 activations).")
        if self.algo not in ALGOS:
            raise _bad("algo", self.algo, f"Use one of: {', '.join(ALGOS)}.")
        if self.execution_provider not in EXECUTION_PROVIDERS:
            raise _bad("execution_provider", self.execution_provider, f"Use {', '.join(EXECUTION_PROVIDERS)}.")
        if not isinstance(self.mixed_precision, bool):
            raise _bad("mixed_precision", self.mixed_precision, "Use True or False.")
        if self.calibration is not None:
            if self.algo not in ("gptq", "auto") and self.target != "npu":
                raise InvalidParameterError("calibration text is used by algo='gptq' only.", fix='Add algo="gptq".',
                                            parameter="calibration", value=str(self.calibration))
            read_calibration(self.calibration)  # a missing or unreadable file is refused before any work

    def check(self, quant: str, given: bool = True) -> str:
        """The canonical quant name, after checking it goes with these options.  With target="npu" the quant is
        w8a16 / w4a16 (from ``weights``) unless fp32 is asked for; ``given``: the caller named it (else it is
        another format's default and is replaced)."""
        if self.target == "npu":
            wanted = f"{self.weights}a16"
            if not given:
                return wanted
            q = str(quant).lower()
            if q not in NPU_QUANTS:
                raise UnknownQuantizationError(f"Unknown NPU quantization {quant!r}.",
                                               fix=f"Use one of: {', '.join(NPU_QUANTS)} (or --weights w8|w4).",
                                               quant=quant)
            if q != "fp32" and q != wanted:
                raise InvalidParameterError(f"quant={q!r} does not match weights={self.weights!r}.",
                                            fix=f"Use --weights {q[:2]}, or leave --quant out.", parameter="quant",
                                            value=quant)
            return q
        if not isinstance(quant, str) or quant.lower() not in QUANTS:
            raise UnknownQuantizationError(f"Unknown ONNX quantization {quant!r}.",
                                           fix=f"Use one of: {', '.join(QUANTS)}.", quant=quant)
        quant = quant.lower()
        if self.algo == "gptq" and quant != "int4":
            raise InvalidParameterError(f"algo='gptq' makes int4 weights; quant is {quant!r}.",
                                        fix='Use quant="int4" with algo="gptq".', parameter="algo", value="gptq")
        return quant

    def replace(self, **changes: Any) -> "OnnxOptions":
        return dataclasses.replace(self, **changes)

    def quantization_record(self, quant: str) -> dict[str, Any] | None:
        """What the manifest records about how the weights were quantized."""
        if quant not in ("int4", "int8"):
            return None
        record = {"block_size": self.block_size, "symmetric": bool(self.symmetric),
                  "accuracy_level": self.accuracy_level, "algo": self.algo, "op": "MatMulNBits",
                  "bits": 4 if quant == "int4" else 8}
        if self.algo == "gptq" and quant == "int4" and self.mixed_precision and self.symmetric:
            record["mixed_precision"] = "int8 input embedding and last-half MLP down projections"
        return record


def _bad(name: str, value: Any, fix: str) -> InvalidParameterError:
    return InvalidParameterError(f"Invalid {name}: {value!r}.", fix=fix, parameter=name, value=value)


def resolve_algo(source_dir: Path, quant: str, opts: OnnxOptions, memory: int | None = None) -> OnnxOptions:
    """algo="auto": GPTQ for int4 (SmolLM2: 1.07x fp32 perplexity instead of 1.31x, same decode speed) when the
    fp32 model, loaded in torch for it, takes under a quarter of the available memory; round-to-nearest otherwise,
    with a warning.  int8 and float types always round to nearest.  GPTQ is not used for checkpoints whose tensor
    names onnxruntime-genai's GPTQ import would pass over (gptq.unimportable_tensor): refused when asked for by
    name, round-to-nearest with a warning under auto."""
    if opts.algo == "gptq" or (opts.algo == "auto" and quant == "int4"):
        name = unimportable_tensor(source_dir)
        if name and opts.algo == "gptq":
            raise UnsupportedModelError(
                f"GPTQ int4 is not available for {source_dir.name}: onnxruntime-genai's model builder does not import "
                f"GPTQ weights named like {name!r}.", fix="Use algo='default' (round to nearest) or 'k_quant_mixed'.",
                path=str(source_dir), tensor=name)
        if name:
            log.warning("int4 with round-to-nearest weights: onnxruntime-genai's model builder does not import GPTQ "
                        "weights named like %r.", name)
            return opts.replace(algo="default")
    if opts.algo != "auto":
        return opts
    if quant != "int4":
        if opts.calibration is not None:
            raise InvalidParameterError("calibration text is used by algo='gptq' (int4) only.", fix='Use quant="int4".',
                                        parameter="calibration", value=str(opts.calibration))
        return opts.replace(algo="default")
    if memory is None:
        memory = int(detect().memory.get("available") or 0)
    need = hf.count_parameters(source_dir) * 4
    if memory and need * 4 > memory:
        log.warning("int4 with round-to-nearest weights: GPTQ would load the fp32 model (%.1f GB) in torch, over a "
                    "quarter of the %.1f GB available; pass algo='gptq' (--algo gptq) to run it anyway.",
                    need / 1e9, memory / 1e9)
        return opts.replace(algo="default")
    return opts.replace(algo="gptq")


def read_calibration(path: Any) -> str | None:
    """The text of a calibration file (GPTQ), or None for the built-in one."""
    if path is None:
        return None
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(f"Cannot read the calibration text {path}: {exc}.",
                                    fix="Pass a UTF-8 text file of the kind of text the model will see.",
                                    parameter="calibration", value=str(path)) from exc
    if len(text.split()) < 500:
        raise InvalidParameterError(f"The calibration text {path} has {len(text.split())} words; GPTQ needs a few "
                                    "thousand.", fix="Pass a longer text (10,000 words or more is best).",
                                    parameter="calibration", value=str(path))
    return text
