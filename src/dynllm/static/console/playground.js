// The playground: chat with an llm model (streamed, with tokens per
// second), embed a text with an embedding model, rank documents with a
// rerank model; through the same OpenAI routes as any client.

import { call, failure, post, readEvents } from './api.js';
import { $, h, message } from './ui.js';

/** What a chat says when its stream ends without its end, or breaks off. */
const STREAM_CUT = 'the stream ended before its end';

/** An error a stream ended with (its error event). */
class StreamError extends Error {}

const FORMS = { llm: '#pg-chat', embedding: '#pg-embed', rerank: '#pg-rerank' };

export class Playground {
  constructor() {
    this.select = $('#pg-model');
    this.types = new Map();
    this.history = [];
    this.controller = null;
    this.select.addEventListener('change', () => this.choose());
    $('#pg-chat').addEventListener('submit', (e) => { e.preventDefault(); this.chat(); });
    $('#pg-embed').addEventListener('submit', (e) => { e.preventDefault(); this.embed(); });
    $('#pg-rerank').addEventListener('submit', (e) => { e.preventDefault(); this.rerank(); });
    $('#chat-stop').addEventListener('click', () => this.controller?.abort());
    $('#chat-clear').addEventListener('click', () => { this.history = []; $('#chat-log').replaceChildren(); $('#chat-stats').textContent = ''; });
    $('#chat-input').addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); $('#pg-chat').requestSubmit(); }
    });
    this.choose();
  }

  /** The models to offer: [{name, model_type}]. */
  setModels(models) {
    const types = new Map(models.map((m) => [m.name, m.model_type]));
    const same = types.size === this.types.size && [...types].every(([n, t]) => this.types.get(n) === t);
    if (same) return;
    this.types = types;
    const chosen = this.select.value;
    this.select.replaceChildren(...models.map((m) => h('option', { value: m.name }, `${m.name} (${m.model_type})`)));
    if (types.has(chosen)) this.select.value = chosen;
    else {
      const first = models.find((m) => m.model_type === 'llm') || models[0];
      if (first) this.select.value = first.name;
    }
    if (this.select.value !== chosen) this.choose();
  }

  get model() { return this.select.value; }

  choose() {
    const type = this.types.get(this.model);
    for (const [kind, selector] of Object.entries(FORMS)) $(selector).hidden = kind !== type;
    const none = $('#pg-none');
    none.hidden = !type || type in FORMS;
    none.textContent = type ? `The playground has nothing to try on ${type} models.` : '';
    $('#pg-type').textContent = '';
    if (this.history.length) { this.history = []; $('#chat-log').replaceChildren(); }
    $('#chat-stats').textContent = '';
  }

  async chat() {
    const input = $('#chat-input');
    const text = input.value.trim();
    if (!text || this.controller) return;
    input.value = '';
    const model = this.model;
    const log = $('#chat-log');
    const stats = $('#chat-stats');
    this.history.push({ role: 'user', content: text });
    log.append(h('div', { class: 'turn user' }, text));
    const reply = h('div', { class: 'turn assistant streaming' });
    log.append(reply);
    stats.textContent = 'sending…';
    delete stats.dataset.tps;
    this.controller = new AbortController();
    $('#chat-send').disabled = true;
    $('#chat-stop').disabled = false;
    const started = performance.now();
    let first = null;
    let last = null;
    let content = '';
    let usage = null;
    let timings = null;
    let chunks = 0;
    let ended = false;
    try {
      const response = await call('/v1/chat/completions', {
        method: 'POST',
        signal: this.controller.signal,
        headers: { Accept: 'text/event-stream' },
        body: {
          model, messages: this.history, stream: true, stream_options: { include_usage: true },
          max_tokens: Number($('#chat-max').value) || 128,
        },
      });
      if (!(response.headers.get('Content-Type') || '').startsWith('text/event-stream')) throw await failure(response);
      await readEvents(response, {
        onComment: (comment) => { if (comment.startsWith('dynllm:')) stats.textContent = comment.slice(7).trim(); },
        onEvent: ({ data }) => {
          if (data === '[DONE]') { ended = true; return; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new StreamError(chunk.error.message || JSON.stringify(chunk.error));
          if (chunk.choices?.[0]?.finish_reason) ended = true;
          const delta = chunk.choices?.[0]?.delta;
          const piece = (delta?.content || '') + (delta?.reasoning_content || '');
          if (piece) {
            first ??= performance.now();
            last = performance.now();
            chunks += 1;
            content += delta?.content || '';
            reply.append(piece);
            log.scrollTop = log.scrollHeight;
            stats.textContent = `${chunks} tokens…`;
          }
          if (chunk.usage) usage = chunk.usage;
          if (chunk.timings) timings = chunk.timings;
        },
      });
      // A stream that stops without [DONE] or a finish reason broke off.
      if (!ended) throw new StreamError(STREAM_CUT);
      this.history.push({ role: 'assistant', content });
      const tokens = usage?.completion_tokens ?? chunks;
      const seconds = first !== null && last > first ? (last - first) / 1000 : null;
      const tps = timings?.predicted_per_second ?? (seconds ? (tokens - 1) / seconds : null);
      stats.dataset.tps = tps != null ? tps.toFixed(1) : '';
      stats.textContent = [
        `${tokens} tokens`,
        tps != null ? `${tps.toFixed(1)} tokens/s${timings ? ' (llama-server)' : ''}` : null,
        timings?.prompt_per_second != null ? `prompt ${timings.prompt_per_second.toFixed(1)} tokens/s` : null,
        first !== null ? `first token after ${((first - started) / 1000).toFixed(2)} s` : null,
      ].filter(Boolean).join(', ');
    } catch (e) {
      this.history.pop();
      if (e.name === 'AbortError') stats.textContent = 'stopped';
      else {
        stats.textContent = '';
        reply.classList.add('failed');
        // A stream that breaks off (its backend crashed, its model was
        // unloaded by force, dynllm stopped) fails the read with a
        // TypeError, or ends without its end: the page says what it ended
        // with (an error event's message, if one came), not a guess.
        const cut = e instanceof TypeError || e.message === STREAM_CUT;
        const why = cut ? STREAM_CUT : e.message;
        const said = first !== null ? `${why} (after ${chunks} tokens)` : why;
        // The reply's bubble says it too (not only the banner).
        reply.append(h('span', { class: 'why' }, said));
        message(`Chat with ${model} failed: ${said}`, 'error', { key: 'playground' });
      }
    } finally {
      reply.classList.remove('streaming');
      this.controller.abort();
      this.controller = null;
      $('#chat-send').disabled = false;
      $('#chat-stop').disabled = true;
    }
  }

  async embed() {
    const model = this.model;
    const result = $('#embed-result');
    result.textContent = 'embedding…';
    try {
      const answer = await post('/v1/embeddings', { model, input: $('#embed-input').value });
      const vector = answer.data?.[0]?.embedding || [];
      result.dataset.dimensions = vector.length;
      result.textContent = `${vector.length} dimensions${answer.usage ? `, ${answer.usage.prompt_tokens} tokens` : ''}\n`
        + `[${vector.slice(0, 8).map((v) => v.toFixed(4)).join(', ')}${vector.length > 8 ? ', …' : ''}]`;
    } catch (e) {
      result.textContent = '';
      message(`Embedding with ${model} failed: ${e.message}`, 'error', { key: 'playground' });
    }
  }

  async rerank() {
    const model = this.model;
    const documents = $('#rerank-docs').value.split('\n').map((d) => d.trim()).filter(Boolean);
    const result = $('#rerank-result');
    result.replaceChildren(h('li', { class: 'muted' }, 'ranking…'));
    try {
      const answer = await post('/v1/rerank', { model, query: $('#rerank-query').value, documents });
      const ranked = [...(answer.results || [])].sort((a, b) => b.relevance_score - a.relevance_score);
      result.replaceChildren(...ranked.map((r) => h('li', {},
        h('span', { class: 'score' }, r.relevance_score.toFixed(4)), ' ', documents[r.index] ?? `#${r.index}`)));
    } catch (e) {
      result.replaceChildren();
      message(`Ranking with ${model} failed: ${e.message}`, 'error', { key: 'playground' });
    }
  }
}
