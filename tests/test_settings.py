"""Every setting declared in edgelm.settings works on every surface it names: the library, the command line
(run, chat, serve, bench, eval) and the server's OpenAI fields and Ollama options (real HTTP)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import edgelm
from edgelm import runtimes
from edgelm.cli import main
from edgelm.params import GenerationParams
from edgelm.settings import KINDS, generation, load_settings

from .fakes import EOS, FakeBackend

GENERATION = generation()
LOAD = load_settings()


@pytest.fixture()
def fake_model(tmp_path):
    runtimes.register_backend("fake", FakeBackend)
    FakeBackend.script = [1, 2, EOS]
    FakeBackend.loaded.clear()
    path = tmp_path / "m.fake"
    path.write_text("a|b|c", encoding="utf-8")
    yield path
    runtimes.unregister_backend("fake")


def _cli_args(s) -> list[str]:
    """The command-line spelling of the setting's example value."""
    flag = s.flag
    if s.kind == "bool":
        on, _, off = flag.partition("/")
        return [on if s.example else off]
    if s.kind == "strings":
        return [a for v in s.example for a in (flag, v)]
    if s.kind == "constraint":  # --json-schema takes a schema's JSON text
        return [flag, SCHEMA]
    return [flag, str(s.example)]


SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}}'


def _expected(s, surface="library"):
    if s.kind == "constraint" and surface == "cli":
        return edgelm.Constraint.json_schema(SCHEMA)
    return tuple(s.example) if s.kind == "strings" else s.example


def test_the_tables_are_complete():
    for s in GENERATION + LOAD:
        assert s.kind in KINDS and s.help and s.example is not None, s
        assert s.example != s.default, s  # a walk with the default would prove nothing
    assert {s.name for s in GENERATION} == {f.name for f in dataclasses.fields(GenerationParams)}
    # every load setting reaches the backends through LoadOptions
    assert {s.name for s in LOAD} - {"backend"} <= {f.name for f in dataclasses.fields(runtimes.LoadOptions)}
    for s in GENERATION:
        # constraint's HTTP surfaces are response_format (OpenAI) and format (Ollama), translated by the server
        # (edgelm/server/core.py json_constraint; tests/test_structured*.py use them)
        http = (s.openai and s.ollama) or s.name == "constraint"
        assert s.cli and http, f"{s.name} is missing a surface"


@pytest.mark.parametrize("s", GENERATION, ids=lambda s: s.name)
def test_generation_setting_in_the_library(s):
    p = GenerationParams().merged(**{s.name: s.example})
    assert getattr(p, s.name) == _expected(s)


def _command_args(command: str, fake_model: Path) -> list[str]:
    """The command line of ``command`` on the fake model (batch gets a one-line input file next to it)."""
    if command == "batch":
        src = fake_model.parent / "in.jsonl"
        src.write_text('{"prompt": "Hi"}\n')
        return ["batch", str(src), "-o", str(fake_model.parent / "out.jsonl"), "--overwrite", "-m", str(fake_model)]
    return {"run": ["run", str(fake_model), "Hi"], "chat": ["chat", str(fake_model)],
            "serve": ["serve", str(fake_model)], "bench": ["bench", str(fake_model)],
            "eval": ["eval", str(fake_model)]}[command]


@pytest.mark.parametrize("command", ["run", "chat", "batch"])
@pytest.mark.parametrize("s", GENERATION, ids=lambda s: s.name)
def test_generation_setting_on_the_command_line(s, command, fake_model):
    args = _command_args(command, fake_model)
    r = CliRunner().invoke(main, [*args, *_cli_args(s)], input="Hi\n")
    assert r.exit_code == 0, r.output
    tokens, params = FakeBackend.loaded[-1].calls[-1]
    assert getattr(params, s.name) == _expected(s, "cli")


@pytest.mark.parametrize("command", ["run", "chat", "serve", "bench", "eval", "batch"])
@pytest.mark.parametrize("s", [s for s in LOAD if s.cli], ids=lambda s: s.name)
def test_load_setting_on_the_command_line(s, command, fake_model, monkeypatch):
    seen = {}
    import edgelm.loader
    import edgelm.measure
    import edgelm.server

    monkeypatch.setattr(edgelm.server, "serve", lambda names, **kw: seen.update(kw["load_kwargs"]))
    monkeypatch.setattr(edgelm.measure, "bench", lambda models, **kw: seen.update(kw) or [])
    monkeypatch.setattr(edgelm.measure, "evaluate", lambda model, **kw: seen.update(kw) or [])
    real_load = edgelm.loader.load
    monkeypatch.setattr(edgelm.loader, "load", lambda model, **kw: seen.update(kw) or real_load(model, backend="fake"))
    args = _command_args(command, fake_model)
    r = CliRunner().invoke(main, [*args, *_cli_args(s)], input="")
    if s.name == "kv_cache" and command in ("bench", "eval"):  # these compare several: --kv-cache is repeatable
        assert seen["kv_caches"] == [s.example], r.output
        return
    assert s.name in seen, r.output
    assert seen[s.name] == (str(s.example) if s.kind == "path" else s.example)


@pytest.mark.parametrize("s", [s for s in LOAD if s.backends is None and s.name != "backend"], ids=lambda s: s.name)
def test_load_setting_in_the_library_reaches_the_backend(s, fake_model):
    with edgelm.load(fake_model, **{s.name: s.example}) as m:
        assert m.info.backend == "fake"
    assert getattr(FakeBackend.loaded[-1].options, s.name) == s.example


def test_unknown_load_option_names_the_valid_ones(fake_model):
    with pytest.raises(edgelm.InvalidParameterError, match="totally_bogus_option") as err:
        edgelm.load(fake_model, threads=2, totally_bogus_option=7)
    assert "n_ctx" in str(err.value) and "kv_cache" in str(err.value)


def test_option_of_another_backend_is_refused_by_name(tmp_path):
    from .onnx_helpers import tiny_tokenizer  # noqa: F401  (an ONNX folder is not needed: the check comes first)

    folder = tmp_path / "m-onnx"
    folder.mkdir()
    (folder / "edgelm.json").write_text("{}")
    with pytest.raises(edgelm.InvalidParameterError, match="kv_cache is not an option of the onnxruntime backend"):
        edgelm.load(folder, kv_cache="q8_0")


@pytest.fixture()
def served(fake_model):
    from edgelm.server import BackgroundServer, create_app

    app = create_app({"fake": fake_model})
    with BackgroundServer(app) as server:
        yield server.url


@pytest.mark.parametrize("s", GENERATION, ids=lambda s: s.name)
def test_generation_setting_as_an_openai_field(s, served):
    for field in s.openai:
        value = list(s.example) if s.kind == "strings" else s.example
        r = httpx.post(f"{served}/v1/completions", json={"model": "fake", "prompt": "Hi", field: value}, timeout=30)
        assert r.status_code == 200, r.text
        assert getattr(FakeBackend.loaded[-1].calls[-1][1], s.name) == _expected(s), field


@pytest.mark.parametrize("s", GENERATION, ids=lambda s: s.name)
def test_generation_setting_as_an_ollama_option(s, served):
    for option in s.ollama:
        value = list(s.example) if s.kind == "strings" else s.example
        r = httpx.post(f"{served}/api/generate", json={"model": "fake", "prompt": "Hi", "raw": True, "stream": False,
                                                       "options": {option: value}}, timeout=30)
        assert r.status_code == 200, r.text
        assert getattr(FakeBackend.loaded[-1].calls[-1][1], s.name) == _expected(s), option


def test_bad_value_is_a_400_naming_the_field(served):
    r = httpx.post(f"{served}/v1/completions", json={"model": "fake", "prompt": "Hi", "top_p": 7}, timeout=30)
    assert r.status_code == 400 and "top_p" in r.text
