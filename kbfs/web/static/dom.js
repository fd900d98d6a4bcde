// DOM building without HTML parsing: every string becomes a text node, attributes are set
// one by one (never innerHTML), so names from shares (HTML, quotes, control characters)
// show as text and never run. Control characters are shown as visible escapes.

/** h('a', {href: '/x', class: 'c'}, 'text', child, ...) -> element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace EL's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** NAME with control characters (C0, DEL, C1, line/paragraph separators, bidi controls)
 * shown as \xNN / \u{...}: a name cannot fake a line break or reorder what is shown. */
export function visible(name) {
  return String(name).replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]/gu,
    (c) => {
      const code = c.codePointAt(0);
      return code < 256 ? '\\x' + code.toString(16).padStart(2, '0') : '\\u{' + code.toString(16) + '}';
    });
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
export function fmtSize(n) {
  if (n < 1024) return `${n} B`;
  let i = 0;
  let v = n;
  while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v < 10 ? 2 : 1)} ${UNITS[i]}`;
}

export function fmtDate(seconds) {
  if (!Number.isFinite(seconds)) return '';
  const d = new Date(seconds * 1000);
  if (Number.isNaN(d.getTime())) return '';
  return d.toISOString().slice(0, 16).replace('T', ' ');
}

/** A shell word: single-quoted unless it is plainly safe. */
export function shellQuote(word) {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", "'\\''")}'`;
}

/** A button copying TEXT to the clipboard (falls back to selecting it). */
export function copyButton(text, label = 'copy') {
  const b = h('button', { type: 'button', class: 'copy', title: 'copy to the clipboard' }, label);
  b.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(text);
      b.textContent = 'copied';
    } catch {
      b.textContent = 'select + Ctrl-C';
    }
    setTimeout(() => { b.textContent = label; }, 1500);
  });
  return b;
}
