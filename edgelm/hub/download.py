"""Models by name: ``ORG/REPO[:QUANT]`` pulled from the Hugging Face Hub into its cache, like `ollama pull`.

    path = edgelm.pull("bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")   # the .gguf in the HF cache
    m = edgelm.load("bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")      # pulls on first use, then offline

A GGUF repository gives one file per quantization; ``:QUANT`` picks it by name (case-insensitive, matched against
the quantization in the file names, or a file name itself); without it the largest that fits this device is taken
(weights + KV cache + runtime overhead with head-room: :func:`edgelm.recommend`'s own arithmetic).  Split files
(``name-00001-of-00003.gguf``) are fetched together and the first part returned (llama.cpp opens the rest).  An
ONNX repository (``edgelm.json`` or ``genai_config.json`` at the top or in a sub-folder) gives that folder.

Downloads go through huggingface_hub (its HTTP client, headers, token, progress bars and cache layout: HF_HOME,
HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_OFFLINE, all read at each call).  Unlike ``hf_hub_download`` (which starts a
killed download over), a partial download is kept as ``blobs/<sha256>.incomplete`` and resumed with a range
request; every file is checked against its LFS sha256 (or git blob id) before it is used, and one that does not
match is deleted and reported (:class:`~edgelm.errors.DownloadCorruptError`).  Loading by name uses the cached copy
without asking the Hub; ``edgelm pull`` asks for the newest revision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from .errors import (BackendNotInstalledError, DoesNotFitError, DownloadCorruptError, HubError, InvalidModelFileError,
                     InvalidParameterError, QuantNotFoundError)
from .units import human_bytes

log = logging.getLogger("edgelm.hub")

DEFAULT_ENDPOINT = "https://huggingface.co"
API_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 << 20  # a GGUF header (vocabulary and merges included) read to plan the choice of file
NOMINAL_BANDWIDTH_GBS = 10.0  # the choice uses the plan's memory, not its speed: skip measuring bandwidth

# (file name, bytes done, bytes total or None) for each downloaded chunk
ProgressFn = Callable[[str, int, Union[int, None]], None]
Progress = Union[bool, ProgressFn]

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_QUANT = re.compile(r"^[\w.\-/]+$")
_NOT_A_REPO = (".gguf", ".onnx", ".json", ".bin", ".safetensors")
_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "https://hf.co/", "hf.co/")
# quantization in a GGUF file name: Q4_K_M, q8_0, IQ4_XS, Q4_0_4_4, TQ1_0, BF16, F16, MXFP4, UD-Q4_K_XL (unsloth)
_QUANT_IN_NAME = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q[1-8](?:_[A-Z0-9]{1,4})*|TQ[12]_0|BF16|F16|F32|FP16|FP32|MXFP4(?:_MOE)?))"
    r"(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_ONNX_MARKERS = ("edgelm.json", "genai_config.json")
_SKIP_FILES = (".gitattributes",)


# --- references ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """``ORG/REPO[:QUANT]`` as typed (an ``hf.co/`` or ``huggingface.co/`` prefix is dropped)."""

    repo_id: str
    quant: str | None = None

    @property
    def name(self) -> str:
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id

    def __str__(self) -> str:
        return self.name


def parse_reference(text: Any) -> Reference | None:
    """The :class:`Reference` in ``text``, or None when it does not look like ``ORG/REPO[:QUANT]`` (a file name such as
    ``dir/model.gguf`` is not one).  Whether a path of that name exists is for the caller to check first."""
    if not isinstance(text, str):
        return None
    s = text.strip()
    for prefix in _PREFIXES:
        if s.lower().startswith(prefix):
            s = s[len(prefix):]
            break
    repo, sep, quant = s.partition(":")
    if not _REPO.match(repo) or repo.lower().endswith(_NOT_A_REPO) or ".." in repo:
        return None
    if sep and (not quant or not _QUANT.match(quant) or ".." in quant):
        return None
    quant = quant or None
    if quant is not None and quant.lower() == "latest":  # Ollama's default tag: the best that fits
        quant = None
    return Reference(repo, quant)


# --- environment (read at each call, never at import) ----------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "huggingface" / "hub"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _hf():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise BackendNotInstalledError(
            "Models by name (ORG/REPO[:QUANT]) need huggingface-hub, which is not installed.",
            fix='Install it with: pip install "edgelm[hub]" (or pass a local file or folder).') from exc
    return huggingface_hub


def _storage(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


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


def _match(ref: Reference, cands: list[Candidate]) -> list[Candidate]:
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


def _fits(c: Candidate, facts: Any, device: str, host: Any) -> tuple[Any, int | None]:
    """(the plan for running ``c`` as it is on ``device`` by recommend()'s memory arithmetic, or None if it does not
    fit without converting to a smaller quantization; the device's usable memory)."""
    from .plan import recommend

    f = dataclasses.replace(facts, path=c.entry, quantization=c.label, weight_bytes=c.size_bytes)
    try:
        plan = recommend(f, device, host=host, bandwidth_gbs=NOMINAL_BANDWIDTH_GBS)
    except DoesNotFitError as exc:
        return None, getattr(exc, "available", None)
    return (None if plan.needs_conversion else plan), plan.device_memory_bytes


def choose(ref: Reference, cands: list[Candidate], *, facts: Callable[[Candidate], Any] | None = None,
           device: str = "auto", host: Any = None, where: str = "") -> Choice:
    """Pick what to fetch for ``ref`` among ``cands``: by ``ref.quant`` if given, else the largest GGUF that fits
    ``device`` (``facts(candidate)`` gives the model's :class:`edgelm.plan.ModelFacts`, read from one header)."""
    where = where or ref.repo_id
    if not cands:
        raise HubError(f"{where} has no GGUF file and no ONNX folder (edgelm.json / genai_config.json) to run.",
                       fix=f"If it is a Hugging Face checkpoint, convert it: edgelm convert {ref.repo_id} --quant "
                       f"q4_k_m -o model-q4_k_m.gguf", repo=ref.repo_id)
    if ref.quant:
        found = _match(ref, cands)
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
    if device == "auto" and host is None:
        from .platforms import detect

        host = detect()
    available = None
    for c in usable:  # largest (best quality) first
        plan, available = _fits(c, base, device, host)
        if plan is not None:
            return Choice(c, f"{c.label} ({human_bytes(c.size_bytes)}): the largest quantization in {where} "
                             f"that fits {plan.device_title}, needing {human_bytes(plan.memory_bytes)} of "
                             f"{human_bytes(plan.device_memory_bytes)} usable at n_ctx {plan.n_ctx}.")
    smallest = usable[-1]
    room = f" ({human_bytes(available)} usable)" if available is not None else ""
    raise DoesNotFitError(
        f"No quantization in {where} fits {device if device != 'auto' else 'this machine'}{room}: even the "
        f"smallest, {smallest.label} ({human_bytes(smallest.size_bytes)}), needs more once its KV cache and the "
        "runtime are counted (with the head-room `edgelm recommend` keeps).",
        fix=f"Pull one anyway by name ({ref.repo_id}:{smallest.label}), or use a smaller model.", repo=ref.repo_id,
        available=available)


def _facts_from_prefix(read_prefix: Callable[[int], bytes], size: int, name: str) -> Any:
    """:class:`edgelm.plan.ModelFacts` of a GGUF of ``size`` bytes from its first bytes only.  The prefix is written
    into a sparse file of the full size, so the ordinary header reader (which checks the tensor table against the
    file size) reads it; more is fetched until the header ends inside what was fetched."""
    from .plan import model_facts
    from .formats.gguf import read_header

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
                    return model_facts(path)
            except InvalidModelFileError:
                if len(data) >= size:
                    raise
            if n >= min(size, MAX_HEADER_BYTES):
                raise HubError(f"Could not read the GGUF header of {name} from its first {human_bytes(n)}.",
                               fix="Name the quantization to pull (ORG/REPO:QUANT).")
            n *= 4


# --- the cache -------------------------------------------------------------------------------------------

def _snapshot_files(snapshot: Path) -> dict[str, int]:
    out = {}
    for p in snapshot.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():  # follows the symlink to the blob; a broken one is skipped
                out[p.relative_to(snapshot).as_posix()] = p.stat().st_size
    return out


def _cached_commits(storage: Path, revision: str | None) -> list[str]:
    snapshots = storage / "snapshots"
    if not snapshots.is_dir():
        return []
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return [revision] if (snapshots / revision).is_dir() else []
    ref = storage / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
        return [commit] if (snapshots / commit).is_dir() else []
    if revision:
        return []
    # pulled only at other revisions: the newest snapshot
    return [p.name for p in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True) if p.is_dir()]


@dataclass
class Pulled:
    """What :func:`pull_model` fetched (or found in the cache)."""

    path: Path  # the .gguf (first part) or the ONNX folder, in the cache's snapshot folder
    reference: Reference
    candidate: Candidate
    revision: str  # commit
    reason: str
    downloaded_bytes: int = 0
    from_cache: bool = False

    @property
    def name(self) -> str:
        """The name it is served and listed under: ORG/REPO:QUANT."""
        return f"{self.reference.repo_id}:{self.candidate.label}" if self.candidate.label else self.reference.repo_id


def find_cached(ref: Reference | str, revision: str | None = None, *, device: str = "auto", host: Any = None,
                verify: bool = True) -> Pulled | None:
    """``ref`` in the Hugging Face cache (no network), checked against its sha256; None if it is not there."""
    ref = _as_reference(ref)
    cache = hf_cache_dir()
    storage = _storage(cache, ref.repo_id)
    for commit in _cached_commits(storage, revision):
        snapshot = storage / "snapshots" / commit
        cands = [c for c in candidates(_snapshot_files(snapshot)) if not c.missing]
        if ref.quant:
            found = _match(ref, cands)
            if len(found) != 1:
                continue
            choice = Choice(found[0], f"{found[0].label or 'the ONNX folder'} from the cache.")
        elif not cands:
            continue
        else:
            try:
                choice = choose(ref, cands, facts=lambda c: _local_facts(snapshot, c), device=device, host=host,
                                where=f"the cached copy of {ref.repo_id}")
            except (HubError, DoesNotFitError):
                continue
        c = choice.candidate
        if verify:
            for f in c.files:
                verify_cached(snapshot / f, f"{ref.repo_id}:{c.label}" if c.label else ref.repo_id)
        path = snapshot / c.entry if c.entry != "." else snapshot
        return Pulled(path, ref, c, commit, choice.reason, from_cache=True)
    return None


def _local_facts(snapshot: Path, c: Candidate) -> Any:
    from .plan import model_facts

    return model_facts(snapshot / c.entry)


def cached_labels(ref: Reference) -> list[str]:
    storage = _storage(hf_cache_dir(), ref.repo_id)
    labels: set[str] = set()
    for commit in _cached_commits(storage, None):
        labels |= {c.label or "(top folder)" for c in candidates(_snapshot_files(storage / "snapshots" / commit))
                   if not c.missing}
    return sorted(labels)


# --- checking files --------------------------------------------------------------------------------------

def _digest(path: Path, etag: str, progress: Progress = False) -> str:
    """sha256 (LFS files) or git blob sha1 (small files), as the Hub's etag for the file is one or the other."""
    size = path.stat().st_size
    if len(etag) == 40:
        h = hashlib.sha1(b"blob %d\0" % size)  # noqa: S324 - git's object id, not a security hash
    else:
        h = hashlib.sha256()
    bar = _bar(progress, f"checking {path.name[:24]}", size) if size > (256 << 20) else None
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def _checkable(etag: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", etag))


def _blob_of(pointer: Path) -> Path:
    """The repository's ``blobs/<etag>`` entry a snapshot file links to: the first symlink hop only (that entry may
    itself link into huggingface_hub's shared store, whose names are Xet hashes, not sha256)."""
    if not pointer.is_symlink():
        return pointer  # no symlinks on this system: huggingface_hub copied the file into the snapshot
    return Path(os.path.abspath(pointer.parent / os.readlink(pointer)))


def verify_cached(pointer: Path, name: str = "ORG/REPO:QUANT") -> None:
    """Check a cached file against the sha256 (or git blob id) its blob is named after, once per change of the blob
    (remembered in edgelm's store index).  A mismatch deletes the blob and the snapshot's link to it and raises."""
    from . import store

    blob = _blob_of(pointer)
    etag = blob.name
    if not _checkable(etag) or store.is_verified(blob, etag):
        return
    actual = _digest(blob, etag)
    if actual != etag:
        with contextlib.suppress(OSError):
            blob.unlink()
        with contextlib.suppress(OSError):
            pointer.unlink()
        raise DownloadCorruptError(
            f"The cached file {pointer} does not match its {'sha256' if len(etag) == 64 else 'git id'} ({actual} "
            f"instead of {etag}): it was truncated or corrupted, and has been deleted.",
            fix=f"Pull it again: edgelm pull {name}", path=str(pointer), expected=etag, actual=actual)
    store.mark_verified(blob, etag)


# --- downloading -----------------------------------------------------------------------------------------

class _CallbackBar:
    """The small part of tqdm's interface huggingface_hub's downloader uses, reporting to a callable."""

    def __init__(self, fn: ProgressFn, desc: str = "", total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.fn, self.desc, self.total, self.n = fn, desc, total, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        self.fn(self.desc, self.n, self.total)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_CallbackBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _SilentBar(_CallbackBar):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(lambda *a: None, **kwargs)


def _bar_class(progress: Progress, name: str) -> Any:
    if progress is True:
        from huggingface_hub.utils import tqdm as hf_tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS, TTY detection

        return hf_tqdm
    if callable(progress):
        return lambda **kw: _CallbackBar(progress, **{**kw, "desc": name})
    return _SilentBar


def _bar(progress: Progress, desc: str, total: int) -> Any:
    return _bar_class(progress, desc)(desc=desc, total=total, initial=0, unit="B", unit_scale=True)


def _note(progress: Progress, message: str) -> None:
    log.info(message)
    if progress is True:
        print(message, file=sys.stderr, flush=True)


def _fetch_file(repo_id: str, filename: str, commit: str, *, cache: Path, endpoint: str, token: Any,
                progress: Progress) -> tuple[Path, int]:
    """One file of ``repo_id`` at ``commit`` into the cache: (snapshot path, bytes downloaded now).  Resumes a
    partial ``blobs/<etag>.incomplete``; checks the sha256 (LFS) or git blob id before the blob is put in place."""
    from huggingface_hub import file_download, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    from . import store

    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token, library_name="edgelm")
    meta = file_download.get_hf_file_metadata(url, token=token, headers=headers, endpoint=endpoint,
                                              timeout=API_TIMEOUT_S)
    etag, size = meta.etag, meta.size
    if not etag:
        raise HubError(f"The Hub sent no ETag for {filename} of {repo_id}.", fix="Check HF_ENDPOINT.", repo=repo_id)
    storage = _storage(cache, repo_id)
    blob = storage / "blobs" / etag
    lock = cache / ".locks" / storage.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    downloaded = 0
    with WeakFileLock(str(lock)):
        if blob.exists():
            if _checkable(etag) and not store.is_verified(blob, etag):
                if _digest(blob, etag, progress) != etag:
                    blob.unlink()  # a damaged blob left by someone else: download it afresh below
                else:
                    store.mark_verified(blob, etag)
        if not blob.exists():
            location = meta.location or url
            if _origin(location) != _origin(url):
                headers.pop("authorization", None)  # never send the token to a CDN
            downloaded = _download(location, blob.with_name(etag + ".incomplete"), size, headers, filename, repo_id,
                                   progress)
            partial = blob.with_name(etag + ".incomplete")
            if _checkable(etag):
                actual = _digest(partial, etag, progress)
                if actual != etag:
                    partial.unlink()
                    raise DownloadCorruptError(
                        f"{filename} from {repo_id} does not match its {'sha256' if len(etag) == 64 else 'git id'} "
                        f"({actual} instead of {etag}): the download was corrupted, and has been deleted.",
                        fix="Pull it again; if this repeats, the mirror or proxy (HF_ENDPOINT) serves a bad copy.",
                        repo=repo_id, file=filename, expected=etag, actual=actual)
            elif size is not None and partial.stat().st_size != size:
                partial.unlink()
                raise DownloadCorruptError(f"{filename} from {repo_id} has {partial.stat().st_size} bytes instead of "
                                           f"{size}; it has been deleted.", fix="Pull it again.", repo=repo_id)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(partial, 0o666 & ~umask)  # readable by whoever may read the cache, like huggingface_hub's blobs
            os.replace(partial, blob)
            if _checkable(etag):
                store.mark_verified(blob, etag)
    # huggingface_hub links the snapshot entry to the blob now in place (its own cache bookkeeping)
    pointer = hf_hub_download(repo_id, filename, revision=commit, cache_dir=str(cache), endpoint=endpoint,
                              token=token, library_name="edgelm")
    return Path(pointer), downloaded


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlparse

    u = urlparse(url)
    return u.scheme, (u.hostname or "").lower(), u.port


def _download(url: str, partial: Path, size: int | None, headers: dict[str, str], filename: str, repo_id: str,
              progress: Progress) -> int:
    import httpx2
    from huggingface_hub import file_download
    from huggingface_hub.errors import HfHubHTTPError

    resume = partial.stat().st_size if partial.exists() else 0
    if size is not None and resume > size:
        resume = 0
    mode = "r+b" if resume else "wb"
    try:
        with open(partial, mode) as fh:
            fh.truncate(resume)
            fh.seek(resume)
            if resume:
                _note(progress, f"resuming {filename} at {human_bytes(resume)} of {human_bytes(size or 0)}")
            file_download.http_get(url, fh, resume_size=resume, headers=headers, expected_size=size,
                                   displayed_filename=filename, tqdm_class=_bar_class(progress, filename))
    except (httpx2.HTTPError, HfHubHTTPError, OSError) as exc:
        have = partial.stat().st_size if partial.exists() else 0
        raise HubError(
            f"Downloading {filename} from {repo_id} stopped at {human_bytes(have)} of {human_bytes(size or 0)} ({exc}).",
            fix="The part already downloaded is kept: run the same command again to resume.", repo=repo_id,
            file=filename, downloaded=have) from exc
    return (size or partial.stat().st_size) - resume


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def _as_reference(ref: Reference | str) -> Reference:
    if isinstance(ref, Reference):
        return ref
    parsed = parse_reference(ref)
    if parsed is None:
        raise InvalidParameterError(
            f"{ref!r} is not a model name of the form ORG/REPO[:QUANT].",
            fix="Use e.g. bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M, or pass a local path.",
            parameter="model", value=ref)
    return parsed


def _offline_error(ref: Reference, revision: str | None, why: str) -> HubError:
    have = cached_labels(ref)
    also = f" The cache has {', '.join(have)} of it." if have else ""
    return HubError(
        f"{ref.name}{'@' + revision if revision else ''} is not in the Hugging Face cache ({hf_cache_dir()}) and "
        f"{why}.{also}",
        fix=f"Pull it once while online (edgelm pull {ref.name}), copy a Hugging Face cache that has it (HF_HOME), "
        "or unset HF_HUB_OFFLINE.", repo=ref.repo_id)


def pull_model(ref: Reference | str, revision: str | None = None, *, device: str = "auto", progress: Progress = True,
               host: Any = None, token: Any = None) -> Pulled:
    """Fetch ``ORG/REPO[:QUANT]`` at ``revision`` (default main) into the Hugging Face cache and return what was
    fetched.  Offline (HF_HUB_OFFLINE=1) or with the Hub unreachable, the cached copy is used.  ``device``: choose
    the quantization for this profile instead of this machine ("raspberry-pi-5-8gb")."""
    ref = _as_reference(ref)
    hf = _hf()
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if hub_offline():
        found = find_cached(ref, revision, device=device, host=host)
        if found is None:
            raise _offline_error(ref, revision, "HF_HUB_OFFLINE is set")
        return found
    endpoint, cache = hub_endpoint(), hf_cache_dir()
    import httpx2

    try:
        info = hf.HfApi(endpoint=endpoint, token=token, library_name="edgelm").model_info(
            ref.repo_id, revision=revision, files_metadata=True, timeout=API_TIMEOUT_S)
    except GatedRepoError as exc:
        raise HubError(f"{ref.repo_id} is gated: its licence must be accepted on the Hub first.",
                       fix=f"Accept it at {endpoint}/{ref.repo_id} and set HF_TOKEN to a token of that account.",
                       repo=ref.repo_id) from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"{ref.name} is not a file or folder here, and the Hugging Face Hub has no repository "
                       f"{ref.repo_id!r} (or it is private).",
                       fix="Check the name (ORG/REPO[:QUANT]); for a private repository set HF_TOKEN.",
                       repo=ref.repo_id) from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{ref.repo_id} has no revision {revision!r}.", fix="Use a branch, tag or commit it has.",
                       repo=ref.repo_id) from exc
    except (httpx2.HTTPError, HfHubHTTPError, OfflineModeIsEnabled) as exc:
        found = find_cached(ref, revision, device=device, host=host)
        if found is None:
            raise _offline_error(ref, revision, f"the Hub cannot be reached ({type(exc).__name__}: {exc})") from exc
        _note(progress, f"The Hub cannot be reached ({type(exc).__name__}); using the cached {found.name}.")
        return found
    commit = info.sha
    if not commit:
        raise HubError(f"The Hub did not say which commit {ref.repo_id} is at.", fix="Check HF_ENDPOINT.",
                       repo=ref.repo_id)
    files = {s.rfilename: int(s.size or (s.lfs.size if s.lfs else 0) or 0) for s in info.siblings or []}
    cands = candidates(files)

    def remote_facts(c: Candidate) -> Any:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(ref.repo_id, c.entry, revision=commit, endpoint=endpoint)
        headers = build_hf_headers(token=token, library_name="edgelm")

        def read_prefix(n: int) -> bytes:
            with get_session().stream("GET", url, headers={**headers, "Range": f"bytes=0-{n - 1}"},
                                      timeout=API_TIMEOUT_S, follow_redirects=True) as r:
                hf_raise_for_status(r)
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) >= n:  # a server that ignores Range: stop reading
                        break
                return bytes(data[:n])

        return _facts_from_prefix(read_prefix, files[c.entry], c.entry)

    choice = choose(ref, cands, facts=remote_facts, device=device, host=host)
    c = choice.candidate
    if c.missing:
        raise HubError(f"{ref.repo_id} lacks parts of the split file {c.entry}: {', '.join(c.missing)}.",
                       fix="Pick another quantization.", repo=ref.repo_id)
    _note(progress, f"{ref.repo_id}: {choice.reason}")
    downloaded = 0
    pointers = []
    for f in c.files:
        pointer, n = _fetch_file(ref.repo_id, f, commit, cache=cache, endpoint=endpoint, token=token,
                                 progress=progress)
        pointers.append(pointer)
        downloaded += n
    storage = _storage(cache, ref.repo_id)
    _write_ref(storage, revision or "main", commit)
    snapshot = storage / "snapshots" / commit
    path = snapshot / c.entry if c.entry != "." else snapshot
    return Pulled(path, ref, c, commit, choice.reason, downloaded_bytes=downloaded)


def pull(reference: str, revision: str | None = None, *, device: str = "auto", progress: Progress = True,
         host: Any = None) -> Path:
    """Download ``ORG/REPO[:QUANT]`` from the Hugging Face Hub into its cache and return the path edgelm.load
    takes: the .gguf (the first part of a split file) or the ONNX folder.

    QUANT (case-insensitive) picks the GGUF file by the quantization in its name, or names an ONNX sub-folder;
    without it, the largest GGUF quantization that fits this device's memory is chosen (one line on stderr says
    why).  ``revision``: a branch, tag or commit.  ``progress``: True (bars on stderr), False, or a callable
    ``(file name, bytes done, bytes total)``.  Offline (HF_HUB_OFFLINE=1) the cache is used, and a model not in it
    raises :class:`~edgelm.errors.HubError` saying how to get it.
    """
    return pull_model(reference, revision, device=device, progress=progress, host=host).path


def resolve_reference(text: Any, *, progress: Progress = True) -> Path | None:
    """The hook behind ``edgelm.load("ORG/REPO[:QUANT]")``: None if ``text`` is not such a name; else the cached
    copy (checked, no network), or a fresh pull."""
    ref = parse_reference(text)
    if ref is None:
        return None
    if not hub_offline():  # (offline, pull_model looks in the cache and says what is missing)
        found = find_cached(ref)
        if found is not None:
            return found.path
    return pull_model(ref, progress=progress).path


def served_reference(text: str, name: str | None = None) -> tuple[str, str] | None:
    """The hook behind ``edgelm serve ORG/REPO[:QUANT]``: (path, served name) or None if ``text`` is an existing
    path or not a name.  A model is served under the name as typed (``NAME=ORG/REPO:QUANT`` to choose another)."""
    if Path(text).expanduser().exists():
        return None
    ref = parse_reference(text)
    if ref is None:
        return None
    path = resolve_reference(text)
    assert path is not None
    return str(path), name or ref.name


# --- listing and removing cached models ------------------------------------------------------------------

@dataclass
class CachedModel:
    name: str
    format: str
    quant: str | None
    size_bytes: int
    path: Path
    repo_id: str
    revision: str
    refs: list[str]
    files: list[Any]  # huggingface_hub CachedFileInfo


def cached_models() -> list[CachedModel]:
    """GGUF files and ONNX folders in the Hugging Face cache (huggingface_hub's cache scan), complete ones only."""
    _hf()
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except (CacheNotFound, ValueError):
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            by_path = {f.file_path.relative_to(rev.snapshot_path).as_posix(): f for f in rev.files}
            for c in candidates({p: f.size_on_disk for p, f in by_path.items()}):
                if c.missing:
                    continue
                name = f"{repo.repo_id}:{c.label}" if c.label else repo.repo_id
                path = rev.snapshot_path / c.entry if c.entry != "." else rev.snapshot_path
                out.append(CachedModel(name, c.format, c.quant, c.size_bytes, path, repo.repo_id, rev.commit_hash,
                                       sorted(rev.refs), [by_path[p] for p in c.files]))
    return out


def remove_cached(ref: Reference) -> list[Path]:
    """Remove ``ref`` from the Hugging Face cache through huggingface_hub's cache API: ``ORG/REPO`` every revision,
    ``ORG/REPO:QUANT`` that quantization's files (a revision left empty goes too).  Returns the paths removed."""
    _hf()
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = hf_cache_dir()
    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, ValueError):
        return []
    repos = [r for r in info.repos if r.repo_type == "model" and r.repo_id.lower() == ref.repo_id.lower()]
    if not repos:
        return []
    if ref.quant is None:
        revisions = [rev for r in repos for rev in r.revisions]
        info.delete_revisions(*(rev.commit_hash for rev in revisions)).execute()
        return [r.repo_path for r in repos]
    matched = [m for m in cached_models() if m.repo_id.lower() == ref.repo_id.lower()
               and (m.quant or "").lower() == ref.quant.lower() or m.name.lower() == ref.name.lower()]
    if not matched:
        return []
    files = [f for m in matched for f in m.files]
    info.delete_files(*files).execute()
    removed = [m.path for m in matched]
    # a revision with nothing left in it goes too (with its refs), so the cache stays consistent
    info = scan_cache_dir(cache)
    empty = [rev.commit_hash for r in info.repos if r.repo_id.lower() == ref.repo_id.lower()
             for rev in r.revisions if not rev.files]
    if empty:
        info.delete_revisions(*empty).execute()
    return removed


