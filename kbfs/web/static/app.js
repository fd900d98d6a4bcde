// The page's entry: which view the URL names. `/` lists the shares; a share's listing URL
// `/s/ID/list/FOLDER` (the same URL as the JSON API's, which the relay answers with this
// page for a browser's navigation) shows that folder; `#NAME` opens one of its files.
import { fill, h } from './dom.js';
import { showShares } from './shares.js';
import { showFolder } from './folder.js';

function route() {
  const main = document.getElementById('main');
  const m = /^\/s\/([^/]+)\/list(?:\/(.*))?$/.exec(location.pathname);
  try {
    if (location.pathname === '/') return showShares(main);
    if (m) {
      const folder = (m[2] || '').split('/').filter(Boolean).map(decodeURIComponent).join('/');
      return showFolder(main, decodeURIComponent(m[1]), folder);
    }
  } catch (err) {
    return fill(main, h('p', { class: 'error' }, String(err && err.message ? err.message : err)));
  }
  fill(main, h('p', { class: 'error' }, 'This page shows `/` and share listings only.'));
}

window.addEventListener('popstate', route);
route();
