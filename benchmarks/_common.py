"""
Helpers shared by the benchmark scripts: statistics, a benchmark daemon
(L{tests.support.Daemon} in a directory of our own, always stopped), a tiny
HTTP/1.1 client on raw sockets, process clean-up and the daemon's JSON log.

Run the scripts from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/NAME.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.support import Daemon, environmentOf, freePort, llamaServer, pidAlive, tinyModels  # noqa: E402

__all__ = [
    "BenchDaemon",
    "ChildProcesses",
    "Daemon",
    "freePort",
    "llamaServer",
    "tinyModels",
    "median",
    "p90",
    "summary",
    "httpRequest",
    "readDaemonLog",
    "terminateOnSignals",
]


# Statistics.


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def p90(values: Iterable[float]) -> float:
    data = sorted(values)
    if len(data) < 2:
        return data[0]
    return statistics.quantiles(data, n=10, method="inclusive")[8]


def summary(values: Iterable[float], scale: float = 1000.0, unit: str = "ms") -> str:
    data = [v * scale for v in values]
    return f"median {median(data):8.3f} {unit}   p90 {p90(data):8.3f} {unit}   (n={len(data)})"


def header(title: str) -> None:
    print()
    print(title)
    print("-" * len(title))


# Signals: turn SIGTERM/SIGHUP into SystemExit so that every `finally`
# (daemon stop, child kill) runs.


def terminateOnSignals() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# Processes we start ourselves.


class ChildProcesses:
    """
    Processes started by a benchmark, each in a session of its own, killed
    (by process group id) on L{killAll}.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        else:
            # The leader is gone; make sure nothing of its group is left.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def killAll(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


# The daemon.


class BenchDaemon:
    """
    A dynllm daemon (C{twistd -n dynllm --config CONFIG}, JSON log) in a
    temporary directory, used as a context manager: it is stopped, every
    backend it reported is checked to be gone, and the directory removed.
    """

    def __init__(self, config: dict[str, Any], keep: bool = False, jsonLog: bool = False) -> None:
        self.directory = tempfile.mkdtemp(prefix="dynllm-bench-")
        self.daemon = Daemon(config, directory=self.directory)
        self.keep = keep
        self.jsonLog = jsonLog
        self.backendPids: set[int] = set()

    def __enter__(self) -> BenchDaemon:
        try:
            options = ("--logger=benchmarks._jsonlog.observer",) if self.jsonLog else ()
            self.daemon.start(twistdOptions=options)
        except BaseException:
            self._cleanup()
            raise
        return self

    @property
    def port(self) -> int:
        return self.daemon.port

    def models(self) -> dict[str, dict[str, Any]]:
        models = self.daemon.models()
        for m in models.values():
            if m.get("pid"):
                self.backendPids.add(m["pid"])
        return models

    def backendHeaders(self, name: str) -> dict[str, str]:
        """
        @return: the headers a direct request to model C{name}'s backend
            needs: the key dynllm gave it (read from its environment, as
            only dynllm's own user can), as dynllm itself sends it.
        """
        environment = environmentOf(self.models()[name]["pid"])
        for variable in ("LLAMA_API_KEY", "API_KEY"):
            if environment.get(variable):
                return {"Authorization": "Bearer " + environment[variable]}
        return {}

    def log(self) -> list[dict[str, Any]]:
        return readDaemonLog(self.daemon.logPath)

    def __exit__(self, *exc: object) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        try:
            self.daemon.stop()
        finally:
            for pid in self.backendPids:
                if pidAlive(pid):
                    print(f"warning: backend pid {pid} outlived the daemon; killing it", file=sys.stderr)
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
            if self.keep:
                print(f"(daemon directory kept: {self.directory})")
            else:
                shutil.rmtree(self.directory, ignore_errors=True)


def readDaemonLog(path: str) -> list[dict[str, Any]]:
    """
    @return: the events of a twist JSON log (RFC 7464 JSON text sequences,
        which twist writes when its output is not a terminal).
    """
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.lstrip("\x1e").strip()
            if not line.startswith("{"):
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def llamaConfig(models: list[dict[str, Any]], binary: str | None = None, **top: Any) -> dict[str, Any]:
    config = {
        "total_vram_mb": 1000,
        "enabled_backends": ["llamacpp"],
        "backend": {"llamacpp_binary": binary or llamaServer()},
        "models": models,
    }
    config.update(top)
    return config


# A small HTTP/1.1 client on a raw socket: exact first-byte times, no
# buffering layer in between, same code for the proxy and the direct path.


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.firstByte = 0.0  # perf_counter() when the first byte arrived
        self.done = 0.0  # perf_counter() when the response was complete


def _readResponse(sock: socket.socket, resp: Response, buf: bytearray) -> bytearray:
    """
    Read one response from C{sock} into C{resp}; C{buf} holds bytes already
    received. @return: bytes received past this response.
    """
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not resp.firstByte:
            resp.firstByte = time.perf_counter()
        if not data:
            raise ConnectionError("connection closed before the response headers")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    resp.status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        resp.headers[name.strip().lower()] = value.strip()
    buf = bytearray(rest)
    if "content-length" in resp.headers:
        length = int(resp.headers["content-length"])
        while len(buf) < length:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed in the body")
            buf += data
        resp.body = bytes(buf[:length])
        resp.done = time.perf_counter()
        return buf[length:]
    if resp.headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        pos = 0
        while True:
            while b"\r\n" not in buf[pos:]:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed in a chunk header")
                buf += data
            end = buf.index(b"\r\n", pos)
            size = int(bytes(buf[pos:end]).split(b";")[0], 16)
            start = end + 2
            while len(buf) < start + size + 2:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed in a chunk")
                buf += data
            body += buf[start : start + size]
            pos = start + size + 2
            if size == 0:
                break
        resp.body = bytes(body)
        resp.done = time.perf_counter()
        return buf[pos:]
    # Until close.
    while True:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    resp.body = bytes(buf)
    resp.done = time.perf_counter()
    return bytearray()


def buildRequest(
    method: str,
    path: str,
    port: int,
    body: bytes | None = None,
    keepAlive: bool = True,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Accept: */*",
        "Connection: " + ("keep-alive" if keepAlive else "close"),
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def httpRequest(
    port: int, method: str, path: str, body: Any = None, timeout: float = 60, headers: dict[str, str] | None = None
) -> Response:
    """
    One request on a new connection to 127.0.0.1:C{port}.

    @param headers: More request headers (such as a backend's key).

    @return: a L{Response} with C{firstByte} and C{done} as perf_counter()
        times.
    """
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    resp = Response()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(buildRequest(method, path, port, data, keepAlive=False, headers=headers))
        _readResponse(sock, resp, bytearray())
    return resp


def dechunk(raw: bytes) -> bytes:
    """
    @return: the payload of a complete chunked body.
    """
    out = bytearray()
    pos = 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += raw[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2
