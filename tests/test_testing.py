"""
Tests for L{dynllm.testing}: each fake provides the interface it stands in
for, behaves as its documentation says, and serves the uses it is shipped
for (a program that embeds dynllm, tested without processes).
"""

from __future__ import annotations

import json
import os
from typing import Any

from attrs import astuple
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource
from twisted.web.server import Request
from zope.interface.verify import verifyObject

from dynllm import store
from dynllm.config import Config, parseConfig
from dynllm.exceptions import LoadFailed, ModelBusy, NoCapacity, UnknownModel
from dynllm.interfaces import IBackend, IModelManager, IStateStore
from dynllm.lease import Lease, ModelCounters, RequestOptions
from dynllm.routes import DynLLMRoutes
from dynllm.scheduler import ModelManager
from dynllm.testing import (
    FakeBackend,
    FakeProcessReactor,
    MemoryStateStore,
    StubManager,
)


def makeConfig(case: SynchronousTestCase, *models: dict[str, Any]) -> Config:
    """
    @param models: Model mappings of the configuration; each gets an empty
        model file, and the C{llamacpp} backend unless it names another.
    @return: a configuration of C{models} with a 1000 MB budget.
    """
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    raws = []
    for model in models:
        model = {"backend": "llamacpp", "path": model["name"] + ".gguf", **model}
        open(os.path.join(directory, model["path"]), "w").close()
        raws.append(model)
    return parseConfig(
        {"enabled_backends": ["llamacpp"], "total_vram_mb": 1000, "models": raws},
        directory,
        which=lambda name: "/bin/true",
    )


class RecordingProtocol(ProcessProtocol):
    """
    Records what a process protocol is told.

    @ivar events: C{(name, value)} of each call, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.events.append(("data", (childFD, data)))

    def processExited(self, reason: Failure) -> None:
        self.events.append(("exited", reason.value))

    def processEnded(self, reason: Failure) -> None:
        self.events.append(("ended", reason.value))


class InterfaceTests(SynchronousTestCase):
    """
    Each fake provides the interface of what it stands in for.
    """

    def test_reactor(self) -> None:
        """
        L{FakeProcessReactor} provides L{IReactorProcess} and
        L{IReactorTime}.
        """
        reactor = FakeProcessReactor()
        self.assertTrue(verifyObject(IReactorProcess, reactor))
        self.assertTrue(verifyObject(IReactorTime, reactor))

    def test_transport(self) -> None:
        """
        The transport of a spawned process provides L{IProcessTransport}.
        """
        transport = FakeProcessReactor().spawnProcess(RecordingProtocol(), "server", ["server"])
        self.assertTrue(verifyObject(IProcessTransport, transport))

    def test_backend(self) -> None:
        """
        L{FakeBackend} provides L{IBackend}.
        """
        self.assertTrue(verifyObject(IBackend, FakeBackend()))

    def test_memoryStateStore(self) -> None:
        """
        L{dynllm.testing.MemoryStateStore} is the memory store of
        L{dynllm.store}, which provides L{IStateStore}.
        """
        self.assertIs(MemoryStateStore, store.MemoryStateStore)
        self.assertTrue(verifyObject(IStateStore, MemoryStateStore()))

    def test_stubManager(self) -> None:
        """
        L{StubManager} provides L{IModelManager}.
        """
        config = makeConfig(self, {"name": "chat", "vram_mb": 1})
        self.assertTrue(verifyObject(IModelManager, StubManager(config)))


class FakeProcessReactorTests(SynchronousTestCase):
    """
    L{FakeProcessReactor} spawns processes that the test drives.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.protocol = RecordingProtocol()

    def test_spawnConnects(self) -> None:
        """
        A spawn connects the protocol to a new transport that records the
        command line and environment, with a fresh pid each time, and is
        kept in C{spawned}.
        """
        first = self.reactor.spawnProcess(self.protocol, "server", ["server", "m", "1"], env={"A": "1"})
        second = self.reactor.spawnProcess(RecordingProtocol(), "server", ["server", "n", "2"])
        self.assertIs(self.protocol.transport, first)
        self.assertEqual((first.executable, first.args, first.env), ("server", ["server", "m", "1"], {"A": "1"}))
        self.assertNotEqual(first.pid, second.pid)
        self.assertEqual(self.reactor.spawned, [first, second])

    def test_spawnErrors(self) -> None:
        """
        C{spawnErrorFor} fails the spawns whose second argument it names;
        C{spawnError} fails every spawn. Neither spawns anything.
        """
        self.reactor.spawnErrorFor["m"] = OSError("no such file")
        self.assertRaises(OSError, self.reactor.spawnProcess, self.protocol, "server", ["server", "m"])
        self.reactor.spawnProcess(self.protocol, "server", ["server", "n"])
        self.reactor.spawnError = OSError("too many processes")
        self.assertRaises(OSError, self.reactor.spawnProcess, self.protocol, "server", ["server", "n"])
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_outputAndExit(self) -> None:
        """
        The test makes the process print and exit: the protocol gets the
        data, then C{processExited} and C{processEnded} with the reason, and
        the pid is gone.
        """
        transport = self.reactor.spawnProcess(self.protocol, "server", ["server"])
        transport.output(b"READY\n")
        reason = ProcessTerminated(signal=15)
        transport.exit(reason)
        self.assertEqual(
            self.protocol.events, [("data", (2, b"READY\n")), ("exited", reason), ("ended", reason)]
        )
        self.assertIsNone(transport.pid)

    def test_signals(self) -> None:
        """
        Signals are recorded in order until the process exits; after that,
        signalling it raises L{ProcessExitedAlready} as a real transport
        does.
        """
        transport = self.reactor.spawnProcess(self.protocol, "server", ["server"])
        transport.signalProcess("TERM")
        transport.signalProcess("KILL")
        transport.exit()
        self.assertRaises(ProcessExitedAlready, transport.signalProcess, "KILL")
        self.assertEqual(transport.signals, ["TERM", "KILL"])


class FakeBackendTests(SynchronousTestCase):
    """
    L{FakeBackend} answers probes as the test says.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeBackend(self.clock)
        self.model = makeConfig(self, {"name": "m", "vram_mb": 1}).models[0]

    def test_ready(self) -> None:
        """
        A probe answers whether the model is in C{ready}, and is recorded
        with the time it was sent.
        """
        self.assertFalse(self.successResultOf(self.backend.probe(None, "http://x", self.model)))
        self.clock.advance(2)
        self.backend.ready.add("m")
        self.assertTrue(self.successResultOf(self.backend.probe(None, "http://x", self.model)))
        self.assertEqual(self.backend.probes, [("m", 0), ("m", 2)])

    def test_manual(self) -> None:
        """
        With C{manual} set, a probe's answer is the test's to give.
        """
        self.backend.manual = True
        probe = self.backend.probe(None, "http://x", self.model)
        self.assertNoResult(probe)
        self.backend.pendingProbes[0].callback(True)
        self.assertTrue(self.successResultOf(probe))


class StubManagerTests(SynchronousTestCase):
    """
    L{StubManager} loads, leases, unloads and fails as its documentation
    says.
    """

    def setUp(self) -> None:
        self.config = makeConfig(self, {"name": "a", "vram_mb": 300}, {"name": "b", "vram_mb": 500, "aliases": ["bee"]})
        self.manager = StubManager(self.config)

    def test_acquireLoads(self) -> None:
        """
        L{StubManager.acquire} of a model that is not loaded loads it at
        once, counts the load, records the request's options, and leases it
        at C{baseURL} with C{apiKey}.
        """
        options = RequestOptions(priority=3)
        lease = self.successResultOf(self.manager.acquire("a", options))
        self.assertEqual((lease.model.name, lease.baseURL), ("a", "http://backend"))
        self.assertEqual(lease.upstreamHeaders, {"Authorization": "Bearer backend-key"})
        self.assertEqual(self.manager.describe("a")["status"], "loaded")
        self.assertEqual(self.manager.counters("a"), ModelCounters(loads=1))
        self.assertEqual((self.manager.leases, self.manager.options), ([lease], [("a", options)]))

    def test_activeRequests(self) -> None:
        """
        A lease counts as a request in flight until released.
        """
        lease = self.successResultOf(self.manager.acquire("a"))
        self.assertEqual(self.manager.describe("a")["active_requests"], 1)
        lease.release()
        lease.release()
        self.assertEqual(self.manager.describe("a")["active_requests"], 0)
        self.assertEqual(self.manager.released, 1)

    def test_unknownModel(self) -> None:
        """
        A name that is not a configured model's (an alias included) fails
        with L{UnknownModel}: the Deferreds of C{acquire}, C{load} and
        C{unload}, and the other methods by raising.
        """
        for call in (self.manager.acquire, self.manager.load, self.manager.unload):
            self.assertEqual(self.failureResultOf(call("bee"), UnknownModel).value.name, "bee")
        for method in (self.manager.peek, self.manager.describe, self.manager.counters, self.manager.backendOf):
            self.assertRaises(UnknownModel, method, "nope")
        self.assertRaises(UnknownModel, self.manager.logTail, "nope", 1)

    def test_failures(self) -> None:
        """
        C{failure} fails every C{acquire} and C{load}; C{failures} those of
        one model. The model's state does not change.
        """
        error = NoCapacity("a", 300, 0, 1000, 5.0, ("b",), retryAfter=3)
        self.manager.failures["a"] = error
        self.assertIs(self.failureResultOf(self.manager.acquire("a")).value, error)
        self.assertIs(self.failureResultOf(self.manager.load("a")).value, error)
        self.successResultOf(self.manager.acquire("b")).release()
        self.manager.failure = LoadFailed("b", "it broke")
        self.assertIsInstance(self.failureResultOf(self.manager.acquire("b")).value, LoadFailed)
        self.assertEqual(self.manager.describe("a")["status"], "unloaded")

    def test_heldLoad(self) -> None:
        """
        With C{holdLoads}, a load leaves the model C{loading} (its memory in
        use, its requests waiting) until L{StubManager.finishLoad}, which
        gives the waiting requests their leases.
        """
        self.manager.holdLoads = True
        first, second = self.manager.acquire("a"), self.manager.acquire("a")
        self.assertNoResult(first)
        state = self.manager.describe("a")
        self.assertEqual((state["status"], state["waiting_requests"]), ("loading", 2))
        self.assertEqual(self.manager.memoryInUse(), 300)
        self.manager.finishLoad("a")
        self.assertIsInstance(self.successResultOf(first), Lease)
        self.assertIsInstance(self.successResultOf(second), Lease)
        self.assertEqual(self.manager.describe("a")["waiting_requests"], 0)

    def test_heldLoadFails(self) -> None:
        """
        L{StubManager.failLoad} fails the requests waiting for the load with
        the error, and leaves the model C{failed} with the error as its
        C{last_error}, counted as a failed load.
        """
        self.manager.holdLoads = True
        waiting = self.manager.load("a")
        error = LoadFailed("a", "exited with code 1")
        self.manager.failLoad("a", error)
        self.assertIs(self.failureResultOf(waiting).value, error)
        state = self.manager.describe("a")
        self.assertEqual((state["status"], state["last_error"]), ("failed", "exited with code 1"))
        self.assertEqual(self.manager.counters("a").loadFailures, 1)

    def test_cancelWithdraws(self) -> None:
        """
        Cancelling a request waiting for a load withdraws it.
        """
        self.manager.holdLoads = True
        waiting = self.manager.acquire("a")
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(self.manager.describe("a")["waiting_requests"], 0)

    def test_unload(self) -> None:
        """
        L{StubManager.unload} of a loaded model makes it C{unloaded}, frees
        its memory and counts an unload of cause C{request}.
        """
        self.successResultOf(self.manager.load("a"))
        self.assertEqual(self.manager.memoryInUse(), 300)
        self.successResultOf(self.manager.unload("a"))
        self.assertEqual(self.manager.describe("a")["status"], "unloaded")
        self.assertEqual(self.manager.memoryInUse(), 0)
        self.assertEqual(self.manager.counters("a").unloads, {"request": 1})
        self.assertEqual(self.manager.unloaded, ["a"])

    def test_unloadNotLoaded(self) -> None:
        """
        An unload of a model with no backend (unloaded or failed) succeeds
        and changes nothing.
        """
        self.manager.states["b"] = "failed"
        for name in ("a", "b"):
            self.successResultOf(self.manager.unload(name))
        self.assertEqual([m["status"] for m in self.manager.models()], ["unloaded", "failed"])
        self.assertEqual(self.manager.unloaded, [])

    def test_unloadBusy(self) -> None:
        """
        An unload of a model with leases out, or loading, fails with
        L{ModelBusy}; C{unloadFailure} fails every unload.
        """
        lease = self.successResultOf(self.manager.acquire("a"))
        self.assertEqual(astuple(self.failureResultOf(self.manager.unload("a"), ModelBusy).value), ("a", 1, False))
        lease.release()
        self.manager.states["b"] = "loading"
        self.assertEqual(astuple(self.failureResultOf(self.manager.unload("b"), ModelBusy).value), ("b", 0, True))
        self.manager.unloadFailure = ModelBusy("a", activeRequests=2)
        self.assertIs(self.failureResultOf(self.manager.unload("a")).value, self.manager.unloadFailure)

    def test_peek(self) -> None:
        """
        L{StubManager.peek} leases a loaded model without counting a use
        (no entry in C{leases}, C{last_used_at} unchanged), and gives
        C{None} for a model that is not loaded.
        """
        self.assertIsNone(self.manager.peek("a"))
        self.manager.states["a"] = "loaded"
        lease = self.manager.peek("a")
        assert lease is not None
        lease.release()
        self.assertEqual((self.manager.leases, self.manager.released, self.manager.peeks), ([], 1, 2))
        self.assertIsNone(self.manager.describe("a")["last_used_at"])

    def test_whenStarted(self) -> None:
        """
        L{StubManager.whenStarted} fires once C{started} is set.
        """
        manager = StubManager(self.config, started=False)
        waiting = manager.whenStarted()
        self.assertNoResult(waiting)
        manager.started = True
        self.successResultOf(waiting)
        self.successResultOf(manager.whenStarted())

    def test_describe(self) -> None:
        """
        L{StubManager.models} describes every model in configuration order,
        with the fields of the real manager; times come from C{clock}.
        """
        clock = Clock()
        manager = StubManager(self.config, clock=clock)
        clock.advance(7)
        manager.load("a")
        self.assertEqual(
            manager.models()[0],
            {"name": "a", "status": "loaded", "backend": "llamacpp", "model_type": "llm", "vram_mb": 300,
             "pid": None, "port": None, "loaded_at": 7, "last_used_at": None, "active_requests": 0,
             "waiting_requests": 0, "last_error": None, "load_seconds": None, "loading_seconds": None},
        )
        self.assertEqual([m["name"] for m in manager.models()], ["a", "b"])

    def test_logTail(self) -> None:
        """
        L{StubManager.logTail} gives the last lines of C{logs}.
        """
        self.manager.logs["a"] = ["one", "two", "three"]
        self.assertEqual(self.manager.logTail("a", 2), ["two", "three"])
        self.assertEqual(self.manager.logTail("a", 0), [])
        self.assertEqual(self.manager.logTail("b", 5), [])

    def test_backendFor(self) -> None:
        """
        Leases and L{StubManager.backendOf} give the backend C{backendFor}
        returns for the model's kind.
        """
        backend = FakeBackend()
        manager = StubManager(self.config, backendFor=lambda kind: backend)
        self.assertIs(manager.backendOf("a"), backend)
        self.assertIs(self.successResultOf(manager.acquire("a")).backend, backend)


class ChatBackend(resource.Resource):
    """
    A backend that answers every chat request with the same completion.

    @ivar paths: The path of every request, in order.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[bytes] = []

    def render_POST(self, request: Request) -> bytes:
        self.paths.append(request.path)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}).encode()


class EmbeddingTests(SynchronousTestCase):
    """
    What a program that embeds dynllm can test with these fakes, without
    processes or sockets.
    """

    def test_routesInMemory(self) -> None:
        """
        The routes, given a L{StubManager}, serve a chat request in memory
        through C{treq.testing.StubTreq}: it is relayed to the backend
        resource, and its lease is taken and given back.
        """
        config = makeConfig(self, {"name": "chat", "vram_mb": 1})
        manager = StubManager(config)
        backend = ChatBackend()
        agent = RequestTraversalAgent(backend)
        routes = DynLLMRoutes(config=config, manager=manager, agent=agent, clock=Clock())
        client = StubTreq(routes.resource())
        answer = client.post(
            "http://dynllm/v1/chat/completions", json={"model": "chat", "messages": []}
        ).addCallback(client.json_content)
        for _ in range(10):
            client.flush()
            agent.flush()
        self.assertEqual(self.successResultOf(answer)["choices"][0]["message"]["content"], "hi")
        self.assertEqual(backend.paths, [b"/v1/chat/completions"])
        self.assertEqual((len(manager.leases), manager.released), (1, 1))

    def test_managerWithoutProcesses(self) -> None:
        """
        The real manager runs on a L{FakeProcessReactor} with a
        L{FakeBackend} and a L{MemoryStateStore}: a lease comes once the
        fake process is ready, and the store records the model as loaded.
        """
        config = makeConfig(self, {"name": "chat", "vram_mb": 100})
        reactor = FakeProcessReactor()
        backend = FakeBackend(reactor)
        states = MemoryStateStore()
        manager = ModelManager(
            config=config, reactor=reactor, http=None, store=states, newSession=False,
            backendFor=lambda kind: backend,
        )
        manager.startService()
        leased = manager.acquire("chat")
        (process,) = reactor.spawned
        self.assertEqual(process.args[1], "chat")
        backend.ready.add("chat")
        reactor.advance(1)
        self.successResultOf(leased).release()
        self.assertEqual(states.saved["chat"]["status"], "loaded")
