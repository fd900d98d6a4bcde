// CSV / TSV: a table of the file's head (the first line as the header), 64 KiB at a time,
// more rows when scrolled to the end. Quoted fields ("a,b", "say ""hi""", line breaks
// inside quotes) are kept whole across chunk boundaries. Cells are text, never markup.
import { h } from '../dom.js';
import { ext, moreOnScroll } from './util.js';

const CHUNK = 64 * 1024;
const MAX_COLUMNS = 200;

/** Split TEXT into complete records; returns [records, rest] where REST is the unfinished
 * last record (no line end yet, or an open quote), kept for the next chunk. */
export function parseRecords(text, sep, final = false) {
  const records = [];
  let row = [];
  let field = '';
  let quoted = false;
  let start = 0; // where the current record began (for REST)
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') { field += '"'; i++; } else quoted = false;
      } else field += c;
    } else if (c === '"' && field === '') quoted = true;
    else if (c === sep) { row.push(field); field = ''; }
    else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') i++;
      row.push(field); records.push(row); row = []; field = ''; start = i + 1;
    } else field += c;
  }
  if (final && (field !== '' || row.length)) { row.push(field); records.push(row); start = text.length; }
  return [records, text.slice(start)];
}

export const viewer = {
  id: 'csv',
  label: 'table (CSV)',
  match: (name) => ['csv', 'tsv'].includes(ext(name)),
  async render(el, ctx) {
    const sep = ext(ctx.name) === 'tsv' ? '\t' : ',';
    const thead = h('thead');
    const tbody = h('tbody');
    const table = h('table', { class: 'csv-view', id: 'csv-view' }, thead, tbody);
    const scroller = h('div', { class: 'scroller' }, table);
    el.append(scroller);
    const decoder = new TextDecoder('utf-8');
    let offset = 0;
    let rest = '';
    let rows = 0;
    const cells = (tag, r) => h('tr', {}, r.slice(0, MAX_COLUMNS).map((c) => h(tag, {}, c)));
    const more = async () => {
      if (offset >= ctx.file.size || !ctx.alive()) return false;
      const bytes = await ctx.read(offset, CHUNK);
      offset += bytes.length;
      const end = offset >= ctx.file.size;
      const [records, left] = parseRecords(rest + decoder.decode(bytes, { stream: !end }), sep, end);
      rest = left;
      for (const r of records) {
        if (rows === 0 && !thead.firstChild) thead.append(cells('th', r));
        else { tbody.append(cells('td', r)); rows++; }
      }
      ctx.status(`${rows} rows from the first ${offset} bytes${end ? ' (whole file)' : '; scroll for more'}`);
      return !end;
    };
    await more();
    await moreOnScroll(scroller, more)();
  },
};
