"""Running an exporter in a child process: its output line by line, killed on timeout or interruption."""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import threading
from typing import Callable, Mapping, Sequence


def run_streaming(cmd: Sequence[str], env: Mapping[str, str], on_line: Callable[[str], None], *,
                  timeout: float | None, timeout_error: Callable[[], Exception]) -> int:
    """Run ``cmd`` (stderr merged into stdout) and call ``on_line`` with every non-empty, stripped line of its
    output as soon as it is written; tqdm's ``\\r``-separated updates count as lines.  Returns the exit code.

    After ``timeout`` seconds the child is killed and ``timeout_error()`` raised, whether or not it is printing; on
    any exception, KeyboardInterrupt included, the child is killed and waited for before the exception goes on."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env))
    expired = threading.Event()

    def expire() -> None:
        if proc.poll() is None:
            expired.set()
            proc.kill()

    timer = threading.Timer(timeout, expire) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        assert proc.stdout is not None
        fd, buf = proc.stdout.fileno(), ""
        while True:
            chunk = os.read(fd, 65536)  # whatever the child has written so far, not a fixed amount
            if not chunk:
                break
            buf += decoder.decode(chunk)
            *lines, buf = re.split(r"[\r\n]", buf)
            for line in lines:
                line = line.strip()
                if line:
                    on_line(line)
        if buf.strip():  # a last line without a newline
            on_line(buf.strip())
        rc = proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        if timer:
            timer.cancel()
        if proc.stdout:
            proc.stdout.close()
    if expired.is_set():
        raise timeout_error()
    return rc
