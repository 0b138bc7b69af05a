// The live log of a model or of the daemon: /admin/models/NAME/logs and
// /admin/logs, followed (?follow=1) as Server-Sent Events, one line each.

import { follow } from './api.js';
import { $, h } from './ui.js';

/** Lines kept on the page; older ones are dropped. */
const KEPT = 2000;

/** Milliseconds between two drawings of new lines. */
const DRAW_MS = 50;

export class LogView {
  constructor() {
    this.pre = $('#log');
    this.select = $('#log-source');
    this.status = $('#log-status');
    this.pauseButton = $('#log-pause');
    this.stream = null;
    this.paused = false;
    this.pending = [];
    this.queued = [];
    this.drawTimer = null;
    this.select.addEventListener('change', () => this.start());
    this.pauseButton.addEventListener('click', () => this.pause(!this.paused));
    $('#log-clear').addEventListener('click', () => { this.queued = []; this.pre.replaceChildren(); });
    // A browser opens at most six connections to one server (HTTP/1.1): a
    // hidden page gives its log's back, and follows it again when shown.
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden) { if (!this.stream) this.start(); return; }
      this.stream?.stop();
      this.stream = null;
      this.status.dataset.state = 'hidden';
      this.status.textContent = 'paused while the page is hidden';
    });
    this.start();
  }

  /** Offer the log of each of `names` besides the daemon's. */
  setModels(names) {
    const current = [...this.select.options].slice(1).map((o) => o.value);
    if (current.length === names.length && current.every((n, i) => n === names[i])) return;
    const chosen = this.select.value;
    this.select.replaceChildren(h('option', { value: '' }, 'dynllm (the daemon)'),
      ...names.map((n) => h('option', { value: n }, n)));
    this.select.value = names.includes(chosen) ? chosen : '';
    if (this.select.value !== chosen) this.start();
  }

  /** Show the log of model `name`. */
  show(name) {
    if (![...this.select.options].some((o) => o.value === name)) this.select.append(h('option', { value: name }, name));
    this.select.value = name;
    this.start();
    this.pre.scrollIntoView({ behavior: 'smooth', block: 'nearest' });
  }

  /** Stop following (until start() is called). */
  stop() {
    this.stream?.stop();
    this.stream = null;
    this.status.dataset.state = 'stopped';
    this.status.textContent = 'stopped: keys needed';
  }

  start() {
    this.stream?.stop();
    this.pre.replaceChildren();
    this.pending = [];
    this.queued = [];
    const name = this.select.value;
    this.pre.dataset.source = name || 'daemon';
    const path = name ? `/admin/models/${encodeURIComponent(name)}/logs?follow=1&lines=200` : '/admin/logs?follow=1&lines=200';
    this.stream = follow(path, {
      kind: 'admin',
      onOpen: () => { this.queued = []; this.pre.replaceChildren(); },
      onStatus: (state, detail) => {
        this.status.dataset.state = state;
        this.status.textContent = state === 'connected' ? 'following'
          : state === 'connecting' ? 'connecting…' : `disconnected: ${detail?.reason || ''}`;
      },
      onEvent: ({ event, data }) => { if (event === 'log') this.add([data]); },
      onText: (text) => {
        this.add(text.split('\n').filter((line, i, all) => line || i < all.length - 1));
        this.status.dataset.state = 'ended';
        this.status.textContent = 'the last lines (this dynllm does not follow logs)';
      },
    });
  }

  pause(paused) {
    this.paused = paused;
    this.pauseButton.textContent = paused ? 'Resume' : 'Pause';
    if (!paused) { const lines = this.pending; this.pending = []; this.add(lines); }
  }

  add(lines) {
    if (!lines.length) return;
    if (this.paused) { this.pending.push(...lines); this.pending.splice(0, this.pending.length - KEPT); return; }
    // A backend may print thousands of lines a second, each its own event:
    // they are drawn together, at most every DRAW_MS, and only the last
    // KEPT of them (drawing and measuring the log for each line froze the
    // page).
    this.queued.push(...lines);
    if (this.queued.length > 2 * KEPT) this.queued.splice(0, this.queued.length - KEPT);
    if (this.drawTimer === null) this.drawTimer = setTimeout(() => this.draw(), DRAW_MS);
  }

  draw() {
    this.drawTimer = null;
    const lines = this.queued.slice(-KEPT);
    this.queued = [];
    if (!lines.length) return;
    const pre = this.pre;
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    const fragment = document.createDocumentFragment();
    fragment.append(...lines.map((line) => h('div', { class: 'line' }, line)));
    if (lines.length >= KEPT) pre.replaceChildren(fragment);
    else {
      pre.append(fragment);
      const extra = pre.childElementCount - KEPT;
      for (let i = 0; i < extra; i++) pre.firstElementChild.remove();
    }
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
}
