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
reads and discards the rest of the body for a while
(L{dynllm.connections.lingerClose}) and closes: the routes never see the
request. The site also counts its client connections and keeps them within
C{server.max_connections}; what a connection does below its requests
(deadlines, idle timeouts, malformed requests) is L{dynllm.connections}'s.
"""

from __future__ import annotations

import io
import tempfile
from typing import IO, Any, Iterable, cast
from urllib.parse import unquote_to_bytes

from twisted.web import http, server

from dynllm import codings, errors
from dynllm.cors import CORSPolicy, isPreflight, preflightHeaders
from dynllm.connections import (
    HANDLING,
    DynLLMChannel,
    _Refuser,
    autoMaxConnections,
    lingerClose,
    writeError,
)
from dynllm.guard import Guard

#: Bytes of decoded body kept in memory before it goes to a temporary file
#: (the threshold twisted.web uses for bodies as sent, C{http._getContentFile}).
SPOOL_THRESHOLD = 100000

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
