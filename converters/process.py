"""Running an exporter in a child process: its output line by line, killed on timeout or interruption."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Callable, Mapping, Sequence


def run_streaming(cmd: Sequence[str], env: Mapping[str, str], on_line: Callable[[str], None], *,
                  timeout: float | None, timeout_error: Callable[[], Exception]) -> int:
    """Run ``cmd`` (stderr merged into stdout) and call ``on_line`` with every non-empty, stripped line of its
    output; tqdm's ``\\r``-separated updates count as lines.  Returns the exit code.

    After ``timeout`` seconds the child is killed and ``timeout_error()`` raised (checked as output arrives); on any
    exception, KeyboardInterrupt included, the child is killed and waited for before the exception goes on."""
    start = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env), text=True,
                            errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        buf = ""
        while True:
            chunk = proc.stdout.read(256)
            if not chunk:
                break
            buf += chunk
            *lines, buf = re.split(r"[\r\n]", buf)
            for line in lines:
                line = line.strip()
                if line:
                    on_line(line)
            if timeout and time.monotonic() - start > timeout:
                proc.kill()
                raise timeout_error()
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
