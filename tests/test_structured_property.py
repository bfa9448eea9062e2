"""Structured output holds on both backends: for 100 generated JSON schemas (tests/schema_gen.py: nested objects,
enums, arrays with bounds, numbers and integers with bounds, required fields), the real SmolLM2's constrained answer
parses and validates with ``jsonschema`` (an independent validator), on llama.cpp (the shipped Q4_1 GGUF) and
onnxruntime (int8 ONNX converted from the same weights): all 100 schemas on each backend, the even ones greedy and
the odd ones sampled at temperature 1, 200 generations (both temperatures every run, in half the CI time of both
temperatures for every schema).  And the OpenAI client's structured outputs (response_format json_schema, and its
``parse`` helper with a pydantic model) and Ollama's format against a real `edgelm serve` of the ONNX model.

Slow: ~200 short generations (a few minutes on 2 idle cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgelm
from edgelm import Constraint

from .schema_gen import schemas

jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.slow

SCHEMAS = schemas(100)
ASK = [{"role": "user", "content": "Reply with a JSON object."}]


def violations(m: edgelm.Model) -> list[tuple[int, str, str]]:
    """(schema index, output, what is wrong) for every schema whose constrained answer does not validate; even
    schemas are answered greedily, odd ones at temperature 1."""
    bad = []
    for i, schema in enumerate(SCHEMAS):
        c = m.chat(ASK, constraint=Constraint.json_schema(schema), temperature=float(i % 2), seed=i, max_tokens=200)
        try:
            assert c.finish_reason == "stop", f"finish_reason {c.finish_reason}"
            jsonschema.validate(json.loads(c.text), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            bad.append((i, c.text, str(exc)[:300]))
    return bad


def test_the_generator_makes_varied_valid_schemas():
    assert len({json.dumps(s, sort_keys=True) for s in SCHEMAS}) == 100
    text = json.dumps(SCHEMAS)
    for word in ('"enum"', '"minimum"', '"maximum"', '"minItems"', '"maxItems"', '"required"', '"number"',
                 '"boolean"', '"array"'):
        assert word in text, word
    assert any(isinstance(p, dict) and p.get("type") == "object" for s in SCHEMAS for p in s["properties"].values())
    for s in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(s)


@pytest.mark.timeout(3600)
def test_generated_schemas_hold_on_llamacpp(smollm):
    assert violations(smollm) == []


@pytest.fixture(scope="module")
def smollm2_onnx(tmp_path_factory) -> Path:
    """The real SmolLM2 as int8 ONNX (round-to-nearest: seconds; int4's GPTQ takes minutes), converted from the
    checkpoint tests/hf_fixtures.py derives from the GGUF."""
    from edgelm.converters.onnx import convert_to_onnx

    from .hf_fixtures import smollm2_hf_checkpoint

    return convert_to_onnx(Path(smollm2_hf_checkpoint()), tmp_path_factory.mktemp("smollm2-onnx") / "int8", "int8")


@pytest.fixture(scope="module")
def onnx_model(smollm2_onnx):
    with edgelm.load(smollm2_onnx, n_ctx=1024, threads=2) as m:
        yield m


@pytest.mark.timeout(3600)
def test_generated_schemas_hold_on_onnx(onnx_model):
    assert onnx_model.capabilities.constraints and onnx_model.info.backend == "onnxruntime"
    assert violations(onnx_model) == []


@pytest.mark.timeout(600)
def test_onnx_regex_gbnf_and_lazy_trigger(onnx_model):
    c = onnx_model.generate("Is the sky blue? Answer:", constraint=Constraint.regex(r" (yes|no)\."), temperature=0,
                            max_tokens=8)
    assert c.text in (" yes.", " no.") and c.finish_reason == "stop"
    g = onnx_model.generate("Is the sky blue? Answer:", grammar='root ::= " yes" | " no"', temperature=0,
                            max_tokens=8)  # GBNF through llguidance on this backend
    assert g.text in (" yes", " no")
    args = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}
    call = Constraint.lark(f'start: %json{json.dumps(args)} "</tool_call>"', trigger="<tool_call>")
    prompt = ('Requests and tool calls.\nRequest: weather in Rome\nCall: <tool_call>{"city": "Rome"}</tool_call>\n'
              'Request: weather in Oslo\nCall: <tool_call>{"city": "Oslo"}</tool_call>\n'
              "Request: weather in Paris\nCall:")
    c = onnx_model.generate(prompt, constraint=call, temperature=0, max_tokens=60)
    assert "<tool_call>" in c.text and c.text.endswith("</tool_call>") and c.finish_reason == "stop", c.text
    jsonschema.validate(json.loads(c.text.split("<tool_call>", 1)[1][: -len("</tool_call>")]), args)


@pytest.mark.timeout(600)
def test_openai_and_ollama_clients_get_structured_output_from_onnx(smollm2_onnx):
    import ollama
    import openai
    from pydantic import BaseModel

    from .test_server import Server

    class City(BaseModel):
        city: str
        country: str

    server = Server(f"smollm-onnx={smollm2_onnx}", "--n-ctx", "512", "--threads", "2")
    try:
        oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        ask = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                  "required": ["city"], "additionalProperties": False}
        r = oai.chat.completions.create(
            model="smollm-onnx", messages=ask, temperature=0, max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        # the client's own structured-output helper: a pydantic model -> a strict schema -> a parsed object
        parsed = oai.chat.completions.parse(model="smollm-onnx", messages=ask, temperature=0, max_tokens=60,
                                            response_format=City)
        assert isinstance(parsed.choices[0].message.parsed, City)
        streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
            model="smollm-onnx", messages=ask, temperature=0, max_tokens=60, stream=True,
            response_format={"type": "json_object"}))
        assert isinstance(json.loads(streamed), dict)
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model="smollm-onnx", messages=ask, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}})
        assert err.value.body["param"] == "response_format.json_schema.schema"
        oll = ollama.Client(host=server.url)
        o = oll.chat(model="smollm-onnx", messages=ask, format=schema, options={"temperature": 0, "num_predict": 60})
        jsonschema.validate(json.loads(o.message.content), schema)
        with pytest.raises(ollama.ResponseError) as oerr:
            oll.chat(model="smollm-onnx", messages=ask, format={"type": "strin"})
        assert oerr.value.status_code == 400 and "format" in str(oerr.value)
    finally:
        server.stop()
