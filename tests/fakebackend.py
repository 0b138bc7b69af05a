#!/usr/bin/env python3
"""
A small stand-in for llama-server, for the fault tests: it takes
llama-server's command line and behaves like it (binds at once, answers 503
"Loading model" until loaded, then serves /health and OpenAI chat), except
where told to misbehave through the environment:

  FAKE_LOAD_DELAY=S     seconds of "loading" before /health answers 200
  FAKE_MODE=crash       print a few lines and exit 1 while loading (after
                        FAKE_LOAD_DELAY seconds)
  FAKE_MODE=hang        never finish loading
  FAKE_MODE=die-mid-stream   exit after the second frame of a stream
  FAKE_IGNORE_TERM=1    ignore SIGTERM (so that only SIGKILL stops it)
  FAKE_FRAME_DELAY=S    seconds between stream frames (default 0.01)
  FAKE_FRAMES=N         frames per stream (default 5)
  FAKE_HEADERS_WAIT=S   seconds between a stream's headers and its first frame
  FAKE_RESPONSE_DELAY=S seconds a completion takes before its answer (plain or
                        streamed) begins, as a model's generation would
  A request body's "fake_stall" makes that request stall for an hour: "headers"
  (before the status line), "mid-body" (a plain answer's first half sent),
  "mid-stream" (after two frames of a stream).
  FAKE_CHILD=1          start a child process in the same group (sleep 300)
  FAKE_CHATTY=N         print N lines of output per request (pipe draining)
  FAKE_PORT_TAKEN_ONCE=PATH   the first start (while PATH does not exist)
                        creates PATH and fails as if its port were taken

A streamed POST to /v1/messages is answered with Anthropic's events (text
deltas "0", "1", ...), any other streamed POST with OpenAI chat chunks.

Like llama-server, it requires the key in LLAMA_API_KEY (when set) as
``Authorization: Bearer KEY`` or ``X-Api-Key: KEY`` on every request but
/health, and answers 401 without it.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _event(name, data):
    """
    @return: one SSE event named C{name} with C{data} as JSON.
    """
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", "-m")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--alias", default="fake")
    args, _ = parser.parse_known_args()

    mode = os.environ.get("FAKE_MODE", "")
    loadDelay = float(os.environ.get("FAKE_LOAD_DELAY", "0"))
    frameDelay = float(os.environ.get("FAKE_FRAME_DELAY", "0.01"))
    frames = int(os.environ.get("FAKE_FRAMES", "5"))
    headersWait = float(os.environ.get("FAKE_HEADERS_WAIT", "0"))
    responseDelay = float(os.environ.get("FAKE_RESPONSE_DELAY", "0"))
    chatty = int(os.environ.get("FAKE_CHATTY", "0"))
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("FAKE_CHILD"):
        subprocess.Popen(["sleep", "300"])

    marker = os.environ.get("FAKE_PORT_TAKEN_ONCE")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        sys.stderr.write(f"E srv start: couldn't bind HTTP server socket, hostname: {args.host}, port: {args.port}\n")
        sys.exit(1)

    state = {"ready": False}
    apiKey = os.environ.get("LLAMA_API_KEY", "")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            for i in range(chatty):
                sys.stderr.write(f"fake: request line {i} " + "x" * 200 + "\n")
            sys.stderr.flush()

        def _send(self, status, body, contentType="application/json"):
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            self.send_response(status)
            self.send_header("Content-Type", contentType)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self):
            if not apiKey or self.path in ("/health", "/v1/health"):
                return True
            given = self.headers.get("Authorization", "")
            if given == "Bearer " + apiKey or self.headers.get("X-Api-Key") == apiKey:
                return True
            self._send(401, {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}})
            return False

        def do_GET(self):
            if not self._authorized():
                return
            if not state["ready"]:
                return self._send(503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})
            if self.path == "/health":
                return self._send(200, {"status": "ok"})
            return self._send(404, {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._authorized():
                return
            if not state["ready"]:
                return self._send(503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})
            try:
                body = json.loads(raw)
            except ValueError:
                return self._send(400, {"error": {"message": "bad json", "type": "invalid_request_error", "code": 400}})
            if body.get("teapot"):
                return self._send(418, {"error": {"message": "teapot", "type": "invalid_request_error", "code": 418}})
            time.sleep(responseDelay)
            stall = body.get("fake_stall")
            if stall == "headers":
                time.sleep(3600)
            if stall == "mid-body":
                answer = json.dumps({"object": "chat.completion", "model": body.get("model"), "choices": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer[: len(answer) // 2])
                self.wfile.flush()
                time.sleep(3600)
            if not body.get("stream"):
                return self._send(200, {
                    "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
                    "echo_headers": {k.lower(): v for k, v in self.headers.items()},
                })
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            time.sleep(headersWait)
            anthropic = self.path == "/v1/messages"
            if anthropic:
                self._chunk(_event("message_start", {"type": "message_start", "message": {
                    "id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model"),
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 0}}}))
                self._chunk(_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                           "content_block": {"type": "text", "text": ""}}))
            for i in range(frames):
                if mode == "die-mid-stream" and i == 2:
                    os._exit(3)
                if stall == "mid-stream" and i == 2:
                    time.sleep(3600)
                if anthropic:
                    self._chunk(_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                               "delta": {"type": "text_delta", "text": str(i)}}))
                else:
                    self._chunk(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': str(i)}}]})}\n\n".encode())
                time.sleep(frameDelay)
            if anthropic:
                self._chunk(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
                self._chunk(_event("message_delta", {"type": "message_delta", "delta": {
                    "stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": frames}}))
                frame = _event("message_stop", {"type": "message_stop"})
            else:
                frame = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(frame), frame))
            self.wfile.flush()

        def _chunk(self, frame):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            self.wfile.flush()

    # The default listen backlog (5) drops connections when dynllm opens many
    # at once, as it does when a load that many requests waited for ends.
    ThreadingHTTPServer.request_queue_size = 256
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    sys.stderr.write(f"fake: llama_server: loading model '{args.model}'\n")
    sys.stderr.flush()

    def load():
        if mode == "crash":
            time.sleep(loadDelay)
            sys.stderr.write("fake: load_model: failed to load model\n")
            sys.stderr.write("fake: exiting due to model loading error\n")
            sys.stderr.flush()
            os._exit(1)
        if mode == "hang":
            return
        time.sleep(loadDelay)
        state["ready"] = True
        sys.stderr.write(f"fake: llama_server: model loaded\nfake: listening on http://{args.host}:{args.port}\n")
        sys.stderr.flush()

    threading.Thread(target=load, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
