// Multichannel traces on a canvas: one lane per channel, each pixel column drawn as the
// vertical span from its min to its max (so a zoomed-out screen shows every spike's
// extent, not an aliased sample), joined to its neighbours; columns without data (a
// sparse overview's gaps) are left empty. A time axis in timepoints below.
//
// What it does not do: read or decimate data (mdaformat.js), handle input (mda.js).

export const GUTTER = 56; // px left of the traces, for the channel labels
export const AXIS = 20; // px below, for the time axis

const COLORS = ['#1f4fb4', '#b4461f', '#2a7d3a', '#7b2fa6'];

function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

/** Draw on CANVAS (already sized): DEC = {min, max} per shown channel (mdaformat.decimate),
 * LABELS per channel, GAPS: leave columns without data empty (else join across them), AMP = the value that fills half a lane, T0 / W the window, NOTE a
 * line drawn over the traces (e.g. the overview's caveat). */
export function drawTraces(canvas, { dec, labels, amp, t0, w, note, gaps = false }) {
  const g = canvas.getContext('2d');
  const width = canvas.width - GUTTER;
  const height = canvas.height - AXIS;
  g.fillStyle = '#fff';
  g.fillRect(0, 0, canvas.width, canvas.height);
  const lanes = labels.length;
  const lane = height / Math.max(1, lanes);
  g.font = '11px system-ui, sans-serif';
  g.textBaseline = 'middle';
  for (let c = 0; c < lanes; c++) {
    const mid = lane * (c + 0.5);
    const k = (lane / 2) / amp;
    g.fillStyle = '#687385';
    g.fillText(labels[c], 4, mid);
    g.strokeStyle = '#eef0f4';
    g.beginPath(); g.moveTo(GUTTER, mid); g.lineTo(canvas.width, mid); g.stroke();
    g.strokeStyle = COLORS[c % COLORS.length];
    g.lineWidth = 1;
    g.beginPath();
    let open = false;
    const lo = dec.min[c];
    const hi = dec.max[c];
    for (let x = 0; x < width; x++) {
      if (Number.isNaN(lo[x])) { if (gaps) open = false; continue; } // zoomed in: join samples
      const y1 = Math.max(mid - lane / 2, Math.min(mid + lane / 2, mid - hi[x] * k));
      const y2 = Math.max(mid - lane / 2, Math.min(mid + lane / 2, mid - lo[x] * k));
      const px = GUTTER + x + 0.5;
      if (open) g.lineTo(px, y1); else g.moveTo(px, y1);
      g.lineTo(px, y2 + 0.5);
      open = true;
    }
    g.stroke();
  }
  // time axis
  g.fillStyle = '#687385';
  g.strokeStyle = '#c8ced8';
  g.textBaseline = 'top';
  const step = niceStep(w, width / 110);
  for (let t = Math.ceil(t0 / step) * step; t < t0 + w; t += step) {
    const x = GUTTER + ((t - t0) / w) * width;
    g.beginPath(); g.moveTo(x, height); g.lineTo(x, height + 4); g.stroke();
    g.fillText(String(t), x + 2, height + 5);
  }
  if (note) {
    g.textBaseline = 'top';
    g.fillStyle = 'rgba(255,255,255,.85)';
    const tw = g.measureText(note).width;
    g.fillRect(GUTTER + 4, 4, tw + 10, 18);
    g.fillStyle = '#6b4300';
    g.fillText(note, GUTTER + 9, 7);
  }
}
