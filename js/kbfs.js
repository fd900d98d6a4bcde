// kbfs.js: read kbfs content in a browser or in Node, every byte verified.
//
//   import { openContent, parseSource } from 'kbfs';          // Node (npm package)
//   import { openContent } from './lib/kbfs.js';              // a page (the vendored copy)
//   const f = await openContent(source, { relays: ['http://127.0.0.1:8080'], token, fetch });
//   f.size; f.sha1; f.name; await f.read(offset, length);     // -> Uint8Array, verified
//
// SOURCE: a .prv pointer (JSON text or the parsed object, with or without kbfs_tree), a
// `sha1://SHA1[/NAME]` URI (query ignored) or a kbfs link, `kbfs://HOST:PORT/SHARE_ID/PATH`
// (http relay) or `kbfs+https://HOST[:PORT]/SHARE_ID/PATH` (kbfsurl.js). Reading:
// 64 KiB pointers by range proofs, 1 MiB pointers by the leaf list, root-less content read
// whole and checked against its SHA-1 (readers.js). Relays are tried in order, the next one
// on any error (sources.js). The token goes to the relays given and to the relay a
// kbfs link names, never to a pointer's source hints.
//
// What it does not do: write, list folders, cache on disk, or use direct share URLs.

import { kbfsLink } from './kbfsurl.js';
import { SourceError, checkRelay, parsePointer, parseSource } from './pointer.js';
import { LeafReader, ProofReader, WholeReader, checkEmptyRoot } from './readers.js';
import { ReadError, Relays, checkToken } from './sources.js';
import { VerificationError } from './tree.js';
import { readText } from './wire.js';

export { parseSource, parsePointer, SourceError, ReadError, VerificationError };

const MAX_FIND = 4 << 20; // bytes of an /api/find answer (as kbfs/fetch.py)
const MAX_LISTING = 64 << 20; // bytes of a share listing

export class KbfsFile {
  constructor(ref, name, reader, relays) {
    this.sha1 = ref.sha1;
    this.size = ref.size;
    this.root = ref.root; // null for root-less content
    this.blockSize = ref.blockSize;
    this.name = name;
    this.kind = !ref.root ? 'rootless' : ref.blockSize === 1 << 20 ? 'leaves' : 'proofs';
    this.reader = reader;
    this.relays = relays;
  }

  // Counters: requests sent, content bytes received, failovers, relays caught lying.
  get stats() {
    return { ...this.relays.stats };
  }

  // Verified bytes [offset, offset + length) (fewer at the end of the file).
  async read(offset = 0, length = this.size - offset) {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new RangeError(`read(${offset}, ${length}): offset and length are non-negative integers`);
    }
    const start = Math.min(offset, this.size);
    const end = Math.min(this.size, start + length);
    if (end <= start) return new Uint8Array(0);
    return this.reader.read(start, end);
  }
}

function json(text, what) {
  try {
    return JSON.parse(text);
  } catch {
    throw new VerificationError(`${what} is not JSON`);
  }
}

// The size of sha1:// content: the first relay whose /api/find knows it.
async function findSize(relays, sha1) {
  return relays.attempt(`sha1://${sha1}`, async (relay) => {
    let res;
    try {
      res = await relays.get(relay, `/api/find/${sha1}`);
    } catch (e) {
      if (e.status === 404) throw new ReadError('no connected share has this content (or only a private share you gave no token for)');
      throw e;
    }
    const found = json(await readText(res, MAX_FIND), '/api/find answer');
    if (!found || found.found !== true) throw new ReadError('no connected share has this content');
    if (!Number.isSafeInteger(found.size) || found.size < 0) throw new VerificationError('/api/find gave no valid size');
    return found.size;
  });
}

// The pointer of a kbfs link's path: the entry of its folder's listing at the relay it names.
async function listingPointer(relays, src) {
  const parent = src.path.split('/').slice(0, -1).map(encodeURIComponent).join('/');
  const what = kbfsLink(src.relay, src.share, src.path); // kbfs+https:// for an https relay
  return relays.attempt(what, async (relay) => {
    const res = await relays.get(relay, `/s/${src.share}/list/${parent}`);
    const listing = json(await readText(res, MAX_LISTING), 'listing');
    const files = Array.isArray(listing?.files) ? listing.files : [];
    const entry = files.find((f) => f && f.name === src.name);
    if (!entry) {
      const isDir = Array.isArray(listing?.dirs) && listing.dirs.includes(src.name);
      throw new ReadError(isDir ? 'is a folder, not a file' : `no such file in share ${src.share}`);
    }
    return parsePointer(entry.prv, `${what} (listed pointer)`);
  });
}

// Open SOURCE for reading; see the module comment. Options: relays (list of
// http(s)://HOST:PORT), token (a private share's), fetch (default globalThis.fetch),
// name, timeout (ms per request, 30000, plus 1 s per MB asked), firstByteTimeout (ms to
// the answer's head, 5000: then the next relay), cacheBytes (LRU of verified pieces, 64 MiB),
// rootlessLimit (largest root-less content read whole, 256 MiB), maxRequestBytes (8 MiB),
// parallel (requests at once per file, 4).
export async function openContent(source, opts = {}) {
  const src = parseSource(source);
  const token = checkToken(opts.token);
  if (opts.relays !== undefined && !Array.isArray(opts.relays)) throw new SourceError('relays: a list of http(s)://HOST[:PORT] URLs');
  const given = (opts.relays ?? []).map(checkRelay);
  const trusted = src.kind === 'kbfs' ? [src.relay, ...given] : given;
  const list = [...new Set(trusted)].map((base) => ({ base, trusted: true }));
  const common = { token, fetch: opts.fetch, timeout: opts.timeout, firstByteTimeout: opts.firstByteTimeout };
  let ref;
  if (src.kind === 'pointer') {
    ref = src.pointer;
  } else if (src.kind === 'sha1') {
    if (!list.length) throw new SourceError(`sha1://${src.sha1}: give relays: the size of a sha1:// source is asked of them`);
    ref = { sha1: src.sha1, size: await findSize(new Relays(list, common), src.sha1), root: null, blockSize: null, hints: [] };
  } else {
    ref = await listingPointer(new Relays([{ base: src.relay, trusted: true }], common), src);
  }
  for (const h of ref.hints ?? []) if (!list.some((r) => r.base === h)) list.push({ base: h, trusted: false });
  if (!list.length) throw new SourceError('give relays: no relay to read from (options.relays)');
  const relays = new Relays(list, common);
  const name = opts.name ?? src.name;
  if (ref.root && ref.size === 0) checkEmptyRoot(ref);
  const Reader = !ref.root ? WholeReader : ref.blockSize === 1 << 20 ? LeafReader : ProofReader;
  return new KbfsFile(ref, name, new Reader(ref, relays, opts), relays);
}
