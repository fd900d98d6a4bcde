"""The relay under load: hundreds of concurrent range requests for minutes, every byte
checked, the relay's and share's memory and open file descriptors sampled throughout.

`make soak` runs `test_relay_soak` (KBFS_SOAK_SECONDS, default 600; KBFS_SOAK_CLIENTS,
default 200 threads, each its own HTTP session). `make test` runs `test_relay_soak_short`:
the same code for about 5 s with 24 clients. Figures are printed (use -s) and written to
KBFS_SOAK_REPORT (default: soak-relay.json in the test's temporary folder).

Pass: no request failed or returned wrong bytes; RSS flat (last sample <= first sample
after warm-up x 1.5 + 32 MiB, for relay and share); open fds back to their idle count
(+ a small margin) once the load stops, and bounded during it.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import netutil
import pytest
import requests
from hostileutil import open_fds, rss_kib

from kbfs import prv
from kbfs.share import MAX_UPLOADS

MiB = 1 << 20


@pytest.fixture(scope="module")
def soak_world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("soak")
    data = tmp / "data"
    (data / "sub").mkdir(parents=True)
    rng = random.Random(7)
    files = {"big.bin": rng.randbytes(48 * MiB + 12345), "mid.bin": rng.randbytes(5 * MiB + 1),
             "sub/small.bin": rng.randbytes(70_000), "sub/tiny.txt": b"tiny\n"}
    for rel, body in files.items():
        (data / rel).write_bytes(body)
    relay = netutil.start_relay(tmp / "logs")
    share = None
    try:
        share = netutil.start_share(data, relay.url, tmp / "logs", state_dir=tmp / "state")
        sha1s = {rel: prv.digest_file(data / rel).sha1 for rel in files}
        yield {"relay": relay, "share": share, "files": files, "sha1s": sha1s, "tmp": tmp}
    finally:
        if share is not None:
            share.stop()
        relay.stop()


def _pick_range(rng: random.Random, size: int) -> tuple[str, int, int]:
    """A Range header and the [start, end) it should give for a file of SIZE bytes."""
    roll = rng.random()
    if roll < 0.70:
        n = rng.randint(1, 64 * 1024)
    elif roll < 0.95:
        n = rng.randint(64 * 1024, MiB)
    else:
        n = rng.randint(MiB, 8 * MiB)
    n = min(n, size)
    kind = rng.random()
    if kind < 0.05:
        return f"bytes=-{n}", size - n, size
    start = rng.randrange(0, size - n + 1)
    if kind < 0.10 and size - start <= 8 * MiB:
        return f"bytes={start}-", start, size
    return f"bytes={start}-{start + n - 1}", start, start + n


def run_soak(world: Any, seconds: float, clients: int, sample_every: float) -> dict[str, Any]:
    relay, share = world["relay"], world["share"]
    files, sha1s = world["files"], world["sha1s"]
    names = [n for n in files if len(files[n]) > 0]
    urls = {n: [f"{relay.url}/sha1/{sha1s[n]}", f"{relay.url}/s/{share.id}/file/{n}"]
            for n in names}
    stop = threading.Event()
    lock = threading.Lock()
    errors: list[str] = []
    counts = {"requests": 0, "bytes": 0}
    latencies: list[float] = []
    samples: list[dict[str, float]] = []

    def sample() -> dict[str, float]:
        return {"t": time.monotonic() - t0, "relay_rss": rss_kib(relay.pid),
                "relay_fds": open_fds(relay.pid), "share_rss": rss_kib(share.pid),
                "share_fds": open_fds(share.pid)}

    def client(n: int) -> None:
        rng = random.Random(n)
        session = requests.Session()
        session.trust_env = False
        mine: list[float] = []
        done = nbytes = 0
        try:
            while not stop.is_set():
                name = rng.choice(names)
                body = files[name]
                header, start, end = _pick_range(rng, len(body))
                url = rng.choice(urls[name])
                t1 = time.monotonic()
                try:
                    r = session.get(url, headers={"Range": header}, timeout=60)
                    got = r.content
                except requests.RequestException as exc:
                    with lock:
                        errors.append(f"{url} {header}: {type(exc).__name__}: {exc}"[:300])
                    session = requests.Session()
                    session.trust_env = False
                    continue
                mine.append(time.monotonic() - t1)
                want = f"bytes {start}-{end - 1}/{len(body)}"
                if r.status_code != 206 or r.headers.get("Content-Range") != want or \
                        got != body[start:end]:
                    with lock:
                        errors.append(f"{url} {header}: HTTP {r.status_code} "
                                      f"{r.headers.get('Content-Range')} {len(got)} bytes"[:300])
                    continue
                done += 1
                nbytes += len(got)
        finally:
            session.close()
            with lock:
                counts["requests"] += done
                counts["bytes"] += nbytes
                latencies.extend(mine)

    time.sleep(0.5)
    t0 = time.monotonic()
    idle_before = sample()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        time.sleep(min(sample_every, max(0.0, deadline - time.monotonic())))
        samples.append(sample())
        with lock:
            if len(errors) > 50:
                break
    stop.set()
    for t in threads:
        t.join(90)
    elapsed = time.monotonic() - t0
    time.sleep(2.0)  # let closed connections settle
    idle_after = sample()
    lat = sorted(latencies) or [0.0]
    return {
        "seconds": round(elapsed, 1), "clients": clients, "requests": counts["requests"],
        "errors": len(errors), "first_errors": errors[:10],
        "requests_per_s": round(counts["requests"] / elapsed, 1),
        "mb_per_s": round(counts["bytes"] / elapsed / 1e6, 1),
        "latency_ms": {"p50": round(1000 * statistics.median(lat), 1),
                       "p99": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
                       "max": round(1000 * lat[-1], 1)},
        "idle_before": idle_before, "idle_after": idle_after, "samples": samples,
        "relay_log_errors": sum(1 for line in relay.proc.stderr().splitlines()
                                if " ERROR " in line or "Traceback" in line),
    }


def check_flat(report: dict[str, Any], warmup_fraction: float = 0.2) -> None:
    samples = report["samples"]
    assert len(samples) >= 3, samples
    warm = [s for s in samples if s["t"] >= warmup_fraction * report["seconds"]] or samples
    first, last = warm[0], samples[-1]
    for who in ("relay", "share"):
        rss0, rss1 = first[f"{who}_rss"], last[f"{who}_rss"]
        assert rss1 <= rss0 * 1.5 + 32 * 1024, f"{who} RSS grew: {rss0} -> {rss1} KiB"
        peak_fds = max(s[f"{who}_fds"] for s in samples)
        assert peak_fds <= report["idle_before"][f"{who}_fds"] + 4 * report["clients"] + 64, \
            f"{who} fds peaked at {peak_fds}"
        before, after = report["idle_before"][f"{who}_fds"], report["idle_after"][f"{who}_fds"]
        # The share keeps one keep-alive upload connection per worker thread (at most
        # MAX_UPLOADS), closed by the relay after its idle timeout, and each of those
        # threads holds its SQLite index connection (2 fds) until trio retires it.
        assert after <= before + 3 * MAX_UPLOADS + 16, \
            f"{who} fds not released: {before} idle before, {after} after"
        fds0, fds1 = first[f"{who}_fds"], last[f"{who}_fds"]
        assert fds1 <= fds0 * 1.5 + 32, f"{who} fds grew under load: {fds0} -> {fds1}"


def _save(report: dict[str, Any], world: Any) -> None:
    path = Path(os.environ.get("KBFS_SOAK_REPORT") or world["tmp"] / "soak-relay.json")
    path.write_text(json.dumps(report, indent=1))
    brief = {k: v for k, v in report.items() if k not in ("samples",)}
    s = report["samples"]
    for who in ("relay", "share"):
        brief[f"{who}_rss_kib"] = [s[0][f"{who}_rss"], s[len(s) // 5][f"{who}_rss"],
                                   s[-1][f"{who}_rss"], max(x[f"{who}_rss"] for x in s)]
        brief[f"{who}_fds"] = [report["idle_before"][f"{who}_fds"],
                               max(x[f"{who}_fds"] for x in s), report["idle_after"][f"{who}_fds"]]
    print("\nrelay soak:", json.dumps(brief), f"(full report: {path})")


def test_relay_soak_short(soak_world: Any) -> None:
    report = run_soak(soak_world, seconds=5.0, clients=24, sample_every=0.5)
    _save(report, soak_world)
    assert report["errors"] == 0, report["first_errors"]
    assert report["requests"] > 50
    assert report["relay_log_errors"] == 0
    check_flat(report)


@pytest.mark.soak
def test_relay_soak(soak_world: Any) -> None:
    seconds = float(os.environ.get("KBFS_SOAK_SECONDS", "600"))
    clients = int(os.environ.get("KBFS_SOAK_CLIENTS", "200"))
    report = run_soak(soak_world, seconds=seconds, clients=clients,
                      sample_every=max(1.0, seconds / 120))
    _save(report, soak_world)
    assert report["errors"] == 0, report["first_errors"]
    assert report["relay_log_errors"] == 0
    check_flat(report)
