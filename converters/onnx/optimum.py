"""Hugging Face checkpoint -> plain ONNX decoder with optimum-onnx, for the architectures onnxruntime-genai's model
builder lacks (GPT-2, GPT-NeoX/Pythia, OPT, BLOOM, Falcon, GPT-J, CodeGen, StableLM, ...).

optimum-onnx (0.1.0) pins ``transformers<4.58``, while the builder and the rest of edgelm need transformers 5, so it
lives in a folder of its own (``edgelm install-converter --optimum``: ``pip install --no-deps --target`` of the pinned
packages below) and runs in a child process with that folder first on ``PYTHONPATH``; torch, onnx, numpy and the
rest come from this environment.  A checkpoint written by transformers 5 names some settings differently
(``rope_parameters`` instead of ``rope_theta`` / ``rotary_pct`` / ``rope_scaling``): the exporter reads a copy of the
folder whose ``config.json`` also carries the older names (:func:`legacy_config`), otherwise transformers 4.57 would
silently build a different model (SmolLM2's rope_theta 100000 read as 10000).

The export (``main_export(task="text-generation-with-past")``) writes one fp32 graph with ``past_key_values.*``
inputs and ``present.*`` outputs; :mod:`.quantize` folds its shape arithmetic, :mod:`.attention` rewrites
each layer's attention into onnxruntime's GroupQueryAttention over a shared cache buffer (checked against the export
on random tokens; left as exported where the pattern differs, BLOOM's ALiBi for one), :mod:`.quantize` then
rounds its weights to MatMulNBits int4/int8 (GPTQ for symmetric int4 where asked or chosen, round to nearest
otherwise); edgelm's own onnxruntime loop (:mod:`edgelm.runtimes.onnx_session`) runs it.  Nothing here writes the
final output: the caller (``convert_to_onnx``) passes a temporary folder and renames it when every check passed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from edgelm.errors import BackendNotInstalledError, ConversionError, InvalidParameterError, UnsupportedModelError
from edgelm.formats import hf, onnx_folder, onnx_plain

from .. import Progress
from ..process import run_streaming
from . import attention
from . import quantize as oq
from .options import OnnxOptions, read_calibration

log = logging.getLogger("edgelm.converters.onnx")

OPTIMUM_ONNX_VERSION = "0.1.0"
# what `edgelm install-converter --optimum` puts in its folder (--no-deps: torch, onnx, numpy, requests, ... come from
# this environment); the versions edgelm is tested with: optimum-onnx 0.1.0 needs optimum~=2.1 and transformers<4.58,
# which needs huggingface_hub<1.0 and tokenizers<0.23 (this environment has the transformers 5 versions of both)
PACKAGES = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "huggingface_hub==0.36.2",
            "tokenizers==0.22.2")
ENV_VAR = "EDGELM_OPTIMUM"
TASK = "text-generation-with-past"
MODEL_TYPES_FILE = "edgelm-model-types.json"
# optimum lists these for text-generation-with-past too, but they are encoder-decoder families (their causal-LM
# heads are rarely used): edgelm's runtime feeds decoder-only graphs
ENCODER_DECODER = ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "pegasus")
# architectures edgelm's tests export, quantize and decode with optimum (greedy tokens equal transformers')
TESTED = ("gpt2", "gpt_neox", "opt", "bloom", "falcon", "llama")
INSTALL_COMMAND = "edgelm install-converter --optimum"


# --- where optimum-onnx lives ---------------------------------------------------------------------------------

def optimum_home() -> Path:
    """$EDGELM_OPTIMUM, else $XDG_CACHE_HOME/edgelm/tools/optimum-onnx-<version> (~/.cache when unset)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "edgelm" / "tools" / f"optimum-onnx-{OPTIMUM_ONNX_VERSION}"


def find_optimum() -> Path | None:
    """The folder holding optimum-onnx (installed by edgelm), or None."""
    home = optimum_home()
    return home if (home / "optimum" / "exporters" / "onnx" / "__init__.py").is_file() else None


def optimum_env(home: Path) -> dict[str, str]:
    """The child's environment: offline, unbuffered, optimum's folder first on PYTHONPATH (its transformers 4.57
    shadows this environment's transformers 5)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(home), os.environ.get("PYTHONPATH")) if p)
    return env


def install_optimum(target: Path | None = None, *, force: bool = False, progress: Progress | None = None) -> Path:
    """Install optimum-onnx and its pinned transformers into a folder of their own; returns the folder.

    Installs into a temporary folder beside ``target`` and renames it: an interrupted install leaves nothing.  Also
    records which model types optimum exports for text generation (read once here: importing optimum takes long)."""
    target = Path(target).expanduser() if target else optimum_home()
    if (target / "optimum" / "exporters" / "onnx" / "__init__.py").is_file() and not force:
        return target
    report = progress or (lambda message, fraction: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        report(f"pip install --no-deps --target {target} {' '.join(PACKAGES)}", 0.1)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--no-input",
               "--target", str(tmp), *PACKAGES]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0 or not (tmp / "optimum" / "exporters" / "onnx" / "__init__.py").is_file():
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            raise BackendNotInstalledError(
                f"Installing optimum-onnx {OPTIMUM_ONNX_VERSION} failed (pip exit code {proc.returncode}): {tail}",
                fix="Check that the package index is reachable (PIP_INDEX_URL), or install it by hand: "
                f"pip install --no-deps --target {target} {' '.join(PACKAGES)}", target=str(target))
        shutil.rmtree(tmp / "bin", ignore_errors=True)  # console scripts would run with this interpreter's path
        report("reading the model types optimum exports", 0.8)
        (tmp / MODEL_TYPES_FILE).write_text(json.dumps(_list_model_types(tmp)), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(f"installed in {target}", 1.0)
    return target


_LIST_TYPES = f"""
import json
import optimum.exporters.onnx.model_configs  # registers the ONNX configs
from optimum.exporters.tasks import TasksManager
types = sorted(m for m, d in TasksManager._SUPPORTED_MODEL_TYPE.items() if {TASK!r} in d.get("onnx", {{}}))
print("EDGELM_TYPES", json.dumps(types))
"""


def _list_model_types(home: Path) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _LIST_TYPES], capture_output=True, text=True, errors="replace",
                          env=optimum_env(home), timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("EDGELM_TYPES ")), None)
    if proc.returncode != 0 or line is None:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BackendNotInstalledError(f"optimum-onnx in {home} does not import: {tail}",
                                       fix=f"Reinstall it: {INSTALL_COMMAND} --force", path=str(home))
    return [t for t in json.loads(line.split(" ", 1)[1]) if t not in ENCODER_DECODER]


def supported_model_types(home: Path) -> list[str]:
    """Model types optimum-onnx exports for text generation with a KV cache (read at install, cached)."""
    path = home / MODEL_TYPES_FILE
    try:
        return list(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        types = _list_model_types(home)
        try:
            path.write_text(json.dumps(types), encoding="utf-8")
        except OSError:
            pass
        return types


def _norm(model_type: str) -> str:
    return str(model_type).replace("-", "_").lower()


def names_match(architecture: str, model_type: str | None) -> bool:
    """True when the checkpoint's class is its model type's own (GPT2LMHeadModel for gpt2, GPTNeoXForCausalLM for
    gpt_neox, Gemma3ForCausalLM for gemma3_text): optimum and transformers build the model from ``model_type`` alone,
    so a config whose ``architectures`` names something else would be exported as another model."""
    key = lambda name: re.sub(r"[^a-z0-9]", "", str(name).lower())  # noqa: E731
    base = key(re.sub(r"_text$", "", str(model_type or "")))
    return bool(base) and key(architecture).startswith(base)


def supports(home: Path, model_type: str | None) -> bool:
    return model_type is not None and _norm(model_type) in {_norm(t) for t in supported_model_types(home)}


# --- the source, as transformers 4.57 must read it ----------------------------------------------------------------

def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the names transformers 4.x reads added next to transformers 5's: ``rope_parameters`` ->
    ``rope_theta`` / ``partial_rotary_factor`` (``rotary_pct`` for GPT-NeoX) / ``rope_scaling`` (scaled RoPE), and,
    for per-layer-type parameters (Gemma 3), the sliding layers' base as ``rope_local_base_freq``; ``dtype`` ->
    ``torch_dtype``.  Keys the config already has are kept."""
    out = dict(config)
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        per_type = all(isinstance(v, dict) for v in params.values())
        full = params.get("full_attention", next(iter(params.values()))) if per_type else params
        sliding = params.get("sliding_attention") if per_type else None
        if isinstance(sliding, dict) and "rope_theta" in sliding:
            out.setdefault("rope_local_base_freq", sliding["rope_theta"])
        if "rope_theta" in full:
            out.setdefault("rope_theta", full["rope_theta"])
        if "partial_rotary_factor" in full:
            out.setdefault("partial_rotary_factor", full["partial_rotary_factor"])
            if config.get("model_type") == "gpt_neox":
                out.setdefault("rotary_pct", full["partial_rotary_factor"])
        if full.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", {k: v for k, v in full.items() if k != "rope_theta"})
    if "dtype" in config:
        out.setdefault("torch_dtype", config["dtype"])
    return out


def stage_source(source_dir: Path, into: Path, config: dict[str, Any]) -> Path:
    """A view of ``source_dir`` (links to its files) whose config.json transformers 4.57 reads as 5 does."""
    into.mkdir(parents=True)
    for p in source_dir.iterdir():
        if p.name != "config.json":
            (into / p.name).symlink_to(p.resolve())
    (into / "config.json").write_text(json.dumps(legacy_config(config), indent=2), encoding="utf-8")
    return into


# --- exporting -----------------------------------------------------------------------------------------------

_MARK = "EDGELM_OPTIMUM"
_LAUNCHER = f"""
import sys
print("{_MARK} importing", flush=True)
from optimum.exporters.onnx import main_export
print("{_MARK} exporting", flush=True)
main_export(sys.argv[1], sys.argv[2], task={TASK!r}, do_validation=False, trust_remote_code=False,
            library_name="transformers", device="cpu")
print("{_MARK} done", flush=True)
"""


def export(source_dir: Path, out: Path, config: dict[str, Any], *, timeout: float | None = None,
           progress: Progress | None = None) -> float:
    """optimum-onnx's fp32 export of ``source_dir`` into ``out`` (model.onnx + its files), in a child process;
    returns the seconds it took.  BackendNotInstalledError when optimum-onnx is not installed."""
    report = progress or (lambda message, fraction: None)
    home = find_optimum()
    if home is None:
        raise BackendNotInstalledError(
            f"Exporting with optimum-onnx needs optimum-onnx {OPTIMUM_ONNX_VERSION}, which is not installed.",
            fix=f"Run `{INSTALL_COMMAND}` once (it installs into {optimum_home()}, apart from this environment's "
            f"transformers 5), or set {ENV_VAR} to a folder where it is installed.")
    staged = stage_source(source_dir, out / ".optimum-source", config)
    tail: list[str] = []
    steps = {"importing": ("importing optimum-onnx", 0.05), "exporting": ("exporting with optimum-onnx", 0.15),
             "done": ("exported", 0.9)}

    def on_line(line: str) -> None:
        if line.startswith(_MARK):
            step = steps.get(line.split()[-1])
            if step:
                report(*step)
            return
        tail.append(line)
        del tail[:-40]

    start = time.monotonic()
    try:
        rc = run_streaming([sys.executable, "-c", _LAUNCHER, str(staged), str(out)], optimum_env(home), on_line,
                           timeout=timeout, timeout_error=lambda: ConversionError(
                               f"optimum-onnx ran longer than timeout={timeout} s and was stopped.",
                               fix="Allow more time (timeout=...)."))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if rc != 0 or not (out / "model.onnx").is_file():
        text = "\n".join(tail)
        reason = next((x for x in reversed(tail) if re.search(r"Error|Exception|error:", x)), None)
        reason = reason or " | ".join(tail[-3:]) or f"exit code {rc}"
        if rc < 0 or rc == 137:
            reason = f"it was killed (signal {-rc if rc < 0 else 9}; out of memory?)"
        if "is not supported" in text or "Unrecognized configuration" in text:
            raise UnsupportedModelError(f"optimum-onnx cannot export {source_dir} ({config['architectures'][0]}): "
                                        f"{reason}", fix="Convert it to GGUF instead (to='gguf').",
                                        architecture=config["architectures"][0], log=text)
        raise ConversionError(f"optimum-onnx failed exporting {source_dir} ({config['architectures'][0]}): {reason}",
                              fix=f"Run it by hand to see the whole log: PYTHONPATH={home} python -m "
                              f"optimum.exporters.onnx -m {source_dir} --task {TASK} OUT", returncode=rc, log=text)
    return time.monotonic() - start


# --- the whole folder --------------------------------------------------------------------------------------------

def resolve_algo(quant: str, opts: Any) -> Any:
    """How the weights of an optimum export are rounded: GPTQ for symmetric int4 under "auto" or by name (the
    Hessians of the calibration windows are taken from the fp32 graph; ``converters.onnx.quantize``), round to
    nearest otherwise.  The builder's other methods (k_quant, *_last) are not available here."""
    if quant not in ("int4", "int8", "fp32"):
        raise InvalidParameterError(f"The optimum exporter writes fp32, int8 or int4 graphs, not {quant}.",
                                    fix="Use quant='int4', 'int8' or 'fp32' (fp16 graphs come from the builder, for "
                                    "GPUs).", parameter="quant", value=quant)
    if opts.algo in ("default", "rtn"):
        return opts.replace(algo="default")
    if opts.algo not in ("auto", "gptq"):
        raise InvalidParameterError(f"algo={opts.algo!r} is not available with the optimum exporter.",
                                    fix="Use algo='gptq' (int4), 'default' (round to nearest) or leave it unset.",
                                    parameter="algo", value=opts.algo)
    if quant != "int4":
        if opts.algo == "gptq":
            raise InvalidParameterError(f"algo='gptq' makes int4 weights; quant is {quant!r}.",
                                        fix='Use quant="int4" with algo="gptq".', parameter="algo", value="gptq")
        return opts.replace(algo="default")
    if not opts.symmetric:
        if opts.algo == "gptq":
            raise InvalidParameterError("GPTQ with the optimum exporter makes symmetric int4 weights.",
                                        fix="Drop symmetric=False, or use algo='default'.", parameter="symmetric",
                                        value=False)
        return opts.replace(algo="default")
    return opts.replace(algo="gptq")


def write_folder(source_dir: Path, tmp: Path, config: dict[str, Any], quant: str, opts: Any,
                 report: Progress) -> dict[str, Any]:
    """Export, quantize and save into ``tmp``: model.onnx + model.onnx.data, tokenizer files, edgelm.json (its
    manifest, returned).  The caller carries the source's other files and puts the folder in place."""
    import onnx

    export_dir = tmp / ".optimum-export"
    export_dir.mkdir()
    seconds = export(source_dir, export_dir, config, timeout=opts.timeout,
                     progress=lambda message, fraction: report(message, 0.5 * fraction))
    io = onnx_plain.session_io(export_dir / "model.onnx")  # refuses a graph without past key/values
    report("Reading the exported graph", 0.5)
    model = onnx.load(str(export_dir / "model.onnx"))
    changes: dict[str, Any] = oq.prepare(model)
    report("Folding the graph's shape arithmetic", 0.52)
    try:
        changes.update(oq.fold_shapes(model))
    except Exception as exc:  # symbolic shape inference does not know every op: the graph is correct without it
        log.warning("Shape folding skipped (%s: %s); the graph runs as exported.", type(exc).__name__, exc)
    report("Rewriting the attention into GroupQueryAttention", 0.53)
    changes["attention"] = fuse_attention(model, export_dir / "model.onnx", config,
                                          int(io["vocab_size"] or config.get("vocab_size") or 2))
    model, replaced = _quantized(model, quant, opts, source_dir, _context_length(config), report)
    report("Writing the graph", 0.88)
    onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    del model
    for p in export_dir.iterdir():  # tokenizer, config and template files optimum copied
        if p.is_file() and not p.name.startswith("model.onnx") and not (tmp / p.name).exists():
            shutil.copy2(p, tmp / p.name)
    shutil.rmtree(export_dir, ignore_errors=True)
    gen_cfg = {}
    if (source_dir / "generation_config.json").is_file():
        gen_cfg = json.loads((source_dir / "generation_config.json").read_text(encoding="utf-8"))
    record = opts.quantization_record(quant)
    if record is not None:
        record["algo"] = "gptq" if replaced else "default"
        if replaced:
            record["gptq_weights"] = replaced  # MatMul weights GPTQ rounded (the others: round to nearest)
    manifest = onnx_plain.make_session_manifest(
        tmp, config, name=config.get("_name_or_path") or source_dir.name, quant=quant,
        parameters=hf.count_parameters(source_dir), quantization_options=record, generation_config=gen_cfg,
        exporter={"name": "optimum-onnx", "version": OPTIMUM_ONNX_VERSION, "task": TASK,
                  "transformers": _dist_version(find_optimum(), "transformers"), "seconds": round(seconds, 1),
                  "graph_rewrites": changes, "onnxruntime": metadata.version("onnxruntime")})
    return manifest


def fuse_attention(model: Any, exported: Path, config: dict[str, Any], vocab: int) -> dict[str, Any]:
    """Every layer's attention as one GroupQueryAttention sharing its cache buffer (:mod:`.attention`), checked
    against the exported graph; the graph as exported (and why, in the record) where that does not apply."""
    try:
        done = attention.fuse_checked(model, exported, heads=onnx_plain.query_heads(config), vocab=vocab,
                                           positions=_context_length(config))
    except Exception as exc:  # an analysis the graph defeats must not fail the conversion: it runs as exported
        log.warning("Attention rewrite failed (%s: %s)", type(exc).__name__, exc)
        done = {"attention": "as exported", "reason": f"{type(exc).__name__}: {exc}"}
    if done["attention"] != attention.FUSED_OP:
        log.info("Attention kept as exported (%s): each step copies the KV cache once.", done.get("reason"))
    return done


def _quantized(model: Any, quant: str, opts: Any, tokenizer_dir: Path, context_length: int,
               report: Progress) -> tuple[Any, int]:
    """``model`` (prepared fp32) with int4/int8 MatMulNBits weights (GPTQ'd when ``opts.algo`` is gptq), and the
    number of weights GPTQ rounded; fp32 is returned as it is."""
    if quant not in ("int4", "int8"):
        return model, 0
    fp32 = None
    if opts.algo == "gptq":  # the Hessians are taken from the fp32 graph
        fp32 = type(model)()
        fp32.CopyFrom(model)
    report(f"Quantizing weights to {quant} (MatMulNBits)", 0.55)
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        model = oq.quantize(model, 4 if quant == "int4" else 8, block_size=opts.block_size, symmetric=opts.symmetric,
                            accuracy_level=opts.accuracy_level)
        if fp32 is None:
            return model, 0
        windows = oq.calibration_windows(tokenizer_dir, read_calibration(opts.calibration), context_length)
        replaced = oq.gptq_weights(fp32, model, windows, block_size=opts.block_size,
                                   progress=lambda message, fraction: report(message, 0.6 + 0.25 * fraction))
    finally:
        quiet.setLevel(level)
    return model, replaced


def quantize_folder(folder: Path, out: Path, quant: str, opts: Any | None = None,
                    progress: Progress | None = None) -> Path:
    """An int4/int8 copy at ``out`` of an fp32 folder written by the optimum exporter, without exporting again (the
    benchmark and the tests quantize one export several ways).  ``out`` must not exist."""
    import onnx

    report = progress or (lambda message, fraction: None)
    manifest = onnx_folder.check_folder(folder)
    if onnx_folder.exporter_kind(manifest) != "optimum" or manifest.get("quantization") != "fp32":
        raise InvalidParameterError(f"{folder} is not an fp32 folder written by the optimum exporter.",
                                    fix="Convert with exporter='optimum', quant='fp32' first.", parameter="folder",
                                    value=str(folder))
    opts = resolve_algo(quant, opts or OnnxOptions(exporter="optimum"))
    model = onnx.load(str(folder / "model.onnx"))
    oq.prepare(model)
    model, replaced = _quantized(model, quant, opts, folder, int(manifest["context_length"]), report)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        for p in folder.iterdir():
            if p.is_file() and not p.name.startswith("model.onnx") and p.name != onnx_folder.MANIFEST:
                shutil.copy2(p, tmp / p.name)
        record = opts.quantization_record(quant)
        record.update(algo="gptq" if replaced else "default", **({"gptq_weights": replaced} if replaced else {}))
        manifest = {**manifest, "quantization": quant, "quantization_options": record,
                    "external_data": ["model.onnx.data"]}
        (tmp / onnx_folder.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _context_length(config: dict[str, Any]) -> int:
    cfg = config.get("text_config") or config
    return int(next((cfg[k] for k in ("max_position_embeddings", "n_positions", "seq_length") if cfg.get(k)), 2048))


def _dist_version(home: Path | None, dist: str) -> str | None:
    if home is None:
        return None
    found = sorted(home.glob(f"{dist}-*.dist-info"))
    return found[0].name[len(dist) + 1 : -len(".dist-info")] if found else None


def smoke_test(folder: Path) -> None:
    """Evaluate three tokens and decode one more with onnxruntime (one thread, an empty cache first, then the
    cache the graph returned): a graph onnxruntime cannot run fails the conversion, not its first use."""
    import numpy as np
    import onnxruntime as ort

    try:
        io = onnx_plain.session_io(folder / "model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        vocab = int(io.get("vocab_size") or 4)
        past = {}
        for kv in io["kv"]:
            shape = [1 if i == 0 else d for i, d in enumerate(kv["shape"])]
            shape[kv["sequence_axis"]] = 0
            past[kv["past"]] = np.zeros(shape, dtype=io["dtype"])
        length = 0
        for ids in ([1 % vocab, 2 % vocab, 3 % vocab], [4 % vocab]):
            feed = {"input_ids": np.array([ids], dtype=np.int64), **past}
            if "attention_mask" in io["inputs"]:
                feed["attention_mask"] = np.ones((1, length + len(ids)), dtype=np.int64)
            if "position_ids" in io["inputs"]:
                feed["position_ids"] = np.arange(length, length + len(ids), dtype=np.int64)[None]
            names = ["logits", *(kv["present"] for kv in io["kv"])]
            out = session.run(names, feed)
            past = {kv["past"]: value for kv, value in zip(io["kv"], out[1:])}
            length += len(ids)
    except Exception as exc:
        raise ConversionError(f"The model optimum-onnx exported does not run on this machine's onnxruntime (CPU): "
                              f"{str(exc).strip()[:400]}", fix="Try another quantization, or convert to GGUF "
                              "instead.") from exc
