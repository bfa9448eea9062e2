"""Downloading from the Hub: ``edgelm pull`` and loading ``ORG/REPO[:QUANT]`` by name.

Downloads go through huggingface_hub (its HTTP client, headers, token, progress bars and cache layout).  Unlike
``hf_hub_download`` (which starts a killed download over), a partial download is kept as
``blobs/<sha256>.incomplete`` and resumed with a range request; every file is checked against its LFS sha256 (or git
blob id) before it is used, and one that does not match is deleted and reported
(:class:`~edgelm.errors.DownloadCorruptError`).  Loading by name uses the cached copy without asking the Hub;
``edgelm pull`` asks for the newest revision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import DownloadCorruptError, HubError
from ..plan import RECOMMEND_DEFAULTS, ModelFacts
from ..store_index import is_verified, mark_verified
from ..units import human_bytes
from .cache import Pulled, cached_labels, find_cached, hf, hf_cache_dir, hub_endpoint, hub_offline, storage_dir
from .choice import Candidate, candidates, choose, facts_from_prefix
from .progress import Progress, bar_class, note
from .reference import Reference, as_reference, parse_reference
from .verify import checkable, digest

API_TIMEOUT_S = 10.0


def _fetch_file(repo_id: str, filename: str, commit: str, *, cache: Path, endpoint: str, token: Any,
                progress: Progress) -> tuple[Path, int]:
    """One file of ``repo_id`` at ``commit`` into the cache: (snapshot path, bytes downloaded now).  Resumes a
    partial ``blobs/<etag>.incomplete``; checks the sha256 (LFS) or git blob id before the blob is put in place."""
    from huggingface_hub import file_download, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token, library_name="edgelm")
    meta = file_download.get_hf_file_metadata(url, token=token, headers=headers, endpoint=endpoint,
                                              timeout=API_TIMEOUT_S)
    etag, size = meta.etag, meta.size
    if not etag:
        raise HubError(f"The Hub sent no ETag for {filename} of {repo_id}.", fix="Check HF_ENDPOINT.", repo=repo_id)
    storage = storage_dir(cache, repo_id)
    blob = storage / "blobs" / etag
    lock = cache / ".locks" / storage.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    downloaded = 0
    with WeakFileLock(str(lock)):
        if blob.exists():
            if checkable(etag) and not is_verified(blob, etag):
                if digest(blob, etag, progress) != etag:
                    blob.unlink()  # a damaged blob left by someone else: download it afresh below
                else:
                    mark_verified(blob, etag)
        if not blob.exists():
            location = meta.location or url
            if _origin(location) != _origin(url):
                headers.pop("authorization", None)  # never send the token to a CDN
            downloaded = _download(location, blob.with_name(etag + ".incomplete"), size, headers, filename, repo_id,
                                   progress)
            partial = blob.with_name(etag + ".incomplete")
            if checkable(etag):
                actual = digest(partial, etag, progress)
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
            if checkable(etag):
                mark_verified(blob, etag)
    # huggingface_hub links the snapshot entry to the blob now in place (its own cache bookkeeping)
    pointer = hf_hub_download(repo_id, filename, revision=commit, cache_dir=str(cache), endpoint=endpoint,
                              token=token, library_name="edgelm")
    return Path(pointer), downloaded


def _origin(url: str) -> tuple[str, str, int | None]:
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
    try:
        with open(partial, "r+b" if resume else "wb") as fh:
            fh.truncate(resume)
            fh.seek(resume)
            if resume:
                note(progress, f"resuming {filename} at {human_bytes(resume)} of {human_bytes(size or 0)}")
            file_download.http_get(url, fh, resume_size=resume, headers=headers, expected_size=size,
                                   displayed_filename=filename, tqdm_class=bar_class(progress, filename))
    except (httpx2.HTTPError, HfHubHTTPError, OSError) as exc:
        have = partial.stat().st_size if partial.exists() else 0
        raise HubError(
            f"Downloading {filename} from {repo_id} stopped at {human_bytes(have)} of {human_bytes(size or 0)} "
            f"({exc}).",
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


def _offline_error(ref: Reference, revision: str | None, why: str) -> HubError:
    have = cached_labels(ref)
    also = f" The cache has {', '.join(have)} of it." if have else ""
    return HubError(
        f"{ref.name}{'@' + revision if revision else ''} is not in the Hugging Face cache ({hf_cache_dir()}) and "
        f"{why}.{also}",
        fix=f"Pull it once while online (edgelm pull {ref.name}), copy a Hugging Face cache that has it (HF_HOME), "
        "or unset HF_HUB_OFFLINE.", repo=ref.repo_id)


def pull_model(ref: Reference | str, revision: str | None = None, *, profile: str = RECOMMEND_DEFAULTS.profile,
               progress: Progress = True, host: Any = None, token: Any = None) -> Pulled:
    """Fetch ``ORG/REPO[:QUANT]`` at ``revision`` (default main) into the Hugging Face cache and return what was
    fetched.  Offline (HF_HUB_OFFLINE=1) or with the Hub unreachable, the cached copy is used.  ``profile``: choose
    the quantization for this device profile instead of this machine ("raspberry-pi-5-8gb")."""
    ref = as_reference(ref)
    hub = hf()
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if hub_offline():
        found = find_cached(ref, revision, profile=profile, host=host)
        if found is None:
            raise _offline_error(ref, revision, "HF_HUB_OFFLINE is set")
        return found
    endpoint, cache = hub_endpoint(), hf_cache_dir()
    import httpx2

    try:
        info = hub.HfApi(endpoint=endpoint, token=token, library_name="edgelm").model_info(
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
        found = find_cached(ref, revision, profile=profile, host=host)
        if found is None:
            raise _offline_error(ref, revision, f"the Hub cannot be reached ({type(exc).__name__}: {exc})") from exc
        note(progress, f"The Hub cannot be reached ({type(exc).__name__}); using the cached {found.name}.")
        return found
    commit = info.sha
    if not commit:
        raise HubError(f"The Hub did not say which commit {ref.repo_id} is at.", fix="Check HF_ENDPOINT.",
                       repo=ref.repo_id)
    files = {s.rfilename: int(s.size or (s.lfs.size if s.lfs else 0) or 0) for s in info.siblings or []}
    cands = candidates(files)

    def remote_facts(c: Candidate) -> ModelFacts:
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

        return facts_from_prefix(read_prefix, files[c.entry], c.entry)

    choice = choose(ref, cands, facts=remote_facts, profile=profile, host=host)
    c = choice.candidate
    if c.missing:
        raise HubError(f"{ref.repo_id} lacks parts of the split file {c.entry}: {', '.join(c.missing)}.",
                       fix="Pick another quantization.", repo=ref.repo_id)
    note(progress, f"{ref.repo_id}: {choice.reason}")
    downloaded = 0
    pointers = []
    for f in c.files:
        pointer, n = _fetch_file(ref.repo_id, f, commit, cache=cache, endpoint=endpoint, token=token,
                                 progress=progress)
        pointers.append(pointer)
        downloaded += n
    storage = storage_dir(cache, ref.repo_id)
    _write_ref(storage, revision or "main", commit)
    snapshot = storage / "snapshots" / commit
    path = snapshot / c.entry if c.entry != "." else snapshot
    return Pulled(path, ref, c, commit, choice.reason, downloaded_bytes=downloaded)


def pull(reference: str, revision: str | None = None, *, profile: str = RECOMMEND_DEFAULTS.profile,
         progress: Progress = True, host: Any = None) -> Path:
    """Download ``ORG/REPO[:QUANT]`` from the Hugging Face Hub into its cache and return the path edgelm.load
    takes: the .gguf (the first part of a split file) or the ONNX folder.

    QUANT (case-insensitive) picks the GGUF file by the quantization in its name, or names an ONNX sub-folder;
    without it, the largest GGUF quantization that fits this machine's memory (or the device ``profile``'s) is
    chosen (one line on stderr says why).  ``revision``: a branch, tag or commit.  ``progress``: True (bars on stderr), False, or a callable
    ``(file name, bytes done, bytes total)``.  Offline (HF_HUB_OFFLINE=1) the cache is used, and a model not in it
    raises :class:`~edgelm.errors.HubError` saying how to get it.
    """
    return pull_model(reference, revision, profile=profile, progress=progress, host=host).path


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
