"""`edgelm run`, `edgelm chat`, `edgelm info`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from edgelm import loader
from edgelm.model import Model
from edgelm.runtimes.base import context_for

from .common import handle_errors
from .options import generation_options, load_options, pop_generation, pop_load


# bytes allowed for what a chat template adds around one message (markers, a default system prompt); a template
# that adds more only costs a second load with the default window (run_command checks the count)
CHAT_TEMPLATE_ALLOWANCE = 1024


def load_model(model: str | None, kwargs: dict[str, Any]) -> Model:
    return loader.load(model, **pop_load(kwargs))


def _print_stats(last: Any) -> None:
    if last is None or last.usage is None or last.timings is None:
        return
    u, t = last.usage, last.timings
    click.secho(
        f"[{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated, "
        f"first token {t.prompt_seconds * 1000:.0f} ms, {t.tokens_per_second(u.completion_tokens):.1f} tok/s, "
        f"finish: {last.finish_reason}]",
        dim=True,
        err=True,
    )


def stream_to_terminal(chunks: Any) -> Any:
    last = None
    for chunk in chunks:
        if chunk.text:
            click.echo(chunk.text, nl=False)
        last = chunk
    click.echo()
    return last


@click.command("run")
@click.argument("args", nargs=-1, required=True, metavar="[MODEL] PROMPT")
@click.option("--raw", is_flag=True, help="Complete the prompt as plain text instead of as a chat message.")
@click.option("-s", "--system", default=None, help="System message (chat mode).")
@click.option("--stats", is_flag=True, help="Print token counts and speed to stderr afterwards.")
@load_options()
@generation_options
@handle_errors
def run_command(args: tuple[str, ...], raw: bool, system: str | None, stats: bool, **kwargs: Any) -> None:
    """Stream a model's answer to PROMPT.

    MODEL is a .gguf file or an ONNX folder; without it the embedded SmolLM2-135M-Instruct answers.  PROMPT is
    sent as a chat message through the model's own chat template (use --raw for plain completion); a model
    without a template completes PROMPT as plain text and says so (--chat-template NAME|@file.jinja names a
    format for it); "-" reads it from stdin.

    \b
    Examples:
      edgelm run "What is the capital of France?"
      edgelm run model.gguf "Write a haiku about the sea" -t 0.7 -n 64
      edgelm run --raw "Once upon a time" --stop "." --seed 1
      edgelm run gemma-3-270m-it.gguf "Hi" --chat-template gemma
      edgelm run "Is water wet?" --grammar 'root ::= "yes" | "no"' -t 0
      edgelm run "A person as JSON" --json-schema @person.schema.json -t 0
      edgelm run --raw "def fib(n):" --repeat-penalty 1.1 --repeat-last-n 128 --kv-cache q8_0
      echo "Summarise: ..." | edgelm run model.gguf -
    """
    if len(args) > 2:
        raise click.UsageError(f"Expected [MODEL] PROMPT, got {len(args)} arguments: quote the prompt.")
    model, prompt = (args[0], args[1]) if len(args) == 2 else (None, args[0])
    if prompt == "-":
        prompt = sys.stdin.read()
    params = pop_generation(kwargs)
    load = pop_load(kwargs)
    sized = None  # one prompt, a known answer length: a KV cache for that, not for the default window
    if load.get("n_ctx") is None and params.get("max_tokens"):
        text = len(prompt.encode("utf-8")) + len((system or "").encode("utf-8"))
        trained = loader.inspect(model).get("context_length")  # from the header: an ONNX graph's window is a limit
        sized = context_for(text + (0 if raw else CHAT_TEMPLATE_ALLOWANCE), params["max_tokens"], trained=trained)
    m = loader.load(model, **load, **({"n_ctx": sized} if sized else {}))
    try:
        if not raw and m.chat_template is None and not system:  # never a guessed chat format (edgelm.chat_templates)
            click.secho(f"{m.info.name or m.info.path} has no chat template: running a plain completion of the prompt "
                        "(--chat-template NAME to chat with it; --raw skips this notice).", dim=True, err=True)
            raw = True
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if sized:
            n_prompt = len(m.tokenize(prompt) if raw else m.chat_tokens(messages))
            if n_prompt + params["max_tokens"] > m.n_ctx:  # the template added more than allowed for
                m.close()
                m = loader.load(model, **load)
        chunks = m.stream(prompt, **params) if raw else m.stream_chat(messages, **params)
        last = stream_to_terminal(chunks)
        if stats:
            _print_stats(last)
    finally:
        m.close()


CHAT_HELP = "Commands: /reset clears the conversation, /bye (or Ctrl-D) quits, /help shows this."


@click.command("chat")
@click.argument("model", required=False)
@click.option("-s", "--system", default=None, help="System message for the whole conversation.")
@click.option("--stats", is_flag=True, help="Print token counts and speed after each answer.")
@load_options()
@generation_options
@handle_errors
def chat_command(model: str | None, system: str | None, stats: bool, **kwargs: Any) -> None:
    """Chat with a model in the terminal (multi-turn, streaming).

    Without MODEL, chats with the embedded SmolLM2-135M-Instruct.  Type a message and press Enter; /reset
    starts over, /bye or Ctrl-D quits.  Input may also be piped, one message per line.

    \b
    Examples:
      edgelm chat
      edgelm chat model.gguf --system "You are terse." -t 0.2
      edgelm chat base-model.gguf --chat-template chatml     # a model whose file has no template
    """
    params = pop_generation(kwargs)
    interactive = sys.stdin.isatty()
    with load_model(model, kwargs) as m:
        m.require_chat_template()  # a model without one: the typed error (its fix names --chat-template)
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        base = list(history)
        if interactive:
            click.secho(f"edgelm chat with {m.info.name or m.info.path} ({m.info.backend}). {CHAT_HELP}", dim=True,
                        err=True)
        while True:
            try:
                line = input(">>> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and line == "":
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/bye", "/exit", "/quit"):
                break
            if line == "/reset":
                history = list(base)
                click.secho("(conversation cleared)", dim=True, err=True)
                continue
            if line in ("/help", "/?"):
                click.echo(CHAT_HELP, err=True)
                continue
            history.append({"role": "user", "content": line})
            parts: list[str] = []
            last = None
            try:
                for chunk in m.stream_chat(history, **params):
                    if chunk.text:
                        parts.append(chunk.text)
                        click.echo(chunk.text, nl=False)
                    last = chunk
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
                click.echo()
                click.secho("(answer interrupted)", dim=True, err=True)
            else:
                click.echo()
            history.append({"role": "assistant", "content": "".join(parts)})
            if stats:
                _print_stats(last)


@click.command("info")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
@handle_errors
def info_command(model: str | None, as_json: bool) -> None:
    """Show a model's metadata: format, architecture, quantization, parameters, context length.

    Reads only the file's header (fast, nothing is loaded); without MODEL, describes the embedded default.

    \b
    Examples:
      edgelm info model.gguf
      edgelm info model.gguf --json | jq .quantization
    """
    facts = loader.inspect(model)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif key == "parameters":
            value = f"{value:,}"
        elif key == "size_bytes":
            value = f"{value:,} ({value / 1e6:.1f} MB)"
        click.echo(f"{key:<{width}}  {value}")


COMMANDS = [run_command, chat_command, info_command]
