"""README.md stays a user guide that works: short, its links resolve, and its command lines run.

The slow test runs every `edgelm ...` line of README's code blocks that needs no network, on the embedded model, in
a temporary folder (HOME is already temporary: tests/conftest.py).  A line is left out when it names a Hub
repository (ORG/REPO), is `edgelm pull`, or ends with a comment saying it needs the network; the skip says which.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 300
# The pages README links to, whose own relative links must resolve too.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HUB_REFERENCE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")  # ORG/REPO[:QUANT]
# Files the README's commands name, made in the folder each command runs in.
# Small limits the test adds to long-running commands (the last value of an option wins), so that all lines take
# about a minute on 2 busy cores: what is checked is that each command as written runs.  The quality report of
# `convert` scores both models on the whole built-in text; tests/test_convert.py checks it.
LIMITS = {"run": ["-n", "8"], "chat": ["-n", "8"], "batch": ["-n", "8"], "eval": ["--window", "128", "--windows", "1"],
          "bench": ["--runs", "1", "-n", "8", "--prompt-tokens", "32"], "convert": ["--no-eval"]}
QUESTIONS = '{"prompt": "The capital of France is"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n'


def _code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line)
    return lines


def cli_lines() -> list[str]:
    return [line.strip() for line in _code_lines(README.read_text(encoding="utf-8")) if line.startswith("edgelm ")]


def _split(line: str) -> tuple[list[str], str]:
    """The command's words and its trailing comment."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = list(lexer)
    comment = line.split(" # ", 1)[1] if " # " in line else ""
    return words, comment


def why_skipped(line: str) -> str | None:
    """Why a README line is not run here, or None when it is."""
    words, comment = _split(line)
    if "needs network" in comment:
        return "marked '# needs network' in README"
    if words[1] == "pull":
        return "edgelm pull downloads from the Hugging Face Hub"
    hub = [w for w in words[2:] if HUB_REFERENCE.match(w) and not w.startswith(("./", "/"))]
    if hub:
        return f"names the Hub repository {hub[0]} (needs network)"
    return None


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_readme_is_a_short_guide():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it a user guide of at most {MAX_LINES} " \
                               "(internals go to docs/, figures to benchmarks/RESULTS.md)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    """Every relative link (and image) in README and the pages it links to names a file of the repository, and an
    anchor names one of that file's headings."""
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md":
            headings = [_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)]
            if anchor not in headings:
                broken.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_has_cli_lines_and_the_test_command():
    text = README.read_text(encoding="utf-8")
    assert re.search(r"<!-- test-command -->\n```bash\n[^\n]+\n```", text), "the test command block .ci/run extracts"
    assert len(cli_lines()) >= 10


@pytest.fixture
def workdir(tmp_path: Path, default_gguf: Path) -> Path:
    """A folder holding what the README's commands name: model.gguf (the embedded model) and questions.jsonl."""
    (tmp_path / "model.gguf").symlink_to(default_gguf)
    (tmp_path / "questions.jsonl").write_text(QUESTIONS, encoding="utf-8")
    return tmp_path


def _env() -> dict[str, str]:
    """This interpreter's `edgelm` first on PATH, tracebacks on for the failure message."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "EDGELM_DEBUG": "1",
            "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(words: list[str], cwd: Path) -> None:
    """Start the server the line describes on a free port, ask it for a short completion, stop it with Ctrl-C."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([*words, "--port", str(port)], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {words[words.index('--api-key') + 1]}"} if "--api-key" in words else {}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"`{shlex.join(words)}` exited: {proc.communicate()[0]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health within 60 s"
            time.sleep(0.2)
        name = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        reply = httpx.post(url + "/v1/completions", headers=headers, timeout=120,
                           json={"model": name, "prompt": "The capital of France is", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    assert proc.returncode == 0, f"`{shlex.join(words)}` ended with {proc.returncode}: {output[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("line", cli_lines())
def test_readme_command_runs(line: str, workdir: Path):
    """Each README command line exits 0 here, offline, on the embedded model."""
    reason = why_skipped(line)
    if reason:
        pytest.skip(reason)
    words, _ = _split(line)
    if words[1] == "serve":
        _serve(words, workdir)
        return
    words += LIMITS.get(words[1], [])
    # chat reads its messages from stdin: /bye ends it.
    done = subprocess.run(words, cwd=workdir, env=_env(), input="/bye\n", capture_output=True, text=True,
                          timeout=300)
    output = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, f"`{line}` exited with {done.returncode}:\n{output}"
