// The console's requests to its own dynllm: keys, the error envelope, and
// Server-Sent Events read from fetch() (EventSource cannot send an
// Authorization header), with reconnection.

const STORE = { api: 'dynllm.apiKey', admin: 'dynllm.adminKey' };

/** A request that failed: `message` is the error envelope's message. */
export class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function stored(name) {
  try { return localStorage.getItem(name) || ''; } catch { return ''; }
}

const keyListeners = new Set();

/** The keys, kept in this browser only. */
export const keys = {
  get api() { return stored(STORE.api); },
  get admin() { return stored(STORE.admin); },
  get any() { return Boolean(this.api || this.admin); },
  save(api, admin) {
    for (const [name, value] of [[STORE.api, api], [STORE.admin, admin]]) {
      if (value) localStorage.setItem(name, value); else localStorage.removeItem(name);
    }
    keyListeners.forEach((f) => f());
  },
  forget() { this.save('', ''); },
  /** Call `f` after every change; returns a function that stops that. */
  onChange(f) { keyListeners.add(f); return () => keyListeners.delete(f); },
  /** A promise of the next change. */
  changed() { return new Promise((resolve) => { const off = this.onChange(() => { off(); resolve(); }); }); },
};

/**
 * Asked when a request answers 401: `(message, kind) => Promise<boolean>`,
 * true when the user gave keys. Set by the page.
 */
let askKeys = async () => false;
export function whenKeysNeeded(f) { askKeys = f; }

function authorization(kind) {
  const key = kind === 'admin' ? (keys.admin || keys.api) : keys.api;
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The message of a failed response: its error envelope's, or its status. */
export async function failure(response) {
  const text = await response.text().catch(() => '');
  let message = '';
  let code = null;
  try {
    const body = JSON.parse(text);
    const error = body && typeof body.error === 'object' ? body.error : body;
    message = (error && error.message) || '';
    code = (error && error.code) || null;
  } catch { /* not JSON */ }
  if (!message) message = `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ''}`;
  return new ApiError(message, response.status, code);
}

/**
 * fetch() a path of this dynllm with the keys of `kind` ('api' or 'admin').
 * A 401 asks for keys (unless `ask` is false) and, if some were given, tries
 * once more. Resolves to the response if it is a success; else rejects
 * with an ApiError holding the envelope's message.
 */
export async function call(path, { kind = 'api', method = 'GET', body, signal, headers = {}, ask = true } = {}) {
  for (let attempt = 0; ; attempt++) {
    const init = { method, signal, cache: 'no-store', headers: { ...authorization(kind), ...headers } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers['Content-Type'] = 'application/json';
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(`dynllm cannot be reached (${e.message})`);
    }
    if (response.ok) return response;
    const error = await failure(response);
    if (response.status === 401 && ask && attempt === 0 && await askKeys(error.message, kind)) continue;
    throw error;
  }
}

/** POST a JSON body and read the JSON answer. */
export async function post(path, body, options = {}) {
  const response = await call(path, { ...options, method: 'POST', body });
  return response.json();
}

/**
 * Read the Server-Sent Events of `response` (the HTML standard's
 * event-stream format; lines end with \n or \r\n) until it ends, calling
 * `onEvent({event, data, id})` for each event and `onComment(text)` for
 * each comment line.
 */
export async function readEvents(response, { onEvent, onComment = () => {}, onChunk = () => {} }) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = '';
  let data = [];
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    onChunk();
    buffer += value;
    const lines = buffer.split('\n');
    buffer = lines.pop();
    for (let line of lines) {
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line === '') {
        if (data.length) onEvent({ event: event || 'message', data: data.join('\n'), id });
        event = '';
        data = [];
        continue;
      }
      if (line.startsWith(':')) {
        onComment(line.slice(1).trim());
        continue;
      }
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
      else if (field === 'id') id = value;
    }
  }
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
});

/**
 * Follow an event stream of this dynllm: connect, read its events, and
 * connect again with back-off (0.5 s doubling to 15 s) when it ends or
 * fails, or when nothing (not even a keep-alive comment) came for
 * `silence` ms. A 401 asks for keys, then waits for them.
 *
 * `onStatus(state, detail)` is told 'connecting', 'connected' or
 * 'disconnected' (with the reason and the seconds until the next try);
 * `onOpen()` when a connection is made (the stream starts again from the
 * current state: the caller forgets what it had); `onText(text)` for an
 * answer that is not an event stream.
 *
 * Returns {stop()}.
 */
export function follow(path, { kind = 'admin', onEvent, onOpen = () => {}, onStatus = () => {}, onText, silence = 45000 }) {
  let stopped = false;
  let controller = null;
  const stop = new AbortController();
  (async () => {
    let delay = 500;
    while (!stopped) {
      controller = new AbortController();
      let watchdog = null;
      const quiet = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => controller.abort(new Error('no data, not even a keep-alive')), silence);
      };
      onStatus('connecting');
      let reason = 'the stream ended';
      try {
        const response = await call(path, {
          kind, signal: controller.signal, ask: false, headers: { Accept: 'text/event-stream' },
        });
        delay = 500;
        onStatus('connected');
        onOpen();
        const type = response.headers.get('Content-Type') || '';
        if (!type.startsWith('text/event-stream')) {
          const text = await response.text();
          if (onText) { onText(text); return; }
          reason = `not an event stream (${type})`;
        } else {
          quiet();
          await readEvents(response, { onEvent, onChunk: quiet });
        }
      } catch (e) {
        if (stopped) break;
        if (e instanceof ApiError && e.status === 401) {
          onStatus('disconnected', { reason: e.message, keys: true });
          if (!await askKeys(e.message, kind)) await Promise.race([keys.changed(), sleep(2 ** 31 - 1, stop.signal)]);
          continue;
        }
        reason = controller.signal.aborted && controller.signal.reason instanceof Error
          ? controller.signal.reason.message : e.message;
      } finally {
        clearTimeout(watchdog);
      }
      if (stopped) break;
      const wait = delay + Math.random() * 250;
      onStatus('disconnected', { reason, retry: Math.round(wait / 100) / 10 });
      await sleep(wait, stop.signal);
      delay = Math.min(delay * 2, 15000);
    }
  })();
  return {
    stop() {
      stopped = true;
      stop.abort();
      controller?.abort();
    },
  };
}
