"""Hugging Face checkpoint -> self-contained, quantized ONNX model folder.

The exporter is onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``): it writes one decoder
graph with onnxruntime's fused contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits for
4/8-bit weights, GatherBlockQuantized embeddings), a preallocated KV cache layout (``past_present_share_buffer``)
and a ``genai_config.json`` that onnxruntime-genai's decode loop reads.  That graph plus that loop is the fastest
way onnxruntime decodes on a CPU, so edgelm's onnxruntime backend runs exactly what this module writes.

The builder runs in a child process (it imports torch and transformers; a crash there must not take the caller
with it) and writes into a temporary folder next to ``output``; the folder is renamed into place only after the
result was checked, so a failed conversion never leaves a half-written model behind.

Output folder::

    model.onnx, model.onnx.data   the graph and its external weights
    genai_config.json             onnxruntime-genai's runtime settings (I/O names, KV layout, search defaults)
    tokenizer.json, tokenizer_config.json, chat_template.jinja (when the source has one), ...
    edgelm.json                   edgelm's manifest (see MANIFEST_VERSION and :func:`read_manifest`)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgelm.errors import ConversionError, OutputExistsError, UnknownQuantizationError, UnsupportedModelError

from .process import run_streaming

QUANTS = ("int4", "int8", "fp16", "fp32")
MANIFEST = "edgelm.json"
MANIFEST_VERSION = 1
BUILDER_MODULE = "onnxruntime_genai.models.builder"
# weight quantization methods (MatMulNBits): the builder's round-to-nearest or llama.cpp-style k-quant search (the
# *_last variants keep the output projection at 8 bits), or edgelm's GPTQ (converters/gptq.py)
ALGOS = ("auto", "default", "rtn", "rtn_last", "k_quant", "k_quant_last", "k_quant_mixed", "gptq")
# auto: GPTQ for int4 when the fp32 model fits comfortably in this machine's memory, round-to-nearest otherwise
DEFAULT_ALGO = "auto"

# Hugging Face architecture -> the onnxruntime-genai builder's model family.  Text decoders only: the builder
# knows more (vision/audio models, MoE variants) but edgelm's backend feeds token ids and nothing else.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "GraniteForCausalLM": "granite",
    "OlmoForCausalLM": "olmo",
    "NemotronForCausalLM": "nemotron",
    "SmolLM3ForCausalLM": "smollm3",
    "InternLM2ForCausalLM": "internlm2",
    "Ernie4_5ForCausalLM": "ernie4_5",
}

# tokenizer/template files carried from the source when the builder did not write them itself
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                 "added_tokens.json")

Progress = Callable[[str, float], None]
log = logging.getLogger("edgelm.converters.onnx")


def convert_to_onnx(source_dir: Path, output: Path, quant: str, *, progress: Progress | None = None,
                    allow_pickle: bool = False, **options: Any) -> Path:
    """Convert the Hugging Face checkpoint in ``source_dir`` into an ONNX model folder at ``output``.

    quant: "int4" (MatMulNBits 4-bit weights), "int8" (MatMulNBits 8-bit weights), "fp16" or "fp32".
    progress: called as ``progress(message, fraction)`` with fraction in [0, 1].

    Options (all optional):
      block_size (int, 32): weights per quantization block for int4/int8 (16, 32, 64, 128, 256).
      symmetric (bool, True): symmetric int4/int8 quantization (no zero points).
      accuracy_level (int, 4): MatMulNBits compute type for activations: 1 fp32, 2 fp16, 3 bf16, 4 int8
        (dynamic per-block int8 quantization of activations, the fastest on CPUs).
      algo (str, "auto"): how weights are rounded: gptq (int4: GPTQ calibrated on the standard library's
        docstrings; minutes on a CPU, same decode speed), default/rtn (round to nearest), k_quant (llama.cpp-style
        scale search), *_last (int8 output head), k_quant_mixed (int8 for the most sensitive layers, slower).
        auto: gptq for int4 when the fp32 model takes under a quarter of the free memory (falling back to round to
        nearest, with a warning, if GPTQ fails), round to nearest otherwise.
      calibration (path, None): with algo="gptq", a UTF-8 text file to calibrate on instead (text like what the
        model will see: GPTQ fits the rounding to it).
      execution_provider (str, "cpu"): the EP the graph is built for: cpu, cuda, dml, webgpu.
      builder_options (dict, None): more ``--extra_options key=value`` pairs for the model builder.
      overwrite (bool, False): replace an existing ``output`` folder.
      timeout (float, None): seconds the exporter may run.
      allow_pickle (bool, False): accept *.bin pickle weights (they can run code when loaded).

    Returns ``output``.  Raises InvalidSourceError, UnsafeWeightsError, UnsupportedModelError,
    UnknownQuantizationError, OutputExistsError or ConversionError; on any failure ``output`` is untouched.
    """
    source_dir = Path(source_dir).expanduser()
    output = Path(output).expanduser()
    report = progress or (lambda message, fraction: None)
    opts = _options(quant, options)
    config = check_source(source_dir, allow_pickle=allow_pickle)
    arch = config["architectures"][0]
    chosen_by_auto = opts["algo"] == "auto"
    _resolve_algo(source_dir, opts)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not opts["overwrite"]:
            raise OutputExistsError(f"The output {output} already exists.",
                                    fix="Choose another output folder, or pass overwrite=True (--force).",
                                    path=str(output))
        if not output.is_dir() or not (output / MANIFEST).exists():
            raise OutputExistsError(
                f"The output {output} exists and is not an edgelm ONNX folder; refusing to replace it.",
                fix="Choose another output folder, or remove it yourself.", path=str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_disk_space(source_dir, output.parent, opts["quant"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        if opts["algo"] == "gptq":
            try:
                _export_gptq(source_dir, tmp, config, quant, opts, report)
            except ConversionError as exc:
                if not chosen_by_auto:
                    raise
                log.warning("GPTQ failed for %s (%s); writing round-to-nearest int4 instead.", arch, exc.message)
                for leftover in tmp.iterdir():
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                opts["algo"] = "default"
        if opts["algo"] != "gptq":
            report(f"Exporting {arch} to ONNX ({quant}) with onnxruntime-genai's model builder", 0.0)
            _run_builder(source_dir, tmp, quant, opts, report)
        report("Copying tokenizer files and writing the manifest", 0.9)
        for name in CARRIED_FILES:
            src = source_dir / name
            if src.is_file() and not (tmp / name).exists():
                shutil.copy2(src, tmp / name)
        manifest = build_manifest(source_dir, tmp, config, quant, opts)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        check_output_folder(tmp)
        if opts["execution_provider"] == "cpu":
            report("Checking that the model decodes on this machine", 0.95)
            _smoke_test(tmp, manifest, quant)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        _put_in_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"Wrote {output}", 1.0)
    return output


def _export_gptq(source_dir: Path, tmp: Path, config: dict[str, Any], quant: str, opts: dict[str, Any],
                 report: Progress) -> None:
    """GPTQ weights into a GPTQ-format checkpoint (first 30 % of the progress bar), then the builder imports it."""
    from .gptq import gptq_checkpoint

    try:
        checkpoint = gptq_checkpoint(source_dir, tmp / ".gptq-checkpoint", block_size=opts["block_size"],
                                     symmetric=opts["symmetric"], text=_calibration(opts["calibration"]),
                                     progress=lambda message, fraction: report(message, 0.3 * fraction))
    except (ImportError, RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"GPTQ could not load or quantize {source_dir}: {first}",
                              fix="Check that the checkpoint loads with transformers (>= 5), or use algo='default' "
                              "(round to nearest).") from exc
    # the builder's steps run from 0 to 0.9 of the bar (then the folder is finished by the caller): map to 0.3-0.9
    export_report = lambda message, fraction: report(message, 0.3 + fraction * 0.6 / 0.9)  # noqa: E731
    export_report(f"Exporting {config['architectures'][0]} to ONNX ({quant}) with onnxruntime-genai's model builder",
                  0.0)
    _run_builder(checkpoint, tmp, quant, opts, export_report)
    from .onnx_mixed import apply_int8, read_int8  # issue 18: the matrices GPTQ kept at 8 bits

    int8 = read_int8(checkpoint)
    shutil.rmtree(checkpoint, ignore_errors=True)
    if (config.get("text_config") or config).get("tie_word_embeddings", config.get("tie_word_embeddings")):
        export_report("Reading the input embedding from the int4 output head", 0.9)
        if not _embed_from_head(tmp):
            log.warning("The GPTQ model keeps a float copy of the embedding table (asymmetric int4, or not the graph "
                        "expected for a tied head): correct, but larger than round-to-nearest int4.")
    apply_int8(tmp, int8)  # after _embed_from_head: an embedding looked up in an 8-bit head reads 8-bit rows


def _embed_from_head(folder: Path) -> bool:
    """For a checkpoint whose input embedding is its output head (tied): the GPTQ import writes the head as int4
    MatMulNBits but keeps a float copy of the table for the input embedding (SmolLM2: 113 MB of 205 MB).  Look the
    embedding up in the int4 head instead (GatherBlockQuantized, as the builder's own round-to-nearest export does),
    so the model is as small as that one.  Symmetric heads only (zero points all 8, the kernels' default); False,
    leaving the model as it is, when the graph is not the expected one."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))  # with its external data: every tensor is written again below
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight"), None)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"), None)
    if gather is None or head is None or len(head.input) < 3 or not all(i in inits for i in head.input[1:]):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    qweight = inits[head.input[1]]
    n, blocks, blob = qweight.dims
    table = inits["model.embed_tokens.weight"]
    if attrs.get("bits") != 4 or n != table.dims[0] or attrs.get("K") != table.dims[1] or \
            attrs["K"] != blocks * attrs["block_size"]:
        return False
    if len(head.input) > 3 and head.input[3]:
        if not np.all(numpy_helper.to_array(inits[head.input[3]]) == 0x88):  # two 4-bit zero points of 8 a byte
            return False
        graph.initializer.remove(inits[head.input[3]])
        del head.input[3:]
    scales = inits[head.input[2]]
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales).reshape(n, blocks), scales.name))
    shape_name = "/model/embed_tokens/head_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([n, blocks * blob], dtype=np.int64), shape_name))
    graph.initializer.remove(table)
    reshaped = "/model/embed_tokens/Reshape/output_0"
    at = list(graph.node).index(gather)
    lookup = helper.make_node("GatherBlockQuantized", [reshaped, gather.input[1], scales.name], list(gather.output),
                              name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft", bits=4,
                              block_size=attrs["block_size"], gather_axis=0, quantize_axis=1)
    graph.node.remove(gather)
    graph.node.insert(at, lookup)
    graph.node.insert(at, helper.make_node("Reshape", [qweight.name, shape_name], [reshaped],
                                           name="/model/embed_tokens/Reshape"))
    data = [p for p in folder.iterdir() if p.name.startswith("model.onnx.")]
    for p in data:
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return True


# --- checks -------------------------------------------------------------------------------------------------

def _options(quant: str, options: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(quant, str) or quant.lower() not in QUANTS:
        raise UnknownQuantizationError(f"Unknown ONNX quantization {quant!r}.",
                                       fix=f"Use one of: {', '.join(QUANTS)}.", quant=quant)
    known = {"block_size": 32, "symmetric": True, "accuracy_level": 4, "algo": DEFAULT_ALGO, "calibration": None,
             "execution_provider": "cpu", "overwrite": False, "timeout": None, "builder_options": None}
    unknown = sorted(set(options) - set(known))
    if unknown:
        from edgelm.errors import InvalidParameterError

        raise InvalidParameterError(f"Unknown ONNX conversion option {unknown[0]!r}.",
                                    fix=f"Use one of: {', '.join(known)}.", parameter=unknown[0],
                                    value=options[unknown[0]])
    opts = {**known, **{k: v for k, v in options.items() if v is not None}}
    opts["quant"] = quant.lower()
    from edgelm.errors import InvalidParameterError

    if opts["block_size"] not in (16, 32, 64, 128, 256):
        raise InvalidParameterError(f"Invalid block_size: {opts['block_size']!r}.",
                                    fix="Use 16, 32, 64, 128 or 256.", parameter="block_size",
                                    value=opts["block_size"])
    if opts["accuracy_level"] not in (0, 1, 2, 3, 4):
        raise InvalidParameterError(f"Invalid accuracy_level: {opts['accuracy_level']!r}.",
                                    fix="Use 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8 activations).",
                                    parameter="accuracy_level", value=opts["accuracy_level"])
    if opts["algo"] not in ALGOS:
        raise InvalidParameterError(f"Invalid algo: {opts['algo']!r}.", fix=f"Use one of: {', '.join(ALGOS)}.",
                                    parameter="algo", value=opts["algo"])
    if opts["algo"] == "gptq" and opts["quant"] != "int4":
        raise InvalidParameterError(f"algo='gptq' makes int4 weights; quant is {opts['quant']!r}.",
                                    fix='Use quant="int4" with algo="gptq".', parameter="algo", value="gptq")
    if opts["calibration"] is not None:
        if opts["algo"] not in ("gptq", "auto"):
            raise InvalidParameterError("calibration text is used by algo='gptq' only.", fix='Add algo="gptq".',
                                        parameter="calibration", value=str(opts["calibration"]))
        _calibration(opts["calibration"])  # a missing or unreadable file is refused before any work
    if opts["execution_provider"] not in ("cpu", "cuda", "dml", "webgpu"):
        raise InvalidParameterError(f"Invalid execution_provider: {opts['execution_provider']!r}.",
                                    fix="Use cpu, cuda, dml or webgpu.", parameter="execution_provider",
                                    value=opts["execution_provider"])
    return opts


BYTES_PER_PARAMETER = {"int4": 0.65, "int8": 1.15, "fp16": 2.0, "fp32": 4.0}  # incl. scales, unshared embeddings


def _check_disk_space(source_dir: Path, where: Path, quant: str) -> None:
    from edgelm.errors import InsufficientDiskSpaceError

    need = int(_count_parameters(source_dir) * BYTES_PER_PARAMETER[quant] * 1.1) + 16 * 2**20
    free = shutil.disk_usage(where).free
    if free < need:
        raise InsufficientDiskSpaceError(
            f"Converting to {quant} needs about {need / 2**20:.0f} MiB in {where}, but only {free / 2**20:.0f} MiB "
            "is free.", fix="Free some space, or write the output to another disk.", needed=need, free=free)


def check_source(source_dir: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The source's config.json, after checking that the folder is a checkpoint this exporter can convert."""
    from .source import read_checkpoint

    config = read_checkpoint(source_dir, tokenizer_files=("tokenizer.json",), allow_pickle=allow_pickle,
                             tokenizer_why="the ONNX runtime needs the fast (Rust) tokenizer file")
    arch = config["architectures"][0]
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"The ONNX exporter does not support architecture {arch!r} ({source_dir / 'config.json'}).",
            fix=f"Supported for ONNX: {', '.join(ARCHITECTURES)}. Convert to GGUF instead (to='gguf'), "
            "which covers more architectures.", architecture=arch, path=str(source_dir))
    return config


def _resolve_algo(source_dir: Path, opts: dict[str, Any], memory: int | None = None) -> None:
    """algo="auto": GPTQ for int4 (SmolLM2: 1.07x fp32 perplexity instead of 1.31x, same decode speed) when the
    fp32 model, loaded in torch for it, takes under a quarter of the available memory; round-to-nearest otherwise,
    with a warning.  int8 and float types always round to nearest.  GPTQ is not used for checkpoints whose tensor
    names onnxruntime-genai's GPTQ import would pass over (gptq.unimportable_tensor): refused when asked for by
    name, round-to-nearest with a warning under auto."""
    if opts["algo"] == "gptq" or (opts["algo"] == "auto" and opts["quant"] == "int4"):
        from .gptq import unimportable_tensor

        name = unimportable_tensor(source_dir)
        if name and opts["algo"] == "gptq":
            raise UnsupportedModelError(
                f"GPTQ int4 is not available for {source_dir.name}: onnxruntime-genai's model builder does not import "
                f"GPTQ weights named like {name!r}.", fix="Use algo='default' (round to nearest) or 'k_quant_mixed'.",
                path=str(source_dir), tensor=name)
        if name:
            log.warning("int4 with round-to-nearest weights: onnxruntime-genai's model builder does not import GPTQ "
                        "weights named like %r.", name)
            opts["algo"] = "default"
            return
    if opts["algo"] != "auto":
        return
    if opts["quant"] != "int4":
        opts["algo"] = "default"
        if opts["calibration"] is not None:
            from edgelm.errors import InvalidParameterError

            raise InvalidParameterError("calibration text is used by algo='gptq' (int4) only.", fix='Use quant="int4".',
                                        parameter="calibration", value=str(opts["calibration"]))
        return
    if memory is None:
        from edgelm.platforms import detect

        memory = int(detect().memory.get("available") or 0)
    need = _count_parameters(source_dir) * 4
    if memory and need * 4 > memory:
        log.warning("int4 with round-to-nearest weights: GPTQ would load the fp32 model (%.1f GB) in torch, over a "
                    "quarter of the %.1f GB available; pass algo='gptq' (--algo gptq) to run it anyway.",
                    need / 1e9, memory / 1e9)
        opts["algo"] = "default"
    else:
        opts["algo"] = "gptq"


def _calibration(path: Any) -> str | None:
    """The text of a calibration file (GPTQ), or None for the built-in one."""
    if path is None:
        return None
    from edgelm.errors import InvalidParameterError

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


def _builder_target(opts: dict[str, Any]) -> str:
    """The builder's -e: its CPU fp16 graph (MultiHeadAttention + casts) fails to decode in onnxruntime 1.32
    ('Shape mismatch attempting to re-use buffer'), while its CUDA fp16 graph (GroupQueryAttention) runs on the
    CPU provider too and gives fp32's greedy tokens; fp16 for CPU is therefore built as that graph."""
    if opts["quant"] == "fp16" and opts["execution_provider"] == "cpu":
        return "cuda"
    return opts["execution_provider"]


def _builder_args(source_dir: Path, out: Path, cache: Path, opts: dict[str, Any]) -> list[str]:
    args = [sys.executable, "-m", BUILDER_MODULE, "-i", str(source_dir), "-o", str(out), "-p", opts["quant"],
            "-e", _builder_target(opts), "-c", str(cache)]
    extra = ["hf_token=false"]
    if opts["quant"] in ("int4", "int8"):
        extra += [f"block_size={opts['block_size']}", f"is_symmetric={str(bool(opts['symmetric'])).lower()}"]
        if opts["accuracy_level"]:
            extra.append(f"accuracy_level={opts['accuracy_level']}")
        if opts["algo"] and opts["algo"] not in ("default", "gptq"):
            extra.append(f"algo_config={opts['algo']}")
    if opts["algo"] == "gptq":  # the GPTQ checkpoint's head is already int4, in a layout the embedding cannot share
        extra.append("shared_embeddings=false")
    elif not opts["symmetric"] and opts["quant"] in ("int4", "int8"):
        # the builder's asymmetric GatherBlockQuantized embedding shared with lm_head does not load in
        # onnxruntime 1.32 (uint8 output type error): keep input and output embeddings separate
        extra.append("shared_embeddings=false")
    extra += [f"{k}={v}" for k, v in (opts["builder_options"] or {}).items()]
    return args + ["--extra_options", *extra]


_SAVING = re.compile(r"(\d+)/(\d+) \[")


def _run_builder(source_dir: Path, out: Path, quant: str, opts: dict[str, Any], report: Progress) -> None:
    try:
        import onnxruntime_genai  # noqa: F401  (the builder lives in this package)
    except ImportError as exc:
        raise ConversionError(f"ONNX conversion needs onnxruntime-genai's model builder, which is not installed "
                              f"({exc}).", fix='Install it with: pip install "edgelm[convert]"') from exc
    cache = out / ".builder-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = _builder_args(source_dir, out, cache, opts)
    tail: list[str] = []
    last = 0.0

    def on_line(line: str) -> None:
        nonlocal last
        tail.append(line)
        del tail[:-30]
        step = _fraction(line)
        if step is not None and step[1] - last >= 0.05:
            last = step[1]
            report(*step)

    timeout = opts["timeout"]
    rc = run_streaming(cmd, env, on_line, timeout=timeout, timeout_error=lambda: ConversionError(
        f"The ONNX exporter ran longer than timeout={timeout} s and was stopped.",
        fix="Allow more time (timeout=...)."))
    shutil.rmtree(cache, ignore_errors=True)
    if rc != 0:
        reason = next((line for line in reversed(tail) if re.search(r"Error|Exception|error:", line)), None)
        raise ConversionError(
            f"onnxruntime-genai's model builder failed (exit code {rc}) converting {source_dir} to {quant}: "
            f"{reason or ' | '.join(tail[-3:])}",
            fix="Check that the checkpoint loads with transformers (>= 5) and that its architecture is supported; "
            "run `python -m onnxruntime_genai.models.builder` by hand to see the whole log.",
            returncode=rc, log="\n".join(tail))
    if not (out / "model.onnx").is_file() or not (out / "genai_config.json").is_file():
        raise ConversionError(f"The model builder finished but wrote no model.onnx/genai_config.json in {out}.",
                              fix="Run `python -m onnxruntime_genai.models.builder` by hand to see why.",
                              log="\n".join(tail))
    if _builder_target(opts) != opts["execution_provider"]:  # run where it was asked for, not on the build target
        cfg_path = out / "genai_config.json"
        genai = json.loads(cfg_path.read_text(encoding="utf-8"))
        genai["model"]["decoder"].setdefault("session_options", {})["provider_options"] = []
        cfg_path.write_text(json.dumps(genai, indent=4), encoding="utf-8")


def _fraction(line: str) -> tuple[str, float] | None:
    """Map the builder's log lines to overall progress: reading weights, quantizing, then saving tensors."""
    m = _SAVING.search(line)
    if m and line.startswith("Saving"):
        done, total = int(m.group(1)), int(m.group(2))
        return f"Writing tensors {done}/{total}", 0.6 + 0.3 * done / max(total, 1)
    if "Loading weights" in line or "Reading" in line:
        return "Reading weights", 0.1
    if "start to quantize" in line:
        return "Quantizing weights (MatMulNBits)", 0.3
    return None


def kv_length(folder: Path, n_ctx: int) -> int:
    """The KV cache length (onnxruntime-genai's max_length) to allocate for ``n_ctx`` tokens.  Sliding-window layers
    (Gemma 2/3, ...) keep a window-sized cache that onnxruntime's GroupQueryAttention refuses to run when the whole
    cache is shorter than the window ("KV cache capacity (16) must be at least local_window_size (4096)"), so the
    cache is never shorter than the window plus the slack the builder asks for; edgelm still stops at n_ctx."""
    try:
        genai = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        window = genai["model"]["decoder"].get("sliding_window") or {}
        floor = int(window.get("window_size") or 0) + int(window.get("cache_slack") or 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        floor = 0
    return max(int(n_ctx), floor)


def _smoke_test(folder: Path, manifest: dict[str, Any], quant: str) -> None:
    """Evaluate a short prompt and decode two tokens with onnxruntime-genai on CPU; a graph that onnxruntime
    cannot run fails the conversion here instead of leaving a model that fails at its first use."""
    import onnxruntime_genai as og

    try:
        cfg = og.Config(str(folder))
        cfg.clear_providers()
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}))
        model = og.Model(cfg)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=kv_length(folder, 16), do_sample=False)
        gen = og.Generator(model, params)
        vocab = int(manifest.get("vocab_size") or 4)
        gen.append_tokens([1 % vocab, 2 % vocab, 3 % vocab])
        for _ in range(2):
            gen.generate_next_token()
        del gen, model
    except Exception as exc:
        hint = ("fp16 graphs from onnxruntime-genai's builder are meant for GPU execution providers; on a CPU "
                "use int4, int8 or fp32 (or convert with execution_provider='cuda'/'dml'/'webgpu' for a GPU)"
                if quant == "fp16" else "try another quantization, or convert to GGUF instead")
        raise ConversionError(
            f"The exported {quant} model does not run on this machine's onnxruntime (CPU): "
            f"{str(exc).strip()[:400]}", fix=f"{hint[0].upper()}{hint[1:]}.", quant=quant) from exc


# --- manifest ---------------------------------------------------------------------------------------------

def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if isinstance(v, int)]


def build_manifest(source_dir: Path, out: Path, config: dict[str, Any], quant: str,
                   opts: dict[str, Any]) -> dict[str, Any]:
    genai = json.loads((out / "genai_config.json").read_text(encoding="utf-8"))
    model = genai["model"]
    dec = model["decoder"]
    gen_cfg = {}
    if (source_dir / "generation_config.json").is_file():
        gen_cfg = json.loads((source_dir / "generation_config.json").read_text(encoding="utf-8"))
    eos = list(dict.fromkeys(_token_ids(model.get("eos_token_id")) + _token_ids(gen_cfg.get("eos_token_id"))
                             + _token_ids(config.get("eos_token_id"))))
    bos = model.get("bos_token_id", config.get("bos_token_id"))
    text_cfg = config.get("text_config") or config
    n_params = _count_parameters(source_dir)
    data_files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name.startswith("model.onnx."))
    template = None
    if (out / "chat_template.jinja").is_file():
        template = "chat_template.jinja"
    return {
        "format": "edgelm-onnx",
        "version": MANIFEST_VERSION,
        "name": config.get("_name_or_path") or source_dir.name,
        "architecture": config["architectures"][0],
        "model_type": config.get("model_type"),
        "quantization": quant,
        "quantization_options": ({"block_size": opts["block_size"], "symmetric": bool(opts["symmetric"]),
                                  "accuracy_level": opts["accuracy_level"], "algo": opts["algo"],
                                  "op": "MatMulNBits",
                                  "bits": 4 if quant == "int4" else 8}
                                 if quant in ("int4", "int8") else None),
        "execution_provider": opts["execution_provider"],
        "graph_target": _builder_target(opts),
        "parameters": n_params,
        "context_length": int(model.get("context_length") or text_cfg.get("max_position_embeddings") or 2048),
        "vocab_size": int(model.get("vocab_size") or text_cfg.get("vocab_size")),
        "bos_token_id": bos,
        "eos_token_ids": eos,
        "pad_token_id": model.get("pad_token_id"),
        "model_file": dec["filename"],
        "external_data": data_files,
        "kv_cache": {
            "layers": dec["num_hidden_layers"],
            "kv_heads": dec["num_key_value_heads"],
            "attention_heads": dec["num_attention_heads"],
            "head_size": dec["head_size"],
            "layout": "BNSH",  # [batch, kv_heads, sequence, head_size]
            "past_key": dec["inputs"]["past_key_names"],
            "past_value": dec["inputs"]["past_value_names"],
            "present_key": dec["outputs"]["present_key_names"],
            "present_value": dec["outputs"]["present_value_names"],
            "shared_buffer": bool(genai.get("search", {}).get("past_present_share_buffer", False)),
        },
        "chat_template": template,
        "exporter": {"name": "onnxruntime-genai model builder", "version": _version("onnxruntime-genai")},
    }


def _count_parameters(source_dir: Path) -> int:
    """Parameter count from the safetensors headers (no weights are read)."""
    import struct

    total = 0
    for f in source_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an ONNX folder; typed errors for a missing or corrupt one."""
    from edgelm.errors import InvalidModelFileError, ModelNotFoundError

    path = Path(folder) / MANIFEST
    if not path.is_file() and (Path(folder) / "genai_config.json").is_file():
        return manifest_from_genai(Path(folder))
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} has no {MANIFEST}, so it was not written by `edgelm convert --to onnx`.",
                                 fix="Convert the model with `edgelm convert SRC --to onnx -o DIR`.", path=str(folder))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFileError(f"{path} is not valid JSON ({exc}).", fix="Convert the model again.",
                                    path=str(path)) from exc
    if not isinstance(data, dict) or data.get("format") != "edgelm-onnx":
        raise InvalidModelFileError(f"{path} is not an edgelm ONNX manifest.", fix="Convert the model again.",
                                    path=str(path))
    if int(data.get("version", 0)) > MANIFEST_VERSION:
        raise UnsupportedModelError(f"{path} has manifest version {data.get('version')}, newer than this edgelm "
                                    f"reads ({MANIFEST_VERSION}).", fix="Upgrade edgelm.", path=str(path))
    return data


def manifest_from_genai(folder: Path) -> dict[str, Any]:
    """A manifest for an onnxruntime-genai model folder that edgelm did not write (the builder's output, or a
    ready-made genai model): what genai_config.json and the graph say; quantization from the MatMul weights."""
    from edgelm.errors import InvalidModelFileError

    cfg_path = folder / "genai_config.json"
    try:
        genai = json.loads(cfg_path.read_text(encoding="utf-8"))
        model = genai["model"]
        dec = model["decoder"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidModelFileError(f"{cfg_path} is not a valid onnxruntime-genai config ({exc}).",
                                    fix="Restore the file, or convert the model with `edgelm convert --to onnx`.",
                                    path=str(cfg_path)) from exc
    hf: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            hf = {}
    quant, qopts, params = _graph_quantization(folder / dec.get("filename", "model.onnx"))
    template = "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else None
    return {
        "format": "edgelm-onnx",
        "version": MANIFEST_VERSION,
        "name": folder.name,
        "architecture": (hf.get("architectures") or [model.get("type")])[0],
        "model_type": model.get("type"),
        "quantization": quant,
        "quantization_options": qopts,
        "execution_provider": "cpu",
        "parameters": params,
        "context_length": int(model.get("context_length") or 2048),
        "vocab_size": int(model.get("vocab_size") or 0) or None,
        "bos_token_id": model.get("bos_token_id"),
        "eos_token_ids": _token_ids(model.get("eos_token_id")),
        "pad_token_id": model.get("pad_token_id"),
        "model_file": dec.get("filename", "model.onnx"),
        "external_data": sorted(p.name for p in folder.iterdir() if p.name.startswith(dec.get("filename", "model.onnx") + ".")),
        "kv_cache": {
            "layers": dec.get("num_hidden_layers"), "kv_heads": dec.get("num_key_value_heads"),
            "attention_heads": dec.get("num_attention_heads"), "head_size": dec.get("head_size"), "layout": "BNSH",
            "shared_buffer": bool(genai.get("search", {}).get("past_present_share_buffer", False)),
        },
        "chat_template": template,
        "exporter": {"name": "onnxruntime-genai model (no edgelm manifest)", "version": None},
    }


def _graph_quantization(model_file: Path) -> tuple[str, dict[str, Any] | None, int]:
    """(quantization, its options, parameter count) read from the graph's initializers, without the weights."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        return "unknown", None, 0
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception:
        return "unknown", None, 0
    params = 0
    float_types: set[int] = set()
    for init in proto.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        params += n
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) and n > 4096:
            float_types.add(init.data_type)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            bits = int(a.get("bits", 4))
            return (f"int{bits}", {"op": "MatMulNBits", "bits": bits, "block_size": a.get("block_size"),
                                   "accuracy_level": a.get("accuracy_level")}, 0)
    if onnx.TensorProto.FLOAT16 in float_types:
        return "fp16", None, params
    return "fp32", None, params


def check_output_folder(folder: Path) -> dict[str, Any]:
    """Check that every file an ONNX folder needs is there and plausible; return its manifest.

    Catches a missing or truncated model.onnx / external data file and a missing tokenizer before onnxruntime
    is asked to load them (its own messages for those are cryptic).
    """
    from edgelm.errors import InvalidModelFileError, ModelNotFoundError

    folder = Path(folder)
    manifest = read_manifest(folder)
    model_file = folder / manifest.get("model_file", "model.onnx")
    if not model_file.is_file():
        raise ModelNotFoundError(f"{folder} has no {model_file.name}.", fix="Convert the model again.",
                                 path=str(model_file))
    for name in ("genai_config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise ModelNotFoundError(f"{folder} has no {name}; the folder is incomplete.",
                                     fix="Copy the whole folder written by `edgelm convert --to onnx`, or convert "
                                     "again.", path=str(folder / name))
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            proto = onnx.load(str(model_file), load_external_data=False)
        except Exception as exc:
            raise InvalidModelFileError(f"{model_file} is not a readable ONNX model ({type(exc).__name__}: {exc}).",
                                        fix="The file is corrupt or truncated: convert the model again.",
                                        path=str(model_file)) from exc
        _check_external_data(folder, proto)
    return manifest


def _check_external_data(folder: Path, proto: Any) -> None:
    """Every external tensor's file exists and is long enough for its offset + length."""
    from edgelm.errors import InvalidModelFileError, ModelNotFoundError

    needed: dict[str, int] = {}
    for init in proto.graph.initializer:
        if init.data_location != 1:  # EXTERNAL
            continue
        info = {e.key: e.value for e in init.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        loc = info.get("location", "")
        needed[loc] = max(needed.get(loc, 0), end)
    for loc, end in needed.items():
        path = folder / loc
        if not path.is_file():
            raise ModelNotFoundError(f"{folder} is missing the external weights file {loc}.",
                                     fix="Copy the whole folder (model.onnx and its .data file), or convert again.",
                                     path=str(path))
        size = path.stat().st_size
        if size < end:
            raise InvalidModelFileError(f"{path} is truncated: {size} bytes, but the graph needs {end}.",
                                        fix="The copy is incomplete or corrupt: copy it again, or convert again.",
                                        path=str(path), size=size, expected=end)


def _put_in_place(tmp: Path, output: Path) -> None:
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        try:
            os.replace(tmp, output)
        except BaseException:
            os.replace(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
