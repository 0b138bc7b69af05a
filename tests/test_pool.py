"""
L{dynllm.pool}: which lost requests are sent again, and how long idle
connections live, on a fake reactor with in-memory connections driven
through a real C{twisted.web.client.Agent}.
"""

from __future__ import annotations

import tempfile

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, FileBodyProducer, ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from dynllm.pool import IDLE_TIMEOUT, BackendPool, IRewindableBodyProducer, canResend
from dynllm.proxy import BytesProducer, FileProducer

URL = b"http://127.0.0.1:8000/v1/chat/completions"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\nok"


class FakeEndpoint:
    """
    Connects in memory: each C{connect} builds the protocol and waits for
    L{accept} to give it a L{StringTransport} (a real connection is never
    made within the call either).

    @ivar pending: Connections asked for and not yet accepted.
    @ivar transports: The transports of accepted connections, in order.
    @ivar cancelled: How many connection attempts were cancelled.
    """

    def __init__(self):
        self.pending = []
        self.transports = []
        self.cancelled = 0

    def connect(self, factory):
        def cancel(d):
            self.cancelled += 1

        d = defer.Deferred(cancel)
        self.pending.append((d, factory.buildProtocol(None)))
        return d

    def accept(self, transport=None):
        """
        Accept the oldest pending connection.

        @param transport: Its transport, a new L{StringTransport} by default.
        @return: its protocol and transport.
        """
        d, protocol = self.pending.pop(0)
        if transport is None:
            transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        d.callback(protocol)
        return protocol, transport


class FullTransport(StringTransport):
    """
    A transport whose send buffer is full once it holds 64 KiB: it pauses
    its producer then, as a TCP transport does when the peer reads slowly.
    """

    def write(self, data):
        super().write(data)
        if len(self.value()) >= 65536 and self.producer is not None:
            self.producer.pauseProducing()


@implementer(IAgentEndpointFactory)
class OneEndpoint:
    """
    Gives the agent the same L{FakeEndpoint} for every URL.
    """

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def endpointForURI(self, uri):
        return self.endpoint


class PoolTestCase(SynchronousTestCase):
    """
    An agent on a L{BackendPool}, a fake clock and an in-memory endpoint.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.pool = BackendPool(self.clock)
        self.endpoint = FakeEndpoint()
        self.agent = Agent.usingEndpointFactory(self.clock, OneEndpoint(self.endpoint), pool=self.pool)

    def post(self, body=b'{"model":"m"}'):
        """
        @return: the Deferred response of a POST with C{body} (bytes, or a
            body producer).
        """
        producer = BytesProducer(body) if isinstance(body, bytes) else body
        return self.agent.request(b"POST", URL, Headers({b"Content-Type": [b"application/json"]}), producer)

    def completeOne(self):
        """
        Send one POST on a new connection and answer it, so that the
        connection goes back to the pool.

        @return: the connection's protocol and transport.
        """
        d = self.post()
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(RESPONSE)
        self.assertEqual(self.successResultOf(readBody(self.successResultOf(d))), b"ok")
        self.assertEqual(self.pool.idleConnections(), 1)
        transport.clear()
        return protocol, transport


class ResendTests(PoolTestCase):
    """
    A request lost by a reused connection before any response byte is sent
    once more on a new connection; no other failure is resent.
    """

    def test_reusedClosedBeforeResponse(self):
        """
        A POST sent on a reused connection that the backend closes before
        any response byte goes out again, with the same bytes, on a new
        connection, and its response reaches the caller.
        """
        protocol, transport = self.completeOne()
        d = self.post(b'{"model":"m","n":2}')
        sent = transport.value()
        self.assertIn(b'{"model":"m","n":2}', sent)
        self.assertEqual(self.endpoint.pending, [])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(d)
        newProtocol, newTransport = self.endpoint.accept()
        self.assertEqual(newTransport.value(), sent)
        newProtocol.dataReceived(RESPONSE)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_reusedFailsWhileSendingFileBody(self):
        """
        A request whose reused connection fails while its body, a spooled
        file, is being written is sent again from the file's first byte on
        a new connection; the file stays open.
        """
        body = b"a" * 65536 + b"b" * 65536 + b"c" * 100
        spooled = tempfile.TemporaryFile()
        self.addCleanup(spooled.close)
        spooled.write(body)
        self.post()
        protocol, transport = self.endpoint.accept(FullTransport())
        protocol.dataReceived(RESPONSE)
        transport.clear()
        d = self.post(FileProducer(spooled, self.clock))
        self.clock.advance(0)
        sent = transport.value().partition(b"\r\n\r\n")[2]
        self.assertEqual(len(sent), 65536)
        protocol.connectionLost(Failure(ConnectionLost()))
        newProtocol, newTransport = self.endpoint.accept()
        self.clock.advance(0)
        resent = newTransport.value().partition(b"\r\n\r\n")[2]
        self.assertEqual((len(resent), resent == body), (len(body), True))
        self.assertFalse(spooled.closed)
        newProtocol.dataReceived(RESPONSE)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_failureAfterFirstResponseByte(self):
        """
        A reused connection that fails after the first byte of a response
        arrived is not resent: the caller gets C{ResponseFailed}.
        """
        protocol, transport = self.completeOne()
        d = self.post()
        protocol.dataReceived(b"HTTP/1.1 2")
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertNotIsInstance(failure.value, ResponseNeverReceived)
        self.assertEqual(self.endpoint.pending, [])

    def test_freshConnectionFails(self):
        """
        A request sent on a new connection that closes before any response
        byte is not resent: the caller gets C{ResponseNeverReceived}.
        """
        d = self.post()
        protocol, _ = self.endpoint.accept()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.endpoint.pending, [])

    def test_resentOnce(self):
        """
        A request resent on a new connection that fails too is not sent a
        third time.
        """
        protocol, _ = self.completeOne()
        d = self.post()
        protocol.connectionLost(Failure(ConnectionDone()))
        newProtocol, _ = self.endpoint.accept()
        newProtocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.endpoint.pending, [])

    def test_cancelled(self):
        """
        A request cancelled by its caller (a client that went away) while
        it waits for a response on a reused connection is not resent.
        """
        protocol, transport = self.completeOne()
        d = self.post()
        d.cancel()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(defer.CancelledError))
        self.assertEqual(self.endpoint.pending, [])

    def test_cancelledWhileReconnecting(self):
        """
        Cancelling a request that waits for the new connection of its resend
        cancels that connection attempt.
        """
        protocol, _ = self.completeOne()
        d = self.post()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.endpoint.pending), 1)
        d.cancel()
        self.assertEqual(self.endpoint.cancelled, 1)
        self.failureResultOf(d, defer.CancelledError)

    def test_bodyThatCannotRestart(self):
        """
        A request whose body producer cannot start again (Twisted's
        C{FileBodyProducer} closes its file) is not resent.
        """
        protocol, _ = self.completeOne()
        spooled = tempfile.TemporaryFile()
        self.addCleanup(spooled.close)
        spooled.write(b"{}")
        spooled.seek(0)
        self.assertFalse(canResend(FileBodyProducer(spooled)))
        d = self.post(FileBodyProducer(spooled, cooperator=FakeCooperator()))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d)
        self.assertEqual(self.endpoint.pending, [])

    def test_rewindableBodies(self):
        """
        dynllm's two body producers declare that they can start again.
        """
        self.assertTrue(IRewindableBodyProducer.providedBy(BytesProducer(b"x")))
        self.assertTrue(IRewindableBodyProducer.providedBy(FileProducer(tempfile.TemporaryFile(), self.clock)))
        self.assertTrue(canResend(None))


class FakeCooperator:
    """
    A cooperator whose tasks never run (the body stays unsent).
    """

    def cooperate(self, iterator):
        return FakeTask()


class FakeTask:
    def whenDone(self):
        return defer.Deferred()

    def stop(self):
        pass

    def pause(self):
        pass

    def resume(self):
        pass


class IdleTests(PoolTestCase):
    """
    How long idle connections live, and which one serves a request.
    """

    def test_idleConnectionExpires(self):
        """
        A connection idle for L{IDLE_TIMEOUT} seconds (less than the
        backends' 5 s keep-alive) is closed and dropped from the pool; the
        next request opens a new one.
        """
        self.assertLess(IDLE_TIMEOUT, 5)
        _, transport = self.completeOne()
        self.clock.advance(IDLE_TIMEOUT - 0.01)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.pool.idleConnections(), 1)
        self.clock.advance(0.01)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.idleConnections(), 0)
        self.post()
        self.assertEqual(len(self.endpoint.pending), 1)

    def test_reuseRestartsNothing(self):
        """
        A connection taken from the pool loses its expiry: a request that
        lasts longer than L{IDLE_TIMEOUT} is not cut.
        """
        _, transport = self.completeOne()
        d = self.post()
        self.clock.advance(IDLE_TIMEOUT * 3)
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(d)

    def test_mostRecentFirst(self):
        """
        Of two idle connections, the one used last serves the next request
        (the other ages out).
        """
        first, second = self.post(), self.post()
        protocols = [self.endpoint.accept(), self.endpoint.accept()]
        protocols[1][0].dataReceived(RESPONSE)
        self.clock.advance(1)
        protocols[0][0].dataReceived(RESPONSE)
        self.successResultOf(first)
        self.successResultOf(second)
        for _, transport in protocols:
            transport.clear()
        self.post()
        self.assertIn(b"POST", protocols[0][1].value())
        self.assertEqual(protocols[1][1].value(), b"")

    def test_closedWhileIdle(self):
        """
        A pooled connection that the backend closed is skipped.
        """
        protocol, transport = self.completeOne()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.post()
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.endpoint.pending), 1)

    def test_closeCachedConnections(self):
        """
        C{closeCachedConnections} closes every idle connection, leaves no
        timer behind, and fires once they are closed.
        """
        protocol, transport = self.completeOne()
        d = self.pool.closeCachedConnections()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNoResult(d)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertEqual(self.pool.idleConnections(), 0)

    def test_quiet(self):
        """
        Opening and closing backend connections logs nothing (Twisted logs a
        line per factory of a noisy one).
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.completeOne()
        self.clock.advance(IDLE_TIMEOUT)
        self.assertEqual(list(events), [])
