"""
The streaming relay of L{dynllm.proxy}: header filtering, when the status
line and headers go out (in memory, on a fake clock), request bodies that
can be sent twice, and backpressure and cancellation measured on real
sockets, in one process.
"""

from __future__ import annotations

import socket
import tempfile

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from zope.interface import implementer

from twisted.web.test.requesthelper import DummyRequest

from dynllm.errors import APIError
from dynllm.proxy import (
    CREDENTIALS,
    DROP_REQUEST,
    DROP_RESPONSE,
    BackendStatus,
    FileProducer,
    RelayGuard,
    endToEnd,
    forward,
    requestBody,
)
from dynllm.rewrite import NameRewriter
from dynllm.service import makeAgent
from tests.support import FakeResponse

CHUNK = b"x" * 65536


class EndToEndTests(SynchronousTestCase):
    """
    L{endToEnd} keeps end-to-end headers only.
    """

    def test_dropsHopByHop(self):
        """
        Hop-by-hop headers, those named by C{Connection}, and the ones in
        the drop set are removed; others are kept with all their values.
        """
        headers = Headers(
            {
                b"Connection": [b"keep-alive, X-Private"],
                b"X-Private": [b"1"],
                b"Transfer-Encoding": [b"chunked"],
                b"Authorization": [b"Bearer k"],
                b"Content-Length": [b"5"],
                b"X-Kept": [b"a", b"b"],
                b"Content-Type": [b"application/json"],
            }
        )
        kept = endToEnd(headers, DROP_REQUEST)
        self.assertEqual(
            sorted(kept.getAllRawHeaders()),
            [(b"Content-Type", [b"application/json"]), (b"X-Kept", [b"a", b"b"])],
        )

    def test_dropsEmpty(self):
        """
        An empty header is dropped, as are C{Date} and C{Server}, which
        twisted.web sets itself; C{Content-Length} is kept, since the body is
        relayed unchanged.
        """
        headers = Headers(
            {b"Content-Encoding": [b""], b"Date": [b"x"], b"Server": [b"y"], b"Content-Length": [b"3"]}
        )
        self.assertEqual(list(endToEnd(headers, DROP_RESPONSE).getAllRawHeaders()), [(b"Content-Length", [b"3"])])


class RecordingAgent:
    """
    An C{IAgent} that records the headers of each request and fails it as
    a refused connection would.
    """

    def __init__(self):
        self.sent: list[Headers] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.sent.append(headers)
        return defer.fail(OSError("connection refused"))


class CredentialTests(SynchronousTestCase):
    """
    No client credential reaches a backend; the backend's own key does,
    when L{forward} is given one.
    """

    clientHeaders = {
        b"Authorization": [b"Bearer client"],
        b"Proxy-Authorization": [b"Basic Y2xpZW50"],
        b"X-Api-Key": [b"client"],
        b"Api-Key": [b"client"],
        b"Cookie": [b"session=client"],
        b"X-Kept": [b"1"],
    }

    def send(self, upstreamHeaders=None, headers=None):
        """
        Forward a request carrying every kind of client credential.

        @return: the headers the backend got.
        """
        request = DummyRequest([b""])
        request.method = b"POST"
        for name, values in self.clientHeaders.items():
            request.requestHeaders.setRawHeaders(name, values)
        agent = RecordingAgent()
        d = defer.ensureDeferred(
            forward(agent, request, b"http://127.0.0.1:1/v1/x", b"{}", headers, clock=task.Clock(), upstreamHeaders=upstreamHeaders)
        )
        self.failureResultOf(d, APIError)
        [sent] = agent.sent
        return sent

    def test_credentialsDropped(self):
        """
        C{Authorization}, C{Proxy-Authorization}, C{X-Api-Key},
        C{api-key} and C{Cookie} from the client are all dropped; other
        headers pass.
        """
        self.assertEqual(
            CREDENTIALS,
            {b"authorization", b"proxy-authorization", b"x-api-key", b"api-key", b"cookie"},
        )
        self.assertTrue(CREDENTIALS <= DROP_REQUEST)
        sent = self.send()
        for name in CREDENTIALS:
            self.assertFalse(sent.hasHeader(name), name)
        self.assertEqual(sent.getRawHeaders(b"x-kept"), [b"1"])

    def test_backendKeySent(self):
        """
        With a lease's C{upstreamHeaders}, the backend gets its key as
        C{Authorization: Bearer KEY} and nothing of the client's
        credentials.
        """
        sent = self.send(upstreamHeaders={"Authorization": "Bearer backend-key"})
        self.assertEqual(sent.getRawHeaders(b"authorization"), [b"Bearer backend-key"])
        for name in CREDENTIALS - {b"authorization"}:
            self.assertFalse(sent.hasHeader(name), name)

    def test_givenHeadersNotChanged(self):
        """
        Headers the caller gives are sent with the key set in a copy: the
        caller's own object is not changed.
        """
        given = Headers({b"X-Given": [b"1"]})
        sent = self.send(upstreamHeaders={"Authorization": "Bearer backend-key"}, headers=given)
        self.assertEqual(sent.getRawHeaders(b"authorization"), [b"Bearer backend-key"])
        self.assertEqual(sent.getRawHeaders(b"x-given"), [b"1"])
        self.assertFalse(given.hasHeader(b"authorization"))


class FakeAgent:
    """
    An agent whose responses the test gives: C{self.responses} holds the
    Deferred of every request.
    """

    def __init__(self):
        self.responses = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        d = defer.Deferred()
        self.responses.append(d)
        return d


class ForwardingResource(resource.Resource):
    """
    Relays every request with L{forward} through a L{FakeAgent}, on a fake
    clock, optionally renaming a model in the response.
    """

    isLeaf = True

    def __init__(self, agent, clock, rewriter=None):
        super().__init__()
        self.agent = agent
        self.clock = clock
        self.rewriter = rewriter

    def render(self, request):
        d = defer.ensureDeferred(
            forward(self.agent, request, b"http://127.0.0.1:1/x", None, clock=self.clock, rewriter=self.rewriter)
        )
        d.addCallback(lambda _: request.finish())
        return server.NOT_DONE_YET


class HeadersFirstTests(SynchronousTestCase):
    """
    The status line and headers reach the client as soon as the backend's
    arrive, before any body byte, and responses without a body keep none.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.agent = FakeAgent()
        self.transport = StringTransport()

    def send(self, method=b"POST", rewriter=None):
        """
        Send a request with C{method} to a relay in memory.
        """
        site = server.Site(ForwardingResource(self.agent, self.clock, rewriter), reactor=self.clock)
        channel = site.buildProtocol(None)
        channel.makeConnection(self.transport)
        body = b"{}" if method == b"POST" else b""
        channel.dataReceived(b"%s /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (method, len(body), body))
        self.assertEqual(len(self.agent.responses), 1)

    def respond(self, code, headers):
        """
        Give the backend's status and headers, and no body yet.

        @return: the response.
        """
        response = FakeResponse(code, headers)
        self.agent.responses[0].callback(response)
        return response

    def test_headersBeforeBody(self):
        """
        A streamed response's status line and headers are written when the
        backend's headers arrive; its body follows as it comes.
        """
        self.send()
        response = self.respond(200, {b"Content-Type": [b"text/event-stream"]})
        head = self.transport.value()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 Whatever\r\n"), head)
        self.assertIn(b"Content-Type: text/event-stream\r\n", head)
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)
        response.body.dataReceived(b": ping\n\n")
        self.clock.advance(0)
        self.assertEqual(self.transport.value()[len(head) :], b"8\r\n: ping\n\n\r\n")
        response.body.connectionLost(Failure(ResponseDone()))
        self.assertTrue(self.transport.value().endswith(b"\r\n0\r\n\r\n"))

    def test_renamedHeadersBeforeBody(self):
        """
        A response whose model is renamed goes out without the backend's
        C{Content-Length}, chunked, its headers before its body.
        """
        self.send(rewriter=NameRewriter("/models/m", "m"))
        response = self.respond(200, {b"Content-Type": [b"application/json"], b"Content-Length": [b"21"]})
        head = self.transport.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", head)
        self.assertNotIn(b"Content-Length", head)
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)
        response.body.dataReceived(b'{"model":"/models/m"}')
        response.body.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.transport.value()[len(head) :], b'd\r\n{"model":"m"}\r\n0\r\n\r\n')

    def test_head(self):
        """
        The answer to C{HEAD} keeps the backend's C{Content-Length} and has
        no body.
        """
        self.send(b"HEAD")
        response = self.respond(200, {b"Content-Type": [b"application/json"], b"Content-Length": [b"2"]})
        head = self.transport.value()
        self.assertIn(b"Content-Length: 2\r\n", head)
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)
        response.body.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.transport.value(), head)

    def test_noContent(self):
        """
        A 204 or 304 answer has headers only: no chunked framing, no body.
        """
        for code in (204, 304):
            self.transport = StringTransport()
            self.agent.responses = []
            self.send(b"GET")
            response = self.respond(code, {})
            response.body.connectionLost(Failure(ResponseDone()))
            raw = self.transport.value()
            self.assertTrue(raw.startswith(b"HTTP/1.1 %d " % code), raw)
            self.assertNotIn(b"Transfer-Encoding", raw)
            self.assertTrue(raw.endswith(b"\r\n\r\n"), raw)


class StartedResource(resource.Resource):
    """
    Begins its response itself (200, C{text/event-stream}, a comment), then
    relays with L{forward} in its C{started} mode, renaming C{/models/m} to
    C{m}; what L{forward} raises is kept in C{self.raised}.
    """

    isLeaf = True

    def __init__(self, agent, clock):
        super().__init__()
        self.agent = agent
        self.clock = clock
        self.raised = []

    def render(self, request):
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.write(b": waiting\n\n")
        d = defer.ensureDeferred(
            forward(self.agent, request, b"http://127.0.0.1:1/x", None, clock=self.clock,
                    rewriter=NameRewriter("/models/m", "m"), started=True)
        )
        d.addErrback(lambda f: self.raised.append(f.value))
        d.addBoth(lambda _: request.finish())
        return server.NOT_DONE_YET


class StartedTests(SynchronousTestCase):
    """
    L{forward} into a response whose status line and headers were sent
    already: only a 2xx answer's body goes out; other answers are raised.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.agent = FakeAgent()
        self.transport = StringTransport()
        self.resource = StartedResource(self.agent, self.clock)
        site = server.Site(self.resource, reactor=self.clock)
        channel = site.buildProtocol(None)
        channel.makeConnection(self.transport)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.head = self.transport.value()

    def respond(self, code, headers):
        response = FakeResponse(code, headers)
        self.agent.responses[0].callback(response)
        return response

    def test_bodyOnly(self):
        """
        A 200 answer's body follows what was written, renamed, without the
        backend's status line and headers.
        """
        response = self.respond(200, {b"Content-Type": [b"text/event-stream"], b"X-Backend": [b"1"]})
        response.body.dataReceived(b'data: {"model":"/models/m"}\n\n')
        response.body.connectionLost(Failure(ResponseDone()))
        raw = self.transport.value()
        self.assertEqual(raw.count(b"HTTP/1.1"), 1)
        self.assertNotIn(b"X-Backend", raw)
        self.assertTrue(raw.endswith(b'data: {"model":"m"}\n\n\r\n0\r\n\r\n'), raw)
        self.assertEqual(self.resource.raised, [])

    def test_errorStatusRaised(self):
        """
        An answer that is not 2xx is not written: L{forward} raises
        L{BackendStatus} with its status and its whole body, renamed.
        """
        response = self.respond(400, {b"Content-Type": [b"application/json"]})
        response.body.dataReceived(b'{"error": {"message": "no", "model": "/models/m"}}')
        response.body.connectionLost(Failure(ResponseDone()))
        (raised,) = self.resource.raised
        self.assertIsInstance(raised, BackendStatus)
        self.assertEqual((raised.status, raised.body), (400, b'{"error": {"message": "no", "model": "m"}}'))
        self.assertNotIn(b"error", self.transport.value())


class Consumer:
    """
    Gathers what a body producer writes.
    """

    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


class FileProducerTests(SynchronousTestCase):
    """
    L{FileProducer} sends a spooled request body, and can send it again.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.file = tempfile.TemporaryFile()
        self.addCleanup(self.file.close)
        self.body = bytes(range(256)) * 1000
        self.file.write(self.body)

    def test_wholeFileEachTime(self):
        """
        Each run writes the whole file from its first byte, whatever the
        file's position, and the file stays open.
        """
        producer = FileProducer(self.file, self.clock)
        self.assertEqual(producer.length, len(self.body))
        for _ in range(2):
            self.file.seek(1000)
            consumer = Consumer()
            d = producer.startProducing(consumer)
            self.clock.advance(0)
            self.successResultOf(d)
            self.assertTrue(consumer.data == self.body)
        self.assertFalse(self.file.closed)

    def test_restartAfterStop(self):
        """
        A run stopped midway never finishes; the next run writes the whole
        body to its own consumer.
        """
        producer = FileProducer(self.file, self.clock)
        first, second = Consumer(), Consumer()
        d = producer.startProducing(first)
        producer.pauseProducing()
        self.clock.advance(0)
        producer.stopProducing()
        again = producer.startProducing(second)
        self.clock.advance(0)
        self.assertNoResult(d)
        self.successResultOf(again)
        self.assertEqual(first.data, b"")
        self.assertTrue(second.data == self.body)
        self.assertFalse(self.file.closed)


@implementer(IPushProducer)
class FloodingResource(resource.Resource):
    """
    An upstream that writes 64 KiB chunks for as long as it is not paused,
    and records how it was treated.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.written = 0
        self.paused = 0
        self.stopped = defer.Deferred()
        self._running = False

    def render_POST(self, request):
        self._request = request
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.registerProducer(self, True)
        # Fire with the reason as a value: a Failure would take the errback path.
        request.notifyFinish().addBoth(lambda r: self.stopped.callback(getattr(r, "value", r)))
        self.resumeProducing()
        return server.NOT_DONE_YET

    def resumeProducing(self):
        self._running = True
        while self._running and self.written < 512 * 1024 * 1024:
            self._request.write(CHUNK)
            self.written += len(CHUNK)

    def pauseProducing(self):
        self.paused += 1
        self._running = False

    def stopProducing(self):
        self._running = False


class ProxyResource(resource.Resource):
    """
    Forwards every POST to the upstream with L{forward}.
    """

    isLeaf = True

    def __init__(self, agent, url):
        super().__init__()
        self.agent = agent
        self.url = url

    def render_POST(self, request):
        from twisted.internet import reactor

        d = defer.ensureDeferred(forward(self.agent, request, self.url, requestBody(request, reactor)))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallbacks(lambda _: request.finish(), lambda f: None)
        return server.NOT_DONE_YET


class BackpressureTests(TestCase):
    """
    A slow client slows the backend down instead of filling our memory, and
    a client that leaves stops the backend's response.
    """

    timeout = 30

    async def setUpServers(self):
        self.upstream = FloodingResource()
        upstreamPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(self.upstream)
        )
        self.addCleanup(upstreamPort.stopListening)
        agent, pool = makeAgent(reactor)
        self.addCleanup(pool.closeCachedConnections)
        url = f"http://127.0.0.1:{upstreamPort.getHost().port}/".encode()
        self.proxy = ProxyResource(agent, url)
        proxyPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(self.proxy))
        self.addCleanup(proxyPort.stopListening)
        return proxyPort.getHost().port

    async def test_slowClientPausesUpstream(self):
        """
        A client that reads nothing makes the proxy pause the upstream: the
        upstream writes only what the socket buffers hold, and the proxy's
        own transport buffer stays small.
        """
        port = await self.setUpServers()
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.addCleanup(client.close)
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertGreater(self.upstream.paused, 0)
        self.assertLess(self.upstream.written, 64 * 1024 * 1024)

    async def test_clientGoneStopsUpstream(self):
        """
        When the client disconnects mid-body, the upstream response is
        abandoned: the upstream sees its connection close.
        """
        port = await self.setUpServers()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await task.deferLater(reactor, 0.2, lambda: None)
        self.assertGreater(len(client.recv(65536)), 0)
        client.close()
        reason = await self.upstream.stopped
        self.assertIsInstance(reason, ConnectionDone)
        self.assertLess(self.upstream.written, 512 * 1024 * 1024)


class GuardedResource(resource.Resource):
    """
    Relays every request with L{forward} through a L{FakeAgent}, on a fake
    clock, with a L{RelayGuard} of one second; what L{forward} raises is kept
    in C{self.raised}, and a raised L{APIError} is answered.
    """

    isLeaf = True

    def __init__(self, agent, clock):
        super().__init__()
        self.agent = agent
        self.clock = clock
        self.raised = []
        self.stalls = []
        self.guard = RelayGuard(clock, 1.0, self.stalled)

    def stalled(self):
        self.stalls.append(self.clock.seconds())
        return APIError(504, "stalled", "server_error", "upstream_timeout")

    def render(self, request):
        d = defer.ensureDeferred(forward(self.agent, request, b"http://127.0.0.1:1/x", None, clock=self.clock,
                                         guard=self.guard))

        def failed(f):
            self.raised.append(f.value)
            if isinstance(f.value, APIError):
                request.setResponseCode(f.value.status)
                request.write(f.value.body())

        d.addErrback(failed)
        d.addBoth(lambda _: request.finish() if not request.finished and request.channel is not None else None)
        return server.NOT_DONE_YET


class RelayGuardTests(SynchronousTestCase):
    """
    L{RelayGuard} ends a relay whose backend has sent nothing for its idle
    timeout, or that it is told to end, and not one that a slow client
    holds back.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.agent = FakeAgent()
        self.transport = StringTransport()
        self.resource = GuardedResource(self.agent, self.clock)
        site = server.Site(self.resource, reactor=self.clock)
        self.channel = site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(len(self.agent.responses), 1)

    def respond(self):
        response = FakeResponse(200, {b"Content-Type": [b"text/event-stream"]})
        self.agent.responses[0].callback(response)
        return response

    def test_noHeaders(self):
        """
        A backend that sends no status line for the idle timeout: the
        upstream request is cancelled and L{forward} raises the guard's
        reason, which the client gets as its answer.
        """
        self.clock.advance(0.9)
        self.assertEqual(self.resource.raised, [])
        self.clock.advance(0.2)
        [raised] = self.resource.raised
        self.assertEqual((raised.status, raised.code), (504, "upstream_timeout"))
        self.assertEqual(len(self.resource.stalls), 1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 504 "), self.transport.value())

    def test_silentBody(self):
        """
        A body that stops coming: each piece starts the silence again; once
        the timeout passes, the backend's transport is stopped and the
        client's connection closed without the last chunk.
        """
        response = self.respond()
        for _ in range(3):
            self.clock.advance(0.9)
            response.body.dataReceived(b"data: x\n\n")
        self.clock.advance(0.9)
        self.assertFalse(response.body.transport.stopped)
        self.clock.advance(0.2)
        self.assertTrue(response.body.transport.stopped)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.value().endswith(b"0\r\n\r\n"))
        self.assertEqual(len(self.resource.stalls), 1)

    def test_backpressureNotSilence(self):
        """
        While the client holds the relay back (the backend's transport
        paused), no time counts; after it resumes, the timeout counts
        again from nothing.
        """
        response = self.respond()
        producer = self.channel._channel.requests[0].producer
        producer.pauseProducing()
        self.clock.advance(30)
        self.assertFalse(response.body.transport.stopped)
        producer.resumeProducing()
        self.clock.advance(0.9)
        self.assertFalse(response.body.transport.stopped)
        self.clock.advance(0.2)
        self.assertTrue(response.body.transport.stopped)

    def test_endBeforeHeaders(self):
        """
        L{RelayGuard.end} before the backend's status line: L{forward}
        raises the reason given (a revoked lease's), not a stall's.
        """
        reason = APIError(503, "unloaded", "server_error", "model_unloaded")
        self.resource.guard.end(reason)
        self.assertEqual(self.resource.raised, [reason])
        self.assertEqual(self.resource.stalls, [])

    def test_finishedIsQuiet(self):
        """
        A relay that ended normally leaves no timer behind.
        """
        response = self.respond()
        response.finish(b"data: [DONE]\n\n")
        self.clock.advance(0)
        guardCalls = [c for c in self.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is self.resource.guard]
        self.assertEqual(guardCalls, [])
        self.assertTrue(self.transport.value().endswith(b"0\r\n\r\n"))

    def test_failedIsQuiet(self):
        """
        A relay whose backend could not be reached leaves no timer: no
        stall is counted after its 502.
        """
        self.agent.responses[0].errback(Failure(ConnectionRefusedError("refused")))
        [raised] = self.resource.raised
        self.assertEqual(raised.status, 502)
        self.clock.advance(10)
        self.assertEqual(self.resource.stalls, [])


class ConnectFailureTests(SynchronousTestCase):
    """
    L{forward} when the backend's connection fails or is given up.
    """

    def test_clientLeavesWhileConnecting(self):
        """
        Cancelling L{forward} (the client left) while the agent is still
        connecting to the backend is a cancellation, not a 502 to log: the
        agent's C{ConnectingCancelledError} becomes C{CancelledError}.
        """
        clock = MemoryReactorClock()
        agent, _ = makeAgent(clock)
        request = DummyRequest([b""])
        d = defer.ensureDeferred(forward(agent, request, b"http://127.0.0.1:9/v1/models", None, clock=clock))
        self.assertEqual(len(clock.tcpClients), 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)

    def test_wrappedFailuresDescribed(self):
        """
        An agent error that wraps failures (C{ResponseFailed}, whose C{str}
        is a list of C{Failure} reprs) is a 502 whose message is the
        failures' messages.
        """
        agent = FakeAgent()
        request = DummyRequest([b""])
        d = defer.ensureDeferred(forward(agent, request, b"http://127.0.0.1:9/v1/models", None,
                                         clock=MemoryReactorClock()))
        agent.responses[0].errback(ResponseFailed([Failure(ConnectionDone())]))
        error = self.failureResultOf(d, APIError).value
        self.assertEqual(error.status, 502)
        self.assertEqual(error.message, "could not reach the backend: Connection was closed cleanly.")

