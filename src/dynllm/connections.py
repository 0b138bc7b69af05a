# -*- test-case-name: tests.test_site -*-
"""
Client connections: what the daemon does to a connection, below the
requests it carries (L{dynllm.site}).

  - A request's head and body have a deadline, and a connection with no
    request under way an idle timeout (L{DynLLMChannel});
  - the daemon holds at most C{server.max_connections} client connections
    (L{autoMaxConnections} by default; the site counts them, see
    L{dynllm.site.DynLLMSite}): one that waits without a whole request makes
    room for a newcomer (L{DynLLMChannel.pushOutRank}), and a newcomer with
    no room is answered 503 (L{_Refuser});
  - answers the daemon writes itself, outside a request (a refusal while a
    body arrives, a late or malformed request, a connection over the
    limit), are whole responses in the error envelope (L{writeError}),
    after which the connection reads and discards what the client still
    sends for a while before it closes (L{lingerClose}).
"""

from __future__ import annotations

from resource import RLIM_INFINITY, RLIMIT_NOFILE, getrlimit
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.protocols import basic
from twisted.web import http
from twisted.web.http_headers import Headers

from dynllm import errors
from dynllm.cors import CORSPolicy

if TYPE_CHECKING:
    from dynllm.site import DynLLMSite


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
        return cast("DynLLMSite", cast(Any, self).site)

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
