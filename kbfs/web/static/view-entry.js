// The entry of the view page. On a relay (`/v/`): read from this relay, links point here.
// In an exported page (`kbfs view export`, <body data-exported>): read from the relays and
// open the view its ./view.json names (the address's fragment may change the state).
import { fill, h } from './dom.js';
import { startView } from './view.js';

const main = document.getElementById('main');
if (document.body.dataset.exported !== undefined) {
  try {
    const resp = await fetch('./view.json', { cache: 'no-store', credentials: 'omit' });
    if (!resp.ok) throw new Error(`view.json: HTTP ${resp.status}`);
    const conf = await resp.json();
    if (!Array.isArray(conf.relays) || !conf.relays.length || typeof conf.view !== 'string') {
      throw new Error('view.json: expected {"relays": [...], "view": "src=..."}');
    }
    const here = location.href.split('#')[0];
    await startView(main, { relays: conf.relays, linkBase: here }, conf.view);
  } catch (err) {
    fill(main, h('p', { class: 'error', id: 'view-error' }, `This exported view cannot start: ${err.message || err}`));
  }
} else {
  startView(main, { relays: [location.origin], linkBase: `${location.origin}/v/` });
}
