"""
Tests for L{dynllm.runner}: one backend run (spawn, readiness probes, load
timeout, stop), the port finder and the description of exits.

The fakes (a reactor that spawns fake processes, and a backend whose readiness
the test decides) are those of L{dynllm.testing}.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dynllm.config import ModelConfig
from dynllm.interfaces import IBackend
from dynllm.runner import (
    FAILURE_LOG_LINES,
    FIRST_PROBE_DELAY,
    MAX_PROBE_DELAY,
    PROBE_BACKOFF,
    BackendRun,
    NoFreePort,
    describeExit,
    findFreePort,
)
from dynllm.testing import FakeBackend, FakeProcessReactor
from tests.support import freePortRange


def makeModel(name: str = "m", **kw: Any) -> ModelConfig:
    """
    @return: a L{ModelConfig} built directly (no file checks).
    """
    return ModelConfig(name=name, path="/models/" + name, backend="llamacpp", vram_mb=100, **kw)


class FakesTests(SynchronousTestCase):
    """
    Tests for the fakes themselves.
    """

    def test_fakeBackendProvidesIBackend(self) -> None:
        """
        L{FakeBackend} provides L{IBackend}, so the code under test uses it
        the way it uses a real backend.
        """
        self.assertTrue(verifyObject(IBackend, FakeBackend()))


class BackendRunTests(SynchronousTestCase):
    """
    Tests for L{BackendRun}.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.backend = FakeBackend(self.reactor)

    def makeRun(self, model: ModelConfig | None = None, killTime: float = 5.0) -> BackendRun:
        return BackendRun(
            model=model or makeModel(),
            backend=self.backend,
            port=40123,
            reactor=self.reactor,
            http=None,
            binary="fake-server",
            killTime=killTime,
            newSession=False,
        )

    def advanceToNextCall(self) -> None:
        """
        Move the clock just past the earliest pending call.
        """
        nextTime = min(c.getTime() for c in self.reactor.getDelayedCalls())
        self.reactor.advance(nextTime - self.reactor.seconds() + 1e-9)

    def test_baseURL(self) -> None:
        """
        L{BackendRun.baseURL} is the loopback address on the run's port.
        """
        self.assertEqual(self.makeRun().baseURL, "http://127.0.0.1:40123")

    def test_startSpawnsBackendArgv(self) -> None:
        """
        L{BackendRun.start} spawns the backend's command line (without a
        C{setsid} prefix when C{newSession} is off), with the backend's
        environment, overridden by the model's C{env}, on top of ours less
        what the backend must not inherit.
        """
        self.backend.env = {"FROM_BACKEND": "b", "SHARED": "backend", "HOME": None}
        run = self.makeRun(makeModel(env={"SHARED": "model"}))
        run.start()
        self.assertNotIn("HOME", self.reactor.spawned[0].env)
        [transport] = self.reactor.spawned
        self.assertEqual(transport.executable, "fake-server")
        self.assertEqual(transport.args, ["fake-server", "m", "40123"])
        self.assertEqual(transport.env["FROM_BACKEND"], "b")
        self.assertEqual(transport.env["SHARED"], "model")
        self.assertEqual(transport.env.get("PATH"), os.environ.get("PATH"))
        self.assertEqual(run.process.pid, transport.pid)

    def test_keyInEnvironmentOnly(self) -> None:
        """
        A backend with keys gets a fresh random key per run in its
        L{IBackend.keyVariable}, overriding one the model's C{env} or ours
        would give, and never on its command line (which every local user
        can read in C{/proc/PID/cmdline}).
        """
        self.patch(os, "environ", dict(os.environ, FAKE_KEY="daemon's"))
        first = self.makeRun(makeModel(env={"FAKE_KEY": "model's"}))
        second = self.makeRun()
        first.start()
        second.start()
        [one, two] = self.reactor.spawned
        assert first.apiKey is not None and second.apiKey is not None
        self.assertGreaterEqual(len(first.apiKey), 32)
        self.assertNotEqual(first.apiKey, second.apiKey)
        self.assertEqual(one.env["FAKE_KEY"], first.apiKey)
        self.assertEqual(two.env["FAKE_KEY"], second.apiKey)
        for transport, run in ((one, first), (two, second)):
            self.assertFalse(any(run.apiKey in arg for arg in transport.args))

    def test_keyNotInRepr(self) -> None:
        """
        The key is in no C{repr} of the run or of its process, so that it
        cannot reach a log by accident.
        """
        run = self.makeRun()
        run.start()
        assert run.apiKey is not None
        self.assertNotIn(run.apiKey, repr(run))
        self.assertNotIn(run.apiKey, repr(run.process))

    def test_noKeyWithoutKeyVariable(self) -> None:
        """
        A backend without keys (no L{IBackend.keyVariable}) gets none, and
        the run has no C{apiKey} for the relay to send.
        """
        self.backend.keyVariable = None
        run = self.makeRun()
        run.start()
        self.assertIsNone(run.apiKey)
        self.assertNotIn("FAKE_KEY", self.reactor.spawned[0].env)

    def test_startSpawnErrorRaises(self) -> None:
        """
        If the program cannot be spawned, L{BackendRun.start} raises the
        L{OSError} and leaves no probe or timeout pending.
        """
        self.reactor.spawnError = OSError(2, "No such file or directory")
        run = self.makeRun()
        self.assertRaises(OSError, run.start)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_probesBackOff(self) -> None:
        """
        The first probe is sent L{FIRST_PROBE_DELAY} after the spawn; each
        later one waits L{PROBE_BACKOFF} times longer than the previous
        wait, up to L{MAX_PROBE_DELAY}.
        """
        run = self.makeRun()
        run.start()
        loaded = run.whenReady()
        count = 30
        while len(self.backend.probes) < count:
            self.advanceToNextCall()
        times = [0.0] + [t for _, t in self.backend.probes]
        gaps = [b - a for a, b in zip(times, times[1:])]
        expected = [FIRST_PROBE_DELAY]
        while len(expected) < count:
            expected.append(min(expected[-1] * PROBE_BACKOFF, MAX_PROBE_DELAY))
        self.assertEqual(expected[-1], MAX_PROBE_DELAY)
        for gap, want in zip(gaps, expected):
            self.assertAlmostEqual(gap, want, places=7)
        self.assertNoResult(loaded)

    def test_readyStopsProbing(self) -> None:
        """
        Once a probe answers C{True} the load Deferred fires, the load
        timeout is cancelled and no more probes are sent.
        """
        run = self.makeRun()
        run.start()
        loaded = run.whenReady()
        self.reactor.advance(1)
        self.assertNoResult(loaded)
        self.backend.ready.add("m")
        self.reactor.advance(MAX_PROBE_DELAY)
        self.assertIsNone(self.successResultOf(loaded))
        self.assertTrue(run.ready)
        probes = len(self.backend.probes)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(100)
        self.assertEqual(len(self.backend.probes), probes)

    def test_exitWhileLoadingStopsProbing(self) -> None:
        """
        A backend that exits before it is ready is never reported ready,
        probing stops, L{BackendRun.whenExited} fires with how it exited,
        and L{BackendRun.logTail} keeps its last lines (the last one
        flushed on exit).
        """
        run = self.makeRun()
        run.start()
        loaded = run.whenReady()
        self.reactor.advance(0.5)
        [transport] = self.reactor.spawned
        transport.output(b"".join(b"line %d\n" % i for i in range(10)))
        transport.output(b"fatal: no memory")  # no newline: flushed on exit
        transport.exit(ProcessTerminated(exitCode=1))
        self.assertEqual(describeExit(self.successResultOf(run.whenExited())), "exited with code 1")
        self.assertNoResult(loaded)
        tail = run.logTail()
        self.assertEqual(len(tail), FAILURE_LOG_LINES)
        self.assertEqual((tail[0], tail[-1]), ("line 6", "fatal: no memory"))
        probes = len(self.backend.probes)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(100)
        self.assertEqual(len(self.backend.probes), probes)

    def test_portTaken(self) -> None:
        """
        L{BackendRun.portTaken} is true when the backend's output says its
        port was taken (llama-server's and the C library's messages).
        """
        for line in (b"couldn't bind HTTP server socket\n", b"OSError: [Errno 98] Address already in use\n"):
            run = self.makeRun()
            run.start()
            self.assertFalse(run.portTaken())
            self.reactor.spawned[-1].output(line)
            self.assertTrue(run.portTaken())

    def test_probeAnsweringAfterExitIgnored(self) -> None:
        """
        A probe that answers C{True} after the backend has exited does not
        make the run ready, and no further probe is scheduled.
        """
        self.backend.manual = True
        run = self.makeRun()
        run.start()
        loaded = run.whenReady()
        self.reactor.advance(FIRST_PROBE_DELAY)
        [probe] = self.backend.pendingProbes
        self.reactor.spawned[0].exit(ProcessTerminated(exitCode=1))
        probe.callback(True)
        self.assertNoResult(loaded)
        self.assertFalse(run.ready)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_readyHintProbesAtOnce(self) -> None:
        """
        An output line for which L{IBackend.readyHint} is true sends a probe
        at once, without waiting for the scheduled one.
        """
        run = self.makeRun()
        run.start()
        loaded = run.whenReady()
        self.backend.ready.add("m")
        self.reactor.spawned[0].output(b"not yet\n")
        self.assertEqual(self.backend.probes, [])
        self.reactor.spawned[0].output(b"server READY\n")
        self.assertEqual(self.backend.probes, [("m", 0.0)])
        self.assertIsNone(self.successResultOf(loaded))

    def test_readyHintWhileProbingProbesAgain(self) -> None:
        """
        A ready hint that arrives while a probe is in flight makes the run
        probe again as soon as that probe answers C{False}, instead of
        waiting for the next scheduled probe.
        """
        self.backend.manual = True
        run = self.makeRun()
        run.start()
        self.reactor.advance(FIRST_PROBE_DELAY)
        self.assertEqual(len(self.backend.pendingProbes), 1)
        self.reactor.spawned[0].output(b"READY\n")
        self.assertEqual(len(self.backend.pendingProbes), 1)
        self.backend.pendingProbes[0].callback(False)
        self.assertEqual(len(self.backend.pendingProbes), 2)

    def test_readyHintAfterReadyIgnored(self) -> None:
        """
        Ready hints after the run is ready send no probe.
        """
        run = self.makeRun()
        run.start()
        loaded = run.whenReady()
        self.backend.ready.add("m")
        self.reactor.advance(FIRST_PROBE_DELAY)
        self.successResultOf(loaded)
        probes = len(self.backend.probes)
        self.reactor.spawned[0].output(b"READY\n")
        self.assertEqual(len(self.backend.probes), probes)

    def test_stopStopsProbing(self) -> None:
        """
        L{BackendRun.stop} while loading sends TERM and stops probing; a
        probe in flight that then answers C{True} does not make the run
        ready.
        """
        self.backend.manual = True
        run = self.makeRun()
        run.start()
        loaded = run.whenReady()
        self.reactor.advance(FIRST_PROBE_DELAY)
        [probe] = self.backend.pendingProbes
        run.stop()
        [transport] = self.reactor.spawned
        self.assertEqual(transport.signals, ["TERM"])
        probe.callback(True)
        self.assertNoResult(loaded)
        self.assertFalse(run.ready)
        transport.exit()
        self.reactor.advance(10)
        self.assertEqual(len(self.backend.pendingProbes), 1)
        self.assertEqual(transport.signals, ["TERM"])

    def test_secondStopJoinsFirst(self) -> None:
        """
        A second L{BackendRun.stop} while the first is pending sends no
        second TERM and schedules no second KILL; both fire on the exit.
        """
        run = self.makeRun(killTime=3)
        run.start()
        [transport] = self.reactor.spawned
        first = run.stop()
        second = run.stop()
        self.assertEqual(transport.signals, ["TERM"])
        self.reactor.advance(3)
        self.assertEqual(transport.signals, ["TERM", "KILL"])
        transport.exit(ProcessTerminated(signal=9))
        self.assertIsInstance(self.successResultOf(first), ProcessTerminated)
        self.assertIsInstance(self.successResultOf(second), ProcessTerminated)
        self.reactor.advance(10)
        self.assertEqual(transport.signals, ["TERM", "KILL"])

    def test_stopFiresOnRealExit(self) -> None:
        """
        L{BackendRun.stop} sends TERM, then KILL after C{killTime} if the
        backend is still running, and fires with the exit reason only
        once it has exited.
        """
        run = self.makeRun(killTime=3)
        run.start()
        loaded = run.whenReady()
        self.backend.ready.add("m")
        self.reactor.advance(FIRST_PROBE_DELAY)
        self.successResultOf(loaded)
        [transport] = self.reactor.spawned
        stopped = run.stop()
        self.assertEqual(transport.signals, ["TERM"])
        self.assertNoResult(stopped)
        self.reactor.advance(3)
        self.assertEqual(transport.signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        transport.exit(ProcessTerminated(signal=9))
        self.assertIsInstance(self.successResultOf(stopped), ProcessTerminated)

    def test_stopNoKillAfterExit(self) -> None:
        """
        A backend that exits after TERM gets no KILL later.
        """
        run = self.makeRun(killTime=3)
        run.start()
        self.backend.ready.add("m")
        self.reactor.advance(FIRST_PROBE_DELAY)
        [transport] = self.reactor.spawned
        stopped = run.stop()
        transport.exit()
        self.assertIsInstance(self.successResultOf(stopped), ProcessDone)
        self.reactor.advance(10)
        self.assertEqual(transport.signals, ["TERM"])

    def test_logTail(self) -> None:
        """
        L{BackendRun.logTail} is the last lines the backend printed on
        stdout and stderr, without empty lines.
        """
        run = self.makeRun()
        run.start()
        transport = self.reactor.spawned[0]
        transport.output(b"one\n\ntwo\r\n", fd=1)
        transport.output(b"three\n", fd=2)
        self.assertEqual(run.logTail(), ["one", "two", "three"])
        self.assertEqual(run.logTail(2), ["two", "three"])


def freePortBlock(size: int) -> int:
    """
    @return: the first of C{size} consecutive ports that can all be bound
        on 127.0.0.1 now.
    """
    return freePortRange(size)[0]


class FindFreePortTests(SynchronousTestCase):
    """
    Tests for L{findFreePort}.
    """

    def setUp(self) -> None:
        self.start = freePortBlock(5)
        self.end = self.start + 4

    def bind(self, port: int) -> None:
        """
        Hold C{port} on 127.0.0.1 until the end of the test.
        """
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", port))

    def test_first(self) -> None:
        """
        With nothing taken and no C{after}, the first port of the range is
        chosen.
        """
        self.assertEqual(findFreePort(self.start, self.end, ()), self.start)

    def test_skipsTaken(self) -> None:
        """
        Ports in C{taken} (held by our own backends) are skipped.
        """
        taken = {self.start, self.start + 1}
        self.assertEqual(findFreePort(self.start, self.end, taken), self.start + 2)

    def test_skipsBound(self) -> None:
        """
        Ports that another socket holds are skipped.
        """
        self.bind(self.start)
        self.bind(self.start + 1)
        self.assertEqual(findFreePort(self.start, self.end, ()), self.start + 2)

    def test_startsAfterLastPort(self) -> None:
        """
        With C{after}, the search starts just past it.
        """
        self.assertEqual(findFreePort(self.start, self.end, (), after=self.start + 1), self.start + 2)

    def test_wrapsRoundRobin(self) -> None:
        """
        The search wraps to the start of the range after its end, and reaches
        C{after} itself last.
        """
        self.assertEqual(findFreePort(self.start, self.end, (), after=self.end), self.start)
        taken = {self.start + 3, self.end, self.start}
        self.assertEqual(findFreePort(self.start, self.end, taken, after=self.start + 2), self.start + 1)
        taken = set(range(self.start, self.end + 1)) - {self.start + 2}
        self.assertEqual(findFreePort(self.start, self.end, taken, after=self.start + 2), self.start + 2)

    def test_afterOutsideRangeIgnored(self) -> None:
        """
        An C{after} outside the range (the range changed) is ignored.
        """
        self.assertEqual(findFreePort(self.start, self.end, (), after=self.end + 10), self.start)
        self.assertEqual(findFreePort(self.start, self.end, (), after=self.start - 1), self.start)

    def test_noFreePortAllTaken(self) -> None:
        """
        L{NoFreePort} is raised, naming the range, when every port is taken.
        """
        taken = set(range(self.start, self.end + 1))
        e = self.assertRaises(NoFreePort, findFreePort, self.start, self.end, taken, self.start)
        self.assertIn(f"{self.start}-{self.end}", str(e))

    def test_noFreePortAllBound(self) -> None:
        """
        L{NoFreePort} is raised when every port is bound by someone else.
        """
        self.bind(self.start)
        self.bind(self.start + 1)
        self.assertRaises(NoFreePort, findFreePort, self.start, self.start + 1, ())


class DescribeExitTests(SynchronousTestCase):
    """
    Tests for L{describeExit}.
    """

    def test_cleanExit(self) -> None:
        """
        L{ProcessDone} is described as exiting with code 0.
        """
        self.assertEqual(describeExit(ProcessDone(0)), "exited with code 0")

    def test_exitCode(self) -> None:
        """
        L{ProcessTerminated} with an exit code is described with that code.
        """
        self.assertEqual(describeExit(ProcessTerminated(exitCode=3)), "exited with code 3")

    def test_signal(self) -> None:
        """
        L{ProcessTerminated} with a signal is described with the signal.
        """
        self.assertEqual(describeExit(ProcessTerminated(signal=9)), "was killed by signal 9")
