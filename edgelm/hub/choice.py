"""What a repository offers and which of it to fetch: GGUF quantizations and ONNX folders, chosen by name or by
what fits the device (:func:`edgelm.plan.recommend`'s memory arithmetic on the model's header)."""

from __future__ import annotations

import dataclasses
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import DoesNotFitError, HubError, InvalidModelFileError, QuantNotFoundError
from ..formats.gguf import read_header
from ..plan import RECOMMEND_DEFAULTS, ModelFacts, Plan, file_facts, recommend
from ..platforms import detect
from ..units import human_bytes
from .reference import Reference

MAX_HEADER_BYTES = 64 << 20  # a GGUF header (vocabulary and merges included) read to plan the choice of file
NOMINAL_BANDWIDTH_GBS = 10.0  # the choice uses the plan's memory, not its speed: skip measuring bandwidth

# quantization in a GGUF file name: Q4_K_M, q8_0, IQ4_XS, Q4_0_4_4, TQ1_0, BF16, F16, MXFP4, UD-Q4_K_XL (unsloth)
_QUANT_IN_NAME = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q[1-8](?:_[A-Z0-9]{1,4})*|TQ[12]_0|BF16|F16|F32|FP16|FP32|MXFP4(?:_MOE)?))"
    r"(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_ONNX_MARKERS = ("edgelm.json", "genai_config.json")
_SKIP_FILES = (".gitattributes",)


# --- what a repository offers ----------------------------------------------------------------------------

@dataclass
class Candidate:
    """One thing a repository offers to run: a GGUF quantization (its file, or all parts of a split file) or an
    ONNX folder."""

    format: str  # gguf | onnx
    label: str  # the quantization (Q4_K_M) or the ONNX folder ("" for the top of the repository)
    files: list[str]  # paths in the repository: split parts in order, or every file of the folder
    size_bytes: int
    entry: str  # what to hand to edgelm.load: the (first) .gguf, or the folder
    missing: list[str] = field(default_factory=list)  # parts of a split file the repository lacks

    @property
    def quant(self) -> str | None:
        return self.label if self.format == "gguf" else (self.label.rsplit("/", 1)[-1] or None)


def quant_label(file_name: str) -> str | None:
    """The quantization a GGUF file name states (``Llama-3.2-1B-Instruct-Q4_K_M.gguf`` -> ``Q4_K_M``), or None."""
    stem = Path(file_name).name
    m = _SPLIT.match(stem)
    stem = m.group("base") if m else re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    found = _QUANT_IN_NAME.findall(stem)
    return found[-1].upper() if found else None


def candidates(files: dict[str, int]) -> list[Candidate]:
    """What a repository (``{path: size}``) offers: GGUF quantizations if it has .gguf files (vision projectors
    ``mmproj-*`` aside), else its ONNX folders.  Largest first."""
    groups: dict[tuple[str, str, int], dict[int, str]] = {}
    singles: list[str] = []
    for path in files:
        name = path.rsplit("/", 1)[-1]
        if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj"):
            continue
        m = _SPLIT.match(name)
        if m:
            key = (path[: len(path) - len(name)], m.group("base"), int(m.group("count")))
            groups.setdefault(key, {})[int(m.group("part"))] = path
        else:
            singles.append(path)
    out = []
    for path in singles:
        name = path.rsplit("/", 1)[-1]
        label = quant_label(name) or re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
        out.append(Candidate("gguf", label, [path], files[path], path))
    for (folder, base, count), parts in groups.items():
        ordered = [f"{folder}{base}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
        # the repository may spell the part names with other letter case: use its own spelling
        by_lower = {p.lower(): p for p in parts.values()}
        present = [by_lower.get(p.lower(), p) for p in ordered if p.lower() in by_lower]
        missing = [p for p in ordered if p.lower() not in by_lower]
        label = quant_label(base + ".gguf") or base
        out.append(Candidate("gguf", label, present, sum(files[p] for p in present), present[0] if present else
                             ordered[0], missing=missing))
    if out:
        return sorted(out, key=lambda c: (-c.size_bytes, c.entry))
    folders = sorted({p.rsplit("/", 1)[0] if "/" in p else "" for p in files
                      if p.rsplit("/", 1)[-1] in _ONNX_MARKERS})
    for folder in folders:
        if folder == "":
            members = [p for p in files if "/" not in p and p not in _SKIP_FILES]
        else:
            members = [p for p in files if p.startswith(folder + "/")]
        out.append(Candidate("onnx", folder, sorted(members), sum(files[p] for p in members), folder or "."))
    return sorted(out, key=lambda c: (-c.size_bytes, c.entry))


def _labels(cands: list[Candidate]) -> str:
    return ", ".join(f"{c.label or '(top folder)'} ({human_bytes(c.size_bytes)})" for c in cands)


def match(ref: Reference, cands: list[Candidate]) -> list[Candidate]:
    """The candidates ``ref.quant`` names: by quantization or file name (GGUF), or by folder or a word of it (ONNX)."""
    q = (ref.quant or "").lower()
    exact = [c for c in cands if c.label.lower() == q or any(f.lower() == q or f.rsplit("/", 1)[-1].lower() == q
                                                             for f in (c.files if c.format == "gguf" else []))]
    if exact or not cands or cands[0].format == "gguf":
        return exact
    # ONNX folders: the last path component, or a word of it ("int4" picks cpu-int4-rtn-block-32)
    last = [c for c in cands if c.label.rsplit("/", 1)[-1].lower() == q]
    if last:
        return last
    return [c for c in cands if q in re.split(r"[/_.\-]", c.label.lower())]


# --- choosing by what fits this device -------------------------------------------------------------------

@dataclass
class Choice:
    candidate: Candidate
    reason: str


def _fits(c: Candidate, facts: ModelFacts, profile: str, host: Any) -> tuple[Plan | None, int | None]:
    """(the plan for running ``c`` as it is on the device ``profile`` by recommend()'s memory arithmetic, or None if
    it does not fit without converting to a smaller quantization; the device's usable memory)."""
    f = dataclasses.replace(facts, path=c.entry, quantization=c.label, weight_bytes=c.size_bytes)
    try:
        plan = recommend(f, profile, host=host, bandwidth_gbs=NOMINAL_BANDWIDTH_GBS)
    except DoesNotFitError as exc:
        return None, getattr(exc, "available", None)
    return (None if plan.needs_conversion else plan), plan.device_memory_bytes


def choose(ref: Reference, cands: list[Candidate], *, facts: Callable[[Candidate], ModelFacts] | None = None,
           profile: str = RECOMMEND_DEFAULTS.profile, host: Any = None, where: str = "") -> Choice:
    """Pick what to fetch for ``ref`` among ``cands``: by ``ref.quant`` if given, else the largest GGUF that fits
    the device ``profile`` (``facts(candidate)`` gives the model's :class:`edgelm.plan.ModelFacts`, read from one header)."""
    where = where or ref.repo_id
    if not cands:
        raise HubError(f"{where} has no GGUF file and no ONNX folder (edgelm.json / genai_config.json) to run.",
                       fix=f"If it is a Hugging Face checkpoint, convert it: edgelm convert {ref.repo_id} --quant "
                       f"q4_k_m -o model-q4_k_m.gguf", repo=ref.repo_id)
    if ref.quant:
        found = match(ref, cands)
        if not found:
            raise QuantNotFoundError(
                f"{where} has no {'file' if cands[0].format == 'gguf' else 'ONNX folder'} for {ref.quant!r}; "
                f"it has: {_labels(cands)}.",
                fix=f"Pick one of those: {ref.repo_id}:{cands[-1].label or '...'} (or leave the quantization out for "
                "the best that fits this device).", repo=ref.repo_id, quant=ref.quant,
                available=[c.label for c in cands])
        if len(found) > 1:
            raise HubError(f"{ref.quant!r} matches several files in {where}: "
                           f"{', '.join(c.entry for c in found)}.",
                           fix=f"Name one by its file (or folder) name: {ref.repo_id}:{found[0].entry}",
                           repo=ref.repo_id)
        c = found[0]
        return Choice(c, f"{c.label or 'the ONNX folder'} ({human_bytes(c.size_bytes)}), as asked.")
    if len(cands) == 1:
        c = cands[0]
        return Choice(c, f"{c.label or 'the ONNX folder'} ({human_bytes(c.size_bytes)}), the only one {where} has.")
    if cands[0].format == "onnx":
        raise HubError(f"{where} has several ONNX folders: {_labels(cands)}.",
                       fix=f"Name one: {ref.repo_id}:{cands[0].label}", repo=ref.repo_id,
                       available=[c.label for c in cands])
    usable = [c for c in cands if not c.missing]
    if facts is None or not usable:
        raise HubError(f"{where} has several quantizations: {_labels(cands)}.",
                       fix=f"Name one: {ref.repo_id}:{cands[-1].label}", repo=ref.repo_id)
    base = facts(min(usable, key=lambda c: c.size_bytes))
    if profile == "auto" and host is None:
        host = detect()
    available = None
    for c in usable:  # largest (best quality) first
        plan, available = _fits(c, base, profile, host)
        if plan is not None:
            return Choice(c, f"{c.label} ({human_bytes(c.size_bytes)}): the largest quantization in {where} "
                             f"that fits {plan.device_title}, needing {human_bytes(plan.memory_bytes)} of "
                             f"{human_bytes(plan.device_memory_bytes)} usable at n_ctx {plan.n_ctx}.")
    smallest = usable[-1]
    room = f" ({human_bytes(available)} usable)" if available is not None else ""
    raise DoesNotFitError(
        f"No quantization in {where} fits {profile if profile != 'auto' else 'this machine'}{room}: even the "
        f"smallest, {smallest.label} ({human_bytes(smallest.size_bytes)}), needs more once its KV cache and the "
        "runtime are counted (with the head-room `edgelm recommend` keeps).",
        fix=f"Pull one anyway by name ({ref.repo_id}:{smallest.label}), or use a smaller model.", repo=ref.repo_id,
        available=available)


def facts_from_prefix(read_prefix: Callable[[int], bytes], size: int, name: str) -> ModelFacts:
    """:class:`edgelm.plan.ModelFacts` of a GGUF of ``size`` bytes from its first bytes only.  The prefix is written
    into a sparse file of the full size, so the ordinary header reader (which checks the tensor table against the
    file size) reads it; more is fetched until the header ends inside what was fetched."""
    n = 1 << 20
    with tempfile.TemporaryDirectory(prefix="edgelm-header-") as tmp:
        path = Path(tmp) / Path(name).name
        while True:
            data = read_prefix(min(n, size))
            with open(path, "wb") as fh:
                fh.write(data)
                fh.truncate(size)
            try:
                header = read_header(path)
                if header.data_offset <= len(data):
                    return file_facts(path)
            except InvalidModelFileError:
                if len(data) >= size:
                    raise
            if n >= min(size, MAX_HEADER_BYTES):
                raise HubError(f"Could not read the GGUF header of {name} from its first {human_bytes(n)}.",
                               fix="Name the quantization to pull (ORG/REPO:QUANT).")
            n *= 4
