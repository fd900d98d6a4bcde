"""PRV pointer files: the `ml-prv-create` format (version 0.11) plus the kbfs block-tree key.

A pointer is untrusted input (it arrives by email, GitHub, Slack...), so parsing
caps its size and validates every field, raising `PointerError` with a message
that names the file and what is wrong. Writing reproduces the original tool's
bytes exactly (4-space-indented JSON, its key order) and adds one key,
`kbfs_tree`, which old readers ignore, and optionally `kbfs_sources`, a list of relay
URLs where the content may be found (source hints, `source_hints`; never trusted: every
byte is still verified, and a bad hint is dropped with one log line, never an error).

`digest_file` reads a file once, in large reads, computing SHA-1, the fcs
(`head1000-` + SHA-1 of the first 1000 bytes) and the block-tree root together. New
pointers get 64 KiB leaves (`DEFAULT_BLOCK_SIZE`, "v2": read in proved pieces); a caller
may name any power of two from 4 KiB to 1 GiB (1 MiB: the "v1" tree of older pointers).
This module does no networking and knows nothing of caches or shares.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blake3 import blake3

from kbfs import protocol, tree
from kbfs.errors import PointerError

PRV_VERSION = "0.11"
FCS_HEAD_BYTES = 1000
MAX_POINTER_BYTES = 64 * 1024
MAX_PRVDIR_BYTES = 64 * 1024 * 1024
MAX_PRVDIR_DEPTH = 64
READ_CHUNK = 16 * tree.BLOCK_SIZE
DEFAULT_BLOCK_SIZE = tree.DEFAULT_BLOCK_SIZE  # what `prv create` and `create_pointer` write
MIN_BLOCK_SIZE = 1 << 12  # the block sizes a pointer may name (docs/hash-tree.md)
MAX_BLOCK_SIZE = 1 << 30
_LEAF_PREFIX = b"\x00"  # leaf = BLAKE3(0x00 || block), as in kbfs.tree (hashed in parts here)

_SHA1_RE = re.compile(r"^[0-9a-fA-F]{40}$")
_ROOT_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_FCS_RE = re.compile(r"^head1000-[0-9a-fA-F]{40}$")
_MAX_SIZE = 1 << 62
SOURCES_KEY = "kbfs_sources"
MAX_SOURCES = 8  # hints read from one pointer; more are dropped
MAX_SOURCE_CHARS = 512

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeRef:
    """The `kbfs_tree` key: which tree algorithm, its block size and its root.

    BLOCK_SIZE defaults to the v1 1 MiB for callers that predate 64 KiB pointers; new code
    names it."""

    root: str
    block_size: int = tree.BLOCK_SIZE
    algorithm: str = tree.ALGORITHM


@dataclass(frozen=True)
class Pointer:
    """One file pointer. `tree` is None for pointers written by the original tools."""

    sha1: str
    size: int
    fcs: str = ""
    original_path: str = ""
    prv_version: str = PRV_VERSION
    tree: TreeRef | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> str:
        """The pointer as `ml-prv-create` writes it (plus `kbfs_tree` when present)."""
        return json.dumps(self.to_dict(), indent=4)

    def to_dict(self) -> dict[str, Any]:
        """The pointer's JSON object, keys in the original tool's order."""
        obj: dict[str, Any] = {
            "original_checksum": self.sha1,
            "original_size": self.size,
            "original_fcs": self.fcs,
            "original_path": self.original_path,
            "prv_version": self.prv_version,
        }
        obj.update(self.extra)
        if self.tree is not None:
            obj["kbfs_tree"] = {
                "algorithm": self.tree.algorithm,
                "block_size": self.tree.block_size,
                "root": self.tree.root,
            }
        return obj


    def source_hints(self) -> list[str]:
        """The pointer's `kbfs_sources`, validated (see `source_hints`)."""
        return source_hints(self.extra.get(SOURCES_KEY), self.original_path or self.sha1)

    def mirror_hints(self) -> list[str]:
        """The pointer's `kbfs_mirrors` (static mirrors, docs/mirrors.md), validated like
        `kbfs_sources` (`mirrorurl.mirror_hints`: a bad one is dropped with a log line)."""
        from kbfs import mirrorurl

        return mirrorurl.mirror_hints(self.extra.get(mirrorurl.MIRRORS_KEY),
                                      self.original_path or self.sha1)

    def with_sources(self, urls: list[str]) -> Pointer:
        """This pointer with `kbfs_sources` set to URLS (checked, normalised); an empty
        list removes the key."""
        extra = {k: v for k, v in self.extra.items() if k != SOURCES_KEY}
        clean = []
        for url in urls:
            problem, norm = source_problem(url)
            if problem is not None:
                raise PointerError(f"source hint {url[:80]!r}: {problem}")
            clean.append(norm)
        if clean:
            extra[SOURCES_KEY] = list(dict.fromkeys(clean))
        return Pointer(self.sha1, self.size, self.fcs, self.original_path, self.prv_version,
                       self.tree, extra)


def source_problem(url: object) -> tuple[str | None, str]:
    """(what is wrong with URL as a source hint or None, the normalised URL).

    A hint is a relay's base URL, by the one rule of `protocol.relay_base_problem` (no user
    name or password: a pointer must not carry credentials, nor make a reader send them),
    at most MAX_SOURCE_CHARS characters; `host:port` alone means http://."""
    if not isinstance(url, str):
        return "not a string", ""
    if len(url) > MAX_SOURCE_CHARS:
        return f"longer than {MAX_SOURCE_CHARS} characters", ""
    text = url.strip()
    problem, base = protocol.relay_base_problem(text if "://" in text else "http://" + text)
    return (problem, "") if problem else (None, base)


def source_hints(value: object, name: str = "<pointer>") -> list[str]:
    """The usable relay URLs of a `kbfs_sources` value: at most MAX_SOURCES, each valid
    (`source_problem`), normalised, no duplicates. Anything else is dropped with one log
    line: a hint only adds a place to look, so a bad one must never make a pointer fail."""
    if value is None:
        return []
    if not isinstance(value, list):
        log.warning("%s: ignoring %s (not a list)", name, SOURCES_KEY)
        return []
    out: list[str] = []
    dropped: list[str] = []
    for item in value:
        problem, norm = source_problem(item)
        if problem is not None:
            # Never echo a password a hint carried into a log.
            shown = re.sub(r"//[^/@]*@", "//***@", str(item))[:60]
            dropped.append(f"{shown!r} ({problem})")
        elif norm not in out:
            if len(out) >= MAX_SOURCES:
                dropped.append(f"{norm!r} (more than {MAX_SOURCES} hints)")
            else:
                out.append(norm)
    if dropped:
        log.warning("%s: ignoring source hints %s", name, ", ".join(dropped[:3])
                    + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else ""))
    return out


@dataclass
class PrvDir:
    """A directory pointer: `{"files": {name: pointer}, "dirs": {name: {...}}}`."""

    files: dict[str, Pointer] = field(default_factory=dict)
    dirs: dict[str, PrvDir] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": {name: p.to_dict() for name, p in self.files.items()},
            "dirs": {name: d.to_dict() for name, d in self.dirs.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=4)

    def with_sources(self, urls: list[str]) -> PrvDir:
        """A copy whose every file pointer carries URLS as `kbfs_sources`."""
        return PrvDir({n: p.with_sources(urls) for n, p in self.files.items()},
                      {n: d.with_sources(urls) for n, d in self.dirs.items()})

    def walk(self, prefix: str = "") -> Iterator[tuple[str, Pointer]]:
        """Every (relative path, pointer) below this folder, depth first."""
        for name, p in self.files.items():
            yield prefix + name, p
        for name, d in self.dirs.items():
            yield from d.walk(prefix + name + "/")


@dataclass(frozen=True)
class FileDigest:
    """What one pass over a file yields. `leaves` only when asked for (`keep_leaves`):
    a 1 TiB file has 16 M of them at 64 KiB."""

    sha1: str
    size: int
    fcs: str
    leaves: list[bytes] | None
    root: str
    block_size: int = DEFAULT_BLOCK_SIZE

    def pointer(self, original_path: str) -> Pointer:
        return Pointer(self.sha1, self.size, self.fcs, original_path, PRV_VERSION,
                       TreeRef(self.root, self.block_size))


# ---------------------------------------------------------------- parsing


def _fail(name: str, what: str) -> PointerError:
    return PointerError(f"{name}: {what}")


MAX_NAME_BYTES = 255  # NAME_MAX: the longest name a Linux folder entry can have


def entry_name_problem(entry: object) -> str | None:
    """What is wrong with ENTRY as one folder entry's name (of a .prvdir or a share's
    listing), or None when it is fine: it must be a non-empty string that is valid UTF-8
    (JSON can carry lone surrogates such as "\\ud800", which no file name can be), at
    most 255 bytes, without '/' or NUL, and not '.' or '..'."""
    if not isinstance(entry, str):
        return "not a string"
    if not entry or entry in (".", ".."):
        return f"invalid entry name {entry!r}"
    if "/" in entry or "\0" in entry:
        return f"invalid entry name {entry!r} (contains '/' or NUL)"
    try:
        size = len(entry.encode("utf-8"))
    except UnicodeEncodeError:
        return f"invalid entry name {entry!r} (not valid UTF-8)"
    if size > MAX_NAME_BYTES:
        return f"invalid entry name {entry[:40]!r}... ({size} bytes; at most {MAX_NAME_BYTES})"
    return None


def _check_name(name: str, entry: str) -> None:
    problem = entry_name_problem(entry)
    if problem is not None:
        raise _fail(name, problem)


def pointer_from_dict(obj: Any, name: str = "<pointer>") -> Pointer:
    """Validate a decoded JSON object as a file pointer."""
    if not isinstance(obj, dict):
        raise _fail(name, "not a JSON object")
    sha1 = obj.get("original_checksum")
    if not isinstance(sha1, str) or not _SHA1_RE.fullmatch(sha1):
        raise _fail(name, "original_checksum must be 40 hex digits")
    size = obj.get("original_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < _MAX_SIZE:
        raise _fail(name, "original_size must be a non-negative integer")
    fcs = obj.get("original_fcs", "")
    if not isinstance(fcs, str) or (fcs and not _FCS_RE.fullmatch(fcs)):
        raise _fail(name, "original_fcs must be 'head1000-' followed by 40 hex digits")
    path = obj.get("original_path", "")
    if not isinstance(path, str) or "\0" in path:
        raise _fail(name, "original_path must be a string")
    version = obj.get("prv_version", PRV_VERSION)
    if not isinstance(version, str):
        raise _fail(name, "prv_version must be a string")
    tree_ref = None
    if "kbfs_tree" in obj:
        t = obj["kbfs_tree"]
        if not isinstance(t, dict):
            raise _fail(name, "kbfs_tree must be an object")
        if t.get("algorithm") != tree.ALGORITHM:
            raise _fail(name, f"kbfs_tree.algorithm must be {tree.ALGORITHM!r}")
        bs = t.get("block_size")
        if isinstance(bs, bool) or not isinstance(bs, int) or not 4096 <= bs <= (1 << 30):
            raise _fail(name, "kbfs_tree.block_size must be an integer from 4096 to 2^30")
        root = t.get("root")
        if not isinstance(root, str) or not _ROOT_RE.fullmatch(root):
            raise _fail(name, "kbfs_tree.root must be 64 hex digits")
        tree_ref = TreeRef(root.lower(), bs)
    known = {"original_checksum", "original_size", "original_fcs", "original_path", "prv_version", "kbfs_tree"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return Pointer(sha1.lower(), size, fcs.lower() if fcs else "", path, version, tree_ref, extra)


def _decode(data: bytes | str, name: str, limit: int) -> Any:
    if len(data) > limit:
        raise _fail(name, f"larger than {limit} bytes; not a pointer")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _fail(name, f"not valid JSON ({exc})") from None


def parse_pointer(data: bytes | str, name: str = "<pointer>") -> Pointer:
    """Parse the bytes of a `.prv` file."""
    return pointer_from_dict(_decode(data, name, MAX_POINTER_BYTES), name)


def prvdir_from_dict(obj: Any, name: str = "<prvdir>", depth: int = 0,
                     on_bad_name: Callable[[str], None] | None = None) -> PrvDir:
    """Validate a decoded JSON object as a directory pointer.

    An entry with a bad name (see `entry_name_problem`) raises PointerError, unless
    ON_BAD_NAME is given: then that entry alone is left out and ON_BAD_NAME is called with
    one line naming it (the mount lists the rest of the folder rather than none of it)."""
    if depth > MAX_PRVDIR_DEPTH:
        raise _fail(name, f"nested deeper than {MAX_PRVDIR_DEPTH} folders")
    if not isinstance(obj, dict):
        raise _fail(name, "not a JSON object")
    files, dirs = obj.get("files", {}), obj.get("dirs", {})
    if not isinstance(files, dict) or not isinstance(dirs, dict):
        raise _fail(name, "'files' and 'dirs' must be objects")
    out = PrvDir()

    def good(entry: str) -> bool:
        problem = entry_name_problem(entry)
        if problem is None:
            return True
        if on_bad_name is None:
            raise _fail(name, problem)
        on_bad_name(f"{name}: skipping an entry: {problem}")
        return False

    for entry, value in files.items():
        if good(entry):
            out.files[entry] = pointer_from_dict(value, f"{name}: {entry}")
    for entry, value in dirs.items():
        if good(entry):
            out.dirs[entry] = prvdir_from_dict(value, f"{name}: {entry}/", depth + 1, on_bad_name)
    return out


def parse_prvdir(data: bytes | str, name: str = "<prvdir>",
                 on_bad_name: Callable[[str], None] | None = None) -> PrvDir:
    """Parse the bytes of a `.prvdir` file (ON_BAD_NAME: see `prvdir_from_dict`)."""
    return prvdir_from_dict(_decode(data, name, MAX_PRVDIR_BYTES), name, 0, on_bad_name)


def _read_capped(path: str | os.PathLike[str], limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise _fail(os.fspath(path), exc.strerror or str(exc)) from None
    if len(data) > limit:
        raise _fail(os.fspath(path), f"larger than {limit} bytes; not a pointer")
    return data


def load_pointer(path: str | os.PathLike[str]) -> Pointer:
    """Read and validate a `.prv` file."""
    return parse_pointer(_read_capped(path, MAX_POINTER_BYTES), os.fspath(path))


def load_prvdir(path: str | os.PathLike[str],
                on_bad_name: Callable[[str], None] | None = None) -> PrvDir:
    """Read and validate a `.prvdir` file (ON_BAD_NAME: see `prvdir_from_dict`)."""
    return parse_prvdir(_read_capped(path, MAX_PRVDIR_BYTES), os.fspath(path), on_bad_name)


# ---------------------------------------------------------------- hashing


def digest_file(
    path: str | os.PathLike[str], progress: Callable[[int], None] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE, keep_leaves: bool = False,
) -> FileDigest:
    """Read PATH once and return its SHA-1, fcs and tree root at BLOCK_SIZE (64 KiB pieces
    unless named; `tree.BLOCK_SIZE` for a v1 tree), and its leaves if KEEP_LEAVES.

    SHA-1 runs in a worker thread while this thread computes the BLAKE3 leaves of
    the same chunk (both release the GIL), so the pass costs about max(SHA-1, BLAKE3)
    rather than their sum. PROGRESS, if given, is called with each chunk's length.
    Any block size `check_block_size` accepts: a leaf is hashed incrementally, so a
    leaf may span reads (a short read, or blocks larger than a read) without a second pass.
    Leaves fold into the root as they come (`tree.TreeBuilder`): memory stays small for
    any file. One BLAKE3 call per 64 KiB leaf costs about what one per 1 MiB does here (the
    pass is bound by SHA-1; bench/bench_prv.py --block-size, docs/benchmarks.md).
    """
    check_block_size(block_size)
    # Imported here: loading OpenSSL's hashes costs ~2 ms of start-up that reading a
    # pointer (`kbfs download`, `kbfs prv info`) never needs.
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    sha1 = hashlib.sha1()
    leaves: list[bytes] | None = [] if keep_leaves else None
    builder = tree.TreeBuilder()
    head = b""
    size = 0
    bs = block_size
    partial = None  # the hasher of a leaf whose block began in an earlier read
    filled = 0      # bytes of that block hashed so far
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1) as pool:
        # A small file gets a small buffer: zeroing a 16 MiB buffer per file made
        # hashing a folder of small files ~50x slower. A buffer of a block or more stays a
        # whole number of blocks so that, with full reads, every leaf is hashed in one call.
        want = os.fstat(f.fileno()).st_size + 1
        if want >= bs:
            want = max(bs, min(READ_CHUNK, -(-want // bs) * bs)) if bs <= READ_CHUNK else READ_CHUNK
        buf = bytearray(want)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                break
            chunk = view[:n]
            if size < FCS_HEAD_BYTES:
                head += bytes(chunk[: FCS_HEAD_BYTES - size])
            # The worker thread only pays off for large chunks (its start-up costs
            # about as much as hashing 100 KB); small ones are hashed inline.
            job = pool.submit(sha1.update, chunk) if n >= tree.BLOCK_SIZE else None
            if job is None:
                sha1.update(chunk)
            pos = 0
            if partial is not None:  # finish the block a short read (or a huge block) split
                take = min(bs - filled, n)
                partial.update(chunk[:take])
                filled += take
                pos = take
                if filled == bs:
                    _add(builder, leaves, partial.digest())
                    partial, filled = None, 0
            whole = pos + (n - pos) // bs * bs
            for i in range(pos, whole, bs):
                _add(builder, leaves, tree.leaf_hash(chunk[i : i + bs]))
            if whole < n:
                partial = blake3(_LEAF_PREFIX)
                partial.update(chunk[whole:])
                filled = n - whole
            if job is not None:
                job.result()
            size += n
            if progress is not None:
                progress(n)
            if n < len(buf):
                # A regular file reads short only at its end: more after it means it grew.
                if f.read(1):
                    raise PointerError(f"{os.fspath(path)}: file grew or returned a short read while hashing")
                break
    if partial is not None or not builder.count:
        _add(builder, leaves, partial.digest() if partial is not None else tree.leaf_hash(b""))
    fcs = "head1000-" + hashlib.sha1(head).hexdigest()
    return FileDigest(sha1.hexdigest(), size, fcs, leaves, builder.root(size, bs), bs)


def _add(builder: tree.TreeBuilder, leaves: list[bytes] | None, leaf: bytes) -> None:
    builder.add(leaf)
    if leaves is not None:
        leaves.append(leaf)


def check_block_size(block_size: object) -> int:
    """BLOCK_SIZE when it is a tree block size kbfs writes: a power of two from
    MIN_BLOCK_SIZE (4 KiB) to MAX_BLOCK_SIZE (1 GiB); PointerError naming it otherwise."""
    if (isinstance(block_size, bool) or not isinstance(block_size, int)
            or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
            or block_size & (block_size - 1)):
        raise PointerError(f"block size {block_size!r}: must be a power of two from "
                           f"{MIN_BLOCK_SIZE} to 2^30 (65536 for 64 KiB pieces, the "
                           f"default; {tree.BLOCK_SIZE} for 1 MiB blocks)")
    return block_size


def create_pointer(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> Pointer:
    """Hash PATH and return its pointer (original_path is the absolute path), its tree
    at BLOCK_SIZE (64 KiB pieces by default; `tree.BLOCK_SIZE` for a v1 1 MiB tree)."""
    return digest_file(path, progress, block_size).pointer(os.path.abspath(path))


def create_prvdir(
    path: str | os.PathLike[str],
    progress: Callable[[int], None] | None = None,
    on_file: Callable[[str], None] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> PrvDir:
    """Hash every regular, non-hidden file below PATH into a directory pointer (trees at
    BLOCK_SIZE)."""
    out = PrvDir()
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            out.dirs[entry.name] = create_prvdir(entry.path, progress, on_file, block_size)
        elif entry.is_file(follow_symlinks=False):
            if on_file is not None:
                on_file(entry.path)
            out.files[entry.name] = create_pointer(entry.path, progress, block_size)
    return out


def file_matches(path: str | os.PathLike[str], pointer: Pointer) -> tuple[bool, str]:
    """Check a local file against a pointer: (ok, reason when not)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return False, f"{os.fspath(path)}: {exc.strerror}"
    if st.st_size != pointer.size:
        return False, f"size is {st.st_size}, the pointer says {pointer.size}"
    digest = digest_file(path, block_size=pointer.tree.block_size if pointer.tree else tree.BLOCK_SIZE)
    if digest.sha1 != pointer.sha1:
        return False, f"SHA-1 is {digest.sha1}, the pointer says {pointer.sha1}"
    if pointer.tree is not None and digest.root != pointer.tree.root:
        return False, f"block tree root is {digest.root}, the pointer says {pointer.tree.root}"
    return True, ""
