"""Structured output: edgelm.Constraint's checks (no model), and the guide on the real SmolLM2 (llama.cpp): JSON
schemas, regexes, grammars, the lazy trigger, streaming and batching.  The property test over generated schemas on
both backends is tests/test_structured_property.py; the server's response_format and format are in
tests/test_server.py (llama.cpp) and tests/test_structured_property.py (ONNX)."""

from __future__ import annotations

import json
import pickle

import pytest

import edgelm
from edgelm import Constraint, GenerationParams
from edgelm.constraints import closed_objects
from edgelm.errors import InvalidParameterError

jsonschema = pytest.importorskip("jsonschema")

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}


# --- the value and its checks (no model) -------------------------------------------------------------------------

@pytest.mark.parametrize("build, parameter, words", [
    (lambda: Constraint.json_schema({"type": "foo"}), "json_schema", "Invalid type"),
    (lambda: Constraint.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}), "json_schema",
     "strin"),
    (lambda: Constraint.json_schema(["not", "a", "schema"]), "json_schema", "must be an object"),  # type: ignore[arg-type]
    (lambda: Constraint.json_schema("{not json"), "json_schema", "not valid JSON"),
    (lambda: Constraint.json_schema({"type": "object", "x": {1, 2}}), "json_schema", "cannot be written as JSON"),
    (lambda: Constraint.regex("a("), "regex", "unclosed group"),
    (lambda: Constraint.lark("start: foo"), "lark", "foo"),
    (lambda: Constraint.gbnf("root ::= ("), "gbnf", "GBNF"),
    (lambda: Constraint.gbnf("  "), "gbnf", "empty"),
    (lambda: Constraint("yaml", "x"), "constraint", "Unknown constraint kind"),
    (lambda: Constraint("regex", 5), "constraint", "must be text"),  # type: ignore[arg-type]
    (lambda: Constraint.regex("a", trigger=""), "trigger", "trigger"),
], ids=["bad-type", "bad-nested-type", "list", "bad-json-text", "set-inside", "regex", "lark", "gbnf", "empty-gbnf",
        "kind", "source-type", "empty-trigger"])
def test_a_bad_constraint_is_refused_at_once_naming_the_parameter(build, parameter, words):
    with pytest.raises(InvalidParameterError) as err:
        build()
    assert err.value.parameter == parameter
    assert words in str(err.value), str(err.value)
    assert err.value.fix


def test_good_constraints_are_values():
    c = Constraint.json_schema(CITY, trigger="<tool_call>")
    assert c == Constraint.json_schema(json.dumps(CITY), trigger="<tool_call>")  # dict or its text: one value
    assert c.kind == "json_schema" and c.trigger == "<tool_call>" and json.loads(c.source) == CITY
    assert pickle.loads(pickle.dumps(c)) == c and hash(c) == hash(pickle.loads(pickle.dumps(c)))
    for good in (Constraint.json_object(), Constraint.regex(r"\d{3}"), Constraint.lark('start: "a" | "b"'),
                 Constraint.gbnf('root ::= "yes" | "no"'),
                 Constraint.lark('start: %json{"type": "integer"} "</x>"', trigger="<x>")):
        assert good.grammar()


def test_generation_params_check_the_constraint():
    assert GenerationParams(constraint=Constraint.json_object()).constraint.kind == "json_object"
    with pytest.raises(InvalidParameterError) as err:
        GenerationParams(constraint={"type": "object"})  # type: ignore[arg-type]
    assert err.value.parameter == "constraint" and "Constraint.json_schema" in err.value.fix
    with pytest.raises(InvalidParameterError, match="both") as err:
        GenerationParams(constraint=Constraint.json_object(), grammar='root ::= "a"')
    # a value built without its constructor is checked when used
    with pytest.raises(InvalidParameterError) as err:
        GenerationParams(constraint=Constraint("regex", "a("))
    assert err.value.parameter == "constraint"


def test_objects_with_properties_are_closed_unless_the_schema_says_otherwise():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"type": "object",
                                                                                "properties": {}}}},
              "$defs": {"d": {"type": "object", "properties": {"e": {}}, "additionalProperties": True}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is True  # said: kept
    assert "additionalProperties" not in schema  # the caller's schema is not changed
    both = closed_objects({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]})
    assert all("additionalProperties" not in part for part in both["allOf"])  # closing a part would refuse the other


# --- on the real model (llama.cpp) ------------------------------------------------------------------------------

ASK = [{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_json_schema_output_validates_streamed_and_not(smollm):
    assert smollm.capabilities.constraints
    c = Constraint.json_schema(CITY)
    done = smollm.chat(ASK, constraint=c, temperature=0, max_tokens=40)
    assert done.finish_reason == "stop"
    jsonschema.validate(json.loads(done.text), CITY)
    streamed = "".join(ch.text for ch in smollm.stream_chat(ASK, constraint=c, temperature=0, max_tokens=40))
    assert streamed == done.text
    for seed in range(3):
        sampled = smollm.chat(ASK, constraint=c, temperature=1.0, seed=seed, max_tokens=40)
        jsonschema.validate(json.loads(sampled.text), CITY)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_regex_grammars_and_json_object(smollm):
    c = smollm.generate("Is the sky blue? Answer:", constraint=Constraint.regex(r" (yes|no)\."), temperature=0,
                        max_tokens=8)
    assert c.text in (" yes.", " no.") and c.finish_reason == "stop"
    g = smollm.generate("Is the sky blue? Answer:", constraint=Constraint.gbnf('root ::= " yes" | " no"'),
                        temperature=0, max_tokens=8)
    assert g.text in (" yes", " no")
    lark = smollm.generate("Count: 1, 2,", constraint=Constraint.lark(r'start: " " /[0-9]/ ("," " " /[0-9]/)*'),
                           temperature=1.0, seed=3, max_tokens=12)
    assert all(part.strip().isdigit() for part in lark.text.split(",") if part.strip())
    obj = smollm.chat(ASK, constraint=Constraint.json_object(), temperature=0, max_tokens=120)
    assert isinstance(json.loads(obj.text), dict), obj.text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_bad_constraint_leaves_the_cache_alone(smollm):
    before = smollm.generate("The sky is", temperature=0, max_tokens=4)
    with pytest.raises(InvalidParameterError):
        smollm.generate("The sky is", constraint=Constraint("regex", "a("), max_tokens=4)
    again = smollm.generate("The sky is", temperature=0, max_tokens=4)
    assert again.text == before.text and again.usage.cached_tokens > 0


TRIGGER = "<tool_call>"
CALL_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}
CALL = Constraint.lark(f'start: %json{json.dumps(CALL_ARGS)} "</tool_call>"', trigger=TRIGGER)


def test_lazy_guide_masks_nothing_before_the_trigger_and_stops_after_the_grammar(smollm):
    """The guide on the model's real vocabulary, fed tokens by hand: free text first, then the grammar."""
    import numpy as np

    backend = smollm.backend
    guide = backend.guide(CALL)
    logits = np.zeros(backend.n_vocab, dtype=np.float32)
    for tok in smollm.tokenize("Sure, I will call it. <tool_", add_special=False):
        guide.mask(logits)
        assert np.isfinite(logits).all() and not guide.active
        guide.accept(tok)
    for tok in smollm.tokenize('call>{"city": "Paris"}', add_special=False):
        guide.accept(tok)
    assert guide.triggered and guide.active and not guide.done
    guide.mask(logits)
    allowed = np.flatnonzero(np.isfinite(logits))
    assert 0 < len(allowed) < 100  # only what continues the call: "</tool_call>" pieces
    assert all(smollm.detokenize([int(t)]) and "</tool_call>".startswith(smollm.detokenize([int(t)]))
               for t in allowed), [smollm.detokenize([int(t)]) for t in allowed]
    for tok in smollm.tokenize("</tool_call>", add_special=False):
        guide.accept(tok)
    logits[:] = 0
    guide.mask(logits)
    assert [int(t) for t in np.flatnonzero(np.isfinite(logits))] == [t for t in range(backend.n_vocab)
                                                                     if smollm.is_eog(t)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lazy_trigger_on_generation(smollm):
    """Free text until the model writes the trigger (a few-shot prompt makes it), then a valid call and a stop."""
    prompt = ('Requests and tool calls.\nRequest: weather in Rome\nCall: <tool_call>{"city": "Rome"}</tool_call>\n'
              'Request: weather in Oslo\nCall: <tool_call>{"city": "Oslo"}</tool_call>\n'
              "Request: weather in Paris\nCall:")
    for temperature in (0.0, 1.0):
        c = smollm.generate(prompt, constraint=CALL, temperature=temperature, seed=1, max_tokens=60)
        assert TRIGGER in c.text, c.text
        before, after = c.text.split(TRIGGER, 1)
        assert after.endswith("</tool_call>") and c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(after[: -len("</tool_call>")]), CALL_ARGS)
    # no trigger in the output: nothing constrained, the same text as without the constraint
    free = smollm.generate("The sky is", temperature=0, max_tokens=8)
    assert smollm.generate("The sky is", constraint=CALL, temperature=0, max_tokens=8).text == free.text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_constraints_on_a_batched_model(default_gguf):
    """parallel=2: each sequence has its own guide, sampled from its own row of the batch."""
    schemas = [CITY, {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
                      "required": ["n"]}]
    with edgelm.load(default_gguf, n_ctx=512, parallel=2) as m:
        assert m.capabilities.constraints and m.capabilities.max_sequences == 2
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda s: m.chat(ASK, constraint=Constraint.json_schema(s), temperature=0,
                                                  max_tokens=40), schemas))
        for c, s in zip(done, schemas):
            jsonschema.validate(json.loads(c.text), s)
