"""`edgelm serve`."""

from __future__ import annotations

from typing import Any, Callable

import click

from edgelm import server
from edgelm.autoconvert import AUTO_CONVERT
from edgelm.measure import measured_alternatives
from edgelm.plan import PARALLEL_PPL_BUDGET

from .common import handle_errors
from .options import generation_options, load_options, pop_generation, pop_given, pop_load, table_options


@click.command("serve")
@click.argument("models", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", envvar="EDGELM_API_KEY", default=None,
              help="Require this key (Authorization: Bearer KEY); also from EDGELM_API_KEY.")
@click.option("--keep-alive", type=float, default=300.0, show_default=True,
              help="Unload a model after this many idle seconds (it reloads on the next request).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow browser requests from this origin.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without --api-key.")
@click.option("--no-ui", is_flag=True, help="Do not serve the chat page at / (the API only).")
@load_options()
@generation_options
@table_options(AUTO_CONVERT)  # --max-ppl-increase: a checkpoint's conversion (edgelm.autoconvert.AutoConvertOptions)
@handle_errors
def serve_command(models: tuple[str, ...], host: str, port: int, api_key: str | None, keep_alive: float,
                  cors_origins: tuple[str, ...], insecure: bool, no_ui: bool, **kwargs: Any) -> None:
    """Serve models over OpenAI- and Ollama-compatible HTTP APIs (streamed tokens).

    MODELS are .gguf files or ONNX folders, served by file name or as NAME=PATH; without any, the embedded
    SmolLM2-135M-Instruct is served as "smollm2-135m-instruct".  Models load on first use, with the load options
    given here (an option that does not apply to a model's backend is ignored for it, with a warning).
    Generation options given here are the served models' defaults; each request may override them.

    A Hugging Face checkpoint (a folder, or a Hub id; HF_HUB_OFFLINE=1 takes it from the HF cache) is converted
    to GGUF once, before serving: of the quantizations within --max-ppl-increase, the one that serves --parallel N
    streams the most tokens per second on this CPU (each measured), as `edgelm convert SRC --quant auto --parallel
    N` chooses.  The GGUF is kept under $EDGELM_HOME/converted/ and served again next time without converting.

    \b
    Open http://127.0.0.1:8080/ in a browser to chat (works offline; --no-ui turns the page off).

    \b
    Routes: POST /v1/chat/completions, /v1/completions; GET /v1/models; POST /api/chat, /api/generate,
    /api/show; GET /api/tags, /api/ps, /api/version; GET /health, /metrics; GET / (the chat page).

    \b
    Examples:
      edgelm serve
      edgelm serve qwen=models/qwen.gguf smollm=models/smollm.gguf --port 9000
      edgelm serve --n-ctx 8192 --kv-cache q8_0 --threads 4 --temperature 0.2
      edgelm serve --parallel 4 HuggingFaceTB/SmolLM2-135M-Instruct      # converted once for 4 streams
      curl localhost:8080/v1/chat/completions -d '{"model": "smollm2-135m-instruct",
           "messages": [{"role": "user", "content": "Hi"}], "stream": true}'
    """
    server.check_bind(host, api_key, insecure)  # refuse before loading anything
    defaults = pop_generation(kwargs)
    load = pop_load(kwargs)
    budget = pop_given(kwargs, AUTO_CONVERT)
    if defaults:
        load["defaults"] = defaults
    names = server.model_names(list(models) or None, parallel=load.get("parallel"), threads=load.get("threads"),
                               progress=_progress(), **budget)
    page = "" if no_ui else f", chat page: http://{host}:{port}/"
    click.secho(f"edgelm serving {', '.join(names)} on http://{host}:{port} (OpenAI: /v1, Ollama: /api{page})",
                err=True)
    _faster_layouts(names, load)
    server.serve(names, host=host, port=port, api_key=api_key, insecure=insecure, keep_alive=keep_alive,
          cors_origins=list(cors_origins) or None, load_kwargs=load, ui=not no_ui)


def _progress() -> Callable[[str, float], None]:
    """A served checkpoint's conversion, one line per step on stderr (a step's repeated reports once)."""
    last = {"message": ""}

    def progress(message: str, fraction: float) -> None:
        if message != last["message"]:
            last["message"] = message
            click.secho(message, err=True)

    return progress


def _faster_layouts(names: dict[str, Any], load: dict[str, Any]) -> None:
    """With --parallel N > 1: say when another quantization of a served GGUF, measured on this CPU, serves N streams
    faster (llama.cpp's batched kernels differ by weight type; `edgelm convert --parallel N` measures them)."""
    parallel = load.get("parallel") or 1
    for name, path in names.items():
        if parallel <= 1 or path is None or path.suffix != ".gguf":
            continue
        faster = measured_alternatives(path, parallel, threads=load.get("threads"))
        if faster:
            best = faster[0]
            click.secho(f"hint: {best['quant'].upper()} of this model served {parallel} streams {best['speedup']:.2f}x "
                        f"faster than {path.name} on this CPU (measured): `edgelm convert SRC --quant auto --parallel "
                        f"{parallel} --max-ppl-increase {PARALLEL_PPL_BUDGET}` keeps the fastest within a quality budget (`edgelm "
                        f"serve --parallel {parallel} SRC` with the checkpoint does it by itself).", err=True)


COMMANDS = [serve_command]
