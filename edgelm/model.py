"""The Model API: one object over any backend.

The backend yields token ids; this module turns them into text exactly once for every backend: UTF-8 safe
incremental decoding, stop strings that never leak into the output, context-window checks, usage and timings.
"""

from __future__ import annotations

import codecs
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Sequence

from . import chat as chat_templates
from .errors import (BackendError, ContextLengthExceededError, InvalidParameterError, ModelClosedError,
                     ModelNotFoundError, NoChatTemplateError, UnsupportedModelError)
from .native.memory import trim_heap
from .params import GenerationKwargs, GenerationParams
from .runtimes.scheduler import NO_TOKEN, Direct, Scheduler
from .tools.spec import ChatKwargs, ToolOptions, split
from .types import Chunk, Completion, ModelInfo, Timings, ToolCall, Usage

if TYPE_CHECKING:
    import numpy as np

    from .tools.formats import ToolFormat
    from .tools.grammar import ToolGrammar
    from .tools.parse import ToolCallParser
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; type checkers ship typing_extensions


class Model:
    """A loaded model.  Create it with :func:`edgelm.load`; use it as a context manager or call :meth:`close`.

    Its methods may be called from several threads at once.  A model loaded with ``parallel=N`` (llama.cpp)
    generates up to N streams at the same time, batched, and queues the rest in arrival order; otherwise
    generations run one at a time, in arrival order.  Either way each sequence's KV cache is kept, so a prompt
    that extends an earlier one (the next chat turn) only evaluates the new tokens.
    """

    def __init__(self, backend: Any, info: ModelInfo, defaults: GenerationParams | None = None) -> None:
        self._backend = backend
        self.info = info
        self.defaults = defaults or GenerationParams()
        self._closed = False
        batched = backend.capabilities.max_sequences > 1
        self._engine: Any = Scheduler(backend) if batched else Direct(backend)

    # --- tokens ---------------------------------------------------------------------------------------------

    @property
    def backend(self) -> Any:
        if self._closed:
            raise ModelClosedError(f"Model {self.info.path} is closed.", fix="Load it again with edgelm.load().")
        return self._backend

    @property
    def watchable(self) -> bool:
        """Whether its streams can be read without a thread of their own (:meth:`ChunkStream.watch`): a batched
        model's (parallel > 1), whose tokens come from the scheduler's thread."""
        return self._engine.pushes

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def capabilities(self) -> Any:
        """What the backend can do (:class:`edgelm.runtimes.Capabilities`): max_sequences, grammar, state, ..."""
        return self.backend.capabilities

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidParameterError(f"Invalid text to tokenize: {text!r:.80}.", fix="Pass a str.",
                                        parameter="text", value=text)
        return self.backend.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.token_bytes(tokens).decode("utf-8", errors="replace")

    def token_bytes(self, tokens: Sequence[int]) -> bytes:
        """The raw bytes of ``tokens`` (one token may hold part of a UTF-8 character; control tokens have none)."""
        backend = self.backend
        return b"".join(backend.token_bytes(int(t)) for t in tokens)

    def is_eog(self, token: int) -> bool:
        """True for the model's end-of-generation tokens (eos, end of turn)."""
        return self.backend.is_eog(int(token))

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template :meth:`chat` uses: the one named at load (``chat_template=``), else the model's
        own; None when there is neither (chat then raises NoChatTemplateError; :meth:`generate` still works)."""
        return self.backend.chat_template or None

    def require_chat_template(self) -> str:
        """:attr:`chat_template`, or NoChatTemplateError (whose fix names ``chat_template=`` and ``generate``)."""
        template = self.chat_template
        if template is not None:
            return template
        where = {"gguf": "no tokenizer.chat_template in the GGUF", "onnx": "no chat_template.jinja, and none in "
                 "tokenizer_config.json"}.get(self.info.format, "none in its files")
        raise NoChatTemplateError(
            f"{self.info.name or Path(self.info.path).name} has no chat template ({where}; often a base model, not "
            "instruction-tuned), and edgelm does not guess one: a wrong format makes the model read its markers as "
            "plain text.",
            fix="If you know the format it was trained with, load it with chat_template= (a Jinja string or a known "
            "name: chatml, llama3, gemma, mistral, phi3; on the command line --chat-template NAME or "
            "@file.jinja); for plain text completion use generate() (`edgelm run MODEL \"text\"` does that for such "
            "a model).", path=self.info.path)

    @property
    def tool_format(self) -> ToolFormat:
        """How this model writes a tool call (:data:`edgelm.tools.formats.FORMATS`), read from its chat template:
        Hermes/Qwen, Llama 3.1, Mistral, Phi-4-mini, Granite, SmolLM3, FunctionGemma, or the generic format (a
        template with no tools branch).  ``chat_template=`` at load picks a family's template, and with it its
        format."""
        from .tools.formats import detect  # the tools' modules load with the first call that uses tools

        return detect(self.require_chat_template())

    def apply_chat_template(self, messages: Any, *, add_generation_prompt: bool = True,
                            tools: Sequence[Any] | None = None, tool_choice: Any = None,
                            parallel_tool_calls: bool | None = None) -> str:
        """The prompt :meth:`chat` gives the model: ``messages`` (and ``tools``) through its chat template."""
        options = split({"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls})[1]
        return self._chat_prompt(messages, options, add_generation_prompt=add_generation_prompt)

    def _chat_prompt(self, messages: Any, options: ToolOptions, *, add_generation_prompt: bool = True) -> str:
        backend = self.backend
        template = self.require_chat_template()
        msgs = chat_templates.validate_messages(messages)
        extra: dict[str, Any] = {}
        if options.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs):
            from .tools.formats import detect
            from .tools.prompt import prepare

            msgs, extra = prepare(msgs, options, detect(template))
        return chat_templates.render(template, msgs, bos_token=backend.bos_token, eos_token=backend.eos_token,
                                     add_generation_prompt=add_generation_prompt, **extra)

    # --- generation -----------------------------------------------------------------------------------------

    def params(self, **overrides: Unpack[GenerationKwargs]) -> GenerationParams:
        """This model's defaults with ``overrides`` applied and validated."""
        return self.defaults.merged(**overrides)

    def stream(self, prompt: str, **params: Unpack[GenerationKwargs]) -> "ChunkStream":
        """Stream a completion of raw ``prompt`` text (no chat template)."""
        if not isinstance(prompt, str):
            raise InvalidParameterError(f"Invalid prompt: {prompt!r:.80}.", fix="Pass the prompt as a str.",
                                        parameter="prompt", value=prompt)
        p = self.params(**params)
        tokens = self.tokenize(prompt, add_special=True, parse_special=False)
        return self._stream_tokens(tokens, p)

    def stream_chat(self, messages: Any, **params: Unpack[ChatKwargs]) -> "ChunkStream":
        """Stream the assistant's reply to ``messages``, formatted by the model's own chat template.

        With ``tools=[...]`` the model may call them (``tool_choice``: "auto", "none", "required" or a named
        tool): chunks then carry :class:`ToolCallDelta` pieces of the calls, the last one finish_reason
        "tool_calls".  Each call is generated under its tool's JSON schema, so its arguments always parse and
        validate.  Messages may hold earlier calls (an assistant's ``tool_calls``) and their results (role
        ``tool`` with ``tool_call_id``): the template shows them to the model."""
        generation, options = split(dict(params))
        p = self.params(**generation)
        tokens = self._prompt_tokens(self._chat_prompt(messages, options))
        if not options.active:
            return self._stream_tokens(tokens, p)
        from .tools import grammar as tool_grammar
        from .tools.parse import ToolCallParser

        fmt = self.tool_format
        p = self._constrained(p, tool_grammar.build(fmt, options, token=self._special_token))
        stream = self._stream_tokens(tokens, p)
        return ChunkStream(_tool_chunks(stream, ToolCallParser(fmt)), stream._source)

    def _special_token(self, text: str) -> int | None:
        """The id of the one special (control) token that writes ``text``, or None when it is plain text."""
        backend = self.backend
        ids = backend.tokenize(text, add_special=False, parse_special=True)
        if len(ids) == 1 and backend.tokenize(text, add_special=False, parse_special=False) != ids:
            return ids[0]
        return None

    def _constrained(self, p: GenerationParams, grammar: ToolGrammar) -> GenerationParams:
        """``p`` with the calls' grammar as its constraint (one engine on every backend: edgelm.constraints)."""
        if p.constraint is not None or p.grammar is not None:
            given = "constraint" if p.constraint is not None else "grammar"
            raise InvalidParameterError(
                f"{given}= and tools= both constrain the answer; edgelm generates tool calls under their own grammar.",
                fix=f'Drop {given}=, or pass tool_choice="none" to answer under {given}= without calls.',
                parameter=given, value=str(p.constraint or p.grammar)[:80])
        # a backend that cannot constrain refuses it in _stream_tokens: never a call whose schema was not enforced
        return p.merged(constraint=grammar.constraint())

    def chat_tokens(self, messages: Any, **tools: Unpack[ChatKwargs]) -> list[int]:
        """The prompt's tokens for ``messages`` (and ``tools``), as :meth:`chat` gives them to the model."""
        return self._prompt_tokens(self._chat_prompt(messages, split(dict(tools))[1]))

    def _prompt_tokens(self, text: str) -> list[int]:
        bos = self.backend.bos_token
        # templates usually write the BOS text themselves; never add a second one
        add_special = not (bos and text.startswith(bos))
        return self.backend.tokenize(text, add_special=add_special, parse_special=True)

    def generate(self, prompt: str, **params: Unpack[GenerationKwargs]) -> Completion:
        return collect(self.stream(prompt, **params))

    def chat(self, messages: Any, **params: Unpack[ChatKwargs]) -> Completion:
        """The assistant's reply to ``messages`` (see :meth:`stream_chat`); calls in ``Completion.tool_calls``."""
        return collect(self.stream_chat(messages, **params))

    def stream_tokens(self, tokens: Sequence[int], **params: Unpack[GenerationKwargs]) -> "ChunkStream":
        """Stream from already-tokenized input (used by the server and benchmarks)."""
        return self._stream_tokens(list(tokens), self.params(**params))

    def generate_batch(self, prompts: Sequence[str], *, progress: Any = None,
                       **params: Unpack[GenerationKwargs]) -> list[Completion]:
        """Complete every prompt; results in input order.  On a model loaded with ``parallel=N`` they run N at a
        time, batched (offline work: tagging a thousand documents); ``progress(done, total)`` after each."""
        return self._batch([lambda p=p: self.stream(p, **params) for p in prompts], progress)

    def chat_batch(self, conversations: Sequence[Any], *, progress: Any = None,
                   **params: Unpack[ChatKwargs]) -> list[Completion]:
        """:meth:`chat` for every conversation; results in input order (see :meth:`generate_batch`)."""
        self.require_chat_template()  # before any conversation starts
        return self._batch([lambda c=c: self.stream_chat(c, **params) for c in conversations], progress)

    def _batch(self, starts: list[Any], progress: Any) -> list[Completion]:
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, self.capabilities.max_sequences)
        done = 0
        lock = threading.Lock()

        def run(start: Any) -> Completion:
            nonlocal done
            result = collect(start())
            with lock:
                done += 1
                if progress is not None:
                    progress(done, len(starts))
            return result

        # one consumer per sequence: every running stream is read as fast as it is generated
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgelm-batch") as pool:
            return list(pool.map(run, starts))

    def _stream_tokens(self, tokens: list[int], p: GenerationParams) -> "ChunkStream":
        backend = self.backend
        n_ctx = backend.n_ctx
        n_prompt = len(tokens)
        if n_prompt == 0:
            raise InvalidParameterError("The prompt is empty (0 tokens).", fix="Pass some text to complete.",
                                        parameter="prompt", value="")
        if n_prompt >= n_ctx:
            raise ContextLengthExceededError(
                f"The prompt has {n_prompt} tokens but the context window is {n_ctx} tokens "
                f"(and at least one token must be left to generate).",
                fix="Shorten the prompt, or load the model with a larger n_ctx "
                f"(the model was trained for {self.info.trained_context_length or 'an unknown number of'} tokens).",
                prompt_tokens=n_prompt,
                n_ctx=n_ctx,
            )
        if (p.constraint is not None and not self.capabilities.constraints) or (p.grammar and not
                                                                                self.capabilities.grammar):
            name = "constraint" if p.constraint is not None else "grammar"
            raise InvalidParameterError(f"The {backend.name} backend cannot constrain its output ({name}=).",
                                        fix="Use the llama.cpp or onnxruntime backend, or drop it.", parameter=name,
                                        value=getattr(p.constraint, "kind", p.grammar))
        room = n_ctx - n_prompt
        limit = room if p.max_tokens is None else min(p.max_tokens, room)
        # submitted now (a batched model starts reading the prompt at once); checks above raise at call time
        start = time.perf_counter()  # the time to the first token counts from here, however late the first next()
        source = self._engine.submit(tokens, p, limit)
        return ChunkStream(self._chunks(source, backend, n_prompt, limit, p, start), source)

    def _chunks(self, source: Any, backend: Any, n_prompt: int, limit: int, p: GenerationParams,
                start: float) -> Generator[Chunk, None, None]:
        stops = p.stop
        longest_stop = max((len(s) for s in stops), default=0)
        if stops:
            from .tools.parse import held_back  # the text a stop string may still begin with (one helper for both)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        token_bytes, is_eog = backend.token_bytes, backend.is_eog
        pending = ""
        n_out = 0
        finish = "length"
        stopped_by_string = False
        first = None
        ids: list[int] = []  # generated since the last chunk
        try:
            for token in source:
                if token == NO_TOKEN:  # a watched source with nothing ready yet (ChunkStream.watch)
                    yield WAITING
                    continue
                if first is None:
                    first = time.perf_counter()
                if is_eog(token):
                    finish = "stop"
                    break
                n_out += 1
                ids.append(token)
                piece = decoder.decode(token_bytes(token))
                if piece:
                    if stops:
                        pending += piece
                        cut = _find_stop(pending, stops, len(piece) + longest_stop)
                        if cut >= 0:
                            pending = pending[:cut]
                            finish, stopped_by_string = "stop", True
                            break
                        keep = held_back(pending, stops)
                        emit = pending[: len(pending) - keep]
                        pending = pending[len(pending) - keep :]
                        if emit:
                            yield Chunk(emit, tokens=tuple(ids))
                            ids = []
                    else:
                        yield Chunk(piece, tokens=tuple(ids))
                        ids = []
                if n_out >= limit:
                    break
            else:  # the source ended before the limit: cancel() from another thread, or the model was closed
                if self._closed:
                    raise ModelClosedError(f"Model {self.info.path} was closed while this generation ran.",
                                           fix="Load it again with edgelm.load().")
                finish = "cancelled"
        finally:
            # read before the source lets go: the next generation resets them
            drafts = backend.stats().get("speculative", {}) if backend.capabilities.speculative else {}
            # the source lets go of the model before the last chunk: a caller that stops there keeps nothing busy
            source.close()
        if stopped_by_string:
            tail = pending
        elif finish in ("length", "cancelled"):  # cut short: drop a character whose remaining bytes never came
            tail = pending + decoder.decode(b"", final=False)
        else:  # the model ended on invalid bytes: show them as U+FFFD
            tail = pending + decoder.decode(b"", final=True)
        if stops and not stopped_by_string:
            cut = _find_stop(tail, stops, len(tail))
            if cut >= 0:
                tail, finish = tail[:cut], "stop"
        end = time.perf_counter()
        first = first or end
        timings = Timings(prompt_seconds=first - start, generation_seconds=end - first, total_seconds=end - start,
                          drafted_tokens=drafts.get("drafted", 0), accepted_tokens=drafts.get("accepted", 0))
        yield Chunk(tail, finish_reason=finish, usage=Usage(n_prompt, n_out, source.reused), timings=timings,
                    tokens=tuple(ids))

    # --- embeddings -------------------------------------------------------------------------------------------

    POOLINGS = ("mean", "last", "cls")

    def embed(self, texts: str | Sequence[str] | Sequence[Sequence[int]], *, pooling: str = "mean",
              normalize: bool = True, truncate: bool = False) -> "np.ndarray":
        """One vector per input (a float32 array of shape [inputs, n_embd]; a single str gives one row): the model's
        last hidden states pooled by ``pooling`` — "mean" over the tokens, "last" token, or "cls" (the first) —
        L2-normalized unless ``normalize=False``.  Inputs are strings or token lists; several are packed into one
        decode.  An input longer than :attr:`embed_limit` raises ContextLengthExceededError naming its index, unless
        ``truncate=True`` (then its first tokens are used).  llama.cpp backend (GGUF); it runs beside generations
        on the same model without touching their caches."""
        import numpy as np

        limit = self.embed_limit
        if pooling not in self.POOLINGS:
            raise InvalidParameterError(f"Invalid pooling: {pooling!r}.",
                                        fix=f"Use one of: {', '.join(self.POOLINGS)}.", parameter="pooling",
                                        value=pooling)
        token_lists = self.embedding_tokens(texts)
        for i, tokens in enumerate(token_lists):
            if len(tokens) > limit:
                if not truncate:
                    raise ContextLengthExceededError(
                        f"Input {i} has {len(tokens)} tokens, more than the {limit} the model embeds.",
                        fix="Shorten it, or pass truncate=True.", prompt_tokens=len(tokens), n_ctx=limit, index=i,
                        parameter=f"input[{i}]")
                token_lists[i] = tokens[:limit]
        vectors = self.backend.embed(token_lists, pooling) if token_lists else np.empty((0, 0), np.float32)
        if normalize and len(vectors):
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms > 0, norms, 1.0)
        return vectors

    @property
    def embed_limit(self) -> int:
        """The most tokens one input to :meth:`embed` may hold; raises UnsupportedModelError when this model's
        backend cannot embed."""
        if not self.capabilities.embeddings:
            raise UnsupportedModelError(
                f"The {self.info.backend} backend cannot embed text (its graph gives no hidden states).",
                fix="Use a GGUF model (llama.cpp backend) for embeddings: edgelm convert MODEL --to gguf.",
                backend=self.info.backend)
        return self.backend.embed_limit()

    def embedding_tokens(self, texts: Any) -> list[list[int]]:
        """The token lists :meth:`embed` would embed (a str, a list of str, a token list or a list of them);
        errors name the bad input's index."""
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, Sequence) and texts and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in texts):
            texts = [list(texts)]
        if not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
            raise InvalidParameterError(f"Invalid input to embed: {texts!r:.80}.",
                                        fix="Pass a str, a list of str, or token lists.", parameter="input",
                                        value=texts)
        out = []
        for i, t in enumerate(texts):
            if isinstance(t, str):
                if not t:
                    raise InvalidParameterError(f"Input {i} is empty.", fix="Remove it, or give it some text.",
                                                parameter=f"input[{i}]", value=t)
                out.append(self.tokenize(t, add_special=True, parse_special=False))
            elif isinstance(t, Sequence) and t and all(isinstance(x, int) and not isinstance(x, bool) for x in t):
                bad = next((x for x in t if not 0 <= x < self.backend.n_vocab), None)
                if bad is not None:
                    raise InvalidParameterError(f"Input {i} holds token id {bad}, outside the vocabulary "
                                                f"(0..{self.backend.n_vocab - 1}).", fix="Pass ids this model's "
                                                "tokenizer gives (Model.tokenize).", parameter=f"input[{i}]",
                                                value=bad)
                out.append(list(t))
            else:
                raise InvalidParameterError(f"Invalid input {i} to embed: {t!r:.80}.",
                                            fix="Each input is a non-empty str or a non-empty list of token ids.",
                                            parameter=f"input[{i}]", value=t)
        return out

    # --- scoring ----------------------------------------------------------------------------------------------

    def score(self, tokens: Sequence[int]) -> "np.ndarray":
        """Log-probability the model gives each of tokens[1:] after the tokens before it (float64 array).

        Evaluated from an empty cache (the cached prompt is forgotten); used for perplexity.
        """
        return self._score(tokens, argmax=False)

    def top_tokens(self, tokens: Sequence[int]) -> "np.ndarray":
        """The most likely next token after each of tokens[:-1] (int64 array, aligned with :meth:`score`): what
        greedy decoding would pick at every position.  Comparing two models' top tokens on the same text (top-1
        agreement) measures how far a quantization moved the model, independently of the CPU's rounding."""
        return self._score(tokens, argmax=True)

    def _score(self, tokens: Sequence[int], *, argmax: bool) -> "np.ndarray":
        tokens = [int(t) for t in tokens]
        if not self.capabilities.scoring:
            raise BackendError(f"The {self.info.backend} backend cannot score tokens.",
                               fix="Use a GGUF model on the llama.cpp backend.")
        backend = self.backend
        with self._engine.exclusive() as seq:
            return backend.score(seq, tokens, argmax=argmax)

    def stats(self) -> dict[str, Any]:
        """Counters: the scheduler's (active and waiting sequences, batch size, tokens/s) under "sequences", and the
        backend's of the last generation, e.g. {"speculative": {"mode", "rounds", "drafted", "accepted", "skipped"}}."""
        return {**self.backend.stats(), "sequences": self._engine.snapshot()}

    # --- prompt cache ---------------------------------------------------------------------------------------

    def reset_cache(self) -> None:
        """Forget the cached prompt, so the next call evaluates its prompt from scratch (benchmarks use this)."""
        self.backend  # noqa: B018 (a closed model raises ModelClosedError here)
        self._engine.reset()

    def save_state(self, path: str | os.PathLike[str]) -> int:
        """Save the KV cache of the last sequence (e.g. a long system prompt) to ``path``; return its tokens.

        A later :meth:`load_state` (also in another process) restores it, so a prompt starting with those tokens
        skips their evaluation.  Written atomically (temporary file, then rename).
        """
        self._require_state("save_state")
        backend = self.backend
        with self._engine.exclusive() as seq:
            return backend.save_state(seq, Path(path))

    def load_state(self, path: str | os.PathLike[str]) -> int:
        """Restore a cache written by :meth:`save_state`; a state of another model or build raises
        :class:`StateMismatchError`."""
        path = Path(path)
        self._require_state("load_state")
        if not path.is_file():
            raise ModelNotFoundError(f"State file not found: {path}.", fix="Check the path.", path=str(path))
        backend = self.backend
        with self._engine.exclusive() as seq:
            return backend.load_state(seq, path)

    def _require_state(self, method: str) -> None:
        if not self.capabilities.state:
            raise BackendError(f"The {self.info.backend} backend cannot {method.replace('_', ' ')}.",
                               fix="Use a GGUF model on the llama.cpp backend for saved prompt caches.")

    # --- lifecycle ------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """{"status": "ok" | "degraded" | "lost" | "closed", ...}: "lost"/"degraded" when a model split across RPC
        workers lost one (edgelm.rpc); load it again.  Never blocks on a running generation."""
        if self._closed:
            return {"status": "closed"}
        return self._backend.health()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the model.  Generations still running or waiting end with ModelClosedError (no hang).  Its memory
        goes back to the operating system (the process's RSS falls back near what it was before the load)."""
        if self._closed:
            return
        self._closed = True
        self._engine.close()
        self._backend.close()
        trim_heap()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<edgelm.Model {i.name or i.path} {i.architecture} {i.quantization} backend={i.backend} n_ctx={i.context_length}>"


WAITING = Chunk("")  # what a watched stream gives while its next chunk is not ready (ChunkStream.watch)


class ChunkStream:
    """The chunks of one generation, as they come (iterate it).  ``cancel()`` may be called from any thread (a stop
    button, a client that went away): the stream then ends at once with finish_reason "cancelled".  Closing it, or
    dropping it, frees its place in the model."""

    def __init__(self, chunks: Generator[Chunk, None, None], source: Any) -> None:
        self._chunks = chunks
        self._source = source

    def __iter__(self) -> "ChunkStream":
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def watch(self, notify: Callable[[], None]) -> None:
        """Read it without a thread of its own (an event loop does): from now on next() never blocks but gives
        :data:`WAITING` (identity) while the next chunk is not ready, and ``notify()`` is called from the model's
        thread whenever something came.  Only a stream of a model that is :attr:`Model.watchable`."""
        self._source.watch(notify)

    def cancel(self) -> None:
        self._source.cancel()

    def close(self) -> None:
        self._chunks.close()
        self._source.close()

    def __del__(self) -> None:
        try:
            self._source.cancel()
        except Exception:
            pass


def collect(chunks: Iterator[Chunk]) -> Completion:
    """Join a stream into one :class:`Completion` (tool-call deltas joined into :class:`ToolCall` records)."""
    parts: list[str] = []
    ids: list[int] = []
    calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
    last = None
    for chunk in chunks:
        parts.append(chunk.text)
        ids.extend(chunk.tokens)
        for d in chunk.tool_calls:
            call = calls.setdefault(d.index, ["", "", ""])
            call[0] = d.id if d.id is not None else call[0]
            call[1] = d.name if d.name is not None else call[1]
            call[2] += d.arguments
        last = chunk
    assert last is not None and last.finish_reason is not None and last.usage is not None
    tool_calls = tuple(ToolCall(*calls[i]) for i in sorted(calls))
    text = "".join(parts)
    return Completion(text.strip() if tool_calls else text, last.finish_reason, last.usage, last.timings, tuple(ids),
                      tool_calls)


def _tool_chunks(stream: ChunkStream, parser: ToolCallParser) -> Generator[Chunk, None, None]:
    """A chat stream with its calls taken out of the text: content chunks, call deltas, finish_reason "tool_calls"
    when the answer ended (not cut short) with calls."""
    try:
        for chunk in stream:
            if chunk is WAITING:
                yield chunk
                continue
            text, deltas = parser.feed(chunk.text)
            if chunk.finish_reason is None:
                if text or deltas or chunk.tokens:
                    yield Chunk(text, tool_calls=tuple(deltas), tokens=chunk.tokens)
                continue
            tail, more = parser.finish()
            finish = chunk.finish_reason
            if parser.calls and finish == "stop":
                finish = "tool_calls"
            yield Chunk(text + tail, finish_reason=finish, usage=chunk.usage, timings=chunk.timings,
                        tokens=chunk.tokens, tool_calls=tuple(deltas + more))
    finally:
        stream.close()


def _find_stop(text: str, stops: Sequence[str], window: int) -> int:
    """Index of the earliest stop string in the last ``window`` characters of ``text``, or -1."""
    start = max(0, len(text) - window)
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best
