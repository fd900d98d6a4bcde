// Copied from js/kbfsurl.js by js/vendor.mjs: edit js/kbfsurl.js, then run `node js/vendor.mjs`.
// kbfs links, read and written as kbfs/kbfsurl.py does (its rules and its wording), and
// relay base URLs (kbfs/protocol.py relay_base_problem):
//
//   kbfs://HOST:PORT/SHARE_ID/PATH            a share on the relay at http://HOST:PORT
//   kbfs+https://HOST[:PORT]/SHARE_ID/PATH    a share on the relay at https://HOST[:PORT]
//
// `kbfs://` is plain http and always writes its port (every link printed before https
// relays existed means this); `kbfs+https://` takes port 443 when none is written. The
// relay a link gives is canonical (`https://h:443` is `https://h`), as Python's.
// Refused with one line that never repeats a user name or password: user info, a missing
// (kbfs://), empty, zero, signed or out-of-range port, spaces or control characters in the
// host, a malformed share id, '.', '..', NUL or backslash in the path (plain or
// %-encoded), a scheme in capitals (`KBFS://`) and `kbfs+http://` (one spelling per relay).
// Stricter than Python in two ways, neither refusing a link Python writes (its `quote`
// encodes all of these): a raw '?', '#' or space in the path, and bad %-encoding.
//
// What it does not do: no network (whether the share or path exists is the relay's
// answer), no imports, so the web page's file panel (kbfs/web/static/file.js) writes its
// links with it without loading the hashing code.

export class SourceError extends Error {
  constructor(message) {
    super(message);
    this.name = 'SourceError';
  }
}

export const HTTP_SCHEME = 'kbfs://';
export const HTTPS_SCHEME = 'kbfs+https://';
export const SYNTAX = 'kbfs://HOST:PORT/SHARE_ID/PATH (http relay) or kbfs+https://HOST[:PORT]/SHARE_ID/PATH';
const SHARE_ID_RE = /^[a-z2-7]{16,64}$/; // protocol.SHARE_ID_RE
const PORT_RE = /^[0-9]{1,5}$/; // ASCII digits only, as kbfsurl._PORT_RE
const MAX_PATH_CHARS = 4096; // protocol.MAX_PATH_BYTES
const MAX_PATH_DEPTH = 256; // protocol.MAX_PATH_DEPTH
// What Python's str.isprintable() calls unprintable (every separator but ' ', every
// control, format, surrogate, private-use or unassigned code point), and its isspace().
const UNPRINTABLE = /[\p{C}\p{Zl}\p{Zp}\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]/u;
const UNPRINTABLE_ALL = new RegExp(UNPRINTABLE.source, 'gu');

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

// Whether TEXT claims to be a kbfs link (scheme `kbfs` or `kbfs+...`, any case): such text
// goes to parseLink, which says what is wrong with it rather than "unknown kind of source".
export function isLink(text) {
  const at = text.indexOf('://');
  if (at < 0) return false;
  const low = text.slice(0, at).toLowerCase();
  return low === 'kbfs' || low.startsWith('kbfs+');
}

// TEXT for an error line: no user name or password, no control characters, bounded.
export function shown(text) {
  const chars = [...String(text).replace(/(:\/\/)[^/@]*@/, '$1').replace(UNPRINTABLE_ALL, '?')];
  return chars.slice(0, 120).join('') + (chars.length > 120 ? '…' : '');
}

// Python's repr() of a str, for messages worded as kbfsurl.py's.
function repr(s) {
  const q = s.includes("'") && !s.includes('"') ? '"' : "'";
  const esc = { '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t', [q]: `\\${q}` };
  const hex = (c) => {
    const n = c.codePointAt(0);
    const [tag, width] = n < 0x100 ? ['x', 2] : n < 0x10000 ? ['u', 4] : ['U', 8];
    return `\\${tag}${n.toString(16).padStart(width, '0')}`;
  };
  return q + [...s].map((c) => esc[c] ?? (UNPRINTABLE.test(c) ? hex(c) : c)).join('') + q;
}

function schemeOf(text) {
  if (text.startsWith(HTTP_SCHEME)) return 'http';
  if (text.startsWith(HTTPS_SCHEME)) return 'https';
  const low = text.slice(0, text.indexOf('://')).toLowerCase();
  if (`${low}://` === HTTP_SCHEME || `${low}://` === HTTPS_SCHEME) {
    throw new SourceError(`${shown(text)}: write the scheme in lower case, ${low}://`);
  }
  if (low === 'kbfs+http') {
    throw new SourceError(`${shown(text)}: a link to an http relay is kbfs://HOST:PORT/... (kbfs+https:// for https)`);
  }
  throw new SourceError(`${shown(text)}: unknown kind of kbfs link; expected ${SYNTAX}`);
}

function relayOf(text, scheme, hostport) {
  const fail = (why) => new SourceError(`${shown(text)}: ${why}`);
  if (hostport.includes('@')) throw fail('a kbfs link carries no user name or password');
  if (/\s/.test(hostport) || UNPRINTABLE.test(hostport)) throw fail('the host holds a space or control character');
  let host;
  let tail;
  if (hostport.startsWith('[')) { // an IPv6 literal: [::1]:8443
    const end = hostport.indexOf(']') + 1;
    if (!end) throw fail(`${repr(hostport.slice(0, 80))} is not HOST:PORT`);
    [host, tail] = [hostport.slice(0, end), hostport.slice(end)];
  } else { // a second ':' lands in the port and fails its check
    const colon = hostport.indexOf(':');
    [host, tail] = colon < 0 ? [hostport, ''] : [hostport.slice(0, colon), hostport.slice(colon)];
  }
  if (!host) throw fail(`no host; expected ${SYNTAX}`);
  if (tail && !tail.startsWith(':')) throw fail(`${repr(hostport.slice(0, 80))} is not HOST:PORT`);
  let port = scheme === 'https' ? 443 : 0;
  if (tail) {
    const text = tail.slice(1);
    if (!PORT_RE.test(text) || !(Number(text) > 0 && Number(text) < 65536)) {
      throw fail(`port ${repr(text.slice(0, 20))} is not a number from 1 to 65535`);
    }
    port = Number(text);
  } else if (scheme === 'http') {
    throw fail('a kbfs:// link writes its port (kbfs://HOST:PORT/...); for an https relay on port 443 write kbfs+https://HOST/...');
  }
  const base = relayBase(`${scheme}://${host}:${port}`); // drops a default port, as canonical_relay
  if (!base) {
    const why = /[?#]/.test(host) ? 'has a path, query or fragment: a relay answers at the root of its host' : 'has no valid host';
    throw fail(`host ${repr(host.slice(0, 80))} ${why}`);
  }
  return base;
}

// A share-relative path, decoded once: no '.', '..', NUL or backslash (protocol.safe_relpath).
function safeRelpath(path) {
  if (path.length > MAX_PATH_CHARS) throw new SourceError('path too long');
  if (path.includes('\0') || path.includes('\\')) throw new SourceError('path contains NUL or backslash');
  const parts = path.split('/').filter((p) => p !== '');
  if (parts.length > MAX_PATH_DEPTH) throw new SourceError('path too deep');
  for (const p of parts) if (p === '.' || p === '..') throw new SourceError(`path part ${repr(p)} is not allowed`);
  return parts.join('/');
}

// The {relay, share, path} a link in one of the two spellings names (path decoded and safe,
// "" for the share's top folder), else SourceError with one line. WANT_SHARE false also
// takes a link naming only a relay (share "").
export function parseLink(text, wantShare = true) {
  const scheme = schemeOf(text);
  const rest = text.slice(text.indexOf('://') + 3);
  const slash = rest.indexOf('/');
  const [hostport, after] = slash < 0 ? [rest, ''] : [rest.slice(0, slash), rest.slice(slash + 1)];
  const relay = relayOf(text, scheme, hostport);
  const cut = after.indexOf('/');
  const [share, raw] = cut < 0 ? [after, ''] : [after.slice(0, cut), after.slice(cut + 1)];
  if (!share) {
    if (wantShare || raw) throw new SourceError(`${shown(text)}: no share id; expected ${SYNTAX}`);
    return { relay, share: '', path: '' };
  }
  if (!SHARE_ID_RE.test(share)) throw new SourceError(`${shown(text)}: malformed share id ${repr(share.slice(0, 80))}`);
  if (/[?#\s]/.test(raw)) throw new SourceError(`${shown(text)}: a kbfs link's path has no query, fragment or spaces (write them %-encoded)`);
  let decoded;
  try {
    decoded = decodeURIComponent(raw);
  } catch {
    throw new SourceError(`${shown(text)}: bad percent-encoding`);
  }
  try {
    return { relay, share, path: safeRelpath(decoded) };
  } catch (e) {
    throw new SourceError(`${shown(text)}: ${e.message}`);
  }
}

// The link of the relay at RELAY_URL, without a slash: `kbfs://HOST:PORT` (the port always
// written) or `kbfs+https://HOST[:PORT]` (no :443), as kbfsurl.prefix.
export function linkPrefix(relayUrl) {
  let u = null;
  try {
    u = new URL(relayUrl);
  } catch { /* refused below */ }
  if (u?.protocol === 'http:' && u.hostname) return `${HTTP_SCHEME}${u.hostname}:${u.port || 80}`;
  if (u?.protocol === 'https:' && u.hostname) return `${HTTPS_SCHEME}${u.host}`; // URL drops :443
  throw new SourceError(`relay URL ${shown(relayUrl)} must be http:// or https://`);
}

// Python's quote(part, safe='/'): all but letters, digits and _.-~ %-encoded.
const quote = (path) => path.split('/')
  .map((p) => encodeURIComponent(p).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`))
  .join('/');

// The link to PATH (share-relative, not encoded) of share SHARE on RELAY_URL, as kbfsurl.link.
export function kbfsLink(relayUrl, share, path = '') {
  return `${linkPrefix(relayUrl)}/${share}/${quote(path)}`;
}
