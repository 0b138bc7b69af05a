#!/usr/bin/env python3
"""
Other streams' pace while a large JSON body is posted.

dynllm runs two models on the fast SSE upstream of C{streaming.py} (two
upstream processes, so the upstream's own parsing of the big body does not
touch the measured stream). A client reads a paced stream from the first
(one frame every 5 ms by default) and records when each frame arrives;
meanwhile another client posts a large chat request (default 55 MB of JSON:
a message list of short messages, many objects) to the second model. The
script prints the largest gap between two frames and the median gap, for
runs without the big body, with it posted through dynllm, and with it
posted straight to the second model's upstream (what the machine's CPU,
shared by the client, the upstreams and dynllm, costs the stream without
dynllm touching the body), alternating.

    PYTHONPATH=. .venv/bin/python benchmarks/big_body.py [--mb 55] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import os
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import BenchDaemon, buildRequest, header, median, terminateOnSignals  # noqa: E402
from benchmarks import streaming  # noqa: E402
from benchmarks.streaming import Dechunker  # noqa: E402


def writeUpstream(directory: str) -> tuple[str, str]:
    """
    L{streaming.writeUpstream}, with an upstream that gathers a request's
    bytes in a C{bytearray} (C{bytes +=} takes minutes on a 55 MB body).
    """
    upstream = streaming.UPSTREAM.replace('buf = b""', "buf = bytearray()")
    upstream = upstream.replace("lines = head.split(", "lines = bytes(head).split(")
    assert upstream.count("bytearray()") == 1 and upstream.count("bytes(head)") == 1
    original = streaming.UPSTREAM
    streaming.UPSTREAM = upstream
    try:
        return streaming.writeUpstream(directory)
    finally:
        streaming.UPSTREAM = original


def bigBody(megabytes: float) -> bytes:
    """
    @return: a chat request for model C{big} of about C{megabytes} MB.
    """
    message = {"role": "user", "content": "hello there, how are you today?"}
    one = len(json.dumps(message)) + 2
    count = int(megabytes * 1024 * 1024 / one)
    return json.dumps({"model": "big", "messages": [message] * count, "max_tokens": 1}).encode()


def pacedGaps(port: int, frames: int, interval: float, during: bytes | None, postPort: int = 0) -> list[float]:
    """
    Read a paced stream from model C{sse}; if C{during} is given, post it
    to C{postPort} (the daemon if 0) from another thread once the stream
    has begun.

    @return: the gaps between consecutive frames' arrivals, in seconds.
    """
    body = json.dumps(
        {"model": "sse", "stream": True, "messages": [], "bench_frames": frames, "bench_interval": interval}
    ).encode()
    arrivals: list[float] = []
    poster = None
    posted: list[object] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(buildRequest("POST", "/v1/chat/completions", port, body, keepAlive=False))
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += sock.recv(65536)
        _, _, rest = raw.partition(b"\r\n\r\n")
        decoder = Dechunker()
        pending = b""
        data = rest
        while True:
            now = time.perf_counter()
            pending += decoder.feed(data)
            while b"\n\n" in pending:
                frame, _, pending = pending.partition(b"\n\n")
                if frame.startswith(b"data: {"):
                    arrivals.append(now)
            if during is not None and poster is None and len(arrivals) >= frames // 5:
                poster = threading.Thread(target=post, args=(postPort or port, during, posted), daemon=True)
                poster.start()
            if decoder.done:
                break
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("the paced stream ended early")
    if poster is not None:
        poster.join(60)
        if not posted or posted[0] != 200:
            raise RuntimeError(f"the big body was not served: {posted}")
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


def post(port: int, body: bytes, result: list[object]) -> None:
    """
    Post C{body} and record the answer's status in C{result}.
    """
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(buildRequest("POST", "/v1/chat/completions", port, body, keepAlive=False))
        raw = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            raw += data
    result.append(int(raw.split(b" ", 2)[1]) if raw else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=55, help="size of the big body in MB (default 55)")
    parser.add_argument("--runs", type=int, default=3, help="runs with and without the big body (default 3)")
    parser.add_argument("--frames", type=int, default=400, help="frames per paced stream (default 400)")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between frames (default 0.005)")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory (its log)")
    args = parser.parse_args()
    terminateOnSignals()
    scratch = tempfile.mkdtemp(prefix="dynllm-bench-big-")
    body = bigBody(args.mb)
    quiet: list[list[float]] = []
    loaded: list[list[float]] = []
    direct: list[list[float]] = []
    try:
        program, model = writeUpstream(scratch)
        config = {
            "total_vram_mb": 1000,
            "max_request_body_mb": 64,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": program},
            "models": [
                {"name": "sse", "path": model, "backend": "llamacpp", "vram_mb": 100},
                {"name": "big", "path": model, "backend": "llamacpp", "vram_mb": 100},
            ],
        }
        with BenchDaemon(config, keep=args.keep) as bench:
            for name in ("sse", "big"):
                status, _, text = bench.daemon.post("/admin/models/load", {"model": name})
                if status != 200:
                    raise RuntimeError(f"load failed: {status} {text!r}")
            bigPort = bench.models()["big"]["port"]
            pacedGaps(bench.port, 50, args.interval, None)  # warm up
            for i in range(args.runs):
                order = [(None, 0, quiet), (body, 0, loaded), (body, bigPort, direct)]
                for during, postPort, gaps in order if i % 2 == 0 else order[::-1]:
                    gaps.append(pacedGaps(bench.port, args.frames, args.interval, during, postPort))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    header(
        f"Frame gaps of a stream paced at {args.interval * 1000:g} ms while a {len(body) / 1e6:.1f} MB"
        f" JSON body is posted ({args.runs} runs each)"
    )
    conditions = (
        ("no big body", quiet),
        ("big body through dynllm", loaded),
        ("big body straight to its backend (the machine's share)", direct),
    )
    for label, runs in conditions:
        largest = [max(g) * 1000 for g in runs]
        medians = [median(g) * 1000 for g in runs]
        print(
            f"{label}:\n    largest gap per run {', '.join(f'{x:.1f}' for x in largest)} ms;"
            f" median gap {median(medians):.2f} ms"
        )
    added = median([max(g) for g in loaded]) * 1000 - median([max(g) for g in quiet]) * 1000
    share = median([max(g) for g in loaded]) * 1000 - median([max(g) for g in direct]) * 1000
    print(f"\nlargest gap, median over runs: through dynllm minus no big body {added:+.1f} ms,")
    print(f"through dynllm minus straight to the backend {share:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
