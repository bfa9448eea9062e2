"""Progress of downloads and checks: huggingface_hub's tqdm bars, a user's callable, or nothing; and the one-line
notes (which file was chosen and why) that go with them."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Union

log = logging.getLogger("edgelm.hub")

# (file name, bytes done, bytes total or None) for each downloaded chunk
ProgressFn = Callable[[str, int, Union[int, None]], None]
Progress = Union[bool, ProgressFn]


class _CallbackBar:
    """The small part of tqdm's interface huggingface_hub's downloader uses, reporting to a callable."""

    def __init__(self, fn: ProgressFn, desc: str = "", total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.fn, self.desc, self.total, self.n = fn, desc, total, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        self.fn(self.desc, self.n, self.total)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_CallbackBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _SilentBar(_CallbackBar):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(lambda *a: None, **kwargs)


def bar_class(progress: Progress, name: str) -> Any:
    """A tqdm-like class for huggingface_hub's downloader: its own bars (progress=True), the callable, or silence."""
    if progress is True:
        from huggingface_hub.utils import tqdm as hf_tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS, TTY detection

        return hf_tqdm
    if callable(progress):
        return lambda **kw: _CallbackBar(progress, **{**kw, "desc": name})
    return _SilentBar


def bar(progress: Progress, desc: str, total: int) -> Any:
    """One bar of ``total`` bytes."""
    return bar_class(progress, desc)(desc=desc, total=total, initial=0, unit="B", unit_scale=True)


def note(progress: Progress, message: str) -> None:
    """Log ``message``, and print it on stderr when bars are shown (progress=True)."""
    log.info(message)
    if progress is True:
        print(message, file=sys.stderr, flush=True)
