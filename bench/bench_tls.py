"""What TLS costs a relay: plain http vs the relay's own TLS vs nginx's TLS in front.

Starts, on loopback, three real relays and one `kbfs share` of a folder holding one
random file (1 GiB by default) connected to all three:

- `plain`: `kbfs relay` over http (the share's uploads and the reader's answers
  spliced in the kernel);
- `relay-tls`: `kbfs relay --certfile/--keyfile` (a private CA made by
  tests/deployutil.make_pki; bytes go through Python and the TLS library both ways);
- `nginx-tls`: a plain relay behind docs/deploy.md's nginx block with its cache lines
  dropped (as the doc says to, for no cache), TLS in nginx, the relay splicing plain.

Each round runs `kbfs download` of the whole file through each relay (a fresh cache
folder, `--no-local`, the output deleted after), in turn, so the three see the same
machine load; it reports the best and median seconds, MB/s, the ratio to `plain`, and
the CPU seconds per GB of the relay, nginx, the share and the reader (the download
process). MB = 10^6 bytes. Exit status 0 whatever the figures.

    python bench/bench_tls.py [--size 1G] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kbfs.config import parse_size  # noqa: E402
from tests.deployutil import free_port, make_pki, start_tls_relay, wait_port  # noqa: E402
from tests.netutil import get_json, start_relay, start_share  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DOC = REPO / "docs" / "deploy.md"


def make_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == size:
        return
    print(f"writing a {size} byte test file...", file=sys.stderr)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n


def cpu_of(pids: list[int]) -> float:
    """User+system CPU seconds of PIDS and their live children (Linux /proc)."""
    total = 0.0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{pid}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, IndexError, ValueError):
            pass
    return total


def nginx_block(relay_port: int, port: int, cert: tuple[Path, Path]) -> str:
    """docs/deploy.md's nginx block, cache lines dropped, in front of RELAY_PORT."""
    m = re.search(r"<!-- nginx.conf begin.*?```nginx\n(.*?)```", DOC.read_text(), re.S)
    if not m:
        raise SystemExit("docs/deploy.md lost its nginx.conf block")
    conf = re.sub(r"proxy_cache_path[^;]*;\n", "", m.group(1))
    conf, n = re.subn(r"\n    location ~ \^/\(sha1\|tree\)/ \{\n.*?\n    \}\n", "\n", conf,
                      flags=re.S)
    if n != 1:
        raise SystemExit("docs/deploy.md's nginx block lost its /sha1|tree/ location")
    for old, new in (("server 127.0.0.1:8080;", f"server 127.0.0.1:{relay_port};"),
                     ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
                     ("/etc/ssl/kbfs/fullchain.pem", str(cert[0])),
                     ("/etc/ssl/kbfs/privkey.pem", str(cert[1]))):
        if old not in conf:
            raise SystemExit(f"docs/deploy.md's nginx block no longer has {old!r}")
        conf = conf.replace(old, new)
    return conf


class Nginx:
    def __init__(self, tmp: Path, server: str, port: int) -> None:
        tmp.mkdir(parents=True)
        temps = "".join(f"  {k}_temp_path {tmp}/{k};\n" for k in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log;\nevents {{ worker_connections 512; }}\n"
            f"http {{\n  access_log off;\n{temps}{server}}}\n")
        args = [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
        test = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
        if test.returncode:
            raise SystemExit(test.stderr)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        wait_port(port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGQUIT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def download(pointer: Path, url: str, work: Path, size: int) -> tuple[float, float]:
    """(seconds, reader CPU seconds) of one `kbfs download` of POINTER through URL."""
    cache, out = work / "dl-cache", work / "dl.bin"
    shutil.rmtree(cache, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kbfs", "download", str(pointer), "-r", url,
                           "--no-local", "--cache-dir", str(cache), "-o", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=work,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode or out.stat().st_size != size:
        raise SystemExit(f"download through {url} failed: {done.stderr[-2000:]}")
    out.unlink()
    shutil.rmtree(cache, ignore_errors=True)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="test file size (default 1G)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="keep the test file here between runs")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kbfs-bench-tls-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / f"run-{os.getpid()}"
    run.mkdir()
    make_file(work / "data" / "big.bin", size)
    pki = make_pki(run / "pki")
    os.environ["SSL_CERT_FILE"] = str(pki.ca)  # every process trusts the private CA
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        os.environ.pop(name, None)
    pointer = run / "big.bin.prv"
    subprocess.run([sys.executable, "-m", "kbfs", "prv", "create", str(work / "data" / "big.bin"),
                    "--no-hints", "-o", str(pointer)], check=True, cwd=run, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    stops: list = []
    try:
        plain = start_relay(run / "plain")
        stops.append(plain.stop)
        tls = start_tls_relay(run / "tls", pki.good)
        stops.append(tls.stop)
        tls_url = tls.url.replace("127.0.0.1", "localhost")
        front_port = free_port()
        behind = start_relay(run / "behind", "--public-url", f"https://localhost:{front_port}",
                             "--trust-proxy")
        stops.append(behind.stop)
        nginx = Nginx(run / "nginx", nginx_block(int(behind.url.rpartition(":")[2]), front_port,
                                                 pki.good), front_port)
        stops.append(nginx.stop)
        front_url = f"https://localhost:{front_port}"
        share = start_share(work / "data", plain.url, run, "--relay", tls_url, "--relay",
                            front_url, wait=True)
        stops.append(share.stop)
        for url in (tls_url, front_url):
            share.proc.wait_line(f"kbfs share connected to {re.escape(url)}", timeout=60)
        cases = [("plain", plain.url, plain, [plain.pid]),
                 ("relay-tls", tls_url, tls, [tls.pid]),
                 ("nginx-tls", front_url, behind, [behind.pid, nginx.proc.pid])]
        times: dict[str, list[float]] = {name: [] for name, *_ in cases}
        cpu: dict[str, dict[str, float]] = {name: {"relay": 0.0, "nginx": 0.0, "share": 0.0,
                                                   "reader": 0.0} for name, *_ in cases}
        spliced: dict[str, float] = {}
        load0 = os.getloadavg()
        for r in range(args.rounds):
            for name, url, _, pids in cases:
                c_relay, c_nginx = cpu_of(pids[:1]), cpu_of(pids[1:])
                c_share = cpu_of([share.pid])
                seconds, reader = download(pointer, url, run, size)
                times[name].append(seconds)
                cpu[name]["relay"] += cpu_of(pids[:1]) - c_relay
                cpu[name]["nginx"] += cpu_of(pids[1:]) - c_nginx
                cpu[name]["share"] += cpu_of([share.pid]) - c_share
                cpu[name]["reader"] += reader
                print(f"round {r + 1} {name}: {seconds:.2f} s", file=sys.stderr)
        for name, _, relay, _ in cases:
            health = get_json(relay.url + "/api/health")
            spliced[name] = health.get("bytes_spliced", 0) / max(1, health.get("bytes_out", 0))
        load1 = os.getloadavg()
    finally:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(run, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    gb = size * args.rounds / 1e9
    base = statistics.median(times["plain"])
    print(f"\n`kbfs download` of {size / 1e9:.2f} GB, {args.rounds} rounds, {os.cpu_count()} cores, "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}\n")
    print("| path | best s | median s | median MB/s | vs plain | relay CPU s/GB | nginx CPU s/GB "
          "| share CPU s/GB | reader CPU s/GB | relay bytes spliced |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, *_ in cases:
        med = statistics.median(times[name])
        c = cpu[name]
        print(f"| {name} | {min(times[name]):.2f} | {med:.2f} | {size / med / 1e6:.0f} | "
              f"{base / med:.2f}x | {c['relay'] / gb:.2f} | "
              f"{(c['nginx'] / gb) if name == 'nginx-tls' else 0:.2f} | {c['share'] / gb:.2f} | "
              f"{c['reader'] / gb:.2f} | {spliced[name]:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
