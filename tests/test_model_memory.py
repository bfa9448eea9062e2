"""What a desktop app needs from a model's life cycle, on the real embedded model: load progress, a stream cancelled
from another thread, and memory returned when the model is closed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

import edgelm

pytestmark = pytest.mark.slow

# Measured in a fresh interpreter: the RSS after importing and initialising llama.cpp and one load/close (the
# libraries' code pages and thread pools, loaded once per process), then after a second load, a generation and close.
RSS_SCRIPT = textwrap.dedent("""
    import gc, json
    import edgelm
    from edgelm.native import llamacpp as native

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024

    native.init()
    first = rss()
    edgelm.load().close()
    gc.collect()
    before = rss()
    model = edgelm.load()
    model.generate("Tell me a story.", max_tokens=32)
    loaded = rss()
    model.close()
    del model
    gc.collect()
    print(json.dumps({"first": first, "before": before, "loaded": loaded, "after": rss()}))
""")


@pytest.mark.timeout(480)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_closing_a_model_returns_its_memory(default_gguf):
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=110,
                         env={**__import__("os").environ, "EDGELM_DEFAULT_MODEL": str(default_gguf)})
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    rss = json.loads(out.stdout.strip().splitlines()[-1])
    mb = {k: round(v / 2**20, 1) for k, v in rss.items()}
    print("\nRSS MB:", mb)
    assert rss["loaded"] > rss["before"] * 1.5, f"the model should take memory while loaded: {mb}"
    assert rss["after"] <= rss["before"] * 1.10, f"RSS after close not within 10% of before the load: {mb}"


@pytest.mark.timeout(240)
def test_load_reports_progress_from_0_to_1(default_gguf):
    seen: list[tuple[float, str]] = []
    with edgelm.load(default_gguf, n_ctx=512,
                     progress=lambda f: seen.append((f, threading.current_thread().name))) as model:
        assert model.generate("Hi", max_tokens=1).text is not None
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions.count(1.0) == 1
    assert fractions == sorted(fractions) and len(fractions) > 2
    assert {name for _, name in seen} == {threading.current_thread().name}  # the loading thread


@pytest.mark.timeout(240)
def test_a_progress_callback_that_raises_does_not_break_the_load(default_gguf):
    def progress(fraction: float) -> None:
        if 0 < fraction < 1:
            raise RuntimeError("a bug in the app's progress bar")

    with edgelm.load(default_gguf, n_ctx=512, progress=progress) as model:
        assert model.generate("Hi", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.timeout(240)
def test_a_stream_cancelled_from_another_thread_ends_at_once(smollm):
    stream = smollm.stream("Once upon a time", max_tokens=1000, temperature=0.8)
    chunks = []
    for chunk in stream:
        chunks.append((time.perf_counter(), chunk))
        if len(chunks) == 5:
            threading.Thread(target=stream.cancel).start()
            cancelled_at = time.perf_counter()
    last = chunks[-1][1]
    assert last.finish_reason == "cancelled"
    after = [c for t, c in chunks if t > cancelled_at and c.finish_reason is None]
    assert len(after) <= 2  # the token being computed when cancel came, at most one more
    assert smollm.generate("Hi", max_tokens=2).usage.completion_tokens >= 1  # the model is free again
