// Copied from js/pointer.js by js/vendor.mjs: edit js/pointer.js, then run `node js/vendor.mjs`.
// What a kbfs.js source names, checked: a .prv pointer (text or object), a sha1:// URI or
// a kbfs:// path; and relay base URLs. Mirrors kbfs/prv.py (pointer_from_dict),
// kbfs/client.py (parse_sha1_uri, parse_kbfs_uri) and kbfs/protocol.py (relay_base_problem).
//
// What it does not do: no network (kbfs.js resolves sha1:// sizes and kbfs:// listings),
// no hashing. Every failure is a SourceError with one line saying what is wrong.

import { ALGORITHM, MAX_SIZE } from './tree.js';

export const MAX_POINTER_CHARS = 64 * 1024; // as prv.MAX_POINTER_BYTES
const SHA1_RE = /^[0-9a-fA-F]{40}$/;
const ROOT_RE = /^[0-9a-fA-F]{64}$/;
const SHARE_ID_RE = /^[a-z2-7]{16,64}$/; // protocol.SHARE_ID_RE
const MAX_HINTS = 8;

export class SourceError extends Error {
  constructor(message) {
    super(message);
    this.name = 'SourceError';
  }
}

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

// `http(s)://host[:port]` with no user info, path, query or fragment -> its base, else null.
export function relayBase(url) {
  if (typeof url !== 'string') return null;
  const text = url.trim();
  if (/[\s\\\0]/.test(text) || text.includes('?') || text.includes('#')) return null;
  let u;
  try {
    u = new URL(text);
  } catch {
    return null;
  }
  if ((u.protocol !== 'http:' && u.protocol !== 'https:') || !u.hostname || u.username || u.password) return null;
  if (u.pathname !== '/' && u.pathname !== '') return null;
  if (!/^https?:\/\/[^/]+\/?$/.test(text)) return null; // e.g. "http://h/." normalised by URL
  return `${u.protocol}//${u.host}`;
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

// A share-relative path: no '.', '..', empty parts, NUL or backslash (protocol.safe_relpath).
function safeRelpath(path, what) {
  const parts = path.split('/').filter((p) => p !== '');
  for (const p of parts) {
    if (p === '.' || p === '..' || p.includes('\0') || p.includes('\\')) throw new SourceError(`${what}: unsafe path`);
  }
  return parts.join('/');
}

// What a source names, without touching the network:
//   {kind: 'pointer', pointer, name}
//   {kind: 'sha1', sha1, name}                      sha1://SHA1[/NAME][?...] (query ignored)
//   {kind: 'kbfs', relay, share, path, name}        kbfs://HOST:PORT/SHARE_ID/PATH
export function parseSource(source) {
  if (source !== null && typeof source === 'object') {
    const pointer = parsePointer(source);
    return { kind: 'pointer', pointer, name: basename(pointer.path) || pointer.sha1 };
  }
  if (typeof source !== 'string') throw new SourceError('a source is a pointer (JSON text or object), sha1://SHA1 or kbfs://HOST:PORT/SHARE_ID/PATH');
  const text = source.trim();
  if (text.startsWith('sha1://')) {
    const rest = text.slice(7).split(/[?#]/)[0];
    const [sha1, ...nameParts] = rest.split('/');
    if (!SHA1_RE.test(sha1)) throw new SourceError(`${text.slice(0, 100)}: expected sha1://SHA1[/NAME] with 40 hex digits`);
    const name = basename(decode(nameParts.join('/'), 'sha1:// name'));
    return { kind: 'sha1', sha1: sha1.toLowerCase(), name: name || sha1.toLowerCase() };
  }
  if (text.startsWith('kbfs://')) {
    const rest = text.slice(7);
    if (/[?#\s]/.test(rest)) throw new SourceError(`${text.slice(0, 100)}: a kbfs:// path has no query, fragment or spaces`);
    const [host, share, ...pathParts] = rest.split('/');
    const what = text.slice(0, 100);
    const relay = host && /:[0-9]{1,5}$/.test(host) ? relayBase(`http://${host}`) : null;
    if (!relay || !share) throw new SourceError(`${what}: expected kbfs://HOST:PORT/SHARE_ID/path/in/share`);
    if (!SHARE_ID_RE.test(share)) throw new SourceError(`${what}: ${JSON.stringify(share.slice(0, 40))} is not a share id`);
    const path = safeRelpath(decode(pathParts.join('/'), what), what);
    if (!path) throw new SourceError(`${what}: names the share's top folder, not a file`);
    return { kind: 'kbfs', relay, share, path, name: basename(path) };
  }
  if (text.startsWith('{')) {
    const pointer = parsePointer(text);
    return { kind: 'pointer', pointer, name: basename(pointer.path) || pointer.sha1 };
  }
  throw new SourceError(`${text.slice(0, 100)}: unknown kind of source; give pointer JSON, sha1://SHA1[/NAME] or kbfs://HOST:PORT/SHARE_ID/PATH`);
}
