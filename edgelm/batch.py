"""Offline batches: a JSONL file of prompts or conversations in, a JSONL file of answers out, in input order.

    edgelm.batch.run_file(model, "in.jsonl", "out.jsonl")     # or: edgelm batch in.jsonl -o out.jsonl

Each input line is a JSON object with ``prompt`` (plain completion) or ``messages`` (chat), an optional ``id``, and
optional generation settings (``temperature``, ``max_tokens``, ...) that override the batch's.  Each output line
holds the input's ``index`` and ``id`` and either ``text``, ``finish_reason``, ``usage`` or an ``error`` (one bad
line fails alone).  On a model loaded with parallel=N, N lines run at a time, batched.

Output is appended as lines complete, in input order, and flushed: an interrupted run (Ctrl-C, a killed process)
resumes where it stopped — the lines already in the output are kept, a half-written last line is dropped.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from .errors import EdgelmError, InvalidParameterError, OutputExistsError
from .model import collect

Progress = Callable[[int, int], None]


def read_items(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The input lines, checked: each a JSON object with ``prompt`` or ``messages``; errors name the line."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidParameterError(f"Line {n} of {path} is not valid JSON ({exc}).",
                                            fix='Write one JSON object per line, e.g. {"prompt": "..."}.',
                                            parameter=f"line {n}", value=line[:80]) from exc
            if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
                raise InvalidParameterError(f"Line {n} of {path} needs either \"prompt\" or \"messages\".",
                                            fix='Write {"prompt": "text"} or {"messages": [{"role": "user", ...}]}.',
                                            parameter=f"line {n}", value=line[:80])
            items.append(item)
    return items


def _done_lines(path: Path) -> int:
    """Lines of a previous run that are whole JSON objects; a half-written last line is cut off the file."""
    if not path.exists():
        return 0
    good = 0
    keep = 0
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                json.loads(raw)
            except ValueError:
                break
            good += 1
            keep += len(raw)
    if keep != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(keep)
    return good


def run_file(model: Any, input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], *,
             overwrite: bool = False, progress: Progress | None = None, **params: Any) -> dict[str, int]:
    """Answer every line of ``input_path`` into ``output_path`` (see the module docstring); ``params`` are the
    batch's generation settings.  Returns {"total", "skipped" (done by an earlier run), "done", "errors"}."""
    items = read_items(input_path)
    model.params(**params)  # bad settings fail before any work
    out = Path(output_path)
    if out.exists() and overwrite:
        out.unlink()
    skipped = _done_lines(out)
    if skipped > len(items):
        raise OutputExistsError(f"{out} has {skipped} lines but {input_path} only {len(items)}: it is not this "
                                "batch's output.", fix="Choose another output file, or pass overwrite.",
                                path=str(out))
    todo = list(range(skipped, len(items)))
    counts = {"total": len(items), "skipped": skipped, "done": 0, "errors": 0}
    lock = threading.Lock()
    finished: dict[int, dict[str, Any]] = {}
    next_line = skipped
    running: set[Any] = set()
    stopping = threading.Event()

    def answer(i: int) -> None:
        nonlocal next_line
        if stopping.is_set():
            return
        item = items[i]
        settings = {k: v for k, v in item.items() if k not in ("prompt", "messages", "id")}
        record: dict[str, Any] = {"index": i, "id": item.get("id", i)}
        try:
            p = {**params, **settings}
            stream = model.stream_chat(item["messages"], **p) if "messages" in item else model.stream(item["prompt"], **p)
            with lock:
                running.add(stream)
            try:
                c = collect(stream)
            finally:
                with lock:
                    running.discard(stream)
            record.update(text=c.text, finish_reason=c.finish_reason, usage=c.usage.to_dict())
        except EdgelmError as exc:
            record["error"] = {"type": type(exc).__name__, "code": exc.code, "message": str(exc)}
        with lock:
            if stopping.is_set():  # interrupted: this line is answered again by the next run
                return
            finished[i] = record
            counts["errors" if "error" in record else "done"] += 1
            with open(out, "a", encoding="utf-8") as fh:  # in input order: what is finished up to the first gap
                while next_line in finished:
                    fh.write(json.dumps(finished.pop(next_line), ensure_ascii=False) + "\n")
                    next_line += 1
                fh.flush()
            if progress is not None:
                progress(skipped + counts["done"] + counts["errors"], len(items))

    pool = ThreadPoolExecutor(max_workers=max(1, model.capabilities.max_sequences), thread_name_prefix="edgelm-batch")
    try:
        for future in [pool.submit(answer, i) for i in todo]:
            future.result()
    except BaseException:  # Ctrl-C: stop at once, keep what is written
        stopping.set()
        with lock:
            for stream in running:
                stream.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return counts
