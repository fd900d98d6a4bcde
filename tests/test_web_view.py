"""The .mda viewer and views by link in a real headless Chromium, on a real relay and share.

A 2 GiB recording (32 channels x 2^25 int16 timepoints: a sparse file with two written
regions, a few MiB of disk, deleted at the end) opened from the share's page: the first
screen, a pan by key, button and drag, a jump, a zoom out to the coarse overview; after
each, the values drawn are checked against the generator and the relay's bytes_out against
the ranges the viewer logged (shown windows + prefetched neighbours). A view link reopens
the same state; hostile links and .mda headers are one error line; `kbfs view export`'s
page, served by nginx on another port (another origin), reads and verifies through the
relay's CORS, and a tampered root fails; a private share's view asks for the token and
puts it in a link only when the box is ticked. The relay's content answers carry nosniff
and `CSP: sandbox`. Screenshots to docs/screenshots/ (KBFS_SCREENSHOTS=1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browserutil import console_errors, missing_reason, requests_sent, shot, start_browser, wait_for
from mdautil import header, truth, write_mda
from netutil import get_json, run_kbfs, start_relay, start_share

from kbfs import viewexport

REASON = missing_reason()
if REASON:
    print(f"test_web_view: skipped: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

M = 32
N = (2 << 30) // (2 * M)  # 2 GiB of int16 data
MID = N // 2
# the start, the middle, and 40 short stretches spread over the recording (for the overview)
REGIONS = [(0, 1 << 17), (MID, MID + (1 << 17))] + [(k * (N // 40) + 5000, k * (N // 40) + 13192) for k in range(1, 40)]
BUDGET = 2 << 20  # mda.js SCREEN_BUDGET
BS = 65536


def css(driver: Any, selector: str) -> Any:
    return driver.find_element("css selector", selector)


def bad_headers() -> dict[str, tuple[bytes, str]]:
    """Hostile .mda files -> (bytes, what the viewer's error says)."""
    body = bytes(4096)
    return {
        "code.mda": ((-9).to_bytes(4, "little", signed=True) + header("int16", [2, 8])[4:] + body,
                     "unknown .mda type code"),
        "old.mda": ((2).to_bytes(4, "little") + header("int16", [2, 8])[4:] + body, "pre-2016"),
        "bpe.mda": (header("int16", [2, 8])[:4] + (4).to_bytes(4, "little") + header("int16", [2, 8])[8:] + body,
                    "bytes per entry"),
        "dims0.mda": (header("int16", [2, 8])[:8] + (0).to_bytes(4, "little") + body, "dimensions"),
        "dims99.mda": (header("int16", [2, 8])[:8] + (99).to_bytes(4, "little", signed=True) + body, "dimensions"),
        "negdim.mda": (header("int16", [2, 8])[:12] + (-5).to_bytes(4, "little", signed=True) + body[:100],
                       "dimension 1 is -5"),
        "huge.mda": (header("int16", [2 << 40, 1 << 20], wide=True) + body, "needs"),
        "too-big64.mda": (header("int16", [1, 2**60], wide=True) + body, "2^53"),
        "short.mda": (header("int16", [4, 100000]) + body, "the file has"),
        "tiny.mda": (b"\xfc\xff\xff\xff\x02", "not an .mda file"),
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("webview")
    data = tmp / "lab"
    (data / "rec").mkdir(parents=True)
    (data / "bad").mkdir()
    big = data / "rec" / "big.mda"
    hdr_len = write_mda(big, M, N, REGIONS)
    assert big.stat().st_size == hdr_len + 2 * M * N
    disk = big.stat().st_blocks * 512
    print(f"test_web_view: {big.stat().st_size} byte recording, {disk} bytes on disk")
    assert disk < 64 << 20, "the 2 GiB recording must be sparse"
    write_mda(data / "rec" / "small.mda", 4, 5000, [(0, 5000)])
    for name, (raw, _) in bad_headers().items():
        (data / "bad" / name).write_bytes(raw)
    (data / "evil.html").write_text("<script>document.title='pwned'</script><h1>pwned</h1>")
    secret = tmp / "secret"
    secret.mkdir()
    write_mda(secret / "priv.mda", 8, 20000, [(0, 20000)])
    relay = start_relay(tmp)
    share = start_share(data, relay.url, tmp, "--name", "lab")
    private = start_share(secret, relay.url, tmp, "--private", "--name", "secret-lab")
    driver = start_browser(tmp)
    try:
        yield {"relay": relay, "share": share, "private": private, "driver": driver, "tmp": tmp,
               "hdr": hdr_len}
    finally:
        driver.quit()
        private.stop()
        share.stop()
        relay.stop()
        big.unlink()  # 2 GiB apparent size: not left for pytest's kept temp folders


def health(relay: Any) -> dict[str, Any]:
    return get_json(relay.url + "/api/health")


def entry(relay: Any, share: Any, rel: str, token: str = "") -> dict[str, Any]:
    folder, _, name = rel.rpartition("/")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    listing = get_json(f"{relay.url}/s/{share.id}/list/{folder}", headers=headers)
    return next(f for f in listing["files"] if f["name"] == name)


def fragment_of(e: dict[str, Any], state: str = "", share: str = "") -> str:
    p = e["prv"]
    return viewexport.fragment(p["original_checksum"], e["name"], p["original_size"], p["kbfs_tree"]["root"],
                               p["kbfs_tree"]["block_size"], state, share)


def drawn(driver: Any, after: int = 0) -> dict[str, str]:
    """Wait for the viewer's draw number AFTER+1 (or later) and its reads to end; its data-*."""
    wait_for(lambda: [b for b in driver.find_elements("css selector", "#preview-body[data-draws]")
                      if int(b.get_attribute("data-draws")) > after], what="a drawn screen")[0]
    wait_idle(driver)
    keys = ["t0", "w", "ch", "amp", "mode", "probe", "screenBytes", "draws"]
    return {k: driver.execute_script(f"return document.querySelector('#preview-body').dataset.{k}") for k in keys}


def logged(driver: Any) -> list[tuple[str, int, int]]:
    return [(li.get_attribute("data-kind"), int(li.get_attribute("data-offset")), int(li.get_attribute("data-length")))
            for li in driver.find_elements("css selector", "#mda-reads li")]


def pieces(reads: list[tuple[str, int, int]], size: int) -> int:
    blocks = {b for _, off, n in reads for b in range(off // BS, (off + n - 1) // BS + 1)}
    return sum(min(BS, size - b * BS) for b in blocks)


def probe_ok(d: dict[str, str], channels: int = M) -> None:
    """The values drawn at the screen's first timepoint are the generator's (or zeros)."""
    t0 = int(d["t0"])
    a, b = (int(x) for x in d["ch"].split("-"))
    written = any(r0 <= t0 < r1 for r0, r1 in REGIONS)
    want = [int(v) for v in truth([t0], channels)[0][a:b + 1]] if written else [0] * (b - a + 1)
    assert [int(v) for v in d["probe"].split(",")] == want, (t0, d["probe"])


def wait_idle(driver: Any) -> None:
    """Until the viewer's reads (prefetches too) have ended."""
    wait_for(lambda: driver.execute_script(
        "const b = document.querySelector('#preview-body'); return b && (b.dataset.pending || '0') === '0'"),
        what="the viewer's reads to end")


def test_mda_viewer_reads_only_what_it_shows(site: dict[str, Any]) -> None:
    relay, share, driver = site["relay"], site["share"], site["driver"]
    size = site["hdr"] + 2 * M * N
    before = health(relay)
    driver.get(f"{relay.url}/s/{share.id}/list/rec")
    wait_for(lambda: [a for a in driver.find_elements("css selector", "a.file-link") if a.text == "big.mda"],
             what="link to big.mda")[0].click()
    d = drawn(driver)
    assert d["mode"] == "full" and d["t0"] == "0" and d["ch"] == f"0-{M - 1}", d
    assert 0 < int(d["screenBytes"]) <= BUDGET
    assert css(driver, "#mda-header").text.startswith(f"{M} channels × {N} timepoints of int16")
    probe_ok(d)
    shot(driver, "11-mda-viewer")
    w = int(d["w"])

    def moved_ok(what: str) -> None:
        wait_idle(driver)
        reads = logged(driver)
        moved = health(relay)["bytes_out"] - before["bytes_out"]
        need = pieces(reads, size)
        proofs = 64 * 1024 * len(reads)  # a proof per request, generously
        assert moved <= need + proofs, (what, moved, need)
        assert need < 48 << 20, (what, need)  # never more than a few screens of a 2 GiB file

    moved_ok("first screen")
    canvas = css(driver, "#mda-canvas")
    canvas.click()
    canvas.send_keys("\ue014")  # ArrowRight: a quarter screen on
    d = drawn(driver, int(d["draws"]))
    assert int(d["t0"]) == w // 4, d
    probe_ok(d)
    css(driver, "#mda-next").click()  # one screen on: the prefetched neighbour
    d = drawn(driver, int(d["draws"]))
    assert int(d["t0"]) == w // 4 + w
    probe_ok(d)
    from selenium.webdriver.common.action_chains import ActionChains
    t_before = int(d["t0"])
    ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(-300, 0).release().perform()
    d = drawn(driver, int(d["draws"]))
    assert int(d["t0"]) > t_before, "dragging left moves on in time"
    probe_ok(d)
    shot(driver, "12-mda-panned")
    moved_ok("panned")
    # a jump to the middle written region: one new window (+ its neighbours)
    reads_before = len(logged(driver))
    t_in = css(driver, "#mda-t")
    t_in.clear()
    t_in.send_keys(str(MID + 1000))
    css(driver, "#mda-go").click()
    d = wait_for(lambda: (x := drawn(driver, int(d["draws"])))["t0"] == str(MID + 1000) and x, what="the jump")
    probe_ok(d)
    new = logged(driver)[reads_before:]
    assert [k for k, _, _ in new].count("show") == 1 and all(n <= BUDGET for _, _, n in new)
    moved_ok("jumped")
    # zoom out to the whole recording: a coarse overview within the budget
    out_before = health(relay)["bytes_out"]
    for _ in range(30):
        css(driver, "#mda-zoom-out").click()
        if css(driver, "#preview-body").get_attribute("data-w") == str(N):
            break
    d = wait_for(lambda: (x := drawn(driver))["w"] == str(N) and x, what="the whole recording")
    wait_idle(driver)
    assert d["mode"] == "sparse" and int(d["screenBytes"]) <= BUDGET
    # every zoom step read at most one budget (+ a piece of slack per read, and proofs)
    steps = sum(1 for k, _, _ in logged(driver)[reads_before:] if k == "show")
    assert health(relay)["bytes_out"] - out_before <= steps * (BUDGET + 33 * BS) + 3 * BUDGET
    assert "overview" in css(driver, "#mda-info").text
    shot(driver, "13-mda-overview")
    moved_ok("overview")
    assert not console_errors(driver)


def test_view_link_reproduces_the_state(site: dict[str, Any]) -> None:
    relay, share, driver = site["relay"], site["share"], site["driver"]
    e = entry(relay, share, "rec/big.mda")
    t = MID + 4321
    driver.get(f"{relay.url}/v/#" + fragment_of(e, f"ch=4-11&t={t}&w=2048"))
    d = drawn(driver)
    assert (d["t0"], d["w"], d["ch"], d["mode"]) == (str(t), "2048", "4-11", "full"), d
    probe_ok(d)
    canvas = css(driver, "#mda-canvas")
    canvas.click()
    canvas.send_keys("\ue013")  # ArrowUp: larger traces (amplitude halves)
    d = drawn(driver, int(d["draws"]))
    assert float(d["amp"]) > 0
    link = css(driver, "#view-link").get_attribute("value")
    assert link.startswith(f"{relay.url}/v/#src=sha1://") and len(link) < 300, link
    assert "token" not in link and f"a={d['amp']}" in link
    assert driver.current_url.split("#")[1] == link.split("#")[1]  # the address bar follows the view
    shot(driver, "14-view-link")
    driver.get("about:blank")
    driver.get(link)
    again = drawn(driver)
    for k in ("t0", "w", "ch", "amp", "mode", "probe"):
        assert again[k] == d[k], (k, again[k], d[k])
    # the page at / knows nothing of it: only /v/ shows views (and both pages' CSP is the UI's)
    with urllib.request.urlopen(f"{relay.url}/v/") as resp:
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert not console_errors(driver)


def test_hostile_links_and_headers_are_one_error_line(site: dict[str, Any]) -> None:
    relay, share, driver = site["relay"], site["share"], site["driver"]
    e = entry(relay, share, "rec/small.mda")
    good = fragment_of(e)
    sha1, root = e["prv"]["original_checksum"], e["prv"]["kbfs_tree"]["root"]
    cases = {
        "src=sha1://xyz&n=1&r=" + root: "src must be sha1://",
        f"src=sha1://{sha1}&r={root}": "n (the size in bytes) is missing",
        f"src=sha1://{sha1}&n=-1&r={root}": "n (size) must be a whole number",
        f"src=sha1://{sha1}&n=1&r=abc": "r (the tree root)",
        f"src=sha1://{sha1}&n=1&r={root}&bs=1000": "bs (block size)",
        f"src=sha1://{sha1}&n=1&r={root}&bs=65537": "power of two",
        good + "&ch=5-2": "ends before it starts",
        good + "&ch=a": "ch must be",
        good + "&w=0": "w (timepoints on screen)",
        good + "&a=-3": "a (amplitude)",
        good + "&share=<b>x</b>": "share is not a share id",
        good + "&token=<script>": "token is not a kbfs share token",
        good + "&ch=9-10": "the file has 4",
        # a root that is not this content's: the first piece fails verification
        good.replace(f"r={root}", "r=" + ("0" if root[0] != "0" else "1") + root[1:]): "do not hash up to the root",
    }
    for frag, want in cases.items():
        driver.get("about:blank")
        driver.get(f"{relay.url}/v/#{frag}")
        err = wait_for(lambda: css(driver, "#view-error").text, what=f"error for {frag[-40:]}")
        assert want in err and "\n" not in err, (frag, err)
    assert "<b>" not in driver.page_source.split("<body")[1] or "&lt;b&gt;" in driver.page_source
    for name, (_, want) in bad_headers().items():
        driver.get("about:blank")
        driver.get(f"{relay.url}/v/#" + fragment_of(entry(relay, share, f"bad/{name}")))
        err = wait_for(lambda: css(driver, "#view-error").text, what=f"error for {name}")
        assert want in err, (name, err)
    shot(driver, "18-view-bad-header")


def test_exported_page_from_another_origin(site: dict[str, Any]) -> None:
    relay, share, driver, tmp = site["relay"], site["share"], site["driver"], site["tmp"]
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    out = tmp / "export"
    host = relay.url.split("://")[1]
    t = 7 * (N // 40) + 6000
    res = run_kbfs("view", "export", f"kbfs://{host}/{share.id}/rec/big.mda", "--out", str(out),
                   "--state", f"ch=0-7&t={t}&w=1024")
    assert res.returncode == 0, res.stderr
    page = (out / "index.html").read_text()
    assert f"connect-src 'self' {relay.url};" in page and "<body data-exported>" in page
    assert json.loads((out / "view.json").read_text())["relays"] == [relay.url]
    # the relay lets another origin read ranges with proofs (what the page needs)
    e = entry(relay, share, "rec/big.mda")
    req = urllib.request.Request(f"{relay.url}/sha1/{e['prv']['original_checksum']}", method="OPTIONS", headers={
        "Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range,kbfs-want-proof,authorization"})
    with urllib.request.urlopen(req) as resp:
        allowed = resp.headers["Access-Control-Allow-Headers"].lower()
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert all(h in allowed for h in ("range", "kbfs-want-proof", "authorization"))
    req = urllib.request.Request(f"{relay.url}/sha1/{e['prv']['original_checksum']}", headers={
        "Origin": "http://127.0.0.1:1", "Range": "bytes=0-65535", "Kbfs-Want-Proof": "bs=65536"})
    with urllib.request.urlopen(req) as resp:
        assert "kbfs-proof" in resp.headers["Access-Control-Expose-Headers"].lower()
        assert resp.headers["Kbfs-Proof"] and len(resp.read()) == 65536
    with nginx(out, tmp) as url:
        assert url.split(":")[-1] != relay.url.split(":")[-1]  # another port: another origin
        requests_sent(driver)
        driver.get(url)
        d = drawn(driver)
        assert (d["t0"], d["w"], d["ch"]) == (str(t), "1024", "0-7"), d
        probe_ok(d)
        sent = [r for r in requests_sent(driver) if r["url"].startswith(relay.url + "/sha1/")]
        gets = [r for r in sent if r["method"] == "GET"]
        assert gets and all("Kbfs-Want-Proof" in r["headers"] for r in gets), gets
        assert driver.execute_script("return location.origin") == url.rstrip("/") != relay.url
        assert css(driver, "#view-link").get_attribute("value").startswith(url)
        shot(driver, "15-exported-page")
        assert not console_errors(driver)
        # a page whose root is not the content's: nothing is drawn, the error says so
        conf = json.loads((out / "view.json").read_text())
        root = e["prv"]["kbfs_tree"]["root"]
        conf["view"] = conf["view"].replace(root, ("0" if root[0] != "0" else "1") + root[1:])
        (out / "view.json").write_text(json.dumps(conf))
        driver.get("about:blank")
        driver.get(url)
        err = wait_for(lambda: css(driver, "#view-error").text, what="verification error")
        assert "verif" in err.lower() or "proof" in err.lower(), err


class nginx:  # noqa: N801 - a context manager, used as `with nginx(root, tmp) as url`
    """Debian's nginx serving ROOT on 127.0.0.1 (a port of its own), foreground, by pid."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root, self.base = root, tmp / "nginx-view"

    def __enter__(self) -> str:
        import socket
        import time
        self.base.mkdir(exist_ok=True)
        for _ in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            conf = self.base / "nginx.conf"
            # as root, nginx's workers would be nobody, who cannot enter pytest's 0700 folders
            conf.write_text(("user root;\n" if os.geteuid() == 0 else "")
                            + NGINX_CONF.format(base=self.base, port=port, root=self.root))
            self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.base)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/view.json", timeout=1).close()
                    return f"http://127.0.0.1:{port}/"
                except OSError:
                    if self.proc.poll() is not None:
                        break
                    time.sleep(0.05)
            self.__exit__()
        raise RuntimeError("nginx did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


NGINX_CONF = """daemon off; worker_processes 1; pid {base}/nginx.pid; error_log {base}/error.log;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {base}/body; proxy_temp_path {base}/proxy;
  fastcgi_temp_path {base}/fastcgi; uwsgi_temp_path {base}/uwsgi; scgi_temp_path {base}/scgi;
  types {{ text/html html; text/javascript js; text/css css; image/svg+xml svg; application/json json; }}
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
"""


def test_private_view_asks_for_the_token(site: dict[str, Any]) -> None:
    relay, private, driver = site["relay"], site["private"], site["driver"]
    e = entry(relay, private, "priv.mda", private.token)
    link = f"{relay.url}/v/#" + fragment_of(e, "ch=0-7&w=4000", share=private.id)
    driver.get(relay.url + "/v/")
    driver.execute_script("sessionStorage.clear()")
    requests_sent(driver)
    driver.get("about:blank")
    driver.get(link)
    wait_for(lambda: css(driver, "#token-form"), what="token form")
    assert "private share" in css(driver, "#token-form").text
    shot(driver, "16-view-token")
    css(driver, "#token-input").send_keys(private.token)
    css(driver, "#token-form button[type=submit]").click()
    d = drawn(driver)
    assert d["probe"] == ",".join(str(int(v)) for v in truth([0], 8)[0]), d
    assert driver.execute_script(f"return sessionStorage.getItem('kbfs-token:{private.id}')") == private.token
    box = css(driver, "#view-link")
    assert private.token not in box.get_attribute("value") and f"share={private.id}" in box.get_attribute("value")
    assert css(driver, "#link-token-warning").get_attribute("hidden") is not None
    css(driver, "#link-token").click()  # the user's explicit choice, with the warning shown
    with_token = box.get_attribute("value")
    assert "token=" + private.token in with_token
    assert css(driver, "#link-token-warning").is_displayed()
    shot(driver, "17-view-token-in-link")
    sent = requests_sent(driver)
    assert not [r for r in sent if private.token in r["url"]] and private.token not in driver.current_url
    assert any(r["headers"].get("Authorization") == f"Bearer {private.token}" for r in sent)
    # that link opens in a tab without the token, and the address bar drops the token at once
    driver.execute_script("sessionStorage.clear()")
    driver.get("about:blank")
    driver.get(with_token)
    drawn(driver)
    assert private.token not in driver.current_url
    # without any token the content is not there (as for content nobody holds)
    driver.execute_script("sessionStorage.clear()")
    driver.get("about:blank")
    driver.get(link.replace(f"&share={private.id}", ""))
    wait_for(lambda: css(driver, "#token-form"), what="token form after a 404")


def test_content_answers_never_render_as_pages(site: dict[str, Any]) -> None:
    relay, share, driver = site["relay"], site["share"], site["driver"]
    e = entry(relay, share, "evil.html")
    for path in (f"/s/{share.id}/file/evil.html", f"/sha1/{e['prv']['original_checksum']}"):
        for rng in ({}, {"Range": "bytes=0-9"}):
            with urllib.request.urlopen(urllib.request.Request(relay.url + path, headers=rng)) as resp:
                assert resp.headers["X-Content-Type-Options"] == "nosniff", path
                assert resp.headers["Content-Security-Policy"] == "sandbox", path
                assert resp.headers["Content-Type"] == "application/octet-stream"
    driver.get(f"{relay.url}/v/")
    driver.get(f"{relay.url}/s/{share.id}/file/evil.html")
    assert driver.title != "pwned"


def test_view_cli(site: dict[str, Any], tmp_path: Path) -> None:
    relay, share = site["relay"], site["share"]
    host = relay.url.split("://")[1]
    src = f"kbfs://{host}/{share.id}/rec/small.mda"
    res = run_kbfs("view", "link", src, "--state", "ch=0-3&t=10")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{relay.url}/v/#" + fragment_of(entry(relay, share, "rec/small.mda"), "ch=0-3&t=10")
    sha1 = entry(relay, share, "rec/small.mda")["prv"]["original_checksum"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for args, want in [
        (["link", src, "--state", "ch=3-1"], "ch must be"),
        (["link", src, "--state", "zoom=2"], "unknown key"),
        (["link", src, "--state", "w=0"], "w must be"),
        (["link", src, "--relay", "http://user:pw@127.0.0.1:1/x"], "--relay"),
        (["link", f"sha1://{sha1}", "--relay", relay.url], "no tree root"),
        (["export", src, "--out", str(tmp_path / "full")], "not an empty folder"),
    ]:
        res = run_kbfs("view", *args)
        assert res.returncode == 1 and want in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not os.path.exists(tmp_path / "full" / "index.html")
