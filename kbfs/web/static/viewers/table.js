// A paged table of a 2-D array stored row after row (rows x columns of one dtype) from
// byte DATASTART: reads only the rows of the page shown (ROWS_PER_PAGE rows at a time).
import { fill, h } from '../dom.js';
import { DTYPES, decode, fmtValue } from './dtypes.js';

export const ROWS_PER_PAGE = 100;
const MAX_COLUMNS = 64;

/** Show the array; returns show(page) for callers that page by hand. */
export async function arrayTable(el, ctx, { dataStart, rows, columns, dtype, little = true }) {
  const item = DTYPES[dtype].size;
  const rowBytes = columns * item;
  const pages = Math.max(1, Math.ceil(rows / ROWS_PER_PAGE));
  const shownCols = Math.min(columns, MAX_COLUMNS);
  const table = h('table', { class: 'array-view', id: 'array-view' });
  const where = h('span', { class: 'muted', id: 'array-where' });
  let page = 0;
  const show = async (p) => {
    page = Math.max(0, Math.min(pages - 1, p));
    const first = page * ROWS_PER_PAGE;
    const count = Math.min(ROWS_PER_PAGE, rows - first);
    if (count <= 0) { fill(table); where.textContent = 'no rows'; return; }
    // Columns past MAX_COLUMNS are not shown, but rows are contiguous: one read per page.
    const bytes = await ctx.read(dataStart + first * rowBytes, count * rowBytes);
    if (!ctx.alive()) return;
    const values = decode(bytes, dtype, little);
    const head = h('tr', {}, h('th', {}, ''), Array.from({ length: shownCols }, (_, c) => h('th', {}, String(c))),
      columns > shownCols ? h('th', {}, `… ${columns - shownCols} more`) : null);
    const body = [];
    for (let r = 0; r < count && (r + 1) * columns <= values.length; r++) {
      const cells = [];
      for (let c = 0; c < shownCols; c++) cells.push(h('td', {}, fmtValue(values[r * columns + c], dtype)));
      body.push(h('tr', {}, h('th', {}, String(first + r)), cells));
    }
    fill(table, h('thead', {}, head), h('tbody', {}, body));
    where.textContent = `rows ${first}–${first + count - 1} of ${rows} (page ${page + 1} of ${pages})`;
  };
  el.append(h('div', { class: 'controls' },
    h('button', { type: 'button', class: 'prev', onclick: () => show(page - 1) }, '◀ previous'),
    h('button', { type: 'button', class: 'next', onclick: () => show(page + 1) }, 'next ▶'), ' ', where),
  h('div', { class: 'scroller' }, table));
  await show(0);
  return show;
}
