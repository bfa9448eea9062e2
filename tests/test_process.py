"""The child-process runner both exporters use (converters/process.py)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from edgelm.converters.process import run_streaming

CHILD = """
import sys, time
sys.stdout.write("reading\\n"); sys.stdout.flush()
for i in range(3):
    sys.stdout.write(f"\\rWriting: {i * 50}%"); sys.stdout.flush()
sys.stderr.write("\\n  done  \\n\\n"); sys.stderr.flush()
if len(sys.argv) > 1:
    print(sys.argv[1], flush=True)
    time.sleep(60)
sys.stdout.write("no newline"); sys.stdout.flush()
sys.exit(3)
"""


def test_lines_from_both_streams_and_tqdm_updates_in_order_with_the_exit_code():
    lines: list[str] = []
    rc = run_streaming([sys.executable, "-c", CHILD], os.environ, lines.append, timeout=None,
                       timeout_error=lambda: AssertionError("no timeout was set"))
    assert rc == 3
    assert lines == ["reading", "Writing: 0%", "Writing: 50%", "Writing: 100%", "done", "no newline"]


def test_timeout_kills_the_child_and_raises_the_callers_error():
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="too slow"):
        run_streaming([sys.executable, "-c", CHILD, "sleeping"], os.environ, lines.append, timeout=0.5,
                      timeout_error=lambda: RuntimeError("too slow"))
    assert time.monotonic() - t0 < 10 and lines[-1] == "sleeping"  # the child sleeps 60 s without a word


def test_an_exception_in_the_line_handler_kills_the_child():
    pids: list[str] = []

    def handler(line: str) -> None:
        if line.isdigit():
            pids.append(line)
            raise KeyboardInterrupt

    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_streaming([sys.executable, "-c", code], os.environ, handler, timeout=None,
                      timeout_error=lambda: AssertionError("no timeout was set"))
    assert time.monotonic() - t0 < 10  # the line came as it was printed, and the child was killed, not waited for
    with pytest.raises(ProcessLookupError):
        os.kill(int(pids[0]), 0)  # and reaped
