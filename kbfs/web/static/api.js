// The relay's JSON API as the page uses it, and the page's tokens for private shares.
// A token is kept in sessionStorage (this tab only, gone when it closes) under its share's
// id, and sent only in an Authorization header to this relay: never in a URL.

const KEY = 'kbfs-token:';

export function tokenFor(shareId) {
  try { return sessionStorage.getItem(KEY + shareId) || ''; } catch { return ''; }
}

export function setToken(shareId, token) {
  sessionStorage.setItem(KEY + shareId, token);
}

export function forgetToken(shareId) {
  sessionStorage.removeItem(KEY + shareId);
}

/** Every token this tab holds (for /api/shares, which lists a private share only to a
 * request its token accepts: one request per token, as `kbfs ls RELAY` does). */
export function allTokens() {
  const out = [];
  for (let i = 0; i < sessionStorage.length; i++) {
    const k = sessionStorage.key(i);
    if (k && k.startsWith(KEY)) out.push([k.slice(KEY.length), sessionStorage.getItem(k)]);
  }
  return out;
}

/** The share id a kbfs1 token names (its unverified claim), or ''. */
export function tokenShare(token) {
  const m = /^kbfs1\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]+$/.exec(token.trim());
  if (!m) return '';
  try {
    const b64 = m[1].replaceAll('-', '+').replaceAll('_', '/');
    const claim = JSON.parse(atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4)));
    return typeof claim.s === 'string' && /^[a-z2-7]{16,64}$/.test(claim.s) ? claim.s : '';
  } catch { return ''; }
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** GET a JSON answer of this relay (PATH starts with '/'), with TOKEN if given. */
export async function getJSON(path, token = '') {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch(path, { headers, cache: 'no-store', credentials: 'omit' });
  let body = null;
  try { body = await resp.json(); } catch { body = null; }
  if (!resp.ok) throw new ApiError(resp.status, (body && body.error) || `HTTP ${resp.status}`);
  return body;
}

/** The URL path of a share's folder listing, each path part percent-encoded. */
export function listPath(shareId, folder) {
  const rest = folder ? '/' + folder.split('/').map(encodeURIComponent).join('/') : '';
  return `/s/${encodeURIComponent(shareId)}/list${rest}`;
}

export function filePath(shareId, path) {
  return `/s/${encodeURIComponent(shareId)}/file/` + path.split('/').map(encodeURIComponent).join('/');
}
