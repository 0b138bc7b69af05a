"""
Tests for L{dynllm.events} and L{dynllm.sse}: the events of the models
and of memory, and how they are written to clients, in memory.

The real daemon's event stream and followed logs, over sockets, are in
L{tests.test_eventstream}.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dynllm.events import MEMORY, MODEL, REMOVED, ModelEvents, memoryOf
from dynllm.sse import Backlog, EventStream, SharedFrames, frame, frames
from dynllm.testing import StubManager
from tests.test_scheduler import ManagerTestsMixin
from tests.test_testing import makeConfig


def stubConfig(case: SynchronousTestCase, *names: str) -> Any:
    """
    @return: a configuration of models C{names} of 300 MB each.
    """
    return makeConfig(case, *({"name": n, "vram_mb": 300} for n in names))


class FrameTests(SynchronousTestCase):
    """
    L{frame} writes the HTML standard's event-stream frames.
    """

    def test_kindAndJSON(self) -> None:
        """
        An event with a kind and a mapping is an C{event:} line, one
        C{data:} line of compact JSON and a blank line.
        """
        self.assertEqual(frame({"a": 1, "b": [2]}, "model"), b'event: model\ndata: {"a":1,"b":[2]}\n\n')

    def test_linesOfText(self) -> None:
        """
        Text is sent as it is, one C{data:} line per line, whatever ends
        the lines (CR, LF or CRLF), so no line of the text can end the
        event or forge another.
        """
        self.assertEqual(
            frame("one\r\ntwo\rthree\nevent: forged", "log"),
            b"event: log\ndata: one\ndata: two\ndata: three\ndata: event: forged\n\n",
        )

    def test_defaultKind(self) -> None:
        """
        Without a kind there is no C{event:} line; text is UTF-8.
        """
        self.assertEqual(frame("caf\u00e9"), "data: caf\u00e9\n\n".encode())

    def test_loneSurrogate(self) -> None:
        """
        Text that cannot be UTF-8 (a lone surrogate, as a file name decoded
        with C{surrogateescape} has) is sent with C{?} in its place: the
        stream goes on.
        """
        self.assertEqual(frame("a\udcffb", "log"), b"event: log\ndata: a?b\n\n")
        self.assertEqual(frames(["a\udcffb"], "log"), b"event: log\ndata: a?b\n\n")


class FramesTests(SynchronousTestCase):
    """
    L{frames} and L{SharedFrames} frame a log's lines, as many as a backend
    printing tens of megabytes a second gives.
    """

    def test_sameAsFrame(self) -> None:
        """
        The frames of lines are those of L{frame} for each line, joined,
        lines holding CR or LF included.
        """
        for lines in (["one", "", "caf\u00e9"], ["a\rdata: forged", "b"], ["x\r\ny\nz"], ["only"]):
            for event in ("log", None):
                self.assertEqual(frames(lines, event), b"".join(frame(line, event) for line in lines), lines)
        self.assertEqual(frames([], "log"), b"")

    def test_fast(self) -> None:
        """
        A hundred thousand lines of 100 characters (10 MB of output, what a
        backend printing 50 MB/s prints in a fifth of a second) are framed
        in well under a tenth of a second, not one by one (which took half
        a second and made a followed chatty backend take a whole core).
        """
        lines = ["flood " + "z" * 94] * 100_000
        started = time.perf_counter()
        framed = frames(lines, "log")
        elapsed = time.perf_counter() - started
        self.assertEqual(len(framed), 100_000 * len("event: log\ndata: " + lines[0] + "\n\n"))
        self.assertLess(elapsed, 0.1)

    def test_sharedOnce(self) -> None:
        """
        L{SharedFrames} frames a batch of lines once for all its followers
        (a log gives them all the same list): the same bytes come back;
        another batch, or another kind, is framed anew.
        """
        shared = SharedFrames()
        batch = ["one", "two"]
        first = shared(batch, "log")
        self.assertEqual(first, frames(batch, "log"))
        self.assertIs(shared(batch, "log"), first)
        self.assertEqual(shared(["three"], "log"), frames(["three"], "log"))
        self.assertEqual(shared(["three"], None), frames(["three"]))


class MemoryOfTests(SynchronousTestCase):
    """
    L{memoryOf} sums what the models hold by state.
    """

    def test_sums(self) -> None:
        """
        Loaded, loading and unloading models hold their C{vram_mb}; the
        others hold nothing.
        """
        models = [
            {"status": status, "vram_mb": vram}
            for status, vram in [("loaded", 100), ("loaded", 50), ("loading", 20), ("unloading", 7), ("failed", 900), ("unloaded", 5)]
        ]
        self.assertEqual(
            memoryOf(1000, models),
            {"total_vram_mb": 1000, "used_vram_mb": 177, "loaded_mb": 150, "loading_mb": 20, "unloading_mb": 7},
        )


class StubEventTests(SynchronousTestCase):
    """
    L{ModelEvents} on a L{StubManager}: what a listener is told, and when.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.manager = StubManager(stubConfig(self, "a", "b"), clock=self.clock)
        self.events = ModelEvents(self.manager, self.clock)
        self.received: list[tuple[str, dict[str, Any]]] = []

    def listen(self) -> Any:
        return self.events.listen(lambda kind, data: self.received.append((kind, data)))

    def test_currentStateFirst(self) -> None:
        """
        A listener is told the memory first, then every model, at once.
        """
        self.manager.states["b"] = "loaded"
        self.listen()
        self.assertEqual([kind for kind, _ in self.received], [MEMORY, MODEL, MODEL])
        self.assertEqual(self.received[0][1]["loaded_mb"], 300)
        self.assertEqual([(d["name"], d["status"]) for _, d in self.received[1:]], [("a", "unloaded"), ("b", "loaded")])

    def test_changeAfterATurn(self) -> None:
        """
        A change is told once the reactor turns: the model's new state, and
        the memory when what is held changed.
        """
        self.listen()
        del self.received[:]
        self.manager.load("a")
        self.assertEqual(self.received, [])
        self.clock.advance(0)
        self.assertEqual([kind for kind, _ in self.received], [MEMORY, MODEL])
        self.assertEqual(self.received[0][1]["used_vram_mb"], 300)
        self.assertEqual((self.received[1][1]["name"], self.received[1][1]["status"]), ("a", "loaded"))

    def test_burstIsOneEvent(self) -> None:
        """
        Many changes in one turn make one event per changed model, with its
        newest state; unchanged models and memory are not told again.
        """
        self.manager.states["a"] = "loaded"
        self.listen()
        del self.received[:]
        leases = [self.successResultOf(self.manager.acquire("a")) for _ in range(5)]
        leases[0].release()
        self.clock.advance(0)
        self.assertEqual([(k, d["name"], d["active_requests"]) for k, d in self.received], [(MODEL, "a", 4)])

    def test_nothingChanged(self) -> None:
        """
        A call of the watch with nothing changed tells nothing.
        """
        self.listen()
        del self.received[:]
        self.manager.changed()
        self.clock.advance(0)
        self.assertEqual(self.received, [])

    def test_everyListener(self) -> None:
        """
        Every listener is told each change; one that stops is told no more.
        """
        stopFirst = self.listen()
        others: list[tuple[str, dict[str, Any]]] = []
        self.events.listen(lambda kind, data: others.append((kind, data)))
        stopFirst()
        del self.received[:], others[:]
        self.manager.states["b"] = "failed"
        self.manager.changed()
        self.clock.advance(0)
        self.assertEqual(self.received, [])
        self.assertEqual([(k, d["status"]) for k, d in others], [(MODEL, "failed")])

    def test_watchesOnlyWhileListened(self) -> None:
        """
        The manager is watched only while someone listens: with nobody left,
        its changes cost nothing and no call is pending.
        """
        stop = self.listen()
        self.assertEqual(len(self.manager._watchers), 1)
        self.manager.changed()
        stop()
        self.assertEqual(self.manager._watchers, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failedLastListener(self) -> None:
        """
        When the only listener fails, it is told no more (logged) and the
        manager is no longer watched, as when it stops: a new listener then
        makes one watch, not a second.
        """

        def failing(kind: str, data: dict[str, Any]) -> None:
            if kind == MODEL and data["status"] == "loaded":
                raise RuntimeError("listener broke")

        self.events.listen(failing)
        self.manager.load("a")
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.manager._watchers), 0)
        self.listen()
        self.assertEqual(len(self.manager._watchers), 1)

    def test_removed(self) -> None:
        """
        A model a reload removed is told once as C{removed}.
        """
        self.listen()
        del self.received[:]
        self.manager.reconfigure(stubConfig(self, "a"))
        self.clock.advance(0)
        self.assertEqual(self.received, [(MODEL, {"name": "b", "status": REMOVED})])


class ManagerEventTests(ManagerTestsMixin, SynchronousTestCase):
    """
    L{ModelEvents} on the real L{dynllm.scheduler.ModelManager}: every
    transition and request is told, and a load's progress every second.
    """

    def setUp(self) -> None:
        self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}])
        self.events = ModelEvents(self.manager, self.reactor)
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.events.listen(lambda kind, data: self.received.append((kind, data)))
        del self.received[:]

    def statuses(self, name: str) -> list[str]:
        return [d["status"] for k, d in self.received if k == MODEL and d["name"] == name]

    def test_loadProgress(self) -> None:
        """
        A load is told as C{loading} at once, then every second with its
        C{loading_seconds}, then C{loaded} with its C{load_seconds}; the
        progress stops once it is loaded.
        """
        d = self.manager.acquire("a")
        self.reactor.advance(0)
        self.assertEqual(self.statuses("a"), ["loading"])
        self.reactor.advance(1)
        self.reactor.advance(1)
        progress = [d["loading_seconds"] for k, d in self.received if k == MODEL and d["status"] == "loading"]
        self.assertEqual(progress[0], 0)
        self.assertGreaterEqual(len(progress), 3)
        self.assertEqual(progress, sorted(progress))
        self.assertGreater(progress[-1], 1.5)
        self.makeReady("a")
        self.reactor.advance(0)
        loaded = [d for k, d in self.received if k == MODEL and d["status"] == "loaded"]
        self.assertEqual(loaded[0]["active_requests"], 1)
        self.assertIsNotNone(loaded[0]["load_seconds"])
        self.assertIsNone(loaded[0]["loading_seconds"])
        self.successResultOf(d).release()
        self.reactor.advance(0)
        del self.received[:]
        self.reactor.advance(5)
        self.assertEqual(self.received, [])

    def test_memoryWhenEvicted(self) -> None:
        """
        A model evicted for another is told C{unloading} then C{unloaded},
        and memory as it is freed and taken again.
        """
        self.loadIdle("a")
        self.reactor.advance(0)
        del self.received[:]
        self.manager.acquire("b")
        self.reactor.advance(0)
        self.assertEqual(self.statuses("a"), ["unloading"])
        [waiting] = [d for k, d in self.received if k == MODEL and d["name"] == "b"]
        self.assertEqual((waiting["status"], waiting["waiting_requests"]), ("unloaded", 1))
        self.process("a").exit()
        self.reactor.advance(0)
        self.assertEqual(self.statuses("a"), ["unloading", "unloaded"])
        self.assertEqual(self.statuses("b"), ["unloaded", "loading"])
        memory = [d for k, d in self.received if k == MEMORY]
        self.assertEqual(memory[-1], {"total_vram_mb": 1000, "used_vram_mb": 600, "loaded_mb": 0, "loading_mb": 600, "unloading_mb": 0})

    def test_failure(self) -> None:
        """
        A load that fails is told as C{failed} with its C{last_error}.
        """
        self.failureResultOf(self._failLoad())
        self.reactor.advance(0)
        [failed] = [d for k, d in self.received if k == MODEL and d["status"] == "failed"]
        self.assertIn("exited with code 1", failed["last_error"])

    def _failLoad(self) -> Any:
        d = self.manager.acquire("a")
        self.reactor.advance(0)
        self.process("a").exit(_exit(1))
        return d


def _exit(code: int) -> Exception:
    from twisted.internet.error import ProcessTerminated

    return ProcessTerminated(exitCode=code)


class Channel:
    """
    Enough of an C{HTTPChannel} for L{EventStream} to drop its client.
    """

    def __init__(self) -> None:
        from twisted.internet.testing import StringTransport

        self.transport = StringTransport()


class StreamRequest(DummyRequest):
    """
    A L{DummyRequest} with a producer and a channel, as L{EventStream}
    uses them.
    """

    def __init__(self) -> None:
        super().__init__([b""])
        self.channel = Channel()
        self.transport = self.channel.transport
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class EventStreamTests(SynchronousTestCase):
    """
    L{EventStream} writes events, keeps the connection alive, and drops a
    client that does not read.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.request = StreamRequest()
        self.stream = EventStream(self.request, self.clock, limit=100, keepAlive=15)  # type: ignore[arg-type]
        self.stream.start()

    def written(self) -> bytes:
        return b"".join(self.request.written)

    def test_head(self) -> None:
        """
        The stream is C{text/event-stream}, not cached nor buffered by
        proxies, and a comment goes out at once.
        """
        headers = self.request.responseHeaders
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertEqual(self.written(), b": dynllm\n\n")

    def test_keepAlive(self) -> None:
        """
        A comment is written every C{keepAlive} seconds.
        """
        self.clock.advance(15)
        self.clock.advance(15)
        self.assertEqual(self.written(), b": dynllm\n\n" + b": keep-alive\n\n" * 2)

    def test_pausedKeepsThenFlushes(self) -> None:
        """
        While the client's socket is full, events are kept, then written in
        order once it takes bytes again.
        """
        self.request.producer.pauseProducing()
        self.stream.send("one")
        self.stream.sendLines(["two", "three"], "log")
        self.assertEqual(self.written(), b": dynllm\n\n")
        self.request.producer.resumeProducing()
        self.assertEqual(
            self.written(), b": dynllm\n\ndata: one\n\nevent: log\ndata: two\n\nevent: log\ndata: three\n\n"
        )

    def test_slowReaderDropped(self) -> None:
        """
        A client that leaves more than C{limit} bytes unread is
        disconnected, and the stream ends: nothing more is kept for it.
        """
        done = self.stream.whenDone()
        producer = self.request.producer
        producer.pauseProducing()
        self.stream.send("x" * 60)
        self.assertNoResult(done)
        self.stream.send("y" * 60)
        self.successResultOf(done)
        self.assertTrue(self.request.channel.transport.disconnecting)
        self.assertTrue(self.stream.done)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertIsNone(self.request.producer)
        self.stream.send("z")
        producer.resumeProducing()
        self.assertEqual(self.written(), b": dynllm\n\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_clientGone(self) -> None:
        """
        The stream ends when its client goes; the keep-alive stops.
        """
        done = self.stream.whenDone()
        self.request.processingFailed(Exception("gone"))
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_headRequest(self) -> None:
        """
        A C{HEAD} request gets the stream's head alone and is finished at
        once: no body, no keep-alive, nothing that holds its connection.
        """
        request = StreamRequest()
        request.method = b"HEAD"
        clock = Clock()
        stream = EventStream(request, clock, keepAlive=15)  # type: ignore[arg-type]
        stream.start()
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.assertEqual(request.finished, 1)
        self.assertTrue(stream.done)
        self.successResultOf(stream.whenDone())
        self.assertIsNone(request.producer)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close(self) -> None:
        """
        L{EventStream.close} writes what was kept and finishes the response.
        """
        self.request.producer.pauseProducing()
        self.stream.send("last")
        self.stream.close()
        self.assertEqual(self.written(), b": dynllm\n\ndata: last\n\n")
        self.assertEqual(self.request.finished, 1)
        self.successResultOf(self.stream.whenDone())


class BacklogTests(SynchronousTestCase):
    """
    The streams of one L{Backlog} keep at most its limit together for
    their slow readers: past it, the one that keeps the most is dropped.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backlog = Backlog(limit=150)
        self.requests = [StreamRequest() for _ in range(3)]
        self.streams = [
            EventStream(r, self.clock, limit=100, backlog=self.backlog)  # type: ignore[arg-type]
            for r in self.requests
        ]
        for stream, request in zip(self.streams, self.requests):
            stream.start()
            request.producer.pauseProducing()

    def test_heaviestDropped(self) -> None:
        """
        Each stream under its own limit, but all over the shared one: the
        stream that keeps the most is dropped (and logged), the others go
        on, and what is kept together is back under the limit.
        """
        first, second, third = self.streams
        first.send("x" * 60)
        second.send("y" * 40)
        self.assertEqual(self.backlog.total, len(frame("x" * 60)) + len(frame("y" * 40)))
        third.send("z" * 30)
        self.assertTrue(first.done)
        self.assertTrue(self.requests[0].channel.transport.disconnecting)
        self.assertFalse(second.done or third.done)
        self.assertEqual(self.backlog.total, len(frame("y" * 40)) + len(frame("z" * 30)))
        self.assertLessEqual(self.backlog.total, self.backlog.limit)

    def test_released(self) -> None:
        """
        What a stream wrote once its reader read again, or what it kept
        when it ended, no longer counts.
        """
        first, second, _ = self.streams
        first.send("x" * 60)
        second.send("y" * 40)
        self.requests[0].producer.resumeProducing()
        self.assertEqual(self.backlog.total, len(frame("y" * 40)))
        self.requests[1].processingFailed(Exception("gone"))
        self.assertEqual(self.backlog.total, 0)
        self.assertIn(b"data: " + b"x" * 60, b"".join(self.requests[0].written))
