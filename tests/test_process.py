"""The child-process runner both exporters use (converters/process.py)."""

from __future__ import annotations

import os
import sys

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
sys.exit(3)
"""


def test_lines_from_both_streams_and_tqdm_updates_in_order_with_the_exit_code():
    lines: list[str] = []
    rc = run_streaming([sys.executable, "-c", CHILD], os.environ, lines.append, timeout=None,
                       timeout_error=lambda: AssertionError("no timeout was set"))
    assert rc == 3
    assert lines == ["reading", "Writing: 0%", "Writing: 50%", "Writing: 100%", "done"]
