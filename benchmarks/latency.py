#!/usr/bin/env python3
"""
Added latency at concurrency 1: small non-streamed requests to a loaded tiny
model through dynllm and directly to the same llama-server process (its port
from GET /admin/models, its key from its environment), each path on one
persistent connection, the two
paths interleaved so that drift of the machine affects both alike.

    PYTHONPATH=. .venv/bin/python benchmarks/latency.py [-n 1000] [--endpoint embeddings|completions|chat]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    BenchDaemon,
    header,
    llamaConfig,
    llamaServer,
    median,
    p90,
    summary,
    terminateOnSignals,
    tinyModels,
)

TARGET_MS = 1.0

ENDPOINTS = {
    # name: (model file, model_type, route, body)
    "embeddings": ("tiny-embed.gguf", "embedding", "/v1/embeddings", {"input": "hi"}),
    "completions": ("tiny-llama.gguf", "llm", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    "chat": (
        "tiny-llama.gguf",
        "llm",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    ),
}


class Client:
    """
    One persistent HTTP/1.1 connection; counts reconnections.
    """

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.connect()
        self.sock = self.conn.sock
        self.reconnects = 0

    def post(self, path: str, body: bytes) -> float:
        t0 = time.perf_counter()
        self.conn.request("POST", path, body, self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: {resp.status} {data[:200]!r}")
        if self.conn.sock is not self.sock:
            self.reconnects += 1
            self.sock = self.conn.sock
        return elapsed

    def close(self) -> None:
        self.conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="timed requests per path (default 1000)")
    parser.add_argument("--warmup", type=int, default=100, help="untimed requests per path first")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="embeddings")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory (its log)")
    args = parser.parse_args()
    terminateOnSignals()

    fileName, modelType, route, extra = ENDPOINTS[args.endpoint]
    entry = {
        "name": "tiny",
        "path": tinyModels()[fileName],
        "backend": "llamacpp",
        "model_type": modelType,
        "vram_mb": 100,
        "context_size": 512,
        "extra_args": ["-np", "1"],
    }
    body = json.dumps({"model": "tiny", **extra}).encode()
    started = time.monotonic()
    proxyTimes: list[float] = []
    directTimes: list[float] = []
    with BenchDaemon(llamaConfig([entry], binary=llamaServer()), keep=args.keep) as bench:
        status, _, text = bench.daemon.post("/admin/models/load", {"model": "tiny"})
        if status != 200:
            raise RuntimeError(f"load failed: {status} {text!r}")
        port = bench.models()["tiny"]["port"]
        proxy = Client(bench.port)
        direct = Client(port, bench.backendHeaders("tiny"))
        try:
            for i in range(args.warmup):
                proxy.post(route, body)
                direct.post(route, body)
            proxy.reconnects = direct.reconnects = 0
            for i in range(args.n):
                if i % 2 == 0:
                    proxyTimes.append(proxy.post(route, body))
                    directTimes.append(direct.post(route, body))
                else:
                    directTimes.append(direct.post(route, body))
                    proxyTimes.append(proxy.post(route, body))
        finally:
            proxy.close()
            direct.close()

    header(f"Added latency, concurrency 1, POST {route} (tiny model), {args.n} requests per path")
    print(f"proxy    {summary(proxyTimes)}")
    print(f"direct   {summary(directTimes)}")
    paired = [p - d for p, d in zip(proxyTimes, directTimes)]
    added = (median(proxyTimes) - median(directTimes)) * 1000
    print()
    print(f"added latency (median proxy - median direct): {added:.3f} ms")
    print(f"median of paired differences:                 {median(paired) * 1000:.3f} ms")
    print(f"p90 proxy - p90 direct:                       {(p90(proxyTimes) - p90(directTimes)) * 1000:.3f} ms")
    print(f"ratio (median proxy / median direct):         {median(proxyTimes) / median(directTimes):.2f}x")
    print(f"target <= {TARGET_MS:g} ms: {'MET' if added <= TARGET_MS else 'MISSED'}")
    if proxy.reconnects or direct.reconnects:
        print(f"note: reconnections during the timed run: proxy {proxy.reconnects}, direct {direct.reconnects}")
    print(f"\n(total wall time {time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
