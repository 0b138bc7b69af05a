"""
Loading feedback, in memory: the routes served by a C{Site} on a
C{StringTransport} and a fake clock, with a stub scheduler whose leases the
test hands out when it likes and a fake backend agent whose answers the test
writes by hand, so that every byte the client gets can be read.
"""

from __future__ import annotations

import json
import os
import re

from attrs import define, field
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server

from dynllm import errors, feedback
from dynllm.backends import backendFor
from dynllm.config import parseConfig
from dynllm.exceptions import LoadFailed, NoCapacity
from dynllm.lease import Lease
from dynllm.proxy import BackendStatus
from dynllm.routes import DynLLMRoutes
from tests.support import FakeResponse

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
MESSAGES = {"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "stream": True}


@define
class SlowManager:
    """
    Stands in for the scheduler: C{acquire} answers at once with a lease
    when C{ready}, else with a Deferred the test fires (C{pending}); a
    cancelled one is counted in C{cancelled}.
    """

    config: object
    ready: bool = False
    failure: Exception | None = None
    started: bool = True
    pending: list = field(factory=list)
    cancelled: int = 0
    released: int = 0

    def lease(self, name="chat"):
        """
        @return: a lease on C{name} at C{http://backend}, with a key.
        """
        model = self.config.model(name)
        return Lease(model, backendFor(model.backend), "http://backend", self._release, apiKey="backend-key")

    def _release(self, lease):
        self.released += 1

    def _cancel(self, d):
        self.cancelled += 1

    def acquire(self, name, options=None):
        if self.failure is not None:
            return defer.fail(self.failure)
        if self.ready:
            return defer.succeed(self.lease(name))
        d = defer.Deferred(self._cancel)
        self.pending.append(d)
        return d

    def backendOf(self, name):
        return backendFor(self.config.model(name).backend)


class FakeAgent:
    """
    Records requests to backends; each answer is a Deferred in C{answers}.
    """

    def __init__(self):
        self.requests = []
        self.answers = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests.append((method, uri, headers))
        d = defer.Deferred()
        self.answers.append(d)
        return d


def split(raw):
    """
    @return: C{(head, [chunk, ...])} of a chunked HTTP/1.1 response; the
        last chunk, empty, is there only if the response is complete.
    """
    head, _, rest = raw.partition(b"\r\n\r\n")
    chunks = []
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        chunks.append(rest[:n])
        rest = rest[n + 2 :]
    return head, chunks


class LoadingFeedbackTests(SynchronousTestCase):
    """
    A streamed request whose model is not ready gets its SSE headers at
    once, a comment a second while it waits, then the backend's body, or an
    error event in its API's shape.
    """

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        open(os.path.join(directory, "chat.gguf"), "w").close()
        open(os.path.join(directory, "embed.gguf"), "w").close()
        raw = {
            "enabled_backends": ["llamacpp"],
            "models": [
                {"name": "chat", "path": "chat.gguf", "backend": "llamacpp", "vram_mb": 1},
                {"name": "embed", "path": "embed.gguf", "backend": "llamacpp", "vram_mb": 1, "model_type": "embedding"},
            ],
        }
        self.config = parseConfig(raw, directory, which=lambda name: "/bin/true")
        self.manager = SlowManager(self.config)
        self.clock = MemoryReactorClock()
        self.agent = FakeAgent()
        routes = DynLLMRoutes(config=self.config, manager=self.manager, agent=self.agent, clock=self.clock)
        self.site = server.Site(routes.resource(), reactor=self.clock, timeout=None)
        self.transport = StringTransport()

    def send(self, body=CHAT, path=b"/v1/chat/completions"):
        """
        Send a request to the routes.
        """
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        data = json.dumps(body).encode()
        self.channel.dataReceived(
            b"POST %s HTTP/1.1\r\nHost: dynllm\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path, len(data), data)
        )

    def lease(self):
        """
        Hand the pending request its lease.
        """
        (d,) = self.manager.pending
        d.callback(self.manager.lease())

    def answer(self, code, headers):
        """
        Give the backend's status and headers.

        @return: the L{FakeResponse}, to write its body with.
        """
        response = FakeResponse(code, headers)
        self.agent.answers[-1].callback(response)
        return response

    def chunks(self):
        """
        @return: the body chunks written so far.
        """
        return split(self.transport.value())[1]

    def events(self):
        """
        @return: the body written so far, without its framing.
        """
        return b"".join(self.chunks())

    def test_headersAtOnce(self):
        """
        A streamed request whose lease is not there gets status 200 and
        the SSE headers (C{Content-Type: text/event-stream},
        C{Cache-Control: no-cache}) at once, and no body yet.
        """
        self.send()
        head, chunks = split(self.transport.value())
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertIn(b"\r\nContent-Type: text/event-stream", head)
        self.assertIn(b"\r\nCache-Control: no-cache", head)
        self.assertIn(b"\r\nX-Accel-Buffering: no", head)
        self.assertEqual(chunks, [])
        self.assertEqual(self.agent.requests, [])

    def test_commentEachSecond(self):
        """
        While it waits, the client gets C{: dynllm: loading MODEL, N s}
        each second, N being the whole seconds waited.
        """
        self.send()
        self.clock.advance(0.5)
        self.assertEqual(self.chunks(), [])
        for _ in range(3):
            self.clock.advance(1)
        self.assertEqual(
            self.chunks(),
            [b": dynllm: loading chat, 1 s\n\n", b": dynllm: loading chat, 2 s\n\n", b": dynllm: loading chat, 3 s\n\n"],
        )

    def test_relayAfterLease(self):
        """
        Once the lease arrives, the request goes to the backend with its
        key, the backend's body follows the comments in the same response
        (the backend's own status line and headers are not sent again),
        the comments stop, and the lease is released when the body ends.
        """
        self.send()
        self.clock.advance(1)
        self.lease()
        ((method, url, sent),) = self.agent.requests
        self.assertEqual((method, url), (b"POST", b"http://backend/v1/chat/completions"))
        self.assertEqual(sent.getRawHeaders(b"authorization"), [b"Bearer backend-key"])
        response = self.answer(200, {b"Content-Type": [b"text/event-stream"], b"X-Backend": [b"1"]})
        response.body.dataReceived(b'data: {"choices": []}\n\n')
        self.clock.advance(0)
        self.clock.advance(5)
        self.assertEqual(self.manager.released, 0)
        response.finish(b"data: [DONE]\n\n")
        head, chunks = split(self.transport.value())
        self.assertNotIn(b"X-Backend", head)
        self.assertEqual(head.count(b"HTTP/1.1"), 1)
        self.assertEqual(
            chunks,
            [b": dynllm: loading chat, 1 s\n\n", b'data: {"choices": []}\n\n', b"data: [DONE]\n\n", b""],
        )
        self.assertEqual(self.manager.released, 1)

    def test_commentsUntilBackendAnswers(self):
        """
        The comments go on after the lease has arrived, while the backend
        has not answered yet (a llama-server sends its headers with the
        first token, after the prompt), and stop once its answer begins,
        so that none falls between its frames.
        """
        self.send()
        self.clock.advance(1)
        self.lease()
        self.clock.advance(1)
        response = self.answer(200, {b"Content-Type": [b"text/event-stream"]})
        self.clock.advance(3)
        response.finish(b"data: [DONE]\n\n")
        _, chunks = split(self.transport.value())
        self.assertEqual(
            chunks, [b": dynllm: loading chat, 1 s\n\n", b": dynllm: loading chat, 2 s\n\n", b"data: [DONE]\n\n", b""]
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_notAStreamingEndpoint(self):
        """
        C{"stream": true} on an endpoint that never streams (embeddings)
        gets no SSE headers or comments while its model loads: its answer
        is the backend's own, as when the model is loaded.
        """
        self.send({"model": "embed", "input": "hi", "stream": True}, b"/v1/embeddings")
        self.clock.advance(3)
        self.assertEqual(self.transport.value(), b"")
        (d,) = self.manager.pending
        d.callback(self.manager.lease("embed"))
        response = self.answer(200, {b"Content-Type": [b"application/json"]})
        response.finish(b'{"data": []}')
        head, chunks = split(self.transport.value())
        self.assertIn(b"application/json", head)
        self.assertNotIn(b"dynllm: loading", self.transport.value())

    def test_failedAcquireOpenAI(self):
        """
        A load that fails ends an OpenAI stream with C{data: {"error":
        {...}}}, the OpenAI envelope's error object (the scheduler's
        exception mapped by L{errors.fromScheduler}), and the response
        ends.
        """
        self.send()
        self.clock.advance(1)
        self.clock.advance(1)
        self.manager.pending[0].errback(LoadFailed("chat", "the backend exited with code 1 while loading"))
        chunks = self.chunks()
        self.assertEqual(chunks[:2], [b": dynllm: loading chat, 1 s\n\n", b": dynllm: loading chat, 2 s\n\n"])
        self.assertEqual(chunks[-1], b"")
        event = chunks[2]
        self.assertTrue(event.startswith(b"data: ") and event.endswith(b"\n\n"), event)
        self.assertEqual(
            json.loads(event[len(b"data: ") :]),
            {"error": {"message": "the backend exited with code 1 while loading; its backend's output is at"
                                  " /admin/models/chat/logs and in dynllm's log", "type": "server_error",
                       "param": None, "code": "backend_error"}},
        )
        self.clock.advance(5)
        self.assertEqual(len(self.chunks()), 4)

    def test_failedAcquireAPIError(self):
        """
        A scheduler that still fails with an L{errors.APIError} (504 here)
        gets the same event, from that error.
        """
        self.send()
        self.manager.pending[0].errback(errors.loadTimedOut("too slow"))
        event, end = self.chunks()
        self.assertEqual(
            json.loads(event[len(b"data: ") :]),
            {"error": {"message": "too slow", "type": "server_error", "param": None, "code": "load_timeout"}},
        )
        self.assertEqual(end, b"")

    def test_failedAcquireAnthropic(self):
        """
        On C{/v1/messages}, a failed load ends the stream with Anthropic's
        error event: C{event: error} and C{{"type": "error", "error":
        {...}}}, its type from the status (503: C{overloaded_error}).
        """
        self.send(MESSAGES, b"/v1/messages")
        self.manager.pending[0].errback(NoCapacity("chat", 1, 0, 1, 5.0, ("other",), 3))
        event, end = self.chunks()
        self.assertTrue(event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n"), event)
        self.assertEqual(
            json.loads(event[len(b"event: error\ndata: ") :]),
            {"type": "error", "error": {"type": "overloaded_error", "message": str(
                NoCapacity("chat", 1, 0, 1, 5.0, ("other",), 3))}},
        )
        self.assertEqual(end, b"")

    def test_backendErrorStatus(self):
        """
        A backend that answers an error status after the headers were sent
        ends the stream with one event holding its error object as it
        sent it; the lease is released.
        """
        self.send()
        self.lease()
        response = self.answer(400, {b"Content-Type": [b"application/json"]})
        error = {"code": 400, "message": "the prompt is too long", "type": "exceed_context_size_error"}
        response.finish(json.dumps({"error": error}).encode())
        event, end = self.chunks()
        self.assertEqual(event, b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
        self.assertEqual(end, b"")
        self.assertEqual(self.manager.released, 1)

    def test_backendErrorStatusAnthropic(self):
        """
        On C{/v1/messages}, a backend's error answer ends the stream with
        Anthropic's error event carrying the backend's message.
        """
        self.send(MESSAGES, b"/v1/messages")
        self.lease()
        response = self.answer(400, {b"Content-Type": [b"application/json"]})
        response.finish(b'{"error": {"code": 400, "message": "bad request", "type": "invalid_request_error"}}')
        event, end = self.chunks()
        self.assertEqual(
            json.loads(event[len(b"event: error\ndata: ") :]),
            {"type": "error", "error": {"type": "invalid_request_error", "message": "bad request"}},
        )

    def test_backendErrorText(self):
        """
        A backend's error answer that is not JSON becomes an error of its
        status whose message is its text.
        """
        self.send()
        self.lease()
        self.answer(503, {b"Content-Type": [b"text/plain"]}).finish(b"Service Unavailable\n")
        event = self.chunks()[0]
        error = json.loads(event[len(b"data: ") :])["error"]
        self.assertEqual((error["message"], error["code"]), ("Service Unavailable", "backend_error"))

    def test_backendUnreachable(self):
        """
        A backend that cannot be reached after the lease ends the stream
        with the relay's 502 as an event.
        """
        self.send()
        self.lease()
        self.agent.answers[0].errback(ConnectionRefusedError())
        event, end = self.chunks()
        self.assertEqual(json.loads(event[len(b"data: ") :])["error"]["code"], "backend_error")
        self.assertEqual(self.manager.released, 1)

    def test_clientGoneCancelsAcquire(self):
        """
        A client that leaves while waiting cancels its acquire (withdrawing
        it from the scheduler) and stops the comments: no timer is left.
        """
        self.send()
        self.clock.advance(1)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.manager.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.agent.requests, [])

    def expectedLoaded(self):
        """
        @return: the bytes, less the C{Date} header, of the response to
            L{CHAT} when the backend answers at once with an SSE stream of
            one frame: the backend's status line and headers, as the relay
            has always sent them.
        """
        return (
            b"HTTP/1.1 200 Whatever\r\n"
            b"Server: " + server.version + b"\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"X-Accel-Buffering: no\r\n"
            b"Cache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"\r\n"
            b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        )

    def withoutDate(self):
        """
        @return: the bytes written, less the C{Date} header.
        """
        return re.sub(rb"Date: [^\r]*\r\n", b"", self.transport.value())

    def test_loadedUnchanged(self):
        """
        A streamed request whose lease comes at once gets the backend's own
        status line and headers, with no comment, as before.
        """
        self.manager.ready = True
        self.send()
        self.clock.advance(3)
        self.assertEqual(self.transport.value(), b"")
        response = self.answer(200, {b"Content-Type": [b"text/event-stream"]})
        response.finish(b"data: [DONE]\n\n")
        self.assertEqual(self.withoutDate(), self.expectedLoaded())

    def test_notStreamedUnchanged(self):
        """
        A request without C{"stream": true} that waits for its model gets
        nothing while it waits, then the backend's status and headers.
        """
        for body in (dict(CHAT, stream=False), {k: v for k, v in CHAT.items() if k != "stream"}):
            self.transport = StringTransport()
            self.manager.pending = []
            self.send(body)
            self.clock.advance(3)
            self.assertEqual(self.transport.value(), b"")
            self.lease()
            response = self.answer(404, {b"Content-Type": [b"application/json"]})
            response.finish(b"{}")
            self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 404 Whatever\r\n"))

    def test_failedAtOnceUnchanged(self):
        """
        A streamed request whose acquire fails at once gets the error status
        and envelope, as before: no stream begins.
        """
        self.manager.failure = LoadFailed("chat", "it broke")
        self.send()
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertIn(b"it broke", body)
        self.assertNotIn(b"event-stream", head)


class EventTests(SynchronousTestCase):
    """
    The bytes of the comments and events.
    """

    def test_commentOneLine(self):
        """
        A model name with line breaks gives a comment of one line.
        """
        self.assertEqual(feedback.loadingComment("a\nb\rc", 4), b": dynllm: loading a b c, 4 s\n\n")

    def test_errorEventShapes(self):
        """
        An error becomes C{data: ENVELOPE} in OpenAI's shape and C{event:
        error} then C{data: ENVELOPE} in Anthropic's.
        """
        error = errors.APIError(502, "it\nbroke", "server_error", "backend_error")
        self.assertEqual(feedback.errorEvent(error), b"data: " + error.body() + b"\n\n")
        anthropic = errors.APIError(502, "it\nbroke", shape=errors.ANTHROPIC)
        self.assertEqual(feedback.errorEvent(anthropic), b"event: error\ndata: " + anthropic.body() + b"\n\n")
        self.assertEqual(feedback.errorEvent(error).count(b"\n"), 2)

    def test_backendErrorRejoined(self):
        """
        A backend's error object spread over several lines is sent on one
        C{data:} line.
        """
        body = json.dumps({"error": {"message": "no", "type": "x"}}, indent=2).encode()
        event = feedback.backendErrorEvent(BackendStatus(400, body), errors.OPENAI)
        self.assertEqual(event, b'data: {"error": {"message": "no", "type": "x"}}\n\n')
