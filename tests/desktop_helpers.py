"""Shared by the desktop example's tests and benchmarks/bench_desktop.py: a virtual X display (Debian's xvfb), the
example app imported from its file, and a heartbeat that records how long the UI thread was kept from running."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from .helpers import stop_process

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "desktop_chat" / "app.py"
# the packages are listed once, in tests/setup.sh (APT_PACKAGES)
XVFB_INSTALL = "bash tests/setup.sh (it installs xvfb and the X libraries Qt's xcb plugin links)"


class Xvfb:
    """An X server on a free display number (Xvfb picks it: -displayfd).  It exits by itself when its last client
    disconnects (-terminate): Qt keeps its connection until the process exits, after every fixture's teardown."""

    def __init__(self, width: int = 1280, height: int = 800) -> None:
        exe = shutil.which("Xvfb")
        if exe is None:
            raise FileNotFoundError(f"Xvfb is not installed ({XVFB_INSTALL})")
        read, write = os.pipe()
        self.process = subprocess.Popen([exe, "-displayfd", str(write), "-screen", "0", f"{width}x{height}x24",
                                         "-nolisten", "tcp", "-terminate"],
                                        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write)
        with os.fdopen(read) as pipe:  # Xvfb writes the display number once it accepts connections
            number = pipe.readline().strip()
        if not number:
            self.process.kill()
            raise RuntimeError("Xvfb did not start")
        self.display = f":{number}"

    def stop(self) -> None:
        """Stop it now (only when no client is connected: Qt would exit on a lost display)."""
        stop_process(self.process)


def import_app() -> ModuleType:
    """examples/desktop_chat/app.py as a module (it is an example, not a package)."""
    spec = importlib.util.spec_from_file_location("desktop_chat_app", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Heartbeat:
    """A precise 10 ms timer in the UI thread; each tick's time is recorded.  A gap between ticks longer than the
    interval is time the UI thread could not run (a frozen window)."""

    INTERVAL_MS = 10

    def __init__(self) -> None:
        from PySide6.QtCore import Qt, QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(self.INTERVAL_MS)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))
        self.timer.start()

    def max_gap_ms(self, start: float, end: float) -> float:
        """The longest time between ticks (or the window's ends) within [start, end], in ms."""
        inside = [start] + [t for t in self.ticks if start <= t <= end] + [end]
        return max(b - a for a, b in zip(inside, inside[1:])) * 1000

    def stop(self) -> None:
        self.timer.stop()


class Recorder:
    """What the window's worker threads emitted, with the time of each emission (recorded in the emitting thread
    through a direct connection, so a busy UI thread does not delay the record)."""

    def __init__(self, signals: Any) -> None:
        from PySide6.QtCore import Qt

        self.tokens: list[tuple[float, str]] = []
        self.done: list[tuple[float, str]] = []
        direct = Qt.ConnectionType.DirectConnection
        signals.token.connect(lambda text: self.tokens.append((time.perf_counter(), text)), direct)
        signals.done.connect(lambda finish: self.done.append((time.perf_counter(), finish)), direct)

    def clear(self) -> None:
        self.tokens.clear()
        self.done.clear()


class PaintCounter:
    """Counts the paints of a text widget's viewport that showed new text (tokens arriving over several paints,
    not all at once at the end)."""

    def __init__(self, text_widget: Any) -> None:
        from PySide6.QtCore import QEvent, QObject

        widget = text_widget
        counter = self
        self.lengths: list[int] = []

        class Filter(QObject):
            def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
                if event.type() == QEvent.Type.Paint:
                    n = len(widget.toPlainText())
                    if not counter.lengths or counter.lengths[-1] != n:
                        counter.lengths.append(n)
                return False

        self._filter = Filter()
        widget.viewport().installEventFilter(self._filter)

    def reset(self) -> None:
        self.lengths.clear()
