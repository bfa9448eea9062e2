"""The chat page's HTTP side (no browser, no model): what `/` and `/ui/*` answer, their headers, --no-ui, the key.

The page's behaviour in a real browser is tested in test_chat_page_browser.py.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from edgelm.server import create_app  # noqa: E402
from edgelm.server.ui import load_assets  # noqa: E402

NAME = "smollm2-135m-instruct"


@pytest.fixture
def client():
    with TestClient(create_app({NAME: None})) as c:
        yield c


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _page_tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def test_page_is_html_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["connect-src"] == "'self'"
    assert "unsafe" not in csp and "http" not in csp  # no inline script or eval, nothing from another host
    assert directives["frame-ancestors"] == "'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-cache"  # revalidated on each load, so a new version shows at once


def test_page_has_no_inline_script_or_style_and_nothing_remote(client):
    tags = _page_tags(client.get("/").text)
    scripts = [a for t, a in tags if t == "script"]
    assert scripts and all(a.get("src") for a in scripts)
    for tag, attrs in tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)  # no inline event handlers
        assert "style" not in attrs, (tag, attrs)
        for key in ("src", "href"):
            assert not re.match(r"^(https?:)?//", attrs.get(key) or ""), (tag, attrs)


def test_every_form_control_has_a_label(client):
    tags = _page_tags(client.get("/").text)
    labelled = {a["for"] for t, a in tags if t == "label" and a.get("for")}
    controls = [a for t, a in tags if t in ("input", "select", "textarea")]
    assert controls
    for attrs in controls:
        assert attrs.get("id") in labelled or attrs.get("aria-label"), attrs


def test_files_have_their_types_and_versioned_urls_are_cached(client):
    html = client.get("/").text
    urls = re.findall(r'(?:src|href)="(ui/[^"]+)"', html)
    expected = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    kinds = set()
    for url in urls:
        assert "?v=" in url, url
        r = client.get("/" + url)
        suffix = url[url.rfind("."):url.index("?")]
        kinds.add(suffix)
        assert r.status_code == 200 and r.headers["content-type"] == expected[suffix], url
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert r.headers["x-content-type-options"] == "nosniff"
        unversioned = client.get("/" + url.split("?")[0])
        assert unversioned.headers["cache-control"] == "no-cache" and unversioned.content == r.content
    assert kinds == {".js", ".css", ".svg"}


def test_etag_answers_304(client):
    for path in ("/", "/ui/app.js"):
        r = client.get(path)
        again = client.get(path, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert client.get(path, headers={"If-None-Match": '"other"'}).status_code == 200


def test_head_gives_headers_only(client):
    r = client.head("/")
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == len(client.get("/").content)


def test_unknown_files_are_404(client):
    for path in ("/ui/nope.js", "/ui/..%2Fui.py", "/ui/index.html", "/ui/"):
        assert client.get(path).status_code == 404, path


def test_page_loads_without_the_key_but_the_api_needs_it():
    with TestClient(create_app({NAME: None}, api_key="sekret")) as c:
        assert c.get("/").status_code == 200
        assert c.get("/ui/app.js").status_code == 200
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["message"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_no_ui_answers_root_as_before():
    with TestClient(create_app({NAME: None}, ui=False)) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.text == "edgelm is running"
        assert r.headers["content-type"].startswith("text/plain")
        assert c.get("/ui/app.js").status_code == 404


def test_serve_command_has_no_ui_flag():
    from click.testing import CliRunner

    from edgelm.cli.serve import serve_command

    out = CliRunner().invoke(serve_command, ["--help"]).output
    assert "--no-ui" in out and "chat page" in out


def test_page_script_never_uses_html_sinks():
    """Model text reaches the page only as text nodes: the script has no innerHTML/outerHTML/insertAdjacentHTML,
    document.write or eval (the CSP would also refuse eval)."""
    _, assets = load_assets()
    js = assets["app.js"].body.decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert "textContent" in js


def test_the_static_files_are_package_data():
    """A non-editable install ships the page: pyproject's package-data names the folder."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    package_data = (root / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert re.search(r'^"edgelm\.server" = \[[^\]]*"static/\*"', package_data, re.M), package_data
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in (root / "edgelm/server/static").iterdir()}


@pytest.mark.slow
def test_a_built_wheel_ships_the_page(tmp_path):
    """What a non-editable install gets: the wheel holds every file of the page.  Built from a copy of the sources
    (so no stale build/ folder can supply the files) by pip in an isolated environment: about 15 s."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "edgelm", "runtimes", "converters", "platforms"):
        if (root / name).is_dir():
            shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(root / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("edgelm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (root / "edgelm/server/static").iterdir()}
    assert {f"edgelm/server/static/{n}" for n in shipped} <= names
    assert "edgelm/server/ui.py" in names
