"""In-process piece sources for the piece cache's tests, honest by construction.

`Content(seed, size)`: reproducible bytes, their blake3-merkle-1 tree with 64 KiB pieces
(every level, via kbfs.proof) and root; `ref()` is the kbfs.cache.FileRef of its pointer.

`HonestSource(contents, delay=, bandwidth=)` implements `fetch_pieces` the way a reader must:
the "wire" (`serve`) gives the piece bytes and the canonical proof (`make_proof`, below the
lowest node the caller's `known` holds), and the call verifies them against the pointer's
root (`verify_range_nodes`, or `verify_below` a known node) before returning, then merges
the upper nodes it verified into `known`. With DELAY and BANDWIDTH every call also takes a
shared link's time: it waits DELAY, then its bytes queue behind the other calls' at
BANDWIDTH bytes/s. Every call is recorded (`calls`), and the bytes asked for and not yet
answered are integrated over time (`outstanding_between`).

`LyingSource`: the wire flips a byte of the data (`tamper="data"`) or of the proof
(`"proof"`); the verification in `fetch_pieces` catches it. It also scribbles a node into
`known` before raising, as a careless source might: the cache must not keep that.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

from kbfs import proof, tree
from kbfs.errors import NotFound
from kbfs.fileref import FileRef

P = 64 * 1024
Node = tuple[int, int]


class Content:
    def __init__(self, seed: str, size: int, block_size: int = P) -> None:
        self.seed, self.size, self.block_size = seed, size, block_size
        self.data = hashlib.shake_128(seed.encode()).digest(size) if size else b""
        self.sha1 = hashlib.sha1(self.data).hexdigest()
        self.shape = proof.Shape(size, block_size)
        view = memoryview(self.data)
        leaves = [tree.leaf_hash(view[i * block_size : (i + 1) * block_size]) for i in range(self.shape.leaves)]
        self.levels = proof.levels_from(leaves, self.shape)
        self.root = proof.root_of(self.shape, self.levels[-1][0])

    def node(self, level: int, index: int) -> bytes:
        return self.levels[min(level, len(self.levels) - 1)][index]

    def ref(self, **changes: object) -> FileRef:
        fields = dict(sha1=self.sha1, size=self.size, root=self.root, block_size=self.block_size)
        fields.update(changes)
        return FileRef(**fields)  # type: ignore[arg-type]

    def piece(self, i: int) -> bytes:
        return self.data[i * self.block_size : (i + 1) * self.block_size]


@dataclass
class Call:
    sha1: str
    first: int
    count: int
    proof_bytes: int
    start: float
    end: float = 0.0


@dataclass
class HonestSource:
    contents: dict[str, Content]
    delay: float = 0.0
    bandwidth: float | None = None
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.link_free = 0.0
        self.outstanding = 0
        self._area: list[tuple[float, int]] = []   # (time, outstanding bytes from then on)

    def serve(self, c: Content, first: int, count: int, anchor: Node | None) -> tuple[bytes, bytes]:
        start, end = c.shape.byte_span(first, first + count)
        return c.data[start:end], proof.make_proof(c.node, c.shape, first, first + count, anchor)

    def fetch_pieces(self, sha1: str, size: int, root: str, block_size: int, first: int, count: int,
                     *, known: dict[Node, bytes] | None = None) -> bytes:
        c = self.contents.get(sha1)
        if c is None:
            raise NotFound(f"no source has {sha1}")
        shape = proof.Shape(size, block_size)
        anchor = proof.lowest_known(known, shape, first, first + count) if known else None
        data, wire_proof = self.serve(c, first, count, anchor)
        call = Call(sha1, first, count, len(wire_proof), time.monotonic())
        self._link(len(data))
        call.end = time.monotonic()
        with self.lock:
            self.calls.append(call)
        if anchor is not None and known is not None:
            nodes = proof.verify_below(shape, anchor, known[anchor], first, first + count, data, wire_proof)
        else:
            nodes = proof.verify_range_nodes(root, size, block_size, first, first + count, data, wire_proof)
        if known is not None:
            known.update({n: h for n, h in nodes.items() if n[0] >= 1})
        return data

    def _link(self, nbytes: int) -> None:
        if not self.delay and not self.bandwidth:
            return
        with self.lock:
            now = time.monotonic()
            ready = max(now + self.delay, self.link_free)
            done = ready + (nbytes / self.bandwidth if self.bandwidth else 0.0)
            self.link_free = done if self.bandwidth else self.link_free
            self.outstanding += nbytes
            self._area.append((now, self.outstanding))
        time.sleep(max(0.0, done - time.monotonic()))
        with self.lock:
            self.outstanding -= nbytes
            self._area.append((time.monotonic(), self.outstanding))

    def outstanding_between(self, t0: float, t1: float) -> float:
        """Time-weighted mean of the bytes in flight over [t0, t1]."""
        with self.lock:
            points = list(self._area)
        total, level, at = 0.0, 0, t0
        for t, value in points:
            if t <= t0:
                level = value
                continue
            if t >= t1:
                break
            total += level * (t - at)
            at, level = t, value
        total += level * (t1 - at)
        return total / (t1 - t0)


@dataclass
class LyingSource(HonestSource):
    tamper: str = "data"

    def serve(self, c: Content, first: int, count: int, anchor: Node | None) -> tuple[bytes, bytes]:
        data, wire_proof = super().serve(c, first, count, anchor)
        if self.tamper == "data" or not wire_proof:
            data = bytes([data[0] ^ 1]) + data[1:]
        elif wire_proof:
            wire_proof = bytes([wire_proof[0] ^ 1]) + wire_proof[1:]
        return data, wire_proof

    def fetch_pieces(self, sha1: str, size: int, root: str, block_size: int, first: int, count: int,
                     *, known: dict[Node, bytes] | None = None) -> bytes:
        if known is not None:
            known[(30, 0)] = b"\0" * 32   # a careless source's garbage, then the failure
        return super().fetch_pieces(sha1, size, root, block_size, first, count, known=known)
