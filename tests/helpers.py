"""Small helpers shared by the tests."""

from __future__ import annotations

import itertools
import subprocess
from typing import Any


def raw_greedy(m: Any, ids: list[int], n: int, **params: Any) -> list[int]:
    """Exactly ``n`` greedy token ids after ``ids``, end-of-generation tokens included (as transformers' generate
    with eos_token_id=None gives them): the backend protocol's own generator, not the Model's text stream."""
    backend = m.backend
    source = backend.generate(backend.sequences[0], ids, m.params(temperature=0, **params))
    try:
        return list(itertools.islice(source, n))
    finally:
        source.close()


def stop_process(proc: subprocess.Popen) -> None:
    """Ask a child to stop (SIGTERM), and kill it if it has not within 10 s; reaped either way."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
