"""Take a screenshot of the chat page that `edgelm serve` shows at /, as the README's docs/chat-page.png was made.

Starts `edgelm serve` (the embedded model) on a free loopback port, opens the page in headless Chromium (Debian's
`chromium` package, driven by Playwright: `pip install playwright`, no `playwright install`), sets a system prompt
and asks two questions through the page as a person would, and saves the page when the second answer is complete.

Run: python examples/chat_page_screenshot.py [OUT.png] [--width 1000] [--height 680] [--temperature 0]
                                             [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

SYSTEM = "You are a helpful assistant."
QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    exe = shutil.which("edgelm")
    cmd = [exe] if exe else [sys.executable, "-m", "edgelm"]
    proc = subprocess.Popen([*cmd, "serve", "--port", str(port), "--threads", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("edgelm serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/chat-page.png")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=680)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chromium", default=os.environ.get("EDGELM_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_server(port)
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": args.width, "height": args.height}, color_scheme="light")
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => document.getElementById('model').options.length > 0")
            # temperature 0 through the page's own slider (greedy: the same picture on the same machine)
            page.eval_on_selector("#temperature", f"""r => {{ r.value = {args.temperature};
                                                              r.dispatchEvent(new Event("input")); }}""")
            page.eval_on_selector(".settings", "d => { d.open = true; }")
            page.fill("#system", SYSTEM)
            page.press("#system", "Tab")  # the change event stores it
            page.eval_on_selector(".settings", "d => { d.open = false; }")
            for n, question in enumerate(QUESTIONS, start=1):
                page.fill("#prompt", question)
                page.press("#prompt", "Enter")
                page.wait_for_selector(f"#messages li.assistant:nth-of-type({2 * n})[data-state=done]",
                                       timeout=120_000)
            page.evaluate("() => document.activeElement.blur()")
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            page.screenshot(path=args.out)
            context.close()
    finally:
        server.terminate()
        server.wait(10)
    print(args.out)


if __name__ == "__main__":
    main()
