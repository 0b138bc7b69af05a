"""
Tests for L{dynllm.lifecycle}: one model's lifecycle machine, transition by
transition, on a fake process reactor and clock.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.trial.unittest import SynchronousTestCase

from dynllm.config import ModelConfig
from dynllm.exceptions import LoadFailed, LoadTimedOut
from dynllm.lifecycle import (
    PORT_RETRIES,
    ModelCore,
    ModelLifecycle,
    Waiter,
    makeLifecycle,
)
from dynllm.runner import MAX_PROBE_DELAY, BackendRun
from dynllm.testing import FakeBackend, FakeProcessReactor, FakeProcessTransport


class LifecycleTestCase(SynchronousTestCase):
    """
    A model's machine on a fake reactor, whose records and change
    notices are kept.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.backend = FakeBackend(self.reactor)
        self.model = ModelConfig(name="m", path="/models/m", backend="llamacpp", vram_mb=100)
        self.records: list[tuple[str, int | None]] = []
        self.changes = 0
        self.core = ModelCore(
            config=self.model,
            backend=self.backend,
            clock=self.reactor,
            loadTimeout=30.0,
            record=self.record,
            changed=self.changed,
        )
        self.machine: ModelLifecycle = makeLifecycle(self.core)

    def record(self, core: ModelCore) -> None:
        pid = core.run.process.pid if core.run is not None else None
        self.records.append((core.status, pid))

    def changed(self) -> None:
        self.changes += 1

    def statuses(self) -> list[str]:
        return [status for status, _ in self.records]

    def startLoad(self) -> FakeProcessTransport:
        """
        Spawn a run and give it to the machine.

        @return: its process.
        """
        run = BackendRun(
            model=self.model,
            backend=self.backend,
            port=40000 + len(self.reactor.spawned),
            reactor=self.reactor,
            http=None,
            binary="fake-server",
            killTime=5.0,
            newSession=False,
            ring=self.core.log,
        )
        run.start()
        self.core.outbox.send(self.machine.load, run)
        return self.reactor.spawned[-1]

    def makeReady(self) -> None:
        self.backend.ready.add("m")
        self.reactor.advance(MAX_PROBE_DELAY)

    def addWaiter(self) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.core.waiters.append(Waiter(d, self.reactor.seconds(), 0, 60.0))
        return d

    def stop(self, cause: str = "request") -> defer.Deferred[None]:
        done: defer.Deferred[None] = defer.Deferred()
        self.core.outbox.send(self.machine.stop, cause, done)
        return done


class LoadTests(LifecycleTestCase):
    """
    From no process to loaded, or to a failed load.
    """

    def test_loadRecordsLoading(self) -> None:
        """
        C{load} takes an unloaded model to C{loading}, recorded once with
        its process, and tells the scheduler.
        """
        process = self.startLoad()
        self.assertEqual(self.records, [("loading", process.pid)])
        self.assertEqual(self.core.status, "loading")
        self.assertEqual(self.changes, 1)

    def test_readyRecordsLoaded(self) -> None:
        """
        A ready backend takes the model to C{loaded}: recorded once, the
        load counted with its duration, and a tenancy open for leases.
        """
        self.startLoad()
        self.reactor.advance(2)
        self.makeReady()
        self.assertEqual(self.statuses(), ["loading", "loaded"])
        self.assertEqual(self.core.loads, 1)
        self.assertAlmostEqual(self.core.loadSeconds, 2 + MAX_PROBE_DELAY, places=6)
        self.assertIsNotNone(self.core.tenancy)
        self.assertEqual(self.core.loadedAt, self.reactor.seconds())

    def test_readyCancelsLoadTimer(self) -> None:
        """
        Once loaded, the load timeout no longer applies: nothing is left
        scheduled, and the model stays loaded past it.
        """
        process = self.startLoad()
        self.makeReady()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(100)
        self.assertEqual(self.core.status, "loaded")
        self.assertEqual(process.signals, [])

    def test_exitWhileLoadingFails(self) -> None:
        """
        A backend that exits while loading takes the model to C{failed}:
        its waiters get L{LoadFailed} with how it exited and its last lines,
        which are also the model's C{lastError}; the failure is counted.
        """
        process = self.startLoad()
        waiter = self.addWaiter()
        process.output(b"error: out of memory\n")
        process.exit(ProcessTerminated(exitCode=1))
        error = self.failureResultOf(waiter, LoadFailed).value
        self.assertEqual(error.logTail, ("error: out of memory",))
        self.assertIn("exited with code 1 while loading", str(error))
        self.assertEqual(self.statuses(), ["loading", "failed"])
        self.assertEqual(self.core.lastError, str(error))
        self.assertEqual(self.core.loadFailures, 1)
        self.assertIsNone(self.core.run)

    def test_spawnFailed(self) -> None:
        """
        C{spawnFailed} takes the model to C{failed} and answers its waiters
        with the error.
        """
        waiter = self.addWaiter()
        error = LoadFailed("m", "cannot start model 'm': no free port")
        self.core.outbox.send(self.machine.spawnFailed, error)
        self.assertIs(self.failureResultOf(waiter, LoadFailed).value, error)
        self.assertEqual(self.statuses(), ["failed"])
        self.assertEqual(self.core.loadFailures, 1)

    def test_loadAfterFailure(self) -> None:
        """
        A failed model loads again on C{load}, and its C{lastError} is
        cleared when it does.
        """
        self.startLoad().exit(ProcessTerminated(exitCode=1))
        self.startLoad()
        self.assertIsNone(self.core.lastError)
        self.makeReady()
        self.assertEqual(self.statuses(), ["loading", "failed", "loading", "loaded"])

    def test_portTakenGoesBackToUnloaded(self) -> None:
        """
        A backend that exits because its port was taken takes the model back
        to C{unloaded}, not C{failed}: its waiters keep waiting, no failure
        is counted or recorded, and the scheduler is told so that it starts
        the load again.
        """
        process = self.startLoad()
        waiter = self.addWaiter()
        process.output(b"couldn't bind HTTP server socket\n")
        changes = self.changes
        process.exit(ProcessTerminated(exitCode=1))
        self.assertNoResult(waiter)
        self.assertEqual(self.statuses(), ["loading", "unloaded"])
        self.assertEqual((self.core.loadFailures, self.core.lastError), (0, None))
        self.assertEqual(self.changes, changes + 1)
        self.startLoad()
        self.makeReady()
        self.assertEqual(self.statuses(), ["loading", "unloaded", "loading", "loaded"])

    def test_portTakenTooOftenFails(self) -> None:
        """
        After L{PORT_RETRIES} port conflicts in a row, the next one is a
        failed load.
        """
        waiter = self.addWaiter()
        for _ in range(PORT_RETRIES + 1):
            process = self.startLoad()
            process.output(b"Address already in use\n")
            process.exit(ProcessTerminated(exitCode=1))
        self.failureResultOf(waiter, LoadFailed)
        self.assertEqual(self.statuses()[-1], "failed")
        self.assertNotIn("failed", self.statuses()[:-1])


class TimeoutTests(LifecycleTestCase):
    """
    A load that takes longer than its load timeout.
    """

    def test_timeoutFailsWaitersAndStops(self) -> None:
        """
        At the load timeout, the waiters get L{LoadTimedOut} at once and the
        backend gets TERM; the model shows C{unloading} (it holds its
        memory until it exits), then C{failed}.
        """
        process = self.startLoad()
        waiter = self.addWaiter()
        self.reactor.advance(29.9)
        self.assertNoResult(waiter)
        self.reactor.advance(0.1)
        self.assertEqual(self.failureResultOf(waiter, LoadTimedOut).value.seconds, 30)
        self.assertEqual(process.signals, ["TERM"])
        self.assertEqual(self.statuses(), ["loading", "unloading"])
        process.exit(ProcessTerminated(signal=15))
        self.assertEqual(self.statuses(), ["loading", "unloading", "failed"])
        self.assertIn("load timeout of 30s", self.core.lastError or "")

    def test_stopWhileFailingJoins(self) -> None:
        """
        A stop while a timed-out load is being stopped sends no second
        signal and fires on the exit.
        """
        process = self.startLoad()
        self.reactor.advance(30)
        done = self.stop("shutdown")
        self.assertEqual(process.signals, ["TERM"])
        self.assertNoResult(done)
        process.exit()
        self.successResultOf(done)
        self.assertEqual(self.core.status, "failed")


class StopTests(LifecycleTestCase):
    """
    Stopping a model, whatever state it is in.
    """

    def test_stopWithoutProcess(self) -> None:
        """
        A stop of a model without a process fires at once and records
        nothing.
        """
        self.successResultOf(self.stop())
        self.assertEqual(self.records, [])

    def test_stopFailed(self) -> None:
        """
        A stop of a failed model fires at once, records nothing and keeps
        its last error.
        """
        self.startLoad().exit(ProcessTerminated(exitCode=1))
        records = list(self.records)
        self.successResultOf(self.stop())
        self.assertEqual(self.records, records)
        self.assertEqual(self.core.status, "failed")
        self.assertIsNotNone(self.core.lastError)

    def test_stoppedLoadWithPortMessage(self) -> None:
        """
        A load stopped before it was ready whose output says its port was
        taken ends C{unloaded} like any stopped load: the stop is done, and
        no retry or failure follows.
        """
        process = self.startLoad()
        process.output(b"couldn't bind HTTP server socket\n")
        done = self.stop("abandoned")
        process.exit(ProcessTerminated(exitCode=1))
        self.successResultOf(done)
        self.assertEqual(self.statuses(), ["loading", "unloading", "unloaded"])
        self.assertEqual((self.core.portConflicts, self.core.loadFailures), (0, 0))

    def test_stopLoaded(self) -> None:
        """
        A stop of a loaded model sends TERM, records C{unloading} and counts
        the cause; it fires only once the backend has exited, when the
        model is C{unloaded}.
        """
        process = self.startLoad()
        self.makeReady()
        done = self.stop("idle")
        self.assertEqual(process.signals, ["TERM"])
        self.assertNoResult(done)
        self.assertEqual(self.core.unloads, {"idle": 1})
        process.exit()
        self.successResultOf(done)
        self.assertEqual(self.statuses(), ["loading", "loaded", "unloading", "unloaded"])
        self.assertIsNone(self.core.tenancy)

    def test_stopLoading(self) -> None:
        """
        A stop of a loading model sends TERM and cancels its load timeout:
        no failure is recorded, and it ends C{unloaded}.
        """
        process = self.startLoad()
        done = self.stop("abandoned")
        process.exit(ProcessTerminated(signal=15))
        self.successResultOf(done)
        self.reactor.advance(100)
        self.assertEqual(self.statuses(), ["loading", "unloading", "unloaded"])
        self.assertEqual((self.core.loadFailures, self.core.lastError), (0, None))
        self.assertEqual(process.signals, ["TERM"])

    def test_stopWhileStoppingJoins(self) -> None:
        """
        A stop while stopping (a shutdown during an eviction) joins the
        pending stop: one TERM, one KILL after C{killTime}, one record of
        each transition, and both stops fire on the exit.
        """
        process = self.startLoad()
        self.makeReady()
        first = self.stop("evicted")
        second = self.stop("shutdown")
        self.reactor.advance(5)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        process.exit(ProcessTerminated(signal=9))
        self.successResultOf(first)
        self.successResultOf(second)
        self.reactor.advance(10)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertEqual(self.statuses(), ["loading", "loaded", "unloading", "unloaded"])
        self.assertEqual(self.core.unloads, {"evicted": 1})

    def test_keepAliveForgottenOnUnload(self) -> None:
        """
        The idle timeout a request set lasts until the model is unloaded.
        """
        process = self.startLoad()
        self.makeReady()
        self.core.keepAlive = -1
        self.stop()
        process.exit()
        self.assertIsNone(self.core.keepAlive)


class CrashTests(LifecycleTestCase):
    """
    A loaded backend that dies.
    """

    def test_crashWhileLoaded(self) -> None:
        """
        A loaded backend that exits takes the model to C{failed} with the
        reason as C{lastError}; the crash is counted and the tenancy is
        closed.
        """
        process = self.startLoad()
        self.makeReady()
        tenancy = self.core.tenancy
        assert tenancy is not None
        tenancy.leases.update({object(), object()})
        process.exit(ProcessTerminated(exitCode=139))
        self.assertEqual(self.statuses(), ["loading", "loaded", "failed"])
        self.assertEqual(self.core.lastError, "backend exited with code 139 while loaded")
        self.assertEqual((self.core.crashes, self.core.active), (1, 0))
