"""
Tests for L{dynllm.scheduler}: loads on demand, the memory budget, eviction,
leases, failures while loading, idle reaping, unloads and shutdown.

No process is really started: L{FakeProcessReactor} hands out fake process
transports whose exit the tests decide, and L{FakeBackend} answers readiness
probes as the tests say.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.trial.unittest import SynchronousTestCase

from dynllm.config import Config, parseConfig
from dynllm.exceptions import LoadFailed, LoadTimedOut, ModelBusy, ModelUnloaded, NoCapacity, ShuttingDown, UnknownModel
from dynllm.runner import FIRST_PROBE_DELAY, MAX_PROBE_DELAY
from dynllm.lifecycle import PORT_RETRIES
from dynllm.lease import RequestOptions
from dynllm.scheduler import Lease, ModelManager
from dynllm.store import MemoryStateStore
from dynllm.testing import FakeBackend, FakeProcessReactor, FakeProcessTransport


class ManagerTestsMixin:
    """
    Builds a L{ModelManager} on a fake reactor, and drives its backends.
    """

    def makeManager(
        self, models: list[dict[str, Any]], start: bool = True, **settings: Any
    ) -> ModelManager:
        """
        Make a manager for C{models} (each a model mapping of the
        configuration; C{path} and C{backend} are filled in).

        @param settings: Top-level configuration settings; the default
            budget is 1000 MB.
        @param start: Whether to start the service.
        """
        self.reactor = FakeProcessReactor()
        self.backend = FakeBackend(self.reactor)
        self.store = MemoryStateStore()
        self.config = self.makeConfig(models, **settings)
        self.manager = ModelManager(
            config=self.config,
            reactor=self.reactor,
            http=None,
            store=self.store,
            newSession=False,
            backendFor=lambda kind: self.backend,
            killTime=5.0,
        )
        if start:
            self.manager.startService()
        return self.manager

    def makeConfig(self, models: list[dict[str, Any]], **settings: Any) -> Config:
        """
        Make a configuration of C{models} and C{settings}; every one a test
        makes shares one directory (so that two of them differ only in what
        they say, as a file read again does).
        """
        directory = getattr(self, "configDirectory", None)
        if directory is None:
            directory = self.configDirectory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
            os.makedirs(directory)
        raws = []
        for model in models:
            model = dict(model)
            path = os.path.join(directory, model["name"] + ".gguf")
            with open(path, "w"):
                pass
            model.setdefault("path", path)
            model.setdefault("backend", "llamacpp")
            raws.append(model)
        raw: dict[str, Any] = {
            "total_vram_mb": 1000,
            "backend": {"port_range_start": 40100, "port_range_end": 40140},
        }
        raw.update(settings)
        raw["models"] = raws
        return parseConfig(raw, baseDir=directory, which=lambda name: "/bin/true")

    def spawnedFor(self, name: str) -> list[FakeProcessTransport]:
        """
        @return: the processes spawned for model C{name}, in order.
        """
        return [t for t in self.reactor.spawned if t.args[1] == name]

    def process(self, name: str) -> FakeProcessTransport:
        """
        @return: the latest process spawned for model C{name}.
        """
        return self.spawnedFor(name)[-1]

    def makeReady(self, name: str) -> None:
        """
        Make model C{name}'s probes answer ready, and let one be sent.
        """
        self.backend.ready.add(name)
        self.reactor.advance(MAX_PROBE_DELAY)

    def status(self, name: str) -> str:
        return self.describe(name)["status"]

    def describe(self, name: str) -> dict[str, Any]:
        [entry] = [m for m in self.manager.models() if m["name"] == name]
        return entry

    def loadedLease(self, name: str) -> Lease:
        """
        Acquire model C{name}, making it ready if it is not loaded yet.

        @return: the lease.
        """
        d = self.manager.acquire(name)
        if not d.called:
            self.makeReady(name)
        return self.successResultOf(d)  # type: ignore[attr-defined,no-any-return]

    def loadIdle(self, name: str) -> None:
        """
        Load model C{name} and leave it idle.
        """
        self.loadedLease(name).release()

    def assertWithinBudget(self) -> None:
        """
        The models loading, loaded or unloading fit the budget.
        """
        self.assertLessEqual(  # type: ignore[attr-defined]
            self.manager.memoryInUse(), self.config.total_vram_mb
        )


class AcquireTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for L{ModelManager.acquire} and L{Lease}.
    """

    def test_unknownModel(self) -> None:
        """
        Acquiring a model the configuration does not declare fails with a
        L{UnknownModel} naming it.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 100}])
        error = self.failureResultOf(manager.acquire("nope"), UnknownModel).value
        self.assertEqual(error.name, "nope")
        self.assertEqual(self.reactor.spawned, [])

    def test_leaseCarriesRunKey(self) -> None:
        """
        A lease carries the API key its model's current run gave the
        backend (as a value and as headers, hidden from its C{repr}), so
        that the relay can send it; a peek carries it too.
        """
        self.makeManager([{"name": "a", "vram_mb": 100}])
        lease = self.loadedLease("a")
        key = self.spawnedFor("a")[-1].env["FAKE_KEY"]
        self.assertEqual(lease.apiKey, key)
        self.assertEqual(lease.upstreamHeaders, {"Authorization": "Bearer " + key})
        self.assertNotIn(key, repr(lease))
        lease.release()
        peeked = self.manager.peek("a")
        assert peeked is not None
        self.assertEqual(peeked.apiKey, key)
        peeked.release()

    def test_leaseWithoutKey(self) -> None:
        """
        A lease on a backend without keys has no key and no headers to add.
        """
        self.makeManager([{"name": "a", "vram_mb": 100}])
        self.backend.keyVariable = None
        lease = self.loadedLease("a")
        self.assertIsNone(lease.apiKey)
        self.assertEqual(lease.upstreamHeaders, {})
        lease.release()

    def test_lookupsOfUnknownModel(self) -> None:
        """
        L{ModelManager.backendOf}, L{ModelManager.describe},
        L{ModelManager.peek}, L{ModelManager.counters} and
        L{ModelManager.logTail} raise L{UnknownModel} for a model the
        configuration does not declare; L{ModelManager.backendOf} names a
        known model's backend.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 100}])
        self.assertIs(manager.backendOf("a"), self.backend)
        lookups = (manager.backendOf, manager.describe, manager.peek, manager.counters, lambda n: manager.logTail(n, 1))
        for lookup in lookups:
            error = self.assertRaises(UnknownModel, lookup, "nope")
            self.assertEqual(error.name, "nope")

    def test_concurrentAcquiresShareOneLoad(self) -> None:
        """
        Concurrent acquires of a model that is not running share a single
        spawn; all of them get a lease once a probe says it is ready, while
        the state goes unloaded, loading, loaded, and C{active_requests}
        counts the leases out.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        self.assertEqual(self.status("a"), "unloaded")
        first = manager.acquire("a")
        second = manager.acquire("a")
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.status("a"), "loading")
        self.assertEqual(self.describe("a")["waiting_requests"], 2)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.reactor.advance(1)
        self.assertNoResult(first)

        self.makeReady("a")
        lease1 = self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.status("a"), "loaded")
        port = int(self.process("a").args[2])
        self.assertEqual(lease1.baseURL, f"http://127.0.0.1:{port}")
        self.assertEqual(lease1.model.name, "a")
        self.assertIs(lease1.backend, self.backend)
        self.assertEqual(self.describe("a")["active_requests"], 2)
        self.assertEqual(self.describe("a")["waiting_requests"], 0)
        self.assertEqual(self.describe("a")["port"], port)

    def test_releaseDecrementsOnce(self) -> None:
        """
        Releasing a lease decrements C{active_requests}; releasing the same
        lease again changes nothing.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        lease1 = self.loadedLease("a")
        lease2 = self.successResultOf(manager.acquire("a"))
        self.assertEqual(self.describe("a")["active_requests"], 2)
        lease1.release()
        self.assertEqual(self.describe("a")["active_requests"], 1)
        lease1.release()
        self.assertEqual(self.describe("a")["active_requests"], 1)
        with lease2:
            pass
        self.assertEqual(self.describe("a")["active_requests"], 0)
        lease2.release()
        self.assertEqual(self.describe("a")["active_requests"], 0)
        self.assertEqual(self.status("a"), "loaded")

    def test_loadedModelServedWhileAnotherLoads(self) -> None:
        """
        A loaded model serves a new acquire at once while another model is
        loading: there is no global lock.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 400}, {"name": "b", "vram_mb": 400}])
        self.loadIdle("a")
        loadingB = manager.acquire("b")
        self.assertEqual(self.status("b"), "loading")
        lease = self.successResultOf(manager.acquire("a"))
        self.assertEqual(lease.model.name, "a")
        self.assertNoResult(loadingB)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_acquireBeforeStartWaits(self) -> None:
        """
        An acquire that arrives before the service has started waits for
        start-up, then loads the model.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 100}], start=False)
        d = manager.acquire("a")
        self.assertNoResult(d)
        self.assertEqual(self.reactor.spawned, [])
        manager.startService()
        self.assertEqual(len(self.reactor.spawned), 1)
        self.makeReady("a")
        self.assertEqual(self.successResultOf(d).model.name, "a")

    def test_cancelAcquireBeforeStart(self) -> None:
        """
        Cancelling an acquire made before start-up withdraws it: once
        started, nothing is loaded for it.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 100}], start=False)
        d = manager.acquire("a")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        manager.startService()
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.describe("a")["waiting_requests"], 0)

    def test_cancelWaitingAcquireWithdraws(self) -> None:
        """
        Cancelling an acquire that waits for memory withdraws it: if it was
        the model's only waiter, the model is not loaded later and nothing
        is evicted for it.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}])
        lease = self.loadedLease("a")
        d = manager.acquire("b")
        self.assertEqual(self.describe("b")["waiting_requests"], 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.describe("b")["waiting_requests"], 0)
        lease.release()
        self.reactor.advance(120)
        self.assertEqual(self.process("a").signals, [])
        self.assertEqual(self.status("a"), "loaded")
        self.assertEqual(self.status("b"), "unloaded")
        self.assertEqual(self.spawnedFor("b"), [])

    def test_cancelOneOfSeveralWaiters(self) -> None:
        """
        Cancelling one of the acquires that share a load withdraws only that
        one: the load goes on and the others get their leases.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        first = manager.acquire("a")
        second = manager.acquire("a")
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.makeReady("a")
        self.successResultOf(second)
        self.assertEqual(self.describe("a")["active_requests"], 1)
        self.assertEqual(len(self.reactor.spawned), 1)


class BudgetTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for the memory budget and eviction.
    """

    def test_evictionWaitsForExit(self) -> None:
        """
        A load that does not fit evicts an idle model (TERM), and its spawn
        waits until the evicted process has really exited, so the memory of
        the models loading, loaded or unloading never exceeds the budget.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}])
        self.loadIdle("a")
        d = manager.acquire("b")
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual(self.status("a"), "unloading")
        self.assertEqual(self.spawnedFor("b"), [])
        self.assertEqual(manager.memoryInUse(), 600)
        self.assertWithinBudget()
        self.reactor.advance(4)
        self.assertEqual(self.spawnedFor("b"), [])
        self.assertNoResult(d)

        self.process("a").exit()
        self.assertEqual(self.status("a"), "unloaded")
        self.assertEqual(len(self.spawnedFor("b")), 1)
        self.assertEqual(self.status("b"), "loading")
        self.assertEqual(manager.memoryInUse(), 600)
        self.makeReady("b")
        self.assertEqual(self.successResultOf(d).model.name, "b")
        self.assertEqual(self.status("b"), "loaded")
        self.assertWithinBudget()

    def test_evictionEscalatesToKill(self) -> None:
        """
        An evicted backend that ignores TERM gets KILL after C{killTime};
        the waiting load starts once it has exited.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}])
        self.loadIdle("a")
        manager.acquire("b")
        self.reactor.advance(5)
        self.assertEqual(self.process("a").signals, ["TERM", "KILL"])
        self.assertEqual(self.spawnedFor("b"), [])
        self.process("a").exit(ProcessTerminated(signal=9))
        self.assertEqual(len(self.spawnedFor("b")), 1)

    def threeModelsThenC(self, policy: str, lastUse: str | None) -> str:
        """
        Load C{a} then C{b} (400 MB each of 1000), optionally use
        C{lastUse} again later, then acquire C{c} (400 MB), which needs
        exactly one eviction.

        @return: the name of the evicted model.
        """
        manager = self.makeManager(
            [{"name": n, "vram_mb": 400} for n in "abc"], eviction_policy=policy
        )
        self.loadIdle("a")
        self.reactor.advance(10)
        self.loadIdle("b")
        self.reactor.advance(10)
        if lastUse is not None:
            self.loadIdle(lastUse)
            self.reactor.advance(10)
        d = manager.acquire("c")
        evicted = [n for n in "ab" if self.status(n) == "unloading"]
        self.assertEqual(len(evicted), 1, evicted)
        [name] = evicted
        self.assertEqual(self.process(name).signals, ["TERM"])
        self.process(name).exit()
        self.makeReady("c")
        self.successResultOf(d)
        return name

    def test_lifoEvictsMostRecentlyLoaded(self) -> None:
        """
        With C{eviction_policy: lifo}, the idle model loaded last is evicted
        first, even if it was also used last.
        """
        self.assertEqual(self.threeModelsThenC("lifo", lastUse="b"), "b")

    def test_lifoIsTheDefault(self) -> None:
        """
        Without C{eviction_policy}, the idle model loaded last is evicted.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 400} for n in "abc"])
        self.assertEqual(manager.config.eviction_policy, "lifo")
        self.loadIdle("a")
        self.reactor.advance(10)
        self.loadIdle("b")
        self.reactor.advance(10)
        self.loadIdle("a")
        manager.acquire("c")
        self.assertEqual(self.status("b"), "unloading")
        self.assertEqual(self.status("a"), "loaded")

    def test_lruEvictsLeastRecentlyUsed(self) -> None:
        """
        With C{eviction_policy: lru}, the idle model used least recently is
        evicted first, even if it was not loaded last.
        """
        self.assertEqual(self.threeModelsThenC("lru", lastUse="b"), "a")

    def test_lruFollowsUseNotLoadOrder(self) -> None:
        """
        With C{eviction_policy: lru}, using a model again protects it: the
        other one, although loaded later, is evicted.
        """
        self.assertEqual(self.threeModelsThenC("lru", lastUse="a"), "b")

    def test_busyModelNotEvicted(self) -> None:
        """
        A model with a lease out is never evicted: the acquire that needs its
        memory waits; once the lease is released the eviction proceeds and
        the waiting acquire is served.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}])
        lease = self.loadedLease("a")
        d = manager.acquire("b")
        self.reactor.advance(30)
        self.assertEqual(self.process("a").signals, [])
        self.assertEqual(self.status("a"), "loaded")
        self.assertNoResult(d)
        self.assertEqual(self.spawnedFor("b"), [])

        lease.release()
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual(self.spawnedFor("b"), [])
        self.process("a").exit()
        self.makeReady("b")
        self.assertEqual(self.successResultOf(d).model.name, "b")
        self.assertWithinBudget()

    def test_queueTimeout(self) -> None:
        """
        When nothing can be evicted for C{queue_timeout_seconds}, the waiting
        acquire fails with L{NoCapacity}, which has C{retryAfter} set and
        names the busy models; nothing was spawned for it and nothing is evicted later
        on its behalf.
        """
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}],
            queue_timeout_seconds=20,
        )
        lease = self.loadedLease("a")
        d = manager.acquire("b")
        self.reactor.advance(19)
        self.assertNoResult(d)
        self.reactor.advance(1)
        error = self.failureResultOf(d, NoCapacity).value
        self.assertEqual(error.retryAfter, 1)
        self.assertEqual(error.busyModels, ("a",))
        self.assertIn("busy models: a", str(error))
        self.assertEqual(self.spawnedFor("b"), [])
        self.assertEqual(self.describe("b")["waiting_requests"], 0)
        lease.release()
        self.assertEqual(self.process("a").signals, [])
        self.assertEqual(self.status("a"), "loaded")

    def test_abandonedLoadStoppedForWaitingLoad(self) -> None:
        """
        A load whose every waiter was cancelled is abandoned: when another
        load waits for its memory, it is stopped at once (not when it
        becomes ready), and the waiting load starts once it has exited.
        """
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 500}, {"name": "b", "vram_mb": 600}],
            queue_timeout_seconds=20,
        )
        forA = manager.acquire("a")
        forB = manager.acquire("b")
        self.assertEqual(self.spawnedFor("b"), [])
        self.assertEqual(self.process("a").signals, [])
        forA.cancel()
        self.failureResultOf(forA, defer.CancelledError)
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual(self.status("a"), "unloading")
        self.assertEqual(manager.counters("a").unloads, {"abandoned": 1})
        self.process("a").exit()
        self.makeReady("b")
        self.assertEqual(self.successResultOf(forB).model.name, "b")

    def test_abandonedLoadFinishesWithoutNeed(self) -> None:
        """
        A load whose every waiter was cancelled goes on when no other load
        needs its memory, so that the next request for it is served at once.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 500}, {"name": "b", "vram_mb": 400}])
        forA = manager.acquire("a")
        forA.cancel()
        self.failureResultOf(forA, defer.CancelledError)
        self.loadIdle("b")
        self.assertEqual(self.process("a").signals, [])
        self.makeReady("a")
        self.assertEqual(self.status("a"), "loaded")
        self.successResultOf(manager.acquire("a")).release()

    def test_loadWithoutWaitersLeftIsEvictable(self) -> None:
        """
        A model that finished loading after every acquire waiting for it
        was cancelled is idle, so a load that later waits for memory evicts
        it at once rather than waiting out C{queue_timeout_seconds}.
        """
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 500}, {"name": "b", "vram_mb": 600}],
            queue_timeout_seconds=20,
        )
        forA = manager.acquire("a")
        forA.cancel()
        self.failureResultOf(forA, defer.CancelledError)
        self.makeReady("a")
        self.assertEqual(self.status("a"), "loaded")
        forB = manager.acquire("b")
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.process("a").exit()
        self.makeReady("b")
        self.assertEqual(self.successResultOf(forB).model.name, "b")

    def test_failedSpawnReservesNoMemory(self) -> None:
        """
        A load whose spawn fails holds no memory, so a load queued behind it
        starts in the same scheduling pass instead of waiting out
        C{queue_timeout_seconds}.
        """
        manager = self.makeManager(
            [{"name": n, "vram_mb": 600} for n in "abc"], queue_timeout_seconds=20
        )
        lease = self.loadedLease("a")
        forB = manager.acquire("b")
        forC = manager.acquire("c")
        self.reactor.spawnErrorFor["b"] = OSError(2, "No such file or directory")
        lease.release()
        self.process("a").exit()
        self.failureResultOf(forB, LoadFailed)
        self.assertEqual(self.status("b"), "failed")
        self.assertEqual(len(self.spawnedFor("c")), 1)
        self.makeReady("c")
        self.assertEqual(self.successResultOf(forC).model.name, "c")

    def test_queueTimerStopsWhenLoadStarts(self) -> None:
        """
        Once a waiting load has started, its queue timeout no longer
        applies: a load longer than C{queue_timeout_seconds} still succeeds.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}], queue_timeout_seconds=5)
        d = manager.acquire("a")
        self.reactor.advance(30)
        self.assertNoResult(d)
        self.makeReady("a")
        self.successResultOf(d)


class LoadFailureTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for backends that fail while loading or once loaded.
    """

    def test_exitWhileLoading(self) -> None:
        """
        A backend that exits while loading fails every waiter with
        L{LoadFailed} quoting its last output lines; the model is C{failed}, its memory is
        released, and the next acquire spawns it again.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        first = manager.acquire("a")
        second = manager.acquire("a")
        process = self.process("a")
        process.output(b"loading model\nerror: out of memory\n")
        process.exit(ProcessTerminated(exitCode=1))
        for d in (first, second):
            error = self.failureResultOf(d, LoadFailed).value
            self.assertIn("exited with code 1 while loading", str(error))
            self.assertIn("loading model\nerror: out of memory", str(error))
        self.assertEqual(self.status("a"), "failed")
        self.assertIn("error: out of memory", self.describe("a")["last_error"])
        self.assertIsNone(self.describe("a")["pid"])
        self.assertEqual(manager.memoryInUse(), 0)

        again = manager.acquire("a")
        self.assertEqual(len(self.spawnedFor("a")), 2)
        self.assertEqual(self.status("a"), "loading")
        self.makeReady("a")
        self.successResultOf(again)
        self.assertIsNone(self.describe("a")["last_error"])

    def test_portTakenRetriesElsewhere(self) -> None:
        """
        A backend that exits because its port was taken (another program
        bound it after dynllm found it free) is started again on another
        port; its waiters keep waiting and are served by the new one.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a")
        first = self.process("a")
        first.output(b"E srv start: couldn't bind HTTP server socket, hostname: 127.0.0.1\n")
        first.exit(ProcessTerminated(exitCode=1))
        self.assertNoResult(d)
        self.assertEqual(len(self.spawnedFor("a")), 2)
        self.assertNotEqual(self.process("a").args, first.args)
        self.makeReady("a")
        self.assertEqual(self.successResultOf(d).model.name, "a")

    def test_portTakenGivesUp(self) -> None:
        """
        After L{PORT_RETRIES} port conflicts in a row, the waiters get the
        L{LoadFailed} of the last one.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a")
        for _ in range(PORT_RETRIES + 1):
            self.process("a").output(b"OSError: [Errno 98] Address already in use\n")
            self.process("a").exit(ProcessTerminated(exitCode=1))
        self.assertEqual(len(self.spawnedFor("a")), PORT_RETRIES + 1)
        error = self.failureResultOf(d, LoadFailed).value
        self.assertIn("Address already in use", str(error))

    def test_exitZeroWhileLoading(self) -> None:
        """
        A backend that exits with status 0 while loading (it put its server
        in the background, as C{docker run -d} does) fails with a message
        that says so.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a")
        self.process("a").exit(ProcessDone(0))
        error = str(self.failureResultOf(d, LoadFailed).value)
        self.assertIn("exited with code 0 while loading (a command that starts its server in the background", error)
        self.assertIn("run the server in the foreground", error)

    def test_exitWhileLoadingFreesMemoryForOthers(self) -> None:
        """
        The memory of a backend that died while loading goes to the load
        that was waiting for it.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}])
        da = manager.acquire("a")
        db = manager.acquire("b")
        self.assertEqual(self.spawnedFor("b"), [])
        self.process("a").exit(ProcessTerminated(exitCode=1))
        self.failureResultOf(da, LoadFailed)
        self.assertEqual(len(self.spawnedFor("b")), 1)
        self.makeReady("b")
        self.successResultOf(db)

    def test_spawnFailure(self) -> None:
        """
        A backend program that cannot be spawned fails the waiters with
        L{LoadFailed} and leaves the model C{failed}, holding no memory.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        self.reactor.spawnError = OSError(2, "No such file or directory")
        error = self.failureResultOf(manager.acquire("a"), LoadFailed).value
        self.assertIn("No such file or directory", str(error))
        self.assertEqual(self.status("a"), "failed")
        self.assertEqual(manager.memoryInUse(), 0)

    def test_noFreePort(self) -> None:
        """
        When no port of the range can be used, the acquire fails with
        L{LoadFailed} and the model is C{failed}.
        """
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 600}],
            backend={"port_range_start": port, "port_range_end": port},
        )
        error = self.failureResultOf(manager.acquire("a"), LoadFailed).value
        self.assertIn("no free port", str(error))
        self.assertEqual(self.status("a"), "failed")
        self.assertEqual(self.reactor.spawned, [])

    def test_loadTimeout(self) -> None:
        """
        A backend not ready within its load timeout gets TERM; its waiters
        fail with L{LoadTimedOut} at once, but its memory stays counted (C{unloading})
        until it exits; KILL follows after C{killTime}, and once it has
        exited the model is C{failed}.
        """
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 600, "load_timeout_seconds": 10}, {"name": "b", "vram_mb": 600}]
        )
        d = manager.acquire("a")
        process = self.process("a")
        self.reactor.advance(9)
        self.assertNoResult(d)
        self.reactor.advance(1)
        error = self.failureResultOf(d, LoadTimedOut).value
        self.assertEqual(error.seconds, 10)
        self.assertEqual(process.signals, ["TERM"])
        self.assertEqual(self.status("a"), "unloading")
        self.assertEqual(manager.memoryInUse(), 600)

        waitingB = manager.acquire("b")
        self.assertEqual(self.spawnedFor("b"), [])
        self.reactor.advance(5)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertEqual(self.status("a"), "unloading")
        process.exit(ProcessTerminated(signal=9))
        self.assertEqual(self.status("a"), "failed")
        self.assertIn("load timeout", self.describe("a")["last_error"])
        self.assertEqual(len(self.spawnedFor("b")), 1)
        self.makeReady("b")
        self.successResultOf(waitingB)
        self.assertWithinBudget()

    def test_acquireDuringFailedLoadsAgain(self) -> None:
        """
        An acquire that arrives while a timed-out backend is still exiting
        waits, and a new process is spawned for it once the old one is gone.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600, "load_timeout_seconds": 10}])
        first = manager.acquire("a")
        self.reactor.advance(10)
        self.failureResultOf(first, LoadTimedOut)
        second = manager.acquire("a")
        self.assertEqual(len(self.spawnedFor("a")), 1)
        self.spawnedFor("a")[0].exit()
        self.assertEqual(len(self.spawnedFor("a")), 2)
        self.makeReady("a")
        self.successResultOf(second)

    def test_loadedBackendDies(self) -> None:
        """
        A loaded backend that dies is marked C{failed} with the reason, its
        memory is released, a lease still out on it is released harmlessly,
        and the next acquire loads it again.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        lease = self.loadedLease("a")
        self.process("a").exit(ProcessTerminated(exitCode=139))
        self.assertEqual(self.status("a"), "failed")
        self.assertEqual(
            self.describe("a")["last_error"], "backend exited with code 139 while loaded"
        )
        self.assertEqual(manager.memoryInUse(), 0)
        self.assertEqual(self.describe("a")["active_requests"], 0)
        lease.release()
        self.assertEqual(self.describe("a")["active_requests"], 0)

        d = manager.acquire("a")
        self.assertEqual(len(self.spawnedFor("a")), 2)
        self.makeReady("a")
        self.successResultOf(d)
        self.assertEqual(self.describe("a")["active_requests"], 1)

    def test_loadedBackendDeathFreesMemoryForWaitingLoad(self) -> None:
        """
        When a busy loaded backend dies, the load that was waiting for its
        memory starts at once.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}])
        lease = self.loadedLease("a")
        d = manager.acquire("b")
        self.assertEqual(self.spawnedFor("b"), [])
        self.process("a").exit(ProcessTerminated(exitCode=1))
        self.assertEqual(len(self.spawnedFor("b")), 1)
        self.makeReady("b")
        self.successResultOf(d)
        lease.release()
        self.assertWithinBudget()


class ReadinessTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for how a load becomes ready.
    """

    def test_readyHintProbesAtOnce(self) -> None:
        """
        An output line for which the backend's C{readyHint} is true sends a
        probe at once, before the scheduled probe delay, and the waiters get
        their leases without the clock moving.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a")
        self.backend.ready.add("a")
        self.process("a").output(b"still loading\n")
        self.assertEqual(self.backend.probes, [])
        self.assertNoResult(d)
        self.process("a").output(b"server is READY\n")
        self.assertEqual(self.backend.probes, [("a", 0.0)])
        self.successResultOf(d)
        self.assertEqual(self.status("a"), "loaded")

    def test_probeScheduled(self) -> None:
        """
        Without a hint, the first probe is sent L{FIRST_PROBE_DELAY} after
        the spawn.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a")
        self.backend.ready.add("a")
        self.reactor.advance(FIRST_PROBE_DELAY / 2)
        self.assertNoResult(d)
        self.reactor.advance(FIRST_PROBE_DELAY / 2)
        self.successResultOf(d)


class ReapIdleTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for L{ModelManager.reapIdle}.
    """

    def setUp(self) -> None:
        self.makeManager(
            [
                {"name": "short", "vram_mb": 100, "unload_time": 10},
                {"name": "default", "vram_mb": 100},
                {"name": "never", "vram_mb": 100, "unload_time": -1},
                {"name": "inf", "vram_mb": 100, "unload_time": "inf"},
            ],
            idle_timeout_seconds=100,
        )

    def test_stopsModelIdleLongerThanUnloadTime(self) -> None:
        """
        A loaded model idle for its C{unload_time} is stopped; one idle for
        less is not.
        """
        self.loadIdle("short")
        self.reactor.advance(9)
        self.manager.reapIdle()
        self.assertEqual(self.status("short"), "loaded")
        self.reactor.advance(1)
        self.manager.reapIdle()
        self.assertEqual(self.status("short"), "unloading")
        self.assertEqual(self.process("short").signals, ["TERM"])
        self.process("short").exit()
        self.assertEqual(self.status("short"), "unloaded")
        self.assertEqual(self.manager.memoryInUse(), 0)

    def test_idleTimeCountsFromRelease(self) -> None:
        """
        Idle time counts from when the last lease was released, not from
        the load.
        """
        lease = self.loadedLease("short")
        self.reactor.advance(50)
        lease.release()
        self.reactor.advance(9)
        self.manager.reapIdle()
        self.assertEqual(self.status("short"), "loaded")

    def test_usesGlobalIdleTimeout(self) -> None:
        """
        A model without C{unload_time} is stopped after the global
        C{idle_timeout_seconds}.
        """
        self.loadIdle("default")
        self.reactor.advance(99)
        self.manager.reapIdle()
        self.assertEqual(self.status("default"), "loaded")
        self.reactor.advance(1)
        self.manager.reapIdle()
        self.assertEqual(self.status("default"), "unloading")

    def test_sparesModelWithLease(self) -> None:
        """
        A model with a lease out is never stopped, however long ago it was
        last acquired.
        """
        self.loadedLease("short")
        self.reactor.advance(1000)
        self.manager.reapIdle()
        self.assertEqual(self.status("short"), "loaded")
        self.assertEqual(self.process("short").signals, [])

    def test_neverStopsInfiniteUnloadTime(self) -> None:
        """
        Models with C{unload_time} C{-1} or C{"inf"} are never stopped.
        """
        self.loadIdle("never")
        self.loadIdle("inf")
        self.reactor.advance(10**9)
        self.manager.reapIdle()
        self.assertEqual(self.status("never"), "loaded")
        self.assertEqual(self.status("inf"), "loaded")

    def test_ignoresModelsNotLoaded(self) -> None:
        """
        Models that are loading or not running are left alone.
        """
        d = self.manager.acquire("short")
        self.reactor.advance(50)
        self.manager.reapIdle()
        self.assertEqual(self.status("short"), "loading")
        self.assertEqual(self.status("default"), "unloaded")
        self.assertEqual(self.process("short").signals, [])
        self.makeReady("short")
        self.successResultOf(d)

    def test_recordsLastUse(self) -> None:
        """
        L{ModelManager.reapIdle} writes the time of the last release to the
        store.
        """
        lease = self.loadedLease("never")
        self.reactor.advance(7)
        lease.release()
        releasedAt = self.reactor.seconds()
        self.assertNotEqual(self.store.saved["never"]["last_used_at"], releasedAt)
        self.manager.reapIdle()
        self.assertEqual(self.store.saved["never"]["last_used_at"], releasedAt)


class UnloadTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for L{ModelManager.unload}.
    """

    def setUp(self) -> None:
        self.makeManager([{"name": "a", "vram_mb": 600}])

    def test_unknownModel(self) -> None:
        """
        Unloading a model that is not configured fails with
        L{UnknownModel}.
        """
        self.failureResultOf(self.manager.unload("nope"), UnknownModel)

    def test_busy(self) -> None:
        """
        Unloading a model with a lease out fails with L{ModelBusy}, which
        counts the requests, and leaves it running.
        """
        self.loadedLease("a")
        error = self.failureResultOf(self.manager.unload("a"), ModelBusy).value
        self.assertEqual((error.activeRequests, error.loading), (1, False))
        self.assertEqual(self.process("a").signals, [])
        self.assertEqual(self.status("a"), "loaded")

    def test_loading(self) -> None:
        """
        Unloading a model that is loading fails with L{ModelBusy} (loading)
        and lets the load go on.
        """
        d = self.manager.acquire("a")
        error = self.failureResultOf(self.manager.unload("a"), ModelBusy).value
        self.assertTrue(error.loading)
        self.assertEqual(self.process("a").signals, [])
        self.makeReady("a")
        self.successResultOf(d)

    def test_idle(self) -> None:
        """
        Unloading an idle model sends TERM; the Deferred fires only once the
        backend has exited, and its memory is then released.
        """
        self.loadIdle("a")
        d = self.manager.unload("a")
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual(self.status("a"), "unloading")
        self.assertEqual(self.manager.memoryInUse(), 600)
        self.assertNoResult(d)
        self.process("a").exit()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.status("a"), "unloaded")
        self.assertEqual(self.manager.memoryInUse(), 0)

    def test_notRunning(self) -> None:
        """
        Unloading a model that is not running does nothing and succeeds.
        """
        self.assertIsNone(self.successResultOf(self.manager.unload("a")))
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.status("a"), "unloaded")

    def test_acquireWhileUnloadingLoadsAgain(self) -> None:
        """
        An acquire that arrives while the model is being unloaded waits, and
        the model is loaded again once the old process has exited.
        """
        self.loadIdle("a")
        self.manager.unload("a")
        d = self.manager.acquire("a")
        self.assertNoResult(d)
        self.assertEqual(len(self.spawnedFor("a")), 1)
        self.process("a").exit()
        self.assertEqual(len(self.spawnedFor("a")), 2)
        self.makeReady("a")
        self.successResultOf(d)


class PortTests(ManagerTestsMixin, SynchronousTestCase):
    """
    With more models than ports, a port is made free as memory is: an idle
    model gives way.
    """

    def setUp(self) -> None:
        self.makeManager(
            [{"name": n, "vram_mb": 100} for n in ("a", "b", "c")],
            backend={"port_range_start": 40100, "port_range_end": 40101},
        )

    def test_idleGivesWay(self) -> None:
        """
        Both ports held by idle models: the least recently loaded of them
        (LIFO: the last loaded) is stopped, and the load starts on its port
        once it has exited.
        """
        self.loadIdle("a")
        self.loadIdle("b")
        d = self.manager.acquire("c")
        self.assertEqual(self.process("b").signals, ["TERM"])
        self.assertEqual(self.spawnedFor("c"), [])
        self.process("b").exit()
        self.makeReady("c")
        self.successResultOf(d)
        self.assertEqual(self.status("a"), "loaded")
        self.assertEqual(self.manager.counters("b").unloads, {"evicted": 1})

    def test_allBusy(self) -> None:
        """
        Both ports held by busy models: the load fails at once with
        L{LoadFailed} naming the port range, as before.
        """
        self.loadedLease("a")
        self.loadedLease("b")
        failure = self.failureResultOf(self.manager.acquire("c"), LoadFailed)
        self.assertIn("40100", str(failure.value))


class ForcedUnloadTests(ManagerTestsMixin, SynchronousTestCase):
    """
    L{ModelManager.unload} with C{force=True}: a busy or loading model is
    stopped all the same, and what depended on it fails with
    L{ModelUnloaded}.
    """

    def setUp(self) -> None:
        self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600}])

    def test_busy(self) -> None:
        """
        A model with leases out gets TERM at once; each lease is revoked
        (released, its handlers called with L{ModelUnloaded}), the model
        counts no active request, and the unload is counted as C{forced}.
        """
        leases = [self.loadedLease("a"), self.loadedLease("a")]
        revoked: list[Exception] = []
        leases[0].whenRevoked(revoked.append)
        d = self.manager.unload("a", force=True)
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual([lease.released for lease in leases], [True, True])
        [reason] = revoked
        self.assertIsInstance(reason, ModelUnloaded)
        self.assertEqual(reason.cause, "forced")
        self.assertIs(leases[1].revokedBy, reason)
        self.assertEqual(self.describe("a")["active_requests"], 0)
        self.process("a").exit()
        self.successResultOf(d)
        self.assertEqual(self.status("a"), "unloaded")
        self.assertEqual(self.manager.counters("a").unloads, {"forced": 1})

    def test_releaseAfterRevokeIsQuiet(self) -> None:
        """
        The holder's own release after the revoke changes nothing: the next
        request loads the model again and holds one lease.
        """
        lease = self.loadedLease("a")
        self.manager.unload("a", force=True)
        self.process("a").exit()
        lease.release()
        again = self.loadedLease("a")
        self.assertEqual(self.describe("a")["active_requests"], 1)
        again.release()
        self.assertEqual(self.describe("a")["active_requests"], 0)

    def test_loading(self) -> None:
        """
        A loading model is stopped, and the requests waiting for it fail
        with L{ModelUnloaded} (they do not load it again).
        """
        d = self.manager.acquire("a")
        self.manager.unload("a", force=True)
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.failureResultOf(d, ModelUnloaded)
        self.process("a").exit()
        self.assertEqual(len(self.spawnedFor("a")), 1)
        self.assertEqual(self.status("a"), "unloaded")

    def test_othersUnharmed(self) -> None:
        """
        Another model's leases are left alone.
        """
        other = self.loadedLease("b")
        self.manager.unload("a", force=True)
        self.assertFalse(other.released)
        self.assertEqual(self.status("b"), "loaded")

    def test_idle(self) -> None:
        """
        An idle model is stopped as by a plain unload (cause C{forced}).
        """
        self.loadIdle("a")
        d = self.manager.unload("a", force=True)
        self.process("a").exit()
        self.successResultOf(d)
        self.assertEqual(self.manager.counters("a").unloads, {"forced": 1})

    def test_waitingForMemory(self) -> None:
        """
        A request waiting for memory for a model that is not loaded fails
        with L{ModelUnloaded} when that model is force-unloaded.
        """
        busy = self.loadedLease("b")
        d = self.manager.acquire("a")
        self.assertNoResult(d)
        self.manager.unload("a", force=True)
        self.failureResultOf(d, ModelUnloaded)
        busy.release()


class ServiceTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for starting and stopping L{ModelManager} as a service.
    """

    def test_stopService(self) -> None:
        """
        With no drain (C{shutdown_timeout_seconds: 0}),
        L{ModelManager.stopService} fails the waiting acquires with a 503,
        sends TERM to every backend (busy, idle and loading ones), and its
        Deferred fires only after every process has exited.
        """
        manager = self.makeManager(
            [{"name": n, "vram_mb": 300} for n in "abcd"], total_vram_mb=1000, shutdown_timeout_seconds=0
        )
        lease = self.loadedLease("a")
        self.loadIdle("b")
        loadingC = manager.acquire("c")
        lease.release()
        lease = self.successResultOf(manager.acquire("a"))
        lease2 = self.successResultOf(manager.acquire("b"))
        waitingD = manager.acquire("d")
        self.assertEqual(self.spawnedFor("d"), [])

        stopped = manager.stopService()
        for d in (loadingC, waitingD):
            self.failureResultOf(d, ShuttingDown)
        for name in "abc":
            self.assertEqual(self.process(name).signals, ["TERM"])
            self.assertEqual(self.status(name), "unloading")
        self.assertNoResult(stopped)
        self.process("a").exit()
        self.process("c").exit()
        self.assertNoResult(stopped)
        self.reactor.advance(5)
        self.assertEqual(self.process("b").signals, ["TERM", "KILL"])
        self.process("b").exit(ProcessTerminated(signal=9))
        self.assertIsNone(self.successResultOf(stopped))
        for name in "abcd":
            self.assertEqual(self.status(name), "unloaded")
        self.assertEqual(self.spawnedFor("d"), [])
        lease.release()
        lease2.release()

    def test_stopWhileLoadingIsNoFailure(self) -> None:
        """
        A model that the shutdown stops while it loads is not recorded as a
        failed load: no C{last_error}, no load failure counted.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 300}])
        d = manager.acquire("a")
        stopped = manager.stopService()
        self.failureResultOf(d, ShuttingDown)
        self.process("a").exit(ProcessTerminated(signal=15))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIsNone(self.describe("a")["last_error"])
        self.assertEqual(manager.counters("a").loadFailures, 0)

    def test_stopServiceDrains(self) -> None:
        """
        L{ModelManager.stopService} lets requests in flight finish before
        it stops the backends: new acquires fail with L{ShuttingDown} at
        once, and TERM is
        sent only when the last lease is released.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 300}])
        lease = self.loadedLease("a")
        stopped = manager.stopService()
        self.failureResultOf(manager.acquire("a"), ShuttingDown)
        self.reactor.advance(10)
        self.assertEqual(self.process("a").signals, [])
        self.assertEqual(self.status("a"), "loaded")
        lease.release()
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.process("a").exit()
        self.assertIsNone(self.successResultOf(stopped))

    def test_stopServiceDrainTimeout(self) -> None:
        """
        A request still in flight after C{shutdown_timeout_seconds} does
        not hold up the shutdown: its backend is stopped.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 300}], shutdown_timeout_seconds=2)
        lease = self.loadedLease("a")
        stopped = manager.stopService()
        self.reactor.advance(1.9)
        self.assertEqual(self.process("a").signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.process("a").exit()
        self.assertIsNone(self.successResultOf(stopped))
        lease.release()

    def test_acquireAfterStop(self) -> None:
        """
        Acquires after L{ModelManager.stopService} fail with
        L{ShuttingDown} and start nothing.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 100}])
        self.successResultOf(manager.stopService())
        self.failureResultOf(manager.acquire("a"), ShuttingDown)
        self.assertEqual(self.reactor.spawned, [])

    def test_preload(self) -> None:
        """
        C{preload_models} are loaded by L{ModelManager.startService}; an
        acquire that arrives meanwhile joins that same load (one spawn) and
        holds the only lease once it is ready.
        """
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 100}], preload_models=["a"]
        )
        self.assertEqual(len(self.spawnedFor("a")), 1)
        self.assertEqual(self.status("a"), "loading")
        self.assertEqual(self.status("b"), "unloaded")
        d = manager.acquire("a")
        self.assertEqual(len(self.spawnedFor("a")), 1)
        self.makeReady("a")
        self.successResultOf(d)
        self.assertEqual(self.status("a"), "loaded")
        self.assertEqual(self.describe("a")["active_requests"], 1)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_preloadWithoutRequests(self) -> None:
        """
        A preloaded model ends up loaded and idle.
        """
        self.makeManager([{"name": "a", "vram_mb": 600}], preload_models=["a"])
        self.makeReady("a")
        self.assertEqual(self.status("a"), "loaded")
        self.assertEqual(self.describe("a")["active_requests"], 0)

    def test_whenStarted(self) -> None:
        """
        L{ModelManager.whenStarted} fires once start-up is done, and at once
        afterwards.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 100}], start=False)
        d = manager.whenStarted()
        self.assertNoResult(d)
        manager.startService()
        self.successResultOf(d)
        self.successResultOf(manager.whenStarted())


class StoreTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for the rows L{ModelManager} writes to its state store.
    """

    def test_statusTransitions(self) -> None:
        """
        Each state transition is written to the store, with the pid and port
        while a process runs.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 100}])
        saved = self.store.saved
        self.assertEqual(saved["a"]["status"], "unloaded")
        self.assertEqual(saved["b"]["status"], "unloaded")
        d = manager.acquire("a")
        process = self.process("a")
        self.assertEqual(saved["a"]["status"], "loading")
        self.assertEqual(saved["a"]["pid"], process.pid)
        self.assertIsNone(saved["a"]["pgid"])
        self.assertEqual(saved["a"]["port"], int(process.args[2]))
        self.assertEqual(saved["a"]["vram_mb"], 600)
        self.assertEqual(saved["a"]["load_seq"], 1)
        self.makeReady("a")
        self.successResultOf(d).release()
        self.assertEqual(saved["a"]["status"], "loaded")
        self.assertEqual(saved["a"]["loaded_at"], self.reactor.seconds())
        manager.unload("a")
        self.assertEqual(saved["a"]["status"], "unloading")
        process.exit()
        self.assertEqual(saved["a"]["status"], "unloaded")
        self.assertIsNone(saved["a"]["pid"])
        self.assertIsNone(saved["a"]["port"])

    def test_failureRecorded(self) -> None:
        """
        A load failure is recorded as C{failed} with the error.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a")
        self.process("a").exit(ProcessTerminated(exitCode=2))
        self.failureResultOf(d, LoadFailed)
        self.assertEqual(self.store.saved["a"]["status"], "failed")
        self.assertIn("exited with code 2", self.store.saved["a"]["last_error"])

    def test_startResetsLeftoverRows(self) -> None:
        """
        Rows a previous run left (without a live process) are marked
        unloaded at start-up, and rows of models no longer configured are
        dropped.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}], start=False)
        self.store.save({"name": "a", "status": "loaded", "port": 40100})
        self.store.save({"name": "gone", "status": "loaded"})
        manager.startService()
        self.assertEqual(self.store.saved["a"]["status"], "unloaded")
        self.assertIsNone(self.store.saved["a"]["port"])
        self.assertNotIn("gone", self.store.saved)

    def test_startRunsLeftoverStopCommand(self) -> None:
        """
        For a row a previous run recorded as running, start-up runs the
        model's C{stop.command} of the configuration now, with the port
        recorded (its server, as in a container, may outlive the process
        dynllm started), and loads wait until it has exited.
        """
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 600, "stop": {"command": ["ctl", "stop", "{name}", "{port}"]}}], start=False
        )
        # A pid that no process has (pid_max is at most 2**22).
        self.store.save({"name": "a", "status": "loaded", "pid": 2**23, "start_time": 1, "port": 40107})
        manager.startService()
        [stopper] = self.reactor.spawned
        self.assertEqual(stopper.args, ["ctl", "stop", "a", "40107"])
        self.assertFalse(manager.started)
        stopper.exit()
        self.assertTrue(manager.started)
        self.assertEqual(self.store.saved["a"]["status"], "unloaded")


    def test_stopCommandRecorded(self) -> None:
        """
        A loaded model's row holds its stop command as it was expanded for
        the run (what stops its server, whatever the configuration says by
        the next start); a model without one records none.
        """
        self.makeManager([
            {"name": "a", "vram_mb": 300, "stop": {"command": ["ctl", "stop", "{name}", "{port}"]}},
            {"name": "b", "vram_mb": 300},
        ])
        self.loadIdle("a")
        self.loadIdle("b")
        port = self.store.saved["a"]["port"]
        self.assertEqual(json.loads(self.store.saved["a"]["stop_command"]), ["ctl", "stop", "a", str(port)])
        self.assertIsNone(self.store.saved["b"]["stop_command"])

    def test_startRunsRecordedStopCommand(self) -> None:
        """
        After a crash, the stop command recorded for a run is the one run,
        even when the model has since been removed from the configuration
        or its stop command changed: its server (in a container) is not
        left behind.
        """
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 600, "stop": {"command": ["new-ctl", "{name}"]}}], start=False
        )
        for name in ("a", "removed"):
            self.store.save({
                "name": name, "status": "loaded", "pid": 2**23, "start_time": 1, "port": 40107,
                "stop_command": json.dumps(["old-ctl", "stop", name]),
            })
        manager.startService()
        # Both at once: leftovers are stopped together, not one after another.
        first, second = self.reactor.spawned
        self.assertEqual(first.args, ["old-ctl", "stop", "a"])
        self.assertEqual(second.args, ["old-ctl", "stop", "removed"])
        first.exit()
        self.assertFalse(manager.started)
        second.exit()
        self.assertTrue(manager.started)
        self.assertNotIn("removed", self.store.saved)


class ProcessDoneTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests that a clean exit (code 0) of a loaded backend counts as a failure.
    """

    def test_cleanExitWhileLoaded(self) -> None:
        """
        A loaded backend that exits with code 0 unasked is marked C{failed}.
        """
        self.makeManager([{"name": "a", "vram_mb": 600}])
        self.loadIdle("a")
        self.process("a").exit(ProcessDone(0))
        self.assertEqual(self.status("a"), "failed")
        self.assertEqual(self.describe("a")["last_error"], "backend exited with code 0 while loaded")


class FairnessTests(ManagerTestsMixin, SynchronousTestCase):
    """
    A load waiting for memory that busy models hold gets its turn.
    """

    def test_busyModelHeldForWaitingLoad(self) -> None:
        """
        While a load waits for memory held by a busy model, new requests for
        that model queue behind it; once the model drains it is evicted,
        the waiting load runs, and the queued requests are served after
        (the starvation of issue 8: back-to-back requests kept A busy until
        B's queue timeout).
        """
        manager = self.makeManager(
            [{"name": n, "vram_mb": 600} for n in "abc"], queue_timeout_seconds=60
        )
        first = self.loadedLease("a")
        forB = manager.acquire("b")
        nextA = manager.acquire("a")
        self.assertNoResult(nextA)
        self.assertEqual(self.describe("a")["waiting_requests"], 1)
        first.release()
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.process("a").exit()
        self.makeReady("b")
        leaseB = self.successResultOf(forB)
        self.assertNoResult(nextA)
        leaseB.release()
        self.process("b").exit()
        self.makeReady("a")
        self.successResultOf(nextA).release()
        self.assertWithinBudget()

    def test_holdEndsWhenLoadGivesUp(self) -> None:
        """
        When the load a busy model was held for is no longer wanted (its
        requests timed out or left), the requests that queued for the held
        model are served by it at once.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"], queue_timeout_seconds=60)
        lease = self.loadedLease("a")
        forB = manager.acquire("b")
        nextA = manager.acquire("a")
        self.assertNoResult(nextA)
        forB.cancel()
        self.failureResultOf(forB, defer.CancelledError)
        self.successResultOf(nextA).release()
        lease.release()
        self.assertEqual(self.process("a").signals, [])

    def test_heldRequestQueueTimeout(self) -> None:
        """
        A request that queues behind a held model waits no longer than its
        queue timeout.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"], queue_timeout_seconds=10)
        lease = self.loadedLease("a")
        manager.acquire("b", RequestOptions(queueTimeout=60)).addErrback(lambda f: None)
        nextA = manager.acquire("a")
        self.reactor.advance(10)
        self.failureResultOf(nextA, NoCapacity)
        lease.release()

    def test_priorityServedFirst(self) -> None:
        """
        Of two loads waiting for the same memory, the one whose request has
        the higher priority runs first, whatever their order.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "abc"])
        lease = self.loadedLease("a")
        forB = manager.acquire("b")
        forC = manager.acquire("c", RequestOptions(priority=5))
        lease.release()
        self.process("a").exit()
        self.assertEqual((len(self.spawnedFor("b")), len(self.spawnedFor("c"))), (0, 1))
        self.makeReady("c")
        self.successResultOf(forC).release()
        self.process("c").exit()
        self.makeReady("b")
        self.successResultOf(forB).release()

    def test_configuredPriority(self) -> None:
        """
        A model's configured C{priority} orders the queue when requests do
        not say, and its idle model is evicted after those of lower
        priority.
        """
        manager = self.makeManager(
            [
                {"name": "keep", "vram_mb": 400, "priority": 9},
                {"name": "cheap", "vram_mb": 400},
                {"name": "new", "vram_mb": 400},
            ]
        )
        self.loadIdle("cheap")
        self.loadIdle("keep")
        manager.acquire("new")
        self.assertEqual(self.process("cheap").signals, ["TERM"])
        self.assertEqual(self.process("keep").signals, [])
        self.process("cheap").exit()
        self.makeReady("new")


class RequestOptionsTests(ManagerTestsMixin, SynchronousTestCase):
    """
    Tests for the per-request L{RequestOptions}.
    """

    def test_queueTimeoutZeroRefusesAtOnce(self) -> None:
        """
        A request with a queue timeout of 0 for a model that cannot be
        loaded now fails with L{NoCapacity} at once, with a C{retryAfter}
        of at least 1; nothing is spawned or held for it.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"])
        lease = self.loadedLease("a")
        error = self.failureResultOf(manager.acquire("b", RequestOptions(queueTimeout=0)), NoCapacity).value
        self.assertGreaterEqual(error.retryAfter, 1)
        self.assertEqual(self.spawnedFor("b"), [])
        self.successResultOf(manager.acquire("a")).release()
        lease.release()

    def test_queueTimeoutZeroLoadsWhatFits(self) -> None:
        """
        A queue timeout of 0 does not refuse a model that can be loaded
        now: the request waits for the load.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a", RequestOptions(queueTimeout=0))
        self.makeReady("a")
        self.successResultOf(d).release()

    def test_queueTimeoutPerRequest(self) -> None:
        """
        A request's queue timeout replaces C{queue_timeout_seconds}.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"], queue_timeout_seconds=60)
        lease = self.loadedLease("a")
        d = manager.acquire("b", RequestOptions(queueTimeout=2))
        self.reactor.advance(2)
        self.assertEqual(self.failureResultOf(d, NoCapacity).value.waitedSeconds, 2)
        lease.release()

    def test_keepAliveNever(self) -> None:
        """
        A keep-alive of -1 keeps the model loaded past its idle timeout.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600, "unload_time": 10}])
        d = manager.acquire("a", RequestOptions(keepAlive=-1))
        self.makeReady("a")
        self.successResultOf(d).release()
        self.reactor.advance(1000)
        manager.reapIdle()
        self.assertEqual(self.status("a"), "loaded")

    def test_keepAliveZeroUnloadsWhenIdle(self) -> None:
        """
        A keep-alive of 0 stops the model as soon as its last request is
        done.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a", RequestOptions(keepAlive=0))
        self.makeReady("a")
        other = self.successResultOf(manager.acquire("a"))
        self.successResultOf(d).release()
        self.assertEqual(self.process("a").signals, [])
        other.release()
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual(manager.counters("a").unloads, {"idle": 1})

    def test_keepAliveShortens(self) -> None:
        """
        A keep-alive replaces the model's idle timeout from that request on.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}], idle_timeout_seconds=3600)
        self.loadIdle("a")
        self.successResultOf(manager.acquire("a", RequestOptions(keepAlive=5))).release()
        self.reactor.advance(5)
        manager.reapIdle()
        self.assertEqual(self.status("a"), "unloading")


class DefectTests(ManagerTestsMixin, SynchronousTestCase):
    """
    The defects issue 8 names, as the manager shows them.
    """

    def test_shutdownDuringEvictionSignalsOnce(self) -> None:
        """
        A shutdown that arrives while a model is being evicted sends it one
        TERM and one KILL, not two of each.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"])
        self.loadIdle("a")
        manager.acquire("b").addErrback(lambda f: None)
        self.assertEqual(self.process("a").signals, ["TERM"])
        stopped = manager.stopService()
        self.reactor.advance(5)
        self.assertEqual(self.process("a").signals, ["TERM", "KILL"])
        self.process("a").exit(ProcessTerminated(signal=9))
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(self.process("a").signals, ["TERM", "KILL"])

    def test_portRetryNotRecordedAsFailure(self) -> None:
        """
        A load retried on another port is never written to the store as
        C{failed}.
        """
        statuses: list[str] = []

        class Recording(MemoryStateStore):
            def save(self, row: Any) -> defer.Deferred[None]:
                statuses.append(row["status"])
                return super().save(row)

        manager = self.makeManager([{"name": "a", "vram_mb": 600}], start=False)
        manager.store = Recording()
        manager.startService()
        d = manager.acquire("a")
        self.process("a").output(b"couldn't bind HTTP server socket\n")
        self.process("a").exit(ProcessTerminated(exitCode=1))
        self.makeReady("a")
        self.successResultOf(d).release()
        self.assertNotIn("failed", statuses)
        self.assertEqual(statuses[-1], "loaded")


class QueueTimeoutTests(ManagerTestsMixin, SynchronousTestCase):
    """
    No request waits for memory longer than its queue timeout, whatever
    happens to its model meanwhile.
    """

    def test_waitedThroughLoadThatEndedUnserved(self) -> None:
        """
        A request whose queue timeout passed while its model loaded, and
        whose load then ended without serving it (its port was taken) while
        another load took the memory, is refused at once, not left waiting.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"], queue_timeout_seconds=3)
        forA = manager.acquire("a")
        self.reactor.advance(0.5)
        forB = manager.acquire("b", RequestOptions(priority=10, queueTimeout=60))
        self.reactor.advance(4)
        self.assertNoResult(forA)
        self.process("a").output(b"couldn't bind HTTP server socket\n")
        self.process("a").exit(ProcessTerminated(exitCode=1))
        self.assertEqual(self.failureResultOf(forA, NoCapacity).value.waitedSeconds, 3)
        self.makeReady("b")
        self.successResultOf(forB).release()

    def test_loadServesItsWaitersFirst(self) -> None:
        """
        A model that loaded for waiting requests serves them before a load
        of higher priority that waits for its memory can evict it: a load
        is never wasted.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"], queue_timeout_seconds=3)
        forA = manager.acquire("a")
        forB = manager.acquire("b", RequestOptions(priority=10, queueTimeout=60))
        self.reactor.advance(4)
        self.makeReady("a")
        lease = self.successResultOf(forA)
        self.assertEqual(self.process("a").signals, [])
        lease.release()
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.process("a").exit()
        self.makeReady("b")
        self.successResultOf(forB).release()

    def test_heldRefusalSaysWhy(self) -> None:
        """
        A request refused because its loaded model gives way to a waiting
        load says so, naming that load's model.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"], queue_timeout_seconds=2)
        lease = self.loadedLease("a")
        manager.acquire("b", RequestOptions(queueTimeout=60)).addErrback(lambda f: None)
        forA = manager.acquire("a")
        self.reactor.advance(2)
        error = self.failureResultOf(forA, NoCapacity).value
        self.assertEqual(error.givingWayTo, "b")
        self.assertIn("gives way to model 'b'", str(error))
        lease.release()

    def test_zeroWaitsForIdleEviction(self) -> None:
        """
        A queue timeout of 0 for a model that fits once idle models are
        stopped is not refused: the idle ones are stopped and it loads.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600} for n in "ab"])
        self.loadIdle("a")
        d = manager.acquire("b", RequestOptions(queueTimeout=0))
        self.assertNoResult(d)
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.process("a").exit()
        self.makeReady("b")
        self.successResultOf(d).release()

    def test_zeroWaitsForOwnExit(self) -> None:
        """
        A queue timeout of 0 for a model whose previous backend is still
        exiting is not refused: it loads again once that one is gone.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}])
        d = manager.acquire("a", RequestOptions(keepAlive=0))
        self.makeReady("a")
        self.successResultOf(d).release()
        self.assertEqual(self.status("a"), "unloading")
        again = manager.acquire("a", RequestOptions(queueTimeout=0))
        self.assertNoResult(again)
        self.process("a").exit()
        self.makeReady("a")
        self.successResultOf(again).release()

    def test_refusedKeepAliveForgotten(self) -> None:
        """
        The keep-alive of a request that was refused does not become the
        model's idle timeout: only a served request's does.
        """
        manager = self.makeManager([{"name": n, "vram_mb": 600, "unload_time": 3} for n in "ab"])
        lease = self.loadedLease("a")
        self.failureResultOf(manager.acquire("b", RequestOptions(queueTimeout=0, keepAlive=-1)), NoCapacity)
        lease.release()
        forB = manager.acquire("b")
        self.process("a").exit()
        self.makeReady("b")
        self.successResultOf(forB).release()
        self.reactor.advance(5)
        manager.reapIdle()
        self.assertEqual(self.status("b"), "unloading")
