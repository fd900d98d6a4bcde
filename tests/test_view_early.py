"""The view page's first read, asked by its one inline script while the modules load
(kbfs/web/view.html, `<!--kbfs-early-->`; kbfs/web/static/view.js `earlyFetch`), in a real
Chromium on a real relay and share.

- The CSP of /v/ allows that one script by its SHA-256 and nothing else inline (an inline
  script added to the page is refused); `/` and the page's files keep the UI's CSP; the
  exported page has no inline script at all.
- Opened from a view link, the read goes out before the modules are in, exactly once (the
  viewer's own first read takes its answer: not asked twice), and the screen is right.
- A hostile or unusual link (bad SHA-1, size, root, block size, a private share's, a
  token) makes the script ask nothing.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from browserutil import console_errors, missing_reason, requests_sent, start_browser, wait_for
from hostileutil import fake_share
from mdautil import truth, write_mda
from netutil import get_json, start_relay, start_share

from kbfs import viewexport, webui

REASON = missing_reason()
M, N = 8, 200_000  # 3.2 MB of int16
BS = 65536
FIRST = 9 * BS  # mda.js: HEADER_READ + FIRST_SCREEN, in whole 64 KiB pieces


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("viewearly")
    data = tmp / "data"
    data.mkdir()
    write_mda(data / "rec.mda", M, N, [(0, N)])
    relay = start_relay(tmp)
    share = start_share(data, relay.url, tmp)
    try:
        listing = get_json(f"{relay.url}/s/{share.id}/list/")
        e = listing["files"][0]
        p = e["prv"]
        frag = viewexport.fragment(p["original_checksum"], e["name"], p["original_size"],
                                   p["kbfs_tree"]["root"], p["kbfs_tree"]["block_size"], "ch=0-7")
        yield {"relay": relay, "share": share, "frag": frag, "sha1": p["original_checksum"], "tmp": tmp}
    finally:
        share.stop()
        relay.stop()


def get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.headers["Content-Security-Policy"], resp.read().decode()


def test_the_view_pages_csp_allows_its_one_script(site: Any) -> None:
    relay = site["relay"]
    csp, page = get(f"{relay.url}/v/")
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1 and "<!--kbfs-early--><script>" in page
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert re.findall(r"'sha256-[^']*'", csp) == [f"'sha256-{digest}'"], csp
    assert csp == webui.CSP.replace("script-src 'self'", f"script-src 'self' 'sha256-{digest}'")
    assert "unsafe-inline" not in csp
    for path in ("/", "/ui/view.js", "/ui/view-bundle.js"):
        assert get(relay.url + path)[0] == webui.CSP, path
    # a page without the marked script gets the UI's CSP; a changed script gets its own hash
    assert webui.page_csp(b"<script>x()</script>") == webui.CSP
    other = webui.page_csp(b"<!--kbfs-early--><script>x()</script><!--/kbfs-early-->")
    assert other != csp and "'sha256-" in other
    exported = viewexport.page_html(["http://127.0.0.1:1"])
    assert "kbfs-early" not in exported and not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", exported)


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_the_first_read_goes_out_with_the_modules_once(site: Any) -> None:
    relay = site["relay"]
    driver = start_browser(site["tmp"] / "chrome")
    try:
        requests_sent(driver)
        driver.get(f"{relay.url}/v/#{site['frag']}")
        wait_for(lambda: driver.execute_script(
            "const b = document.querySelector('#preview-body'); return b && Number(b.dataset.draws) > 0"),
            timeout=30, what="the first screen")
        wait_for(lambda: driver.execute_script(
            "return document.querySelector('#preview-body').dataset.pending") in (None, "0"), what="prefetch")
        sent = [r for r in requests_sent(driver) if "/sha1/" in r["url"]]
        first = [r for r in sent if r["headers"].get("Range") == f"bytes=0-{FIRST - 1}"]
        assert len(first) == 1, sent  # asked once: the viewer took the early answer
        assert first[0]["headers"].get("Kbfs-Want-Proof") == "bs=65536"
        assert sent[0] is first[0]  # the first data request of the page
        timing = driver.execute_script(
            "const e = performance.getEntriesByType('resource');"
            "const f = (s) => e.find((x) => x.name.includes(s));"
            "return [f('/sha1/').startTime, f('/ui/view-bundle.js').responseEnd,"
            " f('/ui/lib/hash-wasm/').responseEnd]")
        assert timing[0] < timing[1] and timing[0] < timing[2], timing  # before the modules were in
        # the page's scripts: the bundle and the hash library, nothing else
        scripts = driver.execute_script(
            "return performance.getEntriesByType('resource').map((e) => e.name).filter((n) => n.endsWith('.js'))")
        assert sorted(u.split("/ui/")[1] for u in scripts) == ["lib/hash-wasm/index.esm.min.js", "view-bundle.js"]
        probe = driver.execute_script("return document.querySelector('#preview-body').dataset.probe")
        assert [int(v) for v in probe.split(",")] == [int(v) for v in truth([0], M)[0][:M]]
        # the CSP refuses any other inline script on this page
        ran = driver.execute_script(
            "const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
            "document.head.append(s); return window.injected === 1")
        assert not ran
        errors = console_errors(driver)
        assert all("Content Security Policy" in e for e in errors) and errors, errors
    finally:
        driver.quit()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_unusual_links_ask_nothing_early(site: Any) -> None:
    relay, sha1 = site["relay"], site["sha1"]
    frag = site["frag"]
    n = re.search(r"&n=([0-9]+)", frag).group(1)  # type: ignore[union-attr]
    r = re.search(r"&r=([0-9a-f]+)", frag).group(1)  # type: ignore[union-attr]
    hostile = [
        frag.replace(sha1, sha1[:39] + "g"),
        frag.replace(sha1, sha1 + "')//"),
        frag.replace(f"&n={n}", "&n=1e9"),
        frag.replace(f"&n={n}", "&n=9999999999999999999"),
        frag.replace(f"&r={r}", f"&r={r[:63]}"),
        frag.replace("&bs=65536", "&bs=1048576"),
        frag + "&share=" + "a" * 52,
        frag + "&t=-1",
        frag + "&token=kbfs1.x.y",
    ]
    driver = start_browser(site["tmp"] / "chrome2")
    try:
        for bad in hostile:
            driver.get("about:blank")
            requests_sent(driver)
            driver.get(f"{relay.url}/v/#{bad}")
            wait_for(lambda: driver.execute_script(
                "return document.readyState === 'complete'"), what="the page")
            time.sleep(0.5)
            # the viewer itself, on these links, asks no proof without a token (a 1 MiB
            # pointer's blocks need none) or nothing at all: such a request is the script's
            sent = [x for x in requests_sent(driver) if "/sha1/" in x["url"]]
            assert not [x for x in sent if "Kbfs-Want-Proof" in x["headers"]
                        and "Authorization" not in x["headers"]], (bad, sent)
    finally:
        driver.quit()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_the_early_answer_keeps_kbfs_js_deadlines(site: Any) -> None:
    """A share that takes the request and never sends: the early request is given up at
    kbfs.js's first-byte deadline (5 s), as its own would be, not when the relay gives up
    (10 s)."""
    relay = site["relay"]
    sha1, root, size = "ab" * 20, "cd" * 32, 10 << 20
    ready, stop = threading.Event(), threading.Event()

    def silent_share() -> None:
        async def main() -> None:
            async with fake_share(relay.url, [["silent.mda", sha1, size, 0, "", "ef" * 32, root]]):
                ready.set()
                while not stop.is_set():  # gets arrive and are never answered
                    await trio.sleep(0.05)
        trio.run(main)

    thread = threading.Thread(target=silent_share, daemon=True)
    thread.start()
    driver = start_browser(site["tmp"] / "chrome3")
    try:
        assert ready.wait(10)
        frag = viewexport.fragment(sha1, "silent.mda", size, root, BS, "")
        t0 = time.monotonic()
        driver.get(f"{relay.url}/v/#{frag}")
        error = wait_for(lambda: driver.find_elements("css selector", "#view-error"), timeout=20,
                         what="the error line")
        took = time.monotonic() - t0
        assert took < 8, (took, error[0].text)
        assert "no answer" in error[0].text, error[0].text
    finally:
        driver.quit()
        stop.set()
        thread.join(5)


def test_constants_match_the_viewer() -> None:
    """The script's copies of mda.js's HEADER_READ and FIRST_SCREEN."""
    static = Path(webui.STATIC_DIR)
    mda = (static / "viewers" / "mda.js").read_text()
    fmt = (static / "viewers" / "mdaformat.js").read_text()
    page = webui.VIEW_PAGE.read_text()
    assert "const FIRST_SCREEN = 512 << 10;" in mda
    assert "export const HEADER_READ = 12 + 8 * MAX_DIMS;" in fmt and "export const MAX_DIMS = 50;" in fmt
    assert "Number(t) ? 412 : (512 << 10) + 412" in page


def test_the_bundle_is_current() -> None:
    """kbfs/web/static/view-bundle.js is what js/viewbundle.mjs makes of today's modules."""
    node = shutil.which("node")
    if node is None:
        print("SKIP test_the_bundle_is_current: node is not installed (make test installs nodejs)")
        pytest.skip("node is not installed (make test installs nodejs)")
    script = Path(__file__).resolve().parent.parent / "js" / "viewbundle.mjs"
    done = subprocess.run([node, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
