// Copied from js/pointer.js by js/vendor.mjs: edit js/pointer.js, then run `node js/vendor.mjs`.
// What a kbfs.js source names, checked: a .prv pointer (text or object), a sha1:// URI or
// a kbfs link (kbfs://HOST:PORT/... or kbfs+https://HOST[:PORT]/..., read by kbfsurl.js);
// and relay base URLs. Mirrors kbfs/prv.py (pointer_from_dict), kbfs/client.py
// (parse_sha1_uri) and kbfs/kbfsurl.py.
//
// What it does not do: no network (kbfs.js resolves sha1:// sizes and kbfs link listings),
// no hashing. Every failure is a SourceError with one line saying what is wrong.

import { SourceError, isLink, parseLink, relayBase, shown } from './kbfsurl.js';
import { ALGORITHM, MAX_SIZE } from './tree.js';

export { SourceError, relayBase };

export const MAX_POINTER_CHARS = 64 * 1024; // as prv.MAX_POINTER_BYTES
const SHA1_RE = /^[0-9a-fA-F]{40}$/;
const ROOT_RE = /^[0-9a-fA-F]{64}$/;
const MAX_HINTS = 8;

const isInt = (v) => typeof v === 'number' && Number.isInteger(v);

// A pointer object or its JSON text -> {sha1, size, root|null, blockSize|null, path, hints}.
export function parsePointer(src, what = 'pointer') {
  let obj = src;
  if (typeof src === 'string') {
    if (src.length > MAX_POINTER_CHARS) throw new SourceError(`${what}: larger than ${MAX_POINTER_CHARS} characters; not a pointer`);
    try {
      obj = JSON.parse(src);
    } catch (e) {
      throw new SourceError(`${what}: not valid JSON (${e.message})`);
    }
  }
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) throw new SourceError(`${what}: not a JSON object`);
  const sha1 = obj.original_checksum;
  if (typeof sha1 !== 'string' || !SHA1_RE.test(sha1)) throw new SourceError(`${what}: original_checksum must be 40 hex digits`);
  const size = obj.original_size;
  if (!isInt(size) || size < 0) throw new SourceError(`${what}: original_size must be a non-negative integer`);
  if (size > MAX_SIZE) throw new SourceError(`${what}: original_size ${size} is above what kbfs.js reads (2^53 - 1)`);
  const path = obj.original_path ?? '';
  if (typeof path !== 'string' || path.includes('\0')) throw new SourceError(`${what}: original_path must be a string`);
  let root = null;
  let blockSize = null;
  if ('kbfs_tree' in obj) {
    const t = obj.kbfs_tree;
    if (t === null || typeof t !== 'object' || Array.isArray(t)) throw new SourceError(`${what}: kbfs_tree must be an object`);
    if (t.algorithm !== ALGORITHM) throw new SourceError(`${what}: kbfs_tree.algorithm must be '${ALGORITHM}'`);
    if (!isInt(t.block_size) || t.block_size < 4096 || t.block_size > 2 ** 30) {
      throw new SourceError(`${what}: kbfs_tree.block_size must be an integer from 4096 to 2^30`);
    }
    if (typeof t.root !== 'string' || !ROOT_RE.test(t.root)) throw new SourceError(`${what}: kbfs_tree.root must be 64 hex digits`);
    root = t.root.toLowerCase();
    blockSize = t.block_size;
  }
  // Source hints: only add places to look; a bad one is dropped, never an error.
  const hints = [];
  if (Array.isArray(obj.kbfs_sources)) {
    for (const h of obj.kbfs_sources.slice(0, MAX_HINTS)) {
      const base = typeof h === 'string' && h.length <= 512 ? relayBase(h) : null;
      if (base && !hints.includes(base)) hints.push(base);
    }
  }
  return { sha1: sha1.toLowerCase(), size, root, blockSize, path, hints };
}

export function checkRelay(url) {
  const base = relayBase(url);
  if (!base) throw new SourceError(`relay ${JSON.stringify(String(url).slice(0, 100))} is not http(s)://HOST[:PORT] (no user, path, query or fragment)`);
  return base;
}

function basename(path) {
  const parts = path.split('/').filter(Boolean);
  return parts.length ? parts[parts.length - 1] : '';
}

function decode(text, what) {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new SourceError(`${what}: bad percent-encoding`);
  }
}

// What a source names, without touching the network:
//   {kind: 'pointer', pointer, name}
//   {kind: 'sha1', sha1, name}                      sha1://SHA1[/NAME][?...] (query ignored)
//   {kind: 'kbfs', relay, share, path, name}        kbfs://HOST:PORT/SHARE_ID/PATH or
//                                                   kbfs+https://HOST[:PORT]/SHARE_ID/PATH
export function parseSource(source) {
  if (source !== null && typeof source === 'object') {
    const pointer = parsePointer(source);
    return { kind: 'pointer', pointer, name: basename(pointer.path) || pointer.sha1 };
  }
  if (typeof source !== 'string') throw new SourceError('a source is a pointer (JSON text or object), sha1://SHA1 or a kbfs link (kbfs://HOST:PORT/SHARE_ID/PATH, kbfs+https://HOST[:PORT]/SHARE_ID/PATH)');
  const text = source.trim();
  if (text.startsWith('sha1://')) {
    const rest = text.slice(7).split(/[?#]/)[0];
    const [sha1, ...nameParts] = rest.split('/');
    if (!SHA1_RE.test(sha1)) throw new SourceError(`${shown(text)}: expected sha1://SHA1[/NAME] with 40 hex digits`);
    const name = basename(decode(nameParts.join('/'), 'sha1:// name'));
    return { kind: 'sha1', sha1: sha1.toLowerCase(), name: name || sha1.toLowerCase() };
  }
  if (isLink(text)) {
    const { relay, share, path } = parseLink(text);
    if (!path) throw new SourceError(`${shown(text)}: names the share's top folder, not a file`);
    return { kind: 'kbfs', relay, share, path, name: basename(path) };
  }
  if (text.startsWith('{')) {
    const pointer = parsePointer(text);
    return { kind: 'pointer', pointer, name: basename(pointer.path) || pointer.sha1 };
  }
  throw new SourceError(`${shown(text)}: unknown kind of source; give pointer JSON, sha1://SHA1[/NAME] or a kbfs link (kbfs://HOST:PORT/SHARE_ID/PATH, kbfs+https://HOST[:PORT]/SHARE_ID/PATH)`);
}
