// Small helpers of the console's pages: elements and messages.

export const $ = (selector, root = document) => root.querySelector(selector);

/**
 * An element: h('button', {class: 'x', onclick: f, disabled: true}, 'text', child...).
 * Text is always set as text, never parsed as HTML.
 */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, '');
    else if (value !== false && value != null) element.setAttribute(name, value);
  }
  element.append(...children.filter((c) => c != null && c !== false));
  return element;
}

const shown = new Map();

/**
 * Show a message above the page: kind 'error', 'warning' or 'info'. One
 * with the same `key` replaces the last; `text` null removes it. `actions`:
 * [{label, class, run}] buttons that also close it; `timeout`: ms.
 */
export function message(text, kind = 'error', { key = null, timeout = 0, actions = [] } = {}) {
  if (key !== null && shown.has(key)) {
    shown.get(key).remove();
    shown.delete(key);
  }
  if (text == null) return null;
  const close = () => { element.remove(); if (key !== null && shown.get(key) === element) shown.delete(key); };
  const element = h('div', { class: `message ${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    h('span', { class: 'text' }, text),
    ...actions.map((a) => h('button', { type: 'button', class: a.class || '', onclick: () => { close(); a.run(); } }, a.label)),
    h('button', { type: 'button', class: 'close', title: 'Dismiss', 'aria-label': 'Dismiss', onclick: close }, '×'));
  $('#messages').append(element);
  if (key !== null) shown.set(key, element);
  if (timeout) setTimeout(close, timeout);
  return element;
}
