"""`kbfs download` against `curl` and `cp`, side by side in one run.

Starts a real relay and a real share (as `kbfs relay` / `kbfs share` processes) on
127.0.0.1, shares one file of BENCH_SIZE bytes (default 1 GiB), then times:

  1. `curl -o` of the relay URL /sha1/SHA1                 (the network reference)
  2. `kbfs download --no-local` with an empty cache          (goal: >= 0.8x of 1)
  3. `cp` of the original file                               (the local reference)
  4. `kbfs download --no-local` with everything cached       (goal: >= 0.8x of 3)

A download does not store what it fetches in the cache, so before 4 the cache is filled
by `kbfs cat --no-local` (not timed). Its read-ahead writes block files past the page cache,
so a first cached download reads them from disk: that run is shown on its own line
("cached, from disk"); run 4 then has its source in the page cache, as `cp` has (the
original is read once before the runs). Every output is checked against the original's
SHA-1. Prints the table of the median run (and, per run, wall seconds and the CPU seconds
of the measured process itself, which matter when the machine is shared); exit status 0
even when a goal is missed (the figures are the result).
Environment: BENCH_SIZE (e.g. 256M), BENCH_DIR (scratch folder, default a temp dir),
BENCH_REPEAT (rounds of the four runs, default 1; the table shows the medians).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kbfs import prv  # noqa: E402
from kbfs.config import parse_size  # noqa: E402

KBFS = [sys.executable, "-m", "kbfs"]


def sha1_of(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_file(path: str, size: int) -> None:
    chunk = os.urandom(16 << 20)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left > 0:
            # Vary each chunk a little so blocks differ (no dedup anywhere to flatter us).
            piece = i.to_bytes(8, "little") + chunk[8:]
            f.write(piece[:left])
            left -= len(piece)
            i += 1


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    end = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(pattern, line)
        if m:
            return m
    raise RuntimeError(f"no line matching {pattern!r} from {proc.args}")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process itself) of running CMD.

    Each run starts with no dirty pages waiting to be written (the outputs of earlier
    runs): otherwise the kernel's writeback of one contender's output runs during the next."""
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def report_table(mib: float, t_curl: float, t_kbfs: float, t_cp: float, t_cached: float) -> str:
    """The markdown table: times, speeds, ratios against the references, goals met or not."""
    rows = ["| run | seconds | MiB/s | vs reference | goal | result |",
            "| --- | ---: | ---: | ---: | --- | --- |"]
    cold, cached = t_curl / t_kbfs, t_cp / t_cached
    rows.append(f"| curl -o (relay URL) | {t_curl:.2f} | {mib / t_curl:.0f} | reference | | |")
    rows.append(f"| kbfs download (empty cache) | {t_kbfs:.2f} | {mib / t_kbfs:.0f} | "
                f"{cold:.2f}x curl | >= 0.8x | {'met' if cold >= 0.8 else 'NOT met'} |")
    rows.append(f"| cp (original) | {t_cp:.2f} | {mib / t_cp:.0f} | reference | | |")
    rows.append(f"| kbfs download (cached) | {t_cached:.2f} | {mib / t_cached:.0f} | "
                f"{cached:.2f}x cp | >= 0.8x | {'met' if cached >= 0.8 else 'NOT met'} |")
    return "\n".join(rows)


def main() -> int:
    size = parse_size(os.environ.get("BENCH_SIZE", "1G"))
    # As an installed package is (pip compiles it): start-up without compiling kbfs's
    # modules first, which a source checkout under PYTHONDONTWRITEBYTECODE=1 does every run.
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(os.path.dirname(HERE), "kbfs")],
                   check=True)
    scratch = tempfile.mkdtemp(prefix="kbfs-bench-", dir=os.environ.get("BENCH_DIR"))
    procs: list[subprocess.Popen[str]] = []
    try:
        share_dir = os.path.join(scratch, "share")
        os.makedirs(share_dir)
        original = os.path.join(share_dir, "big.bin")
        make_file(original, size)
        sha1 = sha1_of(original)
        pointer = os.path.join(scratch, "big.bin.prv")
        with open(pointer, "w") as f:
            f.write(prv.create_pointer(original).to_json())
        env = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
        env["XDG_CONFIG_HOME"] = os.path.join(scratch, "config")
        env["XDG_STATE_HOME"] = os.path.join(scratch, "state")
        env["KBFS_CACHE_DIR"] = os.path.join(scratch, "cache")

        relay = subprocess.Popen([*KBFS, "relay", "--host", "127.0.0.1", "--port", "0",
                                  "--state-dir", os.path.join(scratch, "relay")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
        procs.append(relay)
        relay_url = wait_for_line(relay, r"listening on (http://\S+)", 30).group(1)
        share = subprocess.Popen([*KBFS, "share", share_dir, "--relay", relay_url,
                                  "--state-dir", os.path.join(scratch, "share-state")],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 text=True)
        procs.append(share)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                if get_json(f"{relay_url}/api/find/{sha1}").get("found"):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the share never published the file")

        url = f"{relay_url}/sha1/{sha1}"
        out = os.path.join(scratch, "out")
        os.makedirs(out)
        mib = size / (1 << 20)

        def check(path: str) -> None:
            if sha1_of(path) != sha1:
                raise RuntimeError(f"{path}: wrong content")
            os.unlink(path)

        cache = env["KBFS_CACHE_DIR"]
        kbfs_get = [*KBFS, "download", pointer, "--no-local", "-r", relay_url, "-o"]
        runs: dict[str, list[tuple[float, float]]] = {
            k: [] for k in ("curl", "kbfs", "cp", "cached-from-disk", "cached")}
        # Warm the share's page cache so neither contender pays for the first disk read.
        subprocess.run(["cat", original], stdout=subprocess.DEVNULL, check=True)
        for _ in range(max(1, int(os.environ.get("BENCH_REPEAT", "1")))):
            shutil.rmtree(cache, ignore_errors=True)
            runs["curl"].append(timed(["curl", "-s", "-f", "-o", f"{out}/curl.bin", url], env))
            check(f"{out}/curl.bin")
            runs["kbfs"].append(timed([*kbfs_get, f"{out}/kbfs.bin"], env))
            check(f"{out}/kbfs.bin")
            runs["cp"].append(timed(["cp", original, f"{out}/cp.bin"], env))
            check(f"{out}/cp.bin")
            subprocess.run([*KBFS, "cat", pointer, "--no-local", "-r", relay_url], env=env,
                           check=True, stdout=subprocess.DEVNULL)
            runs["cached-from-disk"].append(timed([*kbfs_get, f"{out}/kbfs-cached.bin"], env))
            check(f"{out}/kbfs-cached.bin")
            runs["cached"].append(timed([*kbfs_get, f"{out}/kbfs-cached.bin"], env))
            check(f"{out}/kbfs-cached.bin")
            print("  ".join(f"{k} {w:.2f} s wall {c:.2f} s CPU" for k, (w, c) in
                            ((k, v[-1]) for k, v in runs.items())), flush=True)
        t_curl, t_kbfs, t_cp, t_cached = (statistics.median(w for w, _ in runs[k])
                                          for k in ("curl", "kbfs", "cp", "cached"))
        gib = size / (1 << 30)
        cpu = {k: statistics.median(c for _, c in v) / gib for k, v in runs.items()}

        print(f"file: {mib:.0f} MiB through a relay and a share on 127.0.0.1, {os.cpu_count()} CPUs")
        print()
        print(report_table(mib, t_curl, t_kbfs, t_cp, t_cached))
        t_disk = statistics.median(w for w, _ in runs["cached-from-disk"])
        print(f"| kbfs download (cached, from disk) | {t_disk:.2f} | {mib / t_disk:.0f} | "
              f"{t_cp / t_disk:.2f}x cp | | |")
        print()
        print("CPU seconds per GiB of the measured process (median): "
              + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
