"""A real headless Chromium (Debian's chromium + chromium-driver) driven by selenium.

    browser = start_browser(tmp_path)        # or the `browser` fixture of a test module
    browser.get(relay.url + "/")
    shot(browser, "01-shares")               # docs/screenshots/01-shares.png (KBFS_SCREENSHOTS=1)
    browser.quit()

Flags: headless, no sandbox (containers), no GPU, no background networking, component
updates, sync or first-run, a fresh --user-data-dir, and every non-loopback request sent
to a dead proxy (127.0.0.1:9), so the browser reaches nothing but the test's own servers.
`missing_reason()` says why Chromium cannot run here (then the tests skip with it).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# docs/screenshots/ is rewritten only when asked (KBFS_SCREENSHOTS=1 .venv/bin/pytest
# tests/test_web_page.py tests/test_web_security.py), so a test run leaves the checkout
# clean; otherwise the same screenshots are taken into a temporary folder.
SCREENSHOTS = (REPO / "docs" / "screenshots" if os.environ.get("KBFS_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / f"kbfs-screenshots-{os.getuid()}")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-default-apps",
         "--disable-features=Translate,OptimizationHints,MediaRouter",
         "--proxy-server=http://127.0.0.1:9", "--window-size=1280,900", "--lang=en-US"]


def chromium_paths() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or shutil.which("chromium-browser"),
            shutil.which("chromedriver"))


def missing_reason() -> str | None:
    """Why no browser test can run here, or None."""
    browser, driver = chromium_paths()
    if not browser or not driver:
        return "Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def start_browser(tmp_path: Path) -> Any:
    """A fresh headless Chromium with its own profile folder under TMP_PATH."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    assert browser and driver, missing_reason()
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not look anything up
    opts = Options()
    opts.binary_location = browser
    for flag in FLAGS:
        opts.add_argument(flag)
    profile = Path(tmp_path) / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(executable_path=driver, log_output=str(Path(tmp_path) / "chromedriver.log"))
    drv = webdriver.Chrome(service=service, options=opts)
    drv.set_page_load_timeout(30)
    drv.set_script_timeout(30)
    return drv


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll PREDICATE until it returns something true; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # an element not there yet, a stale one
            last_exc = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def shot(driver: Any, name: str, max_height: int = 1400) -> Path:
    """Save docs/screenshots/NAME.png: the page 1280 px wide and as tall as its content
    (at most MAX_HEIGHT), through DevTools' device metrics (a window resize stops short)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    height = max(600, min(max_height, int(height)))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        data = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})["data"]
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(data))
    return path


def console_errors(driver: Any) -> list[str]:
    """The browser console's errors since the last call (CSP violations, uncaught errors)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def requests_sent(driver: Any) -> list[dict[str, Any]]:
    """Network requests the page sent since the last call (DevTools performance log):
    [{url, method, headers}] in order."""
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            req = msg["params"]["request"]
            out.append({"url": req["url"], "method": req["method"], "headers": req.get("headers", {})})
    return out
