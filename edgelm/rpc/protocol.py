"""Talking to a worker before llama.cpp does: endpoints, and a handshake in plain Python.

llama.cpp's RPC client aborts the process when a worker is unreachable, and its reads never time out.  Asking the
worker here first, with a timeout, turns those cases into :class:`WorkerUnreachableError` naming ``host:port``, and
gives the memory the plan splits the layers by.  The messages are those of ggml-rpc protocol 7 (ggml-rpc.cpp):
a request is ``| command (1 byte) | size (8 bytes, little-endian) | payload |``, a response ``| size (8) | payload |``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from edgelm.errors import InvalidParameterError, WorkerUnreachableError

DEFAULT_PORT = 50052
PROTOCOL_MAJOR = 7  # RPC_PROTO_MAJOR_VERSION of the llama.cpp edgelm ships with (llama-cpp-python 0.3.36)
CONNECT_TIMEOUT_S = 3.0

CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE: transport capabilities (RDMA); all zero = plain TCP


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def spec(self) -> str:
        """What llama.cpp's ggml_backend_rpc_add_server takes (it splits at the first colon: no IPv6 literals)."""
        return f"{self.host}:{self.port}"


def parse_endpoint(text: Any, *, parameter: str = "workers") -> Endpoint:
    """``host:port`` (or ``host``, port 50052) -> Endpoint; a bad one raises InvalidParameterError naming it."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidParameterError(f"Invalid worker address: {text!r}.", fix="Give workers as HOST:PORT, e.g. "
                                    "192.168.1.20:50052.", parameter=parameter, value=text)
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = value, str(DEFAULT_PORT)
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536 or any(c.isspace() for c in host):
        raise InvalidParameterError(f"Invalid worker address: {text!r}.",
                                    fix="Give workers as HOST:PORT with a port from 1 to 65535, e.g. 192.168.1.20:50052.",
                                    parameter=parameter, value=text)
    if ":" in host:
        raise InvalidParameterError(f"Worker {text!r}: llama.cpp's RPC client cannot reach IPv6 addresses.",
                                    fix="Use the worker's IPv4 address or a host name.", parameter=parameter,
                                    value=text)
    return Endpoint(host, port)


def parse_workers(value: Any) -> list[Endpoint]:
    """workers=["h:p", ...] or "h:p,h:p" -> endpoints, in order, without duplicates (a duplicate is an error)."""
    if value is None:
        return []
    items: list[Any] = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.extend(p for p in item.split(",") if p.strip())
        else:
            parts.append(item)
    endpoints = [parse_endpoint(p) for p in parts]
    seen = set()
    for e in endpoints:
        if e in seen:
            raise InvalidParameterError(f"Worker {e} is listed twice.", fix="Name each worker once.",
                                        parameter="workers", value=str(e))
        seen.add(e)
    return endpoints


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class WorkerInfo:
    """What a worker said about itself."""

    endpoint: Endpoint
    version: tuple[int, int, int]
    devices: list[tuple[int, int]] = field(default_factory=list)  # (free, total) bytes per device
    address: tuple[str, int] | None = None  # the IP and port connected to
    seconds: float = 0.0  # the whole exchange (connect + 3 round trips)

    @property
    def free(self) -> int:
        return sum(f for f, _ in self.devices)

    @property
    def total(self) -> int:
        return sum(t for _, t in self.devices)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _call(sock: socket.socket, cmd: int, payload: bytes, expect: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != expect:
        raise ConnectionError(f"unexpected answer size {size} (expected {expect})")
    return _recv_exact(sock, size)


def query(endpoint: Endpoint | str, *, timeout: float = CONNECT_TIMEOUT_S) -> WorkerInfo:
    """Connect to a worker, shake hands and ask its devices' memory, all within ``timeout`` seconds per step.

    Raises WorkerUnreachableError (refused, timed out, no such host, busy with another client, another protocol)."""
    ep = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    start = time.perf_counter()
    fix = (f"Start the worker on that machine (edgelm worker --host ADDRESS --port {ep.port}), check the address, "
           "and that no firewall blocks the port.")
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
    except socket.gaierror as exc:
        raise WorkerUnreachableError(f"Worker {ep}: the host name does not resolve ({exc.strerror}).",
                                     fix="Check the address.", endpoint=str(ep)) from exc
    except (socket.timeout, TimeoutError) as exc:
        raise WorkerUnreachableError(f"Worker {ep} did not accept a connection within {timeout:g} s.", fix=fix,
                                     endpoint=str(ep)) from exc
    except OSError as exc:
        raise WorkerUnreachableError(f"Worker {ep} is unreachable: {exc.strerror or exc}.", fix=fix,
                                     endpoint=str(ep)) from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = sock.getpeername()[:2]
        try:
            hello = _call(sock, CMD_HELLO, bytes(CONN_CAPS_SIZE), 4 + CONN_CAPS_SIZE)
            version = (hello[0], hello[1], hello[2])
            if version[0] != PROTOCOL_MAJOR:
                raise WorkerUnreachableError(
                    f"Worker {ep} speaks llama.cpp RPC protocol {'.'.join(map(str, version))}; this edgelm speaks "
                    f"{PROTOCOL_MAJOR}.x.", fix="Run the worker from the same llama-cpp-python version as this machine.",
                    endpoint=str(ep))
            (count,) = struct.unpack("<I", _call(sock, CMD_DEVICE_COUNT, b"", 4))
            devices = []
            for i in range(count):
                free, total = struct.unpack("<QQ", _call(sock, CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
                devices.append((free, total))
        except (socket.timeout, TimeoutError) as exc:
            raise WorkerUnreachableError(
                f"Worker {ep} accepted the connection but did not answer within {timeout:g} s: it serves one client "
                "at a time, and another one (another edgelm, or a connection that died without closing) holds it.",
                fix="Stop the other client, or restart the worker.", endpoint=str(ep)) from exc
        except (ConnectionError, OSError) as exc:
            raise WorkerUnreachableError(
                f"Worker {ep} closed the connection during the handshake ({exc}): it may be another program, or a "
                f"llama.cpp RPC server of another protocol version (this edgelm speaks {PROTOCOL_MAJOR}.x).",
                fix="Run `edgelm worker` there, from the same llama-cpp-python version as this machine.",
                endpoint=str(ep)) from exc
    finally:
        sock.close()
    return WorkerInfo(ep, version, devices, (address[0], int(address[1])), time.perf_counter() - start)


def query_all(endpoints: Sequence[Endpoint], *, timeout: float = CONNECT_TIMEOUT_S) -> list[WorkerInfo]:
    """query() every worker at once (threads): the slowest, not the sum, bounds the wait."""
    from concurrent.futures import ThreadPoolExecutor

    if not endpoints:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(endpoints))) as pool:
        futures = [pool.submit(query, e, timeout=timeout) for e in endpoints]
        return [f.result() for f in futures]


def reachable(endpoint: Endpoint, *, timeout: float = 1.0) -> str | None:
    """None when a TCP connection to the worker opens within ``timeout``, else why not (a liveness probe that sends
    nothing: the worker's next client simply sees a closed connection)."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            return None
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def resolve(endpoints: Iterable[Endpoint]) -> list[tuple[str, int]]:
    """Every (ip, port) each endpoint's host resolves to (to find the sockets llama.cpp opened to them)."""
    out = []
    for e in endpoints:
        try:
            for info in socket.getaddrinfo(e.host, e.port, type=socket.SOCK_STREAM):
                out.append((info[4][0], e.port))
        except OSError:
            pass
    return out


def part_name(endpoint: Endpoint, index: int, count: int) -> str:
    """A part's name: the worker's host:port, with #i when the worker has several devices (GPUs)."""
    return str(endpoint) if count == 1 else f"{endpoint}#{index}"
