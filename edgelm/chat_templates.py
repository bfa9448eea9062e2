"""Chat templates a user may name (``edgelm.load(..., chat_template="gemma")``, ``--chat-template NAME``), and the
checks that keep a model from being chatted with through a format it cannot read.

edgelm never guesses a chat format: a model whose files carry no template answers chat with
:class:`edgelm.NoChatTemplateError` unless the user names one.  A named template (a known name below, or Jinja text)
is rendered on a sample conversation at load time, and every special token it writes (``<|im_start|>``,
``<start_of_turn>``, ``<|start_header_id|>``, ...) must be one token of the model's vocabulary: a template whose
markers the model would read as plain text is refused with :class:`edgelm.InvalidParameterError` naming them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .chat import _compile, render
from .errors import EdgelmError, InvalidParameterError

# The formats of the model families edgelm is used with, written the way their own templates render a conversation
# (bos/eos come from the model).  Roles a format has no marker for are written as the user's.
TEMPLATES: dict[str, str] = {
    # ChatML: SmolLM, Qwen, many fine-tunes
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3.x Instruct
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Gemma 1/2/3 instruction-tuned: turns are "user" and "model"; a system message opens the first user turn
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] | trim + '\n\n' %}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<start_of_turn>model\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% else %}"
        "{{ '<start_of_turn>user\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% set ns.system = '' %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Mistral / Mixtral Instruct ([INST] ... [/INST]); a system message opens the first user turn
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] | trim + '\n\n' %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
        "{% else %}{{ '[INST] ' + ns.system + message['content'] | trim + ' [/INST]' }}{% set ns.system = '' %}"
        "{% endif %}"
        "{% endfor %}"
    ),
    # Phi-3 / Phi-3.5 Instruct
    "phi3": (
        "{% for message in messages %}"
        "{% set role = message['role'] if message['role'] in ('system', 'user', 'assistant') else 'user' %}"
        "{{ '<|' + role + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

# The formats of the families that call tools, with their tools sections (edgelm/data/chat_templates/NAME.jinja,
# short versions of the families' own templates): naming one at load picks the family's tool-call format too
# (edgelm.tools.formats); the plain ones above call tools through the generic format.
TOOL_TEMPLATES = ("hermes", "llama3.1", "mistral-v3", "phi4-mini", "granite3", "smollm3", "functiongemma")
_FOLDER = Path(__file__).parent / "data" / "chat_templates"
TEMPLATES.update({name: (_FOLDER / f"{name}.jinja").read_text("utf-8") for name in TOOL_TEMPLATES})

NAMES = tuple(TEMPLATES)

# what a template writes that must be one token: <|...|> markers (ChatML, Llama 3, Phi-3) and <word_word> markers
# (Gemma's <start_of_turn>); [INST] is plain text in Mistral's own vocabularies, so it is not asked for
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,48}\|>|<[A-Za-z]+(?:_[A-Za-z]+)+>")

# sample conversations rendered to find the markers (a template may refuse a system message, or need alternation)
_SAMPLES = (
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
     {"role": "user", "content": "U"}],
    [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}],
    [{"role": "user", "content": "U"}],
)

_FIX = (f"Pass a known name ({', '.join(NAMES)}) or a Jinja chat template (on the command line: "
        "--chat-template NAME or --chat-template @file.jinja).")


def resolve(value: Any) -> tuple[str, str]:
    """(label, Jinja text) for a user's ``chat_template`` value: a known name (case-insensitive) or Jinja text.
    Raises InvalidParameterError naming the value when it is neither, or does not parse."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameterError(f"Invalid chat_template: {value!r:.80}.", fix=_FIX, parameter="chat_template",
                                    value=value)
    key = value.strip().lower()
    if key in TEMPLATES:
        return key, TEMPLATES[key]
    if "{{" not in value and "{%" not in value:
        raise InvalidParameterError(f"Unknown chat template name {value!r:.80}.", fix=_FIX,
                                    parameter="chat_template", value=value)
    try:
        _compile(value)
    except EdgelmError as exc:
        raise InvalidParameterError(f"The chat_template given does not parse: {exc.message}", fix=_FIX,
                                    parameter="chat_template", value=value) from exc
    return "custom", value


def special_tokens(template: str, *, bos_token: str = "", eos_token: str = "") -> list[str]:
    """The special-token markers ``template`` writes for a sample conversation, in order of first appearance."""
    last: Exception | None = None
    for sample in _SAMPLES:
        try:
            text = render(template, sample, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True)
            break
        except Exception as exc:  # a template's raise_exception, or a Jinja error at render time
            last = exc
    else:
        detail = exc_text(last)
        raise InvalidParameterError(f"The chat_template given cannot render a conversation: {detail}", fix=_FIX,
                                    parameter="chat_template", value=template)
    own = {bos_token, eos_token}  # the model's own bos/eos are its tokens by definition
    return [t for t in dict.fromkeys(_SPECIAL.findall(text)) if t not in own]


def exc_text(exc: BaseException | None) -> str:
    return exc.message if isinstance(exc, EdgelmError) else f"{type(exc).__name__}: {exc}"


def missing_tokens(template: str, backend: Any) -> list[str]:
    """The markers ``template`` writes that ``backend``'s vocabulary does not hold as single tokens."""
    markers = special_tokens(template, bos_token=backend.bos_token, eos_token=backend.eos_token)
    return [t for t in markers if len(backend.tokenize(t, add_special=False, parse_special=True)) != 1]


def apply(value: Any, backend: Any) -> str:
    """Check the user's ``chat_template`` against the loaded ``backend``'s vocabulary and return its Jinja text;
    raises InvalidParameterError naming the special tokens the model lacks, and the known templates it can use."""
    label, template = resolve(value)
    missing = missing_tokens(template, backend)
    if missing:
        fitting = [n for n in NAMES if n != label and special_tokens(TEMPLATES[n]) and  # markers to go by
                   not missing_tokens(TEMPLATES[n], backend)]
        shown = label if label != "custom" else "(the Jinja text given)"
        raise InvalidParameterError(
            f"chat_template={shown} writes special tokens that are not single tokens in this model's vocabulary: "
            f"{', '.join(missing)}. The model would read them as plain text, so this is not its chat format.",
            fix=(f"Use the format the model was trained with (of the known templates, its vocabulary has the tokens "
                 f"of: {', '.join(fitting) or 'none'}), or generate() for plain completion."),
            parameter="chat_template", value=value, missing=missing)
    return template
