// One file's panel: its download link, the sha1:// URI and kbfs link to copy, its .prv
// pointer to download, the `kbfs download` / `kbfs mount` lines, and a preview.
import { filePath } from './api.js';
import { copyButton, fill, fmtDate, fmtSize, h, shellQuote, visible } from './dom.js';
import { kbfsLink } from './lib/kbfsurl.js';
import { showPreview } from './preview.js';

export function showFile(panel, share, f) {
  const path = share.folder ? `${share.folder}/${f.name}` : f.name;
  const sha1 = f.prv.original_checksum;
  const sha1Uri = `sha1://${sha1}/${encodeURIComponent(f.name)}`;
  // The relay is this page's origin: kbfs+https://HOST[:PORT] on an https page, and
  // kbfs://HOST:PORT, the port written even when it is 80, on an http one.
  const kbfsUrl = kbfsLink(location.origin, share.id, path);
  const folderUrl = kbfsLink(location.origin, share.id, share.folder ? `${share.folder}/` : '');
  const pointer = { ...f.prv, kbfs_sources: [location.origin] };
  const prvUrl = URL.createObjectURL(new Blob([JSON.stringify(pointer, null, 4) + '\n'],
    { type: 'application/json' }));
  const download = share.private
    ? h('span', { class: 'muted' }, 'private share: use the command line below (a plain link cannot carry the token)')
    : h('a', { href: filePath(share.id, path), download: f.name, id: 'download-link', class: 'button' }, 'download');
  const lines = [
    ...(share.private ? ['export KBFS_TOKEN=…   # your token for this share'] : []),
    `kbfs download ${shellQuote(kbfsUrl)}`,
    `kbfs mount ${shellQuote(folderUrl)} ~/kbfs-mnt`,
  ];
  const row = (label, value, id) => h('tr', {}, h('th', {}, label),
    h('td', {}, h('code', { id }, value), ' ', copyButton(value)));
  fill(panel,
    h('h2', { id: 'file-name' }, visible(f.name)),
    h('p', { class: 'muted' }, `${fmtSize(f.size)} (${f.size} bytes) · modified ${fmtDate(f.mtime)}`),
    h('p', {}, download, ' ',
      h('a', { href: prvUrl, download: `${f.name}.prv`, id: 'prv-link', class: 'button' }, 'pointer (.prv)')),
    h('table', { class: 'links' }, h('tbody', {},
      row('sha1', sha1Uri, 'sha1-uri'), row('kbfs', kbfsUrl, 'kbfs-url'))),
    h('pre', { class: 'commands', id: 'commands' }, lines.join('\n')), copyButton(lines.join('\n'), 'copy commands'),
    h('div', { id: 'preview', class: 'preview' }));
  showPreview(panel.querySelector('#preview'), share, f);
}
