"""Benchmark: kbfs.js verifying and reading, in Node and in headless Chromium, side by side.

Two measures, each in Node and in Debian's Chromium (driven by selenium through
chromium-driver, loopback only), in one run:

- *verify*: kbfs.js checking 64 KiB pieces already in memory, in runs of 1 MiB with their
  proofs (`verifyRange`, v2 pointers), and 1 MiB blocks against their leaves (v1). No
  network. Goal (issue 18): at least 200 MB/s in Chromium.
- *read*: `openContent` + reading a whole file (128 MiB by default, 8 MiB reads, 4 at once)
  through a real `kbfs relay` and `kbfs share` on 127.0.0.1, every piece proved. The
  reference is `curl` fetching the same file whole from the same relay (no verification),
  so the ratio says what verification and piece requests cost on this machine; the relay,
  the share and the reader share its CPUs.

The page is served by a small HTTP server on 127.0.0.1 from kbfs/web/static/lib/ (the
vendored browser copy) and js/testlib/ (the bench body, js/testlib/bench.js, the same code
Node runs). Prints a markdown section for docs/benchmarks.md. Asserts nothing but that the
bytes verified.

    .venv/bin/python bench/bench_js.py [--verify-mib 64] [--file-mib 128] [--rounds 3] [--no-browser]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import netutil  # noqa: E402

from kbfs import prv  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

PAGE = """<!doctype html><meta charset="utf-8"><title>kbfs.js bench</title>
<script type="module" src="bench-page.js"></script>"""
PAGE_JS = """import * as T from './lib/tree.js';
import * as K from './lib/kbfs.js';
import * as U from './testlib/treeutil.js';
import * as B from './testlib/bench.js';
const p = await (await fetch('params.json')).json();
try {
  const verify = await B.verify(T, U, p.verify);
  const read = p.pointer ? await B.read(K, p.pointer, p.relays, p.read) : null;
  window.benchResult = { verify, read, agent: navigator.userAgent };
} catch (e) {
  window.benchResult = { error: String(e && e.stack || e) };
}
"""
NODE_JS = """import * as T from '{js}/tree.js';
import * as K from '{js}/kbfs.js';
import * as U from '{js}/testlib/treeutil.js';
import * as B from '{js}/testlib/bench.js';
import {{ readFileSync }} from 'node:fs';
const p = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const verify = await B.verify(T, U, p.verify);
const read = p.pointer ? await B.read(K, p.pointer, p.relays, p.read) : null;
console.log(JSON.stringify({{ verify, read, agent: 'node ' + process.version }}));
"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def run_node(tmp: Path, params: dict[str, Any]) -> dict[str, Any]:
    script = tmp / "bench-node.mjs"
    script.write_text(NODE_JS.format(js=(REPO / "js").as_uri()))
    pfile = tmp / "params.json"
    pfile.write_text(json.dumps(params))
    done = subprocess.run(["node", str(script), str(pfile)], capture_output=True, text=True,
                          timeout=900, check=False)
    if done.returncode:
        raise SystemExit(f"node bench failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_chromium(tmp: Path, params: dict[str, Any]) -> dict[str, Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    site = tmp / "site"
    site.mkdir()
    (site / "lib").symlink_to(REPO / "kbfs" / "web" / "static" / "lib")
    (site / "testlib").symlink_to(REPO / "js" / "testlib")
    (site / "index.html").write_text(PAGE)
    (site / "bench-page.js").write_text(PAGE_JS)
    (site / "params.json").write_text(json.dumps(params))
    server, url = serve(site)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        driver.get(url + "/index.html")
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            result = driver.execute_script("return window.benchResult || null")
            if result is not None:
                if "error" in result:
                    raise SystemExit(f"chromium bench failed: {result['error']}")
                return dict(result)
            time.sleep(0.5)
        raise SystemExit("chromium bench did not finish within 900 s")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


def curl_rate(url: str, size: int, rounds: int) -> list[float]:
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", url],
                              capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - t0
        if int(done.stdout) != size:
            raise SystemExit(f"curl got {done.stdout} bytes of {size}")
        rates.append(size / 1e6 / seconds)
    return rates


def fmt(values: list[float]) -> str:
    return f"{max(values):.0f} (median {statistics.median(values):.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verify-mib", type=int, default=64)
    ap.add_argument("--file-mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-browser", action="store_true", help="Node only")
    args = ap.parse_args()
    if shutil.which("node") is None:
        raise SystemExit("node is not installed (make bench installs it)")
    browser = not args.no_browser and os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
    if not args.no_browser and not browser:
        print(f"no {CHROMIUM} / {CHROMEDRIVER}: Node only (make bench installs chromium, chromium-driver)")

    tmp = Path(tempfile.mkdtemp(prefix="kbfs-bench-js-", dir="/tmp"))
    procs: list[Any] = []
    try:
        data_dir = tmp / "data"
        data_dir.mkdir()
        path = data_dir / "recording.bin"
        size = args.file_mib << 20
        with open(path, "wb") as f:
            for _ in range(args.file_mib // 16 or 1):
                f.write(os.urandom(16 << 20))
            f.truncate(size)
        pointer = prv.create_pointer(path, block_size=65536).to_dict()
        relay = netutil.start_relay(tmp)
        procs.append(relay)
        procs.append(netutil.start_share(data_dir, relay.url, tmp))
        params = {"verify": {"mib": args.verify_mib, "rounds": args.rounds}, "pointer": pointer,
                  "relays": [relay.url], "read": {"rounds": args.rounds}}
        results: dict[str, dict[str, Any]] = {}
        print("node ...", flush=True)
        results["Node"] = run_node(tmp, params)
        if browser:
            print("chromium ...", flush=True)
            results["Chromium"] = run_chromium(tmp, params)
        print("curl ...", flush=True)
        ref = curl_rate(f"{relay.url}/sha1/{pointer['original_checksum']}", size, args.rounds)
        for name, r in results.items():
            print(f"{name}: {json.dumps(r)}")
        print(f"curl: {[round(x) for x in ref]}")

        print()
        print("## kbfs.js in Node and in Chromium (issue 18)")
        print()
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"`bench/bench_js.py`: {os.cpu_count()} CPUs ({platform.machine()}, load average {load}), loopback; "
              f"{args.rounds} rounds, MB/s best (median). *Verify*: {args.verify_mib} MiB already "
              "in memory, v2 = 64 KiB pieces in 1 MiB runs with their proofs, v1 = 1 MiB blocks "
              f"against their leaves. *Read*: a {args.file_mib} MiB file through a real relay and "
              "share (8 MiB reads, 4 at once, every piece proved); reference curl fetching it whole "
              "from the same relay, unverified. Relay, share and reader share the CPUs.")
        print()
        print("| runtime | verify v2 (proofs) | verify v1 (leaves) | read via relay | read / curl "
              "| goal (verify in Chromium >= 200 MB/s) |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for name, r in results.items():
            v, rd = r["verify"], r["read"]
            goal = ("met" if max(v["v2"]) >= 200 else "NOT met") if name == "Chromium" else ""
            print(f"| {name} | {fmt(v['v2'])} | {fmt(v['v1'])} | {fmt(rd['mbps'])} | "
                  f"{statistics.median(rd['mbps']) / statistics.median(ref):.2f}x | {goal} |")
        print(f"| curl (reference) | | | {fmt(ref)} | 1.00x | |")
        print()
        agents = "; ".join(f"{n}: {r['agent']}" for n, r in results.items())
        print(f"Agents: {agents}. Requests per read of the file: "
              + ", ".join(f"{n} {r['read']['requests'][0]}" for n, r in results.items()) + ".")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
