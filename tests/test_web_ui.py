"""The relay's web page over HTTP (kbfs/webui.py), with a real relay and share: `/` and a
listing URL asked for HTML get the page, the API keeps JSON; the page's security headers
on every answer of the page and its files; hostile /ui/ paths; a private share's page says
nothing about the share. (The page in a real browser: tests/test_web_page.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests
from hostileutil import get_request, raw_http
from netutil import start_relay, start_share

from kbfs import webui

HTML = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"  # Chromium's navigation


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("webui")
    data = tmp / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.csv").write_text("x,y\n1,2\n")
    secret = tmp / "secret"
    secret.mkdir()
    (secret / "s.txt").write_text("private")
    relay = start_relay(tmp)
    share = start_share(data, relay.url, tmp)
    private = start_share(secret, relay.url, tmp, "--private")
    yield relay, share, private
    private.stop()
    share.stop()
    relay.stop()


def assert_ui_headers(resp: requests.Response) -> None:
    assert resp.headers["content-security-policy"] == webui.CSP
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.headers["x-frame-options"] == "DENY"


def test_csp_allows_only_own_scripts() -> None:
    parts = dict(p.strip().split(" ", 1) for p in webui.CSP.split(";"))
    assert parts["default-src"] == "'none'"
    # 'self' and WebAssembly compilation (kbfs.js hashes); no inline script, no eval, no host
    assert parts["script-src"] == "'self' 'wasm-unsafe-eval'"
    assert parts["connect-src"] == "'self'" and parts["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in webui.CSP and "unsafe-eval'" not in webui.CSP.replace("wasm-unsafe-eval'", "")


def test_root_is_the_page(net) -> None:
    relay, _, _ = net
    resp = requests.get(relay.url + "/", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/ui/app.js">' in resp.text
    assert_ui_headers(resp)
    head = requests.head(relay.url + "/", timeout=10)
    assert head.status_code == 200 and head.content == b""
    again = requests.get(relay.url + "/", headers={"If-None-Match": resp.headers["etag"]}, timeout=10)
    assert again.status_code == 304 and again.content == b""
    assert_ui_headers(again)


@pytest.mark.parametrize("accept", [HTML, "text/html", "application/json;q=0.5, text/html"])
def test_listing_asked_for_html_is_the_page(net, accept: str) -> None:
    relay, share, _ = net
    for path in ("", "/sub"):
        resp = requests.get(f"{relay.url}/s/{share.id}/list{path}", headers={"Accept": accept}, timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/html")
        assert resp.headers["vary"] == "Accept"
        assert_ui_headers(resp)


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json, text/html;q=0.9",
                                    "text/html;q=0", "text/html;q=bogus", "text/plain"])
def test_listing_api_keeps_json(net, accept: str | None) -> None:
    relay, share, _ = net
    headers = {"Accept": accept} if accept else {}
    resp = requests.get(f"{relay.url}/s/{share.id}/list/sub", headers=headers, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["vary"] == "Accept"
    assert [f["name"] for f in resp.json()["files"]] == ["a.csv"]


def test_private_share_page_says_nothing(net) -> None:
    """The page of a private share is the same bytes as the page of a share that does not
    exist; the JSON behind it answers 401 without the token, the listing with it."""
    relay, _, private = net
    absent = "a" * 32
    page = requests.get(f"{relay.url}/s/{private.id}/list", headers={"Accept": HTML}, timeout=10)
    other = requests.get(f"{relay.url}/s/{absent}/list", headers={"Accept": HTML}, timeout=10)
    assert page.status_code == other.status_code == 200 and page.content == other.content
    assert requests.get(f"{relay.url}/s/{private.id}/list", timeout=10).status_code == 401
    ok = requests.get(f"{relay.url}/s/{private.id}/list",
                      headers={"Authorization": f"Bearer {private.token}"}, timeout=10)
    assert [f["name"] for f in ok.json()["files"]] == ["s.txt"]


def test_static_files(net) -> None:
    relay, _, _ = net
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css"),
                       ("viewers/hex.js", "text/javascript")]:
        resp = requests.get(f"{relay.url}/ui/{name}", timeout=10)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(kind), name
        assert resp.content == (webui.STATIC_DIR / name).read_bytes()
        assert_ui_headers(resp)


HOSTILE = ["/ui/../webui.py", "/ui/%2e%2e/index.html", "/ui/..%2findex.html", "/ui/.hidden.js",
           "/ui/viewers/../../webui.py", "/ui//etc/passwd", "/ui/", "/ui/app.py", "/ui/app.js%00.css",
           "/ui/app.js/", "/ui/%2e%2e%2f%2e%2e%2frelay.py", "/ui/a/b/c/d/e.js", "/ui/app.js;.css",
           "/ui/" + "a" * 200 + ".js", "/ui/..\\webui.py", "/ui/~root.js"]


@pytest.mark.parametrize("path", HOSTILE)
def test_static_hostile_paths(net, path: str) -> None:
    relay, _, _ = net
    status, head, body = raw_http(relay.url, get_request(path))
    assert status is not None and 400 <= status < 500, (path, status)
    assert b"import" not in body and b"def " not in body  # no script, no Python source
    if status == 404:
        assert webui.CSP.encode() in head


def test_static_symlink_out_is_refused(net) -> None:
    """A symbolic link inside the static folder that points out of it is not served."""
    relay, _, _ = net
    link = webui.STATIC_DIR / f"test-link-{os.getpid()}.js"
    target = Path(webui.__file__)  # kbfs/webui.py, outside the static folder
    os.symlink(target, link)
    try:
        assert webui.static_file(link.name) is None
        assert requests.get(f"{relay.url}/ui/{link.name}", timeout=10).status_code == 404
    finally:
        link.unlink()


def test_wants_html() -> None:
    assert webui.wants_html(HTML)
    assert webui.wants_html("text/html")
    assert webui.wants_html("application/xhtml+xml")
    assert not webui.wants_html(None)
    assert not webui.wants_html("")
    assert not webui.wants_html("*/*")
    assert not webui.wants_html("application/json, text/html;q=0.5")
    assert not webui.wants_html("text/html;q=0")
    assert not webui.wants_html("text/html;q=x")
    assert not webui.wants_html("," * 10000)
