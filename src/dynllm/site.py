# -*- test-case-name: tests.test_site -*-
"""
The twisted.web C{Site} that serves the API, and what it does to every
request before and after the routes see it:

  - bodies are never parsed into memory, and bodies above the configured
    size are refused with 413 before they are read whole;
  - bodies with C{Content-Encoding: gzip} or C{deflate} are decoded as they
    arrive (L{dynllm.codings}), so that the routes see the decoded body and
    no C{Content-Encoding}; the size limit applies to the body as sent and
    as decoded, and other codings get 415;
  - CORS (the Fetch standard, U{https://fetch.spec.whatwg.org/#http-cors-protocol}):
    preflights are answered here, for every path and without a key, and
    every answer to an allowed origin, errors included, carries
    C{Access-Control-Allow-Origin}.

Refusals found while the body arrives (413, 415, 400 for a corrupt coded
body) are written straight to the connection, which then stops writing,
reads and discards the rest of the body for a while (L{lingerClose}) and
closes: the routes never see the request.
"""

from __future__ import annotations

import io
from resource import RLIM_INFINITY, RLIMIT_NOFILE, getrlimit
import tempfile
from typing import IO, Any, Iterable, cast
from urllib.parse import unquote_to_bytes

from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.protocols import basic
from twisted.web import http, server
from twisted.web.http_headers import Headers

from dynllm import codings, errors
from dynllm.cors import CORSPolicy, isPreflight, preflightHeaders
from dynllm.guard import Guard

#: Bytes of decoded body kept in memory before it goes to a temporary file
#: (the threshold twisted.web uses for bodies as sent, C{http._getContentFile}).
SPOOL_THRESHOLD = 100000

#: Seconds a refused request's connection keeps reading (and discarding)
#: what the client still sends before it is closed.
LINGER_SECONDS = 2.0


def lingerClose(transport: Any, clock: Any) -> None:
    """
    Close a connection whose answer is written while the client may still
    be sending its body: stop writing (the answer is followed by a FIN),
    go on reading and discarding for L{LINGER_SECONDS} at most (the request
    closes it sooner once the whole body has arrived), then close. Closing
    at once, with unread bytes, makes the kernel send a TCP reset, which
    may lose the answer before the client reads it (RFC 9112 section 9.6,
    "tear-down").

    @param transport: The connection; closed at once if it cannot
        half-close.
    @param clock: Schedules the final close.
    """
    loseWriteConnection = getattr(transport, "loseWriteConnection", None)
    if loseWriteConnection is None:
        transport.loseConnection()
        return
    loseWriteConnection()
    clock.callLater(LINGER_SECONDS, transport.loseConnection)


def writeError(
    transport: Any, error: errors.APIError, requestHeaders: Headers | None, cors: CORSPolicy
) -> None:
    """
    Write C{error} as a whole HTTP/1.1 response with C{Connection: close}
    straight on C{transport}, for answers that twisted.web cannot give
    because no request is being processed: a body refused while it
    arrives, a request that is late or malformed, a connection over the
    limit.

    @param requestHeaders: The headers of the request answered, if they
        have arrived: they choose the error's shape (L{errors.inShapeOf})
        and its CORS headers.
    @param cors: The CORS policy applied to the answer.
    """
    headers = Headers()
    if requestHeaders is not None:
        error = errors.inShapeOf(error, requestHeaders)
    body = error.body()
    for name, value in error.headers().items():
        headers.setRawHeaders(name, [value])
    headers.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
    headers.setRawHeaders(b"Connection", [b"close"])
    if requestHeaders is not None:
        cors.apply(requestHeaders, headers)
    phrase = errors.reasonPhrase(error.status)
    lines = [b"HTTP/1.1 %d %s" % (error.status, phrase)]
    lines += [name + b": " + value for name, values in headers.getAllRawHeaders() for value in values]
    transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)


def _decodable(request: server.Request) -> bool:
    """
    @return: whether C{request}'s path, percent-decoded, and its host name
        are UTF-8, which the routes (Klein) need.
    """
    try:
        unquote_to_bytes(request.path).decode("utf-8")
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class LimitedRequest(server.Request):
    """
    A request that refuses bodies larger than its site's C{maxBodyBytes},
    whether the size is declared by C{Content-Length}, found while a chunked
    upload arrives, or found while a compressed body is decoded; decodes
    C{gzip} and C{deflate} bodies as they arrive; and does CORS.

    It is made by a L{DynLLMSite}, whose C{maxBodyBytes} and C{cors} it
    reads.
    """

    _received = 0
    _refused = False
    _decoder: codings.BodyDecoder | None = None
    _corsApplied = False

    @property
    def _dynllmSite(self) -> DynLLMSite:
        return cast(DynLLMSite, cast(Any, self.channel).site)

    # The body.

    def gotLength(self, length: int | None) -> None:
        """
        All headers have arrived: refuse a coding that cannot be decoded
        (415) or a declared size above the limit (413), and choose where
        the body goes.

        @param length: The declared C{Content-Length}, or C{None}.
        """
        site = self._dynllmSite
        try:
            found = codings.parseCodings(self.requestHeaders.getRawHeaders(b"content-encoding", []))
        except codings.UnsupportedCoding as e:
            self._refuse(
                errors.APIError(415, str(e), "invalid_request_error", "unsupported_content_encoding", "Content-Encoding")
            )
            return
        if length is not None and length > site.maxBodyBytes:
            self._refuse(self._tooLarge())
            return
        if not found:
            # Nothing to undo (no header, or only identity).
            self.requestHeaders.removeHeader(b"content-encoding")
            super().gotLength(length)
            return
        # The body as sent is decoded as it arrives and never kept.
        self._decoder = codings.BodyDecoder(found, site.maxBodyBytes)
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        """
        Keep the next piece of the body, decoded if it is coded; refuse the
        request once the body as sent or as decoded passes the limit (413),
        or when it cannot be decoded (400).
        """
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._dynllmSite.maxBodyBytes:
            self._refuse(self._tooLarge())
            return
        if self._decoder is None:
            super().handleContentChunk(data)
            return
        try:
            for piece in self._decoder.feed(data):
                self._store(piece)
        except codings.BodyTooLarge:
            self._refuse(self._tooLarge(decoded=True))
        except codings.CorruptBody as e:
            self._refuse(errors.badRequest(str(e), "Content-Encoding", "invalid_content_encoding"))

    def _store(self, piece: bytes) -> None:
        """
        Keep a piece of decoded body: in memory while the body is small, in
        a temporary file once it passes L{SPOOL_THRESHOLD}, as twisted.web
        keeps bodies as sent.
        """
        content = self.content
        assert content is not None  # set by gotLength
        if isinstance(content, io.BytesIO) and content.tell() + len(piece) > SPOOL_THRESHOLD:
            spooled: IO[bytes] = tempfile.TemporaryFile()
            spooled.write(content.getbuffer())
            self.content = content = spooled
        content.write(piece)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The body has all arrived: unless the request was refused, check
        that a coded body ended properly (400 if not), make the headers
        describe the decoded body, and let twisted.web dispatch it.
        """
        if self._refused:
            # The refusal is written; the routes must not see what arrived
            # of the body. The client has sent it all, so it is reading the
            # answer: close now.
            assert self.channel.transport is not None
            self.channel.transport.loseConnection()
            return
        if self._decoder is not None:
            try:
                self._decoder.finish()
            except codings.CorruptBody as e:
                self._refuse(errors.badRequest(str(e), "Content-Encoding", "invalid_content_encoding"))
                return
            # The routes and the relay see the body as decoded.
            self.requestHeaders.removeHeader(b"content-encoding")
            if self.requestHeaders.hasHeader(b"content-length"):
                self.requestHeaders.setRawHeaders(b"content-length", [b"%d" % (self._decoder.length,)])
        super().requestReceived(command, path, version)

    def _tooLarge(self, decoded: bool = False) -> errors.APIError:
        limit = self._dynllmSite.maxBodyBytes / (1024 * 1024)
        what = "decoded request body" if decoded else "request body"
        return errors.APIError(
            413,
            f"the {what} is larger than the limit of {limit:g} MB (max_request_body_mb)",
            "invalid_request_error",
            "request_too_large",
        )

    def _refuse(self, error: errors.APIError) -> None:
        """
        Answer C{error} at once, straight on the connection (the request
        has not been parsed to the end: twisted.web cannot answer it yet),
        and close the connection (L{lingerClose}). The answer is in
        Anthropic's shape for a request with C{anthropic-version}, else in
        OpenAI's (L{errors.inShapeOf}).
        """
        self._refused = True
        # Do not let twisted.web invite the client to send the body.
        self.requestHeaders.removeHeader(b"expect")
        transport = self.channel.transport
        assert transport is not None
        site = self._dynllmSite
        writeError(transport, error, self.requestHeaders, site.cors)
        lingerClose(transport, site.lingerClock)

    # CORS.

    def process(self) -> None:
        """
        Answer a CORS preflight here; pass any other request to the
        resources.
        """
        if not isPreflight(self.method, self.requestHeaders):
            if not _decodable(self):
                # Klein would answer this in plain text, with a traceback in
                # the log.
                error = errors.inShapeOf(
                    errors.badRequest("the request's path and Host must be UTF-8 once percent-decoded", code="invalid_url"),
                    self.requestHeaders,
                )
                self._answer(error.status, error.headers(), error.body())
                return
            refusal = self._dynllmSite.guard.check(self.method, self.path, self.requestHeaders, self.content)
            if refusal is not None:
                refusal = errors.inShapeOf(refusal, self.requestHeaders)
                self._answer(refusal.status, refusal.headers(), refusal.body())
                return
            super().process()
            return
        # A preflight, for any path: the routes never see it, and it needs
        # no key (browsers send none with it).
        self.site = self._dynllmSite
        self.setHeader(b"Server", server.version)
        self.setHeader(b"Date", http.datetimeToString())
        policy = self._dynllmSite.cors
        self._corsApplied = True
        if not policy.apply(self.requestHeaders, self.responseHeaders, expose=False):
            origin = (self.getHeader(b"origin") or b"").decode("latin-1")
            error = errors.APIError(
                403,
                f"the origin {origin!r} is not allowed to call this API from a browser (server.cors_origins)",
                "invalid_request_error",
                "cors_origin_not_allowed",
            )
            self._answer(error.status, error.headers(), error.body())
            return
        self._answer(http.NO_CONTENT, preflightHeaders(self.requestHeaders, self.responseHeaders), b"")

    def _answer(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.setResponseCode(status, errors.reasonPhrase(status))
        for name, value in headers.items():
            self.setHeader(name, value)
        if body:
            self.setHeader(b"Content-Length", b"%d" % (len(body),))
            self.write(body)
        self.finish()

    def write(self, data: bytes) -> None:
        """
        Add the CORS headers before the response's headers go out, whatever
        wrote them: a route, an error handler, the relay of a backend's
        answer, or twisted.web itself.
        """
        if not self.startedWriting and not self._corsApplied:
            self._corsApplied = True
            self._dynllmSite.cors.apply(self.requestHeaders, self.responseHeaders)
        super().write(data)


#: The most client connections open at once when C{server.max_connections}
#: is not set, whatever the file-descriptor limit.
MAX_CONNECTIONS_CEILING = 1024


def autoMaxConnections() -> int:
    """
    @return: the default connection limit: half the soft C{RLIMIT_NOFILE}
        (the other half is left for backends, their connections, logs and
        the state database), at most L{MAX_CONNECTIONS_CEILING}, at least 1.
    """
    soft, _ = getrlimit(RLIMIT_NOFILE)
    if soft == RLIM_INFINITY:
        return MAX_CONNECTIONS_CEILING
    return max(1, min(MAX_CONNECTIONS_CEILING, soft // 2))


#: The states of a client connection, as L{DynLLMChannel.state} names them.
#: C{IDLE}: no byte of a request yet (just opened, or between requests);
#: C{RECEIVING}: a request's head or body is arriving; C{HANDLING}: a whole
#: request is being answered.
IDLE, RECEIVING, HANDLING = "idle", "receiving", "handling"


class DynLLMChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection with deadlines, and with every answer it gives
    itself in the error envelope.

      - A request's head and body must have arrived within the site's
        C{requestTimeout} of its first byte, or the client gets 408 and the
        connection is closed. Bytes that trickle in do not move the
        deadline (twisted.web's own idle timeout restarts on every byte,
        which lets a client hold a connection for ever with one byte a
        minute: "slowloris"). Once the request has arrived, its answer
        (a long generation) has no deadline here.
      - A connection with no request under way (new, or between requests
        on a kept-alive connection) is closed after the site's
        C{idleTimeout}.
      - A malformed request line, header or chunked body gets 400 (431 for
        a head larger than twisted.web accepts) in the envelope, where
        twisted.web writes a bare C{400 Bad Request} without a body.

    @ivar state: L{IDLE}, L{RECEIVING} or L{HANDLING}.
    @ivar since: When the connection entered L{state}, in the reactor's
        seconds.
    @ivar served: Whether a request has been answered on it.
    """

    state = IDLE
    since = 0.0
    served = False
    _deadline: Any = None
    _closing = False

    @property
    def _dynllmSite(self) -> DynLLMSite:
        return cast(DynLLMSite, cast(Any, self).site)

    def _enter(self, state: str) -> None:
        self.state = state
        self.since = self._dynllmSite.lingerClock.seconds()

    def connectionMade(self) -> None:
        """
        Count the connection in its site and start its idle timeout.
        """
        cast(Any, self).timeOut = self._dynllmSite.idleTimeout
        super().connectionMade()
        self._enter(IDLE)
        self._dynllmSite.connectionOpened(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Parse C{data}; the first byte of a request starts its deadline and
        stops the idle timeout.
        """
        if self._closing:
            return
        if self.state == IDLE:
            self._enter(RECEIVING)
            # HTTPChannel restores the saved idle timeout in requestDone.
            self._savedTimeOut = self.setTimeout(None)
            self._deadline = self.callLater(self._dynllmSite.requestTimeout, self._late)
        # Not HTTPChannel.dataReceived: it would restart the idle timeout.
        basic.LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        """
        Parse one line of a head, unless the connection was given up: a
        TCP connection that half-closes (L{lingerClose}) is not
        C{disconnecting}, so L{basic.LineReceiver} goes on with the lines
        already received, which twisted.web would parse for a request that
        never began (an C{AttributeError} that dropped the answer).
        """
        if self._closing:
            return
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        """
        Parse body bytes, unless the connection was given up (as
        L{lineReceived}).
        """
        if self._closing:
            return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        """
        The request has arrived whole: its deadline is met.
        """
        self._cancelDeadline()
        self._enter(HANDLING)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        """
        The answer is written: wait for the next request (with the idle
        timeout) or close.
        """
        self._enter(IDLE)
        self.served = True
        super().requestDone(request)

    def pushOutRank(self) -> int:
        """
        @return: the order in which connections waiting without a whole
            request are closed to make room for a new one: 0 for a
            connection idle between requests, 1 for one receiving a
            request, 2 for a new one that has sent nothing yet (its request
            may be on its way, unread).
        """
        if self.state == RECEIVING:
            return 1
        return 0 if self.served else 2

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _late(self) -> None:
        """
        The request's deadline has passed before its head and body
        arrived: answer 408, unless a refusal is written already.
        """
        self._deadline = None
        request = self.requests[-1] if self.requests else None
        if request is not None and getattr(request, "_refused", False):
            # Answered already; the client is still sending.
            assert self.transport is not None
            self.transport.loseConnection()
            return
        seconds = self._dynllmSite.requestTimeout
        self.giveUp(
            errors.APIError(
                408,
                f"the request's head and body did not arrive within {seconds:g} seconds"
                " (server.request_timeout_seconds)",
                "invalid_request_error",
                "request_timeout",
            )
        )

    def giveUp(self, error: errors.APIError) -> None:
        """
        Answer C{error} on the connection, stop parsing what comes, and
        close (L{lingerClose}).
        """
        if self._closing:
            return
        self._closing = True
        self._cancelDeadline()
        self.setTimeout(None)
        request = self.requests[-1] if self.requests else None
        headers = request.requestHeaders if request is not None else None
        assert self.transport is not None
        writeError(self.transport, error, headers, self._dynllmSite.cors)
        lingerClose(self.transport, self._dynllmSite.lingerClock)

    def _headTooLarge(self) -> errors.APIError:
        return errors.APIError(
            431,
            f"the request's head is larger than {self.totalHeadersSize} bytes or {self.maxHeaders} headers",
            "invalid_request_error",
            "headers_too_large",
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A line of the head is longer than twisted.web reads (where it closes
        the connection without a word): 431 in the envelope.
        """
        self.giveUp(self._headTooLarge())

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        twisted.web's answer to a request it cannot parse, in the envelope.
        """
        if self._receivedHeaderSize > self.totalHeadersSize or self._receivedHeaderCount > self.maxHeaders:
            error = self._headTooLarge()
        else:
            error = errors.badRequest(
                "the request is not valid HTTP/1.1 (its request line, a header or its chunked body)",
                code="malformed_request",
            )
        self.giveUp(error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop the deadline and leave the site's count.
        """
        self._cancelDeadline()
        self._dynllmSite.connectionClosed(self)
        super().connectionLost(reason)


class _Refuser(Protocol):
    """
    A connection beyond the site's limit: answered 503 in the envelope and
    closed.
    """

    def __init__(self, site: DynLLMSite) -> None:
        self.site = site

    def connectionMade(self) -> None:
        assert self.transport is not None
        writeError(self.transport, self.site.tooMany(), None, self.site.cors)
        lingerClose(self.transport, self.site.lingerClock)


class DynLLMSite(server.Site):
    """
    The C{Site} of the API: L{LimitedRequest}s on L{DynLLMChannel}s, no
    form parsing (uploads are relayed, not parsed), no tracebacks in error
    pages, and at most C{maxConnections} client connections.

    When a connection arrives at the limit, a connection that waits
    without a whole request is closed to make room (see
    L{DynLLMChannel.pushOutRank}; the one waiting longest of its rank),
    with a 503 unless it was idle between requests: so a crowd of clients that open connections and send
    nothing, or send their heads a byte at a time, cannot keep others out.
    Only when every connection is busy with a whole request is the new one
    answered 503 and closed.

    @ivar maxBodyBytes: The largest request body accepted, as sent and as
        decoded.
    @ivar cors: Which web origins may call the API.
    @ivar guard: What is refused while the API needs no key
        (L{dynllm.guard}); by default, nothing.
    @ivar requestTimeout: Seconds a request's head and body have to arrive,
        from its first byte (C{server.request_timeout_seconds}).
    @ivar idleTimeout: Seconds a connection may stay open with no request
        under way.
    @ivar maxConnections: The most client connections open at once
        (C{server.max_connections}).
    @ivar channels: The open connections, oldest first.
    """

    protocol = DynLLMChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Any,
        maxBodyBytes: int,
        cors: CORSPolicy = CORSPolicy(),
        reactor: Any = None,
        guard: Guard = Guard(),
        requestTimeout: float = 30.0,
        idleTimeout: float | None = None,
        maxConnections: int | None = None,
    ) -> None:
        """
        @param reactor: Times connections out; the global reactor by
            default.
        @param idleTimeout: L{idleTimeout}; C{requestTimeout} by default.
        @param maxConnections: L{maxConnections}; L{autoMaxConnections} by
            default.
        """
        super().__init__(resource, requestFactory=LimitedRequest, parsePOSTFormSubmission=False, reactor=reactor)
        if reactor is None:
            from twisted.internet import reactor
        self.lingerClock = reactor
        self.maxBodyBytes = maxBodyBytes
        self.cors = cors
        self.guard = guard
        self.displayTracebacks = False
        self.requestTimeout = requestTimeout
        self.idleTimeout = requestTimeout if idleTimeout is None else idleTimeout
        self.maxConnections = autoMaxConnections() if maxConnections is None else maxConnections
        self.channels: dict[DynLLMChannel, None] = {}

    def buildProtocol(self, addr: Any) -> Any:
        """
        @return: a L{DynLLMChannel}, after making room for it if the site
            is at its limit; or a protocol that answers 503 if it cannot.
        """
        if len(self.channels) >= self.maxConnections and not self._makeRoom():
            return _Refuser(self)
        return super().buildProtocol(addr)

    def _makeRoom(self) -> bool:
        """
        Close the connection that has waited longest without a whole
        request, if there is one.

        @return: whether one was closed.
        """
        waiting = [c for c in self.channels if c.state != HANDLING and not c._closing]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: (c.pushOutRank(), c.since))
        del self.channels[victim]
        if victim.pushOutRank() == 0:
            # Between requests: closing it is what a kept-alive connection
            # may expect at any time (RFC 9112 section 9.5).
            victim._closing = True
            assert victim.transport is not None
            victim.transport.loseConnection()
        else:
            victim.giveUp(self.tooMany())
        return True

    def tooMany(self) -> errors.APIError:
        """
        @return: the 503 of a connection over the limit.
        """
        return errors.APIError(
            503,
            f"too many open connections (server.max_connections: {self.maxConnections}); try again",
            "server_error",
            "too_many_connections",
            retryAfter=1,
        )

    def connectionOpened(self, channel: DynLLMChannel) -> None:
        """
        Count C{channel} as open.
        """
        self.channels[channel] = None

    def connectionClosed(self, channel: DynLLMChannel) -> None:
        """
        C{channel} is closed: it no longer counts.
        """
        self.channels.pop(channel, None)


def makeSite(
    resource: Any,
    maxBodyBytes: int,
    corsOrigins: Iterable[str] = (),
    guard: Guard = Guard(),
    requestTimeout: float = 30.0,
    maxConnections: int | None = None,
) -> DynLLMSite:
    """
    @param resource: What to serve.
    @param maxBodyBytes: The body limit, in bytes.
    @param corsOrigins: The allowed web origins, normalized as
        C{server.cors_origins} is (L{CORSPolicy}).
    @param guard: What to refuse while the API needs no key.
    @param requestTimeout: C{server.request_timeout_seconds}.
    @param maxConnections: C{server.max_connections} (C{None}: automatic).
    @return: a L{DynLLMSite} serving C{resource}.
    """
    return DynLLMSite(
        resource,
        maxBodyBytes,
        CORSPolicy(frozenset(corsOrigins)),
        guard=guard,
        requestTimeout=requestTimeout,
        maxConnections=maxConnections,
    )
