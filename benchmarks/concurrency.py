#!/usr/bin/env python3
"""
Concurrent load: 20 clients (half of them streamed) send chat completions to
one real llama-server model without pause, through dynllm and directly to
the same llama-server process (its port from GET /admin/models), in
alternating windows so that drift of the machine affects both paths alike.

Every request opens a connection of its own (as curl does), so that only
dynllm's pool of backend connections is reused: llama-server closes a
connection after a streamed response without saying so, and a pool that
reuses it loses requests (502 "the backend sent no response"). Through
dynllm there must be 0 failures; the script exits 1 otherwise.

    PYTHONPATH=. .venv/bin/python benchmarks/concurrency.py [--seconds 60] [--clients 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    BenchDaemon,
    header,
    httpRequest,
    llamaConfig,
    llamaServer,
    median,
    summary,
    terminateOnSignals,
    tinyModels,
)


class Path:
    """
    The requests of one path (dynllm or direct) and what became of them.
    """

    def __init__(self, name: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.headers = headers or {}
        self.lock = threading.Lock()
        self.seconds = 0.0  # time spent in this path's windows
        self.plain: list[float] = []  # non-streamed: request to last byte
        self.streamed: list[float] = []  # streamed: request to last byte
        self.firstByte: list[float] = []  # streamed: request to first byte
        self.failures: list[str] = []

    @property
    def requests(self) -> int:
        return len(self.plain) + len(self.streamed) + len(self.failures)


def chatBody(stream: bool, maxTokens: int) -> bytes:
    return json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": maxTokens,
            "stream": stream,
        }
    ).encode()


def client(path: Path, stream: bool, maxTokens: int, until: float) -> None:
    """
    Send requests one after the other on new connections until C{until}
    (a monotonic time), recording each in C{path}.
    """
    body = chatBody(stream, maxTokens)
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            resp = httpRequest(path.port, "POST", "/v1/chat/completions", body, timeout=60, headers=path.headers)
        except Exception as e:
            with path.lock:
                path.failures.append(f"{type(e).__name__}: {e}")
            continue
        ok = resp.status == 200 and (
            resp.body.rstrip().endswith(b"data: [DONE]") if stream else b'"choices"' in resp.body
        )
        with path.lock:
            if not ok:
                path.failures.append(f"{resp.status} {resp.body[:200]!r}")
            elif stream:
                path.streamed.append(resp.done - t0)
                path.firstByte.append(resp.firstByte - t0)
            else:
                path.plain.append(resp.done - t0)


def window(path: Path, clients: int, seconds: float, maxTokens: int) -> None:
    """
    Run C{clients} concurrent clients against C{path} for C{seconds}; the
    first half stream.
    """
    started = time.monotonic()
    until = started + seconds
    threads = [
        threading.Thread(target=client, args=(path, i < clients // 2, maxTokens, until), daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path.seconds += time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="total timed seconds, both paths (default 60)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    parser.add_argument("--window", type=float, default=5, help="seconds per window of one path (default 5)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per completion (default 8)")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory (its log)")
    args = parser.parse_args()
    terminateOnSignals()

    entry = {
        "name": "tiny",
        "path": tinyModels()["tiny-llama.gguf"],
        "backend": "llamacpp",
        "vram_mb": 100,
        "context_size": 2048,
        "extra_args": ["-np", "4"],
    }
    started = time.monotonic()
    with BenchDaemon(llamaConfig([entry], binary=llamaServer(), log_level="debug"), keep=args.keep) as bench:
        status, _, text = bench.daemon.post("/admin/models/load", {"model": "tiny"})
        if status != 200:
            raise RuntimeError(f"load failed: {status} {text!r}")
        proxy = Path("dynllm", bench.port)
        direct = Path("direct", bench.models()["tiny"]["port"], bench.backendHeaders("tiny"))
        # Warm up both paths.
        window(Path("warm-up", bench.port), args.clients, 1, args.max_tokens)
        window(Path("warm-up", direct.port, direct.headers), args.clients, 1, args.max_tokens)
        windows = max(1, round(args.seconds / args.window / 2))
        for i in range(windows):
            order = [proxy, direct] if i % 2 == 0 else [direct, proxy]
            for path in order:
                window(path, args.clients, args.window, args.max_tokens)
        resent = bench.daemon.log().count("on a new connection: the reused one failed")

    header(
        f"Concurrency: {args.clients} concurrent clients ({args.clients // 2} streamed), chat completions of"
        f" {args.max_tokens} tokens, {windows} windows of {args.window:g} s per path"
    )
    for path in (proxy, direct):
        print(f"{path.name:7}  requests {path.requests:6d}   failures {len(path.failures):4d}"
              f"   {path.requests / path.seconds:7.1f} requests/s")
    print()
    for path in (proxy, direct):
        print(f"{path.name:7}  non-streamed, request -> last byte   {summary(path.plain)}")
        print(f"{path.name:7}  streamed, request -> first byte      {summary(path.firstByte)}")
        print(f"{path.name:7}  streamed, request -> last byte       {summary(path.streamed)}")
    print()
    print(f"throughput ratio (dynllm / direct requests/s):          "
          f"{(proxy.requests / proxy.seconds) / (direct.requests / direct.seconds):.2f}")
    print(f"latency ratio, non-streamed (median dynllm / direct):  {median(proxy.plain) / median(direct.plain):.2f}x")
    print(f"latency ratio, streamed (median dynllm / direct):      {median(proxy.streamed) / median(direct.streamed):.2f}x")
    print(f"requests dynllm resent on a new connection:            {resent}")
    for path in (proxy, direct):
        for failure in sorted(set(path.failures))[:5]:
            print(f"{path.name} failure: {failure}")
    print(f"failures through dynllm: {len(proxy.failures)} (must be 0): {'MET' if not proxy.failures else 'MISSED'}")
    print(f"\n(total wall time {time.monotonic() - started:.1f}s)")
    return 1 if proxy.failures else 0


if __name__ == "__main__":
    sys.exit(main())
