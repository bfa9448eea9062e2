"""A small, strict GGUF header reader.

llama.cpp can abort the whole process on a malformed file, so every GGUF is read and checked here first:
magic, version, every metadata value, every tensor's type and shape, and that the file really holds all the
tensor data the header describes (a truncated download is the common case).  Only the header is read;
tensor data is never touched, so this costs milliseconds even for multi-GB files.

Also the one place that knows GGUF's facts for the rest of edgelm: the type tables (tensor types, llama.cpp file
types, KV-cache element types), the bits per weight of each file type, and the attention shape a model's KV cache
follows (:class:`AttentionShape`, whose :meth:`~AttentionShape.kv_bytes` is the one KV-size formula).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelFileError, ModelNotFoundError
from edgelm.home import edgelm_home, write_atomic

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml tensor type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# llama.cpp `general.file_type` (enum llama_ftype) -> quantization name as users type it
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}

# KV cache element types llama.cpp accepts (type_k / type_v), by name -> ggml type id
KV_TYPE_IDS: dict[str, int] = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
                               "iq4_nl": 20}
KV_CACHE_TYPES = tuple(KV_TYPE_IDS)
# KV types that need flash attention in llama.cpp (a quantized V cache)
KV_NEEDS_FLASH_ATTN = frozenset(KV_CACHE_TYPES) - {"f32", "f16", "bf16"}

# Typical bits per weight of each llama.cpp file type over a whole model (weights only; k-quant mixes keep some
# tensors at higher precision).  Used to estimate a conversion's size (disk-space checks, deployment plans) before
# it is written; the real figure of a written file is GGUFHeader.bits_per_weight.
FILE_TYPE_BPW: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.67, "Q5_K_S": 5.52, "Q5_1": 6.0,
    "Q5_0": 5.5, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_1": 5.0, "Q4_0": 4.55, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.35, "Q2_K_S": 3.2,
}


def type_bytes(name: str) -> float:
    """Bytes per element of a ggml type given by name (f16 -> 2.0, q8_0 -> 34/32)."""
    for type_name, block, size in GGML_TYPES.values():
        if type_name.lower() == name.lower():
            return size / block
    raise KeyError(name)


def file_type_bpw(quant: str, default: float = 16.0) -> float:
    """Typical bits per weight of a file type by name, case-insensitive (unknown names: ``default``)."""
    return FILE_TYPE_BPW.get(quant.upper(), default)


# k-quants pack rows in super-blocks of 256: llama.cpp's quantizer stores a tensor whose rows are not a multiple of
# 256 as this type instead (llama-quant.cpp); and it keeps the output matrix (the token embedding, when tied) at
# OUTPUT_TYPE, or Q8_0 when its rows do not fit a k-quant.  Both matter for small models (SmolLM2-135M: hidden 576,
# a 28 M-parameter embedding of 134.5 M), where typical bits per weight underestimate sizes by up to 40 %.
KQUANT_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
OUTPUT_TYPE = "Q6_K"


def estimate_file_bytes(quant: str, parameters: int, *, row_size: int | None = None,
                        output_parameters: int = 0) -> int:
    """Bytes of weights a conversion to file type ``quant`` will write, before it is written: typical bits per
    weight, with the k-quant fallback for rows of ``row_size`` (the hidden size) not a multiple of 256, and the
    ``output_parameters`` of the output matrix (vocabulary x hidden size) at OUTPUT_TYPE where that is larger."""
    q = quant.upper()
    bpw = file_type_bpw(q)
    odd = row_size is not None and row_size % 256 != 0
    family = q[:4] if q[:4] in KQUANT_FALLBACK and (len(q) == 4 or q[4] == "_") else None
    if odd and family:
        bpw = max(bpw, 8 * type_bytes(KQUANT_FALLBACK[family]))
    out_bpw = 8 * type_bytes("Q8_0" if odd else OUTPUT_TYPE)
    if bpw >= out_bpw:
        return int(parameters * bpw / 8)
    out = min(output_parameters, parameters)
    return int(((parameters - out) * bpw + out * out_bpw) / 8)


@dataclass(frozen=True)
class AttentionShape:
    """What a model's KV cache and compute buffers are sized by (from GGUF metadata, a Hugging Face config, or an
    ONNX manifest)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_k: int
    head_v: int
    n_vocab: int

    def kv_bytes(self, n_ctx: int, kv_type: str = "f16") -> int:
        """Bytes of K and V cache for ``n_ctx`` cells of ``kv_type`` elements (the one KV-size formula)."""
        elements = self.n_layer * int(n_ctx) * self.n_head_kv * (self.head_k + self.head_v)
        return int(elements * type_bytes(kv_type))


# GGUF metadata value types: id -> struct format (None for string / array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
# arrays longer than this (vocabularies, merges, scores) are stepped over, not decoded (SkippedArray)
MAX_DECODED_ITEMS = 4096


@dataclass(frozen=True)
class SkippedArray:
    """Stands in for a long array (tokenizer.ggml.tokens, .scores, .merges: 50-250k items) that was stepped over,
    not decoded: nothing before the first token needs them, and decoding them in Python costs a cold start
    0.3 s for a 49k vocabulary.  ``offset`` is where its items start in the file, ``item_type`` their GGUF type."""

    length: int
    offset: int = 0
    item_type: int = 8

    def __len__(self) -> int:
        return self.length


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type{self.type_id}", 0, 0))[0]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int | None:
        spec = GGML_TYPES.get(self.type_id)
        if spec is None:
            return None
        _, block, size = spec
        return self.n_elements // block * size


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    required_size: int = field(default=0)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str | None:
        value = self.metadata.get("general.name")
        return str(value) if value is not None else None

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if value is not None else None

    @property
    def parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        if file_type is not None and int(file_type) in FILE_TYPES:
            return FILE_TYPES[int(file_type)]
        # no file_type: name the type holding most bytes
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.type_name] = by_type.get(t.type_name, 0) + (t.n_bytes or 0)
        return max(by_type, key=lambda name: by_type[name]) if by_type else "unknown"

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def attention_shape(self) -> AttentionShape:
        n_embd = int(self.arch_value("embedding_length", 0))
        n_head = int(_largest(self.arch_value("attention.head_count", 1)) or 1)
        n_head_kv = int(_largest(self.arch_value("attention.head_count_kv", n_head)) or n_head)
        head_k = int(self.arch_value("attention.key_length", n_embd // n_head))
        head_v = int(self.arch_value("attention.value_length", head_k))
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if tokens is not None else int(self.arch_value("vocab_size", 32000))
        return AttentionShape(n_layer=int(self.arch_value("block_count", 0)), n_embd=n_embd, n_head=n_head,
                              n_head_kv=n_head_kv, head_k=head_k, head_v=head_v, n_vocab=n_vocab)

    @property
    def weight_bytes(self) -> int:
        return self.required_size - self.data_offset

    @property
    def bits_per_weight(self) -> float:
        n = self.parameters
        return 8.0 * (self.required_size - self.data_offset) / n if n else 0.0


def _largest(value: Any) -> Any:
    """Per-layer arrays (head_count_kv of models with mixed layers) count at their largest."""
    return max(value) if hasattr(value, "__len__") and len(value) else value


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path, known_ends: dict[int, int] | None = None) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)
        self.known_ends = known_ends or {}  # where a long string array starting at a byte ends (ARRAY_ENDS)
        self.found_ends: dict[int, int] = {}  # the ends this read walked to

    def fail(self, what: str) -> InvalidModelFileError:
        return InvalidModelFileError(
            f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos} of {self.size}).",
            fix="The file is corrupt or truncated; download or convert it again.",
            path=str(self.path),
        )

    def need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise self.fail(f"header ends early, needed {n} more bytes")

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, limit: int = 1 << 30) -> str:
        n = self.scalar("<Q")
        if n > limit:
            raise self.fail(f"string length {n} is implausible")
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Step over ``count`` strings: one length read each, in a tight loop (a vocabulary is ~50-250k of them)."""
        unpack, buf, pos, end = _U64.unpack_from, self.buf, self.pos, self.size - 8
        for _ in range(count):
            if pos > end:  # no room for the next length
                self.pos = pos
                raise self.fail("header ends early, inside a string array")
            pos += 8 + unpack(buf, pos)[0]
        self.pos = pos
        if pos > self.size:
            raise self.fail("header ends early, inside a string array")

    def value(self, type_id: int) -> Any:
        if type_id in _SCALARS:
            return self.scalar(_SCALARS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                nbytes = count * struct.calcsize(fmt)
                self.need(nbytes)
                if count > MAX_DECODED_ITEMS:
                    skipped = SkippedArray(count, self.pos, item_type)
                    self.pos += nbytes
                    return skipped
                values = struct.unpack_from(f"<{count}{fmt[1:]}", self.buf, self.pos)
                self.pos += nbytes
                return values
            if item_type == _STRING:
                if count > MAX_DECODED_ITEMS:
                    skipped = SkippedArray(count, self.pos, item_type)
                    end = self.known_ends.get(self.pos)
                    if end is not None and self.pos + 8 * count <= end <= self.size:
                        self.pos = end  # walked on an earlier read of this very file
                    else:
                        self.skip_strings(count)
                        self.found_ends[skipped.offset] = self.pos
                    return skipped
                return [self.string() for _ in range(count)]
            if item_type == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise self.fail(f"unknown array item type {item_type}")
        raise self.fail(f"unknown metadata value type {type_id}")


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read and check a GGUF file's header; raise :class:`InvalidModelFileError` on anything malformed."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"Model file not found: {p}.", fix="Check the path.", path=str(p))
    if p.is_dir():
        raise InvalidModelFileError(f"{p} is a folder, not a GGUF file.", fix="Pass the .gguf file inside it.", path=str(p))
    st = p.stat()
    file_size = st.st_size
    if file_size < 24:
        raise InvalidModelFileError(
            f"{p} is not a GGUF file: only {file_size} bytes.", fix="Download or convert the model again.", path=str(p)
        )
    key = ARRAY_ENDS.key(p, st)
    known = ARRAY_ENDS.get(key)
    with open(p, "rb") as fh:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                header, found = _parse(buf, p, file_size, known)
            except InvalidModelFileError:
                if not known:
                    raise
                header, found = _parse(buf, p, file_size, None)  # the index was wrong: walk, and correct it
                known = None
    if found:  # walked over at least one array: remember where they end
        ARRAY_ENDS.put(key, {**(known or {}), **found})
    return header


class _ArrayEnds:
    """Where each long string array of a GGUF file ends (the vocabulary, the merges), by file, so that reading the
    same file again jumps over them instead of stepping through ~50-250k length prefixes in Python (~10 ms for
    SmolLM2's 98k, several times that on a Raspberry Pi).  One small JSON file under $EDGELM_HOME, keyed by the
    file's path, size and modification time; a read that finds it wrong walks the file and corrects it.  Never
    raises: a read-only home only makes reading slower."""

    NAME = "gguf-array-ends.json"
    MAX_FILES = 256

    def __init__(self) -> None:
        self._table: dict[str, dict[str, int]] | None = None

    @staticmethod
    def key(path: Path, st: os.stat_result) -> str:
        return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"

    def _file(self) -> Path:
        return edgelm_home() / self.NAME

    def _load(self) -> dict[str, dict[str, int]]:
        if self._table is None:
            try:
                table = json.loads(self._file().read_text(encoding="utf-8"))
                self._table = table if isinstance(table, dict) else {}
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def get(self, key: str) -> dict[int, int] | None:
        entry = self._load().get(key)
        try:
            return {int(k): int(v) for k, v in entry.items()} if isinstance(entry, dict) else None
        except (TypeError, ValueError):
            return None

    def put(self, key: str, ends: dict[int, int]) -> None:
        table = self._load()
        table.pop(key, None)
        table[key] = {str(k): v for k, v in ends.items()}
        while len(table) > self.MAX_FILES:  # the oldest first (a dict keeps insertion order)
            del table[next(iter(table))]
        try:
            write_atomic(self._file(), json.dumps(table))  # a lost update only means one more walk
        except OSError:
            pass


ARRAY_ENDS = _ArrayEnds()


def is_gguf(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _parse(buf: mmap.mmap, path: Path, file_size: int,
           known_ends: dict[int, int] | None = None) -> tuple[GGUFHeader, dict[int, int]]:
    """The header, and the ends of the long string arrays this read walked to (none when ``known_ends`` had
    them all)."""
    r = _Reader(buf, path, known_ends)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise InvalidModelFileError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF').",
            fix="Pass a .gguf model, or convert a Hugging Face model with `edgelm convert SRC --to gguf`.",
            path=str(path),
        )
    r.pos = 4
    version = r.scalar("<I")
    if version not in (2, 3):
        raise r.fail(f"unsupported GGUF version {version} (this reader knows 2 and 3)")
    n_tensors = r.scalar("<Q")
    n_kv = r.scalar("<Q")
    # each tensor info / kv pair needs well over 8 bytes: reject absurd counts before looping on them
    if n_tensors > file_size // 8 or n_kv > file_size // 8:
        raise r.fail(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string(limit=65536)
        type_id = r.scalar("<I")
        metadata[key] = r.value(type_id)
    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = r.string(limit=65536)
        n_dims = r.scalar("<I")
        if n_dims > 8:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(r.scalar("<Q") for _ in range(n_dims))
        type_id = r.scalar("<I")
        offset = r.scalar("<Q")
        tensors.append(TensorInfo(name, shape, type_id, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    required = data_offset
    for t in tensors:
        nbytes = t.n_bytes
        if nbytes is None:  # a tensor type newer than this table: its end is at least its offset
            nbytes = 0
        spec = GGML_TYPES.get(t.type_id)
        if spec and t.shape and t.shape[0] % spec[1]:
            raise r.fail(f"tensor {t.name!r} row of {t.shape[0]} is not a multiple of {spec[0]}'s block {spec[1]}")
        required = max(required, data_offset + t.offset + nbytes)
    header = GGUFHeader(path, version, metadata, tensors, data_offset, file_size, required)
    if file_size < required:
        raise InvalidModelFileError(
            f"{path} is truncated: the header describes {required:,} bytes of tensors but the file has {file_size:,}.",
            fix="The download or conversion was interrupted; fetch or convert the model again.",
            path=str(path),
            file_size=file_size,
            required_size=required,
        )
    return header, r.found_ends


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A GGUF file's facts from its header alone (nothing is loaded)."""
    h = read_header(path)
    return {
        "path": str(path),
        "format": "gguf",
        "name": h.name,
        "architecture": h.architecture,
        "quantization": h.quantization,
        "parameters": h.parameters,
        "context_length": h.context_length,
        "size_bytes": h.file_size,
        "bits_per_weight": round(h.bits_per_weight, 3),
        "gguf_version": h.version,
        "tensors": len(h.tensors),
        "chat_template": h.chat_template is not None,
    }
