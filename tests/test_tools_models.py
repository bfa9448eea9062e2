"""Tool calling on the real SmolLM2-135M-Instruct, on both backends (llama.cpp GGUF and onnxruntime fp32 ONNX, which
holds the GGUF's own weights): the probe of issue 24 (tools=[get_weather], tool_choice="required" gives a valid
get_weather call with a city, streamed and not), a named tool, tool_choice="none", a two-turn agent loop (call, the
tool's result, the final answer), a family's template named at load, and a model without a chat template."""

from __future__ import annotations

import json

import pytest

import edgelm
from edgelm.tools.spec import WEATHER

from .test_chat_templates import without_chat_template

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:llama_token_get_attr is deprecated")]

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                         "parameters": {"type": "object", "properties": {
                                             "zone": {"type": "string", "enum": ["UTC", "CET"]}},
                                             "required": ["zone"]}}}


def _valid(call, tool=WEATHER):
    import jsonschema

    assert call.name == tool["function"]["name"] and call.id and call.type == "function"
    args = json.loads(call.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


@pytest.fixture(scope="module", params=["llamacpp", "onnxruntime"])
def model(request, default_gguf, tmp_path_factory):
    if request.param == "llamacpp":
        path = default_gguf
    else:
        from edgelm.converters.onnx import convert_to_onnx

        from .hf_fixtures import smollm2_hf_checkpoint

        path = convert_to_onnx(smollm2_hf_checkpoint(), tmp_path_factory.mktemp("onnx") / "fp32", "fp32")
    with edgelm.load(path, n_ctx=2048, threads=2) as m:
        assert m.tool_format.name == "generic"  # SmolLM2's template has no tools branch
        yield m


@pytest.mark.timeout(600)
def test_required_gives_a_valid_get_weather_call_streamed_and_not(model):
    done = model.chat(ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64)
    assert done.finish_reason == "tool_calls" and len(done.tool_calls) == 1, done
    assert _valid(done.tool_calls[0])["city"]
    chunks = list(model.stream_chat(ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64))
    deltas = [d for c in chunks for d in c.tool_calls]
    assert deltas[0].name == "get_weather" and deltas[0].id and deltas[0].arguments == ""
    assert json.loads("".join(d.arguments for d in deltas)) == json.loads(done.tool_calls[0].arguments)
    assert chunks[-1].finish_reason == "tool_calls" and not "".join(c.text for c in chunks).strip()
    # sampled at temperature 1 too: whatever the model picks, the call validates
    for seed in (1, 2, 3):
        sampled = model.chat(ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=seed,
                             max_tokens=96)
        assert sampled.tool_calls and sampled.finish_reason == "tool_calls"
        for call in sampled.tool_calls:
            _valid(call, WEATHER if call.name == "get_weather" else TIME)


@pytest.mark.timeout(600)
def test_a_named_tool_and_none(model):
    named = model.chat(ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
                       temperature=0, max_tokens=64)
    assert [c.name for c in named.tool_calls] == ["get_time"]
    assert _valid(named.tool_calls[0], TIME)["zone"] in ("UTC", "CET")
    plain = model.chat(ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12)
    assert not plain.tool_calls and plain.finish_reason in ("stop", "length") and plain.text
    # "none" keeps the tools out of the prompt: the same prompt as without tools
    assert model.apply_chat_template(ASK, tools=[WEATHER], tool_choice="none") == model.apply_chat_template(ASK)


@pytest.mark.timeout(900)
def test_two_turn_agent_loop(model):
    """call -> the tool's result -> the final answer, as an agent runs it; the result reaches the prompt."""
    messages = list(ASK)
    first = model.chat(messages, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64)
    call = first.tool_calls[0]
    city = _valid(call)["city"]
    messages.append({"role": "assistant", "content": None, "tool_calls": [call.to_dict()]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": f"Sunny, 18 degrees C in {city}."})
    prompt = model.apply_chat_template(messages, tools=[WEATHER])
    assert "Sunny, 18 degrees C" in prompt and call.arguments in prompt
    final = None
    for choice in ("auto", "auto", "none"):  # an agent lets the model call again, then asks for the answer
        final = model.chat(messages, tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=48)
        if not final.tool_calls:
            break
        for again in final.tool_calls:
            _valid(again)
            messages.append({"role": "assistant", "content": None, "tool_calls": [again.to_dict()]})
            messages.append({"role": "tool", "tool_call_id": again.id, "content": "Sunny, 18 degrees C."})
    assert final is not None and not final.tool_calls and final.text.strip()
    assert final.finish_reason in ("stop", "length")


@pytest.mark.timeout(600)
def test_a_family_template_named_at_load_picks_its_format(default_gguf):
    """chat_template="hermes" on SmolLM2: the tools go through that template's tools section, calls come back
    between <tool_call> tags (plain text in SmolLM2's vocabulary) and are parsed."""
    with edgelm.load(default_gguf, n_ctx=2048, chat_template="hermes") as m:
        assert m.tool_format.name == "hermes"
        prompt = m.apply_chat_template(ASK, tools=[WEATHER])
        assert "<tools>" in prompt and '"name": "get_weather"' in prompt
        done = m.chat(ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64)
        assert done.finish_reason == "tool_calls" and _valid(done.tool_calls[0])["city"]
        raw = m.detokenize(done.tokens)
        assert raw.startswith("<tool_call>\n{") and raw.rstrip().endswith("</tool_call>"), raw


@pytest.mark.timeout(160)
def test_a_model_without_a_chat_template_gets_the_typed_error(default_gguf, tmp_path):
    base = without_chat_template(default_gguf, tmp_path / "smollm2-no-template.gguf")  # as a base model's GGUF
    with edgelm.load(base, n_ctx=512) as m:
        with pytest.raises(edgelm.NoChatTemplateError, match="chat_template="):
            m.chat(ASK, tools=[WEATHER], tool_choice="required")


def test_tools_with_a_constraint_are_refused(smollm):
    with pytest.raises(edgelm.InvalidParameterError) as err:
        smollm.chat(ASK, tools=[WEATHER], grammar='root ::= "yes"')
    assert err.value.parameter == "grammar"
