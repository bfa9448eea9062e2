"""edgelm.rpc without llama.cpp: endpoints, the worker handshake (against a fake worker), the split planner, the
cluster plan, settings and error tables, and the child-process backend (runtimes.isolated) with a pure-Python one."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from edgelm import errors
from edgelm.rpc import protocol, split
from tests.rpc_fakes import FakeWorker

ROOT = Path(__file__).resolve().parent.parent
MB = 1024**2


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- endpoints --------------------------------------------------------------------------------------------------

def test_parse_workers_accepts_lists_commas_and_default_port():
    eps = protocol.parse_workers(["10.0.0.1:50052", "pi2.local:6000,pi3"])
    assert [str(e) for e in eps] == ["10.0.0.1:50052", "pi2.local:6000", "pi3:50052"]
    assert protocol.parse_workers("a:1,b:2") == [protocol.Endpoint("a", 1), protocol.Endpoint("b", 2)]


@pytest.mark.parametrize("bad", ["host:", "host:0", "host:70000", "host:port", "a b:1", "::1:5", 5])
def test_parse_workers_rejects_bad_addresses_naming_them(bad):
    with pytest.raises(errors.InvalidParameterError) as exc:
        protocol.parse_workers([bad])
    assert exc.value.parameter == "workers" and "HOST:PORT" in str(exc.value) or "IPv6" in str(exc.value)


def test_duplicate_worker_is_an_error():
    with pytest.raises(errors.InvalidParameterError, match="twice"):
        protocol.parse_workers(["a:1", "a:1"])


# --- the handshake, against a fake worker -------------------------------------------------------------------------

def test_query_reads_version_and_memory_of_every_device():
    w = FakeWorker(free=[3 * 1024**3, 512 * MB])
    try:
        info = protocol.query(w.endpoint, timeout=2)
        assert info.version == (7, 0, 0)
        assert info.devices == [(3 * 1024**3, 3 * 1024**3), (512 * MB, 512 * MB)]
        assert info.free == 3 * 1024**3 + 512 * MB
    finally:
        w.close()


def test_unreachable_worker_is_a_typed_error_naming_it_quickly():
    port = free_port()
    start = time.perf_counter()
    with pytest.raises(errors.WorkerUnreachableError) as exc:
        protocol.query(f"127.0.0.1:{port}", timeout=2)
    assert f"127.0.0.1:{port}" in str(exc.value) and exc.value.endpoint == f"127.0.0.1:{port}"
    assert isinstance(exc.value, ConnectionError)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("mode, words", [("silent", "did not answer within"), ("close", "closed the connection"),
                                         ("old", "protocol 3.0.0")])
def test_misbehaving_worker_is_a_typed_error_within_the_timeout(mode, words):
    w = FakeWorker(mode=mode)
    try:
        start = time.perf_counter()
        with pytest.raises(errors.WorkerUnreachableError, match=words):
            protocol.query(w.endpoint, timeout=0.5)
        assert time.perf_counter() - start < 3
    finally:
        w.close()


@pytest.mark.slow  # a child process or the llama.cpp import: ~1-3 s
def test_load_with_an_unreachable_worker_fails_before_loading(default_gguf):
    import edgelm

    port = free_port()
    with pytest.raises(errors.WorkerUnreachableError, match=f"127.0.0.1:{port}"):
        edgelm.load(default_gguf, workers=[f"127.0.0.1:{port}"])
    with pytest.raises(errors.InvalidParameterError, match="tensor_split"):
        edgelm.load(default_gguf, tensor_split=[1, 1])


@pytest.mark.slow  # a child process or the llama.cpp import: ~1-3 s
def test_worker_short_of_memory_is_refused_by_the_plan_before_loading(default_gguf):
    import edgelm

    tiny = [FakeWorker(free=[40 * MB]), FakeWorker(free=[40 * MB])]
    try:
        with pytest.raises(errors.DoesNotFitError) as exc:  # embeddings here, every layer on 2 x 40 MB: too small
            edgelm.load(default_gguf, workers=[w.endpoint for w in tiny], tensor_split=[0, 1, 1], n_ctx=512)
        assert tiny[0].endpoint in str(exc.value) and "needs" in str(exc.value)
    finally:
        for w in tiny:
            w.close()


# --- the split --------------------------------------------------------------------------------------------------

def costs(n_layer: int = 10, layer: int = 10 * MB, output: int = 20 * MB, logits: int = 30 * MB) -> split.ModelCosts:
    return split.ModelCosts(n_layer=n_layer, layer_weights=(layer,) * n_layer, layer_kv=1 * MB, input_bytes=20 * MB,
                            output_bytes=output, logits_bytes=logits, layer_compute=4 * MB, local_compute=2 * MB)


def test_split_puts_every_layer_on_the_workers_by_reported_memory():
    s = split.plan_split(costs(), [("a", 10_000 * MB), ("b", 10_000 * MB)], local_memory=10_000 * MB)
    assert s.counts == [0, 6, 5] and s.n_gpu_layers == 11 and s.tensor_split == [6.0, 5.0]
    here, a, b = s.parts
    assert here.input and not here.output and here.layers == 0
    assert (a.first_layer, a.last_layer, a.output) == (0, 5, False)
    assert (b.first_layer, b.last_layer, b.output) == (6, 9, True)  # the output layer goes with the last layers
    s = split.plan_split(costs(), [("a", 3000 * MB), ("b", 1000 * MB)])
    assert s.counts[1] > s.counts[2] > 0


def test_split_respects_each_workers_cap_and_keeps_the_rest_here():
    # a can hold ~3 layers, b ~4 layers plus the output and the logits: the rest stays on this machine
    s = split.plan_split(costs(), [("a", 40 * MB), ("b", 120 * MB)], local_memory=10_000 * MB)
    assert s.fits and s.counts[0] > 0 and sum(s.counts) == 11
    for p in s.parts[1:]:
        assert p.bytes <= p.budget
    assert any("stay on this machine" in n for n in s.notes)


def test_split_that_cannot_fit_names_each_device_short_of_memory():
    with pytest.raises(errors.DoesNotFitError) as exc:
        split.plan_split(costs(), [("a", 30 * MB)], local_memory=100 * MB)
    assert "this machine" in str(exc.value) and "needs" in str(exc.value)
    s = split.plan_split(costs(), [("a", 30 * MB)], local_memory=100 * MB, check=False)
    assert not s.fits


def test_tensor_split_sets_the_shares_here_first():
    s = split.plan_split(costs(), [("a", 10**12), ("b", 10**12)], tensor_split=[1, 2, 1])
    assert s.counts == [3, 5, 3] and s.policy == "tensor_split"
    assert s.parts[0].first_layer == 0 and s.parts[0].last_layer == 2
    exact = split.plan_split(costs(), [("a", 10**12), ("b", 10**12)], tensor_split=[float(c) for c in s.counts])
    assert exact.counts == s.counts  # counts given back as shares give the same counts (what the child receives)


@pytest.mark.parametrize("bad", [[1, 1], [1, -1, 1], "1,x,1", [0, 0, 0], [float("nan"), 1, 1], 3])
def test_bad_tensor_split_is_refused_with_the_expected_length(bad):
    with pytest.raises(errors.InvalidParameterError, match="3 non-negative shares"):
        split.parse_tensor_split(bad, 2)
    assert split.parse_tensor_split("0,1,1", 2) == [0.0, 1.0, 1.0]


def test_model_costs_of_the_embedded_model_match_what_llama_cpp_allocated(header):
    """Figures llama.cpp printed for this file (SmolLM2 Q4_1, n_ctx 512, 16/14 layers on two RPC workers):
    model buffers 33.82 MiB and 58.28 MiB, KV 6.00 / 5.25 MiB, the output device's compute buffer 103.67 MiB."""
    c = split.model_costs(header, 512)
    s = split.plan_split(c, [("a", 10**12), ("b", 10**12)], tensor_split=[0, 16, 15])
    a, b = s.parts[1:]
    assert a.weights_bytes == pytest.approx(33.82 * MB, rel=0.01)
    assert b.weights_bytes == pytest.approx(58.28 * MB, rel=0.01)
    assert a.kv_bytes == pytest.approx(6.00 * MB, rel=0.01) and b.kv_bytes == pytest.approx(5.25 * MB, rel=0.01)
    assert 0.95 < b.compute_bytes / (103.67 * MB) < 1.2  # an estimate; never under by more than 5 %


# --- cluster plans --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def header(default_gguf):
    from edgelm.formats.gguf import read_header

    return read_header(default_gguf)


def test_cluster_plan_for_four_boards_fits_and_counts_the_network(header):
    from edgelm.cluster import recommend_cluster

    plan = recommend_cluster(header, "raspberry-pi-5-4gb", workers=3)
    assert plan.fits and len(plan.parts) == 4 and plan.workers == ["worker 1", "worker 2", "worker 3"]
    assert sum(p.layers for p in plan.parts) == 30 and plan.parts[-1].output
    ether = plan.seconds_per_token["network"]
    wifi = recommend_cluster(header, "raspberry-pi-5-4gb", workers=3, link="wifi")
    assert wifi.seconds_per_token["network"] > 3 * ether > 0 and wifi.tokens_per_second < plan.tokens_per_second
    alone = recommend_cluster(header, "raspberry-pi-5-4gb", workers=0)
    assert alone.seconds_per_token["network"] == 0 and alone.tokens_per_second > plan.tokens_per_second
    assert plan.load_kwargs()["tensor_split"] == [float(p.layers + p.output) for p in plan.parts]


def test_cluster_plan_says_when_the_boards_are_too_small(header):
    from edgelm.cluster import recommend_cluster

    plan = recommend_cluster(header, "raspberry-pi-zero-2-w", workers=1, worker_profile="raspberry-pi-zero-2-w",
                             n_ctx=100_000)
    assert plan.n_ctx < 100_000  # it shrinks the context before giving up
    fits = recommend_cluster(header, "raspberry-pi-zero-2-w", workers=1)
    assert fits.fits


@pytest.mark.slow  # a child process or the llama.cpp import: ~1-3 s
def test_recommend_cli_with_workers(default_gguf):
    from tests.conftest import run_cli

    r = run_cli("recommend", str(default_gguf), "--profile", "raspberry-pi-5-4gb", "--workers", "3", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "worker 3" in r.stdout and "tokens/s" in r.stdout and "round trip" in r.stdout


# --- settings, error tables -------------------------------------------------------------------------------------

def test_workers_and_tensor_split_are_load_settings_on_every_command():
    from click.testing import CliRunner

    from edgelm.cli import main

    for command in ("run", "chat", "serve", "bench"):
        out = CliRunner().invoke(main, [command, "--help"]).output
        assert "--workers" in out and "--tensor-split" in out, command


def test_worker_errors_map_to_an_exit_code_and_http_503():
    from edgelm.cli import exit_code_for
    from edgelm.server.errors import status_for

    lost = errors.WorkerLostError("gone", endpoint="h:1")
    assert exit_code_for(errors.WorkerUnreachableError("x")) == 11 == exit_code_for(lost)
    assert status_for(lost) == 503 and status_for(errors.WorkerUnreachableError("x")) == 503


def test_worker_settings_are_checked():
    from edgelm.rpc.worker import configure, parse_size

    assert parse_size("2GB") == 2 * 1024**3 and parse_size("512mb") == 512 * MB and parse_size("1.5G") == int(1.5 * 1024**3)
    for bad in ("lots", "0", -1):
        with pytest.raises(errors.InvalidParameterError, match="mem"):
            parse_size(bad)
    with pytest.raises(errors.InvalidParameterError, match="port"):
        configure(port=0)
    with pytest.raises(errors.InvalidParameterError, match="host"):
        configure(host="::1")


# --- the child-process backend ------------------------------------------------------------------------------------

@pytest.fixture
def isolated():
    from edgelm.runtimes.isolated import IsolatedBackend
    from edgelm.runtimes.base import LoadOptions

    started = []

    def start(path: str = "model.bin", on_exit=None):
        b = IsolatedBackend.start("tests.rpc_fakes:CountingBackend", Path(path), LoadOptions(threads=1),
                                  on_exit=on_exit, env={"PYTHONPATH": str(ROOT)})
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()


@pytest.mark.slow  # a child process or the llama.cpp import: ~1-3 s
def test_isolated_backend_forwards_the_protocol_and_keeps_sequences_in_step(isolated):
    from edgelm.params import GenerationParams

    b = isolated()
    assert b.n_ctx == 64 and b.capabilities.max_sequences == 2 and len(b.sequences) == 2
    assert b.describe()["extra"]["pid"] != os.getpid()
    seq = b.sequences[1]
    ids = b.tokenize("ab", add_special=True, parse_special=False)
    gen = b.generate(seq, ids, GenerationParams(temperature=0))
    out = [next(gen) for _ in range(3)]
    gen.close()
    assert out == [99, 100, 101]
    assert seq.tokens == b.tokens_of(seq) == [97, 98, 99, 100]  # the last sampled token was never evaluated
    assert b.token_bytes(100) == b"d" and not b.is_eog(100)
    gen = b.generate(seq, [97, 98, 99, 100, 120], GenerationParams(temperature=0))  # prefix reuse happens in the child
    assert next(gen) == 121 and seq.reused == 4
    gen.close()
    assert b.sequences[0].tokens == []


@pytest.mark.slow  # a child process or the llama.cpp import: ~1-3 s
def test_isolated_backend_raises_the_childs_errors_typed(isolated):
    b = isolated()
    with pytest.raises(errors.InvalidParameterError) as exc:
        b.fail_typed()
    assert exc.value.parameter == "x" and exc.value.value == 7 and exc.value.fix == "Use 8."
    with pytest.raises(errors.BackendError, match="ZeroDivisionError"):
        b.fail_plain()
    with pytest.raises(AttributeError):
        b.no_such_method  # noqa: B018 - only the child's methods are forwarded
    with pytest.raises(errors.InvalidModelFileError, match="broken"):
        isolated("broken.bin")


@pytest.mark.slow  # a child process or the llama.cpp import: ~1-3 s
def test_isolated_backend_survives_the_child_aborting(isolated):
    class Gone(errors.BackendError):
        pass

    b = isolated(on_exit=lambda reason: Gone(f"child ended: {reason}"))
    start = time.perf_counter()
    with pytest.raises(Gone, match="SIGABRT"):
        b.die()
    assert time.perf_counter() - start < 5
    assert b.health()["status"] == "lost"
    with pytest.raises(Gone):  # and every later call, at once
        b.tokenize("x", add_special=False, parse_special=False)
    b.close()


@pytest.mark.slow  # two processes
def test_isolated_child_does_not_outlive_its_parent_even_when_stuck(tmp_path):
    import signal
    import subprocess

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from edgelm.runtimes.isolated import IsolatedBackend\n"
        "from edgelm.runtimes.base import LoadOptions\n"
        f"b = IsolatedBackend.start('tests.rpc_fakes:CountingBackend', Path('m'), LoadOptions(threads=1), "
        f"env={{'PYTHONPATH': {str(ROOT)!r}}})\n"
        "print(b.child_pid, flush=True)\n"
        "b.hang()\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")
