// The dynllm console: the models and the memory budget, live from
// /admin/events; load and unload; the logs; the playground.

import { ApiError, follow, keys, post, whenKeysNeeded } from './api.js';
import { LogView } from './logs.js';
import { Playground } from './playground.js';
import { $, h, message } from './ui.js';

const models = new Map();
let memory = null;
const logs = new LogView();
const playground = new Playground();

// Keys: asked for when a request answers 401.

const dialog = $('#keys-dialog');
let asking = null;

function askKeys(reason) {
  if (asking) return asking;
  $('#api-key').value = keys.api;
  $('#admin-key').value = keys.admin;
  const shown = $('#keys-reason');
  shown.textContent = reason || '';
  shown.hidden = !reason;
  asking = new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      asking = null;
      if (dialog.returnValue !== 'save') { resolve(false); return; }
      keys.save($('#api-key').value.trim(), $('#admin-key').value.trim());
      resolve(true);
    }, { once: true });
  });
  dialog.returnValue = '';
  dialog.showModal();
  ($('#api-key').value ? $('#admin-key') : $('#api-key')).focus();
  return asking;
}

// fetch() sends a header only if it is ISO-8859-1 text without control
// characters: a key with any other character would make every request fail
// before it is sent, as if dynllm could not be reached.
const UNSENDABLE = /[^\x20-\x7e\xa0-\xff]/;

$('#keys-form').addEventListener('submit', (e) => {
  if (e.submitter?.value !== 'save') return;
  const bad = [['API key', $('#api-key')], ['admin key', $('#admin-key')]].find(([, input]) => UNSENDABLE.test(input.value.trim()));
  if (!bad) return;
  e.preventDefault();
  const shown = $('#keys-reason');
  shown.textContent = `The ${bad[0]} holds a character that cannot be sent in an HTTP header`
    + ' (only printable ASCII and ISO-8859-1 letters can): check what was pasted.';
  shown.hidden = false;
  bad[1].focus();
});

whenKeysNeeded(askKeys);
$('#keys-button').addEventListener('click', () => askKeys(''));
$('#forget-keys').addEventListener('click', forgetKeys);
const showKeys = () => { $('#forget-keys').hidden = !keys.any; };
keys.onChange(showKeys);
showKeys();

// The event stream.

const connection = $('#connection');

function connectionState(state, detail = {}) {
  connection.dataset.connection = state;
  document.body.dataset.connection = state;
  if (state === 'connected') connection.textContent = 'live';
  else if (state === 'connecting') connection.textContent = 'connecting…';
  else {
    connection.textContent = detail.keys ? 'disconnected: keys needed'
      : `disconnected${detail.retry ? `, retrying in ${detail.retry} s` : ''}`;
    connection.title = detail.reason || '';
  }
  if (state !== 'disconnected') connection.title = '';
}

// Forgetting the keys closes every stream the page follows (each would go
// on with the key it was opened with) and shows that keys are needed, as a
// 401 would; keys saved in the dialog open them again.
let events = null;

const KEYS_NEEDED = 'The keys are forgotten: this browser holds none now. Give keys to follow dynllm again.';

async function forgetKeys() {
  keys.forget();
  events?.stop();
  events = null;
  logs.stop();
  connectionState('disconnected', { keys: true, reason: KEYS_NEEDED });
  message(KEYS_NEEDED, 'warning', {
    key: 'events', actions: [{ label: 'Give keys', class: 'give-keys', run: () => askKeys(KEYS_NEEDED) }],
  });
  await askKeys(KEYS_NEEDED);
}

// Keys saved while the streams are closed open them again.
keys.onChange(() => {
  if (events) return;
  message(null, null, { key: 'events' });
  followEvents();
  logs.start();
});

function followEvents() {
  events = follow('/admin/events', {
  kind: 'admin',
  onStatus(state, detail) {
    connectionState(state, detail);
    if (state === 'disconnected' && detail?.keys) message(detail.reason, 'error', { key: 'events' });
  },
  onOpen() {
    models.clear();
    message(null, null, { key: 'events' });
  },
  onEvent({ event, data }) {
    let value;
    try { value = JSON.parse(data); } catch { return; }
    if (event === 'memory') {
      memory = value;
      renderMemory();
    } else if (event === 'model') {
      if (value.status === 'removed') models.delete(value.name);
      else models.set(value.name, value);
      scheduleRender();
    }
  },
  });
}
followEvents();

// Memory.

function megabytes(n) {
  return n >= 10240 ? `${(n / 1024).toFixed(1)} GB` : `${n} MB`;
}

function renderMemory() {
  const total = memory.total_vram_mb || 0;
  const parts = { loaded: memory.loaded_mb || 0, loading: memory.loading_mb || 0, unloading: memory.unloading_mb || 0 };
  const bar = $('#memory-bar');
  for (const [name, mb] of Object.entries(parts)) {
    bar.querySelector(`.${name}`).style.width = total ? `${Math.min(100, (100 * mb) / total)}%` : '0';
  }
  const used = memory.used_vram_mb ?? parts.loaded + parts.loading + parts.unloading;
  bar.setAttribute('aria-label', `memory: ${used} of ${total} MB held`);
  bar.dataset.used = used;
  const legend = $('#memory-text');
  legend.replaceChildren(
    h('strong', {}, `${megabytes(used)} of ${megabytes(total)}`), ' held: ',
    h('span', { class: 'key loaded' }), `loaded ${megabytes(parts.loaded)}, `,
    h('span', { class: 'key loading' }), `loading ${megabytes(parts.loading)}, `,
    h('span', { class: 'key unloading' }), `stopping ${megabytes(parts.unloading)}; `,
    `free ${megabytes(Math.max(0, total - used))}`,
  );
}

// Models.

const STATE_TITLES = {
  unloaded: 'not running', loading: 'starting', loaded: 'serving', unloading: 'stopping', failed: 'its last load failed',
};

function seconds(s) {
  if (s == null) return '';
  return s < 10 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`;
}

function loadTime(model) {
  if (model.status === 'loading' && model.loading_seconds != null) return `loading, ${Math.floor(model.loading_seconds)} s`;
  return seconds(model.load_seconds);
}

const busy = new Set();
const rows = new Map();
const ERROR_SHOWN = 240;
let renderTimer = null;

// Many events come at once (the whole state, first): the table is drawn
// once for them.
function scheduleRender() {
  if (renderTimer === null) renderTimer = setTimeout(() => { renderTimer = null; renderModels(); }, 10);
}

function row(name) {
  let tr = rows.get(name);
  if (tr) return tr;
  const cell = (cls) => h('td', { class: cls });
  tr = h('tr', { 'data-model': name },
    h('td', { class: 'name' }, name),
    h('td', { class: 'state-cell' }, h('span', { class: 'state' })),
    cell('backend'), cell('type'), cell('num memory'), cell('num requests'), cell('num load-time'), cell('error'),
    h('td', { class: 'actions' },
      h('button', { type: 'button', class: 'load', onclick: () => load(name) }, 'Load'),
      h('button', { type: 'button', class: 'unload', onclick: () => unload(name, false) }, 'Unload'),
      h('button', { type: 'button', class: 'show-log', onclick: () => logs.show(name) }, 'Log')));
  rows.set(name, tr);
  return tr;
}

function fill(tr, m) {
  const set = (selector, text) => { const e = $(selector, tr); if (e.textContent !== text) e.textContent = text; };
  tr.dataset.state = m.status;
  const state = $('.state', tr);
  state.className = `state ${m.status}`;
  state.title = STATE_TITLES[m.status] || '';
  set('.state', m.status);
  set('.backend', m.backend || '');
  set('.type', m.model_type || '');
  set('.memory', m.vram_mb != null ? megabytes(m.vram_mb) : '');
  set('.requests', `${m.active_requests ?? 0} / ${m.waiting_requests ?? 0}`);
  set('.load-time', loadTime(m));
  // A last error may be long (it ends with the backend's last output): the
  // cell shows its start, its title all of it.
  const error = m.last_error || '';
  set('.error', error.length > ERROR_SHOWN ? `${error.slice(0, ERROR_SHOWN)}…` : error);
  $('.error', tr).title = error;
  const loadButton = $('.load', tr);
  loadButton.disabled = busy.has(`load:${m.name}`) || m.status === 'loaded' || m.status === 'loading';
  loadButton.textContent = busy.has(`load:${m.name}`) ? 'Loading…' : 'Load';
  $('.unload', tr).disabled = busy.has(`unload:${m.name}`) || m.status === 'unloaded' || m.status === 'failed';
}

function renderModels() {
  for (const [name, tr] of rows) {
    if (!models.has(name)) { tr.remove(); rows.delete(name); }
  }
  const body = $('#models tbody');
  const wanted = [];
  for (const m of models.values()) {
    const tr = row(m.name);
    fill(tr, m);
    wanted.push(tr);
  }
  if (!wanted.length) wanted.push(h('tr', { class: 'empty' }, h('td', { colspan: 9 }, 'no model is configured')));
  const current = [...body.children];
  if (current.length !== wanted.length || current.some((tr, i) => tr !== wanted[i])) body.replaceChildren(...wanted);
  playground.setModels([...models.values()]);
  logs.setModels([...models.keys()]);
}

async function admin(action, name, body) {
  busy.add(`${action}:${name}`);
  renderModels();
  try {
    return await post(`/admin/models/${action}`, body, { kind: 'admin' });
  } finally {
    busy.delete(`${action}:${name}`);
    renderModels();
  }
}

// The notice of an action ("tiny-chat is unloaded.") is replaced by the
// next action's, and fades after a few seconds; a model's own error or
// warning stays until its next action.
const NOTICE_MS = 5000;

function starting(what, name) {
  message(null, null, { key: `model:${name}` });
  message(`${what} ${name}…`, 'info', { key: 'action' });
}

function done(answer) {
  message(`${answer.model} is ${answer.status}.`, 'info', { key: 'action', timeout: NOTICE_MS });
}

async function load(name) {
  starting('Loading', name);
  try {
    done(await admin('load', name, { model: name }));
  } catch (e) {
    message(null, null, { key: 'action' });
    message(`Loading ${name} failed: ${e.message}`, 'error', { key: `model:${name}` });
  }
}

async function unload(name, force) {
  starting('Unloading', name);
  try {
    done(await admin('unload', name, { model: name, force }));
  } catch (e) {
    message(null, null, { key: 'action' });
    if (e instanceof ApiError && e.status === 409 && !force) {
      message(`${name} was not unloaded: ${e.message}`, 'warning', {
        key: `model:${name}`,
        actions: [{ label: 'Unload now (its requests fail)', class: 'force', run: () => unload(name, true) }],
      });
    } else {
      message(`Unloading ${name} failed: ${e.message}`, 'error', { key: `model:${name}` });
    }
  }
}

window.addEventListener('unhandledrejection', (e) => {
  message(`Unexpected error: ${e.reason?.message || e.reason}`, 'error');
});
window.addEventListener('error', (e) => message(`Unexpected error: ${e.message}`, 'error'));
