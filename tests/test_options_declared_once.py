"""Every option is declared once: a table (edgelm.declarations.Setting, or a dataclass whose fields carry them) holds
its name, default, help and flag, and the library signatures, the TypedDicts editors read and the click options are
derived from it or checked against it here.

The tables: generation (GenerationParams), load (settings.LoadOptions + BACKEND), compress (CompressOptions),
convert (ConvertOptions, and TARGET_FLAGS for the targets' own options), recommend (RecommendOptions, and the
cluster flags with recommend_cluster's defaults), a served checkpoint's conversion (AutoConvertOptions).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, get_type_hints

import click
import pytest

import edgelm
from edgelm import converters
from edgelm.autoconvert import AUTO_CONVERT, AutoConvertOptions
from edgelm.cli import main
from edgelm.cli.platforms import CLUSTER_FLAGS
from edgelm.cli.store import PULL
from edgelm.compression.api import COMPRESS, CompressKwargs, CompressOptions
from edgelm.conversion import CONVERT, TARGET_FLAGS, ConvertKwargs, ConvertOptions
from edgelm.declarations import KINDS, Setting
from edgelm.deploy.api import BUNDLE, BundleKwargs, BundleOptions
from edgelm.model import Model
from edgelm.params import GenerationKwargs, GenerationParams
from edgelm.plan import RECOMMEND, RecommendOptions
from edgelm.cluster import recommend_cluster
from edgelm.server import AppKwargs, create_app
from edgelm.settings import DEVICES, GENERATION, LOAD, LoadKwargs, LoadOptions
from edgelm.tools.spec import TOOLS, ChatKwargs, ToolOptions

TABLES: dict[str, tuple[Setting, ...]] = {
    "generation": GENERATION, "load": LOAD, "compress": COMPRESS, "convert": CONVERT, "convert targets": TARGET_FLAGS,
    "recommend": RECOMMEND, "recommend cluster": CLUSTER_FLAGS, "pull": PULL, "tools": TOOLS, "bundle": BUNDLE,
    "serve conversion": AUTO_CONVERT,
}
# command -> the tables its flags come from
COMMANDS: dict[str, tuple[tuple[Setting, ...], ...]] = {
    "run": (GENERATION, LOAD), "chat": (GENERATION, LOAD), "serve": (GENERATION, LOAD, AUTO_CONVERT),
    "batch": (GENERATION, LOAD),
    "compress": (COMPRESS,), "convert": (CONVERT, TARGET_FLAGS), "recommend": (RECOMMEND, CLUSTER_FLAGS),
    "pull": (PULL,), "bundle": (BUNDLE,),
}


def _names(table: tuple[Setting, ...]) -> list[str]:
    return [s.name for s in table]


def _target_fields() -> set[str]:
    """Every option of every conversion target's record (GGUFOptions, OnnxOptions, ...)."""
    return {f.name for name in converters.TARGETS for f in dataclasses.fields(converters.target(name).options)}


@pytest.mark.parametrize("table", TABLES, ids=str)
def test_each_table_declares_each_name_once(table):
    names = _names(TABLES[table])
    assert len(names) == len(set(names)), f"{table}: a name declared twice"
    for s in TABLES[table]:
        assert s.kind in KINDS and s.help, s
        assert s.example is not None and s.example != s.default, s  # a walk with the default would prove nothing
        if s.kind == "choice":
            assert s.choices and (s.default is None or s.default in s.choices), s


def test_the_records_are_the_tables():
    """The dataclasses the library validates with are where the tables come from: same names, same defaults."""
    for record, table in ((GenerationParams, GENERATION), (CompressOptions, COMPRESS), (ConvertOptions, CONVERT),
                          (RecommendOptions, RECOMMEND), (ToolOptions, TOOLS), (BundleOptions, BUNDLE),
                          (AutoConvertOptions, AUTO_CONVERT)):
        assert [f.name for f in dataclasses.fields(record)] == _names(table), record
        built = record()
        for s in table:
            assert getattr(built, s.name) == s.default, (record, s.name)
    # LoadOptions: a field per load setting (backend picks the class, it is not handed to it), plus what only the
    # resolver fills in
    declared = [f.name for f in dataclasses.fields(LoadOptions) if "setting" in f.metadata]
    assert ["backend", *declared] == _names(LOAD)
    assert {f.name for f in dataclasses.fields(LoadOptions)} - set(declared) == {"providers", "extra", "progress"}  # resolved by load(), not settings
    # the field's own default, where it is not the user's, is the resolved meaning of the user's ("auto" -> cpu)
    resolved = LoadOptions(threads=1)
    assert resolved.device == "cpu" and resolved.n_gpu_layers == 0
    assert {s.name: s.default for s in LOAD}["device"] == "auto" and "cpu" in DEVICES
    # the targets' flags leave the default to the target's record
    assert set(_names(TARGET_FLAGS)) <= _target_fields()
    assert all(s.default is None for s in TARGET_FLAGS)


@pytest.mark.parametrize("typed, names", [
    (GenerationKwargs, _names(GENERATION)),
    (ChatKwargs, _names(GENERATION) + _names(TOOLS)),
    (LoadKwargs, _names(LOAD)),
    (CompressKwargs, _names(COMPRESS)),
    (ConvertKwargs, _names(CONVERT) + sorted(_target_fields())),
    (BundleKwargs, _names(BUNDLE)),
    (AppKwargs, [n for n, p in inspect.signature(create_app).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and n != "api_key"]),
], ids=lambda x: getattr(x, "__name__", ""))
def test_the_typed_dicts_match_the_tables(typed, names):
    assert set(typed.__annotations__) == set(names)
    assert typed.__total__ is False  # every key optional: a missing one takes the table's default


def test_the_typed_dicts_type_what_the_records_type():
    """Where the record holds the value as given, the TypedDict spells the same type (compared as written)."""
    for record, typed in ((CompressOptions, CompressKwargs), (ConvertOptions, ConvertKwargs),
                          (BundleOptions, BundleKwargs)):
        for f in dataclasses.fields(record):
            written = typed.__annotations__[f.name]
            assert getattr(written, "__forward_arg__", written) == f.type, (record, f.name)


def _unpacked(func: Any) -> str | None:
    """The TypedDict name of a function's ``**kwargs: Unpack[X]``, or None."""
    for p in inspect.signature(func).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            text = str(p.annotation)
            return text[len("Unpack["):-1] if text.startswith("Unpack[") else None
    return None


@pytest.mark.parametrize("func, typed", [
    (edgelm.load, "LoadKwargs"), (Model.generate, "GenerationKwargs"), (Model.stream, "GenerationKwargs"),
    (Model.chat, "ChatKwargs"), (Model.stream_chat, "ChatKwargs"),
    (Model.stream_tokens, "GenerationKwargs"), (Model.generate_batch, "GenerationKwargs"),
    (Model.chat_batch, "ChatKwargs"), (Model.chat_tokens, "ChatKwargs"),
    (edgelm.convert, "ConvertKwargs"), (edgelm.compress, "CompressKwargs"), (edgelm.serve, "AppKwargs"),
    (edgelm.bundle, "BundleKwargs"),
], ids=lambda x: getattr(x, "__qualname__", str(x)))
def test_public_functions_keep_their_keyword_names(func, typed):
    assert _unpacked(func) == typed


def test_embed_names_its_keywords():
    params = inspect.signature(Model.embed).parameters
    assert {"pooling", "normalize", "truncate"} <= set(params)
    assert params["pooling"].default in Model.POOLINGS


def test_no_signature_restates_a_default():
    """A library signature that names a table's option explicitly takes its default from the table."""
    by_name: dict[str, dict[str, Any]] = {}
    for table in TABLES.values():
        for s in table:
            by_name.setdefault(s.name, {})[id(table)] = s.default
    checked = [edgelm.load, edgelm.convert, edgelm.compress, edgelm.recommend, edgelm.pull, edgelm.serve,
               Model.generate, Model.stream, Model.chat, Model.stream_chat, Model.embed, edgelm.bundle,
               edgelm.verify_bundle]
    for func in checked:
        for name, p in inspect.signature(func).parameters.items():
            if p.default is p.empty or name not in by_name:
                continue
            assert p.default in by_name[name].values(), f"{func.__qualname__}({name}={p.default!r}) vs the table"
    rec = inspect.signature(edgelm.recommend).parameters
    for s in RECOMMEND:
        assert rec[s.name].default == s.default
    assert inspect.signature(edgelm.pull).parameters["profile"].default == PULL[0].default
    # the cluster flags' defaults are recommend_cluster's own
    cluster = inspect.signature(recommend_cluster).parameters
    for s in CLUSTER_FLAGS:
        if s.name != "workers":
            assert cluster[s.name].default == s.default, s.name


def _command(name: str) -> click.Command:
    return main.get_command(click.Context(main), name)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_the_flags_come_from_the_tables(command):
    """Each flag of a table's option is on its command, with no default of its own (None: the library's, from
    the table, stays the default) and the table's default in its help."""
    params = {p.name: p for p in _command(command).params}
    flagged = {s.name for table in COMMANDS[command] for s in table if s.cli}
    for table in COMMANDS[command]:
        for s in table:
            if not s.cli:  # library only (or, like load's speculative, flagged by a setting of the same name)
                assert s.name not in params or s.name in flagged, (command, s.name)
                continue
            p = params[s.name]
            assert {o for f in s.cli for o in f.split("/")} == {*p.opts, *p.secondary_opts}, (command, s.name)
            assert p.default in (None, ()), (command, s.name, p.default)
            assert p.help and ("[default:" in p.help or p.required), (command, s.name)


def test_device_is_the_compute_device_and_profile_the_device_profile():
    for name, command in main.all_commands().items():
        for p in command.params:
            if "--device" in p.opts and name != "worker":  # `edgelm worker --device` names ggml devices to serve
                assert isinstance(p.type, click.Choice) and set(p.type.choices) == set(DEVICES), name
    for name in ("recommend", "pull"):
        opts = {o for p in _command(name).params for o in p.opts}
        assert "--profile" in opts and "--device" not in opts, name
    assert "--worker-profile" in {o for p in _command("recommend").params for o in p.opts}
    assert "profile" in inspect.signature(edgelm.recommend).parameters
    assert "profile" in inspect.signature(edgelm.pull).parameters


def test_library_fills_defaults_and_refuses_unknown_names(tmp_path):
    with pytest.raises(edgelm.InvalidParameterError, match="drop_layer") as err:
        edgelm.compress(tmp_path / "src", tmp_path / "out", drop_layer=2)  # type: ignore[call-arg]
    assert "drop_layers" in err.value.fix
    with pytest.raises(edgelm.InvalidParameterError, match="quantt"):
        edgelm.convert(str(tmp_path / "src"), quantt="q8_0", output=str(tmp_path / "o.gguf"))  # type: ignore[call-arg]


def test_get_type_hints_of_the_typed_dicts_resolve():
    """The TypedDicts are real types at run time too (an editor or a validator may evaluate them)."""
    for typed in (GenerationKwargs, ChatKwargs, LoadKwargs, CompressKwargs, ConvertKwargs, AppKwargs):
        assert get_type_hints(typed)


TYPOS = '''
import edgelm

m = edgelm.load("x.gguf", n_ctxx=512)
m.generate("hi", max_token=5)
m.generate("hi", max_tokens="5")
m.chat([{"role": "user", "content": "hi"}], tool_choise="required")
edgelm.compress("a", "b", drop_layer=3)
edgelm.convert("a", quantt="q8_0")
edgelm.serve(keep_alivee=3)
'''
FINE = '''
import edgelm

m = edgelm.load("x.gguf", n_ctx=512, device="cpu", kv_cache="q8_0")
m.generate("hi", max_tokens=5, temperature=0.2, stop=["\\n"])
m.stream_chat([{"role": "user", "content": "hi"}], top_k=5)
m.chat([{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required")
edgelm.compress("a", "b", drop_layers=[2, 3], heal="linear", budget="200k")
edgelm.convert("a", to="onnx", quant="int4", output="o", algo="gptq", mixed_precision=True)
edgelm.serve(port=0, keep_alive=3.0, ui=False)
edgelm.recommend("m.gguf", profile="raspberry-pi-5-8gb", parallel=2)
'''


@pytest.mark.slow
def test_a_type_checker_catches_a_misspelt_keyword(tmp_path):
    """What the TypedDicts are for: mypy names each misspelt or mistyped keyword, and passes the right ones."""
    api = pytest.importorskip("mypy.api", reason="mypy is not installed")
    (tmp_path / "typos.py").write_text(TYPOS)
    (tmp_path / "fine.py").write_text(FINE)
    args = ["--ignore-missing-imports", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache")]
    out, _, status = api.run([*args, str(tmp_path / "typos.py"), str(tmp_path / "fine.py")])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert all("typos.py" in line for line in errors), out
    for word in ("n_ctxx", "max_token", '"max_tokens"', "drop_layer", "quantt", "keep_alivee", "tool_choise"):
        assert any(word in line for line in errors), (word, out)
    assert status == 1
