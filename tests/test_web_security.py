"""The web page against hostile names and injected scripts, in a real headless Chromium on a
real relay and share (tests/browserutil.py).

- File and folder names holding HTML, quotes, control characters, bidi overrides, URL
  syntax, and files whose content is HTML or an SVG with a script: through a real share's
  listing, every name renders as text (control characters as visible escapes), the page
  holds no element or handler the names made, and nothing runs (`window.pwned` stays
  unset, no alert).
- The Content-Security-Policy: on the page an inline script, an inline event handler and a
  script from another origin are all blocked and reported; the same injections run on a
  page without the policy (another loopback origin), so each check can fail. (eval is not
  tried: code run through DevTools is exempt from the eval rule; test_web_ui checks the
  header allows no 'unsafe-eval'.)
"""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from browserutil import missing_reason, shot, start_browser, wait_for
from netutil import start_relay, start_share

REASON = missing_reason()
if REASON:
    print(f"test_web_security: skipped: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

HOSTILE_FILES = {
    '<img src=x onerror="window.pwned=1">.txt': b"<script>window.pwned=4</script><img src=x onerror=window.pwned=5>\n",
    "<svg onload=window.pwned=2>.csv": b'a,b\n"<img src=x onerror=window.pwned=7>",<b>bold</b>\n',
    "\"quoted' & &amp; `tick`.txt": b"quotes\n",
    "ctl\x01\x1b[31mred\x7f\x9b.txt": b"control\n",
    "line\nbreak.txt": b"newline in the name\n",
    "rtl\u202egnp.exe": b"bidi\n",
    "#frag?q=1&x=%2e%2e.txt": b"url syntax\n",
    "evil.svg": b'<svg xmlns="http://www.w3.org/2000/svg" onload="window.parent.pwned=6"><script>'
                b"window.parent.pwned=6</script><rect width='10' height='10'/></svg>",
}
HOSTILE_DIRS = ["javascript:window.pwned=3", "<b onmouseover=window.pwned=8>dir &lt;"]
SHARE_NAME = "lab ${window.pwned=9} {{7*7}} javascript:x"


def visible(name: str) -> str:
    """The page's dom.js `visible`: control characters as \\xNN / \\u{...}."""
    def esc(m: re.Match[str]) -> str:
        code = ord(m.group(0))
        return f"\\x{code:02x}" if code < 256 else f"\\u{{{code:x}}}"
    return re.sub("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]", esc, name)


def css(driver: Any, selector: str) -> Any:
    return driver.find_element("css selector", selector)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("websec")
    data = tmp / "data"
    data.mkdir()
    for name, body in HOSTILE_FILES.items():
        (data / name).write_bytes(body)
    for d in HOSTILE_DIRS:
        (data / d).mkdir()
        (data / d / "inside.txt").write_bytes(b"x\n")
    relay = start_relay(tmp)
    share = start_share(data, relay.url, tmp, "--name", SHARE_NAME)
    driver = start_browser(tmp)
    try:
        yield relay, share, driver
    finally:
        driver.quit()
        share.stop()
        relay.stop()


def assert_nothing_ran(driver: Any, origin: str) -> None:
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    assert driver.execute_script("return document.title").find("49") < 0  # no template evaluated
    # no element or handler made from a name: the only scripts are the page's own files
    scripts = driver.execute_script("return Array.from(document.scripts, s => s.src)")
    assert scripts == [origin + "/ui/app.js"]
    assert driver.execute_script(
        "return document.querySelectorAll('[onerror],[onload],[onmouseover],b,svg,script:not([src])').length") == 0
    from selenium.common.exceptions import NoAlertPresentException
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


def test_hostile_names_render_as_text(site: tuple[Any, Any, Any]) -> None:
    relay, share, driver = site
    driver.get(relay.url + "/")
    link = wait_for(lambda: css(driver, "a.share-link"), what="share list")
    assert link.text == SHARE_NAME
    assert_nothing_ran(driver, relay.url)
    link.click()
    wait_for(lambda: driver.find_elements("css selector", "a.file-link"), what="folder page")
    shown = {a.text for a in driver.find_elements("css selector", "a.file-link")}
    listed = {visible(n) for n in HOSTILE_FILES}
    assert listed <= shown, listed - shown  # every hostile name, as text
    dirs = {a.text for a in driver.find_elements("css selector", "a.dir-link")}
    assert {visible(d) + "/" for d in HOSTILE_DIRS} <= dirs
    assert css(driver, "#share-name").text == SHARE_NAME
    assert_nothing_ran(driver, relay.url)
    shot(driver, "10-hostile-names")
    # each file's panel and preview: name and content as text
    for name in HOSTILE_FILES:
        a = [x for x in driver.find_elements("css selector", "a.file-link") if x.text == visible(name)][0]
        a.click()
        wait_for(lambda n=name: css(driver, "#file-name").text == visible(n), what=f"panel of {name!r}")
        wait_for(lambda: css(driver, "#preview-status").text != "opening…", what="preview")
        if name.startswith("<img"):
            wait_for(lambda: "<script>window.pwned=4</script>" in css(driver, "#text-view").text, what="text")
        if name.endswith(".csv"):
            wait_for(lambda: driver.find_elements("css selector", "#csv-view td"), what="csv")
            assert css(driver, "#csv-view td").text == "<img src=x onerror=window.pwned=7>"
        if name == "evil.svg":
            wait_for(lambda: driver.execute_script(
                "const i = document.querySelector('#image-view'); return i && i.complete"), what="svg image")
        assert_nothing_ran_panel(driver)
    for d in HOSTILE_DIRS:
        driver.get(relay.url + f"/s/{share.id}/list")
        wait_for(lambda: driver.find_elements("css selector", "a.dir-link"), what="folder page")
        [x for x in driver.find_elements("css selector", "a.dir-link") if x.text == visible(d) + "/"][0].click()
        wait_for(lambda: [x for x in driver.find_elements("css selector", "a.file-link") if x.text == "inside.txt"],
                 what=f"inside {d!r}")
        assert_nothing_ran(driver, relay.url)


def assert_nothing_ran_panel(driver: Any) -> None:
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    # only the image viewer's own <img>, never one from a name or a file's text
    imgs = driver.execute_script("return Array.from(document.images, i => i.id)")
    assert all(i == "image-view" for i in imgs), imgs
    assert driver.execute_script(
        "return document.querySelectorAll('[onerror],[onload],b,svg,script:not([src])').length") == 0


class _Foreign(http.server.BaseHTTPRequestHandler):
    """Another origin on loopback: one script (the CSP must not run it) and a page with no
    policy, where the same injections must run."""

    def do_GET(self) -> None:
        page = self.path.startswith("/page")  # a page without any policy: the control
        body = b"<html><head></head><body>no policy</body></html>" if page else b"window.foreignRan = 1;"
        self.send_response(200)
        self.send_header("content-type", "text/html" if page else "text/javascript")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


INJECT = """
const done = arguments[arguments.length - 1];
const foreign = arguments[0];
window.violations = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.violations.push([e.violatedDirective, e.blockedURI]));
const s = document.createElement('script');
s.textContent = 'window.inlineRan = 1;';
document.head.append(s);
document.body.insertAdjacentHTML('beforeend', '<img id="h" src="/nothing.png" onerror="window.handlerRan = 1">');
const f = document.createElement('script');
f.src = foreign;
document.head.append(f);
setTimeout(() => done({inline: window.inlineRan === 1, handler: window.handlerRan === 1,
                       foreign: window.foreignRan === 1, violations: window.violations}), 1500);
"""


def test_csp_blocks_inline_and_foreign_scripts(site: tuple[Any, Any, Any], tmp_path: Path) -> None:
    relay, _, driver = site
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    foreign = f"http://127.0.0.1:{server.server_address[1]}/x.js"
    try:
        # without the policy every injection runs: the method works
        driver.get(foreign.replace("/x.js", "/page.html"))
        free = driver.execute_async_script(INJECT, foreign)
        assert free["inline"] and free["handler"] and free["foreign"], free
        # the relay's page: all four blocked, each reported as a violation
        driver.get(relay.url + "/")
        wait_for(lambda: driver.find_elements("css selector", "a.share-link"), what="page")
        got = driver.execute_async_script(INJECT, foreign)
        assert not got["inline"] and not got["handler"] and not got["foreign"], got
        assert ["script-src-elem", "inline"] in got["violations"], got
        assert ["script-src-attr", "inline"] in got["violations"], got
        assert ["script-src-elem", foreign] in got["violations"], got
        # the page's own scripts did run
        assert driver.find_elements("css selector", "#share-table")
    finally:
        server.shutdown()
        server.server_close()
