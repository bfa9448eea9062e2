"""The ONNX target: Hugging Face checkpoint -> self-contained, quantized ONNX model folder.

The exporter is onnxruntime-genai's model builder (:mod:`.builder`), which writes the graph and
``genai_config.json`` that edgelm's onnxruntime backend runs (optimum-onnx, :mod:`.optimum`, for the architectures
the builder lacks); int4 weights are rounded by GPTQ (:mod:`.gptq`) by
default; :mod:`.graph` rewrites what the builder's options cannot ask for; the folder's format (manifest,
checks) is :mod:`edgelm.formats.onnx_folder`.

Everything is written into a temporary folder next to ``output`` and renamed into place only after the result was
checked (it decodes on this machine), so a failed conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgelm.errors import (BackendNotInstalledError, ConversionError, InvalidSourceError, OutputExistsError,
                           UnsupportedModelError)
from edgelm.formats import ensure_free_space, hf, onnx_folder

from .. import Progress, Staged, Verify, as_is, option_record
from ..source import read_checkpoint
from . import gptq, npu, optimum  # gptq.gptq_checkpoint is looked up when called (a test replaces it)
from .builder import builder_target, run_builder
from .graph import embed_from_head, embed_int8
from .mixed import apply_int8, read_int8
from .options import OnnxOptions, read_calibration, resolve_algo

log = logging.getLogger("edgelm.converters.onnx")

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


def convert_to_onnx(source_dir: Path, output: Path, quant: str, *, progress: Progress | None = None,
                    allow_pickle: bool = False, overwrite: bool = False, options: OnnxOptions | None = None,
                    verify: Verify | None = None, **kwargs: Any) -> Path:
    """Convert the Hugging Face checkpoint in ``source_dir`` into an ONNX model folder at ``output``.

    quant: "int4" (MatMulNBits 4-bit weights), "int8" (MatMulNBits 8-bit weights), "fp16" or "fp32".
    progress: called as ``progress(message, fraction)`` with fraction in [0, 1].
    options: an :class:`OnnxOptions`, or its fields as keyword arguments (block_size, symmetric, accuracy_level,
    algo, calibration, execution_provider, builder_options, timeout).  overwrite: replace an existing ``output``
    folder.  allow_pickle: accept *.bin pickle weights (they can run code when loaded).  verify: called with the
    finished temporary folder before it is put in place (raise to refuse it); default: a short decode with
    onnxruntime-genai on CPU in this process.

    Returns ``output``.  Raises InvalidSourceError, UnsafeWeightsError, UnsupportedModelError,
    UnknownQuantizationError, OutputExistsError or ConversionError; on any failure ``output`` is untouched.
    """
    source_dir = Path(source_dir).expanduser()
    output = Path(output).expanduser()
    report = progress or (lambda message, fraction: None)
    opts = options or option_record(OnnxOptions, kwargs, "ONNX conversion")
    quant = opts.check(quant)
    config = check_source(source_dir, allow_pickle=allow_pickle)
    if opts.target == "npu":
        return npu.convert_npu(source_dir, output, quant, config, opts, overwrite=overwrite, report=report,
                               verify=verify)
    arch = config["architectures"][0]
    exporter = choose_exporter(source_dir, config, opts.exporter)
    chosen_by_auto = opts.algo == "auto"
    if exporter == "optimum":
        opts = optimum.resolve_algo(quant, opts)
    else:
        opts = resolve_algo(source_dir, quant, opts)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"The output {output} already exists.",
                                    fix="Choose another output folder, or pass overwrite=True (--overwrite).",
                                    path=str(output))
        if not output.is_dir() or not (output / onnx_folder.MANIFEST).exists():
            raise OutputExistsError(
                f"The output {output} exists and is not an edgelm ONNX folder; refusing to replace it.",
                fix="Choose another output folder, or remove it yourself.", path=str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    need = int(hf.count_parameters(source_dir) * onnx_folder.BYTES_PER_PARAMETER[quant] * 1.1) + 16 * 2**20
    ensure_free_space(output.parent, need, f"Converting to {quant}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        if exporter == "optimum":
            report(f"Exporting {arch} to ONNX ({quant}) with optimum-onnx", 0.0)
            manifest = optimum.write_folder(source_dir, tmp, config, quant, opts, report)
            smoke_test = optimum.smoke_test
        else:
            manifest = _write_genai(source_dir, tmp, config, quant, opts, chosen_by_auto, report)
            smoke_test = lambda folder: _smoke_test(folder, manifest, quant)  # noqa: E731
        report("Copying tokenizer files and writing the manifest", 0.9)
        for name in CARRIED_FILES:
            src = source_dir / name
            if src.is_file() and not (tmp / name).exists():
                shutil.copy2(src, tmp / name)
        (tmp / onnx_folder.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        onnx_folder.check_folder(tmp)
        if opts.execution_provider == "cpu":
            report("Checking that the model decodes on this machine", 0.95)
            (verify or smoke_test)(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        _put_in_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"Wrote {output}", 1.0)
    return output


def _write_genai(source_dir: Path, tmp: Path, config: dict[str, Any], quant: str, opts: OnnxOptions,
                 chosen_by_auto: bool, report: Progress) -> dict[str, Any]:
    """onnxruntime-genai's builder (after GPTQ, where chosen) into ``tmp``; returns the folder's manifest."""
    arch = config["architectures"][0]
    if opts.algo == "gptq":
        try:
            _export_gptq(source_dir, tmp, config, quant, opts, report)
        except ConversionError as exc:
            if not chosen_by_auto:
                raise
            log.warning("GPTQ failed for %s (%s); writing round-to-nearest int4 instead.", arch, exc.message)
            for leftover in tmp.iterdir():
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            opts = opts.replace(algo="default")
    if opts.algo != "gptq":
        report(f"Exporting {arch} to ONNX ({quant}) with onnxruntime-genai's model builder", 0.0)
        run_builder(source_dir, tmp, quant, opts, report)
    for name in CARRIED_FILES:  # the manifest reads the chat template
        src = source_dir / name
        if src.is_file() and not (tmp / name).exists():
            shutil.copy2(src, tmp / name)
    return _manifest(source_dir, tmp, config, quant, opts)


def _manifest(source_dir: Path, folder: Path, config: dict[str, Any], quant: str, opts: OnnxOptions) -> dict[str, Any]:
    gen_cfg = {}
    if (source_dir / "generation_config.json").is_file():
        gen_cfg = json.loads((source_dir / "generation_config.json").read_text(encoding="utf-8"))
    return onnx_folder.make_manifest(
        folder, config, name=config.get("_name_or_path") or source_dir.name, quant=quant,
        parameters=hf.count_parameters(source_dir), quantization_options=opts.quantization_record(quant),
        execution_provider=opts.execution_provider, graph_target=builder_target(quant, opts),
        generation_config=gen_cfg)


def _export_gptq(source_dir: Path, tmp: Path, config: dict[str, Any], quant: str, opts: OnnxOptions,
                 report: Progress) -> None:
    """GPTQ weights into a GPTQ-format checkpoint (first 30 % of the progress bar), then the builder imports it."""
    try:
        checkpoint = gptq.gptq_checkpoint(source_dir, tmp / ".gptq-checkpoint", block_size=opts.block_size,
                                          symmetric=opts.symmetric, text=read_calibration(opts.calibration),
                                          mixed=opts.mixed_precision,
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
    run_builder(checkpoint, tmp, quant, opts, export_report)
    int8 = read_int8(checkpoint)  # issue 18: the matrices GPTQ kept at 8 bits
    shutil.rmtree(checkpoint, ignore_errors=True)
    tied = (config.get("text_config") or config).get("tie_word_embeddings", config.get("tie_word_embeddings"))
    if opts.mixed_precision and opts.symmetric:
        export_report("Storing the input embedding at 8 bits", 0.9)
        embed_int8(tmp, opts.block_size)  # False (left float) for a graph without the expected lookup
    elif tied:
        export_report("Reading the input embedding from the int4 output head", 0.9)
        if not embed_from_head(tmp):
            log.warning("The GPTQ model keeps a float copy of the embedding table (asymmetric int4, or not the graph "
                        "expected for a tied head): correct, but larger than round-to-nearest int4.")
    apply_int8(tmp, int8)  # after embed_from_head: an embedding looked up in an 8-bit head reads 8-bit rows


def check_source(source_dir: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The source's config.json, after checking that the folder is a checkpoint this exporter can convert."""
    config = read_checkpoint(source_dir, tokenizer_files=("tokenizer.json",), allow_pickle=allow_pickle,
                             tokenizer_why="the ONNX runtime needs the fast (Rust) tokenizer file")
    return config


def choose_exporter(source_dir: Path, config: dict[str, Any], requested: str = "auto") -> str:
    """"genai" or "optimum" for ``requested`` (auto: the builder where it supports the architecture, optimum-onnx
    otherwise).  UnsupportedModelError listing what each exporter supports; BackendNotInstalledError naming the
    install command when optimum-onnx is asked for by name and is not installed."""
    arch, model_type = config["architectures"][0], config.get("model_type")
    where = source_dir / "config.json"
    genai_list = f"onnxruntime-genai's builder supports {', '.join(ARCHITECTURES)}"
    if requested == "genai" or (requested == "auto" and arch in ARCHITECTURES):
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"onnxruntime-genai's model builder does not support architecture {arch!r} ({where}).",
                fix=f"Supported: {', '.join(ARCHITECTURES)}. Use exporter='optimum' (--exporter optimum) or "
                "convert to GGUF instead (to='gguf').", architecture=arch, path=str(source_dir))
        return "genai"
    home = optimum.find_optimum()
    if home is None:
        if requested == "optimum":
            raise BackendNotInstalledError(
                f"exporter='optimum' needs optimum-onnx {optimum.OPTIMUM_ONNX_VERSION}, which is not installed.",
                fix=f"Run `{optimum.INSTALL_COMMAND}` once (installed apart from this environment), or set "
                f"{optimum.ENV_VAR} to where it is.")
        raise UnsupportedModelError(
            f"The ONNX exporter does not support architecture {arch!r} ({where}): {genai_list}. optimum-onnx, which "
            f"exports more ({', '.join(optimum.TESTED[:-1])}, ...), is not installed.",
            fix=f"Install it with `{optimum.INSTALL_COMMAND}` and convert again, or convert to GGUF instead "
            "(to='gguf'), which covers more architectures.", architecture=arch, path=str(source_dir))
    if not optimum.supports(home, model_type) or not optimum.names_match(arch, model_type):
        which = "Neither ONNX exporter supports" if requested == "auto" else "optimum-onnx does not support"
        raise UnsupportedModelError(
            f"{which} architecture {arch!r} (model type {model_type!r}, {where}): {genai_list}; optimum-onnx "
            f"supports model types {', '.join(optimum.supported_model_types(home))}.",
            fix="Convert to GGUF instead (to='gguf'), which covers more architectures.", architecture=arch,
            model_type=model_type, path=str(source_dir))
    return "optimum"


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
        params.set_search_options(max_length=onnx_folder.kv_length(folder, 16), do_sample=False)
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


@dataclass
class OnnxStaged(Staged):
    exporter: str = "auto"  # the reference (fp32) is exported the same way as the output
    npu: OnnxOptions | None = None  # target="npu": the options the fp32 reference pair is written with


class OnnxTarget:
    name = "onnx"
    options = OnnxOptions
    auto_quants = ("int4", "int8", "fp16")

    def check_quant(self, quant: str, options: OnnxOptions | None = None, given: bool = True) -> str:
        return (options or OnnxOptions()).check(quant, given)

    @contextlib.contextmanager
    def stage(self, source: Path, name: str, quant: str, out: Path, options: OnnxOptions, *, allow_pickle: bool,
              progress: Progress) -> Iterator[Staged]:
        if not source.is_dir():
            raise InvalidSourceError(f"ONNX conversion needs a Hugging Face folder; {source} is a file.",
                                     fix="Pass the folder with config.json and the safetensors weights.",
                                     path=str(source))
        if options.target == "npu":
            yield OnnxStaged(source, source, "fp32 static pair of the same shapes", allow_pickle=allow_pickle,
                             npu=options.replace(calibration=None))
            return
        yield OnnxStaged(source, source, "fp32 ONNX of the same source", allow_pickle=allow_pickle,
                         exporter=options.exporter)

    def write(self, staged: Staged, quant: str, out: Path, options: OnnxOptions, *, overwrite: bool,
              progress: Progress, verify: Verify | None) -> Path:
        return convert_to_onnx(staged.path, out, quant, progress=progress, allow_pickle=staged.allow_pickle,
                               overwrite=overwrite, options=options, verify=verify)

    @contextlib.contextmanager
    def reference(self, staged: Staged, out: Path, quant: str | None) -> Iterator[Path]:
        """The output itself when it is fp32, else an fp32 export of the same source, removed afterwards (for the
        NPU pair: the fp32 pair of the same shapes)."""
        if quant == "fp32":
            with as_is(out) as path:
                yield path
            return
        with tempfile.TemporaryDirectory(prefix=".edgelm-ref-", dir=out.parent) as tmp:
            if isinstance(staged, OnnxStaged) and staged.npu is not None:
                yield convert_to_onnx(staged.path, Path(tmp) / "fp32", "fp32", allow_pickle=staged.allow_pickle,
                                      options=staged.npu)
                return
            yield convert_to_onnx(staged.path, Path(tmp) / "fp32", "fp32", allow_pickle=staged.allow_pickle,
                                  exporter=getattr(staged, "exporter", "auto"))

    def method(self, out: Path) -> str | None:
        return (onnx_folder.read_manifest(out).get("quantization_options") or {}).get("algo")


TARGET = OnnxTarget()
