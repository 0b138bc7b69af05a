#!/usr/bin/env python3
"""
Cold-start overhead: the time to the first response byte of a request for a
model that is not loaded, through dynllm, against llama-server started by
hand the fastest way (spawn, poll /health every millisecond, send the same
request), measured interleaved in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/cold_start.py [-n 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    BenchDaemon,
    ChildProcesses,
    freePort,
    header,
    httpRequest,
    llamaConfig,
    llamaServer,
    median,
    summary,
    terminateOnSignals,
    tinyModels,
)
from dynllm.backends.llamacpp import LlamaCppBackend  # noqa: E402
from dynllm.config import parseConfig  # noqa: E402

TARGET_MS = 30.0
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def modelEntry(path: str) -> dict:
    return {
        "name": "tiny",
        "path": path,
        "backend": "llamacpp",
        "vram_mb": 100,
        "context_size": 512,
        "extra_args": ["-np", "1"],
    }


def directArgv(config: dict, port: int) -> list[str]:
    """
    The very command line dynllm runs (dynllm's own argv builder).
    """
    parsed = parseConfig(config)
    model = parsed.models[0]
    return LlamaCppBackend().argv(model, parsed.backend.binaryFor("llamacpp"), port)


def directCold(children: ChildProcesses, config: dict) -> tuple[float, float, float]:
    """
    Spawn llama-server, poll /health as fast as possible, then send the chat
    request. @return: seconds (spawn->health 200, health->first byte of the
    chat response, spawn->first byte).
    """
    port = freePort()
    argv = directArgv(config, port)
    t0 = time.perf_counter()
    proc = children.spawn(argv)
    try:
        while True:
            try:
                if httpRequest(port, "GET", "/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}: {argv}")
            time.sleep(0.001)
        tHealth = time.perf_counter()
        resp = httpRequest(port, "POST", "/v1/chat/completions", CHAT)
        if resp.status != 200:
            raise RuntimeError(f"direct chat request: {resp.status} {resp.body[:200]!r}")
        return tHealth - t0, resp.firstByte - tHealth, resp.firstByte - t0
    finally:
        children.stop(proc)


def proxyCold(bench: BenchDaemon) -> tuple[float, float, float]:
    """
    Unload the model, then time one chat request through dynllm.
    @return: (seconds to the first response byte, time.time() at send,
        time.time() at the first byte).
    """
    daemon = bench.daemon
    status, _, body = daemon.post("/admin/models/unload", {"model": "tiny"})
    if status != 200 or json.loads(body)["status"] != "unloaded":
        raise RuntimeError(f"unload failed: {status} {body!r}")
    time.sleep(0.1)  # let the old backend's exit settle
    wall = time.time()
    t0 = time.perf_counter()
    resp = httpRequest(daemon.port, "POST", "/v1/chat/completions", CHAT)
    if resp.status != 200:
        raise RuntimeError(f"proxy chat request: {resp.status} {resp.body[:300]!r}")
    bench.models()  # note the backend pid, to check it is gone at the end
    return resp.firstByte - t0, wall, wall + (resp.firstByte - t0)


_LLAMA_TS = re.compile(r"^(\d+)\.(\d\d)\.(\d\d\d)\.(\d\d\d) ")


def logBreakdown(events: list[dict], walls: list[tuple[float, float]]) -> dict[str, list[float]]:
    """
    From the daemon's JSON log, for each timed proxy request: request ->
    spawn, spawn -> "model loaded" line read by dynllm, that line -> dynllm
    declares the model ready. Times are the daemon's log_time (time.time()).
    """
    cycles = []
    current: dict | None = None
    for e in events:
        fmt = e.get("log_format", "")
        if fmt.startswith("[{model}] started "):
            current = {"started": e["log_time"]}
            cycles.append(current)
        elif current is None:
            continue
        elif e.get("log_namespace") == "dynllm.process" and "model loaded" in e.get("line", ""):
            # One event per line of the backend's output.
            line = e["line"]
            current.setdefault("loadedLine", e["log_time"])
            m = _LLAMA_TS.match(line)
            if m:
                mins, secs, msec, usec = map(int, m.groups())
                current.setdefault("llamaOwn", mins * 60 + secs + msec / 1e3 + usec / 1e6)
        elif fmt == "{name} is ready on port {port}":
            current.setdefault("ready", e["log_time"])
    out: dict[str, list[float]] = {
        "request -> spawn": [],
        "spawn -> 'model loaded' line read": [],
        "'model loaded' line read -> ready": [],
        "ready -> first byte at the client": [],
        "spawn -> ready (as dynllm sees it)": [],
        "llama-server's own clock at 'model loaded'": [],
    }
    for wall, firstByteWall in walls:
        cycle = next((c for c in cycles if c["started"] >= wall), None)
        if cycle is None or "ready" not in cycle or "loadedLine" not in cycle:
            continue
        out["request -> spawn"].append(cycle["started"] - wall)
        out["spawn -> 'model loaded' line read"].append(cycle["loadedLine"] - cycle["started"])
        out["'model loaded' line read -> ready"].append(cycle["ready"] - cycle["loadedLine"])
        out["ready -> first byte at the client"].append(firstByteWall - cycle["ready"])
        out["spawn -> ready (as dynllm sees it)"].append(cycle["ready"] - cycle["started"])
        if "llamaOwn" in cycle:
            out["llama-server's own clock at 'model loaded'"].append(cycle["llamaOwn"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=15, help="timed cold starts per path (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed cold starts per path first")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory (its log)")
    args = parser.parse_args()
    terminateOnSignals()

    model = tinyModels()["tiny-llama.gguf"]
    config = llamaConfig([modelEntry(model)], binary=llamaServer())
    children = ChildProcesses()
    proxy: list[float] = []
    walls: list[tuple[float, float]] = []
    direct: list[tuple[float, float, float]] = []
    started = time.monotonic()
    bench = BenchDaemon(config, keep=args.keep, jsonLog=True)
    try:
        with bench:
            for _ in range(args.warmup):
                proxyCold(bench)
                directCold(children, config)
            for i in range(args.n):
                # Alternate the order so that neither path always runs first.
                if i % 2 == 0:
                    p = proxyCold(bench)
                    direct.append(directCold(children, config))
                else:
                    direct.append(directCold(children, config))
                    p = proxyCold(bench)
                proxy.append(p[0])
                walls.append((p[1], p[2]))
            events = bench.log()
    finally:
        children.killAll()

    header(f"Cold start, llama-server + tiny-llama.gguf, {args.n} runs per path")
    dSpawnHealth = [d[0] for d in direct]
    dHealthByte = [d[1] for d in direct]
    dTotal = [d[2] for d in direct]
    print(f"proxy    request -> first byte           {summary(proxy)}")
    print(f"direct   spawn -> /health 200           {summary(dSpawnHealth)}")
    print(f"direct   /health 200 -> first byte      {summary(dHealthByte)}")
    print(f"direct   spawn -> first byte (total)    {summary(dTotal)}")
    overhead = (median(proxy) - median(dTotal)) * 1000
    ratio = median(proxy) / median(dTotal)
    verdict = "MET" if overhead <= TARGET_MS else "MISSED"
    print()
    print(f"overhead (median proxy - median direct): {overhead:8.1f} ms   ratio {ratio:.2f}x")
    print(f"target <= {TARGET_MS:g} ms: {verdict}")

    breakdown = logBreakdown(events, walls)
    if any(breakdown.values()):
        header("Where dynllm's cold start goes (daemon log timestamps)")
        for name, values in breakdown.items():
            if values:
                print(f"{name:44s} {summary(values)}")
        print(
            "('model loaded' line read -> ready is how long after the backend was"
            " ready dynllm noticed;\n the llama-server line is printed as it becomes"
            " ready, so this is the detection delay.)"
        )
    print(f"\n(total wall time {time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
