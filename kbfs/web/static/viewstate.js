// View links: a view of content (its SHA-1, size and tree root, so any relay's bytes are
// verified) and a view state (channels, time window, amplitude), in a URL's fragment:
//   http://RELAY/v/#src=sha1://SHA1/NAME&n=SIZE&r=ROOT&bs=65536&ch=0-31&t=0&w=8192&a=2000
// The fragment never reaches a server (nor a Referer). `share=ID` marks a private share's
// content (the page then asks for that share's token); `token=` only when the user chose to
// put the token in the link. Every value is checked here; a bad one is one ViewError line.
//
// What it does not do: name relays (a relay's page reads from its own relay; an exported
// page from the relays its exporter chose, kbfs/viewexport.py), or read anything.

export class ViewError extends Error {}

const SHA1_RE = /^[0-9a-f]{40}$/i;
const ROOT_RE = /^[0-9a-f]{64}$/i;
const INT_RE = /^[0-9]{1,16}$/;
const SHARE_RE = /^[a-z2-7]{16,64}$/;
const TOKEN_RE = /^kbfs1\.[A-Za-z0-9_-]{1,2000}\.[A-Za-z0-9_-]{1,200}$/;
export const ALGORITHM = 'blake3-merkle-1';

function int(text, what, min = 0) {
  if (!INT_RE.test(text)) throw new ViewError(`view link: ${what} must be a whole number`);
  const v = Number(text);
  if (!Number.isSafeInteger(v) || v < min) throw new ViewError(`view link: ${what} must be a whole number from ${min}`);
  return v;
}

/** The state part alone ('ch=0-7&t=100&w=4096&a=500', any order, each optional) ->
 * {ch: [first, last] | null, t, w, a} with null for what is not given. */
export function parseState(params) {
  const p = typeof params === 'string' ? new URLSearchParams(params) : params;
  const state = { ch: null, t: null, w: null, a: null };
  if (p.has('ch')) {
    const m = /^([0-9]{1,6})(?:-([0-9]{1,6}))?$/.exec(p.get('ch'));
    if (!m) throw new ViewError('view link: ch must be a channel or a range FIRST-LAST (e.g. 0-31)');
    const a = Number(m[1]);
    const b = m[2] === undefined ? a : Number(m[2]);
    if (b < a) throw new ViewError('view link: ch range ends before it starts');
    state.ch = [a, b];
  }
  if (p.has('t')) state.t = int(p.get('t'), 't (first timepoint)');
  if (p.has('w')) state.w = int(p.get('w'), 'w (timepoints on screen)', 1);
  if (p.has('a')) {
    const text = p.get('a');
    const a = /^[0-9.eE+-]{1,24}$/.test(text) ? Number(text) : NaN;
    if (!Number.isFinite(a) || a <= 0) throw new ViewError('view link: a (amplitude) must be a positive number');
    state.a = a;
  }
  return state;
}

/** A fragment ('#src=...' or 'src=...') -> {sha1, name, size, root, bs, share, token, state}. */
export function parseView(fragment) {
  const text = String(fragment).replace(/^#/, '');
  if (text.length > 8192) throw new ViewError('view link: longer than 8192 characters');
  const p = new URLSearchParams(text);
  const src = p.get('src') || '';
  const m = /^sha1:\/\/([^/]*)(?:\/(.*))?$/.exec(src);
  if (!m || !SHA1_RE.test(m[1])) throw new ViewError('view link: src must be sha1://SHA1[/NAME] with 40 hex digits');
  let name;
  try { name = decodeURIComponent(m[2] || ''); } catch { throw new ViewError('view link: bad percent-encoding in the name'); }
  name = name.split('/').filter(Boolean).pop() || m[1].toLowerCase();
  if (name.length > 255 || name.includes('\0')) throw new ViewError('view link: the name is too long or holds NUL');
  if (!p.has('n')) throw new ViewError('view link: n (the size in bytes) is missing');
  const size = int(p.get('n'), 'n (size)');
  const root = p.get('r') || '';
  if (!ROOT_RE.test(root)) throw new ViewError('view link: r (the tree root) must be 64 hex digits');
  const bs = p.has('bs') ? int(p.get('bs'), 'bs (block size)', 4096) : 65536;
  if (bs > 2 ** 30 || (bs & (bs - 1)) !== 0) throw new ViewError('view link: bs must be a power of two from 4096 to 2^30');
  const share = p.get('share') || '';
  if (share && !SHARE_RE.test(share)) throw new ViewError('view link: share is not a share id');
  const token = p.get('token') || '';
  if (token && !TOKEN_RE.test(token)) throw new ViewError('view link: token is not a kbfs share token');
  return { sha1: m[1].toLowerCase(), name, size, root: root.toLowerCase(), bs, share, token, state: parseState(p) };
}

/** The fragment of a view (no '#'): src, n, r, bs, [share], state, [token] in that order. */
export function viewFragment(view, state, token = '') {
  const parts = [`src=sha1://${view.sha1}/${encodeURIComponent(view.name)}`, `n=${view.size}`,
    `r=${view.root}`, `bs=${view.bs}`];
  if (view.share) parts.push(`share=${view.share}`);
  if (state.ch) parts.push(`ch=${state.ch[0]}-${state.ch[1]}`);
  for (const k of ['t', 'w']) if (state[k] !== null && state[k] !== undefined) parts.push(`${k}=${state[k]}`);
  if (state.a) parts.push(`a=${+state.a.toPrecision(6)}`);
  if (token) parts.push(`token=${encodeURIComponent(token)}`);
  return parts.join('&');
}

/** The pointer object kbfs.js opens for a view (the root makes every range verifiable). */
export function viewPointer(view) {
  return {
    original_checksum: view.sha1, original_size: view.size, original_fcs: '', original_path: view.name,
    prv_version: '0.11', kbfs_tree: { algorithm: ALGORITHM, block_size: view.bs, root: view.root },
  };
}
