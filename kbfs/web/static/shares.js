// The shares this relay lists: public ones, and private ones whose token this tab holds.
import { allTokens, getJSON, listPath, setToken, tokenShare } from './api.js';
import { fill, fmtDate, fmtSize, h, visible } from './dom.js';

export async function showShares(main) {
  document.title = 'kbfs · shares';
  fill(document.getElementById('crumbs'), h('span', {}, 'shares'));
  const list = h('div', { id: 'shares' }, h('p', { class: 'muted' }, 'Loading shares…'));
  fill(main, h('h1', {}, 'Shares on this relay'), list, tokenBox());
  let shares;
  try {
    shares = await getJSON('/api/shares');
  } catch (err) {
    fill(list, h('p', { class: 'error' }, `Could not list the shares: ${err.message}`));
    return;
  }
  // Private shares appear only to a request carrying their token: ask once per token held.
  const seen = new Set(shares.map((s) => s.id));
  for (const [id, token] of allTokens()) {
    if (seen.has(id)) continue;
    try {
      for (const s of await getJSON('/api/shares', token)) {
        if (!seen.has(s.id)) { seen.add(s.id); shares.push(s); }
      }
    } catch { /* a refused token: the share stays unlisted */ }
  }
  if (!shares.length) {
    fill(list, h('p', { class: 'muted' }, 'No share is connected to this relay right now.'));
    return;
  }
  shares.sort((a, b) => String(a.name).localeCompare(String(b.name)));
  fill(list, h('table', { class: 'listing', id: 'share-table' },
    h('thead', {}, h('tr', {}, h('th', {}, 'name'), h('th', {}, 'files'), h('th', { class: 'num' }, 'size'),
      h('th', {}, 'connected since'), h('th', {}, 'id'))),
    h('tbody', {}, shares.map((s) => h('tr', { class: 'share' },
      h('td', {}, h('a', { href: listPath(s.id, ''), class: 'share-link' }, visible(s.name || s.id)),
        s.private ? h('span', { class: 'badge' }, 'private') : null,
        s.scanning ? h('span', { class: 'badge muted' }, 'scanning') : null),
      h('td', { class: 'num' }, String(s.files)),
      h('td', { class: 'num' }, fmtSize(s.bytes)),
      h('td', {}, fmtDate(s.connected_since)),
      h('td', {}, h('code', {}, s.id)))))));
}

function tokenBox() {
  const input = h('input', { type: 'password', id: 'token-input', autocomplete: 'off', size: 40,
    placeholder: 'kbfs1.…', 'aria-label': 'token' });
  const msg = h('span', { class: 'muted' });
  const form = h('form', { id: 'token-form', class: 'token' },
    h('label', { for: 'token-input' }, 'Have a token for a private share? '), input,
    h('button', { type: 'submit' }, 'open'), ' ', msg);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    const id = tokenShare(token);
    if (!id) { msg.textContent = 'That is not a kbfs token (kbfs1.…).'; return; }
    setToken(id, token);
    input.value = '';
    location.assign(listPath(id, ''));
  });
  return form;
}
