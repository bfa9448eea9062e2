"""The `edgelm` command, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json

import pytest

import edgelm

from .conftest import run_cli


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and edgelm.__version__ in r.stdout


def test_help_teaches_with_examples():
    r = run_cli("run", "--help")
    assert r.returncode == 0
    assert "Examples:" in r.stdout and "--temperature" in r.stdout and "--stop" in r.stdout


def test_info_json_reads_the_header(default_gguf):
    r = run_cli("info", str(default_gguf), "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["format"] == "gguf" and facts["architecture"] == "llama" and facts["quantization"] == "Q4_1"
    assert facts["context_length"] == 8192 and facts["parameters"] > 100_000_000


def test_info_without_model_describes_the_default():
    r = run_cli("info")
    assert r.returncode == 0 and "Q4_1" in r.stdout and "parameters" in r.stdout


def test_missing_model_is_a_one_line_error_with_the_path(tmp_path):
    r = run_cli("run", str(tmp_path / "absent.gguf"), "Hi")
    assert r.returncode == 3
    assert "absent.gguf" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bad_parameter_exit_code_and_message():
    r = run_cli("run", "Hi", "--temperature", "-1")
    assert r.returncode == 2
    assert "temperature" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_run_streams_an_answer_from_the_default_model():
    r = run_cli("run", "--system", "You are a helpful assistant.", "What is the capital of France?",
                "-t", "0", "-n", "24", "--stats")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr


@pytest.mark.slow
def test_run_raw_with_stop_and_stdin(default_gguf):
    r = run_cli("run", str(default_gguf), "-", "--raw", "-t", "0", "-n", "40", "--stop", "7", input="Count: 1, 2, 3,")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("4") and "7" not in r.stdout


@pytest.mark.slow
def test_context_overflow_exit_code(default_gguf):
    r = run_cli("run", str(default_gguf), "--raw", "--n-ctx", "256", "word " * 400)
    assert r.returncode == 6
    assert "context window" in r.stderr


@pytest.mark.slow
def test_chat_is_multi_turn_over_piped_input():
    r = run_cli("chat", "-t", "0", "-n", "12", "--system", "You are a helpful assistant.",
                input="What is the capital of France?\n/reset\nAnd of Italy?\n/bye\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "conversation cleared" in r.stderr
    assert len([line for line in r.stdout.splitlines() if line.strip()]) >= 2


@pytest.mark.slow
def test_quickstart_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"
    r = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stdout and "raw completion:" in r.stdout


def test_one_shot_context_covers_every_token_and_stays_below_the_default():
    from edgelm.runtimes.base import DEFAULT_MAX_CTX, context_for

    assert context_for(2, 1) == 256  # at least 256
    assert context_for(300, 16) == 512  # one token per byte at most, plus specials, rounded up to 256
    assert context_for(0, 248) == 256 and context_for(0, 249) == 512
    assert context_for(DEFAULT_MAX_CTX, 1) is None  # not smaller than the default: the default then
    assert context_for(100, 100, trained=256) is None  # nor than what the model was trained for


def _spy_loads(monkeypatch) -> list:
    from edgelm.cli import generate

    seen: list = []
    real = generate.loader.load

    def load(model, **kwargs):
        seen.append(kwargs.get("n_ctx"))
        return real(model, **kwargs)

    monkeypatch.setattr(generate.loader, "load", load)
    return seen


@pytest.mark.slow
def test_a_one_shot_run_loads_a_window_for_its_prompt_and_answer(default_gguf, monkeypatch):
    from click.testing import CliRunner

    from edgelm.cli import main

    loads = _spy_loads(monkeypatch)
    r = CliRunner().invoke(main, ["run", "--raw", str(default_gguf), "Once upon a time", "-n", "8", "-t", "0"])
    assert r.exit_code == 0, r.output
    assert loads == [256] and r.output.strip()
    loads.clear()
    r = CliRunner().invoke(main, ["run", "--raw", str(default_gguf), "Hi", "-n", "8", "--n-ctx", "1024"])
    assert r.exit_code == 0 and loads == [1024]  # a window the user asked for is theirs
    loads.clear()
    r = CliRunner().invoke(main, ["run", "--raw", str(default_gguf), "Hi"])
    assert r.exit_code == 0 and loads == [None]  # no answer length: the default window


@pytest.mark.slow
def test_a_chat_template_longer_than_allowed_for_loads_the_default_window(default_gguf, monkeypatch):
    from click.testing import CliRunner

    from edgelm.cli import generate, main

    monkeypatch.setattr(generate, "CHAT_TEMPLATE_ALLOWANCE", 0)  # SmolLM2's template adds a system prompt
    loads = _spy_loads(monkeypatch)
    r = CliRunner().invoke(main, ["run", str(default_gguf), "Hi", "-n", "240", "-t", "0", "--stats"])
    assert r.exit_code == 0, r.output
    assert loads == [256, None]  # 2 bytes + 240 fit 256, the template's ~30 tokens did not: loaded again
