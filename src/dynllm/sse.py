# -*- test-case-name: tests.test_sse -*-
"""
Server-Sent Events that dynllm writes itself (C{/admin/events}, the
follow-logs), to clients that may read slowly.

The frames are those of the HTML standard's C{text/event-stream} (section
9.2, "Server-sent events"): an optional C{event: KIND} line, one C{data:}
line per line of the data, and a blank line; a line starting with C{:} is
a comment, which clients skip and which keeps proxies and idle timers from
closing a quiet stream.

A slow reader never slows the daemon: L{EventStream} is a push producer on
its request, so it learns when the client's socket stops taking bytes; it
then keeps what it could not write in a buffer of its own, and once that
holds more than L{EventStream.limit} bytes it drops the client's connection
(logged) instead of holding ever more. Nothing is ever waited for.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.server import Request
from zope.interface import implementer

from dynllm.logs import logger

__all__ = ["HEADERS", "EventStream", "frame"]

log = logger(__name__)

#: The response headers of an event stream.
HEADERS = (
    (b"Content-Type", b"text/event-stream; charset=utf-8"),
    (b"Cache-Control", b"no-cache"),
    (b"X-Accel-Buffering", b"no"),
)

#: Bytes a slow reader may leave unread before it is disconnected.
LIMIT = 1 << 20

#: Seconds between two keep-alive comments.
KEEP_ALIVE = 15.0


def frame(data: Any, event: str | None = None) -> bytes:
    """
    @param data: A C{str} (sent as is, one C{data:} line per line) or
        anything else (sent as compact JSON, on one line).
    @param event: The event's kind, or C{None} for the default
        (C{message}).
    @return: one event's bytes, blank line included, in UTF-8.
    """
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines = [f"event: {event}"] if event is not None else []
    # The standard splits data at CR, LF and CRLF; so must we.
    lines.extend(f"data: {line}" for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


@implementer(IPushProducer)
@define(eq=False)
class EventStream:
    """
    An event stream on one request.

    Make it, L{start} it, L{send} events, and wait for L{whenDone}: it
    fires once the client has gone, the stream was dropped for reading too
    slowly, or L{close} was called (then the response is finished).

    @ivar request: The request answered with the stream.
    @ivar clock: Times the keep-alive comments.
    @ivar limit: Bytes kept for a client that does not read before it is
        disconnected.
    @ivar keepAlive: Seconds between keep-alive comments.
    @ivar label: What the stream is, for the log.
    """

    request: Request
    clock: IReactorTime
    limit: int = LIMIT
    keepAlive: float = KEEP_ALIVE
    label: str = "event stream"
    _paused: bool = field(default=False, init=False)
    _registered: bool = field(default=False, init=False)
    _pending: list[bytes] = field(factory=list, init=False)
    _pendingBytes: int = field(default=0, init=False)
    _done: bool = field(default=False, init=False)
    _waiting: list[defer.Deferred[None]] = field(factory=list, init=False)
    _timer: LoopingCall | None = field(default=None, init=False)

    def start(self) -> None:
        """
        Send the status (200) and headers, and begin the keep-alive
        comments.
        """
        for name, value in HEADERS:
            self.request.setHeader(name, value)
        self.request.registerProducer(self, True)
        self._registered = True
        self.request.notifyFinish().addBoth(lambda _: self._end())
        # A comment makes the head go out now, so curl -N shows the stream began.
        self._write(b": dynllm\n\n")
        self._timer = LoopingCall(self._write, b": keep-alive\n\n")
        self._timer.clock = self.clock
        self._timer.start(self.keepAlive, now=False)

    @property
    def done(self) -> bool:
        """
        Whether the stream has ended; later events are dropped.
        """
        return self._done

    def whenDone(self) -> defer.Deferred[None]:
        """
        @return: a Deferred that fires once the stream has ended.
        """
        if self._done:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def send(self, data: Any, event: str | None = None) -> None:
        """
        Send one event (see L{frame}); nothing once the stream has ended.
        """
        self._write(frame(data, event))

    def sendLines(self, lines: list[str], event: str | None = None) -> None:
        """
        Send one event per line of C{lines}, in one write.
        """
        if lines:
            self._write(b"".join(frame(line, event) for line in lines))

    def close(self) -> None:
        """
        End the stream: finish the response.
        """
        if self._done:
            return
        self._flushPending()
        self._unregister()
        self.request.finish()
        self._end()

    def _write(self, data: bytes) -> None:
        if self._done:
            return
        if not self._paused:
            self.request.write(data)
            return
        self._pending.append(data)
        self._pendingBytes += len(data)
        if self._pendingBytes > self.limit:
            # What it has not read is dropped with it (TCP's abort); the
            # stream ends after, since its end may finish the request.
            transport = self.request.transport
            if transport is not None:
                getattr(transport, "abortConnection", transport.loseConnection)()
            self._end()
            log.warn(
                "dropped a client of {label} that left more than {limit} bytes unread",
                label=self.label,
                limit=self.limit,
            )

    def _flushPending(self) -> None:
        pending, self._pending, self._pendingBytes = self._pending, [], 0
        if pending:
            self.request.write(b"".join(pending))

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.request.unregisterProducer()

    def _end(self) -> None:
        if self._done:
            return
        # Before whoever waits finishes the request, which wants no
        # producer left.
        self._unregister()
        self._done = True
        self._pending, self._pendingBytes = [], 0
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    # IPushProducer: the client's socket says when it takes bytes.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._done:
            self._flushPending()

    def stopProducing(self) -> None:
        self._end()
