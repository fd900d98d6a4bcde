"""`pip install` of the built package, as a user who never clones the repository gets it.

Once per session: `python -m build` (sdist, then the wheel built from that sdist, as pip
does) from a copy of the checkout, and a fresh venv with only that wheel and its
dependencies installed: no pyfuse3, no checkout on sys.path, no Makefile. The venv's
dependencies come from a wheel folder repacked from the packages of the venv running the
tests (`pip install --no-index`: no network). Then the installed `kbfs` runs a relay and a
share on 127.0.0.1, and `kbfs download`, `kbfs cat`, `kbfs.open` and fsspec read through
them; every command's --help loads; `kbfs mount` says in one line to install kbfs[mount].
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
COMMANDS = ["cache", "cat", "download", "locate", "ls", "mirror", "mount", "prv", "relay", "share",
            "status", "umount", "view"]

pytestmark = pytest.mark.timeout(300)


@dataclass
class Installed:
    dist: Path  # the wheel and the sdist
    venv: Path
    wheel: Path
    sdist: Path

    @property
    def kbfs(self) -> str:
        return str(self.venv / "bin" / "kbfs")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


def _clean_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell: nothing of the checkout, the test venv or pip's
    configuration of this machine."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KBFS_", "PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(XDG_CONFIG_HOME=str(home / "config"), KBFS_CACHE_DIR=str(home / "cache"),
               PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    if os.environ.get("KBFS_PORTABLE"):
        env["KBFS_PORTABLE"] = os.environ["KBFS_PORTABLE"]
    return env


def _copy_checkout(dst: Path) -> None:
    """What the sdist is built from: the package, its metadata and what MANIFEST.in names
    (never build/ or egg-info litter in the shared work tree)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules")
    shutil.copytree(REPO / "kbfs", dst / "kbfs", ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, dst / name)
    for folder in ("docs", "daemon"):
        if (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, dst / folder, ignore=ignore)


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def _closure(reqs: list[Requirement]) -> list[metadata.Distribution]:
    """The installed distributions REQS need (no extras), transitively."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        dist = metadata.distribution(req.name)
        seen[name] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(sub)
    return list(seen.values())


def _repack(dist: metadata.Distribution, out: Path) -> Path:
    """A wheel of the installed DIST: its files under site-packages (scripts are made anew
    by pip from entry_points.txt), a fresh RECORD, the first of its WHEEL file's tags that
    this interpreter takes."""
    files = [f for f in (dist.files or []) if not str(f).startswith("..")
             and "__pycache__" not in f.parts and f.suffix != ".pyc"]
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    supported = {str(t) for t in tags.sys_tags()}
    tag = next(t for line in (dist.read_text("WHEEL") or "").splitlines() if line.startswith("Tag:")
               if (t := line.split(":", 1)[1].strip()) in supported)  # py2.py3: py3-none-any
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    path = out / f"{name}-{dist.version}-{tag}.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for f in files:
            rel = str(f)
            if f.parts[0] == info and f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            data = Path(str(dist.locate_file(f))).read_bytes()
            z.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([rel, f"sha256={digest}", len(data)])
        writer.writerow([f"{info}/RECORD", "", ""])
        z.writestr(f"{info}/RECORD", record.getvalue())
    return path


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("package")
    src, dist, wheels, venv = tmp / "src", tmp / "dist", tmp / "wheels", tmp / "venv"
    _copy_checkout(src)
    t0 = time.monotonic()
    # --no-isolation: the build backend of this venv (setup.cfg's test extra), no download.
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
                           capture_output=True, text=True, timeout=240, cwd=tmp)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next(dist.glob("kbfs-*.whl"))
    sdist = next(dist.glob("kbfs-*.tar.gz"))
    t1 = time.monotonic()
    wheels.mkdir()
    for d in _closure(_requirements(wheel)):
        _repack(d, wheels)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    env = _clean_env(tmp)
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                          "-q", "--no-index", "--find-links", str(wheels), str(wheel)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    print(f"\ntest_package: build {t1 - t0:.1f} s, venv and install {time.monotonic() - t1:.1f} s")
    return Installed(dist, venv, wheel, sdist)


def test_wheel_and_sdist_hold_the_package_and_its_web_page(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
    web = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "kbfs" / "web").rglob("*") if p.is_file())
    assert web and "kbfs/web/index.html" in web
    assert set(web) <= names, set(web) - names  # every static file, the vendored JS too
    assert "kbfs/osio.py" in names and "kbfs/cli.py" in names
    assert not any("tests/" in n or "__pycache__" in n for n in names)
    with tarfile.open(installed.sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    for need in ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "kbfs/web/index.html",
                 "daemon/kbfs-share@.service", "docs/deploy.md", *web):
        assert need in members, need
    requires = [str(r) for r in _requirements(installed.wheel)]
    assert not any(r.startswith("pyfuse3") and "extra" not in r for r in requires)  # the mount extra only
    assert any(r.startswith("pyfuse3") and 'extra == "mount"' in r for r in requires)


def test_installed_cli_has_every_command_and_no_pyfuse3(installed: Installed, tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    where = subprocess.run([installed.python, "-c", "import kbfs; print(kbfs.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert where.stdout.startswith(str(installed.venv)), where.stdout + where.stderr  # not the checkout
    fuse = subprocess.run([installed.python, "-c", "import pyfuse3"], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert fuse.returncode != 0 and "pyfuse3" in fuse.stderr
    top = subprocess.run([installed.kbfs, "--help"], env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert top.returncode == 0, top.stderr
    listed = re.findall(r"^  (\w+) ", top.stdout.split("Commands:", 1)[1], re.M)
    assert sorted(listed) == COMMANDS
    for cmd in COMMANDS:
        got = subprocess.run([installed.kbfs, cmd, "--help"], env=env, capture_output=True, text=True,
                             cwd=tmp_path, timeout=60)
        assert got.returncode == 0 and "Usage:" in got.stdout, (cmd, got.stderr)
    (tmp_path / "pointers").mkdir()
    (tmp_path / "mnt").mkdir()
    mount = subprocess.run([installed.kbfs, "mount", str(tmp_path / "pointers"), str(tmp_path / "mnt")],
                           env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert mount.returncode == 1
    assert mount.stderr.strip().splitlines() == [
        "kbfs: error: mounting needs pyfuse3 and libfuse 3: pip install 'kbfs[mount]'"]


class _Started:
    """A process of the installed kbfs whose standard output is read line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def wait_line(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in: {''.join(self.lines)[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
def served(installed: Installed, tmp_path: Path) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    files = {"big.bin": os.urandom(5 * MiB + 321), "notes.txt": b"hello from the wheel\n"}
    data = tmp_path / "data"
    data.mkdir()
    for name, content in files.items():
        (data / name).write_bytes(content)
    env = _clean_env(tmp_path)
    relay = _Started([installed.kbfs, "relay", "--host", "127.0.0.1", "--port", "0"], env, tmp_path)
    share: _Started | None = None
    try:
        url = relay.wait_line(r"kbfs relay listening on (http://\S+)").group(1)
        share = _Started([installed.kbfs, "share", str(data), "--relay", url, "--state-dir",
                          str(tmp_path / "state")], env, tmp_path)
        share_id = share.wait_line(r"kbfs share id ([a-z2-7]+)").group(1)
        deadline = time.monotonic() + 30
        while not any(s["id"] == share_id and not s.get("scanning")
                      for s in json.loads(urllib.request.urlopen(url + "/api/shares", timeout=5).read())):
            assert time.monotonic() < deadline, "".join(share.lines)
            time.sleep(0.05)
        yield url, share_id, files
    finally:
        if share is not None:
            share.stop()
        relay.stop()


def test_installed_kbfs_shares_relays_and_reads(installed: Installed, served: tuple[str, str, dict[str, bytes]],
                                                tmp_path: Path) -> None:
    url, share_id, files = served
    env = _clean_env(tmp_path)
    base = f"kbfs://{url.split('://', 1)[1]}/{share_id}"
    page = urllib.request.urlopen(url + "/", timeout=5)
    assert page.status == 200 and b"<html" in page.read().lower()  # kbfs/web/ came with the wheel
    out = tmp_path / "got.bin"
    got = subprocess.run([installed.kbfs, "download", f"{base}/big.bin", "--no-local", "-o", str(out)],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == files["big.bin"]
    cat = subprocess.run([installed.kbfs, "cat", f"{base}/notes.txt", "--no-local"], env=env,
                         capture_output=True, cwd=tmp_path, timeout=60)
    assert cat.returncode == 0 and cat.stdout == files["notes.txt"], cat.stderr
    sha1 = hashlib.sha1(files["big.bin"]).hexdigest()
    code = f"""
import hashlib, fsspec, kbfs
with kbfs.open({base + '/big.bin'!r}, local=False) as f:
    f.seek(3 * 1048576 + 7)
    print(f.read(1000).hex())
with fsspec.open("sha1://{sha1}/big.bin", "rb", relays=[{url!r}]) as f:
    print(hashlib.sha1(f.read()).hexdigest())
"""
    run = subprocess.run([installed.python, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    part, whole = run.stdout.split()
    assert bytes.fromhex(part) == files["big.bin"][3 * MiB + 7: 3 * MiB + 1007]
    assert whole == sha1
