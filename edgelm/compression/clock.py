"""The clock a compression's time budget is measured with, in one place.

A budget of "30m" covers scoring, pruning and distillation; tests replace ``_now`` with a clock that advances a
fixed step per reading, so they check the budget by counting steps, never by timing the machine.
"""

from __future__ import annotations

import time
from typing import Callable

_now: Callable[[], float] = time.perf_counter


def now() -> float:
    """Seconds, from an arbitrary origin."""
    return _now()
