# -*- test-case-name: tests.test_events -*-
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

What all the streams of a daemon keep together is bounded too
(L{Backlog}): hundreds of readers that stopped reading a chatty log would
otherwise hold a mebibyte each. Past the shared limit, the stream that
keeps the most is dropped.

A backend may print tens of megabytes a second: the lines of a followed
log are framed in one pass (L{frames}), once for all the streams that
follow them (L{SharedFrames}).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.server import Request
from zope.interface import implementer

from dynllm.logs import logger

__all__ = ["HEADERS", "Backlog", "EventStream", "SharedFrames", "frame", "frames"]

log = logger(__name__)

#: The response headers of an event stream.
HEADERS = (
    (b"Content-Type", b"text/event-stream; charset=utf-8"),
    (b"Cache-Control", b"no-cache"),
    (b"X-Accel-Buffering", b"no"),
)

#: Bytes a slow reader may leave unread before it is disconnected.
LIMIT = 1 << 20

#: Bytes all the streams of a daemon may keep for slow readers together.
SHARED_LIMIT = 32 << 20

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
    # A lone surrogate (a file name decoded with surrogateescape) cannot be
    # UTF-8: it is sent as "?" rather than failing the stream.
    return ("\n".join(lines) + "\n\n").encode("utf-8", "replace")


def frames(lines: Sequence[str], event: str | None = None) -> bytes:
    """
    @param lines: Texts, each sent as one event (see L{frame}).
    @param event: Their kind, or C{None} for the default.
    @return: the events' bytes, the same as those of L{frame} for each
        line, joined; made in one pass when no line holds a CR or LF (a
        backend's lines never do), which is what a log printing tens of
        megabytes a second needs.
    """
    if not lines:
        return b""
    joined = "".join(lines)
    if "\n" in joined or "\r" in joined:
        return b"".join(frame(line, event) for line in lines)
    head = "data: " if event is None else f"event: {event}\ndata: "
    return (head + ("\n\n" + head).join(lines) + "\n\n").encode("utf-8", "replace")


@define(eq=False)
class SharedFrames:
    """
    L{frames}, made once for every stream that sends the same batch of
    lines: a log's followers are all given the very same list.

    Only the last batch is remembered (and held, so that its identity
    cannot be taken by another list).
    """

    _lines: Sequence[str] | None = field(default=None, init=False)
    _event: str | None = field(default=None, init=False)
    _bytes: bytes = field(default=b"", init=False)

    def __call__(self, lines: Sequence[str], event: str | None = None) -> bytes:
        """
        @return: L{frames}C{(lines, event)}.
        """
        if lines is not self._lines or event != self._event:
            self._lines, self._event, self._bytes = lines, event, frames(lines, event)
        return self._bytes


@define(eq=False)
class Backlog:
    """
    What the event streams of one daemon keep for clients that read
    slowly, together.

    @ivar limit: Bytes they may keep together; past it, the stream that
        keeps the most is dropped (see L{EventStream}).
    """

    limit: int = SHARED_LIMIT
    _held: dict[EventStream, int] = field(factory=dict, init=False)
    _total: int = field(default=0, init=False)

    @property
    def total(self) -> int:
        """
        The bytes kept now, by all the streams.
        """
        return self._total

    def hold(self, stream: EventStream, size: int) -> EventStream | None:
        """
        Count C{size} more bytes kept by C{stream}.

        @return: the stream to drop (the one that keeps the most) when
            they keep more than L{limit} together, else C{None}.
        """
        self._held[stream] = self._held.get(stream, 0) + size
        self._total += size
        if self._total <= self.limit:
            return None
        return max(self._held, key=self._held.__getitem__)

    def release(self, stream: EventStream) -> None:
        """
        C{stream} keeps nothing any more (it wrote what it kept, or ended).
        """
        self._total -= self._held.pop(stream, 0)


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
    @ivar backlog: What this stream and others keep together, or C{None}
        to bound this stream's only.
    """

    request: Request
    clock: IReactorTime
    limit: int = LIMIT
    keepAlive: float = KEEP_ALIVE
    label: str = "event stream"
    backlog: Backlog | None = None
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
        comments. A C{HEAD} request gets the head alone: its stream ends
        at once (RFC 9110 section 9.3.2: the answer to C{HEAD} has no
        body, so a stream would hold the connection for nothing).
        """
        for name, value in HEADERS:
            self.request.setHeader(name, value)
        if self.request.method == b"HEAD":
            self.close()
            return
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

    def sendLines(self, lines: Sequence[str], event: str | None = None) -> None:
        """
        Send one event per line of C{lines}, in one write.
        """
        if lines:
            self._write(frames(lines, event))

    def sendFramed(self, data: bytes) -> None:
        """
        Send events already framed (L{frames}, L{SharedFrames}).
        """
        if data:
            self._write(data)

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
            self._drop(f"left more than {self.limit} bytes unread")
            return
        if self.backlog is not None:
            heaviest = self.backlog.hold(self, len(data))
            if heaviest is not None:
                heaviest._drop(
                    f"left {heaviest._pendingBytes} bytes unread while the event streams kept more than"
                    f" {self.backlog.limit} bytes together"
                )

    def _drop(self, why: str) -> None:
        """
        Disconnect the client, dropping what it has not read, and end.
        """
        # What it has not read is dropped with it (TCP's abort); the
        # stream ends after, since its end may finish the request.
        transport = self.request.transport
        if transport is not None:
            getattr(transport, "abortConnection", transport.loseConnection)()
        self._end()
        log.warn("dropped a client of {label} that {why}", label=self.label, why=why)

    def _flushPending(self) -> None:
        pending, self._pending, self._pendingBytes = self._pending, [], 0
        if self.backlog is not None:
            self.backlog.release(self)
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
        if self.backlog is not None:
            self.backlog.release(self)
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
