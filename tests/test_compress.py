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


@pytest.mark.parametrize("drop,says", [
    (6, "removing them all is impossible"), (5, "Remove at most 4"), ([0, 2], "first decoder block"),
    ([3, 5], "last decoder block"), ([2, 9], "has layers 0..5"),
])
def test_all_first_or_last_block_is_refused_before_loading(tmp_path, drop, says):
    src = _fake_checkpoint(tmp_path / "src", LLAMA)  # no real weights: the check comes before any loading
    with pytest.raises(InvalidParameterError) as err:
        edgelm.compress(src, tmp_path / "out", drop_layers=drop, measure=False)
    assert err.value.parameter == "drop_layers" and says in str(err.value)
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


@pytest.mark.slow  # loads transformers for the tokenizer
@pytest.mark.timeout(120)
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


# --- tiny real checkpoints --------------------------------------------------------------------------------------

FAST = dict(calibration_tokens=6144, seq_len=128, fit_tokens=2048, threads=1)  # seconds per compression: small
# windows, and one thread (tiny matrices gain nothing from more, and lose a lot on a busy machine)


def _tiny(tmp_path: Path, model_type: str = "llama") -> Path:
    from .compress_helpers import tiny_model

    return tiny_model(model_type, tmp_path / f"src-{model_type}")


def _safetensors_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return out


def _held_out_kl(teacher_dir: Path, student_dir: Path) -> float:
    """KL(original || compressed) on the built-in evaluation text (never calibration text here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelm.compression.scoring import kl_divergence
    from edgelm.quality import eval_text

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    ids = torch.tensor(tok(eval_text(), add_special_tokens=False).input_ids[:1024]).view(8, 128)
    with torch.no_grad():
        t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)(ids).logits
        s = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)(ids).logits
    return kl_divergence(t, s)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.timeout(120)  # per family
def test_removed_blocks_are_gone_and_the_rest_is_the_original(tmp_path, model_type):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _tiny(tmp_path, model_type)
    out = tmp_path / "out"
    report = edgelm.compress(src, out, drop_layers=[2, 4], heal="none", measure=False, **FAST)
    assert report.dropped_layers == [2, 4] and (report.layers_before, report.layers_after) == (6, 4)
    assert report.parameters_after < report.parameters_before
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["model_type"] == model_type
    assert cfg["edgelm_compression"]["dropped_layers"] == [2, 4]
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 4
    keys = _safetensors_keys(out)
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == {0, 1, 2, 3}
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert not list(tmp_path.glob(".out*")), "the work folder and temporary folders are gone"
    # the kept blocks are the original's 0, 1, 3, 5, unchanged: the output computes what the original does with
    # blocks 2 and 4 skipped
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    small = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64]])
    with torch.no_grad():
        original.model.layers = torch.nn.ModuleList([original.model.layers[i] for i in (0, 1, 3, 5)])
        for new, layer in enumerate(original.model.layers):
            layer.self_attn.layer_idx = new
        original.config.num_hidden_layers = 4
        if getattr(original.config, "layer_types", None):
            original.config.layer_types = original.config.layer_types[:4]
        torch.testing.assert_close(small(ids).logits, original(ids).logits)
        generated = small.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 6
    assert AutoTokenizer.from_pretrained(out).decode(generated[0])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_mlp_width_is_narrowed_in_every_block(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = _tiny(tmp_path)
    report = edgelm.compress(src, tmp_path / "out", prune_mlp="25%", heal="linear", measure=False, **FAST)
    assert (report.mlp_width_before, report.mlp_width_after, report.layers_after) == (256, 192, 6)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_size"] == 192
    keys = _safetensors_keys(tmp_path / "out")
    assert keys["model.layers.3.mlp.down_proj.weight"] == (64, 192)
    assert keys["model.layers.3.mlp.gate_proj.weight"] == (192, 64)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.slow  # three compressions and the distillation
@pytest.mark.timeout(240)
def test_healing_lowers_the_loss_against_plain_removal(tmp_path):
    src = _tiny(tmp_path)
    kl = {}
    fast_learner = DistillSettings(lr=1e-3)  # a tiny random model takes a larger step than a trained 135M one
    for heal, budget in (("none", None), ("linear", None), ("distill", "24k")):
        out = tmp_path / heal
        r = edgelm.compress(src, out, drop_layers=2, prune_mlp="25%", heal=heal, budget=budget, measure=False,
                            distill_settings=fast_learner, **FAST)
        assert len(r.dropped_layers) == 2 and r.mlp_width_after == 192
        kl[heal] = _held_out_kl(src, out)
    # measured on the built-in text, which is not the calibration text
    assert kl["linear"] < 0.9 * kl["none"], kl
    assert kl["distill"] < 0.9 * kl["linear"], kl


class SteppingClock:
    """A clock that advances ``step`` seconds at every reading: a time budget is then checked by counting."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.t = 0.0
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        self.t += self.step
        return self.t


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_token_and_time_budgets_are_honoured(tmp_path, monkeypatch):
    src = _tiny(tmp_path)
    r = edgelm.compress(src, tmp_path / "tokens", drop_layers=1, heal="distill", budget="5000 tokens",
                        measure=False, **FAST)
    d = r.distillation
    per_step = 4 * 128
    assert d["tokens"] <= 5000 and d["tokens"] > 5000 - per_step and d["steps"] == d["tokens"] // per_step
    assert d["loss_last"] is not None
    clock = SteppingClock(0.25)  # every reading of the compression's clock is a quarter of a second later
    monkeypatch.setattr("edgelm.compression.clock._now", clock)
    r = edgelm.compress(src, tmp_path / "time", drop_layers=1, heal="distill", budget="12s", measure=False, **FAST)
    steps = r.distillation["steps"]
    step = r.distillation["seconds"] / max(1, steps)
    assert step == pytest.approx(0.25)  # one clock step between the readings around a training step
    before = r.seconds["scoring"] + r.seconds["pruning"]
    used = before + r.seconds["healing"]
    assert steps >= 1 and before < 12, (r.seconds, steps)
    # the budget covers scoring and pruning too; distillation stops before the step that would cross it, and the
    # clock readings around the loop (checkpoints, progress) add a few quarter-seconds at most
    assert 12 - 2 * step - 1.0 <= used <= 12 + 2 * step + 1.0, (r.seconds, steps)
    assert r.distillation["seconds"] <= 12 - before + step, (r.seconds, steps)


@pytest.mark.slow  # torch + llama.cpp's converter for two families
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.timeout(240)  # per family
def test_the_output_converts_to_gguf_and_runs(tmp_path, model_type):
    from edgelm.loader import inspect

    src = _tiny(tmp_path, model_type)
    out = tmp_path / "out"
    report = edgelm.compress(src, out, drop_layers=2, prune_mlp="25%", heal="linear", measure=False, **FAST)
    gguf = tmp_path / "small-q8_0.gguf"
    edgelm.convert(str(out), to="gguf", quant="q8_0", output=str(gguf), eval=False)
    assert inspect(gguf)["parameters"] == report.parameters_after
    with edgelm.load(gguf, n_ctx=256) as m:
        c = m.generate("The", max_tokens=4, temperature=0)
    assert c.usage.completion_tokens >= 1


@pytest.mark.slow  # two GGUF conversions, perplexities, speed in child processes, the curve
@pytest.mark.timeout(480)
def test_report_measures_the_gguf_models_and_plots(tmp_path):
    from edgelm.compression.report import plot

    src = _tiny(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("Permission is hereby granted, free of charge, to any person obtaining a copy. " * 200)
    r = edgelm.compress(src, tmp_path / "out", drop_layers=2, heal="linear", eval_text=other, curve=True, **FAST)
    for text in ("built-in", "other.txt"):
        row = r.perplexity[text]
        assert row["original"] > 1 and row["pruned"] > 1 and row["compressed"] > 1
    assert r.tokens_per_second["original"] > 0 and r.tokens_per_second["compressed"] > 0
    assert r.gguf_q8_0_bytes["compressed"] < r.gguf_q8_0_bytes["original"]
    assert [p["layers_removed"] for p in r.curve] == [0, 1, 2]
    # the chart's last point and the pruned model are the same blocks removed (both cut from the original's GGUF)
    assert r.curve[-1]["perplexity"] == pytest.approx(r.perplexity["built-in"]["pruned"], rel=1e-3)
    assert r.curve[0]["perplexity"] == r.perplexity["built-in"]["original"]
    data = r.to_dict()
    assert data["speedup"] == pytest.approx(r.tokens_per_second["compressed"] / r.tokens_per_second["original"])
    assert "llama.cpp" in data["perplexity_method"]
    json.dumps(data)
    table = r.table()
    assert "built-in" in table and "other.txt" in table and "removed" in table
    plot(r, str(tmp_path / "ppl.png"))
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # two distillations of the tiny model
@pytest.mark.timeout(160)
def test_resume_continues_from_the_last_checkpoint(tmp_path):
    import torch
    from safetensors.torch import load_file

    src = _tiny(tmp_path)
    every_step = DistillSettings(checkpoint_every=0.0)
    kwargs = dict(drop_layers=2, heal="distill", budget="6000 tokens", measure=False, distill_settings=every_step,
                  **FAST)
    whole = edgelm.compress(src, tmp_path / "whole", **kwargs)

    steps = {"n": 0}

    def stop_at_step_5(message: str, fraction: float) -> None:
        if message.startswith("distilling"):
            steps["n"] += 1
            if steps["n"] == 5:
                raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        edgelm.compress(src, out, progress=stop_at_step_5, **kwargs)
    assert not out.exists(), "an interrupted compression writes no output"
    work = tmp_path / ".out.compress-work"
    latest = json.loads((work / "latest.json").read_text())
    assert json.loads((work / latest["folder"] / "state.json").read_text())["steps"] == 4
    again = edgelm.compress(src, out, **kwargs)
    assert again.resumed and not whole.resumed
    assert again.distillation["steps"] == whole.distillation["steps"]
    assert again.distillation["tokens"] == whole.distillation["tokens"]
    assert not work.exists()
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a real process, interrupted, then run again
@pytest.mark.timeout(480)
def test_ctrl_c_keeps_a_checkpoint_and_no_output_then_the_same_command_resumes(tmp_path):
    src = _tiny(tmp_path)
    out = tmp_path / "out"
    args = ["compress", str(src), "-o", str(out), "--drop-layers", "2", "--budget", "60k", "--no-eval", "--json",
            "--threads", "1"]
    exe = [sys.executable, "-m", "edgelm"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("EDGELM_DEBUG", None)
    proc = subprocess.Popen([*exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    work = tmp_path / ".out.compress-work"
    deadline = time.monotonic() + 240
    try:
        while not (work / "linear" / "state.json").is_file():  # pruned; distillation starts now
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        time.sleep(3.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p != work], "no temporary output"
    state = json.loads((work / json.loads((work / "latest.json").read_text())["folder"] / "state.json").read_text())
    assert state["steps"] >= 1
    r = run_cli(*args, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["resumed"] and data["distillation"]["steps"] > state["steps"]
    assert (out / "config.json").is_file() and not work.exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_failure_while_writing_leaves_no_half_written_output(tmp_path, monkeypatch):
    from edgelm.compression import api

    src = _tiny(tmp_path)
    real = api.save_checkpoint

    def failing(model, source, out, **kwargs):
        real(model, source, out, **kwargs)
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(api, "save_checkpoint", failing)
    with pytest.raises(OSError):
        edgelm.compress(src, tmp_path / "out", drop_layers=1, heal="linear", measure=False, **FAST)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == [".out.compress-work"]
