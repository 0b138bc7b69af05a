"""
The real daemon's event stream (C{GET /admin/events}) and followed logs
(C{?follow=1}), read over real sockets as C{curl -N} reads them, by clients
that read and clients that do not.

The backends are the fake one (L{tests.fakebackend}); the console's tests
in a real browser (L{tests.test_console}) use real llama-server models.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from typing import Any, Iterator

import yaml
from twisted.trial.unittest import SynchronousTestCase

from tests.support import FAKE_BACKEND, Daemon, fakeModel

ADMIN = {"Authorization": "Bearer admin"}


class SSEReader:
    """
    A client of one event stream, as C{curl -N} is: HTTP/1.1 over a plain
    socket, the chunked body decoded as each chunk comes (http.client's
    C{readline} waits for the next chunk before it returns a line), split
    into events.
    """

    def __init__(self, daemon: Daemon, path: str, headers: dict[str, str] | None = None) -> None:
        self.socket = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.socket.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.file = self.socket.makefile("rb")
        status = self.file.readline().split()
        self.status = int(status[1])
        self.headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.comments: list[str] = []

    def close(self) -> None:
        self.file.close()
        self.socket.close()

    def lines(self) -> Iterator[str]:
        """
        @return: the body's lines as they come; it ends with the body.
        """
        assert self.headers.get("transfer-encoding") == "chunked", self.headers
        pending = b""
        while True:
            size = int(self.file.readline().strip() or b"0", 16)
            if size == 0:
                return
            pending += self.file.read(size)
            self.file.readline()
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode("utf-8")

    def events(self) -> Iterator[tuple[str, str]]:
        """
        @return: an iterator of C{(kind, data)} as they come; it ends when
            the response ends.
        """
        kind, data = "message", []
        for text in self.lines():
            if not text:
                if data:
                    yield kind, "\n".join(data)
                kind, data = "message", []
            elif text.startswith(":"):
                self.comments.append(text)
            elif text.startswith("event: "):
                kind = text[len("event: ") :]
            elif text.startswith("data: "):
                data.append(text[len("data: ") :])

    def until(self, predicate: Any, limit: int = 1000) -> list[tuple[str, Any]]:
        """
        Read events until C{predicate(kind, data)} is true for one.

        @return: the events read, that one last, JSON data decoded.
        """
        seen = []
        for kind, data in self.events():
            value = json.loads(data) if kind in ("model", "memory") else data
            seen.append((kind, value))
            if predicate(kind, value):
                return seen
            if len(seen) >= limit:
                break
        raise AssertionError(f"not seen; read {seen[-20:]}")


class EventStreamTests(SynchronousTestCase):
    """
    C{GET /admin/events} tells every change of the real daemon's models as
    it happens, the current state first.
    """

    def setUp(self) -> None:
        self.daemon = Daemon(
            {
                "total_vram_mb": 1000,
                "enabled_backends": ["llamacpp"],
                "backend": {"llamacpp_binary": FAKE_BACKEND},
                "server": {"admin_api_keys": ["admin"]},
                "models": [fakeModel("slow", vram=600, fake_load_delay=2.5), fakeModel("other", vram=600)],
            }
        ).start()
        self.addCleanup(self.daemon.stop)

    def reader(self, path: str = "/admin/events") -> SSEReader:
        reader = SSEReader(self.daemon, path, ADMIN)
        self.addCleanup(reader.close)
        return reader

    def test_needsAdminKey(self) -> None:
        """
        Without the admin key the stream is refused with 401.
        """
        status, _, _ = self.daemon.get("/admin/events")
        self.assertEqual(status, 401)

    def test_currentStateThenChanges(self) -> None:
        """
        The stream begins with the memory and every model; a load is then
        told as C{loading} with its progress every second, then C{loaded}
        with its load time, and the memory it holds; an eviction is told as
        C{unloading} then C{unloaded}.
        """
        reader = self.reader()
        self.assertEqual(reader.status, 200)
        self.assertEqual(reader.headers["content-type"], "text/event-stream; charset=utf-8")
        first = reader.until(lambda kind, data: kind == "model" and data["name"] == "other")
        self.assertEqual(first[0], ("memory", {"total_vram_mb": 1000, "used_vram_mb": 0, "loaded_mb": 0, "loading_mb": 0, "unloading_mb": 0}))
        self.assertEqual([(d["name"], d["status"]) for k, d in first[1:]], [("slow", "unloaded"), ("other", "unloaded")])

        self.assertEqual(self.daemon.post("/admin/models/load", {"model": "slow"}, headers=ADMIN, timeout=30)[0], 200)
        seen = reader.until(lambda kind, data: kind == "model" and data["status"] == "loaded")
        loading = [d for k, d in seen if k == "model" and d["status"] == "loading"]
        self.assertGreaterEqual(len(loading), 3, seen)
        self.assertGreater(loading[-1]["loading_seconds"], 1.5)
        self.assertGreater(seen[-1][1]["load_seconds"], 2.0)
        # The memory of a change comes before its models.
        self.assertEqual(seen[-2], ("memory", {"total_vram_mb": 1000, "used_vram_mb": 600, "loaded_mb": 600, "loading_mb": 0, "unloading_mb": 0}))

        self.assertEqual(self.daemon.post("/admin/models/load", {"model": "other"}, headers=ADMIN, timeout=30)[0], 200)
        seen = reader.until(lambda kind, data: kind == "model" and data["name"] == "other" and data["status"] == "loaded")
        slow = [d["status"] for k, d in seen if k == "model" and d["name"] == "slow"]
        self.assertEqual(slow, ["unloading", "unloaded"])

    def test_manyReaders(self) -> None:
        """
        Twenty readers at once are each told the same change.
        """
        readers = [self.reader() for _ in range(20)]
        for reader in readers:
            reader.until(lambda kind, data: kind == "model" and data["name"] == "other")
        self.daemon.post("/admin/models/load", {"model": "other"}, headers=ADMIN)
        for reader in readers:
            reader.until(lambda kind, data: kind == "model" and data["name"] == "other" and data["status"] == "loaded")

    def test_endsWhenDaemonStops(self) -> None:
        """
        When the daemon stops, its streams end (the response is finished)
        and it does not wait for their readers.
        """
        reader = self.reader()
        reader.until(lambda kind, data: kind == "model" and data["name"] == "other")
        started = time.monotonic()
        self.assertEqual(self.daemon.stop(), -signal.SIGTERM)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(list(reader.events()), [])


class FollowLogTests(SynchronousTestCase):
    """
    C{?follow=1} streams a model's output, and the daemon's own log, as
    lines are printed: the last C{lines} first.
    """

    def setUp(self) -> None:
        self.daemon = Daemon(
            {
                "total_vram_mb": 1000,
                "enabled_backends": ["llamacpp"],
                "backend": {"llamacpp_binary": FAKE_BACKEND},
                "models": [fakeModel("m", fake_chatty=3), fakeModel("loud", fake_chatty=4000)],
            }
        ).start()
        self.addCleanup(self.daemon.stop)

    def chat(self, model: str) -> None:
        status, _, body = self.daemon.post(
            "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )
        self.assertEqual(status, 200, body)

    def test_historyThenNew(self) -> None:
        """
        The last C{lines} lines come first, then each new line as its own
        C{event: log}.
        """
        self.chat("m")
        self.chat("m")
        reader = SSEReader(self.daemon, "/admin/models/m/logs?follow=1&lines=2")
        self.addCleanup(reader.close)
        self.assertEqual(reader.headers["content-type"], "text/event-stream; charset=utf-8")
        events = reader.events()
        history = [next(events), next(events)]
        self.assertEqual([kind for kind, _ in history], ["log", "log"])
        self.assertEqual(history[1][1], "fake: request line 2 " + "x" * 200)
        self.chat("m")
        self.assertEqual([next(events) for _ in range(3)], [("log", f"fake: request line {i} " + "x" * 200) for i in range(3)])

    def test_plainWithoutFollow(self) -> None:
        """
        Without C{follow} the route answers the last lines as text, as it
        did before; a bad C{follow} gets 400 naming it.
        """
        self.chat("m")
        status, headers, body = self.daemon.get("/admin/models/m/logs?lines=1")
        self.assertEqual((status, headers["Content-Type"]), (200, "text/plain; charset=utf-8"))
        self.assertEqual(body, b"fake: request line 2 " + b"x" * 200 + b"\n")
        status, _, body = self.daemon.get("/admin/models/m/logs?follow=maybe")
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["error"]["param"], "follow")

    def test_daemonLog(self) -> None:
        """
        C{/admin/logs?follow=1} streams the daemon's own messages, as its
        text log writes them.
        """
        status, _, body = self.daemon.get("/admin/logs?lines=50")
        self.assertEqual(status, 200)
        self.assertEqual(body.count(b"DynLLMSite starting on"), 1)
        # Logged before twistd began logging, and replayed then: kept once.
        self.assertEqual(body.count(b"[dynllm.guard#info] server.api_keys is empty"), 1)
        reader = SSEReader(self.daemon, "/admin/logs?follow=1&lines=0")
        self.addCleanup(reader.close)
        self.chat("m")
        seen = reader.until(lambda kind, data: "m is ready on port" in data)
        self.assertTrue(all(kind == "log" for kind, _ in seen))

    def test_slowReaderDropped(self) -> None:
        """
        A follower that does not read is dropped once it leaves 1 MiB
        unread, and the daemon goes on serving at its usual pace meanwhile.
        """
        slow = socket.create_connection(("127.0.0.1", self.daemon.port))
        self.addCleanup(slow.close)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"GET /admin/models/loud/logs?follow=1&lines=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        slowest = 0.0
        for _ in range(30):
            started = time.monotonic()
            self.chat("loud")
            slowest = max(slowest, time.monotonic() - started)
            if "dropped a client of /admin/models/loud/logs" in self.daemon.log():
                break
        self.assertIn("dropped a client of /admin/models/loud/logs that left more than 1048576 bytes unread", self.daemon.log())
        self.assertLess(slowest, 5)
        slow.settimeout(10)
        received = 0
        try:
            while chunk := slow.recv(65536):
                received += len(chunk)
        except ConnectionResetError:
            pass
        self.assertEqual(self.daemon.get("/health")[0], 200)

    def reload(self, models: list[dict[str, Any]]) -> None:
        """
        Give the daemon C{models} instead of its models, by a reload.
        """
        config = dict(self.daemon.config, models=models)
        with open(self.daemon.configPath, "w") as f:
            yaml.safe_dump(config, f)
        status, _, body = self.daemon.post("/admin/reload")
        self.assertEqual(status, 200, body)

    def test_removedModelEnds(self) -> None:
        """
        The followed log of a model that a reload removes ends (its
        response is finished): it would never get another line, since a
        model added later under the same name has a log of its own.
        """
        self.chat("m")
        reader = SSEReader(self.daemon, "/admin/models/m/logs?follow=1&lines=1")
        self.addCleanup(reader.close)
        events = reader.events()
        self.assertEqual(next(events)[0], "log")
        self.reload([fakeModel("loud", fake_chatty=4000)])
        reader.socket.settimeout(10)
        self.assertEqual(list(events), [])

    def test_head(self) -> None:
        """
        C{HEAD} of an event stream or of a followed log answers its head
        alone and ends: the connection serves its next request.
        """
        connection = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10)
        self.addCleanup(connection.close)
        for path in ("/admin/events", "/admin/logs?follow=1", "/admin/models/m/logs?follow=1"):
            connection.sendall(f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        while b'{"status": "ok"}' not in received:
            chunk = connection.recv(65536)
            self.assertTrue(chunk, received)
            received += chunk
        self.assertEqual(received.count(b"HTTP/1.1 200 OK"), 4, received)
        self.assertEqual(received.count(b"Content-Type: text/event-stream; charset=utf-8"), 3, received)
        self.assertNotIn(b"keep-alive", received)

    def test_stalledReadersBounded(self) -> None:
        """
        Two hundred followers that never read a chatty log are all dropped,
        and what the daemon holds for them together stays bounded: its
        memory (RSS) grows by less than 100 MB, where a mebibyte each (each
        under its own limit) would be 200 MB.
        """
        def rss() -> int:
            assert self.daemon.process is not None
            with open(f"/proc/{self.daemon.process.pid}/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

        self.chat("loud")
        before = rss()
        readers = []
        for _ in range(200):
            slow = socket.create_connection(("127.0.0.1", self.daemon.port))
            self.addCleanup(slow.close)
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.sendall(b"GET /admin/models/loud/logs?follow=1&lines=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            readers.append(slow)
        self.assertEqual(self.daemon.get("/health")[0], 200)
        peak = before
        for _ in range(60):
            self.chat("loud")
            peak = max(peak, rss())
            if self.daemon.log().count("dropped a client of /admin/models/loud/logs") >= 200:
                break
        self.assertEqual(self.daemon.log().count("dropped a client of /admin/models/loud/logs"), 200)
        self.assertLess(peak - before, 100 << 20)
