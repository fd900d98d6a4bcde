"""Fetch verified blocks of content, by SHA-1, from an ordered list of sources.

A `Fetcher` knows where content can be had and gets byte ranges of it:

- local candidates (`add_local_candidate`: a file believed to hold the content, e.g. a
  pointer's `original_path`), checked once by size and then trusted only block by block;
- each relay's own `{relay}/sha1/{sha1}`, in the order given;
- direct share URLs (a share's `--listen` URL) that a relay's `GET /api/find/{sha1}`
  lists (asked once per relay, the answer kept for a while). Each is validated first
  (`sourceurls.direct_base`: http or https, a host and port, no userinfo, no query, no
  fragment, a path ending in `/sha1/{sha1}`, at most `MAX_URL` characters); the /sha1/
  and /tree/ URLs used are built from the validated base, never taken as given. A bad one is skipped with
  one log line. `direct=False` (config `direct`, env `KBFS_DIRECT=0`) ignores them all:
  only the relays' own URLs are contacted.

- static mirrors (`kbfs.mirrorsource`, docs/mirrors.md): entries of RELAYS marked
  `mirrorurl.mark`, kept in their place in the list (the user's order of mirrors and
  relays), and the mirrors a relay's /api/find lists, just before that relay. A mirror is
  read as static objects: `fetch_blocks` Range-GETs its data object, `fetch_tree` reads the
  leaf list from its outboard, `fetch_pieces` builds the proof from its stored nodes
  (`Target.read_pieces`). It never gets a token. Its health is kept under `mirror URL`.

That is the order for a source nothing is known of. What the Fetcher has seen moves
sources (per origin, `scheme://host:port`): an origin that has delivered verified data
(blocks that matched their leaves, or a tree that matched a known root) goes before
every unproven one; an origin that failed goes behind every healthy one for `PENALTY`
seconds, and one that sent bytes failing verification loses its proof and goes last of
all for `LIE_PENALTY` seconds. So a direct URL never gets first place on a share's say-so:
it has to deliver verified bytes first (as the fallback when the relay fails or is slow to
start). Any order is safe for the bytes of a pointer with a root (every block is checked
against leaves that hash up to it); for a root-less pointer the first tree taken is trusted
until the whole-file SHA-1 is checked (`kbfs.cache`), which is why relays the user
configured rank before URLs a share advertised, and a root-less tree is asked of the
relays before any direct URL, even a proven one.

`fetch_blocks` makes one HTTP range request per attempt, streams the body into one
preallocated buffer (no per-chunk copies), checks 206 + Content-Range, and verifies every
block against its leaf while streaming. A source that fails or lies gets one warning
naming the sha1 and the source, goes to the back of the order for a while (it comes
back by itself), and the next source continues from the first block not yet verified. The
whole call is bounded by `deadline`. A source must start its answer (status line and
headers) within `first_byte_timeout` seconds (a silent share behind a relay would
otherwise hold each read for the relay's 20 s start timeout); when a round over the
sources ended with some abandoned that way, one more round gives each the full `timeout`,
so a source that is merely slow still serves. A stalled or trickling body is abandoned by
a read timeout and a minimum-throughput check. A refused TLS certificate is not transient: a round whose
failures were all refused certificates ends the call at once, with the certificate's line.

Answers that are not content are read with a bound and streamed, never taken whole: a
tree at most its expected `leaves * 32` bytes, an /api/find answer at most `FIND_LIMIT`, a
listing at most `LIST_LIMIT`; a larger answer (or a Content-Length announcing one) is
refused with one error naming the source, before its body is read.

What it does not do: it never stores anything (that is `kbfs.cache`), never imports
`kbfs.cache` (it satisfies `cache.BlockSource` structurally), verifies a tree against a root
only when the caller passes one (to skip a source serving a wrong tree), and does not search
`local_dirs` by content (they are accepted for the interface; nothing maps a sha1 to a
file name there without an index).

Does not hedge (run two sources at once for one range): a slow start costs at most
`first_byte_timeout` per source; the relay hedges between the shares behind it.

Blocking; meant to be called from worker threads. Range requests and other GETs to a
plain-http origin without a proxy go over one keep-alive `http.client` connection per
thread and origin (requests' per-request machinery cost more CPU than a 4 KiB read);
https, proxies and userinfo URLs go through `requests` (one `Session` per thread); that
plumbing, and reading answers with bounds, is `kbfs.httpread`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from kbfs import mirrorsource, mirrorurl, osio, piecewire, proof, protocol, tree
from kbfs.errors import (
    AccessDenied,
    BadRequest,
    NotFound,
    SourceError,
    SourceUnavailable,
    VerificationError,
)
from kbfs.httpread import (  # noqa: F401 - moved there; still importable from here
    ERROR_LIMIT,
    MIN_THROUGHPUT,
    POOL_SIZE,
    READ_CHUNK,
    THROUGHPUT_GRACE,
    AnswerTooLarge,
    HttpPlumbing,
    Unreachable,
    _Failed,
    _Lie,
    _net_why,
    _reason,
    _short,
    _SlowAnswer,
    _SlowStart,
)
from kbfs.sourceurls import MAX_URL, direct_base  # noqa: F401 - moved there; still importable from here
from kbfs.sourceurls import origin as _origin
from kbfs.sourceurls import tree_url as _tree_url

log = logging.getLogger(__name__)

RETRY_WINDOW = 5.0       # seconds (at most half the deadline) of retry rounds after transient failures
FIND_TTL = 300.0          # seconds an /api/find answer is reused
FIND_FAIL_TTL = 15.0      # seconds a failed /api/find is not asked again
PENALTY = 10.0            # seconds a failed source stays at the back of the order
LIE_PENALTY = 300.0       # seconds a source that failed verification stays last of all
FIRST_BYTE_TIMEOUT = 3.0  # seconds a source may take to start answering (first round)
FIND_LIMIT = 4 << 20      # bytes of an /api/find answer: a few hundred bytes per share holding
                          # the content; as big as the largest control message a relay takes
LIST_LIMIT = 64 << 20     # bytes of a folder listing: ~0.5 KB per file (its pointer with root),
                          # so about 100,000 files in one folder
LOCAL_TREE_LIMIT = 1 << 30  # hash a local candidate for its tree before asking the
                            # network only when it is at most this big
CERT_REFUSED = "is unreachable (TLS certificate refused"  # how httpread._net_why says it
NOPROOF_TTL = 60.0        # seconds an origin that answered a piece request without a proof
                          # goes after every other for pieces (it still serves fetch_blocks)


@dataclass(frozen=True)
class FindResult:
    """A relay's answer to /api/find/{sha1}."""

    relay: str
    size: int
    urls: list[str]
    shares: list[dict[str, Any]] = field(default_factory=list)
    token: str | None = None  # the token the question was asked with (None: none)
    mirrors: list[str] = field(default_factory=list)  # mirrors the relay advertises (checked)


@dataclass
class _Stats:
    bytes: int = 0
    seconds: float = 0.0
    errors: int = 0
    requests: int = 0
    lies: int = 0
    proofs: int = 0       # piece answers verified by their proof (fetch_pieces)
    proof_bytes: int = 0  # bytes of those proofs' nodes


class _NoProofAnswer(Exception):
    """A source answered a piece request without a Kbfs-Proof (not a lie: it cannot prove)."""


@dataclass(frozen=True)
class _Source:
    url: str          # full URL of the content, or a local file path
    key: str          # what health and statistics are kept under
    local: bool = False
    direct: bool = False  # a URL a share advertised (through /api/find), not a relay's own
    auth: str | None = None  # the bearer token sent with requests to it, if any
    mirror: mirrorsource.Target | None = None  # a static mirror (kbfs.mirrorsource); no auth


class Fetcher(HttpPlumbing):
    """Ordered sources with failover; implements `kbfs.cache.BlockSource`."""

    def __init__(self, relays: Sequence[str], *, timeout: float = 10.0, deadline: float = 30.0,
                 local_dirs: Sequence[str] = (), direct: bool = True,
                 first_byte_timeout: float = FIRST_BYTE_TIMEOUT,
                 tokens: Mapping[str, Sequence[str]] | None = None) -> None:
        # RELAYS may hold mirrors (`mirrorurl.mark`ed): the order of both is the user's.
        self.relays, self._order = mirrorsource.split([r.rstrip("/") for r in relays])
        # relay URL -> bearer tokens that may be sent to it (`config.Settings.tokens_for`
        # decides; see "Tokens" in the module docstring). Never sent anywhere else but to a
        # direct URL /api/find says is the token's own share's.
        self._tokens: dict[str, tuple[str, ...]] = {
            r.rstrip("/"): tuple(dict.fromkeys(ts)) for r, ts in (tokens or {}).items() if ts}
        self._share_of: dict[str, str] = {}  # sha1 -> the share a kbfs:// URL named for it
        self.timeout = timeout
        self.deadline = deadline
        self.direct = direct  # use direct share URLs from /api/find at all
        self.first_byte_timeout = min(first_byte_timeout, timeout)
        self.local_dirs = list(local_dirs)
        self.min_throughput = MIN_THROUGHPUT
        self._lock = threading.Lock()
        self._local: dict[str, list[str]] = {}
        self._local_checked: dict[tuple[str, str], tuple[int, int] | None] = {}
        self._find_cache: dict[tuple[str, str], tuple[float, FindResult | None]] = {}
        self._find_refused: dict[str, str] = {}  # relay -> its last find's refused certificate
        self._failed_at: dict[str, float] = {}
        self._lied_at: dict[str, float] = {}
        self._proven: set[str] = set()  # origins that delivered verified data
        self._noproof_at: dict[str, float] = {}  # origin -> when it answered pieces unproven
        self._bad_urls: set[str] = set()  # direct URLs refused (logged once each)
        self._stats: dict[str, _Stats] = {}
        self._last: dict[str, str] = {}
        self._tls = threading.local()
        self._sessions: list[requests.Session] = []
        self._proxies: dict[str, dict[str, str]] = {}
        self._plain: list[dict[str, http.client.HTTPConnection]] = []  # every thread's

    # ---- sources
    def add_local_candidate(self, sha1: str, path: str) -> None:
        """Remember PATH as a file that may hold SHA1 (checked by size on first use)."""
        sha1 = protocol.check_sha1(sha1)
        with self._lock:
            paths = self._local.setdefault(sha1, [])
            if path not in paths:
                paths.append(path)

    def _local_sources(self, sha1: str, size: int) -> list[_Source]:
        with self._lock:
            paths = list(self._local.get(sha1, ()))
        out = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_size != size:
                # A file replaced by other content of another size: not a candidate.
                key = (sha1, path)
                if self._local_checked.get(key, ()) is not None:
                    log.warning("local candidate %s for %s has %d bytes, expected %d",
                                path, sha1, st.st_size, size)
                    self._local_checked[key] = None
                continue
            out.append(_Source(path, "file:" + path, local=True))
        return out

    # ---- tokens
    def prefer_share(self, sha1: str, share: str) -> None:
        """SHA1 was named through SHARE (a kbfs:// URL): requests about it carry the token
        of that share, if any, and no other."""
        sha1 = protocol.check_sha1(sha1)
        with self._lock:
            self._share_of[sha1] = protocol.check_share_id(share)

    def token_for_share(self, relay: str, share: str) -> str | None:
        """The token for SHARE among those that may go to RELAY, or None."""
        for token in self._tokens.get(relay.rstrip("/"), ()):
            if _token_share(token) == share:
                return token
        return None

    def has_tokens(self) -> bool:
        return bool(self._tokens)

    def _relay_auth(self, relay: str, sha1: str, until: float) -> str | None:
        """The token for requests about SHA1 to RELAY: the one of the share SHA1 was named
        through; else the only one there is; else the one /api/find found it with."""
        tokens = self._tokens.get(relay, ())
        if not tokens:
            return None
        with self._lock:
            share = self._share_of.get(sha1)
        if share is not None:
            return self.token_for_share(relay, share)
        if len(tokens) == 1:
            return tokens[0]
        found = self._find_at(relay, sha1, until, cached_only=(
            time.monotonic() >= until or self._penalised(_origin(relay))))
        return found.token if found is not None and found.token else tokens[0]

    def find(self, sha1: str) -> FindResult | None:
        """Size and URLs of SHA1 from the first relay that knows it (answers kept a while)."""
        sha1 = protocol.check_sha1(sha1)
        for relay in self.relays:
            res = self._find_at(relay, sha1, time.monotonic() + self.timeout)
            if res is not None:
                return res
        with self._lock:
            refused = [f"relay {r} {self._find_refused[r]}" for r in self.relays
                       if r in self._find_refused]
        if refused and len(refused) == len(self.relays):
            # Not "nobody knows it": nobody could be asked, and a retry would not change that.
            raise SourceUnavailable(f"cannot ask where sha1 {sha1} is: " + "; ".join(refused))
        return None

    def _find_at(self, relay: str, sha1: str, until: float,
                 cached_only: bool = False) -> FindResult | None:
        now = time.monotonic()
        with self._lock:
            hit = self._find_cache.get((relay, sha1))
        if hit is not None and hit[0] > now:
            return hit[1]
        if cached_only:
            return None
        result: FindResult | None = None
        ttl = FIND_FAIL_TTL
        refused = ""
        # A private share answers only a question carrying its token, and one request
        # carries one: each token that may go to this relay is tried in turn (only the
        # one of the share SHA1 was named through, when that is known) until one finds it.
        tokens: list[str | None] = list(self._tokens.get(relay, ())) or [None]
        with self._lock:
            share = self._share_of.get(sha1)
        if share is not None:
            tokens = [self.token_for_share(relay, share)]
        for auth in tokens:
            try:
                t = max(0.1, min(self.timeout, until - time.monotonic()))
                status, raw = self._get_small(relay + protocol.FIND_PATH.format(sha1=sha1), t,
                                              FIND_LIMIT, auth=auth)
                if status == 200:
                    body = json.loads(raw)
                    if body.get("found"):
                        urls = [u for u in body.get("urls", []) if isinstance(u, str)]
                        shares = [e for e in body.get("shares", []) if isinstance(e, dict)]
                        result = FindResult(relay, int(body.get("size", 0)), urls, shares, auth,
                                            mirrorurl.mirror_hints(body.get("mirrors"), relay))
                        ttl = FIND_TTL
                        break
                    ttl = FIND_TTL / 10
                elif status == 404:
                    ttl = FIND_TTL / 10
            except AnswerTooLarge as exc:
                log.warning("find %s at %s refused: %s", sha1, relay, exc)
                break
            except (requests.RequestException, ValueError, TypeError) as exc:
                log.debug("find %s at %s failed: %s", sha1, relay, exc)
                if isinstance(exc, Unreachable) and _cert_refused(str(exc)):
                    refused = str(exc)
                break
        with self._lock:
            self._find_cache[(relay, sha1)] = (now + ttl, result)
            if refused:
                self._find_refused[relay] = refused
            else:
                self._find_refused.pop(relay, None)
        return result

    def _sources(self, sha1: str, size: int, until: float,
                 ask_find: Collection[str] | None = None) -> list[_Source]:
        """Every source in preference order (see the module docstring and `_rank`).

        ASK_FIND None: /api/find is asked of every relay not penalised (the direct URLs it
        lists join the list); else only of the relays in ASK_FIND, the others' answers
        taken only when cached (`()`: no round trip at all)."""
        sources = self._local_sources(sha1, size)
        seen = {s.url for s in sources}
        suffix = protocol.SHA1_PATH.format(sha1=sha1)
        own = [_Source(relay + suffix, _origin(relay), auth=self._relay_auth(relay, sha1, until))
               if m is None else _mirror_source(m, sha1) for relay, m in self._order]
        seen.update(s.url for s in own)
        advertised: list[_Source] = []
        listed: dict[str, list[_Source]] = {}  # relay's /sha1/ URL -> mirrors it advertises
        for relay in self.relays:
            if not self.direct:
                break
            # A relay that failed a moment ago is not asked again, but what it said stands:
            # the direct URLs it listed are the fallback while it is down.
            found = self._find_at(relay, sha1, until, cached_only=(
                time.monotonic() >= until or (self._penalised(_origin(relay)) if ask_find is None
                                              else relay not in ask_find)))
            listed[relay + suffix] = [_mirror_source(mirrorsource.mirror_for(u), sha1)
                                      for u in (found.mirrors if found else ())]
            for url in found.urls if found else []:
                base, why = direct_base(url, sha1)
                if base is None:
                    with self._lock:
                        new = url not in self._bad_urls and len(self._bad_urls) < 1024
                        if new:
                            self._bad_urls.add(url)
                    if new:
                        log.warning("%s: not using the URL %.200r listed by %s: %s",
                                    sha1, url, relay, why)
                    continue
                if base + suffix not in seen:
                    seen.add(base + suffix)
                    advertised.append(_Source(base + suffix, _origin(base), direct=True,
                                              auth=_direct_auth(found, base, sha1) if found else None))
        # A relay's mirrors go just before it (the relay asks readers to use them first).
        own = [x for s in own for x in (*listed.get(s.url, ()), s)]
        own = [s for i, s in enumerate(own) if all(s.key != t.key for t in own[:i])]
        # sorted() is stable: within one rank the order above holds.
        return sorted(sources + own + advertised, key=self._rank)

    def _rank(self, src: _Source) -> int:
        """0 local, 1 proven, 2 a relay's own URL, 3 an advertised URL; 4 failed a moment
        ago, 5 failed verification (last, for LIE_PENALTY seconds)."""
        now = time.monotonic()
        with self._lock:
            lied = self._lied_at.get(src.key)
            failed = self._failed_at.get(src.key)
            proven = src.key in self._proven
        if lied is not None and now - lied < LIE_PENALTY:
            return 5
        if failed is not None and now - failed < PENALTY:
            return 4
        if src.local:
            return 0
        if proven:
            return 1
        return 3 if src.direct else 2

    def _penalised(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            at = self._failed_at.get(key)
            lied = self._lied_at.get(key)
        return ((at is not None and now - at < PENALTY)
                or (lied is not None and now - lied < LIE_PENALTY))

    def _record(self, key: str, ok: bool, nbytes: int = 0, seconds: float = 0.0,
                lie: bool = False, proven: bool = False) -> None:
        """Count one request of KEY; PROVEN: it delivered data that was verified."""
        with self._lock:
            st = self._stats.setdefault(key, _Stats())
            st.requests += 1
            st.bytes += nbytes
            st.seconds += seconds
            if ok:
                self._failed_at.pop(key, None)
            else:
                st.errors += 1
                st.lies += lie
                self._failed_at[key] = time.monotonic()
            if lie:
                self._lied_at[key] = time.monotonic()
                self._proven.discard(key)
            elif proven:
                self._proven.add(key)


    # ---- trees
    def fetch_tree(self, sha1: str, size: int, block_size: int = tree.BLOCK_SIZE,
                   root: str | None = None) -> bytes:
        """The raw leaves blob of SHA1 from the first source giving the right length
        (block_count * 32) and, when ROOT is given, leaves that hash up to ROOT: a source
        serving a wrong tree is counted as a lie and the next one is asked."""
        sha1 = protocol.check_sha1(sha1)
        want = tree.block_count(size, block_size) * tree.LEAF_BYTES
        until = time.monotonic() + self.deadline
        sources = self._sources(sha1, size, until)
        local = [s for s in sources if s.local]
        remote = [s for s in sources if not s.local]
        if root is None:
            # A root-less tree is taken on trust (until the whole-file SHA-1 is checked):
            # the relays the user chose are asked before any URL a share advertised, even
            # one that proved itself on other content. Penalised sources stay behind.
            remote.sort(key=lambda s: (self._rank(s) >= 4, s.direct))
        # Hashing a local copy reads all of it: worth it first only for modest files.
        order = local + remote if size <= LOCAL_TREE_LIMIT else remote + local
        reasons = []
        lied = 0
        statuses: list[int] = []  # of the sources that answered with an error status
        seen_trees: set[str] = set()
        # (source, patient): a source that did not start answering within
        # first_byte_timeout is asked once more, after the others, with the whole timeout.
        work = [(src, False) for src in order]
        i = 0
        while i < len(work):
            src, patient = work[i]
            i += 1
            if time.monotonic() >= until:
                break
            if src.local:
                try:
                    blob = self._local_tree(src.url, size, block_size)
                except OSError as exc:
                    reasons.append(f"{src.url}: {exc}")
                    continue
                return blob
            base = _tree_url(src.url, sha1) if src.mirror is None else src.key
            if base is None or (base in seen_trees and not patient):
                continue
            seen_trees.add(base)
            t0 = time.monotonic()
            try:
                t = max(0.1, min(self.timeout, until - t0))
                head = t if patient else min(t, self.first_byte_timeout)
                status, body = (self._get_small(base, t, want, head, auth=src.auth)
                                if src.mirror is None else
                                src.mirror.get_leaves(self, size, block_size, t, head))
            except requests.RequestException as exc:
                if isinstance(exc, _SlowAnswer) and not patient:
                    work.append((src, True))
                self._record(src.key, False, seconds=time.monotonic() - t0)
                log.info("tree of %s from %s failed: %s", sha1, base, _short(exc))
                reasons.append(self._said(src, str(exc)) if isinstance(exc, Unreachable)
                               else str(exc) if isinstance(exc, (AnswerTooLarge, _SlowAnswer))
                               else self._said(src, _net_why(exc)))
                continue
            if status == 200 and len(body) == want:
                if root is not None and not _tree_matches(body, size, block_size, root):
                    self._record(src.key, False, seconds=time.monotonic() - t0, lie=True)
                    log.info("tree of %s from %s does not match root %s", sha1, base, root)
                    reasons.append(self._said(src, "sent a block list that does not hash to "
                                                   "the pointer's root"))
                    lied += 1
                    continue
                # Proof only when checked against a root: a root-less tree is taken on trust.
                self._record(src.key, True, len(body), time.monotonic() - t0,
                             proven=root is not None)
                return body
            self._record(src.key, False, seconds=time.monotonic() - t0)
            if status != 200:
                statuses.append(status)
                why = _reason(status, body)
            else:
                # A tree for another number of blocks: the source holds this SHA-1 with
                # another size than the pointer says.
                why = f"has a block list of {len(body)} bytes, the pointer's size needs {want}"
                lied += 1
            log.info("tree of %s from %s unusable: %s", sha1, base, why)
            reasons.append(self._said(src, why))
        detail = "; ".join(reasons[-4:] or ["no sources"])
        if lied and lied == len(reasons):
            # Every source that has the content disagrees with the pointer: the pointer
            # (its size or root) is what does not match, most likely (a hand edit, or a
            # pointer made for other bytes with this SHA-1); a source that lies looks alike.
            sizes = self._known_sizes(sha1)
            other = (f"; the sources hold {', '.join(map(str, sorted(sizes)))} bytes under "
                     f"this sha1, the pointer says {size}") if sizes and size not in sizes else ""
            raise VerificationError(
                f"the pointer does not match what any source has (sha1 {sha1}, size {size}"
                + (f", root {root[:16]}…" if root else "") + f"){other}: {detail}")
        raise _no_source(sha1, statuses, len(reasons), detail, bool(self._tokens), reasons)

    def _said(self, src: _Source, why: str) -> str:
        """'relay http://h:p is unreachable (...)', 'share URL http://h:p: HTTP 404: ...'."""
        origin = _origin(src.url)
        who = ("relay " if origin in {_origin(r) for r in self.relays} else "share URL ") + origin
        if src.mirror is not None:
            who = "mirror " + src.mirror.mirror.url
        return f"{who} {why}" if why.startswith("is ") else f"{who}: {why}"

    def _known_sizes(self, sha1: str) -> set[int]:
        """The sizes the relays' /api/find answers (already asked) gave for SHA1."""
        with self._lock:
            return {hit[1].size for (_, s1), hit in self._find_cache.items()
                    if s1 == sha1 and hit[1] is not None}

    def _local_tree(self, path: str, size: int, block_size: int) -> bytes:
        leaves = []
        with open(path, "rb") as f:
            for i in range(tree.block_count(size, block_size)):
                start, end = tree.block_span(i, size, block_size)
                block = os.pread(f.fileno(), end - start, start)
                if len(block) != end - start:
                    raise OSError(f"{path} is shorter than {size} bytes")
                leaves.append(tree.leaf_hash(block))
        return b"".join(leaves)

    # ---- blocks
    def fetch_blocks(self, sha1: str, size: int, first: int, count: int,
                     leaves: Sequence[bytes], block_size: int = tree.BLOCK_SIZE) -> bytes:
        """Bytes of blocks [first, first+count) of SHA1, each verified against its leaf.

        A source that fails or lies is skipped and the next one continues from the first
        block not yet verified. Raises VerificationError when every source that answered
        lied, SourceUnavailable when no source delivered within `deadline` seconds.
        """
        sha1 = protocol.check_sha1(sha1)
        start = first * block_size
        end = min((first + count) * block_size, size)
        buf = bytearray(max(0, end - start))
        self.fetch_blocks_into(sha1, size, first, count, leaves, memoryview(buf), block_size)
        return bytes(buf)

    def fetch_blocks_into(self, sha1: str, size: int, first: int, count: int,
                          leaves: Sequence[bytes], out: memoryview,
                          block_size: int = tree.BLOCK_SIZE) -> None:
        """Like `fetch_blocks`, but fills OUT (exactly the blocks' length) in place.

        The copy-free path: `kbfs.cache` uses it when the source offers it, since on this
        kind of machine every extra pass over fresh memory costs about 1 GB/s.
        """
        sha1 = protocol.check_sha1(sha1)
        nblocks = tree.block_count(size, block_size)
        if count <= 0 or first < 0 or first + count > nblocks or len(leaves) != nblocks:
            raise BadRequest(f"blocks [{first}, {first + count}) of a {nblocks}-block file "
                             f"({len(leaves)} leaves)")
        start = first * block_size
        end = min((first + count) * block_size, size)
        if len(out) != max(0, end - start):
            raise BadRequest(f"buffer of {len(out)} bytes for {end - start} bytes of blocks")
        if end <= start:  # the one empty block of an empty file
            if not tree.block_matches(b"", leaves[first]):
                raise VerificationError(f"empty block of {sha1} does not match its leaf")
            return
        view = out
        done = 0  # blocks verified so far, counted from FIRST
        began = time.monotonic()
        until = began + self.deadline
        reasons: list[str] = []
        lied = answered = 0
        statuses: dict[str, int] = {}  # source URL -> status of its last failure (0: no answer)
        tried: set[str] = set()
        # Rounds over the sources repeat with a growing pause for up to RETRY_WINDOW seconds
        # (at most half the deadline), so a relay or share restarting in a few seconds is ridden
        # out instead of failing the read.
        retry_until = time.monotonic() + min(RETRY_WINDOW, self.deadline / 2)
        pause = 0.25
        attempt = 0
        while True:
            slow = False  # a source of this round was passed over for starting too slowly
            refused = transient = False  # a certificate refused / another failure, this round
            # The first round gives each source first_byte_timeout to start its answer;
            # later rounds the whole timeout (a slow source is better than none).
            head = self.first_byte_timeout if attempt == 0 else self.timeout
            for src in self._sources(sha1, size, until):
                if done == count:
                    break
                if src.url in tried and attempt == 0:
                    continue
                if time.monotonic() >= until:
                    break
                tried.add(src.url)
                got = 0
                try:
                    got = self._attempt(src, sha1, size, first + done, count - done, leaves,
                                        block_size, view[done * block_size:], until, head)
                except _Lie as exc:
                    lied += 1
                    answered += 1
                    statuses[src.url] = 0
                    got = exc.args[1]
                    reasons.append(f"{src.url}: {exc.args[0]}")
                    log.warning("%s: source %s lied: %s", sha1, src.url, exc.args[0])
                except _Failed as exc:
                    got = exc.args[1]
                    slow = slow or isinstance(exc, _SlowStart)
                    if _cert_refused(exc.args[0]):
                        refused = True
                    else:
                        transient = True
                    if exc.args[2]:
                        answered += 1
                    statuses[src.url] = exc.args[3] if len(exc.args) > 3 else 0
                    reasons.append(self._said(src, exc.args[0]) if not src.local
                                   else f"{src.url}: {exc.args[0]}")
                    log.info("%s: source %s failed: %s", sha1, src.url, exc.args[0])
                else:
                    with self._lock:
                        self._last[sha1] = src.url
                done += got
            if done == count or (answered and lied == answered):
                break
            if refused and not transient:
                break  # a refused certificate stays refused: no retry rounds
            if slow and attempt == 0 and time.monotonic() < until:
                attempt, tried = 1, set()  # at once: the patient round
                continue
            nap = pause * random.uniform(0.8, 1.2)
            if time.monotonic() + nap >= retry_until:
                break
            time.sleep(nap)
            pause = min(pause * 2, 1.0)
            attempt += 1
            tried = set()
        if done == count:
            return
        if answered and lied == answered:
            raise VerificationError(f"every source of {sha1} sent bytes that fail verification: "
                                    + "; ".join(reasons[-4:]))
        # How the sources answered last (the final round's answers, one per source).
        last = list(statuses.values())
        detail = "; ".join(dict.fromkeys(reasons[-4:])) or "no sources"
        if last and all(last) and len(set(last) - {401, 403, 404, 409, 410}) == 0:
            raise _no_source(sha1, last, len(last), detail, bool(self._tokens), reasons)
        if refused and not transient:  # the certificate is the whole story, said at once
            raise SourceUnavailable(f"cannot read this file (sha1 {sha1}): {detail}")
        raise SourceUnavailable(
            f"cannot read this file (sha1 {sha1}): no source delivered blocks "
            f"{first}-{first + count - 1} {_gave_up(began, until, self.deadline)}: {detail}")

    def _attempt(self, src: _Source, sha1: str, size: int, first: int, count: int,
                 leaves: Sequence[bytes], block_size: int, out: memoryview, until: float,
                 head: float) -> int:
        """Fill OUT with blocks [first, first+count) from SRC; return how many were verified.
        The answer must start within HEAD seconds.

        Raises _Lie(reason, verified) or _Failed(reason, verified, answered).
        """
        start = first * block_size
        end = min((first + count) * block_size, size)
        if src.local:
            return self._attempt_local(src, first, count, start, end, size, leaves, block_size, out)
        t0 = time.monotonic()
        verified = 0
        nbytes = 0
        try:
            verified, nbytes = self._stream(src.url, start, end, size, first, leaves, block_size,
                                            out, until, head, src.auth)
        except _Lie:
            self._record(src.key, False, nbytes, time.monotonic() - t0, lie=True)
            raise
        except _Failed as exc:
            self._record(src.key, False, nbytes, time.monotonic() - t0, proven=exc.args[1] > 0)
            raise
        self._record(src.key, True, end - start, time.monotonic() - t0, proven=True)
        return verified


    def _attempt_local(self, src: _Source, first: int, count: int, start: int, end: int,
                       size: int, leaves: Sequence[bytes], block_size: int,
                       out: memoryview) -> int:
        t0 = time.monotonic()
        verified = 0
        try:
            fd = os.open(src.url, os.O_RDONLY)
            try:
                got = 0
                while got < end - start:
                    more = osio.readinto(fd, out[got: end - start], start + got)
                    if not more:
                        break
                    got += more
            finally:
                os.close(fd)
            for i in range(count):
                lo = i * block_size
                hi = min(lo + block_size, end - start)
                if hi > got:
                    raise _Failed(f"short read {got} of {end - start} bytes", verified, True)
                if not tree.block_matches(out[lo:hi], leaves[first + i]):
                    raise _Lie(f"block {first + i} does not match its leaf", verified)
                verified += 1
        except OSError as exc:
            self._record(src.key, False, seconds=time.monotonic() - t0)
            raise _Failed(str(exc), verified, False) from None
        except _Lie:
            self._record(src.key, False, seconds=time.monotonic() - t0, lie=True)
            raise
        except _Failed:
            self._record(src.key, False, seconds=time.monotonic() - t0)
            raise
        self._record(src.key, True, end - start, time.monotonic() - t0)
        return verified

    # ---- verified pieces (docs/pieces.md "Serving pieces"; the header work: kbfs.piecewire)
    def fetch_pieces(self, sha1: str, size: int, root: str, block_size: int, first: int,
                     count: int, *, known: MutableMapping[proof.Node, bytes] | None = None) -> bytes:
        """Bytes of pieces [first, first+count) of SHA1, verified against ROOT by the proof
        that came with them, in ONE range request per attempt (see `fetch_pieces_into`)."""
        sha1 = protocol.check_sha1(sha1)
        shape = _piece_shape(size, block_size, first, count)
        start, end = shape.byte_span(first, first + count)
        buf = bytearray(end - start)
        self.fetch_pieces_into(sha1, size, root, block_size, first, count, memoryview(buf),
                               known=known)
        return bytes(buf)

    def fetch_pieces_into(self, sha1: str, size: int, root: str, block_size: int, first: int,
                          count: int, out: memoryview, *,
                          known: MutableMapping[proof.Node, bytes] | None = None) -> None:
        """Fill OUT (exactly the pieces' length) with pieces [first, first+count) of SHA1,
        verified against ROOT (the pointer's, for a tree of BLOCK_SIZE leaves).

        Each attempt is one GET of the piece-aligned range with `Kbfs-Want-Proof`; the
        answer's `Kbfs-Proof` (`piecewire.parse_proof`) and body are checked together
        (`piecewire.check_pieces`) before this returns. KNOWN: verified upper nodes of this
        content the caller keeps (one dict per content, shared by its readers): a request
        names the lowest one covering the range (`below=L.J`) for a shorter proof, and the
        nodes verified here at level `piecewire.KNOWN_LEVEL` and above are added to it,
        bounded by `piecewire.MAX_KNOWN`.

        Sources, ranking, tokens, timeouts and retry rounds are those of `fetch_blocks`,
        except: /api/find is not asked before the first request (each round first tries the
        sources known without a round trip: the relays' own /sha1/ and the direct URLs of
        cached find answers; only when none served is find asked of the relays that were
        not failing when the call began, and the new direct URLs tried in that round), a
        local candidate of the right size makes it raise `NoProof` before any request (a
        local file has no proof; the caller's leaf path reads and checks it), and an origin that answers without a proof
        goes after every other for pieces for NOPROOF_TTL seconds (it is not penalised: it
        still serves blocks). A wrong proof, wrong bytes, a proof for other pieces or
        another block size, or an oversized header is a lie (`LIE_PENALTY`), and the next
        source is asked. Raises `piecewire.NoProof` when sources had the pieces but none
        could prove them (fall back to `fetch_tree` + `fetch_blocks`), VerificationError
        when every source that answered lied, NotFound / AccessDenied / SourceUnavailable
        as `fetch_blocks` does. On any error OUT holds unverified bytes: never use them.
        """
        sha1 = protocol.check_sha1(sha1)
        shape = _piece_shape(size, block_size, first, count)
        a, b = first, first + count
        start, end = shape.byte_span(a, b)
        if len(out) != end - start:
            raise BadRequest(f"buffer of {len(out)} bytes for {end - start} bytes of pieces")
        if end <= start:  # the one empty piece of an empty file: nothing to ask anyone
            try:
                nodes = piecewire.check_pieces(root, shape, a, b, b"", b"")
            except VerificationError:
                raise VerificationError(f"the pointer of {sha1} does not describe an empty "
                                        "file (its root is not the empty tree's)") from None
            if known is not None:
                piecewire.remember(known, nodes)
            return
        if self._local_sources(sha1, size):
            # A local copy (a pointer's original_path) comes before any network source, as
            # for blocks. It has no proof: the caller takes the leaf path, where the file's
            # own leaves are checked against the root and each block against its leaf.
            raise piecewire.NoProof(f"sha1 {sha1}: a local copy is on this machine; it is "
                                    "read by its leaves")
        began = time.monotonic()
        until = began + self.deadline
        reasons: list[str] = []
        lied = answered = unproven = 0
        statuses: dict[str, int] = {}  # source URL -> status of its last failure (0: no answer)
        tried: set[str] = set()
        retry_until = time.monotonic() + min(RETRY_WINDOW, self.deadline / 2)
        pause = 0.25
        attempt = 0
        # The relays /api/find may be asked of in this call: those not failing when it began
        # (their /sha1/ failing below is what sends us to find, so it must not forbid it).
        findable = frozenset(r for r in self.relays if not self._penalised(_origin(r)))
        while True:
            slow = transient = refused = False
            head = self.first_byte_timeout if attempt == 0 else self.timeout
            asked: set[str] = set()  # URLs asked in this round
            # First what is known without a round trip: each relay's own /sha1/ (a relay
            # routes it by SHA-1 itself, and the proof needs nothing /api/find says) and the
            # direct URLs of cached find answers. Only when none of them served is find
            # asked, and the direct URLs it lists are tried in the same round.
            for ask_find in ((), findable):
                for src in self._piece_sources(sha1, size, until, ask_find):
                    if (src.url in asked or (src.url in tried and attempt == 0)
                            or time.monotonic() >= until):
                        continue
                    asked.add(src.url)
                    tried.add(src.url)
                    try:
                        self._attempt_pieces(src, shape, root, a, b, out, until, head, known)
                    except _Lie as exc:
                        lied += 1
                        answered += 1
                        statuses[src.url] = 0
                        reasons.append(self._said(src, exc.args[0]))
                        log.warning("%s: source %s lied: %s", sha1, src.url, exc.args[0])
                    except _NoProofAnswer:
                        unproven += 1
                        answered += 1
                        statuses[src.url] = 0
                        reasons.append(self._said(src, "sent no proof (Kbfs-Proof) for the pieces"))
                        log.info("%s: source %s has no proof of pieces %d-%d", sha1, src.url, a, b)
                    except _Failed as exc:
                        slow = slow or isinstance(exc, _SlowStart)
                        # As for blocks: a 404 may be a share reconnecting; a refused
                        # certificate stays refused.
                        if _cert_refused(exc.args[0]):
                            refused = True
                        else:
                            transient = True
                        answered += bool(exc.args[2])
                        statuses[src.url] = exc.args[3] if len(exc.args) > 3 else 0
                        reasons.append(self._said(src, exc.args[0]))
                        log.info("%s: source %s failed: %s", sha1, src.url, exc.args[0])
                    else:
                        with self._lock:
                            self._last[sha1] = src.url
                        return
            if not transient:
                break  # every source lied or cannot prove: asking again cannot help
            if slow and attempt == 0 and time.monotonic() < until:
                attempt, tried = 1, set()  # at once: the patient round
                continue
            nap = pause * random.uniform(0.8, 1.2)
            if time.monotonic() + nap >= retry_until:
                break
            time.sleep(nap)
            pause = min(pause * 2, 1.0)
            attempt += 1
            tried = set()
        detail = "; ".join(dict.fromkeys(reasons[-4:])) or "no sources"
        what = f"pieces {a}-{b - 1} of this file (sha1 {sha1}, {block_size}-byte pieces)"
        if unproven:
            raise piecewire.NoProof(f"no source could prove {what}: {detail}")
        if answered and lied == answered:
            raise VerificationError(f"every source of {sha1} sent pieces or proofs that fail "
                                    f"verification: {detail}")
        last = list(statuses.values())
        if last and all(last) and len(set(last) - {401, 403, 404, 409, 410}) == 0:
            raise _no_source(sha1, last, len(last), detail, bool(self._tokens), reasons)
        if refused and not transient:  # the certificate is the whole story, said at once
            raise SourceUnavailable(f"cannot read {what}: {detail}")
        raise SourceUnavailable(f"cannot read {what}: no source delivered them "
                                f"{_gave_up(began, until, self.deadline)}: {detail}")

    def _piece_sources(self, sha1: str, size: int, until: float,
                       ask_find: Collection[str]) -> list[_Source]:
        """`_sources` (ASK_FIND as there) without local files, origins that answered pieces
        unproven lately last."""
        now = time.monotonic()
        with self._lock:
            unproven = {k for k, at in self._noproof_at.items() if now - at < NOPROOF_TTL}
        remote = [s for s in self._sources(sha1, size, until, ask_find) if not s.local]
        return sorted(remote, key=lambda s: s.key in unproven)

    def _attempt_pieces(self, src: _Source, shape: proof.Shape, root: str, a: int, b: int,
                        out: memoryview, until: float, head: float,
                        known: MutableMapping[proof.Node, bytes] | None) -> None:
        """Fill OUT with pieces [a, b) from SRC and verify them by the proof SRC sends.
        Raises _Lie, _NoProofAnswer or _Failed (the source's health is recorded here)."""
        start, end = shape.byte_span(a, b)
        bs = shape.block_size
        anchor = piecewire.anchor_for(known, shape, a, b)
        extra = {piecewire.WANT_HEADER: piecewire.want_value(bs, anchor[0] if anchor else None)}
        nodes: list[bytes] = []

        def on_head(getheader: Any) -> None:
            try:
                nodes.append(piecewire.parse_proof(getheader(piecewire.PROOF_HEADER), a, b, bs))
            except piecewire.NoProof:
                raise _NoProofAnswer() from None
            except VerificationError as exc:
                raise _Lie(str(exc), 0) from None

        t0 = time.monotonic()
        try:
            if src.mirror is not None:  # a static mirror: the proof is made of its stored nodes
                verified, plen = src.mirror.read_pieces(self, shape, root, a, b, out, until,
                                                        head, anchor)
                nodes.append(b"\0" * plen)
            else:
                self._stream(src.url, start, end, shape.size, a, None, bs, out, until, head,
                             src.auth, extra, on_head)
                verified = piecewire.check_pieces(root, shape, a, b, out, nodes[0], anchor)
        except (_Lie, VerificationError) as exc:
            self._record(src.key, False, end - start, time.monotonic() - t0, lie=True)
            if isinstance(exc, _Lie):
                raise
            raise _Lie(str(exc), 0) from None
        except _NoProofAnswer:
            self._record(src.key, True, 0, time.monotonic() - t0)
            with self._lock:
                self._noproof_at[src.key] = time.monotonic()
            raise
        except _Failed:
            self._record(src.key, False, 0, time.monotonic() - t0)
            raise
        self._record(src.key, True, end - start, time.monotonic() - t0, proven=True)
        with self._lock:
            self._noproof_at.pop(src.key, None)
            st = self._stats[src.key]
            st.proofs += 1
            st.proof_bytes += len(nodes[0])
        if known is not None:
            piecewire.remember(known, verified)

    # ---- listings
    def list_share(self, relay: str, share: str, path: str) -> dict[str, Any]:
        """The listing JSON of folder PATH of SHARE at RELAY, asked with SHARE's token when
        one may go to RELAY. Errors say what the relay said: NotFound (no such folder, or
        the share is not connected), AccessDenied (private share: no token, or refused),
        SourceUnavailable (the relay cannot be reached), SourceError (anything else)."""
        share = protocol.check_share_id(share)
        relay = relay.rstrip("/")
        url = relay + protocol.share_url_path(protocol.SHARE_LIST_PATH, share=share,
                                              path=path.strip("/"))
        auth = self.token_for_share(relay, share)
        what = f"folder {path or '/'} of share {share}"
        try:
            status, raw = self._get_small(url, self.timeout, LIST_LIMIT, auth=auth)
        except AnswerTooLarge as exc:
            raise SourceError(f"listing of {what}: {exc}") from None
        except Unreachable as exc:
            raise SourceUnavailable(f"relay {relay} {exc}") from None
        except requests.RequestException as exc:
            raise SourceUnavailable(f"relay {relay}: {_net_why(exc)}") from None
        if status in (401, 403):
            if auth is None:
                raise AccessDenied(f"share {share} is private: give its token ({TOKEN_HINT}; "
                                   "`kbfs share token DIR` on the share's machine makes one)")
            raise AccessDenied(f"share {share} did not accept the token given for it "
                               f"({_reason(status, raw)}): it may have expired or been "
                               "revoked; ask the share's owner for a new one")
        if status == 404:
            raise NotFound(f"relay {relay}: {_reason(status, raw).partition(': ')[2] or 'HTTP 404'}"
                           f" (asked for {what})")
        if status != 200:
            raise SourceError(f"relay {relay}: {_reason(status, raw)} (asked for {what})")
        try:
            body = json.loads(raw)
        except ValueError:
            raise SourceError(f"{relay}: listing of {path or '/'} is not JSON") from None
        if not isinstance(body, dict):
            raise SourceError(f"{relay}: listing of {path or '/'} is not a JSON object")
        return body

    # ---- introspection
    def statistics(self) -> dict[str, Any]:
        """Per source: bytes, seconds, errors, requests, lies; and the last source per sha1."""
        with self._lock:
            return {
                "sources": {k: vars(v).copy() for k, v in self._stats.items()},
                "last_source": dict(self._last),
            }

    def last_source(self, sha1: str) -> str | None:
        """URL (or local path) that last delivered blocks of SHA1."""
        with self._lock:
            return self._last.get(sha1.lower())

    def close(self) -> None:
        """Close every thread's HTTP session."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
            plain, self._plain = self._plain, []
        for s in sessions:
            s.close()
        for conns in plain:
            for conn in list(conns.values()):
                conn.close()
        self._tls = threading.local()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cert_refused(why: str) -> bool:
    """Is WHY (a `_Failed` / `Unreachable` reason) a refused TLS certificate? Not transient:
    asking again cannot help, so the retry rounds stop. Only kbfs's own wording for a
    connection that failed starts so (a source's error answer reads "HTTP ...")."""
    return why.startswith(CERT_REFUSED)


def _gave_up(began: float, until: float, deadline: float) -> str:
    """How long the sources were tried, as the error says it: the read's deadline only
    when it was what ended the retries (the retry window usually ends them first)."""
    now = time.monotonic()
    if now >= until:
        return f"within the read's {deadline:g} s deadline"
    return f"in {now - began:.1f} s of retries"


def _no_source(sha1: str, statuses: list[int], answered: int, detail: str,
               tokens: bool, reasons: Sequence[str] = ()) -> Exception:
    """The error for content no source delivered, from how the sources answered: every
    one refused access (AccessDenied), every one said it has not got it (NotFound), or
    they failed (SourceUnavailable). REASONS all from mirrors: a refusal is about
    credentials, not tokens."""
    what = f"this file (sha1 {sha1})"
    refused = statuses and len(statuses) == answered and set(statuses) <= {401, 403}
    if refused and reasons and all(r.startswith("mirror ") for r in reasons):
        return AccessDenied(f"the mirrors refused to serve {what} ({mirrorurl.REFUSED_HINT}): "
                            f"{detail}")
    if refused:
        return AccessDenied(f"{what} is in a private share that refused "
                            + ("the tokens given" if tokens else "to serve it without a token")
                            + f" ({TOKEN_HINT}): {detail}")
    if statuses and len(statuses) == answered and set(statuses) <= {404, 409, 410}:
        hint = "" if tokens else f"; if a private share holds it, give its token ({TOKEN_HINT})"
        return NotFound(f"no connected share has {what}: {detail}{hint}")
    return SourceUnavailable(f"cannot read {what}: {detail}")


TOKEN_HINT = "--token TOKEN, KBFS_TOKEN=TOKEN or \"tokens\" in ~/.config/kbfs/config.json"


def _token_share(token: str) -> str:
    claim = protocol.token_claim("Bearer " + token)
    return claim.share if claim is not None else ""


def _direct_auth(found: FindResult, base: str, sha1: str) -> str | None:
    """The token FOUND was asked with, when FOUND lists BASE (a validated direct base) as
    the `url` of the very share that token names; else None: a token goes to a share's
    own --listen server, never to a URL another share advertised."""
    if not found.token:
        return None
    share = _token_share(found.token)
    for entry in found.shares:
        url = entry.get("url")
        if entry.get("id") == share and isinstance(url, str) and direct_base(url, sha1)[0] == base:
            return found.token
    return None


def _mirror_source(mirror: mirrorsource.Mirror, sha1: str) -> _Source:
    """The source of SHA1 on MIRROR: its data URL, health under the mirror's name, no token."""
    target = mirror.target(sha1)
    return _Source(target.data_url, mirror.key, mirror=target)


def _piece_shape(size: int, block_size: int, first: int, count: int) -> proof.Shape:
    """The tree shape of a fetch_pieces call; BadRequest for a range not in it."""
    try:
        shape = proof.Shape(size, block_size)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"no pieces of size {block_size} for a file of {size} bytes: {exc}"
                         ) from None
    if count <= 0 or first < 0 or first + count > shape.leaves:
        raise BadRequest(f"pieces [{first}, {first + count}) of a {shape.leaves}-piece file")
    return shape


def _tree_matches(blob: bytes, size: int, block_size: int, root: str) -> bool:
    try:
        tree.verify_leaves(tree.split_leaves(blob), size, root, block_size)
    except VerificationError:
        return False
    return True
