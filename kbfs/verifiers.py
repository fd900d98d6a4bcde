"""How the pieces of each content are fetched verified: by proof, by leaf list, or proven whole.

`Verifiers(store, source, staging)` is the piece cache's one way to the source. For a
content REF, `fetch(ref, first, count, known)` returns the verified bytes of pieces
[first, first+count) at `ref.block_size`:

- v2 (a root, 64 KiB leaves): `source.fetch_pieces`, each piece checked by its proof up to
  the root (one round trip, no leaf list). A content for which the source answers NoProof
  (an older share, a plain web server) takes the leaf path from then on, with one log
  line per content.
- a root and any other block size (v1: 1 MiB), or v2 without proofs: the leaf list
  (`kbfs.leaflists`, fetched once, checked against the root, kept as a store hint), then
  `source.fetch_blocks`, each block checked against its leaf.
- v2 without proofs whose sources serve no leaf list at its block size either (shares serve
  1 MiB leaves; a plain web server none): the whole content is read once and checked
  against the root by hashing (`kbfs.rootless.prove_root`, single flight), which yields its
  leaves; up to `whole_limit` bytes (WHOLE_LIMIT, 4 GiB: a small read costs the whole
  file). A larger file fails with one line saying so.
- no root (the original tools): `prepare` first runs the whole-SHA-1 pass
  (`kbfs.rootless`) once per content, single flight; then blocks are checked against the
  leaves recorded from the bytes that matched.

`verified(ref)` says which rule vouches for REF ('tree', 'sha1', 'pending'). Not here:
storing fetched pieces (the caller's), flights and read-ahead (`kbfs.piececache`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from kbfs import piecefile, rootless
from kbfs.errors import SourceError, VerificationError
from kbfs.leaflists import LeafLists
from kbfs.piecewire import NoProof

log = logging.getLogger(__name__)

PIECE_SIZE = 64 * 1024       # the leaf size shares prove (v2 pointers)
MAX_FALLBACKS = 4096         # contents remembered as read by their leaf list
WHOLE_LIMIT = 4 << 30        # bytes: the largest v2 file read whole when nothing proves it


class Source(Protocol):
    """What the cache fetches from (kbfs.fetch.Fetcher; never imported here)."""

    def fetch_tree(self, sha1: str, size: int, block_size: int = ..., root: str | None = None) -> bytes: ...
    def fetch_blocks(self, sha1: str, size: int, first: int, count: int, leaves: Any,
                     block_size: int = ...) -> bytes: ...
    def fetch_pieces(self, sha1: str, size: int, root: str, block_size: int, first: int,
                     count: int, *, known: Any = None) -> bytes: ...


class Verifiers:
    """See the module docstring. Thread-safe."""

    def __init__(self, store: Any, source: Source, staging: str) -> None:
        self.store = store
        self.source = source
        self.staging = staging
        piecefile.private_folder(staging)
        rootless.sweep(staging)
        self.leaves = LeafLists(store, source)
        self.whole_limit = WHOLE_LIMIT
        self._lock = threading.Lock()
        self._fallback: OrderedDict[str, None] = OrderedDict()
        self._proving: dict[str, cf.Future[list[bytes]]] = {}
        self.stats = dict.fromkeys(("fallback_reads", "leaf_fetches", "proof_fetches",
                                    "whole_passes", "whole_bytes"), 0)

    def by_proof(self, ref: Any) -> bool:
        """Whether REF's pieces are asked with proofs (v2, and no NoProof seen for it)."""
        if ref.root is None or ref.block_size != PIECE_SIZE:
            return False
        with self._lock:
            return ref.key not in self._fallback

    def fetch(self, ref: Any, first: int, count: int, known: dict[Any, bytes] | None) -> bytes:
        """Verified bytes of pieces [FIRST, FIRST+COUNT) of REF (see the module docstring)."""
        if self.by_proof(ref):
            try:
                data = self.source.fetch_pieces(ref.sha1, ref.size, ref.root, ref.block_size,
                                                first, count, known=known)
                self._count("proof_fetches")
                return data
            except NoProof as exc:
                self._fall_back(ref, exc)
        if ref.root is not None:
            leaves = self._leaves_of(ref)
            if ref.block_size == PIECE_SIZE:
                # Just proven whole? Its pieces are stored: no second fetch of these bytes.
                stored = self.store.read(ref.key, first * ref.block_size,
                                         min((first + count) * ref.block_size, ref.size) - first * ref.block_size)
                if stored is not None:
                    return stored
        else:
            leaves = self.prepare(ref)
        self._count("leaf_fetches")
        if ref.root is not None and ref.block_size == PIECE_SIZE:
            self._count("fallback_reads")
        return self.source.fetch_blocks(ref.sha1, ref.size, first, count, leaves, ref.block_size)

    def _leaves_of(self, ref: Any) -> list[bytes]:
        """REF's (with a root) verified leaves: its leaf list, else (v2) the whole pass."""
        try:
            return self.leaves.get(ref)
        except (SourceError, VerificationError) as exc:
            if ref.block_size != PIECE_SIZE:
                raise    # v1: /tree/ is what every share and relay serves; its error says why
            why = exc
        if ref.size > self.whole_limit:
            raise SourceError(
                f"sha1 {ref.sha1}: no source proves its {ref.block_size >> 10} KiB pieces or "
                f"serves their leaf list, and checking it against its root means reading all "
                f"{ref.size} bytes, more than the limit of {self.whole_limit}; read it from a "
                f"share or relay that proves pieces (a current kbfs) ({why})")
        log.warning("sha1 %s: no source serves its %d KiB leaf list (%s); reading the whole "
                    "file once to check it against its root", ref.sha1, ref.block_size >> 10, why)
        return self._once(ref, lambda: rootless.prove_root(
            ref, self.source, self.store, self.leaves, self.staging, None,
            lambda n: self._count("whole_bytes", n)), lambda: self.leaves.in_memory(ref))

    def prepare(self, ref: Any, sink: rootless.Sink | None = None,
                ran: Callable[[], None] | None = None) -> list[bytes]:
        """Root-less REF: its recorded leaves, running the whole-SHA-1 pass first if it never
        matched (RAN is called when this call ran it, and SINK then got every byte)."""
        got = self.leaves.proven(ref)
        if got is not None:
            return got

        def run() -> list[bytes]:
            if ran is not None:
                ran()
            return rootless.prove(ref, self.source, self.store, self.leaves, self.staging,
                                  sink, lambda n: self._count("whole_bytes", n))
        return self._once(ref, run, lambda: self.leaves.proven(ref))

    def _once(self, ref: Any, run: Callable[[], list[bytes]],
              done: Callable[[], Any]) -> list[bytes]:
        """RUN REF's whole pass, one at a time per content (others wait for its result);
        DONE() gives the leaves when another process or call has done it meanwhile."""
        with self._lock:
            flight = self._proving.get(ref.key)
            owner = flight is None
            if flight is None:
                flight = self._proving[ref.key] = cf.Future()
        if not owner:
            return flight.result()
        try:
            got = done()   # another process or call may have done it meanwhile
            if got is None:
                self._count("whole_passes")
                got = run()
            flight.set_result(got)
            return got
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._proving.pop(ref.key, None)

    def verified(self, ref: Any) -> str:
        """'tree' (a root vouches for every piece), 'sha1' (root-less, matched its SHA-1
        once), 'pending' (root-less, none of it served yet)."""
        if ref.root is not None:
            return "tree"
        return "sha1" if self.leaves.proven(ref) is not None else "pending"

    def _fall_back(self, ref: Any, exc: BaseException) -> None:
        with self._lock:
            first = ref.key not in self._fallback
            self._fallback[ref.key] = None
            while len(self._fallback) > MAX_FALLBACKS:
                self._fallback.popitem(last=False)
        if first:
            log.warning("sha1 %s: no source proves its %d KiB pieces (%s); reading it by "
                        "its leaf list instead (slower, as verified)",
                        ref.sha1, ref.block_size >> 10, exc)

    def fallback_contents(self) -> int:
        with self._lock:
            return len(self._fallback)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats, fallback_contents=len(self._fallback),
                        leaf_lists_fetched=self.leaves.fetched)


def staging_dir(store_dir: str) -> str:
    return os.path.join(store_dir, "staging")
