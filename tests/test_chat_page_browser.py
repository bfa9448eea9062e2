"""The chat page in a real headless Chromium (Debian's chromium, driven by Playwright) against a real `edgelm serve`
with the embedded SmolLM2 model on a free loopback port.

No golden answers: the tests watch the page (the answer's text growing, the stop button, the error banner, the key
dialog, what survives a reload) and ask the server what it did (/metrics, its own error messages).

Chromium must be installed (`bash tests/setup.sh` installs it, as `sudo apt-get install -y chromium` does); set EDGELM_CHROMIUM to use
another binary.  A missing browser fails these tests with that instruction; `-m "not browser"` deselects them.
"""

from __future__ import annotations

import json
import os
import re
import time

import httpx
import pytest

from . import test_server
from .helpers import stop_process

pytestmark = [pytest.mark.slow, pytest.mark.browser]

NAME = "smollm2-135m-instruct"
CHROMIUM = os.environ.get("EDGELM_CHROMIUM", "/usr/bin/chromium")
INSTALL = "sudo apt-get install -y chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Each test's hang guard and the longest wait for the page, seconds (they take 3-8 s each on 2 shared cores).
HANG_GUARD = 120

# In the page: watch the last answer and record each distinct text it shows while it streams.  The text is
# compared without whitespace, backticks, tildes and button labels, so the renderer turning a half-written
# ``` fence or `code` into a block does not count as shrinking.
OBSERVE = """() => {
  window.__norm = (el) => {
    const copy = el.cloneNode(true);
    copy.querySelectorAll("button").forEach((b) => b.remove());
    return copy.textContent.replace(/[\\s`~]/g, "");
  };
  window.__states = [];
  new MutationObserver(() => {
    const li = document.querySelector("#messages li.assistant:last-child");
    if (!li || li.dataset.state !== "streaming") return;
    const text = window.__norm(li.querySelector(".content"));
    const s = window.__states;
    if (text && s[s.length - 1] !== text) s.push(text);
  }).observe(document.getElementById("messages"),
             {childList: true, subtree: true, characterData: true, attributes: true});
}"""

# Before any page script: record Content-Security-Policy violations (there must be none).
CSP_WATCH = """window.__csp = [];
document.addEventListener("securitypolicyviolation",
                          (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));"""


class Server(test_server.Server):
    """A real `edgelm serve` process on a free loopback port."""

    def __init__(self, *args: str) -> None:
        # one thread: on a machine shared with other jobs llama.cpp's thread barriers stall badly with two
        super().__init__("--threads", "1", *args)

    def warm(self, model: str = NAME, headers: dict[str, str] | None = None) -> None:
        """Load the model now, so the tests' time is the page's, not the first load's."""
        r = httpx.post(self.url + "/v1/chat/completions", headers=headers, timeout=120, json={
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
        r.raise_for_status()

    def queue_depth(self) -> int:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return int(next(line for line in text.splitlines() if line.startswith("edgelm_queue_depth")).split()[-1])

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module", autouse=True)
def _need_chromium():
    """Before anything starts: a missing browser or Playwright fails the tests with the fix, never skips them."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"The chat page's browser tests need Chromium at {CHROMIUM}, which is not installed. "
                    f"Install it with `{INSTALL}` (Debian/Ubuntu; `bash tests/setup.sh` does this), point EDGELM_CHROMIUM at "
                    "another Chromium binary, or deselect these tests with -m 'not browser'.", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("The chat page's browser tests need Playwright for Python: pip install -e '.[dev]' "
                    "(or pip install playwright; the browser is the system's Chromium, no `playwright install`).",
                    pytrace=False)


@pytest.fixture(scope="module")
def browser():
    """Chromium (Playwright gives it a fresh temporary profile), shared by the module; each test opens a page in
    a context of its own, so storage never leaks from one test to the next."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def default_path():
    import edgelm

    try:
        return edgelm.default_model_path()
    except edgelm.DefaultModelMissingError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def server(default_path, tmp_path_factory):
    """The embedded model, and a second served name whose file is removed after the server started."""
    gone = tmp_path_factory.mktemp("models") / "gone.gguf"
    gone.write_bytes(b"GGUF")
    s = Server("--n-ctx", "2048", "--keep-alive", "600", f"{NAME}={default_path}", f"gone={gone}")
    gone.unlink()
    try:
        s.warm()
        yield s
    finally:
        s.stop()


def open_page(browser, url: str, *, models: bool = True):
    """The page in a new browser context (empty storage); waits for the model picker unless ``models`` is False."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.page_errors = []
    page.on("pageerror", lambda e: page.page_errors.append(str(e)))
    page.add_init_script(CSP_WATCH)
    page.goto(url)
    if models:
        page.wait_for_function("() => document.getElementById('model').options.length > 0")
    return page


def close_page(page) -> None:
    """Every test ends here: no script error, no Content-Security-Policy violation in the page."""
    violations = page.evaluate("window.__csp")
    errors = page.page_errors
    page.context.close()
    assert violations == [] and errors == [], (violations, errors)


def set_max_tokens(page, n: int) -> None:
    page.eval_on_selector(".settings", "d => { d.open = true; }")
    page.fill("#max-tokens", str(n))
    page.press("#max-tokens", "Tab")  # the change event
    page.eval_on_selector(".settings", "d => { d.open = false; }")


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer_text(page) -> str:
    return page.evaluate("window.__norm(document.querySelector('#messages li.assistant:last-child .content'))")


@pytest.mark.timeout(HANG_GUARD)
def test_answer_streams_token_by_token_and_survives_a_reload(server, browser):
    page = open_page(browser, server.url)
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat/completions") else None)
    set_max_tokens(page, 64)
    page.evaluate(OBSERVE)
    ask(page, "Tell me about the sea.")
    page.wait_for_selector("#messages li.assistant[data-state=done]", timeout=HANG_GUARD * 1000)

    states, final = page.evaluate("window.__states"), last_answer_text(page)
    assert len(states) >= 3, states  # the text appeared piece by piece, not at once
    for before, after in zip(states, states[1:]):
        assert after.startswith(before) and len(after) > len(before), (before, after)
    assert final.startswith(states[-1]) and len(final) > len(states[0])
    body = json.loads(sent[0].post_data)
    assert body["stream"] is True and body["model"] == NAME and body["max_tokens"] == 64
    assert body["messages"] == [{"role": "user", "content": "Tell me about the sea."}]
    note = page.inner_text("#messages li.assistant .note")
    tokens = int(re.search(r"(\d+) tokens", note).group(1))  # the usage the server reported
    assert 1 <= tokens <= 64, note

    # the conversation is kept in the browser: a reload shows the same messages
    shown = "[...document.querySelectorAll('#messages li')].map(li => [li.className, li.dataset.state, li.innerText])"
    before = page.evaluate(shown)
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#messages li').length === 2")
    assert page.evaluate(shown) == before
    assert page.input_value("#max-tokens") == "64"  # and so are the settings
    page.click("#new-chat")
    page.reload()
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    assert page.evaluate("document.querySelectorAll('#messages li').length") == 0
    assert page.is_visible("#empty")
    close_page(page)


@pytest.mark.timeout(HANG_GUARD)
def test_stop_halts_the_answer_and_frees_the_model(server, browser):
    page = open_page(browser, server.url)
    set_max_tokens(page, 1500)
    page.evaluate(OBSERVE)
    ask(page, "Write a long story about a robot who learns to paint.")
    page.wait_for_function("() => window.__states.length >= 3")
    assert server.queue_depth() == 1  # the model is busy with this answer (1,500 tokens would take many seconds)
    page.click("#stop", timeout=2000)
    page.wait_for_selector("#messages li.assistant[data-state=stopped]", timeout=5000)
    stopped = last_answer_text(page)
    assert stopped and page.is_visible("#send") and page.is_hidden("#stop")

    deadline = time.monotonic() + 5
    while server.queue_depth() and time.monotonic() < deadline:  # the server saw the client go away
        time.sleep(0.05)
    assert server.queue_depth() == 0
    time.sleep(0.5)
    assert last_answer_text(page) == stopped  # nothing more arrived
    assert page.inner_text("#messages li.assistant .note") == "Stopped."

    # the model is free: the next question is answered (with the stopped answer in the history)
    set_max_tokens(page, 12)
    ask(page, "Say hello.")
    page.wait_for_selector("#messages li.assistant:nth-of-type(4)[data-state=done]", timeout=20_000)
    assert last_answer_text(page)
    close_page(page)


def _error_message(server, model: str) -> tuple[int, str]:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": model, "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    return r.status_code, r.json()["error"]["message"]


@pytest.mark.timeout(HANG_GUARD)
def test_errors_show_in_the_page(server, browser):
    page = open_page(browser, server.url)
    assert page.eval_on_selector("#model", "s => [...s.options].map(o => o.value)") == [NAME, "gone"]
    banner = "#error:not([hidden])"

    # a served model whose file was removed: the server's 500 and its message
    status, message = _error_message(server, "gone")
    assert status == 500
    page.select_option("#model", "gone")
    ask(page, "Hi")
    page.wait_for_selector(banner)
    text = page.inner_text("#error-text")
    assert f"Error {status}" in text and message in text
    assert page.get_attribute("#messages li.assistant", "data-state") == "error"
    page.click("#error-dismiss")

    # a model name the server does not serve (the picker edited by hand): 404 naming it
    status, message = _error_message(server, "no-such-model")
    assert status == 404 and "no-such-model" in message
    page.eval_on_selector("#model", """s => { s.add(new Option("no-such-model", "no-such-model"));
                                              s.value = "no-such-model"; s.dispatchEvent(new Event("change")); }""")
    ask(page, "Hi")
    page.wait_for_selector(banner)
    text = page.inner_text("#error-text")
    assert "Error 404" in text and message in text

    # the server cannot be reached (the request fails in the network)
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.select_option("#model", NAME)
    ask(page, "Hi")
    page.wait_for_function("() => document.getElementById('error-text').textContent.includes('Cannot reach')")
    assert "edgelm serve" in page.inner_text("#error-text")
    page.unroute("**/v1/chat/completions")
    close_page(page)


@pytest.mark.timeout(HANG_GUARD)
def test_a_401_asks_for_the_key_and_a_good_key_works(browser, default_path):
    s = Server("--api-key", "sekret", "--n-ctx", "512", f"{NAME}={default_path}")
    try:
        s.warm(headers={"Authorization": "Bearer sekret"})
        page = open_page(browser, s.url, models=False)  # the page itself loads without the key
        page.wait_for_selector("#key-dialog[open]")
        page.click("#key-cancel")  # no key: the page says why nothing works
        page.wait_for_selector("#error:not([hidden])")
        assert "Error 401" in page.inner_text("#error-text")

        page.click(".settings summary")
        page.click("#change-key")
        page.fill("#key-input", "wrong")
        page.click("#key-save")
        page.wait_for_function("() => document.getElementById('key-message').textContent.includes('refused')")
        assert page.is_visible("#key-dialog[open]")
        page.fill("#key-input", "sekret")
        page.click("#key-save")
        page.wait_for_function("() => document.getElementById('model').options.length > 0")
        assert page.is_hidden("#key-dialog") and page.is_hidden("#error")
        assert page.evaluate("localStorage.getItem('edgelm.apiKey')") == "sekret"

        sent = []
        page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat/completions") else None)
        set_max_tokens(page, 8)
        page.evaluate(OBSERVE)
        ask(page, "Say hello.")
        page.wait_for_selector("#messages li.assistant[data-state=done]")
        assert last_answer_text(page)
        assert sent[0].headers["authorization"] == "Bearer sekret"

        page.reload()  # the key is kept: no dialog this time
        page.wait_for_function("() => document.getElementById('model').options.length > 0")
        assert page.is_hidden("#key-dialog")
        close_page(page)
    finally:
        s.stop()


def _sse(*events: object) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def _delta(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text},
                                                            "finish_reason": None}]}


@pytest.mark.timeout(HANG_GUARD)
def test_model_text_is_shown_as_text_and_the_page_fits_a_phone(server, browser):
    """Whatever the model writes is text: markup in an answer is shown, never run or rendered.  The stream is
    the server's format, supplied by the test (a model cannot be made to write this on demand)."""
    page = open_page(browser, server.url)
    page.set_viewport_size({"width": 390, "height": 844})
    hostile = ('Look: <img src=x onerror="window.__pwned=1"> and `<b>inline</b>`\n\n'
               "```html\n<script>window.__pwned=2</script>\n```\nafter")
    pieces = [hostile[i:i + 3] for i in range(0, len(hostile), 3)]
    finish = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    body = _sse(*[_delta(p) for p in pieces], finish, "[DONE]")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    ask(page, "Show me some HTML.")
    answer = "#messages li.assistant[data-state=done]"
    page.wait_for_selector(answer)

    assert page.evaluate("window.__pwned") is None
    assert page.eval_on_selector(answer, "li => li.querySelectorAll('img, script, b').length") == 0
    assert page.inner_text(f"{answer} pre code") == "<script>window.__pwned=2</script>"
    assert page.get_attribute(f"{answer} pre code", "data-language") == "html"
    assert page.inner_text(f"{answer} p code") == "<b>inline</b>"
    assert '<img src=x onerror="window.__pwned=1">' in page.inner_text(f"{answer} .content p")

    # an error event after the stream began (the server's format for a failure mid-answer)
    body = _sse(_delta("partial "), _delta("answer"), {"error": {"message": "the model failed mid-answer"}}, "[DONE]")
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    ask(page, "Again.")
    page.wait_for_selector("#messages li.assistant[data-state=error]")
    assert "the model failed mid-answer" in page.inner_text("#error-text")
    assert page.inner_text("#messages li.assistant[data-state=error] .content") == "partial answer"
    page.unroute("**/v1/chat/completions")

    # phone width: nothing wider than the screen, the composer and the picker on screen
    assert page.evaluate("document.scrollingElement.scrollWidth <= document.scrollingElement.clientWidth")
    for selector in ("#prompt", "#send", "#model", "#new-chat"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (selector, box)
    close_page(page)
