"""The relay's web page: static files from kbfs/web/ and the routes that serve them.

What it does:
- `GET /` is the page (kbfs/web/index.html): the shares the relay lists. A share's
  listing URL, `/s/{share}/list[/{path}]`, answers the same page to a request that asks
  for HTML (`Accept: text/html` ranked at least as high as JSON: a browser's navigation)
  and the relay's JSON to anything else (`*/*`, fetch, curl, kbfs): `html_or(listing)`.
  Both answers say `Vary: Accept`.
- `GET /ui/{file}` serves the page's own scripts, styles and vendored libraries from
  kbfs/web/static/ (names of plain characters only, no dot files, nothing outside that
  folder, a fixed list of file types), with an ETag and `Cache-Control: no-cache`.
- Every answer of the page or its files carries `UI_HEADERS`: a Content-Security-Policy
  that runs only the relay's own script files (no inline script, no eval, no script from
  elsewhere; WebAssembly compilation is allowed for kbfs.js's hashes), reads only from the
  relay itself, and may not be framed; `nosniff`; no Referer.

What it does not do: it reads no share data and no catalogue. The page is the same bytes
for every share and path (it reveals nothing about a private share; the page's script asks
the JSON API, which decides). Tokens never pass through here: the page keeps them in
sessionStorage and sends them in `Authorization` headers only.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from starlette.routing import Route

from kbfs.httpserve import ASGIApp, Endpoint, Message, Receive, Scope, Send, header, send_json

WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC_DIR = WEB_DIR / "static"
PAGE = WEB_DIR / "index.html"
VIEW_PAGE = WEB_DIR / "view.html"  # `/v/#src=...`: a view link (static/view.js)
UI_PREFIX = "/ui/"

CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
       "img-src 'self' blob:; connect-src 'self'; worker-src 'self'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
UI_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".map": "application/json",
}
# The view page's one inline script (its first read, asked while the modules load): allowed
# by its SHA-256 in that page's CSP, and by nothing else; every other inline script is refused.
EARLY_SCRIPT = re.compile(rb"<!--kbfs-early--><script>(.*?)</script><!--/kbfs-early-->", re.S)
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
MAX_STATIC_BYTES = 8 << 20  # the largest file served (a vendored WASM library fits)


def wants_html(accept: str | None) -> bool:
    """Does an Accept header rank text/html at least as high as JSON (and above 0)?
    `*/*` alone, as fetch and curl send, is JSON: the API's answer stays the default."""
    if not accept:
        return False
    html = json_q = 0.0
    for item in accept.split(",")[:50]:
        media, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media in ("text/html", "application/xhtml+xml"):
            html = max(html, q)
        elif media == "application/json":
            json_q = max(json_q, q)
    return html > 0 and html >= json_q


def page_csp(body: bytes) -> str:
    """CSP for the page BODY: the UI's, with the hash of its marked first script if any."""
    m = EARLY_SCRIPT.search(body)
    if m is None:
        return CSP
    digest = base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()
    return CSP.replace("script-src 'self'", f"script-src 'self' 'sha256-{digest}'", 1)


async def _send_file(scope: Scope, send: Send, path: Path, content_type: str,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = path.read_bytes()
    etag = '"' + hashlib.sha1(body).hexdigest()[:20] + '"'
    ui = UI_HEADERS if path.suffix != ".html" else [
        (b"content-security-policy", page_csp(body).encode()), *UI_HEADERS[1:]]
    headers = [(b"content-type", content_type.encode()), (b"etag", etag.encode()),
               (b"cache-control", b"no-cache"), *ui, *(extra or [])]
    status = 200
    inm = header(scope, b"if-none-match")
    if inm is not None and etag in [t.strip() for t in inm.split(",")]:
        status, body = 304, b""
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


async def page(scope: Scope, receive: Receive, send: Send) -> None:
    """The page: one HTML file for `/` and every listing URL; its script reads the URL."""
    await _send_file(scope, send, PAGE, TYPES[".html"], [(b"vary", b"Accept")])


async def view_page(scope: Scope, receive: Receive, send: Send) -> None:
    """The view page: the same bytes for every view (the view is in the URL's fragment)."""
    await _send_file(scope, send, VIEW_PAGE, TYPES[".html"])


def static_file(rel: str) -> Path | None:
    """The file under STATIC_DIR that the URL path REL (after /ui/) names, or None.
    Only plain names (letters, digits, `_.-`, not starting with a dot), a known file type,
    a regular file that resolves inside STATIC_DIR (no symlink out)."""
    parts = rel.split("/")
    if not rel or len(parts) > 4 or not all(_PART.fullmatch(p) for p in parts):
        return None
    if Path(parts[-1]).suffix not in TYPES:
        return None
    path = STATIC_DIR.joinpath(*parts)
    try:
        real = path.resolve(strict=True)
        ok = real.is_relative_to(STATIC_DIR.resolve()) and real.is_file() \
            and real.stat().st_size <= MAX_STATIC_BYTES
    except (OSError, RuntimeError):
        return None
    return real if ok else None


async def static(scope: Scope, receive: Receive, send: Send) -> None:
    """`/ui/{path}`: one of the page's files, or a 404 (with the same security headers)."""
    path = static_file(scope["path_params"]["path"])
    if path is None:
        await send_json(send, 404, {"error": "no such file of the web page"}, UI_HEADERS)
        return
    await _send_file(scope, send, path, TYPES[path.suffix])


def html_or(api: ASGIApp) -> ASGIApp:
    """An endpoint answering the page to a browser's navigation (`wants_html`) and API's
    answer, with `Vary: Accept` added, to everything else."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if wants_html(header(scope, b"accept")):
            await page(scope, receive, send)
            return

        async def send_vary(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"vary", b"Accept")]
            await send(message)

        await api(scope, receive, send_vary)

    return endpoint


def routes() -> list[Route]:
    """The page's own routes (the listing URLs are wrapped with `html_or` by the relay)."""
    get = ["GET", "HEAD"]
    return [
        Route("/", Endpoint(page), methods=get),
        Route("/v/", Endpoint(view_page), methods=get),
        Route(UI_PREFIX + "{path:path}", Endpoint(static), methods=get),
    ]
