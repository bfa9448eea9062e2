"""A tiny pure-Python backend and a fake RPC worker for the fast tests of edgelm.rpc and runtimes.isolated."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, ClassVar, Sequence

from edgelm.errors import InvalidModelFileError, InvalidParameterError
from edgelm.runtimes.base import BackendBase, Capabilities, LoadOptions, Seq


class _Sampler:
    def close(self) -> None:
        pass


class CountingBackend(BackendBase):
    """Tokens are bytes; the next token is always the last one + 1; token 0 ends generation."""

    name: ClassVar[str] = "counting"

    def __init__(self) -> None:
        self.capabilities = Capabilities(max_sequences=2, scoring=False)
        self.n_ctx = 64
        self.bos_token, self.eos_token = "", ""
        self.chat_template = None
        self.n_vocab = 256
        self._make_sequences(2)
        self.closed = False

    @classmethod
    def load(cls, path: Path, options: LoadOptions) -> "CountingBackend":
        if Path(path).name == "broken.bin":
            raise InvalidModelFileError(f"{path} is broken.", fix="Use another file.", path=str(path))
        return cls()

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])

    def is_eog(self, token: int) -> bool:
        return token == 0

    def extend(self, seq: Seq, tokens: Sequence[int]) -> None:
        seq.tokens.extend(tokens)

    def rewind(self, seq: Seq, n: int) -> bool:
        del seq.tokens[n:]
        return True

    def sampler(self, params: Any, history: Sequence[int]) -> _Sampler:
        return _Sampler()

    def sample(self, seq: Seq, sampler: Any) -> int:
        return (seq.tokens[-1] + 1) % 256

    def tokens_of(self, seq: Seq) -> list[int]:
        return list(seq.tokens)

    def fail_typed(self) -> None:
        raise InvalidParameterError("bad value 7.", fix="Use 8.", parameter="x", value=7)

    def fail_plain(self) -> None:
        raise ZeroDivisionError("1/0")

    def die(self) -> None:
        os.abort()

    def hang(self) -> None:
        import time

        time.sleep(3600)

    def describe(self) -> dict[str, Any]:
        return {"format": "bytes", "architecture": "counting", "quantization": "none", "parameters": 0,
                "extra": {"pid": os.getpid()}}

    def close(self) -> None:
        self.closed = True


class FakeWorker:
    """A TCP server speaking the part of ggml-rpc protocol 7 edgelm asks before loading (HELLO, DEVICE_COUNT,
    GET_DEVICE_MEMORY); or, with ``mode``, one that misbehaves: "silent" (accepts, never answers), "close" (closes at
    once), "old" (answers HELLO with protocol 3.0.0)."""

    def __init__(self, free: Sequence[int] = (8 * 1024**3,), mode: str = "ok") -> None:
        self.free = list(free)
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.clients.append(conn)
            if self.mode == "silent":
                continue
            if self.mode == "close":
                conn.close()
                continue
            try:
                while True:
                    cmd, size = struct.unpack("<BQ", self._recv(conn, 9))
                    payload = self._recv(conn, size)
                    if cmd == 14:
                        major = 3 if self.mode == "old" else 7
                        out = bytes([major, 0, 0, 0]) + bytes(24)
                    elif cmd == 15:
                        out = struct.pack("<I", len(self.free))
                    elif cmd == 11:
                        (i,) = struct.unpack("<I", payload)
                        out = struct.pack("<QQ", self.free[i], self.free[i])
                    else:
                        break
                    conn.sendall(struct.pack("<Q", len(out)) + out)
            except (ConnectionError, OSError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.clients:
            try:
                c.close()
            except OSError:
                pass
