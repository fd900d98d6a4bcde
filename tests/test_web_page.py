"""The web page in a real headless Chromium (tests/browserutil.py), on a real relay and share.

Through the whole page: the shares, a folder, a file's links, and previews of a CSV, hex,
an image, an .npy array and raw numbers, each checked against the file's true bytes, and
the relay's counters (`/api/health` requests, bytes_out) and the browser's own request log
showing that a preview read only the pieces holding what it showed. Screenshots of each
step go to docs/screenshots/. Security: hostile file names render as text and run nothing;
the CSP blocks an inline script (and the same injection runs on a page without it, so the
check can fail); a private share asks for its token, keeps it in sessionStorage only, and
never puts it in a URL. Skips, with the reason, only where Chromium cannot run.
"""

from __future__ import annotations

import io
import random
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from browserutil import console_errors, missing_reason, requests_sent, shot, start_browser, wait_for
from netutil import get_json, start_relay, start_share

from kbfs import kbfsurl

REASON = missing_reason()
if REASON:
    print(f"test_web_page: skipped: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

BIG = 3 << 20  # files much larger than one piece, so a partial read shows


def css(driver: Any, selector: str) -> Any:
    return driver.find_element("css selector", selector)


def make_data(root: Path) -> dict[str, bytes]:
    """The sample share: a large CSV, a binary, a PNG, an .npy, raw int16 samples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rng = random.Random(18)
    files: dict[str, bytes] = {}
    lines = ["unit,channel,rate_hz,quality,label"]
    total = 0
    while total < BIG:
        i = len(lines)
        lines.append(f"{i},{i % 32},{rng.uniform(0.1, 60):.3f},{rng.choice(['good', 'mua', 'noise'])},"
                     f"\"unit {i}, shank {i % 4}\"")
        total += len(lines[-1]) + 1
    files["tables/units.csv"] = ("\n".join(lines) + "\n").encode()
    files["raw/blob.bin"] = rng.randbytes(BIG)
    t = np.linspace(0, 4 * np.pi, 400)
    fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)
    ax.plot(t, np.sin(t), label="sin")
    ax.plot(t, np.cos(t), label="cos")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    files["figures/plot.png"] = buf.getvalue()
    arr = np.arange(200_000 * 8, dtype="<f8").reshape(200_000, 8) / 4.0
    buf = io.BytesIO()
    np.save(buf, arr)
    files["arrays/features.npy"] = buf.getvalue()
    i, c = np.meshgrid(np.arange(300_000), np.arange(4), indexing="ij")
    samples = ((i * 7 + c * 1000) % 30000 - 15000).astype("<i2")
    files["raw/signal.i16"] = samples.tobytes()
    files["README.txt"] = b"Sample data for the kbfs web page tests.\n"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("webpage")
    data = tmp / "lab-data"
    files = make_data(data)
    relay = start_relay(tmp)
    share = start_share(data, relay.url, tmp, "--name", "lab-data")
    secret = tmp / "secret"
    (secret / "day1").mkdir(parents=True)
    (secret / "day1" / "notes.txt").write_text("private notes\n")
    private = start_share(secret, relay.url, tmp, "--private", "--name", "private-lab")
    driver = start_browser(tmp)
    try:
        yield {"relay": relay, "share": share, "private": private, "driver": driver, "files": files}
    finally:
        driver.quit()
        private.stop()
        share.stop()
        relay.stop()


def health(relay: Any) -> dict[str, Any]:
    return get_json(relay.url + "/api/health")


def open_file(driver: Any, relay: Any, share: Any, rel: str) -> None:
    """Navigate to REL's folder page and click the file (as a reader would)."""
    folder, _, name = rel.rpartition("/")
    driver.get(f"{relay.url}/s/{share.id}/list/{folder}")
    link = wait_for(lambda: [a for a in driver.find_elements("css selector", "a.file-link") if a.text == name],
                    what=f"link to {name}")[0]
    link.click()
    wait_for(lambda: css(driver, "#file-name").text == name, what="file panel")


def read_log(driver: Any) -> list[tuple[int, int]]:
    return [(int(li.get_attribute("data-offset")), int(li.get_attribute("data-length")))
            for li in driver.find_elements("css selector", "#read-log li")]


def block_size(relay: Any, share: Any, rel: str) -> int:
    folder, _, name = rel.rpartition("/")
    listing = get_json(f"{relay.url}/s/{share.id}/list/{folder}")
    entry = next(f for f in listing["files"] if f["name"] == name)
    return int(entry["prv"]["kbfs_tree"]["block_size"])


def covered(ranges: list[tuple[int, int]], bs: int, size: int) -> int:
    """Bytes of the pieces (of BS bytes) that hold RANGES: what a verified read must fetch."""
    blocks = {b for off, n in ranges for b in range(off // bs, (off + n - 1) // bs + 1)}
    return sum(min(bs, size - b * bs) for b in blocks)


def check_reads(site: dict[str, Any], rel: str, before: dict[str, Any], shown: list[tuple[int, int]]) -> None:
    """The relay moved no more than the pieces holding SHOWN (plus proofs / leaves), and
    every content request the browser sent was a range inside those pieces."""
    relay, share, driver = site["relay"], site["share"], site["driver"]
    size = len(site["files"][rel])
    bs = block_size(relay, share, rel)
    need = covered(shown, bs, size)
    after = health(relay)
    moved = after["bytes_out"] - before["bytes_out"]
    overhead = 64 * 1024 + 32 * (size // 1024 + 1)  # proofs or the leaf list, generously
    assert need <= moved <= need + overhead, (rel, shown, need, moved)
    assert moved < size or need >= size, (rel, moved, size)
    blocks = {b for off, n in shown for b in range(off // bs, (off + n - 1) // bs + 1)}
    for req in requests_sent(driver):
        path = urllib.parse.urlsplit(req["url"]).path
        if not path.startswith("/sha1/"):
            continue
        rng = {k.lower(): v for k, v in req["headers"].items()}.get("range")
        assert rng and rng.startswith("bytes="), (rel, req)
        a, b = (int(x) for x in rng[len("bytes="):].split("-"))
        assert {x for x in range(a // bs, b // bs + 1)} <= blocks, (rel, rng, shown)


def test_walk_through_the_page(site: dict[str, Any]) -> None:
    relay, share, driver, files = site["relay"], site["share"], site["driver"], site["files"]
    driver.get(relay.url + "/")
    wait_for(lambda: len(driver.find_elements("css selector", "a.share-link")) >= 1, what="share list")
    names = [a.text for a in driver.find_elements("css selector", "a.share-link")]
    assert "lab-data" in names and "private-lab" not in names  # private: not without its token
    shot(driver, "01-shares")

    [a for a in driver.find_elements("css selector", "a.share-link") if a.text == "lab-data"][0].click()
    wait_for(lambda: driver.find_elements("css selector", "#folder-table a.dir-link"), what="folder page")
    assert urllib.parse.urlsplit(driver.current_url).path == f"/s/{share.id}/list"
    dirs = [a.text for a in driver.find_elements("css selector", "a.dir-link")]
    assert dirs == ["arrays/", "figures/", "raw/", "tables/"]
    row = [r for r in driver.find_elements("css selector", "tr.file")
           if r.get_attribute("data-name") == "README.txt"][0]
    assert "41 B" in row.text and "20" in row.text  # size and a date
    shot(driver, "02-folder")

    # a folder, a file's panel, and the CSV preview: the head only
    [a for a in driver.find_elements("css selector", "a.dir-link") if a.text == "tables/"][0].click()
    wait_for(lambda: [a for a in driver.find_elements("css selector", "a.file-link") if a.text == "units.csv"],
             what="tables folder")
    requests_sent(driver)
    before = health(relay)
    [a for a in driver.find_elements("css selector", "a.file-link") if a.text == "units.csv"][0].click()
    wait_for(lambda: len(driver.find_elements("css selector", "#csv-view tbody tr")) > 100, what="CSV rows")
    head = [th.text for th in driver.find_elements("css selector", "#csv-view thead th")]
    assert head == ["unit", "channel", "rate_hz", "quality", "label"]
    first = [td.text for td in driver.find_elements("css selector", "#csv-view tbody tr:first-child td")]
    assert first == files["tables/units.csv"].decode().splitlines()[1].replace('"', "").split(",", 4)[:4] + \
        ["unit 1, shank 1"]
    links = {k: css(driver, f"#{k}").text for k in ("sha1-uri", "kbfs-url")}
    host = urllib.parse.urlsplit(relay.url).netloc
    assert links["kbfs-url"] == kbfsurl.link(relay.url, share.id, "tables/units.csv")  # as Python writes it
    assert links["sha1-uri"].startswith("sha1://") and links["sha1-uri"].endswith("/units.csv")
    commands = css(driver, "#commands").text
    assert f"kbfs download kbfs://{host}/{share.id}/tables/units.csv" in commands
    assert f"kbfs mount kbfs://{host}/{share.id}/tables/" in commands
    assert css(driver, "#download-link").get_attribute("href") == f"{relay.url}/s/{share.id}/file/tables/units.csv"
    shown = read_log(driver)
    assert shown and shown[0][0] == 0 and sum(n for _, n in shown) < len(files["tables/units.csv"]) // 4
    check_reads(site, "tables/units.csv", before, shown)
    shot(driver, "03-csv")

    # more on scroll: the next chunk, from where the last ended
    rows = len(driver.find_elements("css selector", "#csv-view tbody tr"))
    driver.execute_script("const s = document.querySelector('#preview-body .scroller'); s.scrollTop = s.scrollHeight;")
    wait_for(lambda: len(driver.find_elements("css selector", "#csv-view tbody tr")) > rows, what="more rows")
    after = read_log(driver)
    assert after[len(shown)][0] == shown[-1][0] + shown[-1][1]

    # hex, paged: a page in the middle of a 3 MiB file
    blob = files["raw/blob.bin"]
    requests_sent(driver)
    before = health(relay)
    open_file(driver, relay, share, "raw/blob.bin")
    wait_for(lambda: css(driver, "#preview-body").get_attribute("data-viewer") == "raw", what="raw viewer")
    from selenium.webdriver.support.ui import Select
    Select(css(driver, "#viewer-choice")).select_by_value("hex")
    wait_for(lambda: css(driver, "#hex-view").text.startswith("0000000000"), what="hex page 0")
    css(driver, "#hex-offset").send_keys("0x180010")
    css(driver, "#hex-go").click()
    wait_for(lambda: css(driver, "#hex-view").text.startswith("0000180000"), what="hex page at 0x180000")
    line = css(driver, "#hex-view").text.splitlines()[1]
    want = blob[0x180010:0x180020]
    assert line.split("|")[0].split()[1:] == [f"{b:02x}" for b in want]
    shown = read_log(driver)
    hex_reads = [r for r in shown if r[1] == 4096]
    assert (0x180000, 4096) in hex_reads
    check_reads(site, "raw/blob.bin", before, shown)
    shot(driver, "04-hex")

    # an image: read whole (it is shown whole), decoded by the browser
    open_file(driver, relay, share, "figures/plot.png")
    wait_for(lambda: driver.execute_script(
        "const i = document.querySelector('#image-view'); return i && i.complete && i.naturalWidth"),
        what="image decoded")
    assert driver.execute_script("return document.querySelector('#image-view').naturalWidth") == 320
    assert sum(n for _, n in read_log(driver)) == len(files["figures/plot.png"])
    shot(driver, "05-image")

    # .npy: header parsed, a page of rows (not the 12 MiB array)
    requests_sent(driver)
    before = health(relay)
    open_file(driver, relay, share, "arrays/features.npy")
    wait_for(lambda: driver.find_elements("css selector", "#array-view tbody tr"), what="npy table")
    info = css(driver, "#npy-info").text
    assert "<f8" in info and "200000, 8" in info
    cells = [td.text for td in driver.find_elements("css selector", "#array-view tbody tr:nth-child(3) td")]
    assert cells == [f"{(16 + c) / 4.0:g}" if (16 + c) % 4 else f"{(16 + c) / 4.0:.1f}" for c in range(8)]
    css(driver, "#preview-body .next").click()
    wait_for(lambda: "rows 100–199" in css(driver, "#array-where").text, what="npy page 2")
    assert css(driver, "#array-view tbody tr:first-child th").text == "100"
    shown = read_log(driver)
    assert len(shown) <= 3 and sum(n for _, n in shown) < 20_000
    check_reads(site, "arrays/features.npy", before, shown)
    shot(driver, "06-npy")

    # raw numbers: int16, 4 channels
    open_file(driver, relay, share, "raw/signal.i16")
    wait_for(lambda: css(driver, "#preview-body").get_attribute("data-viewer") == "raw", what="raw viewer")
    channels = css(driver, "#raw-channels")
    channels.clear()
    channels.send_keys("4")
    css(driver, "#raw-apply").click()
    wait_for(lambda: len(driver.find_elements("css selector", "#array-view thead th")) == 5, what="4 channels")
    row5 = [td.text for td in driver.find_elements("css selector", "#array-view tbody tr:nth-child(6) td")]
    assert row5 == [str((5 * 7 + c * 1000) % 30000 - 15000) for c in range(4)]
    shot(driver, "07-raw")
    assert not [e for e in console_errors(driver) if "favicon" not in e], "console errors"


def test_private_share_asks_for_the_token(site: dict[str, Any]) -> None:
    relay, private, driver = site["relay"], site["private"], site["driver"]
    driver.get(f"{relay.url}/s/{private.id}/list")
    form = wait_for(lambda: css(driver, "#token-form"), what="token form")
    assert "private" in form.text
    assert not driver.find_elements("css selector", "#folder-table")
    shot(driver, "08-private-token")
    requests_sent(driver)
    css(driver, "#token-input").send_keys(private.token)
    css(driver, "#token-form button[type=submit]").click()
    wait_for(lambda: [a for a in driver.find_elements("css selector", "a.dir-link") if a.text == "day1/"],
             what="private listing")
    assert css(driver, "#share-name").text == "private-lab"
    stored = driver.execute_script(f"return sessionStorage.getItem('kbfs-token:{private.id}')")
    assert stored == private.token
    assert driver.execute_script(f"return localStorage.getItem('kbfs-token:{private.id}')") is None
    # the token travels in Authorization headers only, never in a URL
    sent = requests_sent(driver)
    assert any(r["headers"].get("Authorization") == f"Bearer {private.token}" for r in sent)
    assert not [r for r in sent if private.token in r["url"]]
    [a for a in driver.find_elements("css selector", "a.dir-link") if a.text == "day1/"][0].click()
    wait_for(lambda: [a for a in driver.find_elements("css selector", "a.file-link") if a.text == "notes.txt"],
             what="private folder")
    [a for a in driver.find_elements("css selector", "a.file-link") if a.text == "notes.txt"][0].click()
    wait_for(lambda: "private notes" in css(driver, "#preview-body").text, what="private preview")
    assert "KBFS_TOKEN" in css(driver, "#commands").text and private.token not in css(driver, "#commands").text
    assert private.token not in driver.current_url
    sent = requests_sent(driver)
    assert not [r for r in sent if private.token in r["url"]]
    # the shares page lists the private share for this tab (it holds the token)
    driver.get(relay.url + "/")
    wait_for(lambda: "private-lab" in [a.text for a in driver.find_elements("css selector", "a.share-link")],
             what="private share listed with its token")
    # a wrong token: refused, asked again, not kept
    driver.execute_script(f"sessionStorage.setItem('kbfs-token:{private.id}', 'kbfs1.AAAA.BBBB')")
    driver.get(f"{relay.url}/s/{private.id}/list")
    form = wait_for(lambda: css(driver, "#token-form"), what="token asked again")
    assert "refused" in form.text
    assert driver.execute_script(f"return sessionStorage.getItem('kbfs-token:{private.id}')") is None
