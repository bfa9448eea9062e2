"""A model split across llama.cpp RPC workers, for real: `edgelm worker` processes on loopback (and in network
namespaces as stand-in hosts, where the test may create them), the embedded SmolLM2, greedy tokens compared with a
local run; and the faults: a worker killed mid-generation, a worker's link going silent, the server meanwhile."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from edgelm import errors

from .helpers import raw_greedy, stop_process

pytestmark = pytest.mark.slow

PROMPT = "The three primary colours are"
N_TOKENS = 24
MB = 1024**2


@pytest.fixture(scope="module", autouse=True)
def rpc_available():
    import edgelm.rpc

    facts = edgelm.rpc.availability()
    if not facts["available"]:  # the README's test command builds it (edgelm install-rpc)
        pytest.fail(f"llama.cpp's RPC backend is not available here: {facts}. Run: edgelm install-rpc")


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): a worker restarted on its port must not find it taken
    meanwhile as the local end of some outgoing connection."""
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


class Worker:
    """`edgelm worker` in its own process (optionally inside a network namespace)."""

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", mem: str | None = None,
                 netns: str | None = None, cache: str | None = None, threads: int = 1) -> None:
        self.host, self.port = host, port or free_port()
        cmd = [sys.executable, "-m", "edgelm", "worker", "--host", host, "--port", str(self.port),
               "--threads", str(threads)]
        if mem:
            cmd += ["--mem", mem]
        if cache:
            cmd += ["--cache", cache]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "EDGELM_DEBUG": ""})
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if "edgelm worker listening on" in line:  # (llama.cpp's own stdout shares the pipe)
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 90
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("worker did not start:\n" + "\n".join(self.lines))

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workers():
    started: list[Worker] = []

    def start(*args, **kwargs) -> Worker:
        w = Worker(*args, **kwargs)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


@pytest.fixture(scope="module")
def local_tokens(default_gguf):
    import edgelm

    with edgelm.load(default_gguf, n_ctx=512, threads=1) as m:
        return raw_greedy(m, m.tokenize(PROMPT), N_TOKENS)


def _split_tokens(default_gguf, endpoints, **kwargs):
    import edgelm

    with edgelm.load(default_gguf, n_ctx=512, threads=1, workers=endpoints, **kwargs) as m:
        return raw_greedy(m, m.tokenize(PROMPT), N_TOKENS), m.info.extra["rpc"], m.info.extra["process"]


@pytest.mark.timeout(960)
def test_two_capped_workers_split_the_model_and_give_the_local_tokens(default_gguf, local_tokens, workers):
    # at n_ctx 512 the model needs ~230 MB away from here (weights, KV cache, the logits buffer of the output
    # layer): 180 MB each (162 MB usable) forces a split between the two
    a, b = workers(mem="180MB"), workers(mem="180MB")
    tokens, rpc, process = _split_tokens(default_gguf, [a.endpoint, b.endpoint])
    assert tokens == local_tokens
    assert process["pid"] != os.getpid()
    here, pa, pb = rpc["parts"]
    assert [p["device"] for p in rpc["parts"]] == ["this machine", a.endpoint, b.endpoint]
    assert here["n_layers"] == 0 and here["input_layer"] and rpc["policy"] == "memory"
    assert pa["n_layers"] > 0 and pb["n_layers"] > 0 and pa["n_layers"] + pb["n_layers"] == 30
    assert (pa["first_layer"], pb["last_layer"]) == (0, 29) and pb["output_layer"] and not pa["output_layer"]
    for p in (pa, pb):  # what llama.cpp allocated there stayed under what the worker offered
        assert 0 < p["model_bytes"] and p["model_bytes"] + p["kv_bytes"] + p["compute_bytes"] <= 180 * MB
        assert p["reported_free_bytes"] == 180 * MB


@pytest.mark.timeout(720)
def test_tensor_split_puts_layers_here_and_on_the_worker(default_gguf, local_tokens, workers):
    w = workers()
    tokens, rpc, _ = _split_tokens(default_gguf, [w.endpoint], tensor_split=[1, 1])
    assert tokens == local_tokens
    here, there = rpc["parts"]
    assert rpc["policy"] == "tensor_split" and here["n_layers"] == 16 and there["n_layers"] == 14
    assert there["output_layer"] and here["model_bytes"] > there["model_bytes"] / 2


@pytest.mark.timeout(720)
def test_killed_worker_fails_the_generation_within_10_s_and_a_later_load_retries(default_gguf, workers):
    import edgelm

    w = workers()
    m = edgelm.load(default_gguf, n_ctx=512, threads=1, workers=[w.endpoint])
    assert m.health()["status"] == "ok"
    stream = m.stream(PROMPT, max_tokens=400, temperature=0)
    next(stream)
    w.kill()
    start = time.monotonic()
    with pytest.raises(errors.WorkerLostError) as exc:
        for _ in stream:
            pass
    assert time.monotonic() - start < 10
    assert w.endpoint in str(exc.value) and exc.value.endpoint == w.endpoint
    assert m.health()["status"] == "lost"
    with pytest.raises(errors.WorkerLostError):  # at once, not another 10 s
        m.generate("x", max_tokens=2)
    m.close()
    with pytest.raises(errors.WorkerUnreachableError, match=w.endpoint):  # the worker is still gone
        edgelm.load(default_gguf, n_ctx=512, workers=[w.endpoint])
    back = workers(w.port)  # restarted: the next load works
    with edgelm.load(default_gguf, n_ctx=512, threads=1, workers=[back.endpoint]) as m2:
        assert m2.generate(PROMPT, max_tokens=4, temperature=0).usage.completion_tokens == 4


@pytest.mark.timeout(960)
def test_server_stays_up_reports_degraded_and_reloads(default_gguf, workers):
    import httpx

    w = workers()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = shutil.which("edgelm")
    cmd = [exe] if exe else [sys.executable, "-m", "edgelm"]
    server = subprocess.Popen([*cmd, "serve", "--port", str(port), "--n-ctx", "512", "--threads", "1", "--workers",
                               w.endpoint], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        body = {"model": "smollm2-135m-instruct", "prompt": PROMPT, "max_tokens": 400, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            w.kill()
            start = time.monotonic()
            rest = list(lines)
        assert time.monotonic() - start < 10
        errors_seen = [json.loads(line[6:]) for line in rest if line.startswith("data: {") and '"error"' in line]
        assert errors_seen and "worker" in errors_seen[-1]["error"]["message"].lower()
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["status"] == "degraded" and health["degraded"]["smollm2-135m-instruct"]["status"] == "lost"
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_unreachable"
        workers(w.port)  # the worker is back: the next request loads the model again
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        stop_process(server)


@pytest.mark.timeout(480)
def test_worker_binds_loopback_and_warns_loudly_on_another_address(workers):
    w = workers()
    assert any("edgelm worker listening on 127.0.0.1:" in line for line in w.lines)
    port = free_port()
    exposed = subprocess.Popen([sys.executable, "-m", "edgelm", "worker", "--host", "0.0.0.0", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "listening on" not in out:  # the banner comes once it listens
            line = exposed.stdout.readline()
            if not line:
                break
            if "edgelm worker listening on" in line:
                out = line
    finally:
        exposed.kill()
        _, err = exposed.communicate(timeout=10)
    assert "edgelm worker listening on 0.0.0.0:" in out
    assert "WARNING" in err and "NO authentication" in err


@pytest.mark.timeout(960)
def test_worker_tensor_cache_keeps_large_weights_between_loads(default_gguf, workers, tmp_path):
    cache = tmp_path / "rpc-cache"
    w = workers(cache=str(cache))
    _split_tokens(default_gguf, [w.endpoint])
    files = list(cache.iterdir())
    # the output head (a copy of the 28.7 MB token embedding) is the one tensor of this model above 10 MB
    assert len(files) == 1 and files[0].stat().st_size > 10 * MB


# --- separate network namespaces as stand-in hosts ---------------------------------------------------------------

NS = ("edgelm-rpc-a", "edgelm-rpc-b")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def hosts():
    """Two network namespaces joined to this one by veth pairs: 10.231.1.2 and 10.231.2.2 (we are 10.231.x.1)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    for ns in NS:
        _ip("netns", "del", ns)
    made = []
    try:
        for i, ns in enumerate(NS, start=1):
            host_if, ns_if = f"erpc{i}h", f"erpc{i}n"
            _ip("link", "del", host_if)
            steps = [("netns", "add", ns), ("link", "add", host_if, "type", "veth", "peer", "name", ns_if),
                     ("link", "set", ns_if, "netns", ns), ("addr", "add", f"10.231.{i}.1/24", "dev", host_if),
                     ("link", "set", host_if, "up"),
                     ("-n", ns, "addr", "add", f"10.231.{i}.2/24", "dev", ns_if), ("-n", ns, "link", "set", ns_if, "up"),
                     ("-n", ns, "link", "set", "lo", "up")]
            for step in steps:
                r = _ip(*step)
                if r.returncode != 0:
                    pytest.skip(f"cannot create network namespaces here: ip {' '.join(step)}: {r.stderr.strip()}")
            made.append((ns, host_if))
        yield [(ns, f"10.231.{i}.2", host_if) for i, (ns, host_if) in enumerate(made, start=1)]
    finally:
        for ns, host_if in made:
            _ip("link", "del", host_if)
            _ip("netns", "del", ns)


@pytest.mark.timeout(1200)
def test_workers_on_two_stand_in_hosts(default_gguf, local_tokens, workers, hosts):
    (ns_a, ip_a, _), (ns_b, ip_b, link_b) = hosts
    a = workers(50052, host=ip_a, mem="180MB", netns=ns_a)
    b = workers(50052, host=ip_b, mem="180MB", netns=ns_b)
    tokens, rpc, _ = _split_tokens(default_gguf, [a.endpoint, b.endpoint])
    assert tokens == local_tokens
    assert all(p["n_layers"] > 0 for p in rpc["parts"][1:])


@pytest.mark.timeout(1200)
def test_a_worker_whose_link_goes_silent_fails_within_10_s(default_gguf, workers, hosts):
    """No FIN, no RST: the host just stops answering (cable, power, Wi-Fi).  TCP keep-alive and a user timeout on
    llama.cpp's sockets end the connection; without them its read would wait forever."""
    import edgelm

    (ns_a, ip_a, link_a), _ = hosts
    w = workers(50052, host=ip_a, netns=ns_a)
    m = edgelm.load(default_gguf, n_ctx=512, threads=1, workers=[w.endpoint])
    try:
        stream = m.stream(PROMPT, max_tokens=400, temperature=0)
        next(stream)
        assert _ip("link", "set", link_a, "down").returncode == 0
        start = time.monotonic()
        with pytest.raises(errors.WorkerLostError, match=w.endpoint):
            for _ in stream:
                pass
        assert time.monotonic() - start < 10
    finally:
        m.close()
