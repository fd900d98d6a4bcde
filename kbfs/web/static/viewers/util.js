// Small helpers shared by the viewers.

/** NAME's extension, lower case, without the dot ('' if none). */
export function ext(name) {
  const m = /\.([^./]+)$/.exec(name);
  return m ? m[1].toLowerCase() : '';
}

/** Call MORE (async, returns false when there is nothing left) whenever SCROLLER is
 * scrolled near its end, one call at a time; also once now if SCROLLER is not yet full. */
export function moreOnScroll(scroller, more) {
  let busy = false;
  let done = false;
  const check = async () => {
    if (busy || done || !scroller.isConnected || scroller.clientHeight === 0) return;
    if (scroller.scrollTop + scroller.clientHeight < scroller.scrollHeight - 200) return;
    busy = true;
    try { done = !(await more()); } finally { busy = false; }
    if (!done) requestAnimationFrame(check);
  };
  scroller.addEventListener('scroll', check);
  return check;
}

/** Parse a number a user typed: decimal, or hex with 0x. NaN if neither. */
export function parseNumber(text) {
  const t = String(text).trim().replaceAll('_', '');
  if (/^0x[0-9a-f]+$/i.test(t)) return parseInt(t.slice(2), 16);
  if (/^[0-9]+$/.test(t)) return parseInt(t, 10);
  return NaN;
}
