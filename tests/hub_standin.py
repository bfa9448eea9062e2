"""A local stand-in of the Hugging Face Hub's HTTP routes that huggingface_hub's client uses, for tests.

Routes (as read from huggingface_hub 2.4's source: hf_api.model_info / list_repo_tree, file_download.
get_hf_file_metadata / http_get / hf_hub_download):
  GET  /api/models/{org}/{name}[/revision/{rev}][?blobs=true]   repo info: sha (commit) and siblings (size, lfs)
  GET  /api/models/{org}/{name}/tree/{rev}[/{path}]              tree listing (snapshot_download)
  HEAD/GET /{org}/{name}/resolve/{rev}/{path}                    small files: 200 with ETag (git blob id),
                                                                 X-Repo-Commit; LFS files: 302 to the "CDN" with
                                                                 X-Linked-Etag (sha256), X-Linked-Size,
                                                                 X-Repo-Commit, ETag, Location
  Errors: 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, as the Hub sends them.
The "CDN" is a second server on another port (another origin, as on the real Hub: the client stops at the 302 and
reads the metadata from it, then downloads from the CDN without the token): GET/HEAD /blobs/{sha256}, with range
requests (206, Content-Range).  A test can cut a download part way (the connection closes after N bytes, the next
request gets an error status once) or serve a corrupted byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse

LFS_SUFFIXES = (".gguf", ".onnx", ".data", ".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's object id


@dataclass
class HubFile:
    path: str
    source: bytes | Path
    lfs: bool
    size: int = 0
    sha256: str = ""
    oid: str = ""  # git blob id of the file (small files) or of its LFS pointer

    def __post_init__(self) -> None:
        h = hashlib.sha256()
        if isinstance(self.source, Path):
            self.size = self.source.stat().st_size
            with open(self.source, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
        else:
            self.size = len(self.source)
            h.update(self.source)
        self.sha256 = h.hexdigest()
        if self.lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
            self.oid = git_blob_id(pointer.encode())
        else:
            self.oid = git_blob_id(self.read(0, self.size))

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.source, bytes):
            return self.source[start:end]
        with open(self.source, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)


@dataclass
class Repo:
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


class FakeHub:
    """Two servers on 127.0.0.1 (the Hub and its CDN).  ``with FakeHub() as hub: hub.add("org/repo", {...})``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, HubFile] = {}
        self.log: list[tuple[str, str, str, str | None]] = []  # (server, method, path, Range header)
        self.cuts: dict[str, list[Any]] = {}  # sha256 -> [cut at byte, status for the next request]
        self.corruptions: dict[str, int] = {}  # sha256 -> offset of the flipped byte
        self.bytes_served: dict[str, int] = {}
        self._lock = threading.Lock()
        self._n = 0
        self._conns: set[socket.socket] = set()
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, "hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, "cdn"))
        for server in (self.hub, self.cdn):
            server.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                         for s in (self.hub, self.cdn)]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop both servers and drop the connections clients keep alive (the Hub is gone, not just closed)."""
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # --- content ----------------------------------------------------------------------------------------

    def add(self, repo_id: str, files: dict[str, bytes | Path], *, lfs: bool | None = None,
            branch: str = "main") -> str:
        """A new commit of ``repo_id`` holding exactly ``files`` ({path: bytes or a file to serve}); returns its
        hash and moves ``branch`` to it."""
        with self._lock:
            self._n += 1
            commit = hashlib.sha1(f"{repo_id}-{self._n}".encode()).hexdigest()  # noqa: S324
        tree = {}
        for path, source in files.items():
            is_lfs = lfs if lfs is not None else path.endswith(LFS_SUFFIXES)
            f = HubFile(path, source, is_lfs)
            tree[path] = f
            if is_lfs:
                self.blobs[f.sha256] = f
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[commit] = tree
        repo.refs[branch] = commit
        return commit

    def file(self, repo_id: str, path: str, revision: str = "main") -> HubFile:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)][path]

    def cut(self, sha256: str, at: int, then_status: int = 503) -> None:
        """The next download of that blob stops after ``at`` bytes (connection closed); the request after that
        gets ``then_status`` once."""
        self.cuts[sha256] = [at, then_status]

    def corrupt(self, sha256: str, offset: int) -> None:
        self.corruptions[sha256] = offset

    def requests(self, server: str | None = None, method: str | None = None) -> list[tuple[str, str, str, str | None]]:
        return [r for r in self.log if (server is None or r[0] == server) and (method is None or r[1] == method)]


@contextlib.contextmanager
def online_hub(tmp_path: Path, monkeypatch: Any, *, private_caches: bool = False) -> Any:
    """A running :class:`FakeHub` that the real huggingface_hub client reaches through ``HF_ENDPOINT``, with the
    Hub's environment reset: online, no token, ``HF_HOME`` under ``tmp_path`` (and edgelm's and the XDG cache there
    too with ``private_caches``).  huggingface_hub fixes its offline switch when first imported, and another test may
    have imported it with HF_HUB_OFFLINE=1 set: that switch is turned off for the test (edgelm itself reads
    HF_HUB_OFFLINE at each call)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    if private_caches:
        monkeypatch.setenv("EDGELM_HOME", str(tmp_path / "edgelm"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


def _make_handler(hub: FakeHub, kind: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            hub._conns.add(self.connection)

        def finish(self) -> None:
            hub._conns.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def do_HEAD(self) -> None:
            self._handle(head=True)

        def do_GET(self) -> None:
            self._handle(head=False)

        # --- helpers --------------------------------------------------------------------------------------

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None,
                   head: bool = False) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(status, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message,
                                **(extra or {})}, body, head)

        def _handle(self, head: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.log.append((kind, self.command, path, self.headers.get("Range")))
            try:
                if kind == "cdn":
                    return self._cdn(path, head)
                if path.startswith("/api/models/"):
                    return self._api(path[len("/api/models/"):], parse_qs(url.query), head)
                parts = url.path.lstrip("/").split("/", 4)
                if len(parts) == 5 and parts[2] == "resolve":
                    return self._resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote(parts[4]), head)
                self._error(404, "NotFound", f"no route {path}", head=head)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _repo(self, repo_id: str, revision: str | None, head: bool) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head=head)
                return None
            rev = revision or "main"
            commit = repo.refs.get(rev, rev)
            if commit not in repo.commits:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
                return None
            return repo, commit

        # --- the Hub's API --------------------------------------------------------------------------------

        def _api(self, rest: str, query: dict[str, list[str]], head: bool) -> None:
            bits = rest.split("/")
            repo_id, tail = "/".join(bits[:2]), bits[2:]
            revision, tree_path = None, None
            if tail[:1] == ["revision"]:
                revision = "/".join(tail[1:])
            elif tail[:1] == ["tree"] and len(tail) >= 2:
                revision, tree_path = tail[1], "/".join(tail[2:])
            found = self._repo(repo_id, revision, head)
            if found is None:
                return
            repo, commit = found
            files = repo.commits[commit]
            if tree_path is not None:
                items = [{"type": "file", "oid": f.oid, "size": f.size, "path": f.path,
                          **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {})}
                         for f in files.values() if not tree_path or f.path.startswith(tree_path.rstrip("/") + "/")]
                return self._send(200, {"Content-Type": "application/json"}, json.dumps(items).encode(), head)
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for f in files.values():
                entry: dict[str, Any] = {"rfilename": f.path}
                if blobs:
                    entry.update(size=f.size, blobId=f.oid)
                    if f.lfs:
                        entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
                siblings.append(entry)
            info = {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "disabled": False, "gated": False, "tags": ["gguf"], "siblings": siblings}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)

        def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
            found = self._repo(repo_id, revision, head)
            if found is None:
                return
            repo, commit = found
            f = repo.commits[commit].get(path)
            if f is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                                   {"X-Repo-Commit": commit}, head)
            if f.lfs:
                return self._send(302, {
                    "Location": f"{hub.cdn_url}/blobs/{f.sha256}?name={quote(path)}",
                    "X-Repo-Commit": commit, "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                    "ETag": f'"{f.oid}"', "Content-Length": "0"}, head=head)
            body = f.read(0, f.size)
            self._send(200, {"ETag": f'"{f.oid}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                             "Content-Type": "application/octet-stream"}, body, head)

        # --- the CDN --------------------------------------------------------------------------------------

        def _cdn(self, path: str, head: bool) -> None:
            sha = path.rsplit("/", 1)[-1]
            f = hub.blobs.get(sha)
            if f is None or not path.startswith("/blobs/"):
                return self._send(404, {}, b"not found", head)
            cut = hub.cuts.get(sha)
            if cut is not None and cut[0] is None and not head:  # the request after a cut: an error, once
                del hub.cuts[sha]
                return self._send(cut[1], {"Content-Type": "text/plain"}, b"try again later", head)
            start, end = 0, f.size  # end exclusive
            status = 200
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, _, b = rng[len("bytes="):].partition("-")
                start = int(a) if a else 0
                end = int(b) + 1 if b else f.size
                end = min(end, f.size)
                if start >= f.size:
                    return self._send(416, {"Content-Range": f"bytes */{f.size}"}, b"", head)
                status = 206
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "ETag": f'"{sha}"',
                       "Content-Length": str(end - start)}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return
            stop = end
            if cut is not None and cut[0] is not None and start < cut[0] < end:
                stop = cut[0]
            pos = start
            while pos < stop:
                n = min(1 << 20, stop - pos)
                chunk = bytearray(f.read(pos, pos + n))
                off = hub.corruptions.get(sha)
                if off is not None and pos <= off < pos + n:
                    chunk[off - pos] ^= 0xFF
                self.wfile.write(chunk)
                hub.bytes_served[sha] = hub.bytes_served.get(sha, 0) + n
                pos += n
            if stop < end:  # cut the connection part way
                cut[0] = None
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    return Handler


# --- small valid GGUF files -----------------------------------------------------------------------------

def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def make_gguf(*, file_type: int = 15, n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_head_kv: int = 2,
              context_length: int = 512, n_vocab: int = 32, weight_bytes: int = 64 << 10, name: str = "tiny") -> bytes:
    """A small GGUF v3 file that edgelm's header reader accepts: llama architecture facts, a vocabulary, and F32
    tensors holding about ``weight_bytes`` (``general.file_type`` says which quantization it claims to be)."""
    kv: list[tuple[str, int, bytes]] = [
        ("general.architecture", 8, _gguf_string("llama")),
        ("general.name", 8, _gguf_string(name)),
        ("general.file_type", 4, struct.pack("<I", file_type)),
        ("llama.block_count", 4, struct.pack("<I", n_layer)),
        ("llama.context_length", 4, struct.pack("<I", context_length)),
        ("llama.embedding_length", 4, struct.pack("<I", n_embd)),
        ("llama.feed_forward_length", 4, struct.pack("<I", n_embd * 4)),
        ("llama.attention.head_count", 4, struct.pack("<I", n_head)),
        ("llama.attention.head_count_kv", 4, struct.pack("<I", n_head_kv)),
        ("tokenizer.ggml.model", 8, _gguf_string("gpt2")),
        ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, n_vocab) + b"".join(_gguf_string(f"t{i}")
                                                                              for i in range(n_vocab))),
    ]
    rows = max(1, (weight_bytes - n_embd * n_vocab * 4) // (n_embd * 4))
    tensors = [("token_embd.weight", (n_embd, n_vocab)), ("blk.0.ffn_up.weight", (n_embd, rows))]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, type_id, value in kv:
        out += _gguf_string(key) + struct.pack("<I", type_id) + value
    offset = 0
    datas = []
    for tname, shape in tensors:
        out += _gguf_string(tname) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", 0, offset)  # F32
        n = 4 * shape[0] * shape[1]
        datas.append(n)
        offset += (n + 31) // 32 * 32
    out += b"\0" * ((32 - len(out) % 32) % 32)
    for i, n in enumerate(datas):
        # deterministic, different per file (so each file has its own sha256)
        seed = hashlib.sha256(f"{name}-{file_type}-{i}".encode()).digest()
        out += (seed * (n // len(seed) + 1))[:n]
        out += b"\0" * ((32 - n % 32) % 32)
    return bytes(out)
