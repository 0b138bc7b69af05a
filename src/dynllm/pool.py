# -*- test-case-name: tests.test_pool -*-
"""
dynllm's pool of HTTP connections to its backends.

A backend may close an idle keep-alive connection at any moment, and its
close can cross a request that dynllm sends on it: the request is then
lost, and Twisted's C{HTTPConnectionPool} resends only bodiless requests
with idempotent methods, so a chat completion would fail with
C{ResponseNeverReceived([ConnectionDone])}. llama-server (b11434) also
closes the connection after every streamed response, although its headers
said C{Keep-Alive: timeout=5, max=100} and not C{Connection: close}
(measured: the next request on it gets no answer).
This pool keeps such losses from reaching clients:

 - An idle connection is closed by dynllm after L{IDLE_TIMEOUT} seconds,
   before any backend's own keep-alive timeout ends it.
 - The most recently used idle connection is handed out first, so the
   one least likely to have been closed by the backend serves the request,
   and the others age out.
 - A request sent on a reused connection that fails before the first byte
   of a response arrived (L{RESENDABLE}) is sent once more, on a new
   connection, whatever its method, if its body can be produced again
   (C{None}, or an L{IRewindableBodyProducer}). On a connection that the
   backend closed while it was idle, the request was never read. Should a
   backend have read it and closed without a byte of answer, running it
   once more costs compute: an inference request changes nothing on the
   backend. A request whose response had begun is never resent (its
   client may have seen part of it), nor one sent on a new connection,
   nor a cancelled one.

L{BackendPool} is what C{twisted.web.client.Agent} needs of a pool
(C{getConnection}, C{persistent}) plus C{closeCachedConnections}.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

# HTTP11ClientProtocol is the only implementation of what Agent asks a pool
# for (an object whose request(Request) sends one request); no public module
# exports it (twisted.web.client imports it from here without listing it in
# its __all__), and Twisted's own HTTPConnectionPool builds the same objects.
# RequestNotSent is the error its request() gives on a connection that can
# send no more requests, and is likewise exported nowhere else.
from twisted.web._newclient import HTTP11ClientProtocol, RequestNotSent
from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.iweb import IBodyProducer, IResponse

from dynllm.logs import logger

log = logger(__name__)

#: Seconds an idle connection stays in the pool. Every backend's keep-alive
#: timeout is longer: cpp-httplib, which llama-server serves HTTP with, has
#: C{CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND 5} (C{httplib.h}; llama-server's
#: responses say C{Keep-Alive: timeout=5}); uvicorn, under
#: C{transformers serve}, C{timeout_keep_alive = 5} (C{uvicorn/config.py});
#: drogon, under OVMS, C{idleConnectionTimeout_{60}}
#: (C{HttpAppFrameworkImpl.h}). 2 s leaves 3 s for a close that crosses
#: the wire, and still serves bursts of requests from warm connections.
IDLE_TIMEOUT = 2.0

#: Idle connections kept per backend (more are closed).
MAX_IDLE_PER_BACKEND = 32

#: The errors of a request that got no byte of a response: it may be sent
#: again (on a new connection). C{ResponseFailed}, the error of a response
#: cut short, is not among them (L{ResponseNeverReceived} is its subclass,
#: raised only when no byte at all arrived).
RESENDABLE = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)


class IRewindableBodyProducer(IBodyProducer):
    """
    A request body that can be sent more than once: C{startProducing} may be
    called again, after an earlier call ended or was stopped with
    C{stopProducing}, and then writes the same bytes from the beginning.
    """


def canResend(bodyProducer: Any) -> bool:
    """
    @param bodyProducer: The body of a request, or C{None}.
    @return: whether that body can be sent again.
    """
    return bodyProducer is None or IRewindableBodyProducer.providedBy(bodyProducer)


def isResendable(reason: Failure) -> bool:
    """
    @return: whether C{reason}, the failure of a request, says that no byte
        of a response arrived and that nobody cancelled the request.
    """
    if not reason.check(*RESENDABLE):
        return False
    causes = getattr(reason.value, "reasons", [])
    return not any(cause.check(defer.CancelledError) for cause in causes)


class _ConnectionFactory(Factory):
    """
    Makes the protocol of one backend connection, which goes back to the
    pool through C{quiescent} once a response is complete and the
    connection may carry another.
    """

    #: One "Starting factory" log line per backend connection would drown the
    #: useful ones.
    noisy = False

    def __init__(self, quiescent: Callable[[HTTP11ClientProtocol], None]) -> None:
        self._quiescent = quiescent

    def buildProtocol(self, addr: IAddress | None) -> HTTP11ClientProtocol:
        return HTTP11ClientProtocol(self._quiescent)


class _ReusedConnection:
    """
    A connection taken from the pool for one request: a request that it
    loses before any response byte is sent once more, on a new connection.

    @ivar protocol: The reused connection.
    @ivar newConnection: Opens a new connection to the same backend.
    """

    def __init__(
        self, protocol: HTTP11ClientProtocol, newConnection: Callable[[], defer.Deferred[HTTP11ClientProtocol]]
    ) -> None:
        self.protocol = protocol
        self.newConnection = newConnection

    def request(self, request: Any) -> defer.Deferred[IResponse]:
        """
        Send C{request} (a C{twisted.web._newclient.Request}) and return its
        response, resending it once as the module docstring says.
        """
        d: defer.Deferred[IResponse] = self.protocol.request(request)

        def failed(reason: Failure) -> Any:
            if not (isResendable(reason) and canResend(request.bodyProducer)):
                return reason
            log.debug(
                "resending {method} {uri} on a new connection: the reused one failed before any response ({why})",
                method=request.method.decode("ascii", "replace"),
                uri=request.uri.decode("ascii", "replace"),
                why=reason.getErrorMessage(),
            )
            return self.newConnection().addCallback(lambda connection: connection.request(request))

        return d.addErrback(failed)


def _close(protocol: HTTP11ClientProtocol) -> None:
    """
    Close an idle connection.
    """
    if protocol.transport is not None:
        protocol.transport.loseConnection()


@define
class _Idle:
    """
    A connection in the pool, with the call that closes it when it has
    been idle too long.
    """

    protocol: HTTP11ClientProtocol
    expiry: IDelayedCall


@define
class BackendPool:
    """
    The connections of one C{Agent} to dynllm's backends; see the module
    docstring for its rules.

    @ivar reactor: Times idle connections.
    @ivar idleTimeout: Seconds an idle connection is kept.
    @ivar maxIdlePerBackend: Idle connections kept per backend.
    @ivar persistent: Whether requests ask for persistent connections
        (C{Agent} reads this).
    """

    reactor: IReactorTime
    idleTimeout: float = IDLE_TIMEOUT
    maxIdlePerBackend: int = MAX_IDLE_PER_BACKEND
    persistent: bool = True
    _idle: dict[Hashable, list[_Idle]] = field(factory=dict, init=False)

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> defer.Deferred[Any]:
        """
        Supply a connection for one request.

        @param key: Names the backend; connections of one key are
            interchangeable.
        @param endpoint: Opens a new connection to it.
        @return: a Deferred that fires with an object whose C{request}
            method sends one C{twisted.web._newclient.Request}: the most
            recently used idle connection, with the right to resend a
            request it loses, or a new connection (which never resends).
        """
        idle = self._idle.get(key, [])
        while idle:
            entry = idle.pop()
            entry.expiry.cancel()
            if entry.protocol.state == "QUIESCENT":
                return defer.succeed(_ReusedConnection(entry.protocol, lambda: self._connect(key, endpoint)))
        return self._connect(key, endpoint)

    def _connect(self, key: Hashable, endpoint: IStreamClientEndpoint) -> defer.Deferred[HTTP11ClientProtocol]:
        """
        @return: a Deferred that fires with a new connection to C{endpoint},
            which returns to the pool under C{key} after each response.
        """
        factory = _ConnectionFactory(lambda protocol: self._put(key, protocol))
        return endpoint.connect(factory)  # type: ignore[return-value]

    def _put(self, key: Hashable, protocol: HTTP11ClientProtocol) -> None:
        """
        Keep C{protocol}, whose response is complete, for a next request.
        """
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.maxIdlePerBackend:
            oldest = idle.pop(0)
            oldest.expiry.cancel()
            _close(oldest.protocol)
        entry = _Idle(protocol, self.reactor.callLater(self.idleTimeout, lambda: self._expire(key, entry)))
        idle.append(entry)

    def _expire(self, key: Hashable, entry: _Idle) -> None:
        """
        Close a connection that has been idle for L{idleTimeout} seconds.
        """
        self._idle[key].remove(entry)
        if not self._idle[key]:
            del self._idle[key]
        _close(entry.protocol)

    def idleConnections(self) -> int:
        """
        @return: how many idle connections the pool holds, for all backends.
        """
        return sum(len(idle) for idle in self._idle.values())

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """
        Close every idle connection.

        @return: a Deferred that fires when they are all closed.
        """
        closing = []
        for idle in self._idle.values():
            for entry in idle:
                entry.expiry.cancel()
                closing.append(entry.protocol.abort())
        self._idle = {}
        return defer.gatherResults(closing).addCallback(lambda _: None)
