"""edgelm.compress: remove decoder blocks / MLP neurons, heal, measure.

Fast tests check the parameters, the errors and the work folder without a model.  Slow ones compress tiny random
checkpoints (tests/compress_helpers.py) for real: the output's layers and config, transformers loading and generating
from it, GGUF conversion, healing against plain removal, the budget, resume after an interruption, and that a
failure leaves no half-written output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgelm
from edgelm.compression.distill import Budget, lr_at, parse_budget, DistillSettings
from edgelm.compression.work import WorkDir
from edgelm.errors import (InvalidParameterError, OutputExistsError, UnsupportedModelError)

from .conftest import run_cli


# --- parameters ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("30m", Budget(seconds=1800)), ("90s", Budget(seconds=90)), ("1.5h", Budget(seconds=5400)),
    ("2 min", Budget(seconds=120)), ("200k", Budget(tokens=200_000)), ("1M", Budget(tokens=1_000_000)),
    ("5000 tokens", Budget(tokens=5000)), (45, Budget(seconds=45.0)),
])
def test_budget_parsing(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "-5m", "0s", "10 parsecs", "3x"])
def test_bad_budget_names_the_value_and_the_forms(text):
    with pytest.raises(InvalidParameterError) as err:
        parse_budget(text)
    assert repr(text) in str(err.value) and "30m" in str(err.value) and "200k" in str(err.value)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    s = DistillSettings(lr=1e-4)
    assert lr_at(s, 0.0) < lr_at(s, 0.025) < lr_at(s, 0.05) == pytest.approx(1e-4)
    assert lr_at(s, 0.5) < 1e-4 and lr_at(s, 1.0) == pytest.approx(1e-5)


def _fake_checkpoint(folder: Path, config: dict) -> Path:
    """A folder that passes the checkpoint checks (config, tokenizer, weights file) without real weights."""
    from .onnx_helpers import tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 6}


@pytest.mark.parametrize("kwargs,parameter", [
    ({"drop_layers": 2, "heal": "magic"}, "heal"),
    ({"drop_layers": 2, "target_speedup": 1.2}, "target_speedup"),
    ({}, "drop_layers"),
    ({"prune_mlp": "150%"}, "prune_mlp"),
    ({"prune_mlp": "a lot"}, "prune_mlp"),
    ({"target_speedup": 0.8}, "target_speedup"),
    ({"drop_layers": -1}, "drop_layers"),
    ({"drop_layers": 2, "budget": "soon"}, "budget"),
    ({"max_ppl_increase": "10%", "measure": False}, "measure"),
])
def test_bad_parameters_are_refused_before_any_work(tmp_path, kwargs, parameter):
    src = _fake_checkpoint(tmp_path / "src", LLAMA)
    with pytest.raises(InvalidParameterError) as err:
        edgelm.compress(src, tmp_path / "out", **kwargs)
    assert err.value.parameter == parameter
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("config,named", [
    ({"architectures": ["BertModel"], "model_type": "bert"}, "BertModel"),
    ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True}, "t5"),
    ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}, "gemma2"),
])
def test_unsupported_architectures_name_it_and_the_supported_list(tmp_path, config, named):
    src = _fake_checkpoint(tmp_path / "src", config)
    with pytest.raises(UnsupportedModelError) as err:
        edgelm.compress(src, tmp_path / "out", drop_layers=1, measure=False)
    message = str(err.value)
    assert named in message and "llama" in message and "qwen2" in message and "mistral" in message


def test_existing_output_needs_overwrite(tmp_path):
    src = _fake_checkpoint(tmp_path / "src", LLAMA)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as err:
        edgelm.compress(src, tmp_path / "out", drop_layers=1, measure=False)
    assert "--overwrite" in str(err.value)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.slow  # loads transformers for the tokenizer (a few seconds)
def test_short_calibration_text_names_the_minimum(tmp_path):
    src = _fake_checkpoint(tmp_path / "src", LLAMA)
    with pytest.raises(InvalidParameterError) as err:
        edgelm.compress(src, tmp_path / "out", drop_layers=1, measure=False, calibration_text="Too short. " * 50)
    assert err.value.parameter == "calibration" and "4,096" in str(err.value)
    assert not list(tmp_path.glob(".out*"))


# --- the work folder ------------------------------------------------------------------------------------------

def test_work_folder_resumes_only_with_the_same_settings(tmp_path):
    out = tmp_path / "out"
    a = WorkDir(out, {"drop": [1, 2]})
    assert a.open(None) is False
    a.checkpoint("step-1", lambda f: (f / "w.bin").write_bytes(b"1"), {"steps": 1})
    assert WorkDir(out, {"drop": [1, 2]}).open(None) is True
    with pytest.raises(InvalidParameterError):
        WorkDir(out, {"drop": [3]}).open(True)
    assert WorkDir(out, {"drop": [3]}).open(None) is False  # other settings: afresh
    assert WorkDir(out, {"drop": [3]}).latest() is None


def test_a_failed_checkpoint_leaves_the_previous_one(tmp_path):
    work = WorkDir(tmp_path / "out", {"k": 1})
    work.open(None)
    work.checkpoint("step-1", lambda f: (f / "w.bin").write_bytes(b"1"), {"steps": 1})

    def broken(folder: Path) -> None:
        (folder / "w.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        work.checkpoint("step-2", broken, {"steps": 2})
    folder, state = work.latest()
    assert state == {"steps": 1} and (folder / "w.bin").read_bytes() == b"1"
    assert sorted(p.name for p in work.path.iterdir()) == ["latest.json", "settings.json", "step-1"]
    work.checkpoint("step-3", lambda f: (f / "w.bin").write_bytes(b"3"), {"steps": 3})
    assert work.latest()[1] == {"steps": 3} and not (work.path / "step-1").exists()


# --- the command line -------------------------------------------------------------------------------------------

def test_cli_help_teaches_with_examples():
    r = run_cli("compress", "--help")
    assert r.returncode == 0
    for text in ("--drop-layers", "--target-speedup", "--max-ppl-increase", "--prune-mlp", "--heal", "--budget",
                 "--calibration", "--eval-text", "--plot", "--json", "Examples", "edgelm compress ./"):
        assert text in r.stdout


def test_cli_maps_errors_to_exit_codes(tmp_path):
    src = _fake_checkpoint(tmp_path / "src", LLAMA)
    bad = run_cli("compress", str(src), "-o", str(tmp_path / "out"), "--drop-layers", "some")
    assert bad.returncode == 2 and "--drop-layers" in bad.stderr
    enc = _fake_checkpoint(tmp_path / "bert", {"architectures": ["BertModel"], "model_type": "bert"})
    unsupported = run_cli("compress", str(enc), "-o", str(tmp_path / "out"), "--drop-layers", "1")
    assert unsupported.returncode == 4 and "BertModel" in unsupported.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    exists = run_cli("compress", str(src), "-o", str(tmp_path / "taken"), "--drop-layers", "1", "--no-eval")
    assert exists.returncode == 9 and "--overwrite" in exists.stderr
