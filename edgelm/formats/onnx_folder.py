"""The ONNX model folder format: what `edgelm convert --to onnx` writes and the onnxruntime backend reads.

Folder::

    model.onnx, model.onnx.data   the graph and its external weights
    genai_config.json             onnxruntime-genai's runtime settings (I/O names, KV layout, search defaults)
    tokenizer.json, tokenizer_config.json, chat_template.jinja (when the source has one), ...
    edgelm.json                   edgelm's manifest (MANIFEST_VERSION; written by :func:`make_manifest`)

A folder written by onnxruntime-genai's builder itself (no ``edgelm.json``) is read too: its facts come from
``genai_config.json`` and the graph (:func:`manifest_from_genai`).  Everything here reads files; nothing loads
onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelFileError, ModelNotFoundError, UnsupportedModelError
from edgelm.optional import available

from . import disk_size
from .gguf import AttentionShape

MANIFEST = "edgelm.json"
MANIFEST_VERSION = 1
GENAI_CONFIG = "genai_config.json"
QUANTS = ("int4", "int8", "fp16", "fp32")
# bytes per parameter of each ONNX type as written (scales included, embeddings unshared): for size estimates
BYTES_PER_PARAMETER = {"int4": 0.65, "int8": 1.15, "fp16": 2.0, "fp32": 4.0}
# the manifest's kv_cache keys that describe the cache's shape (the rest are I/O names)
KV_SHAPE_KEYS = ("layers", "kv_heads", "head_size", "layout", "shared_buffer")


def folder_of(path: Path) -> Path:
    """The model folder for a folder or a path to its .onnx graph."""
    path = Path(path)
    return path.parent if path.is_file() and path.suffix == ".onnx" else path


def is_onnx_folder(path: Path) -> bool:
    folder = folder_of(path)
    return folder.is_dir() and ((folder / MANIFEST).is_file() or (folder / GENAI_CONFIG).is_file())


def looks_like_onnx(path: Path) -> bool:
    """Cheap format sniffing for backend="auto": a .onnx file, or a folder holding one or a manifest."""
    path = Path(path)
    return path.suffix == ".onnx" or (path.is_dir() and (any(path.glob("*.onnx")) or (path / MANIFEST).exists()))


def token_ids(value: Any) -> list[int]:
    """A config's token id field (an int, a list, or None) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if isinstance(v, int)]


def _version(dist: str) -> str | None:
    from importlib import metadata  # ~20 ms to import: only when a manifest is written

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def manifest_head(config: dict[str, Any], *, name: str, quant: str,
                  quantization_options: dict[str, Any] | None) -> dict[str, Any]:
    """The keys every edgelm ONNX manifest starts with, whichever exporter wrote the graph."""
    return {"format": "edgelm-onnx", "version": MANIFEST_VERSION, "name": name,
            "architecture": config["architectures"][0], "model_type": config.get("model_type"),
            "quantization": quant, "quantization_options": quantization_options}


def make_manifest(folder: Path, config: dict[str, Any], *, name: str, quant: str, parameters: int,
                  quantization_options: dict[str, Any] | None, execution_provider: str, graph_target: str,
                  generation_config: dict[str, Any] | None = None,
                  exporter: str = "onnxruntime-genai model builder") -> dict[str, Any]:
    """The manifest for a folder whose graph and genai_config.json are written: facts from those files and the
    source's Hugging Face ``config``."""
    genai = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
    model = genai["model"]
    dec = model["decoder"]
    gen_cfg = generation_config or {}
    eos = list(dict.fromkeys(token_ids(model.get("eos_token_id")) + token_ids(gen_cfg.get("eos_token_id"))
                             + token_ids(config.get("eos_token_id"))))
    text_cfg = config.get("text_config") or config
    data_files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.startswith("model.onnx."))
    return {
        **manifest_head(config, name=name, quant=quant, quantization_options=quantization_options),
        "execution_provider": execution_provider,
        "graph_target": graph_target,
        "parameters": parameters,
        "context_length": int(model.get("context_length") or text_cfg.get("max_position_embeddings") or 2048),
        "vocab_size": int(model.get("vocab_size") or text_cfg["vocab_size"]),
        "bos_token_id": model.get("bos_token_id", config.get("bos_token_id")),
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
        "chat_template": "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else None,
        "exporter": {"name": exporter, "version": _version("onnxruntime-genai")},
    }


def exporter_kind(manifest: dict[str, Any]) -> str:
    """Which exporter wrote a folder, as the runtime cares: "optimum" (optimum-onnx: a plain decoder graph that
    edgelm's own onnxruntime loop runs, see runtimes/onnx_session.py) or "genai" (onnxruntime-genai's builder)."""
    name = str((manifest.get("exporter") or {}).get("name") or "")
    return "optimum" if name.startswith("optimum") else "genai"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an ONNX folder; typed errors for a missing or corrupt one."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file() and (folder / GENAI_CONFIG).is_file():
        return manifest_from_genai(folder)
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
    cfg_path = folder / GENAI_CONFIG
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
    model_file = dec.get("filename", "model.onnx")
    quant, qopts, params = graph_quantization(folder / model_file)
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
        "eos_token_ids": token_ids(model.get("eos_token_id")),
        "pad_token_id": model.get("pad_token_id"),
        "model_file": model_file,
        "external_data": sorted(p.name for p in folder.iterdir() if p.name.startswith(model_file + ".")),
        "kv_cache": {
            "layers": dec.get("num_hidden_layers"), "kv_heads": dec.get("num_key_value_heads"),
            "attention_heads": dec.get("num_attention_heads"), "head_size": dec.get("head_size"), "layout": "BNSH",
            "shared_buffer": bool(genai.get("search", {}).get("past_present_share_buffer", False)),
        },
        "chat_template": "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else None,
        "exporter": {"name": "onnxruntime-genai model (no edgelm manifest)", "version": None},
    }


def graph_quantization(model_file: Path) -> tuple[str, dict[str, Any] | None, int]:
    """(quantization, its options, parameter count) read from the graph's initializers, without the weights."""
    if not available("onnx"):
        return "unknown", None, 0
    import onnx
    from onnx import helper

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


def check_folder(folder: Path) -> dict[str, Any]:
    """Check that every file an ONNX folder needs is there and plausible; return its manifest.

    Catches a missing or truncated model.onnx / external data file and a missing tokenizer before onnxruntime
    is asked to load them (its own messages for those are cryptic).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    model_file = folder / manifest.get("model_file", "model.onnx")
    if not model_file.is_file():
        raise ModelNotFoundError(f"{folder} has no {model_file.name}.", fix="Convert the model again.",
                                 path=str(model_file))
    for name in (GENAI_CONFIG, "tokenizer.json") if exporter_kind(manifest) == "genai" else ("tokenizer.json",):
        if not (folder / name).is_file():
            raise ModelNotFoundError(f"{folder} has no {name}; the folder is incomplete.",
                                     fix="Copy the whole folder written by `edgelm convert --to onnx`, or convert "
                                     "again.", path=str(folder / name))
    if available("onnx"):
        import onnx

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


def kv_length(folder: Path, n_ctx: int) -> int:
    """The KV cache length (onnxruntime-genai's max_length) to allocate for ``n_ctx`` tokens.  Sliding-window layers
    (Gemma 2/3, ...) keep a window-sized cache that onnxruntime's GroupQueryAttention refuses to run when the whole
    cache is shorter than the window ("KV cache capacity (16) must be at least local_window_size (4096)"), so the
    cache is never shorter than the window plus the slack the builder asks for; edgelm still stops at n_ctx."""
    try:
        genai = json.loads((Path(folder) / GENAI_CONFIG).read_text(encoding="utf-8"))
        window = genai["model"]["decoder"].get("sliding_window") or {}
        floor = int(window.get("window_size") or 0) + int(window.get("cache_slack") or 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        floor = 0
    return max(int(n_ctx), floor)


def attention_shape(manifest: dict[str, Any]) -> AttentionShape:
    kv = manifest.get("kv_cache") or {}
    head = int(kv.get("head_size") or 0)
    n_head = int(kv.get("attention_heads") or kv.get("kv_heads") or 1)
    return AttentionShape(n_layer=int(kv.get("layers") or 0), n_embd=head * n_head, n_head=n_head,
                          n_head_kv=int(kv.get("kv_heads") or 0), head_k=head, head_v=head,
                          n_vocab=int(manifest.get("vocab_size") or 0))


def inspect(path: Path) -> dict[str, Any]:
    """A folder's facts from its manifest alone, after checking its files (no onnxruntime session)."""
    folder = folder_of(Path(path))
    m = check_folder(folder)
    size = disk_size(folder)
    q = m.get("quantization_options") or {}
    bits = q.get("bits") or {"fp16": 16, "fp32": 32}.get(str(m.get("quantization")), None)
    return {
        "path": str(folder),
        "format": "onnx",
        "name": m.get("name"),
        "architecture": m.get("model_type") or m.get("architecture"),
        "hf_architecture": m.get("architecture"),
        "quantization": m.get("quantization"),
        "quantization_options": m.get("quantization_options"),
        "parameters": m.get("parameters"),
        "context_length": m.get("context_length"),
        "size_bytes": size,
        "bits_per_weight": round(size * 8 / m["parameters"], 3) if m.get("parameters") else bits,
        "built_for": m.get("execution_provider"),
        "kv_cache": {k: v for k, v in (m.get("kv_cache") or {}).items() if k in KV_SHAPE_KEYS},
        "eos_token_ids": m.get("eos_token_ids"),
        "bos_token_id": m.get("bos_token_id"),
        "chat_template": m.get("chat_template") is not None,
        "exporter": m.get("exporter"),
    }
