"""Run `kbfs mount` as a real process for tests, and always clean it up.

`mounted(source, tmp_path, ...)` starts `python -m kbfs mount SOURCE MNT ...` (the real
daemonizing path), parses the daemon's pid from its output, yields a `Mount`, and in
teardown, even when the test failed: `fusermount3 -u`, then `-uz` (lazy) if that did not
work, then SIGTERM and finally SIGKILL to the daemon by its pid. Each mount gets its own
runtime folder (status files) and an empty config home, so a user's settings never leak in.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The marks of every test that mounts: skipped (with the reason printed) only where FUSE is missing.
NEEDS_FUSE = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
        reason="needs /dev/fuse and fusermount3",
    ),
]

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Mount:
    mountpoint: str
    pid: int
    log: str
    cache_dir: str
    env: dict[str, str] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def log_text(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")
        except OSError:
            return ""

    def kbfs(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run another kbfs command with this mount's environment."""
        return run_kbfs(list(args), env=self.env, timeout=timeout)


def isolated_env(base: Path) -> dict[str, str]:
    """An environment isolated from the user's kbfs settings."""
    env = dict(os.environ)
    for key in ("KBFS_RELAY", "KBFS_CACHE_DIR", "KBFS_CACHE_SIZE", "KBFS_SEARCH_DIRS",
                "KBFS_DROP_BEHIND"):
        env.pop(key, None)
    env["XDG_CONFIG_HOME"] = str(base / "config")
    env["KBFS_RUNTIME_DIR"] = str(base / "run")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_kbfs(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kbfs", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def is_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def stop_pid(pid: int, wait: float = 5.0) -> None:
    """SIGTERM PID, then SIGKILL after WAIT seconds; returns once it is gone (or given up)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        end = time.monotonic() + wait
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.02)


def force_unmount(mountpoint: str, pid: int | None) -> None:
    """Unmount (normal, then lazy) and kill the daemon by pid; never raises, never hangs long."""
    for args in (["-u"], ["-uz"]):
        if not is_mounted(mountpoint):
            break
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["fusermount3", *args, mountpoint], capture_output=True, timeout=10)
    if pid:
        # Unmounted, a daemon finishes its work and exits by itself (the cache writes its
        # queued stores): a SIGTERM at once would cut that short, and a later mount of the
        # same cache would fetch those blocks again. SIGTERM only one that does not.
        end = time.monotonic() + 5.0
        while alive(pid) and not is_mounted(mountpoint) and time.monotonic() < end:
            time.sleep(0.02)
        stop_pid(pid)
    if is_mounted(mountpoint):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True, timeout=10)


def start_mount(
    source: str,
    base: Path,
    *,
    name: str = "mnt",
    cache_dir: str | None = None,
    relays: Sequence[str] = (),
    extra: Sequence[str] = (),
    env_extra: Mapping[str, str] | None = None,
) -> Mount:
    """Mount SOURCE at BASE/NAME (created); raise AssertionError with the output if it fails.
    ENV_EXTRA: more environment for the daemon (e.g. KBFS_DROP_BEHIND)."""
    mnt = base / name
    mnt.mkdir(parents=True, exist_ok=True)
    cache = cache_dir or str(base / "cache")
    env = {**isolated_env(base), **(env_extra or {})}
    args = ["mount", source, str(mnt), "--cache-dir", cache]
    for relay in relays:
        args += ["--relay", relay]
    res = run_kbfs([*args, *extra], env=env, timeout=90)
    m = re.search(r"pid (\d+); log (.+?)\)", res.stdout)
    if res.returncode != 0 or not m:
        force_unmount(str(mnt), None)
        raise AssertionError(f"kbfs mount failed ({res.returncode}): {res.stdout}{res.stderr}")
    return Mount(str(mnt), int(m.group(1)), m.group(2), cache, env)


@contextlib.contextmanager
def mounted(source: str, base: Path, **kwargs: object) -> Iterator[Mount]:
    """A live mount of SOURCE under BASE, always unmounted and its daemon stopped afterwards."""
    mount = start_mount(source, base, **kwargs)  # type: ignore[arg-type]
    try:
        yield mount
    finally:
        force_unmount(mount.mountpoint, mount.pid)
