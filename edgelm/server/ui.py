"""The chat page `edgelm serve` shows at `/`: static files shipped inside the package, no build step, no CDN.

The page (``static/index.html``, ``app.js``, ``style.css``) talks to the server's own OpenAI routes
(``GET v1/models``, ``POST v1/chat/completions`` with ``stream: true``), so it needs nothing the API does not
already offer.  The page and its files load without the API key (they hold no data); the API routes keep asking
for it, and the page prompts for it when they answer 401.

Every file is read once, when the app is built.  Each response carries a Content-Security-Policy that allows
only this origin's scripts, styles and fetches (no inline script, no eval, no framing), ``nosniff``, and a strong
ETag.  The page itself is revalidated on every load (``no-cache``); it links its files with ``?v=<etag>``, and
those versioned URLs are cached for a year (``immutable``): a new edgelm version gets new URLs.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from typing import Any

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

REVALIDATE = "no-cache"
FOREVER = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str  # quoted, as in the header

    @property
    def version(self) -> str:
        return self.etag.strip('"')


def _asset(name: str, body: bytes) -> Asset:
    suffix = name[name.rfind("."):]
    return Asset(body, CONTENT_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def load_assets() -> tuple[Asset, dict[str, Asset]]:
    """The page and its files {name: Asset}; the page links each file by a URL carrying its version."""
    folder = importlib.resources.files("edgelm.server") / "static"
    files = {entry.name: entry.read_bytes() for entry in folder.iterdir()
             if entry.is_file() and entry.name[entry.name.rfind("."):] in CONTENT_TYPES}
    if "index.html" not in files:
        raise FileNotFoundError(f"The chat page is missing from this installation ({folder}/index.html); "
                                "reinstall edgelm, or serve with --no-ui.")
    page = files.pop("index.html").decode("utf-8")
    assets = {name: _asset(name, body) for name, body in files.items()}
    for name, asset in assets.items():
        page = page.replace(f'"ui/{name}"', f'"ui/{name}?v={asset.version}"')
    return _asset("index.html", page.encode("utf-8")), assets


def ui_routes() -> list[Any]:
    """Starlette routes for ``/`` (the page) and ``/ui/{name}`` (its files)."""
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    index, assets = load_assets()

    def send(request: Request, asset: Asset, cache: str) -> Response:
        headers = {**SECURITY_HEADERS, "Cache-Control": cache, "ETag": asset.etag}
        if asset.etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        body = b"" if request.method == "HEAD" else asset.body
        response = Response(body, media_type=asset.content_type, headers=headers)
        response.headers["Content-Length"] = str(len(asset.body))
        return response

    async def page(request: Request) -> Response:
        return send(request, index, REVALIDATE)

    async def static(request: Request) -> Response:
        asset = assets.get(request.path_params["name"])
        if asset is None:
            return PlainTextResponse("Not found.", status_code=404, headers=SECURITY_HEADERS)
        versioned = request.query_params.get("v") == asset.version
        return send(request, asset, FOREVER if versioned else REVALIDATE)

    return [Route("/", page, methods=["GET", "HEAD"]),
            Route("/ui/{name}", static, methods=["GET", "HEAD"])]


__all__ = ["ui_routes", "load_assets", "CSP"]
