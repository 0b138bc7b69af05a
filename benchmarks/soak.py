#!/usr/bin/env python3
"""
Fault soak: N clients send chat completions to M real llama-server models
(the tiny random-weight GGUF, under M names) with room in the memory budget
for fewer than M, so that models are evicted and loaded again all along.
Some clients leave in the middle of a response (a close, or a reset), and
now and then one loaded backend is killed with SIGKILL to its process group
(its pid from GET /admin/models). Bounded in time, not part of CI.

At the end it prints the requests by outcome (the status, a cut stream, or
"client left"), what dynllm counted itself (/metrics), the daemon's resident
memory and open file descriptors at the start and the end, requests still
in flight once the clients stopped, and the backend processes still alive
after the daemon's orderly stop (SIGTERM). It exits 1 if a process leaked,
a request stayed in flight, or the daemon did not exit cleanly.

    PYTHONPATH=. .venv/bin/python benchmarks/soak.py [--clients 20] [--models 3] [--room 2] [--seconds 180]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    BenchDaemon,
    buildRequest,
    header,
    httpRequest,
    llamaConfig,
    llamaServer,
    median,
    p90,
    pidAlive,
    terminateOnSignals,
    tinyModels,
)
from tests.support import commandLine, flag  # noqa: E402

#: Memory each model declares; the budget is this times --room.
VRAM_MB = 100

#: The outcome of a request whose client left on purpose.
CLIENT_LEFT = "client left"


class Outcomes:
    """
    Requests by outcome, from the clients' side, counted across threads.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)

    def add(self, outcome: str, example: str = "", seconds: float | None = None) -> None:
        with self.lock:
            self.counts[outcome] += 1
            if seconds is not None:
                self.seconds[outcome].append(seconds)
            if example and outcome not in self.examples:
                self.examples[outcome] = example[:200]


def chatBody(model: str, stream: bool, maxTokens: int) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": maxTokens,
            "stream": stream,
        }
    ).encode()


def leave(port: int, body: bytes, rng: random.Random) -> None:
    """
    Send a request, read a random part of its answer (possibly nothing),
    and go: half the time with a plain close, half with a reset (SO_LINGER
    0), as a killed client would.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(buildRequest("POST", "/v1/chat/completions", port, body, keepAlive=False))
        wanted = rng.choice([0, 1, rng.randint(1, 4000)])
        received = 0
        while received < wanted:
            data = sock.recv(min(65536, wanted - received))
            if not data:
                break
            received += len(data)
        if rng.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def client(
    port: int, models: list[str], outcomes: Outcomes, until: float, args: argparse.Namespace, seed: int
) -> None:
    """
    Send requests on new connections until C{until} (a monotonic time): a
    random model, streamed or not, leaving early with probability
    C{args.leave}, with a random pause of up to C{args.pause} seconds
    between requests.
    """
    rng = random.Random(seed)
    while time.monotonic() < until:
        model = rng.choice(models)
        stream = rng.random() < 0.5
        body = chatBody(model, stream, args.max_tokens)
        t0 = time.monotonic()
        try:
            if rng.random() < args.leave:
                leave(port, body, rng)
                outcomes.add(CLIENT_LEFT)
            else:
                resp = httpRequest(port, "POST", "/v1/chat/completions", body, timeout=120)
                if resp.status != 200:
                    outcomes.add(str(resp.status), resp.body.decode("utf-8", "replace"), time.monotonic() - t0)
                elif stream and not resp.body.rstrip().endswith(b"data: [DONE]"):
                    # A stream that began while its model loaded carries a
                    # failure as an error event.
                    last = resp.body.rstrip().rsplit(b"\n", 1)[-1]
                    kind = "an error event" if b'"error"' in last else "no [DONE]"
                    outcomes.add(f"200, stream ends with {kind}", last.decode("utf-8", "replace"))
                elif not stream and b'"choices"' not in resp.body:
                    outcomes.add("200 without choices", resp.body.decode("utf-8", "replace"))
                else:
                    outcomes.add("200", seconds=time.monotonic() - t0)
        except ConnectionError as e:
            # dynllm closed the connection before the answer's end: the
            # one signal left once a relayed body's backend is gone.
            outcomes.add("cut (closed before the end)", str(e))
        except (OSError, ValueError) as e:
            # socket.timeout: no answer within 120 s.
            outcomes.add(f"{type(e).__name__}", str(e))
        time.sleep(rng.random() * args.pause)


def processFigures(pid: int) -> tuple[int, int]:
    """
    @return: the resident memory (bytes) and open file descriptors of
        process C{pid}, read from C{/proc}.
    """
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def backendsOf(binary: str, ports: range) -> set[int]:
    """
    @return: the pids of running llama-server processes (C{binary}) whose
        C{--port} is in C{ports}: the backends of one daemon, even once
        they have lost their parent.
    """
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            argv = commandLine(pid)
        except OSError:
            continue
        if argv and os.path.realpath(argv[0]) == binary and pidAlive(pid):
            port = flag(argv, "--port")
            if port is not None and port.isdigit() and int(port) in ports:
                found.add(pid)
    return found


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    @return: the daemon's C{/metrics}, keyed by name and sorted labels.
    """
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpRequest(port, "GET", "/metrics", timeout=30)
    found = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **match: str) -> dict[str, float]:
    """
    @return: the sum of metric C{name}'s samples whose labels include
        C{match}, by the value of the one label in C{match} given as C{"*"}.
    """
    sums: dict[str, float] = collections.defaultdict(float)
    for (sampleName, labels), value in metrics.items():
        if sampleName != name:
            continue
        labelMap = dict(labels)
        key = ""
        for label, wanted in match.items():
            if wanted == "*":
                key = labelMap.get(label, "")
            elif labelMap.get(label) != wanted:
                break
        else:
            sums[key] += value
    return dict(sums)


def killer(bench: BenchDaemon, every: float, until: float, rng: random.Random, killed: list[str]) -> None:
    """
    Every C{every} seconds until C{until}, kill one loaded backend's process
    group with SIGKILL (its pid from C{/admin/models}), as the OOM killer
    or a crash would.
    """
    next_ = time.monotonic() + every * (0.5 + rng.random())
    while time.monotonic() < until:
        time.sleep(0.2)
        if time.monotonic() < next_:
            continue
        next_ = time.monotonic() + every * (0.5 + rng.random())
        try:
            loaded = [m for m in bench.models().values() if m["status"] == "loaded" and m.get("pid")]
        except Exception as e:
            print(f"(killer: /admin/models failed: {e})", file=sys.stderr)
            continue
        if not loaded:
            continue
        victim = rng.choice(loaded)
        try:
            os.killpg(os.getpgid(victim["pid"]), signal.SIGKILL)
            killed.append(victim["name"])
        except OSError:
            pass


def sampler(pid: int, until: float, peak: list[int], trend: list[int]) -> None:
    """
    Every second, keep the highest resident memory and fd count of C{pid}
    seen in C{peak}, and its resident memory in C{trend}.
    """
    while time.monotonic() < until:
        try:
            rss, fds = processFigures(pid)
        except OSError:
            return
        peak[0], peak[1] = max(peak[0], rss), max(peak[1], fds)
        trend.append(rss)
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    parser.add_argument("--models", type=int, default=3, help="models, each a llama-server (default 3)")
    parser.add_argument("--room", type=int, default=2, help="models the budget holds at once (default 2)")
    parser.add_argument("--seconds", type=float, default=180, help="duration of the load (default 180)")
    parser.add_argument("--kill-every", type=float, default=20,
                        help="mean seconds between backend kills (default 20; 0: none)")
    parser.add_argument("--leave", type=float, default=0.1,
                        help="share of requests whose client leaves early (default 0.1)")
    parser.add_argument("--pause", type=float, default=0.5, help="longest pause between a client's requests (s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (default 32)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory (its log)")
    args = parser.parse_args()
    terminateOnSignals()
    if not 0 < args.room:
        parser.error("--room must be at least 1")

    binary = os.path.realpath(llamaServer())
    names = [f"tiny-{i}" for i in range(args.models)]
    entries = [
        {
            "name": name,
            "path": tinyModels()["tiny-llama.gguf"],
            "backend": "llamacpp",
            "vram_mb": VRAM_MB,
            "context_size": 1024,
            "extra_args": ["-np", "2"],
        }
        for name in names
    ]
    config = llamaConfig(entries, binary=binary, total_vram_mb=VRAM_MB * args.room, queue_timeout_seconds=30)
    rng = random.Random(args.seed)
    outcomes = Outcomes()
    killed: list[str] = []
    started = time.monotonic()
    exitCode = None
    leaked: set[int] = set()
    with BenchDaemon(config, keep=args.keep) as bench:
        pid = bench.daemon.process.pid  # twistd -n: the daemon itself
        backend = bench.daemon.config["backend"]
        ports = range(backend["port_range_start"], backend["port_range_end"] + 1)
        atStart = processFigures(pid)
        peak = list(atStart)
        trend: list[int] = []
        until = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=client, args=(bench.port, names, outcomes, until, args, args.seed * 1000 + i),
                             daemon=True)
            for i in range(args.clients)
        ]
        threads.append(threading.Thread(target=sampler, args=(pid, until, peak, trend), daemon=True))
        if args.kill_every > 0:
            threads.append(threading.Thread(target=killer, args=(bench, args.kill_every, until, rng, killed),
                                            daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loadSeconds = time.monotonic() - started
        # Let the requests of clients that left drain.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            models = bench.models()
            inFlight = sum(m["active_requests"] + m["waiting_requests"] for m in models.values())
            if not inFlight:
                break
            time.sleep(0.5)
        atEnd = processFigures(pid)
        metrics = scrape(bench.port)
        backendsBefore = backendsOf(binary, ports)
        # The same figures with no backend (no pipes, no pooled
        # connections), comparable with those at the start.
        for name in names:
            bench.daemon.post("/admin/models/unload", {"model": name})
        time.sleep(1)
        atEndUnloaded = processFigures(pid)
        exitCode = bench.daemon.stop()
        time.sleep(1)
        leaked = backendsOf(binary, ports)
        for backendPid in leaked:
            try:
                os.killpg(os.getpgid(backendPid), signal.SIGKILL)
            except OSError:
                pass

    header(
        f"Fault soak: {args.clients} clients, {args.models} llama-server models with room for {args.room},"
        f" {args.seconds:g} s, {args.leave:.0%} of clients leave early, a backend killed every"
        f" ~{args.kill_every:g} s"
    )
    requests = sum(outcomes.counts.values())
    print(f"requests (client side): {requests} ({requests / loadSeconds:.1f}/s)")
    for outcome, count in sorted(outcomes.counts.items(), key=lambda item: -item[1]):
        seconds = outcomes.seconds.get(outcome)
        timing = f"   request to end: median {median(seconds):6.2f} s, p90 {p90(seconds):6.2f} s" if seconds else ""
        print(f"  {outcome:28} {count:6d}  {count / requests:6.1%}{timing}")
    for outcome, example in sorted(outcomes.examples.items()):
        print(f"  e.g. {outcome}: {example}")
    print(f"backends killed (SIGKILL to the process group): {len(killed)} {dict(collections.Counter(killed))}")
    print()
    print("dynllm's own counts (/metrics):")
    codes = total(metrics, "dynllm_requests_total", code="*")
    print("  requests by code:  " + ", ".join(f"{code} {int(n)}" for code, n in sorted(codes.items())))
    unloads = {c: n for c, n in total(metrics, "dynllm_model_unloads_total", cause="*").items() if n}
    print("  unloads by cause:  " + ", ".join(f"{c} {int(n)}" for c, n in sorted(unloads.items())))
    for name, label in (("dynllm_model_loads_total", "loads"), ("dynllm_model_load_failures_total", "load failures"),
                        ("dynllm_model_crashes_total", "crashes"),
                        ("dynllm_upstream_timeouts_total", "upstream timeouts")):
        print(f"  {label + ':':18} {int(sum(total(metrics, name).values()))}")
    print()
    mib = 1024 * 1024
    print(f"daemon resident memory: start {atStart[0] / mib:.1f} MiB, peak {peak[0] / mib:.1f} MiB,"
          f" end {atEnd[0] / mib:.1f} MiB ({len(backendsBefore)} backends),"
          f" {atEndUnloaded[0] / mib:.1f} MiB once every model was unloaded")
    if trend:
        quarters = [trend[min(len(trend) - 1, len(trend) * q // 4)] for q in range(1, 5)]
        print("daemon resident memory after each quarter of the load: "
              + ", ".join(f"{rss / mib:.1f}" for rss in quarters) + " MiB")
    print(f"daemon open fds:        start {atStart[1]}, peak {peak[1]}, end {atEnd[1]}"
          f" ({len(backendsBefore)} backends), {atEndUnloaded[1]} once every model was unloaded")
    print(f"process_resident_memory_bytes / process_open_fds at the end (/metrics):"
          f" {metrics[('process_resident_memory_bytes', ())] / mib:.1f} MiB / {int(metrics[('process_open_fds', ())])}")
    print(f"requests in flight or waiting 30 s after the clients stopped: {inFlight} (must be 0)")
    print(f"daemon exit status after SIGTERM: {exitCode} (0, or -15: twistd ends by its stopping signal)")
    print(f"backends alive after the daemon's orderly stop: {len(leaked)} {sorted(leaked)} (must be 0)")
    failed = bool(leaked) or bool(inFlight) or exitCode not in (0, -signal.SIGTERM)
    print(f"{'MISSED' if failed else 'MET'}")
    print(f"\n(total wall time {time.monotonic() - started:.1f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
