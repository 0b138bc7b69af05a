// Unit tests of the console's api.js under node's test runner (node --test):
// its Server-Sent Events reader and its error messages. The page as a whole
// is tested in Chromium by console.mjs.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { ApiError, failure, readEvents } from '../../src/dynllm/static/console/api.js';

/** A response whose body arrives in the given pieces. */
function streamed(...pieces) {
  const encoder = new TextEncoder();
  const body = new ReadableStream({
    start(controller) {
      for (const piece of pieces) controller.enqueue(typeof piece === 'string' ? encoder.encode(piece) : piece);
      controller.close();
    },
  });
  return new Response(body, { headers: { 'Content-Type': 'text/event-stream' } });
}

async function read(...pieces) {
  const events = [];
  const comments = [];
  await readEvents(streamed(...pieces), { onEvent: (e) => events.push(e), onComment: (c) => comments.push(c) });
  return { events, comments };
}

test('events are told with their type and data', async () => {
  const { events } = await read('event: memory\ndata: {"a": 1}\n\nevent: model\ndata: {"b": 2}\n\n');
  assert.deepEqual(events.map((e) => [e.event, e.data]), [['memory', '{"a": 1}'], ['model', '{"b": 2}']]);
});

test('an event without a type is a message', async () => {
  const { events } = await read('data: [DONE]\n\n');
  assert.deepEqual(events.map((e) => [e.event, e.data]), [['message', '[DONE]']]);
});

test('an event split across reads, even inside a line, is whole', async () => {
  const { events } = await read('eve', 'nt: log\nda', 'ta: one li', 'ne\n', '\n');
  assert.deepEqual(events.map((e) => [e.event, e.data]), [['log', 'one line']]);
});

test('a character split across reads is decoded whole', async () => {
  const bytes = new TextEncoder().encode('data: é€\n\n');
  const { events } = await read(bytes.slice(0, 7), bytes.slice(7, 10), bytes.slice(10));
  assert.equal(events[0].data, 'é€');
});

test('lines may end with CRLF', async () => {
  const { events } = await read('event: log\r\ndata: x\r\n\r\n');
  assert.deepEqual(events.map((e) => [e.event, e.data]), [['log', 'x']]);
});

test('data lines of one event are joined by line feeds', async () => {
  const { events } = await read('data: a\ndata: b\ndata:c\n\n');
  assert.equal(events[0].data, 'a\nb\nc');
});

test('comments are told apart and make no event', async () => {
  const { events, comments } = await read(': keep-alive\n\n: dynllm: loading chat, 3 s\n\ndata: x\n\n');
  assert.deepEqual(comments, ['keep-alive', 'dynllm: loading chat, 3 s']);
  assert.equal(events.length, 1);
});

test('an event the stream ends in the middle of is dropped', async () => {
  const { events } = await read('data: whole\n\ndata: cut');
  assert.deepEqual(events.map((e) => e.data), ['whole']);
});

test("a failure's message is its error envelope's", async () => {
  const envelope = { error: { message: 'Invalid API key', type: 'authentication_error', param: null, code: 'invalid_api_key' } };
  const error = await failure(new Response(JSON.stringify(envelope), { status: 401 }));
  assert.ok(error instanceof ApiError);
  assert.equal(error.message, 'Invalid API key');
  assert.equal(error.status, 401);
  assert.equal(error.code, 'invalid_api_key');
});

test('a failure without an envelope says its status and body', async () => {
  const error = await failure(new Response('upstream down', { status: 502, statusText: 'Bad Gateway' }));
  assert.equal(error.message, '502 Bad Gateway: upstream down');
});
