"""Tool calling without a model: the checks of tools and tool_choice, each family's format detected from its own
template, its calls parsed back from that template's rendering and from recorded answers (whole and streamed), and
the grammar each call is generated under (compiled by llguidance against the real SmolLM2 vocabulary)."""

from __future__ import annotations

import json

import pytest

import edgelm
from edgelm.chat import render
from edgelm.chat_templates import TEMPLATES, TOOL_TEMPLATES
from edgelm.tools.formats import BY_NAME, FORMATS, GENERIC, detect
from edgelm.tools.parse import ToolCallParser, parse
from edgelm.tools.prompt import prepare
from edgelm.tools.spec import WEATHER, ToolOptions
from edgelm.model import collect
from edgelm.types import Chunk, Usage

ADD = {"type": "function", "function": {"name": "add", "description": "Add numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number", "minimum": 0},
                                     "tags": {"type": "array", "items": {"type": "string"}},
                                     "mode": {"enum": ["x", "y"]}}, "required": ["a"]}}}
CALLS = [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "tags": ["u", "v, w"]})]
NATIVE = [f for f in FORMATS if f.template]
# llguidance's vocabulary reader calls a llama.cpp function that llama-cpp-python marks deprecated, once per token
pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr is deprecated:DeprecationWarning")


# --- what a caller passes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, parameter", [
    ({"tools": WEATHER}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "city: str"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "city": {"type": "text"}}}}}]}, "tools[0].function.parameters.properties.city.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "required": "city"}}}]},
     "tools[0].function.parameters.required"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_are_refused_naming_the_field(kwargs, parameter):
    with pytest.raises(edgelm.InvalidParameterError) as err:
        ToolOptions(**kwargs)
    assert err.value.parameter == parameter, err.value


def test_tools_are_normalised_and_choices_resolved():
    bare = {"name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    options = ToolOptions(tools=[bare, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    assert options.tools[0]["function"]["name"] == "get_weather" and options.tools[0]["type"] == "function"
    assert [t["function"]["name"] for t in options.allowed] == ["add"] and options.forced
    assert ToolOptions(tools=[WEATHER]).active and not ToolOptions(tools=[WEATHER]).forced
    assert not ToolOptions(tools=[WEATHER], tool_choice="none").active
    assert not ToolOptions().active


# --- the families -------------------------------------------------------------------------------------------

def test_each_family_is_detected_from_its_own_template_and_plain_templates_are_generic():
    assert {f.template for f in NATIVE} == set(TOOL_TEMPLATES)
    for fmt in NATIVE:
        assert detect(TEMPLATES[fmt.template]) is fmt, fmt.name
    for name in ("chatml", "llama3", "gemma", "mistral", "phi3"):
        assert detect(TEMPLATES[name]) is GENERIC, name
    # the default SmolLM2's own template (plain ChatML) has no tools branch
    assert detect(edgelm.formats.gguf.read_header(edgelm.default_model_path()).chat_template) is GENERIC


def _conversation(fmt, calls):
    ids = [fmt.new_id() for _ in calls]
    tool_calls = [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                  for i, (n, a) in zip(ids, calls)]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris? And 1+2?"},
            {"role": "assistant", "content": None, "tool_calls": tool_calls}]


def _feed_by_pieces(fmt, text, size):
    parser, content, deltas = ToolCallParser(fmt), [], []
    for i in range(0, len(text), size):
        c, d = parser.feed(text[i:i + size])
        content.append(c)
        deltas += d
    c, d = parser.finish()
    return "".join(content + [c]), deltas, parser.calls


# what each template writes after the assistant's answer (the model ends there with an end-of-generation token)
TURN_END = {"hermes": "<|im_end|>", "smollm3": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>",
            "phi4": "<|end|>", "granite": "<|end_of_text|>", "functiongemma": "<end_of_turn>"}


@pytest.mark.parametrize("fmt", NATIVE, ids=lambda f: f.name)
def test_each_family_parses_the_calls_its_own_template_writes(fmt):
    """Render a conversation whose last turn holds calls through the family's template; the text of that turn,
    as the model would have generated it, parses back to the same calls, whole and streamed in pieces."""
    calls = CALLS if fmt.parallel else CALLS[:1]
    options = ToolOptions(tools=[WEATHER, ADD])
    template = TEMPLATES[fmt.template]
    messages = _conversation(fmt, calls)
    head, extra = prepare(messages[:2], options, fmt)
    prompt = render(template, head, bos_token="<s>", eos_token="</s>", add_generation_prompt=True, **extra)
    assert "get_weather" in prompt and "Current weather in a city" in prompt  # the tools are in the prompt
    whole, extra = prepare(messages, options, fmt)
    full = render(template, whole, bos_token="<s>", eos_token="</s>", add_generation_prompt=False, **extra)
    assert full.startswith(prompt), fmt.name
    answer = full[len(prompt):].split(TURN_END[fmt.name])[0]
    content, found = parse(answer, fmt)
    assert content.strip() == ""
    assert [(c.name, json.loads(c.arguments)) for c in found] == calls
    for size in (1, 3, 7):
        content, deltas, streamed = _feed_by_pieces(fmt, answer, size)
        assert [(c.name, json.loads(c.arguments)) for c in streamed] == calls
        _check_openai_deltas(deltas, streamed)


def _check_openai_deltas(deltas, calls):
    """As OpenAI streams them: per call, first its index, id and name (empty arguments), then argument pieces
    that join into the arguments."""
    by_index: dict[int, list] = {}
    for d in deltas:
        by_index.setdefault(d.index, []).append(d)
    assert sorted(by_index) == list(range(len(calls)))
    for i, call in enumerate(calls):
        first, *rest = by_index[i]
        assert first.id == call.id and first.name == call.name and first.arguments == ""
        assert first.to_dict() == {"index": i, "id": call.id, "type": "function",
                                   "function": {"name": call.name, "arguments": ""}}
        assert all(d.id is None and d.name is None for d in rest)
        assert "".join(d.arguments for d in rest) == call.arguments
        assert rest[0].to_dict().keys() == {"index", "function"}


# answers as the families' models write them (recorded from their model cards and llama.cpp's tests, re-typed)
RECORDED = [
    ("hermes", 'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "I will check.", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>\n<tool_call>\n'
     '{"name": "add", "arguments": {"a": 2}}\n</tool_call>', "", [("get_weather", {"city": "Oslo"}),
                                                                   ("add", {"a": 2})]),
    ("hermes", "No tool needed: 1 + 2 = 3.", "No tool needed: 1 + 2 = 3.", []),
    ("hermes", "I'd write <tool_call> here", "I'd write <tool_call> here", []),  # not a call: kept as text
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', "",
     [("get_weather", {"city": "Rome"})]),
    ("llama3", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]', "",
     [("get_weather", {"city": "Paris"})]),
    ("phi4", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>', "",
     [("get_weather", {"city": "Paris"})]),
    ("granite", '<|tool_call|>[{"arguments": {"city": "Paris"}, "name": "get_weather"}]', "",
     [("get_weather", {"city": "Paris"})]),
    ("smollm3", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Copenhagen"}}\n</tool_call>', "",
     [("get_weather", {"city": "Copenhagen"})]),
    ("functiongemma", "<start_function_call>call:get_weather{city:<escape>São Paulo, {SP}<escape>}"
     "<end_function_call>", "", [("get_weather", {"city": "São Paulo, {SP}"})]),
    ("functiongemma", "<start_function_call>call:add{a:3,tags:[<escape>x<escape>],mode:<escape>y<escape>}"
     "<end_function_call>", "", [("add", {"a": 3, "tags": ["x"], "mode": "y"})]),
    ("generic", '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}', "",
     [("get_weather", {"city": "Paris"})]),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", '
     '"arguments": {"a": 1}}]}', "", [("get_weather", {"city": "Paris"}), ("add", {"a": 1})]),
    ("generic", "Hello! How can I help?", "Hello! How can I help?", []),
    ("generic", "  A reply {with braces} inside.", "  A reply {with braces} inside.", []),
]


@pytest.mark.parametrize("family, answer, content, calls", RECORDED,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(RECORDED)])
def test_recorded_answers_parse_whole_and_streamed(family, answer, content, calls):
    fmt = BY_NAME[family]
    text, found = parse(answer, fmt)
    assert text.strip() == content.strip()
    assert [(c.name, json.loads(c.arguments)) for c in found] == calls
    for size in (1, 2, 5):
        text, deltas, streamed = _feed_by_pieces(fmt, answer, size)
        assert text.strip() == content.strip()
        assert [(c.name, json.loads(c.arguments)) for c in streamed] == calls
        if calls and fmt.body != "functiongemma":
            _check_openai_deltas(deltas, streamed)


def test_collect_joins_deltas_into_calls():
    fmt = BY_NAME["hermes"]
    _, deltas, calls = _feed_by_pieces(fmt, RECORDED[1][1], 4)
    chunks = [Chunk("", tool_calls=(d,)) for d in deltas] + [Chunk("", "tool_calls", Usage(1, 1))]
    done = collect(iter(chunks))
    assert done.tool_calls == tuple(calls) and done.finish_reason == "tool_calls"
    assert done.tool_calls[0].to_dict()["function"]["arguments"] == '{"city": "Oslo"}'


def test_generic_format_describes_the_tools_in_a_system_message_and_rewrites_history():
    options = ToolOptions(tools=[WEATHER])
    messages = _conversation(GENERIC, CALLS[:1]) + [
        {"role": "tool", "tool_call_id": "x", "content": "18 C"}]
    messages[-1]["tool_call_id"] = messages[2]["tool_calls"][0]["id"]
    out, extra = prepare(messages, options, GENERIC)
    assert extra == {}
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.") and "get_weather" in out[0][
        "content"] and "plain text" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert out[3] == {"role": "user", "content": '{"tool_response": {"name": "get_weather", "content": "18 C"}}'}
    text = render(TEMPLATES["chatml"], out)
    assert "tool_call" in text and "tool_response" in text


def test_bad_history_names_the_field():
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(edgelm.InvalidParameterError) as err:
        prepare(messages, ToolOptions(tools=[WEATHER]), GENERIC)
    assert err.value.parameter == "messages[1].tool_calls[0].function.arguments"


# --- the grammars -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lltokenizer(default_gguf):
    llguidance = pytest.importorskip("llguidance")
    from llguidance.llamacpp import lltokenizer_from_vocab

    from edgelm.native.llamacpp import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(default_gguf).encode(), params)
    tok = lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(model))
    yield llguidance, tok
    llama_cpp.llama_model_free(model)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("choice", ["required", "auto", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "auto", "named"])
def test_grammars_accept_the_familys_calls_and_refuse_bad_arguments(lltokenizer, fmt, choice):
    from edgelm.tools.grammar import build

    llguidance, tok = lltokenizer
    options = ToolOptions(tools=[WEATHER, ADD], tool_choice=choice)
    grammar = build(fmt, options)
    assert bool(grammar.triggers) == (choice == "auto" and bool(fmt.starts) and not fmt.leading), grammar.triggers

    def accepts(text: str) -> bool:
        m = llguidance.LLMatcher(tok, grammar.constraint().grammar())
        assert not m.is_error(), m.get_error()
        if grammar.triggers:  # lazy: the grammar reads what follows the marker
            assert text.startswith(grammar.triggers[0])
            text = text[len(grammar.triggers[0]):]
        return m.consume_tokens(tok.tokenize_str(text)) and m.is_accepting()

    calls = CALLS if isinstance(choice, str) else CALLS[1:]
    assert accepts(fmt.write(calls if fmt.parallel else calls[:1]))
    bad = [("add", {"a": "one"})]  # a string where the schema says integer
    assert not accepts(fmt.write(bad))
    assert not accepts(fmt.write([("get_time", {})]))  # not one of the tools
    if choice == "required" and fmt.body == "wrapped":
        assert not accepts("Hello")
    if choice == "auto" and not grammar.triggers:
        assert accepts("The weather is fine.")  # a plain reply, where the call opens the answer


def test_no_parallel_calls_when_not_allowed(lltokenizer):
    from edgelm.tools.grammar import build

    llguidance, tok = lltokenizer
    for fmt in (BY_NAME["hermes"], GENERIC, BY_NAME["mistral"]):
        grammar = build(fmt, ToolOptions(tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False))
        m = llguidance.LLMatcher(tok, grammar.constraint().grammar())
        assert not (m.consume_tokens(tok.tokenize_str(fmt.write(CALLS))) and m.is_accepting()), fmt.name
