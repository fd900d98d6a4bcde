// The view page (`/v/#src=...`, viewstate.js): one content opened from a view link, shown
// in the .mda viewer at the link's state. On a relay it reads from that relay; an exported
// page (view-entry.js) from the relays in its view.json. A private share's content asks for
// the token (kept in sessionStorage, sent only in Authorization headers to those relays);
// a token the link itself carries (the user chose so) is taken and removed from the
// address bar at once, so a copy of the address no longer holds it.
//
// What it does not do: list shares or folders, or read from relays the link names.
import { setToken, tokenFor, tokenShare } from './api.js';
import { fill, fmtSize, h, visible } from './dom.js';
import { parseState, parseView, viewFragment, viewPointer } from './viewstate.js';
import { viewer as mda } from './viewers/mda.js';

// The fetch kbfs.js uses: the first request that is exactly the one view.html's first script
// asked at once (window.kbfsEarly: same URL, range and proof wanted, no token) gets that
// answer, once; kbfs.js checks it as any other, and its deadlines abort it as they would
// their own request (head and body). Every other request, or that one when the early
// request failed, goes out as usual.
function earlyFetch() {
  const early = window.kbfsEarly;
  window.kbfsEarly = undefined;
  let used = !early;
  return (url, init = {}) => {
    const h = init.headers || {};
    if (!used && url === early.url && h.Range === early.range && h['Kbfs-Want-Proof'] === early.want
      && !h.Authorization && Object.keys(h).length === 2) {
      used = true;
      const signal = init.signal;
      if (signal) {
        if (signal.aborted) early.abort(signal.reason);
        else signal.addEventListener('abort', () => early.abort(signal.reason), { once: true });
      }
      return early.answer.catch((err) => (signal && signal.aborted ? Promise.reject(err) : fetch(url, init)));
    }
    return fetch(url, init);
  };
}

function askToken(main, view, opts, why) {
  const input = h('input', { type: 'password', id: 'token-input', autocomplete: 'off', size: 40,
    placeholder: 'kbfs1.…', 'aria-label': 'token' });
  const form = h('form', { id: 'token-form', class: 'token' },
    h('p', {}, why, ' Paste the token its owner gave you (', h('code', {}, 'kbfs share token'),
      ' printed it). It is kept in this tab only and sent only to ', opts.relays.join(', '), '.'),
    input, ' ', h('button', { type: 'submit' }, 'open'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    setToken(view.share || tokenShare(token) || view.sha1, token);
    showView(main, view, { ...opts, token });
  });
  fill(main, form);
  input.focus();
}

/** Show VIEW (viewstate.parseView) in MAIN. OPTS: relays (base URLs), linkBase, token. */
export async function showView(main, view, opts) {
  const token = opts.token || view.token || (view.share ? tokenFor(view.share) : '') || tokenFor(view.sha1);
  if (view.token) {
    setToken(view.share || tokenShare(view.token) || view.sha1, view.token);
    history.replaceState(null, '', location.pathname + location.search + '#' + viewFragment(view, view.state));
    view = { ...view, token: '' };
  }
  if (view.share && !token) {
    return askToken(main, view, opts, 'This view is of a private share.');
  }
  document.title = `kbfs view · ${visible(view.name)}`;
  const status = h('span', { class: 'muted', id: 'preview-status' });
  const body = h('div', { class: 'preview-body', id: 'preview-body', dataset: { viewer: 'mda' } });
  const summary = h('span', { id: 'read-summary' }, 'bytes read: none');
  fill(main, h('h2', { id: 'file-name' }, visible(view.name)),
    h('p', { class: 'muted' }, `${fmtSize(view.size)} · sha1 ${view.sha1} · read from ${opts.relays.join(', ')}, `,
      'every byte verified in this browser against the link\'s tree root. ', status),
    body, h('p', { class: 'muted' }, summary));
  let file;
  try {
    const { openContent } = await import('./lib/kbfs.js');
    file = await openContent(viewPointer(view), { relays: opts.relays, token: token || undefined, fetch: earlyFetch() });
  } catch (err) {
    fill(body, h('p', { class: 'error', id: 'view-error' }, `Cannot open: ${err.message || err}`));
    return;
  }
  let total = 0;
  let count = 0;
  const read = async (offset, length) => {
    const bytes = await file.read(offset, Math.max(0, Math.min(length, file.size - offset)));
    total += bytes.length;
    count += 1;
    summary.textContent = `bytes read: ${fmtSize(total)} of ${fmtSize(file.size)} in ${count} reads`;
    return bytes;
  };
  const ctx = { file, read, name: view.name, alive: () => body.isConnected, status: (t) => { status.textContent = t; },
    state: view.state, share: view.share, private: !!view.share, token, linkBase: opts.linkBase,
    onState: (frag) => { history.replaceState(null, '', location.pathname + location.search + '#' + frag); } };
  try {
    await mda.render(body, ctx);
  } catch (err) {
    const missing = err && err.message && /no connected share|404/.test(err.message);
    if (missing && !token) {
      return askToken(main, view, opts, 'No relay gave this content without a token: if it is in a private share,');
    }
    fill(body, h('p', { class: 'error', id: 'view-error' }, `${mda.label}: ${err.message || err}`));
    return;
  }
  window.onhashchange = () => {
    try {
      const next = parseView(location.hash);
      if (next.sha1 !== view.sha1 || next.root !== view.root) { showView(main, next, opts); return; }
      if (ctx.update) ctx.update(next.state);
    } catch { /* a hand-edited fragment: keep the view */ }
  };
}

/** The page's entry for a view: parse the fragment (and an exported page's defaults). */
export function startView(main, opts, defaults = '') {
  try {
    const hash = location.hash.replace(/^#/, '');
    let view;
    if (!defaults) {
      view = parseView(hash);
    } else {  // an exported page: its own content; the address's fragment may change the state
      view = parseView(defaults);
      if (hash) {
        const given = /(^|&)src=/.test(hash) ? parseView(hash) : { sha1: view.sha1, state: parseState(hash) };
        if (given.sha1 !== view.sha1) throw new Error('this exported page shows one content only');
        const st = Object.fromEntries(Object.entries(given.state).filter(([, v]) => v !== null));
        view.state = { ...view.state, ...st };
      }
    }
    return showView(main, view, opts);
  } catch (err) {
    fill(main, h('p', { class: 'error', id: 'view-error' }, String(err.message || err)));
    window.onhashchange = () => location.reload(); // an edited link: try it
  }
}
