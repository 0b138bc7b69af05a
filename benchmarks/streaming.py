#!/usr/bin/env python3
"""
Streaming relay against a fast SSE upstream.

The upstream is a small raw-socket HTTP server written by this script to a
temporary directory and configured as dynllm's "llama-server" binary, so
dynllm starts it like a backend (C{BINARY --model PATH --host 127.0.0.1
--port N ...}). It answers C{GET /health} with 200 and C{POST
/v1/chat/completions} with a chunked C{text/event-stream}: one chunk (one
C{send}) per C{data: {...}} frame, like llama-server sends one per token.

1. Throughput: N frames (default 20000) sent as fast as the upstream can;
   frames per second as read by the client, through dynllm and directly
   from the same upstream process, interleaved runs, medians. The client
   only receives and timestamps while timing; it parses the frames (blank
   line separated) afterwards, so its own parsing costs are not measured.
2. Per-frame delay: one frame every 20 ms (default 50 frames) carrying the
   upstream's time.time() at send; the client subtracts it from its own
   time.time() when the frame arrives (same machine, same clock).

    PYTHONPATH=. .venv/bin/python benchmarks/streaming.py [--frames 20000] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    BenchDaemon,
    buildRequest,
    dechunk,
    header,
    median,
    p90,
    summary,
    terminateOnSignals,
)

TARGET_RATIO = 0.8
TARGET_DELAY_MS = 1.0

UPSTREAM = r'''#!%(python)s
"""A fast SSE upstream for dynllm's streaming benchmark (llama-server's CLI)."""
import argparse, json, socket, sys, threading, time

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
args, _ = parser.parse_known_args()

def frameChunk(payload):
    frame = b"data: " + payload + b"\n\n"
    return b"%%x\r\n%%s\r\n" %% (len(frame), frame)

def send(conn, status, body):
    data = json.dumps(body).encode()
    conn.sendall(b"HTTP/1.1 %%d X\r\nContent-Type: application/json\r\nContent-Length: %%d\r\n\r\n%%s"
                 %% (status, len(data), data))

FAST = {}  # frame count -> the chunks of a fast stream, built once

def fastChunks(frames):
    if frames not in FAST:
        FAST[frames] = [
            frameChunk(b'{"id":"bench","object":"chat.completion.chunk","model":"bench",'
                       b'"choices":[{"index":0,"delta":{"content":"tok%%d"},"finish_reason":null}]}' %% i)
            for i in range(frames)]
    return FAST[frames]

def stream(conn, request):
    frames = int(request.get("bench_frames", 20000))
    interval = float(request.get("bench_interval", 0))
    chunks = fastChunks(frames) if interval <= 0 else None
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
    if interval <= 0:
        for chunk in chunks:
            conn.sendall(chunk)
    else:
        start = time.monotonic()
        for i in range(frames):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            conn.sendall(frameChunk(b'{"i":%%d,"t":%%r,"choices":[{"index":0,"delta":{"content":"x"}}]}'
                                    %% (i, time.time())))
    conn.sendall(frameChunk(b"[DONE]") + b"0\r\n\r\n")

def handle(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path = lines[0].split(b" ")[:2]
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get(b"content-length", b"0"))
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            if method == b"GET" and path == b"/health":
                send(conn, 200, {"status": "ok"})
            elif method == b"POST" and path == b"/v1/chat/completions":
                request = json.loads(body or b"{}")
                if request.get("stream"):
                    stream(conn, request)
                else:
                    send(conn, 200, {"object": "chat.completion", "choices": []})
            else:
                send(conn, 404, {"error": {"message": "not found"}})
            if headers.get(b"connection", b"").lower() == b"close":
                return
    except OSError:
        pass
    finally:
        conn.close()

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((args.host, args.port))
server.listen(128)
sys.stderr.write("bench upstream: model loaded\n")
sys.stderr.flush()
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
'''

END = b"\r\n0\r\n\r\n"


def writeUpstream(directory: str) -> tuple[str, str]:
    """
    @return: (the upstream program, a dummy model file) in C{directory}.
    """
    program = os.path.join(directory, "fast-sse-upstream")
    with open(program, "w") as f:
        f.write(UPSTREAM % {"python": sys.executable})
    os.chmod(program, os.stat(program).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    model = os.path.join(directory, "dummy.gguf")
    with open(model, "wb") as f:
        f.write(b"GGUF")
    return program, model


def streamRequest(port: int, frames: int, interval: float = 0.0) -> bytes:
    body = json.dumps(
        {
            "model": "sse",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "bench_frames": frames,
            "bench_interval": interval,
        }
    ).encode()
    return buildRequest("POST", "/v1/chat/completions", port, body, keepAlive=False)


def splitResponse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


def frames(payload: bytes) -> list[bytes]:
    return [f for f in payload.split(b"\n\n") if f]


def throughputRun(port: int, count: int) -> tuple[float, float]:
    """
    Read one fast stream of C{count} frames.

    @return: (frames per second from request sent to the last byte,
        seconds to the first byte).
    """
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = streamRequest(port, count)
        received: list[bytes] = []
        tail = b""
        first = 0.0
        t0 = time.perf_counter()
        sock.sendall(request)
        while True:
            data = sock.recv(1 << 20)
            if not data:
                raise RuntimeError("the stream ended before its last chunk")
            if not first:
                first = time.perf_counter()
            received.append(data)
            tail = (tail + data)[-len(END) :]
            if tail == END:
                end = time.perf_counter()
                break
    status, headers, body = splitResponse(b"".join(received))
    if status != 200 or headers.get("transfer-encoding", "").lower() != "chunked":
        raise RuntimeError(f"unexpected response {status} {headers}")
    got = frames(dechunk(body))
    if len(got) != count + 1 or got[-1] != b"data: [DONE]":
        raise RuntimeError(f"expected {count} frames and [DONE], got {len(got)} frames")
    return count / (end - t0), first - t0


class Dechunker:
    """
    Incremental chunked-body decoder (for the paced stream only).
    """

    def __init__(self) -> None:
        self.buf = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = b""
        while not self.done:
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            size = int(self.buf[:end].split(b";")[0], 16)
            if size == 0:
                self.done = True
                break
            if len(self.buf) < end + 2 + size + 2:
                break
            out += self.buf[end + 2 : end + 2 + size]
            self.buf = self.buf[end + 2 + size + 2 :]
        return out


def delayRun(port: int, count: int, interval: float) -> list[float]:
    """
    Read one paced stream. @return: for each frame, arrival time.time() -
        the upstream's time.time() when it sent the frame.
    """
    delays = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(streamRequest(port, count, interval))
        raw = b""
        while b"\r\n\r\n" not in raw:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("no response headers")
            raw += data
        head, _, rest = raw.partition(b"\r\n\r\n")
        arrived = time.time()
        decoder = Dechunker()
        pending = b""
        data = rest
        while True:
            pending += decoder.feed(data)
            while b"\n\n" in pending:
                frame, _, pending = pending.partition(b"\n\n")
                if frame.startswith(b"data: {"):
                    delays.append(arrived - json.loads(frame[6:])["t"])
            if decoder.done:
                break
            data = sock.recv(65536)
            arrived = time.time()
            if not data:
                raise RuntimeError("the paced stream ended early")
    if len(delays) != count:
        raise RuntimeError(f"expected {count} timed frames, got {len(delays)}")
    return delays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=20000, help="frames per fast stream (default 20000)")
    parser.add_argument("--runs", type=int, default=7, help="timed fast streams per path (default 7)")
    parser.add_argument("--paced-frames", type=int, default=50, help="frames per paced stream (default 50)")
    parser.add_argument("--paced-interval", type=float, default=0.02, help="seconds between paced frames")
    parser.add_argument("--paced-runs", type=int, default=3, help="paced streams per path (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory (its log)")
    args = parser.parse_args()
    terminateOnSignals()

    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="dynllm-bench-sse-")
    try:
        program, model = writeUpstream(scratch)
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": program},
            "models": [{"name": "sse", "path": model, "backend": "llamacpp", "vram_mb": 100}],
        }
        proxyRate: list[float] = []
        directRate: list[float] = []
        proxyFirst: list[float] = []
        directFirst: list[float] = []
        proxyDelay: list[float] = []
        directDelay: list[float] = []
        with BenchDaemon(config, keep=args.keep) as bench:
            status, _, text = bench.daemon.post("/admin/models/load", {"model": "sse"})
            if status != 200:
                raise RuntimeError(f"load failed: {status} {text!r}")
            upstream = bench.models()["sse"]["port"]
            # Warm up both paths (imports, connection pool, caches).
            for port in (bench.port, upstream, bench.port, upstream):
                throughputRun(port, args.frames)
            for i in range(args.runs):
                order = [(bench.port, proxyRate, proxyFirst), (upstream, directRate, directFirst)]
                for port, rates, firsts in order if i % 2 == 0 else order[::-1]:
                    rate, first = throughputRun(port, args.frames)
                    rates.append(rate)
                    firsts.append(first)
            for i in range(args.paced_runs):
                order = [(bench.port, proxyDelay), (upstream, directDelay)]
                for port, delays in order if i % 2 == 0 else order[::-1]:
                    delays.extend(delayRun(port, args.paced_frames, args.paced_interval))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    header(f"Streaming throughput, {args.frames} SSE frames per stream, {args.runs} streams per path")
    print(f"proxy    {summary(proxyRate, 1.0, 'frames/s')}")
    print(f"direct   {summary(directRate, 1.0, 'frames/s')}")
    print(f"proxy    request -> first byte  {summary(proxyFirst)}")
    print(f"direct   request -> first byte  {summary(directFirst)}")
    ratio = median(proxyRate) / median(directRate)
    print()
    print(f"ratio (median proxy / median direct frames/s): {ratio:.2f}")
    print(f"target >= {TARGET_RATIO:g}: {'MET' if ratio >= TARGET_RATIO else 'MISSED'}")

    header(
        f"Per-frame delay, 1 frame every {args.paced_interval * 1000:g} ms,"
        f" {args.paced_frames} frames x {args.paced_runs} streams per path"
    )
    print(f"proxy    send -> arrival   {summary(proxyDelay)}")
    print(f"direct   send -> arrival   {summary(directDelay)}")
    added = (median(proxyDelay) - median(directDelay)) * 1000
    print()
    print(f"added delay per frame (median proxy - median direct): {added:.3f} ms")
    print(f"p90 proxy - p90 direct:                               {(p90(proxyDelay) - p90(directDelay)) * 1000:.3f} ms")
    print(f"target <= {TARGET_DELAY_MS:g} ms: {'MET' if added <= TARGET_DELAY_MS else 'MISSED'}")
    print(f"\n(total wall time {time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
