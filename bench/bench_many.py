"""Many readers of one dataset at once, through a site HTTP cache or a static mirror.

Usage: bench_many.py [--size 1G] [--readers 32] [--scenario NAME]... [--aligned-runs] [--keep]

One real share and relay on 127.0.0.1; in front of the relay, nginx running
docs/deploy.md's own block (proxy_cache + proxy_cache_lock; plain http here: TLS is not
what is measured, and on 2 cores it would only add noise); READERS real `kbfs cat`
processes started at once, each with an empty piece cache of its own (on /dev/shm),
writing to /dev/null. Scenarios:

- `cache-v2`, `cache-v1`: readers of a v2 (64 KiB) or v1 (1 MiB) pointer with
  `--relay CACHE` (the relay's --public-url is the cache's, so /api/find names it too);
  `slice-v2`, `slice-v1`: the same through the cache section's sliced block;
- `mirror-v2`, `mirror-v1`: the same readers with `--mirror MIRROR --relay CACHE`, the
  mirror being `kbfs mirror export` of both pointers served by a second nginx (`root DIR;`);
  `mirroronly-v2`, `-v1`: with `--mirror MIRROR` alone (no relay to fail over to).

Reported per scenario: the bytes each tier sent (share: the $request_length of its upload
POSTs, logged by a second nginx it connects through; relay: /api/health bytes_out; cache: the sum of
$body_bytes_sent in its access log, and $upstream_bytes_received, what it took from the
relay, which undercounts sliced answers: the relay's figure is what the cache took;
mirror: $body_bytes_sent of its log), the share's bytes as a multiple of the
dataset, the readers' aggregate throughput (the readers that succeeded x size / wall time
from the first start to the last exit), their CPU, the load average and the peak disk use. Every process is
started and stopped by pid here. Not measured: WAN links (all on loopback), TLS, squid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from kbfs import prv  # noqa: E402
from kbfs.config import parse_size  # noqa: E402
from tests.netutil import get_json, start_relay, start_share  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DOC = REPO / "docs" / "deploy.md"
SCENARIOS = ("cache-v2", "cache-v1", "slice-v2", "slice-v1", "mirror-v2", "mirror-v1",
             "mirroronly-v2", "mirroronly-v1")
LOG_FORMAT = ("log_format many '$request_method $uri $status range=[$http_range] "
              "cache=$upstream_cache_status got=$request_length sent=$body_bytes_sent "
              "up=$upstream_bytes_received';")
_SENT = re.compile(r" sent=(\d+)")
_GOT = re.compile(r"^POST /_upload/\S+ \d+ .* got=(\d+)")
_UP = re.compile(r" up=([\d, :]+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def doc_block(marker: str) -> str:
    """The nginx text between docs/deploy.md's `<!-- MARKER begin` and its code fence's end."""
    m = re.search(r"<!-- " + re.escape(marker) + r" begin.*?```nginx\n(.*?)```", DOC.read_text(), re.S)
    if not m:
        raise SystemExit(f"docs/deploy.md lost its {marker} block")
    return m.group(1)


def cache_block(relay_port: int, port: int, cache_dir: Path, sliced: bool = False) -> str:
    """docs/deploy.md's nginx block, on plain http at PORT in front of RELAY_PORT; SLICED:
    with the cache section's slice lines in place of the block's /sha1|tree/ location."""
    conf = doc_block("nginx.conf")
    if sliced:
        loc = re.search(r"\n    location ~ \^/\(sha1\|tree\)/ \{\n.*?\n    \}\n", conf, re.S)
        if not loc:
            raise SystemExit("docs/deploy.md's nginx block lost its /sha1|tree/ location")
        sliced_text = doc_block("nginx-slice.conf")
        head, _, body = sliced_text.partition("# in the server block:\n")
        conf = head + conf[:loc.start()] + "\n" + body + conf[loc.end():]
        conf = conf.replace("proxy_set_header Range $http_range;",
                            "proxy_set_header Range $kbfs_range;\n"
                            "    proxy_set_header Kbfs-Want-Proof $kbfs_want_proof;")
    for old, new in (("/var/cache/nginx/kbfs", str(cache_dir)),
                     ("server 127.0.0.1:8080;", f"server 127.0.0.1:{relay_port};"),
                     ("listen 443 ssl;", f"listen 127.0.0.1:{port};")):
        if old not in conf:
            raise SystemExit(f"docs/deploy.md's nginx block no longer has {old!r}")
        conf = conf.replace(old, new)
    return "\n".join(x for x in conf.splitlines() if "ssl_certificate" not in x) + "\n"


class Nginx:
    """One nginx master (by pid) with SERVER (an http{}-level text) and the access log."""

    def __init__(self, tmp: Path, server: str) -> None:
        tmp.mkdir(parents=True)
        self.dir, self.log = tmp, tmp / "access.log"
        temps = "".join(f"  {k}_temp_path {tmp}/{k};\n" for k in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  {LOG_FORMAT}\n  access_log {self.log} many;\n{temps}{server}}}\n")
        args = [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
        test = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
        if test.returncode:
            raise SystemExit(test.stderr)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)

    def totals(self) -> dict[str, int]:
        """Bytes sent to clients, bytes taken from upstream, requests, cache statuses."""
        out: dict[str, int] = {"sent": 0, "upstream": 0, "requests": 0, "uploaded": 0}
        if not self.log.exists():
            return out
        for line in self.log.read_text().splitlines():
            out["requests"] += 1
            g = _GOT.search(line)  # the share's uploads, head and body, through this nginx
            out["uploaded"] += int(g.group(1)) if g else 0
            m = _SENT.search(line)
            out["sent"] += int(m.group(1)) if m else 0
            u = _UP.search(line)
            if u:  # "12, 34" when nginx asked twice for one request
                out["upstream"] += sum(int(x) for x in re.findall(r"\d+", u.group(1)))
            c = re.search(r" cache=(\S+)", line)
            if c and c.group(1) != "-":
                out[c.group(1)] = out.get(c.group(1), 0) + 1
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGQUIT)  # graceful: the master stops its worker
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class DiskWatch:
    """Samples the used bytes of the filesystem holding PATH every second (peak kept)."""

    def __init__(self, path: Path) -> None:
        self.path, self.peak, self.stop_ev = path, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_ev.is_set():
            self.peak = max(self.peak, shutil.disk_usage(self.path).used)
            self.stop_ev.wait(1.0)

    def close(self) -> int:
        self.stop_ev.set()
        self.thread.join()
        return self.peak


def run_readers(n: int, args: list[str], shm: Path,
                aligned: bool = False) -> tuple[float, list[int], float]:
    """N `kbfs cat ARGS > /dev/null` at once (ALIGNED: KBFS_ALIGNED_RUNS=1); (wall s, exit
    codes, their CPU s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KBFS_", "HTTP", "http"))}
    env.update(PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(shm / "config"))
    if aligned:
        env["KBFS_ALIGNED_RUNS"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "kbfs", "cat", "--no-local",
                               "--cache-dir", str(shm / f"r{i}"), "--cache-size", "256M", *args],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(shm / f"r{i}.err", "w"), env=env)  # noqa: SIM115
             for i in range(n)]
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(3600))
    finally:
        for p in procs:  # by pid, only ours, on any failure above
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for i, c in enumerate(codes):
        if c:
            print(f"reader {i} exit {c}: {(shm / f'r{i}.err').read_text()[-400:]}", file=sys.stderr)
        shutil.rmtree(shm / f"r{i}", ignore_errors=True)
    return wall, codes, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--readers", type=int, default=32)
    ap.add_argument("--scenario", action="append", choices=SCENARIOS)
    ap.add_argument("--workdir", default=None, help="where the dataset, caches and mirror go")
    ap.add_argument("--aligned-runs", action="store_true",
                    help="readers with KBFS_ALIGNED_RUNS=1 (aligned 1 MiB requests)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    size = parse_size(args.size)
    scenarios = args.scenario or list(SCENARIOS)
    work = Path(tempfile.mkdtemp(prefix="kbfs-many-", dir=args.workdir))
    shm = Path(tempfile.mkdtemp(prefix="kbfs-many-", dir="/dev/shm"))
    free = shutil.disk_usage(work).free
    need = 4 * size + (2 << 30)  # dataset, mirror, the cache (more if ranges differ)
    if free < need:
        raise SystemExit(f"{work}: {free >> 30} GiB free, this run needs about {need >> 30} GiB")
    watch = DiskWatch(work)
    used0 = shutil.disk_usage(work).used
    stops: list[object] = []
    results: list[dict[str, object]] = []
    try:
        data = work / "data"
        data.mkdir()
        with open(data / "dataset.bin", "wb") as f:
            left = size
            while left:
                f.write(os.urandom(min(left, 16 << 20)))
                left -= min(left, 16 << 20)
        ptrs = work / "pointers"
        ptrs.mkdir()
        for name, bs in (("v2", 1 << 16), ("v1", 1 << 20)):
            (ptrs / f"{name}.prv").write_text(
                prv.create_pointer(data / "dataset.bin", block_size=bs).to_json())
        cache_port = free_port()
        # The share connects through a second nginx (the same block, its cache unused):
        # its access log's $request_length of /_upload/ POSTs is what the share sent.
        relay_port, front_port = free_port(), free_port()
        relay = start_relay(work, "--public-url", f"http://127.0.0.1:{cache_port}",
                            "--public-url", f"http://127.0.0.1:{front_port}", port=relay_port)
        stops.append(relay)
        front = Nginx(work / "nginx-front", cache_block(relay_port, front_port, work / "front"))
        stops.append(front)
        wait_port(front_port)
        share = start_share(data, f"http://127.0.0.1:{front_port}", work)
        stops.append(share)
        mirror = None
        if any(s.startswith("mirror") for s in scenarios):
            out = work / "mirror"
            done = subprocess.run([sys.executable, "-m", "kbfs", "mirror", "export",
                                   str(ptrs / "v2.prv"), str(ptrs / "v1.prv"), str(out)],
                                  env=dict(os.environ, PYTHONPATH=str(REPO)),
                                  capture_output=True, text=True, timeout=3600)
            if done.returncode:
                raise SystemExit(done.stderr)
            mport = free_port()
            mirror = Nginx(work / "nginx-mirror",
                           f"  server {{ listen 127.0.0.1:{mport}; root {out}; }}\n")
            stops.append(mirror)
            wait_port(mport)
            mirror_url = f"http://127.0.0.1:{mport}"
        for k, name in enumerate(scenarios):
            # A fresh cache (folder and nginx) per scenario: every run starts cold.
            cache = Nginx(work / f"nginx-cache-{k}",
                          cache_block(relay_port, cache_port, work / f"cache-{k}",
                                      sliced=name.startswith("slice")))
            try:
                wait_port(cache_port)
                kind, version = name.split("-")
                reader_args = ["--relay", f"http://127.0.0.1:{cache_port}"]
                if kind == "mirror":
                    reader_args = ["--mirror", mirror_url, *reader_args]
                elif kind == "mirroronly":
                    reader_args = ["--mirror", mirror_url]
                share0, relay0 = front.totals()["uploaded"], get_json(relay.url + "/api/health")["bytes_out"]
                mirror0 = mirror.totals()["sent"] if mirror else 0
                load0 = os.getloadavg()[0]
                wall, codes, cpu = run_readers(args.readers, [*reader_args, str(ptrs / f"{version}.prv")],
                                               shm, args.aligned_runs)
                time.sleep(1)  # the access log's last lines
                c = cache.totals()
                row = {
                    "scenario": name + (" aligned" if args.aligned_runs else ""),
                    "readers": args.readers, "size": size,
                    "ok": sum(1 for x in codes if x == 0), "wall_s": round(wall, 1),
                    # Readers that failed are not counted (their bytes are partial).
                    "aggregate_MBps": round(sum(1 for x in codes if x == 0) * size / wall / 1e6, 1),
                    "share_bytes": front.totals()["uploaded"] - share0,
                    "relay_bytes": get_json(relay.url + "/api/health")["bytes_out"] - relay0,
                    "cache_sent": c["sent"], "cache_from_relay": c["upstream"],
                    "mirror_sent": (mirror.totals()["sent"] - mirror0) if mirror else 0,
                    "cache_log": {x: v for x, v in c.items() if x not in ("sent", "upstream")},
                    "reader_cpu_s": round(cpu, 1), "load": [round(load0, 1),
                                                            round(os.getloadavg()[0], 1)],
                    "cache_disk": sum(p.stat().st_size for p in (work / f"cache-{k}").rglob("*")
                                      if p.is_file()),
                }
                row["share_x"] = round(int(row["share_bytes"]) / size, 3)  # type: ignore[call-overload]
                results.append(row)
                print(json.dumps(row), flush=True)
            finally:
                cache.stop()
                shutil.rmtree(work / f"cache-{k}", ignore_errors=True)
    finally:
        for proc in reversed(stops):
            proc.stop()  # type: ignore[attr-defined]
        peak = watch.close()
        shutil.rmtree(shm, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"peak disk use above the start: {(peak - used0) / 2**30:.1f} GiB", flush=True)
    print("| scenario | readers ok | wall | aggregate | share sent | relay sent | cache sent "
          "| mirror sent | reader CPU | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    mib = 2 ** 20
    for r in results:
        print(f"| {r['scenario']} | {r['ok']}/{r['readers']} | {r['wall_s']} s | "
              f"{r['aggregate_MBps']} MB/s | {int(r['share_bytes']) / mib:.0f} MiB "  # type: ignore[call-overload]
              f"({r['share_x']}x) | {int(r['relay_bytes']) / mib:.0f} MiB | "  # type: ignore[call-overload]
              f"{int(r['cache_sent']) / mib:.0f} MiB | "  # type: ignore[call-overload]
              f"{int(r['mirror_sent']) / mib:.0f} MiB | {r['reader_cpu_s']} s | {r['load']} |")  # type: ignore[call-overload]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] == r["readers"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
