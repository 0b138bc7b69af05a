#!/usr/bin/env python3
"""
A chatty backend: what its output costs the daemon.

The backend is a small program written by this script to a temporary
directory and configured as dynllm's "llama-server" binary: it answers
C{GET /health} with 200 and then prints lines of 100 bytes to its standard
error at a set rate (default 50 MB/s) for as long as it runs, as a backend
in a verbose mode or a crash loop of tracebacks would. The script loads it,
then samples, in windows of a few seconds each:

- the daemon's CPU use (user + system time from C{/proc/PID/stat}, as a
  percentage of one core);
- how fast the daemon's log grows (MB/s);
- how fast the backend really printed (MB/s), from its own count (a daemon
  that cannot keep up slows it down through the pipe).

It prints the median of each, and the budget's message if the daemon
logged one. C{--source DIR} runs the daemon from another checkout's
C{DIR/src} (say, an older commit unpacked with C{git archive}) to compare
before and after.

    PYTHONPATH=. .venv/bin/python benchmarks/chatty.py [--rate 50] [--windows 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import shutil
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import BenchDaemon, header, median, terminateOnSignals  # noqa: E402
from tests.support import request  # noqa: E402

BACKEND = r'''#!%(python)s
"""A chatty backend for dynllm's benchmark (llama-server's command line)."""
import argparse, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
args, _ = parser.parse_known_args()
rate = float(os.environ.get("CHATTY_MB_PER_S", "50")) * 1e6
written = [0]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "ok"}' if self.path == "/health" else str(written[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

server = ThreadingHTTPServer((args.host, args.port), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.write(2, b"chatty: model loaded\n")
line = b"chatty: " + b"x" * 84 + b" %%06d\n"
block = b"".join(line %% i for i in range(650))
start = time.monotonic()
while True:
    os.write(2, block)
    written[0] += len(block)
    ahead = written[0] / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
'''


def writeBackend(directory: str) -> tuple[str, str]:
    """
    @return: the backend program and a model file for it, in C{directory}.
    """
    program = os.path.join(directory, "chatty-server")
    with open(program, "w") as f:
        f.write(BACKEND % {"python": sys.executable})
    os.chmod(program, os.stat(program).st_mode | stat.S_IXUSR)
    model = os.path.join(directory, "chatty.gguf")
    with open(model, "wb") as f:
        f.write(b"GGUF")
    return program, model


def cpuSeconds(pid: int) -> float:
    """
    @return: the user and system CPU time of C{pid}, in seconds.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0, help="MB/s the backend prints (default 50)")
    parser.add_argument("--windows", type=int, default=5, help="sampling windows (default 5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per window (default 2)")
    parser.add_argument("--source", help="run the daemon from DIR/src (another checkout) instead")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory (its log)")
    args = parser.parse_args()
    terminateOnSignals()
    if args.source:
        src = os.path.join(os.path.abspath(args.source), "src")
        os.environ["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")

    scratch = tempfile.mkdtemp(prefix="dynllm-bench-chatty-")
    try:
        program, model = writeBackend(scratch)
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": program},
            "models": [
                {"name": "chatty", "path": model, "backend": "llamacpp", "vram_mb": 100,
                 "env": {"CHATTY_MB_PER_S": str(args.rate)}}
            ],
        }
        with BenchDaemon(config, keep=args.keep) as bench:
            status, _, text = bench.daemon.post("/admin/models/load", {"model": "chatty"})
            if status != 200:
                raise RuntimeError(f"load failed: {status} {text!r}")
            backendPort = bench.models()["chatty"]["port"]
            assert bench.daemon.process is not None
            pid = bench.daemon.process.pid
            logPath = bench.daemon.logPath

            def backendWritten() -> int:
                return int(request("GET", f"http://127.0.0.1:{backendPort}/written")[2])

            time.sleep(1.0)  # warm up
            cpu, logRate, printed = [], [], []
            for _ in range(args.windows):
                t0, c0, l0, w0 = time.monotonic(), cpuSeconds(pid), os.path.getsize(logPath), backendWritten()
                time.sleep(args.seconds)
                t1, c1, l1, w1 = time.monotonic(), cpuSeconds(pid), os.path.getsize(logPath), backendWritten()
                cpu.append(100 * (c1 - c0) / (t1 - t0))
                logRate.append((l1 - l0) / (t1 - t0) / 1e6)
                printed.append((w1 - w0) / (t1 - t0) / 1e6)
            bench.daemon.post("/admin/models/unload", {"model": "chatty"})
            with open(logPath, errors="replace") as f:
                notes = [line.rstrip() for line in f if "not logged in the last" in line]

        header(f"Chatty backend ({args.rate:g} MB/s asked, {args.windows} windows of {args.seconds:g} s)"
               + (f", daemon from {args.source}" if args.source else ""))
        print(f"backend printed     median {median(printed):8.1f} MB/s   (windows: {', '.join(f'{v:.1f}' for v in printed)})")
        print(f"daemon log grew     median {median(logRate):8.3f} MB/s   (windows: {', '.join(f'{v:.3f}' for v in logRate)})")
        print(f"daemon CPU          median {median(cpu):8.1f} %      (windows: {', '.join(f'{v:.1f}' for v in cpu)})")
        print(f"CPU per MB/s printed median {median(c / max(p, 1e-9) for c, p in zip(cpu, printed)):6.2f} % per MB/s")
        if notes:
            print(f"budget messages     {len(notes)}, e.g.: {notes[0][-140:]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
