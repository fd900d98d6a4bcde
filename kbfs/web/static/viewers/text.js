// Text: the file's head as UTF-8 (invalid bytes shown as U+FFFD), 64 KiB at a time, more
// when scrolled to the end. Text goes in as text (textContent), never as markup.
import { h } from '../dom.js';
import { moreOnScroll } from './util.js';

const CHUNK = 64 * 1024;
const TEXT = /\.(txt|md|rst|log|json|jsonl|ya?ml|toml|ini|cfg|conf|py|js|m|c|h|cpp|r|sh|xml|html?|tex|csv|tsv|prv|prvdir)$/i;

export const viewer = {
  id: 'text',
  label: 'text',
  match: (name) => TEXT.test(name),
  async render(el, ctx) {
    const pre = h('pre', { class: 'text-view', id: 'text-view' });
    const scroller = h('div', { class: 'scroller' }, pre);
    el.append(scroller);
    const decoder = new TextDecoder('utf-8');
    let offset = 0;
    const more = async () => {
      if (offset >= ctx.file.size || !ctx.alive()) return false;
      const bytes = await ctx.read(offset, CHUNK);
      offset += bytes.length;
      pre.append(document.createTextNode(decoder.decode(bytes, { stream: offset < ctx.file.size })));
      ctx.status(offset < ctx.file.size ? `first ${offset} bytes; scroll for more` : 'whole file');
      return offset < ctx.file.size;
    };
    await more();
    await moreOnScroll(scroller, more)();
  },
};
