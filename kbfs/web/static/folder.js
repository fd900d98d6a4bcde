// One folder of a share: breadcrumbs, its folders and files (names, sizes, dates), and the
// panel of the file chosen (`#NAME`). A private share asks for its token here (401).
import { ApiError, forgetToken, getJSON, listPath, setToken, tokenFor } from './api.js';
import { fill, fmtDate, fmtSize, h, visible } from './dom.js';
import { showFile } from './file.js';

export async function showFolder(main, shareId, folder) {
  const share = { id: shareId, name: shareId, private: false, folder };
  crumbs(share);
  fill(main, h('p', { class: 'muted' }, 'Loading…'));
  let listing;
  try {
    listing = await getJSON(listPath(shareId, folder), tokenFor(shareId));
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return askToken(main, shareId, folder, !!tokenFor(shareId));
    fill(main, h('p', { class: 'error', id: 'error' }, `Could not list this folder: ${err.message}`));
    return;
  }
  share.token = tokenFor(shareId);
  share.private = !!share.token;
  try {  // the share's readable name (the listing has only its id)
    const entry = (await getJSON('/api/shares', share.token)).find((s) => s.id === shareId);
    if (entry) { share.name = entry.name || shareId; share.private = entry.private; }
  } catch { /* keep the id */ }
  crumbs(share);
  document.title = `kbfs · ${visible(share.name)}${folder ? '/' + visible(folder) : ''}`;
  const panel = h('section', { id: 'file-panel', class: 'panel' });
  const rows = [];
  if (folder) {
    const up = folder.split('/').slice(0, -1).join('/');
    rows.push(h('tr', { class: 'dir' }, h('td', {}, h('a', { href: listPath(shareId, up) }, '../')),
      h('td', {}), h('td', {})));
  }
  for (const d of listing.dirs) {
    rows.push(h('tr', { class: 'dir' },
      h('td', {}, h('a', { href: listPath(shareId, folder ? `${folder}/${d}` : d), class: 'dir-link' },
        visible(d) + '/')),
      h('td', {}), h('td', {})));
  }
  const byName = new Map();
  for (const f of listing.files) {
    byName.set(f.name, f);
    const link = h('a', { href: '#' + encodeURIComponent(f.name), class: 'file-link' }, visible(f.name));
    rows.push(h('tr', { class: 'file', dataset: { name: f.name } },
      h('td', {}, link), h('td', { class: 'num' }, fmtSize(f.size)), h('td', {}, fmtDate(f.mtime))));
  }
  const table = h('table', { class: 'listing', id: 'folder-table' },
    h('thead', {}, h('tr', {}, h('th', {}, 'name'), h('th', { class: 'num' }, 'size'), h('th', {}, 'modified'))),
    h('tbody', {}, rows));
  const empty = !listing.dirs.length && !listing.files.length
    ? h('p', { class: 'muted' }, 'This folder is empty.') : null;
  fill(main, h('div', { class: 'columns' }, h('div', { class: 'files' }, table, empty), panel),
    share.token ? h('p', { class: 'muted' }, 'Using the token kept in this tab. ',
      h('button', { type: 'button', id: 'forget-token', onclick: () => { forgetToken(shareId); location.reload(); } },
        'forget it')) : null);
  const open = () => {
    const name = decodeURIComponent(location.hash.slice(1));
    for (const tr of table.querySelectorAll('tr.file')) tr.classList.toggle('chosen', tr.dataset.name === name);
    const f = byName.get(name);
    if (f) showFile(panel, share, f);
    else fill(panel, h('p', { class: 'muted' }, 'Choose a file to see its links and a preview.'));
  };
  window.onhashchange = open;
  open();
}

function crumbs(share) {
  const parts = share.folder ? share.folder.split('/') : [];
  const nav = [h('a', { href: '/' }, 'shares'), ' / ',
    h('a', { href: listPath(share.id, ''), id: 'share-name' }, visible(share.name))];
  parts.forEach((p, i) => {
    nav.push(' / ', h('a', { href: listPath(share.id, parts.slice(0, i + 1).join('/')) }, visible(p)));
  });
  fill(document.getElementById('crumbs'), nav);
}

function askToken(main, shareId, folder, refused) {
  const input = h('input', { type: 'password', id: 'token-input', autocomplete: 'off', size: 40,
    placeholder: 'kbfs1.…', 'aria-label': 'token' });
  const form = h('form', { id: 'token-form', class: 'token' },
    h('p', {}, refused ? 'The share refused the token this tab held. ' : '',
      'This share is private: paste the token its owner gave you (',
      h('code', {}, 'kbfs share token'), ' printed it). It is kept in this tab only and sent only to this relay.'),
    input, h('button', { type: 'submit' }, 'open'));
  if (refused) forgetToken(shareId);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    setToken(shareId, token);
    showFolder(main, shareId, folder);
  });
  fill(main, form);
  input.focus();
}
