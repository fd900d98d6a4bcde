"""Benchmark: the .mda viewer's first screen and a pan over the emulated 60 ms path (issue 18).

A 2 GiB recording (32 channels x 2^25 int16 timepoints; a sparse file, a few MiB of disk,
deleted at the end) shared by a real `kbfs share` through a real `kbfs relay`, the reader's
side through bench/wanpath.py: reader -[40 ms, 100 Mbit/s]- relay -[20 ms, 200 Mbit/s]-
share, so one request for content costs a 60 ms path RTT. Debian's Chromium (headless,
selenium, a fresh profile and the HTTP cache off for every round) opens a view link
(`/v/#src=...`) and we read, from the page's own clock (performance.now(), whose zero is
the navigation's start):

- *first screen*: navigation start to the first screen drawn (page + modules, the header
  piece with its proof, one window of 512 KiB). Goal: within 3 path RTTs (180 ms).
- *pan, unseen*: a jump to a window never read nor prefetched (`t` + go) to its screen
  drawn. Goal: within 1.5 RTT (90 ms). Also the same with a 128 KiB window.
- *pan, prefetched*: one screen on (the neighbour the viewer prefetched).

Side by side, in the same run and path: one plain `GET` of the same window's bytes (with
`Kbfs-Want-Proof`, on a new connection, Python's http.client: no page, no verification;
its first byte and its end), and the page's HTML alone: what the path itself costs; and
that GET again after 12 s with nothing to do (longer than a share's upload threads live).

A/B in one run (`--variant NAME=RELAY:SHARE`, repeated): the same measures on setups up
at once, rounds interleaved, whose relay (so the page) and share come from git revisions
(`git archive REV kbfs`, run from that folder: `python -m kbfs` puts the current folder
first on sys.path; `.` is this working tree). E.g. before=OLD:OLD, pool=OLD:. (today's
share: its upload connections), early=REV:. , after=.:. (the last named is the one the
goals are judged on). Without --variant: after=.:. alone.

    .venv/bin/python bench/bench_view.py [--rounds 3] [--variant NAME=RELAY:SHARE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import browserutil  # noqa: E402
import netutil  # noqa: E402
from linkemu import WAN_A, WAN_B  # noqa: E402
from mdautil import write_mda  # noqa: E402
from wanpath import kbfs_wan  # noqa: E402

from kbfs import viewexport  # noqa: E402

M = 32
N = (2 << 30) // (2 * M)
RTT_MS = WAN_A["rtt_ms"] + WAN_B["rtt_ms"]
IDLE_S = 12.0  # > kbfs.share.WORKER_IDLE


def body(driver: Any, key: str) -> str:
    return driver.execute_script(f"const b = document.querySelector('#preview-body'); return b && b.dataset.{key}")


def wait_draw(driver: Any, after: int) -> float:
    browserutil.wait_for(lambda: int(body(driver, "draws") or 0) > after, timeout=60, what="a drawn screen")
    return float(body(driver, "drawnAt"))


def jump(driver: Any, t: int) -> float:
    """ms from the click on go to the screen at T drawn."""
    draws = int(body(driver, "draws"))
    browserutil.wait_for(lambda: body(driver, "pending") in (None, "0"), timeout=60, what="prefetch done")
    start = driver.execute_script(
        "const i = document.querySelector('#mda-t'); i.value = arguments[0]; const t = performance.now();"
        "document.querySelector('#mda-go').click(); return t;", str(t))
    return wait_draw(driver, draws) - start


def plain_get(url: str, path: str, headers: dict[str, str]) -> tuple[float, float]:
    """ms to the answer's head, and to its end, of one GET on a new connection."""
    host, port = url.split("://")[1].split(":")
    t = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    head = time.perf_counter()
    resp.read()
    conn.close()
    return (head - t) * 1000, (time.perf_counter() - t) * 1000


@contextlib.contextmanager
def from_trees(relay_tree: Path | None, share_tree: Path | None) -> Iterator[None]:
    """netutil's relay and share started from these source folders (None: this one)."""
    orig_relay, orig_share = netutil.start_relay, netutil.start_share

    def at(tree: Path | None, fn: Any) -> Any:
        def start(*args: Any, **kwargs: Any) -> Any:
            here = os.getcwd()
            os.chdir(tree or REPO)
            try:
                return fn(*args, **kwargs)
            finally:
                os.chdir(here)
        return start

    netutil.start_relay, netutil.start_share = at(relay_tree, orig_relay), at(share_tree, orig_share)
    try:
        yield
    finally:
        netutil.start_relay, netutil.start_share = orig_relay, orig_share


def one_round(kb: Any, frag: str, tmp: Path, k: int, sha1: str) -> dict[str, float]:
    driver = browserutil.start_browser(tmp / f"chrome-{k}")
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
        driver.get("about:blank")
        driver.get(f"{kb.reader_url}/v/#{frag}")
        first = wait_draw(driver, 0)
        w = int(body(driver, "w"))
        out = {"first": first}
        out["unseen"] = jump(driver, (N // 5) * (1 + k % 4) + 777 * k)
        draws = int(body(driver, "draws"))
        browserutil.wait_for(lambda: body(driver, "pending") in (None, "0"), timeout=60, what="prefetch done")
        start = driver.execute_script(
            "const t = performance.now(); document.querySelector('#mda-next').click(); return t;")
        out["prefetched"] = wait_draw(driver, draws) - start
        # a 128 KiB window (w=2048), then an unseen jump with it
        driver.get("about:blank")
        driver.get(f"{kb.reader_url}/v/#{frag}&w=2048")
        wait_draw(driver, 0)
        out["unseen128"] = jump(driver, (N // 7) * (2 + k % 3) + 333 * k)
        stride = 2 * M
        off = 20 + (N // 3 + 1000 * k) * stride
        a = off // 65536 * 65536
        out["plain_head"], out["plain_get"] = plain_get(kb.reader_url, f"/sha1/{sha1}", {
            "Range": f"bytes={a}-{a + w * stride // 65536 * 65536 + 65536 - 1}", "Kbfs-Want-Proof": "bs=65536"})
        out["plain_html"] = plain_get(kb.reader_url, "/v/", {})[1]
        # the same after the share has had nothing to do for longer than its upload threads
        # live (10 s): what a view opened on a quiet share meets
        time.sleep(IDLE_S)
        a += 64 << 20
        out["idle_head"], out["idle_get"] = plain_get(kb.reader_url, f"/sha1/{sha1}", {
            "Range": f"bytes={a}-{a + w * stride // 65536 * 65536 + 65536 - 1}", "Kbfs-Want-Proof": "bs=65536"})
        assert body(driver, "mode") == "full"
        return out
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=RELAY:SHARE",
                    help="a setup whose relay and share come from git revisions (. = this tree)")
    args = ap.parse_args()
    reason = browserutil.missing_reason()
    if reason:
        sys.exit(f"bench_view: {reason}")
    with tempfile.TemporaryDirectory(prefix="kbfs-bench-view-") as tmpdir:
        tmp = Path(tmpdir)
        data = tmp / "data"
        data.mkdir()
        rec = data / "rec.mda"
        regions = [(k * (N // 16), k * (N // 16) + (1 << 15)) for k in range(16)]
        write_mda(rec, M, N, regions)
        print(f"bench_view: {rec.stat().st_size} bytes, {rec.stat().st_blocks * 512 >> 20} MiB on disk",
              file=sys.stderr)
        trees: dict[str, Path | None] = {".": None}

        def tree(rev: str) -> Path | None:
            if rev not in trees:
                out = tmp / f"tree-{len(trees)}"
                out.mkdir()
                archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "kbfs"],
                                         check=True, capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
                trees[rev] = out
            return trees[rev]

        variants: dict[str, tuple[Path | None, Path | None]] = {}
        for spec in args.variant or ["after=.:."]:
            name, _, revs = spec.partition("=")
            relay_rev, _, share_rev = revs.partition(":")
            if not name or not relay_rev or not share_rev:
                sys.exit(f"bench_view: --variant {spec!r}: give NAME=RELAYREV:SHAREREV")
            variants[name] = (tree(relay_rev), tree(share_rev))
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        try:
            with contextlib.ExitStack() as stack:
                setups = {}
                for name, (relay_tree, share_tree) in variants.items():
                    with from_trees(relay_tree, share_tree):
                        setups[name] = stack.enter_context(kbfs_wan(data, tmp / f"work-{name}", WAN_A, WAN_B))
                kb = setups[list(setups)[-1]]
                listing = netutil.get_json(f"{kb.relay_url}/s/{kb.share_id}/list/", timeout=30)
                e = listing["files"][0]
                p = e["prv"]
                frag = viewexport.fragment(p["original_checksum"], e["name"], p["original_size"],
                                           p["kbfs_tree"]["root"], p["kbfs_tree"]["block_size"], "ch=0-31")
                for k in range(args.rounds):
                    for name, kb in setups.items():
                        rounds[name].append(one_round(kb, frag, tmp, k, p["original_checksum"]))
        finally:
            rec.unlink(missing_ok=True)
    report(rounds)


def report(rounds: dict[str, list[dict[str, float]]]) -> None:
    names = list(rounds)

    def row(key: str, what: str, goal: float | None) -> str:
        cells = []
        for name in names:
            vals = [r[key] for r in rounds[name]]
            med = statistics.median(vals)
            cells.append(f"{med:.0f} ({min(vals):.0f}–{max(vals):.0f}) {med / RTT_MS:.2f}")
        med = statistics.median(r[key] for r in rounds[names[-1]])
        verdict = "" if goal is None else (f"{goal:.0f} ms: **met**" if med <= goal else f"{goal:.0f} ms: **missed**")
        return f"| {what} | " + " | ".join(cells) + f" | {verdict} |"

    n = len(rounds[names[-1]])
    print(f"Path RTT {RTT_MS:.0f} ms (reader -[{WAN_A['rtt_ms']:.0f} ms, {WAN_A['mbit']:.0f} Mbit/s]- relay "
          f"-[{WAN_B['rtt_ms']:.0f} ms, {WAN_B['mbit']:.0f} Mbit/s]- share), {n} rounds per setup, "
          "a fresh Chromium with its HTTP cache off each round. Cells: median ms (range) path RTTs.\n")
    print("| measure | " + " | ".join(names) + " | goal |")
    print("|---|" + "---|" * len(names) + "---|")
    print(row("first", "view link to first screen (page, header + proof, 512 KiB window)", 3 * RTT_MS))
    print(row("unseen", "pan to an unseen window, 512 KiB", 1.5 * RTT_MS))
    print(row("unseen128", "pan to an unseen window, 128 KiB (w=2048)", 1.5 * RTT_MS))
    print(row("prefetched", "pan one screen on (prefetched neighbour)", None))
    print(row("plain_head", "side by side: one plain GET of a 512 KiB window + proof: its first byte", None))
    print(row("plain_get", "side by side: the same GET, all of it", None))
    print(row("plain_html", "side by side: the view page's HTML alone, new connection", None))
    print(row("idle_head", f"the plain GET after {IDLE_S:.0f} s with nothing to do: its first byte", None))
    print(row("idle_get", f"the plain GET after {IDLE_S:.0f} s with nothing to do: all of it", None))


if __name__ == "__main__":
    main()
