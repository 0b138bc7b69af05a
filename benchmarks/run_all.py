#!/usr/bin/env python3
"""
Run every benchmark, one after the other, each in a process of its own.

    PYTHONPATH=. .venv/bin/python benchmarks/run_all.py [--quick]

--quick runs fewer iterations (a smoke test, not figures to quote). The fault
soak (soak.py) is not among them: it takes minutes and compares nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BENCHMARKS = [
    ("cold_start.py", ["-n", "5", "--warmup", "1"]),
    ("latency.py", ["-n", "200", "--warmup", "20"]),
    ("streaming.py", ["--runs", "3", "--paced-runs", "1"]),
    ("upload.py", ["-n", "3", "--sizes", "1"]),
    ("concurrency.py", ["--seconds", "10", "--window", "2.5"]),
    ("chatty.py", ["--windows", "2", "--seconds", "1"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed = []
    started = time.monotonic()
    for script, quickArgs in BENCHMARKS:
        print(f"\n===== {script} =====", flush=True)
        argv = [sys.executable, os.path.join(HERE, script)] + (quickArgs if args.quick else [])
        code = subprocess.call(argv, cwd=ROOT, env=env)
        if code:
            failed.append(f"{script} (exit {code})")
    print(f"\n(all benchmarks: {time.monotonic() - started:.0f}s)")
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
