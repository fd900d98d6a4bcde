"""The web page on an https relay (`kbfs relay --certfile/--keyfile`, a private CA made by
tests/deployutil.py), in headless Chromium: a file's panel gives `kbfs+https://HOST:PORT/...`
links (the ones `kbfs` reads, written as kbfs/kbfsurl.py writes them), not `kbfs://`,
and its preview reads verified bytes over https. The http page's links are checked by
tests/test_web_page.py; kbfs/web/static/file.js writes both from location.origin.

Chromium is told to accept the test CA's certificate (acceptInsecureCerts): what is
tested is the page's link, not certificate checks (tests/test_kbfs_https.py has those).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browserutil import FLAGS, chromium_paths, missing_reason, wait_for
from deployutil import make_pki, start_tls_relay
from netutil import start_share

from kbfs import kbfsurl

REASON = missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _browser(tmp: Path) -> Any:
    """browserutil.start_browser's Chromium, taking the test CA's certificate."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    os.environ["SE_OFFLINE"] = "true"
    opts = Options()
    opts.binary_location = browser
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp / 'chromium-profile'}")
    opts.accept_insecure_certs = True
    drv = webdriver.Chrome(service=Service(executable_path=driver, log_output=str(tmp / "chromedriver.log")),
                           options=opts)
    drv.set_page_load_timeout(30)
    return drv


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("webhttps")
    pki = make_pki(tmp / "pki")
    data = tmp / "data"
    (data / "day 1").mkdir(parents=True)
    (data / "day 1" / "notes (v2).txt").write_text("hello over tls\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(pki.ca))  # the share and start_share's polling trust the CA
        relay = start_tls_relay(tmp, pki.good)
        try:
            share = start_share(data, relay.url, tmp)
            try:
                driver = _browser(tmp)
                try:
                    yield {"relay": relay, "share": share, "driver": driver}
                finally:
                    driver.quit()
            finally:
                share.stop()
        finally:
            relay.stop()


def test_an_https_page_gives_kbfs_https_links(site: dict[str, Any]) -> None:
    relay, share, driver = site["relay"], site["share"], site["driver"]
    assert relay.url.startswith("https://127.0.0.1:")
    driver.get(f"{relay.url}/s/{share.id}/list/day%201")
    name = "notes (v2).txt"
    link = wait_for(lambda: [a for a in driver.find_elements("css selector", "a.file-link") if a.text == name],
                    what="the file's link")[0]
    link.click()
    wait_for(lambda: driver.find_element("css selector", "#file-name").text == name, what="file panel")
    got = driver.find_element("css selector", "#kbfs-url").text
    want = kbfsurl.link(relay.url, share.id, f"day 1/{name}")
    assert got == want and want.startswith(f"kbfs+https://{relay.url.removeprefix('https://')}/"), got
    assert kbfsurl.parse(got) == (relay.url, share.id, f"day 1/{name}")
    commands = driver.find_element("css selector", "#commands").text
    assert f"kbfs download {want}" in commands.replace("'", ""), commands
    assert f"kbfs mount {kbfsurl.link(relay.url, share.id, 'day 1/')} " in commands.replace("'", ""), commands
    wait_for(lambda: "hello over tls" in driver.find_element("css selector", "#preview-body").text,
             what="the preview, read over https")
