"""Folders as sources: listing them (`kbfs ls`) and downloading them whole (`kbfs download`
of a folder).

A folder source is one of:

    DIR                              a local folder of .prv / .prvdir pointers (recursively)
    NAME.prvdir                      a folder pointer
    kbfs://HOST:PORT/SHARE_ID[/PATH] a share, or a folder of it, as its relay lists it
                                     (kbfs+https://HOST[:PORT]/... on an https relay)
    kbfs://HOST:PORT/, kbfs+https://HOST[:PORT]/ or http(s)://HOST:PORT
                                     a relay: the shares it lists (`ls` only)

`list_folder` returns one level as `Entry`s; `walk_files` every file below, with the
pointer that names it; `download_folder` writes them under a target folder through
`client.Client.download` (each file verified, resumed from its part file, a complete file
whose size, SHA-1 and root match skipped), with one progress callback over all bytes.

Entry names come from untrusted listings and pointers: every path component is checked
again here (`prv.entry_name_problem`: no '/', '..', NUL...) and every target path must stay
inside the target folder, so a hostile .prvdir or listing can never write elsewhere. This
module does not print; `cli_ls` and `cli_get` do.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kbfs import config, kbfsurl, prv
from kbfs.client import Client, Resolved, parse_kbfs_uri
from kbfs.errors import BadRequest, KbfsError, NotFound, SourceError, SourceUnavailable

log = logging.getLogger(__name__)

SHARES_LIMIT = 8 << 20  # bytes of a relay's /api/shares answer read at most


@dataclass
class Entry:
    """One listed name: a file (with its size and, when known, its pointer) or a folder."""

    name: str
    is_dir: bool
    size: int | None = None
    mtime: float | None = None
    pointer: prv.Pointer | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. a share's name and file count

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": "directory" if self.is_dir else "file",
                               "size": self.size, "mtime": self.mtime}
        if self.pointer is not None:
            out["sha1"] = self.pointer.sha1
        out.update(self.info)
        return out


@dataclass
class FolderResult:
    """What `download_folder` did."""

    target: str
    files: int = 0
    bytes: int = 0
    skipped: int = 0  # complete and matching already
    failed: list[str] = field(default_factory=list)  # "path: why"


def _is_relay_url(source: str) -> bool:
    if source.startswith(("http://", "https://")):
        return True
    return kbfsurl.names_relay(source)


def is_folder_source(c: Client, source: str) -> bool:
    """Whether SOURCE names a folder (a local folder, a .prvdir, a share or a folder of
    one) rather than one file."""
    if kbfsurl.is_link(source):
        if _is_relay_url(source):
            return True
        relay, share, relpath = parse_kbfs_uri(source)
        if not relpath or source.endswith("/"):
            return True
        parent, _, name = relpath.rpartition("/")
        try:
            listing = c.list_share(relay, share, parent)
        except KbfsError:
            return False  # let reading it as a file say what is wrong
        return name in (listing.get("dirs") or [])
    if "://" in source:
        return False
    return os.path.isdir(source) or (source.endswith(".prvdir") and os.path.isfile(source))


# ---------------------------------------------------------------- one level


def list_folder(c: Client, source: str) -> list[Entry]:
    """The entries of folder SOURCE, folders first then files, each sorted by name."""
    if _is_relay_url(source):
        entries = _relay_shares(c, source)
    elif kbfsurl.is_link(source):
        relay, share, relpath = parse_kbfs_uri(source)
        entries = _share_entries(c, relay, share, relpath)
    elif source.endswith(".prvdir") and os.path.isfile(source):
        entries = _prvdir_entries(prv.load_prvdir(source))
    elif os.path.isdir(source):
        entries = _local_entries(source)
    elif os.path.isfile(source) and source.endswith(".prv"):
        p = prv.load_pointer(source)
        name = os.path.basename(source)[: -len(".prv")]
        entries = [Entry(name, False, p.size, None, p)]
    elif os.path.exists(source):
        raise BadRequest(f"{source}: not a folder of pointers, a .prvdir or a .prv")
    else:
        raise NotFound(f"{source}: no such folder or pointer")
    return sorted(entries, key=lambda e: (not e.is_dir, e.name))


def _relay_shares(c: Client, source: str) -> list[Entry]:
    """The relay's shares: the public ones, and each private one a token given for this
    relay opens (the relay lists a private share only to its own token)."""
    relay = (kbfsurl.parse(source, want_share=False).relay if kbfsurl.is_link(source)
             else config.normalize_relay(source.rstrip("/")))
    tokens = c.settings.tokens_for([relay], (relay,)).get(relay, ())
    seen: dict[str, Entry] = {}
    for token in (None, *tokens):
        for entry in _shares_answer(relay, token):
            seen.setdefault(entry.name, entry)
    return list(seen.values())


def _shares_answer(relay: str, token: str | None) -> list[Entry]:
    import json

    import requests

    from kbfs import tlsconf  # here, not at the top: it loads requests (a cached download never needs it)

    url = relay + "/api/shares"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with tlsconf.session().get(url, timeout=10, stream=True, allow_redirects=False,
                                   headers=headers) as r:
            body = r.raw.read(SHARES_LIMIT + 1, decode_content=True)
            status = r.status_code
    except requests.RequestException as exc:
        raise SourceUnavailable(tlsconf.advice(exc, f"relay {relay}")
                                or f"relay {relay} is unreachable ({type(exc).__name__})") from None
    if status != 200:
        raise SourceError(f"relay {relay}: HTTP {status} for its list of shares")
    if len(body) > SHARES_LIMIT:
        raise SourceError(f"relay {relay}: its list of shares is larger than {SHARES_LIMIT} bytes")
    try:
        shares = json.loads(body)
    except ValueError:
        raise SourceError(f"relay {relay}: its list of shares is not JSON") from None
    out = []
    for s in shares if isinstance(shares, list) else []:
        if not isinstance(s, dict) or not isinstance(s.get("id"), str):
            continue
        size = s.get("bytes")
        since = s.get("connected_since")
        out.append(Entry(s["id"], True, size if isinstance(size, int) else None,
                         float(since) if isinstance(since, (int, float)) else None,
                         info={"share_name": str(s.get("name", ""))[:200],
                               "files": s.get("files"), "private": bool(s.get("private")),
                               "url": kbfsurl.link(relay, s["id"])}))
    return out


def _share_entries(c: Client, relay: str, share: str, relpath: str) -> list[Entry]:
    listing = c.list_share(relay, share, relpath)
    out = [Entry(d, True) for d in listing.get("dirs") or []]
    for f in listing.get("files") or []:
        try:
            p = prv.pointer_from_dict(f.get("prv"), f"{relpath}/{f['name']}")
        except KbfsError as exc:
            log.warning("skipping %s: %s", f.get("name"), exc)
            continue
        out.append(Entry(str(f["name"]), False, int(f["size"]), float(f.get("mtime") or 0) or None,
                         p))
    return out


def _prvdir_entries(d: prv.PrvDir) -> list[Entry]:
    return [Entry(n, True) for n in d.dirs] + [
        Entry(n, False, p.size, None, p) for n, p in d.files.items()]


def _local_entries(folder: str) -> list[Entry]:
    out = []
    with os.scandir(folder) as it:
        for e in it:
            try:
                if e.is_dir():
                    out.append(Entry(e.name, True, None, e.stat().st_mtime))
                elif e.name.endswith(".prvdir") and e.is_file():
                    out.append(Entry(e.name[: -len(".prvdir")], True, None, e.stat().st_mtime))
                elif e.name.endswith(".prv") and e.is_file():
                    p = prv.load_pointer(e.path)
                    out.append(Entry(e.name[: -len(".prv")], False, p.size, e.stat().st_mtime, p))
            except (KbfsError, OSError) as exc:
                log.warning("skipping %s: %s", e.path, exc)
    return out


# ---------------------------------------------------------------- every file below


def _checked(rel: str) -> str:
    """REL ('/'-separated, relative) after checking each component is one safe name."""
    parts = rel.split("/")
    for part in parts:
        problem = prv.entry_name_problem(part)
        if problem is not None:
            raise BadRequest(f"{rel[:200]!r}: {problem}; nothing downloaded")
    return "/".join(parts)


def walk_files(c: Client, source: str) -> Iterator[tuple[str, Resolved]]:
    """(relative path, resolved content) of every file below folder SOURCE."""
    if kbfsurl.is_link(source) and not _is_relay_url(source):
        relay, share, relpath = parse_kbfs_uri(source)
        yield from _walk_share(c, relay, share, relpath.strip("/"), "")
    elif source.endswith(".prvdir") and os.path.isfile(source):
        for rel, p in prv.load_prvdir(source).walk():
            yield _checked(rel), c.resolve_pointer(p, posixpath.basename(rel))
    elif os.path.isdir(source):
        yield from _walk_local(c, source, "")
    else:
        raise BadRequest(f"{source}: not a folder to download (a folder of pointers, a "
                         ".prvdir, or kbfs[+https]://HOST:PORT/SHARE_ID/FOLDER/)")


def _walk_share(c: Client, relay: str, share: str, path: str, prefix: str
                ) -> Iterator[tuple[str, Resolved]]:
    for e in _share_entries(c, relay, share, path):
        rel = _checked(prefix + e.name)
        if e.is_dir:
            sub = f"{path}/{e.name}" if path else e.name
            yield from _walk_share(c, relay, share, sub, rel + "/")
        elif e.pointer is not None:
            yield rel, c.resolve_pointer(e.pointer, e.name, (relay,))


def _walk_local(c: Client, folder: str, prefix: str) -> Iterator[tuple[str, Resolved]]:
    for e in sorted(os.scandir(folder), key=lambda x: x.name):
        if e.is_dir():
            yield from _walk_local(c, e.path, _checked(prefix + e.name) + "/")
        elif e.name.endswith(".prvdir") and e.is_file():
            base = _checked(prefix + e.name[: -len(".prvdir")]) + "/"
            for rel, p in prv.load_prvdir(e.path).walk():
                yield _checked(base + rel), c.resolve_pointer(p, posixpath.basename(rel))
        elif e.name.endswith(".prv") and e.is_file():
            rel = _checked(prefix + e.name[: -len(".prv")])
            yield rel, c.resolve_pointer(prv.load_pointer(e.path), posixpath.basename(rel))


# ---------------------------------------------------------------- download


def _inside(root: str, rel: str) -> str:
    """ROOT/REL, refused unless its real path stays inside ROOT (a symlink planted in the
    target folder must not carry a write elsewhere)."""
    target = os.path.join(root, *rel.split("/"))
    parent = os.path.realpath(os.path.dirname(target))
    if os.path.commonpath([parent, os.path.realpath(root)]) != os.path.realpath(root):
        raise BadRequest(f"{rel[:200]!r}: would be written outside {root}")
    return target


def download_folder(
    c: Client, source: str, out: str, *, local: bool = True, workers: int = 2,
    on_total: Callable[[int, int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    files: list[tuple[str, Resolved]] | None = None,
) -> FolderResult:
    """Download every file of folder SOURCE under OUT (created), keeping relative paths.

    The whole list is made (and every name checked) before anything is written, so a bad
    name in a hostile listing stops the download before its first byte. ON_TOTAL(files,
    bytes) is called once with the totals; PROGRESS(n) with every n bytes done (complete
    files skipped count as done). One file's failure does not stop the others; they are
    in `failed`, and a rerun resumes them. FILES: `walk_files(c, SOURCE)` if already made.
    """
    if files is None:
        files = list(walk_files(c, source))
    seen: dict[str, str] = {}
    for rel, _ in files:
        if rel in seen:
            raise BadRequest(f"{rel[:200]!r}: named twice in {source}; nothing downloaded")
        seen[rel] = rel
    for rel, _ in files:  # a name that is both a file and a folder
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise BadRequest(f"{'/'.join(parts[:i])[:200]!r} is both a file and a folder "
                                 f"in {source}; nothing downloaded")
    total = sum(r.ref.size for _, r in files)
    if on_total is not None:
        on_total(len(files), total)
    root = os.path.abspath(out)
    os.makedirs(root, exist_ok=True)
    result = FolderResult(root, len(files), total)
    for rel, r in files:
        try:
            target = _inside(root, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isfile(target) and not os.path.islink(target) and c.is_copy(target, r.ref):
                result.skipped += 1
                if progress is not None:
                    progress(r.ref.size)
                continue
            c.download(r, target, local=local, workers=workers, progress=progress)
        except KbfsError as exc:
            result.failed.append(f"{rel}: {exc}")
            log.warning("%s: %s", rel, exc)
        except OSError as exc:
            result.failed.append(f"{rel}: {exc.strerror or exc}")
    return result
