// How kbfs.js gets verified bytes of one content, for the three kinds of pointer:
//
// - ProofReader (v2: a tree of 64 KiB pieces, or any block size but 1 MiB): one piece-aligned
//   Range GET with `Kbfs-Want-Proof: bs=N[; below=L.J]`; the body and its `Kbfs-Proof` are
//   checked together up to the pointer's root (or a node verified before) before a byte is
//   kept. Verified nodes at level >= 4 are remembered, so later proofs are shorter.
// - LeafReader (v1: 1 MiB blocks): the leaf list (`GET /tree/{sha1}`, exactly 32 bytes per
//   block, checked against the root once), then each block against its leaf.
// - WholeReader (no root: the original tools' pointers, sha1:// URIs): the whole content,
//   fetched once and checked against its SHA-1 before any byte is returned; refused above
//   a size limit.
//
// Verified pieces are kept in a byte-bounded LRU. What it does not do: choose relays
// (sources.js), parse sources (pointer.js). Nothing unverified is ever returned or cached.

import { createSHA1 } from './hashes.js';
import {
  HASH_BYTES, Shape, VerificationError, equalBytes, fromHex, leafHash, lowestKnown, proofNodes,
  rootFromLeaves, rootHash, toHex, verifyBelow, verifyRange,
} from './tree.js';
import { PROOF_HEADER, WANT_HEADER, checkAnswer, parseProof, readExactly, wantValue } from './wire.js';
import { ReadError } from './sources.js';

export const KNOWN_LEVEL = 4; // piecewire.KNOWN_LEVEL
export const MAX_KNOWN = 16384; // piecewire.MAX_KNOWN
const V1_BLOCK = 1 << 20;

export class ByteLRU {
  constructor(maxBytes) {
    this.max = maxBytes;
    this.bytes = 0;
    this.map = new Map();
  }

  get(k) {
    const v = this.map.get(k);
    if (v !== undefined) {
      this.map.delete(k);
      this.map.set(k, v);
    }
    return v;
  }

  set(k, v) {
    if (v.length > this.max) return;
    const old = this.map.get(k);
    if (old) {
      this.bytes -= old.length;
      this.map.delete(k);
    }
    this.map.set(k, v);
    this.bytes += v.length;
    for (const [ok, ov] of this.map) {
      if (this.bytes <= this.max) break;
      this.map.delete(ok);
      this.bytes -= ov.length;
    }
  }
}

// Pieces [a, b) cut into requests of at most MAXPIECES each, skipping pieces HAVE has.
function runs(a, b, have, maxPieces) {
  const out = [];
  let start = -1;
  for (let i = a; i <= b; i++) {
    const missing = i < b && !have(i);
    if (missing && start < 0) start = i;
    if (start >= 0 && (!missing || i - start >= maxPieces)) {
      out.push([start, i]);
      start = missing ? i : -1;
    }
  }
  return out;
}

// The common part: pieces of blockSize from an LRU, missing runs fetched (deduplicated
// while in flight, at most `parallel` requests at once) by the subclass's fetchRun.
class BlockReader {
  constructor(ref, relays, opts) {
    this.ref = ref;
    this.relays = relays;
    this.shape = new Shape(ref.size, ref.blockSize);
    this.lru = new ByteLRU(opts.cacheBytes ?? 64 << 20);
    this.maxPieces = Math.max(1, Math.floor((opts.maxRequestBytes ?? 8 << 20) / ref.blockSize));
    this.parallel = opts.parallel ?? 4;
    this.active = 0;
    this.waiting = [];
    this.inflight = new Map(); // piece -> Promise<Map piece -> bytes>
  }

  async slot(fn) {
    while (this.active >= this.parallel) await new Promise((r) => this.waiting.push(r));
    this.active++;
    try {
      return await fn();
    } finally {
      this.active--;
      this.waiting.shift()?.();
    }
  }

  async read(start, end) {
    const bs = this.ref.blockSize;
    const a = Math.floor(start / bs);
    const b = Math.max(a + 1, Math.ceil(end / bs));
    const got = new Map();
    for (let i = a; i < b; i++) {
      const v = this.lru.get(i);
      if (v) got.set(i, v);
    }
    const waits = new Set();
    for (let i = a; i < b; i++) if (!got.has(i) && this.inflight.has(i)) waits.add(this.inflight.get(i));
    for (const [ra, rb] of runs(a, b, (i) => got.has(i) || this.inflight.has(i), this.maxPieces)) {
      const p = this.slot(() => this.fetchRun(ra, rb)).then((data) => {
        const m = new Map();
        for (let i = ra; i < rb; i++) {
          const piece = data.subarray((i - ra) * bs, Math.min((i - ra + 1) * bs, data.length));
          m.set(i, piece);
          this.lru.set(i, piece.slice()); // its own buffer: the LRU's byte count is what it holds
        }
        return m;
      }).finally(() => {
        for (let i = ra; i < rb; i++) if (this.inflight.get(i) === p) this.inflight.delete(i);
      });
      for (let i = ra; i < rb; i++) this.inflight.set(i, p);
      waits.add(p);
    }
    for (const m of await Promise.all(waits)) for (const [i, v] of m) if (i >= a && i < b) got.set(i, v);
    const out = new Uint8Array(end - start);
    for (let i = a; i < b; i++) {
      const v = got.get(i);
      const lo = Math.max(start, i * bs);
      const hi = Math.min(end, i * bs + v.length);
      if (hi > lo) out.set(v.subarray(lo - i * bs, hi - i * bs), lo - start);
    }
    return out;
  }

  // Range GET of bytes [s, e) from RELAY, checked to be exactly that range; returns [res].
  async getRange(relay, s, e, headers = {}) {
    const res = await this.relays.get(relay, `/sha1/${this.ref.sha1}`, { Range: `bytes=${s}-${e - 1}`, ...headers }, e - s);
    checkAnswer(res, s, e, this.ref.size);
    return res;
  }
}

export class ProofReader extends BlockReader {
  constructor(ref, relays, opts) {
    super(ref, relays, opts);
    this.root = fromHex(ref.root);
    this.known = new Map(); // "L.j" -> verified hash, levels >= KNOWN_LEVEL
  }

  fetchRun(a, b) {
    return this.relays.attempt(`pieces ${a}-${b} of ${this.ref.sha1}`, async (relay) => {
      const shape = this.shape;
      const [s, e] = shape.byteSpan(a, b);
      const anchor = this.known.size ? lowestKnown(this.known, shape, a, b) : null;
      const res = await this.getRange(relay, s, e, { [WANT_HEADER]: wantValue(shape.blockSize, anchor && anchor[0]) });
      const header = res.headers.get(PROOF_HEADER);
      // The whole file needs no proof nodes: the data alone hashes up to the root.
      const needed = proofNodes(shape, a, b).length;
      let nodes;
      try {
        nodes = header === null && needed === 0 ? new Uint8Array(0) : parseProof(header, a, b, shape.blockSize);
      } catch (err) {
        await res.body?.cancel().catch(() => {});
        throw err;
      }
      const data = await readExactly(res, e - s);
      this.relays.stats.bytes += data.length;
      let verified;
      if (anchor && nodes.length === proofNodes(shape, a, b, anchor[0]).length * HASH_BYTES) {
        verified = verifyBelow(shape, anchor[0], anchor[1], a, b, data, nodes);
      } else {
        verified = verifyRange(this.root, shape, a, b, data, nodes);
      }
      this.remember(verified);
      return data;
    });
  }

  remember(verified) {
    const upper = [...verified.keys()].filter((k) => Number(k.split('.')[0]) >= KNOWN_LEVEL);
    upper.sort((x, y) => Number(y.split('.')[0]) - Number(x.split('.')[0]));
    for (const k of upper) {
      if (this.known.size >= MAX_KNOWN) break;
      if (!this.known.has(k)) this.known.set(k, verified.get(k));
    }
  }
}

export class LeafReader extends BlockReader {
  constructor(ref, relays, opts) {
    super(ref, relays, opts);
    this.root = fromHex(ref.root);
    this.leavesPromise = null;
  }

  leaves() {
    if (!this.leavesPromise) {
      this.leavesPromise = this.relays.attempt(`block list of ${this.ref.sha1}`, async (relay) => {
        const res = await this.relays.get(relay, `/tree/${this.ref.sha1}`, {}, this.shape.leaves * HASH_BYTES);
        if (res.status !== 200) throw new VerificationError(`answered ${res.status} for the block list`);
        const blob = await readExactly(res, this.shape.leaves * HASH_BYTES);
        const leaves = [];
        for (let i = 0; i < this.shape.leaves; i++) leaves.push(blob.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES));
        if (!equalBytes(rootFromLeaves(this.shape, leaves), this.root)) {
          throw new VerificationError('sent a block list that does not hash to the pointer\'s root');
        }
        return leaves;
      });
      this.leavesPromise.catch(() => { this.leavesPromise = null; }); // asked again on the next read
    }
    return this.leavesPromise;
  }

  async fetchRun(a, b) {
    const leaves = await this.leaves();
    return this.relays.attempt(`blocks ${a}-${b} of ${this.ref.sha1}`, async (relay) => {
      const [s, e] = this.shape.byteSpan(a, b);
      const res = await this.getRange(relay, s, e);
      const data = await readExactly(res, e - s);
      this.relays.stats.bytes += data.length;
      const bs = this.ref.blockSize;
      for (let i = a; i < b; i++) {
        const block = data.subarray((i - a) * bs, Math.min((i - a + 1) * bs, data.length));
        if (!equalBytes(leafHash(block), leaves[i])) throw new VerificationError(`block ${i} does not match its leaf`);
      }
      return data;
    });
  }
}

export class WholeReader {
  constructor(ref, relays, opts) {
    this.ref = ref;
    this.relays = relays;
    this.limit = opts.rootlessLimit ?? 256 << 20;
    this.whole = null;
  }

  async read(start, end) {
    if (!this.whole) {
      const { sha1, size } = this.ref;
      if (size > this.limit) {
        throw new ReadError(`${sha1} has no block tree (an original-tools pointer or a sha1:// URI): kbfs.js `
          + `reads such content whole to check its SHA-1 first, and ${size} bytes is above the limit of `
          + `${this.limit} (option rootlessLimit); use a pointer with kbfs_tree (kbfs prv create) or a kbfs:// path`);
      }
      this.whole = this.relays.attempt(`${sha1} (read whole to check its SHA-1)`, async (relay) => {
        const res = await this.relays.get(relay, `/sha1/${sha1}`, {}, size);
        checkAnswer(res, 0, size, size);
        const data = await readExactly(res, size);
        this.relays.stats.bytes += data.length;
        const h = await createSHA1();
        h.init();
        h.update(data);
        if (h.digest('hex') !== sha1) throw new VerificationError(`the content sent does not have SHA-1 ${sha1}`);
        return data;
      });
      this.whole.catch(() => { this.whole = null; });
    }
    return (await this.whole).slice(start, end);
  }
}

// A v1/v2 pointer of an empty file: its root is known from the size alone.
export function checkEmptyRoot(ref) {
  const root = rootHash(0, ref.blockSize, leafHash(new Uint8Array(0)));
  if (toHex(root) !== ref.root) throw new VerificationError(`the pointer's root is not the root of an empty file`);
}
