"""
Tests for L{dynllm.process}: real child processes run by the real reactor,
stopped with TERM then KILL to their process group, their output drained.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from twisted.internet import defer, error, reactor, task
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from dynllm import process as process_module
from dynllm.process import BackendProcessProtocol, LogRing, ManagedProcess, processStartTime, signalGroup
from tests.support import waitFor


async def pollUntil(predicate, seconds: float = 5.0) -> bool:
    """
    Wait on the real reactor until C{predicate()} is true or C{seconds}
    have passed.

    @return: the last value of C{predicate()}.
    """
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.02, lambda: None)
    return predicate()


def gone(pid: int) -> bool:
    """
    @return: whether C{pid} has exited (no process, or only its zombie).
    """
    return processStartTime(pid) is None


def commandOf(pid: int) -> bytes | None:
    """
    @return: the program name (C{argv[0]}) C{pid} runs, or C{None} if it
        has exited.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0]
    except OSError:
        return None


def python(code: str) -> list[str]:
    """
    @return: the command line running C{code} with this Python.
    """
    return [sys.executable, "-c", code]


class ManagedProcessTests(TestCase):
    """
    L{ManagedProcess} runs a program in its own session and stops it for
    good.
    """

    timeout = 20

    def spawn(self, argv: list[str], **kw) -> ManagedProcess:
        """
        Start C{argv} as a L{ManagedProcess} in a new session; it is killed
        when the test ends if it still runs.
        """
        process = ManagedProcess("test-model", argv, reactor, newSession=True, **kw)
        process.start()

        async def cleanup() -> None:
            if process.running:
                process.killTime = 0
                await process.stop()
            # Let the reactor see the pipes close before the next test.
            transport = process._transport
            await pollUntil(lambda: not getattr(transport, "pipes", None))

        self.addCleanup(lambda: defer.ensureDeferred(cleanup()))
        return process

    def waitForLine(self, process: ManagedProcess, text: str) -> defer.Deferred[str]:
        """
        @return: a Deferred firing with the first line C{process} prints that
            contains C{text} (lines already printed count).
        """
        d: defer.Deferred[str] = defer.Deferred()
        previous = process.onLine

        def onLine(line: str) -> None:
            if previous is not None:
                previous(line)
            if text in line and not d.called:
                d.callback(line)

        process.onLine = onLine
        process._proto.onLine = onLine
        return d

    async def test_ownSession(self) -> None:
        """
        The program runs under the pid we were given (no extra fork), which
        is also its session and process group id, and its start time is
        recorded.
        """
        process = self.spawn(["sleep", "100"])
        self.assertTrue(process.running)
        self.assertTrue(await pollUntil(lambda: commandOf(process.pid) == b"sleep"))
        self.assertEqual(os.getsid(process.pid), process.pid)
        self.assertEqual(os.getpgid(process.pid), process.pid)
        self.assertEqual(process.startTime, processStartTime(process.pid))

    async def test_stopTerminates(self) -> None:
        """
        L{ManagedProcess.stop} sends TERM and fires after the exit, with the
        exit reason naming signal 15.
        """
        process = self.spawn(["sleep", "100"])
        pid = process.pid
        self.assertTrue(await pollUntil(lambda: commandOf(pid) == b"sleep"))
        reason = await process.stop()
        self.assertIsInstance(reason, error.ProcessTerminated)
        self.assertEqual(reason.signal, 15)
        self.assertFalse(process.running)
        self.assertTrue(gone(pid))

    async def test_stopRightAfterStart(self) -> None:
        """
        L{ManagedProcess.stop} called at once after L{ManagedProcess.start},
        before the child has made its new session, still terminates it with
        TERM rather than losing the TERM and waiting C{killTime} for a KILL.
        """
        # Widen the window between the spawn and the child's setsid, which
        # is otherwise a race: wait a moment before exec'ing the launcher.
        self.patch(
            process_module,
            "_LAUNCH_ARGV",
            ["sh", "-c", 'sleep 0.3; exec "$0" "$@"', *process_module._LAUNCH_ARGV],
        )
        process = self.spawn(["sleep", "100"], killTime=5)
        began = time.monotonic()
        reason = await process.stop()
        self.assertEqual(reason.signal, 15)
        self.assertLess(time.monotonic() - began, 4)

    async def test_stopKillsAfterKillTime(self) -> None:
        """
        A program that ignores TERM is sent KILL after C{killTime}, and
        L{ManagedProcess.stop} fires with signal 9.
        """
        process = self.spawn(
            python(
                "import signal, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\n"
                "time.sleep(100)\n"
            ),
            killTime=0.5,
        )
        await self.waitForLine(process, "ready")
        began = time.monotonic()
        reason = await process.stop()
        self.assertEqual(reason.signal, 9)
        self.assertGreaterEqual(time.monotonic() - began, 0.45)
        self.assertFalse(process.running)

    async def test_grandchildHoldingPipes(self) -> None:
        """
        When the program exits on TERM but leaves a grandchild (that ignores
        TERM) holding its output pipes, L{ManagedProcess.stop} fires on the
        program's own exit, without waiting for C{killTime}, and the
        grandchild is killed with the rest of the group.
        """
        process = self.spawn(
            ["sh", "-c", "(trap '' TERM; exec sleep 300) & echo child $!; wait"],
            killTime=10,
        )
        line = await self.waitForLine(process, "child ")
        grandchild = int(line.split()[1])
        self.assertFalse(gone(grandchild))
        began = time.monotonic()
        reason = await process.stop()
        self.assertLess(time.monotonic() - began, 5)
        self.assertEqual(reason.signal, 15)
        self.assertTrue(await pollUntil(lambda: gone(grandchild)), "grandchild still alive")

    async def test_naturalExit(self) -> None:
        """
        L{ManagedProcess.whenExited} fires with the exit status of a program
        that exits by itself; stopping it afterwards gives the same reason.
        """
        process = self.spawn(["sh", "-c", "exit 3"])
        reason = await process.whenExited()
        self.assertEqual(reason.exitCode, 3)
        self.assertFalse(process.running)
        self.assertIs(await process.stop(), reason)

    async def test_cannotRun(self) -> None:
        """
        A program the launcher cannot run exits with status 127, saying why
        on its stderr.
        """
        process = self.spawn(["/nonexistent/program"])
        reason = await process.whenEnded()
        self.assertEqual(reason.exitCode, 127)
        self.assertEqual(process.ring.tail(5), ["cannot run /nonexistent/program: No such file or directory"])

    def test_notStarted(self) -> None:
        """
        A program never started counts as exited cleanly.
        """
        process = ManagedProcess("m", ["true"], reactor)
        self.assertFalse(process.running)
        self.assertIsInstance(self.successResultOf(process.stop()), error.ProcessDone)

    def test_spawnFailure(self) -> None:
        """
        A program that cannot be run makes L{ManagedProcess.start} raise
        C{OSError} or exit at once with a failure status.
        """
        process = ManagedProcess("m", ["/nonexistent/program"], reactor, newSession=False)
        try:
            process.start()
        except OSError:
            return
        return process.whenExited().addCallback(
            lambda reason: self.assertIsInstance(reason, error.ProcessTerminated)
        )

    async def test_outputDrained(self) -> None:
        """
        Lines printed on stdout and stderr go into the ring, in order per
        stream, including a last line without a newline; blank lines are
        skipped; C{onLine} is called once per line.
        """
        seen: list[str] = []
        process = self.spawn(
            python(
                "import sys\n"
                "sys.stderr.write('err one\\nerr two\\n'); sys.stderr.flush()\n"
                "sys.stdout.write('out one\\r\\n\\nout two\\nout last'); sys.stdout.flush()\n"
            ),
            onLine=seen.append,
        )
        reason = await process.whenExited()
        self.assertIsInstance(reason, error.ProcessDone)
        tail = process.ring.tail(100)
        self.assertEqual(sorted(tail), sorted(["err one", "err two", "out one", "out two", "out last"]))
        self.assertEqual([l for l in tail if l.startswith("out")], ["out one", "out two", "out last"])
        self.assertEqual([l for l in tail if l.startswith("err")], ["err one", "err two"])
        self.assertEqual(seen, tail)

    async def test_tailOfThisRun(self) -> None:
        """
        L{ManagedProcess.tail} gives only the lines of this run, though the
        ring it shares with an earlier run (a model's) still holds that
        run's lines.
        """
        ring = LogRing()
        first = self.spawn(python("print('old one'); print('old two')"), ring=ring)
        await first.whenEnded()
        second = self.spawn(python("print('new')"), ring=ring)
        await second.whenEnded()
        self.assertEqual(ring.tail(5), ["old one", "old two", "new"])
        self.assertEqual(second.tail(5), ["new"])

    async def test_onLineChanged(self) -> None:
        """
        Setting C{onLine} on a running program takes effect for its next
        lines: C{None} stops the calls.
        """
        seen: list[str] = []
        process = self.spawn(
            python("import sys; print('one', flush=True); sys.stdin.readline(); print('two', flush=True)"),
            onLine=seen.append,
        )
        self.assertTrue(await pollUntil(lambda: seen == ["one"]))
        process.onLine = None
        process._transport.write(b"go\n")  # type: ignore[attr-defined]
        await process.whenEnded()
        self.assertEqual(seen, ["one"])
        self.assertEqual(process.ring.tail(2), ["one", "two"])

    async def test_lastLineWithoutNewlineAfterStop(self) -> None:
        """
        A partial last line is in the ring once L{ManagedProcess.stop} fires.
        """
        process = self.spawn(
            python(
                "import sys, time\n"
                "sys.stdout.write('ready\\npartial'); sys.stdout.flush()\n"
                "time.sleep(100)\n"
            )
        )
        await self.waitForLine(process, "ready")
        await process.stop()
        self.assertEqual(process.ring.tail(2), ["ready", "partial"])

    async def test_largeOutputDoesNotBlock(self) -> None:
        """
        A program printing 5 MB to stderr is drained as it goes, so it
        exits by itself; the ring keeps only its last lines.
        """
        process = self.spawn(
            python(
                "import sys\n"
                "line = 'x' * 99 + '\\n'\n"
                "for i in range(52428): sys.stderr.write(line)\n"
                "sys.stderr.write('done\\n')\n"
            )
        )
        reason = await process.whenExited()
        self.assertIsInstance(reason, error.ProcessDone)
        self.assertTrue(await pollUntil(lambda: process.ring.tail(1) == ["done"]))
        self.assertEqual(len(process.ring.tail(1000)), process.ring.size)

    async def test_longLineSplit(self) -> None:
        """
        Output without newlines is cut into bounded lines instead of being
        buffered whole.
        """
        process = self.spawn(
            python("import sys; sys.stdout.write('y' * 1000000); sys.stdout.flush()")
        )
        await process.whenExited()
        await pollUntil(lambda: sum(map(len, process.ring.tail(1000))) == 1000000)
        lines = process.ring.tail(1000)
        self.assertEqual(sum(map(len, lines)), 1000000)
        self.assertGreater(len(lines), 1)


def groupMembers(pgid: int) -> list[int]:
    """
    @return: the pids of the live (not zombie) processes in process group
        C{pgid}.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


#: A stand-in for the daemon: runs its arguments as a L{ManagedProcess} on
#: the real reactor and prints the backend's pid.
STAND_IN = """
import sys
from twisted.internet import reactor
from dynllm.process import ManagedProcess

process = ManagedProcess("m", sys.argv[1:], reactor)

def start():
    process.start()
    print(process.pid, flush=True)

reactor.callWhenRunning(start)
reactor.run()
"""


class DeathSignalTests(TestCase):
    """
    A backend dies with its daemon, even one killed by SIGKILL, and so does
    every process of its group (L{dynllm._launch}).
    """

    timeout = 30

    def standIn(self, argv: list[str]) -> tuple[subprocess.Popen[bytes], int]:
        """
        Start a stand-in daemon running C{argv} as its backend.

        @return: the stand-in and the backend's pid.
        """
        daemon = subprocess.Popen([sys.executable, "-c", STAND_IN, *argv], stdout=subprocess.PIPE)

        def cleanup() -> None:
            if daemon.poll() is None:
                daemon.kill()
            daemon.wait()
            daemon.stdout.close()

        self.addCleanup(cleanup)
        line = daemon.stdout.readline()
        self.assertTrue(line, "the stand-in daemon printed no pid")
        return daemon, int(line)

    def test_daemonKilled(self) -> None:
        """
        When the daemon is killed with SIGKILL, its backend, a process the
        backend forked and the guard are all gone within a few seconds.
        """
        daemon, pid = self.standIn(["sh", "-c", "sleep 300 & sleep 300 & wait"])
        # The backend, two children and the guard.
        self.assertTrue(waitFor(lambda: len(groupMembers(pid)) == 4), groupMembers(pid))
        daemon.kill()
        daemon.wait()
        began = time.monotonic()
        self.assertTrue(waitFor(lambda: not groupMembers(pid), timeout=5), groupMembers(pid))
        self.assertLess(time.monotonic() - began, 3)

    def test_backendKeepsPid(self) -> None:
        """
        The pid the daemon spawns is the backend's own (the launcher execs in
        place), and the group's leader.
        """
        daemon, pid = self.standIn(["sleep", "300"])
        self.assertTrue(waitFor(lambda: commandOf(pid) == b"sleep"))
        self.assertEqual(os.getpgid(pid), pid)

    def test_noSignalIgnored(self) -> None:
        """
        The backend starts with no standard signal (1 to 31) ignored: Python
        ignores SIGPIPE and SIGXFSZ, and an ignored signal would stay ignored
        across the launcher's exec. (Twisted's spawn leaves glibc's own
        signals, 32 and 33, ignored, which no program can act on.)
        """
        daemon, pid = self.standIn(["sleep", "300"])
        self.assertTrue(waitFor(lambda: commandOf(pid) == b"sleep"))
        with open(f"/proc/{pid}/status") as f:
            [ignored] = [int(line.split()[1], 16) for line in f if line.startswith("SigIgn:")]
        self.assertEqual(ignored & 0x7FFFFFFF, 0)

    def test_daemonGoneBeforeLaunch(self) -> None:
        """
        A launcher whose daemon is already gone when it starts runs nothing.
        """
        child = subprocess.Popen([*process_module._LAUNCH_ARGV, "1", "sleep", "300"], stderr=subprocess.PIPE)
        self.assertEqual(child.wait(timeout=10), 127)
        child.stderr.close()


class ProcessStartTimeTests(TestCase):
    """
    L{processStartTime} tells a running process from an exited one.
    """

    def test_running(self) -> None:
        """
        A running process has an integer start time, which does not change.
        """
        started = processStartTime(os.getpid())
        self.assertIsInstance(started, int)
        self.assertEqual(processStartTime(os.getpid()), started)

    def test_exited(self) -> None:
        """
        An exited and reaped process has none.
        """
        child = subprocess.Popen(["true"])
        child.wait()
        self.assertIsNone(processStartTime(child.pid))

    def test_zombie(self) -> None:
        """
        A process that exited but is not reaped yet (a zombie) has none.
        """
        child = subprocess.Popen(["true"])
        self.addCleanup(child.wait)
        deadline = time.monotonic() + 5
        while processStartTime(child.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertIsNone(processStartTime(child.pid))

    def test_oddCommandName(self) -> None:
        """
        A command name with spaces and parentheses is parsed correctly.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        program = os.path.join(directory, "a) b (c")
        shutil.copy("/bin/sleep", program)
        child = subprocess.Popen([program, "100"])
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        deadline = time.monotonic() + 5
        while commandOf(child.pid) != program.encode() and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            self.assertIn(b"(a) b (c)", f.read())
        self.assertIsInstance(processStartTime(child.pid), int)


class SignalGroupTests(TestCase):
    """
    L{signalGroup} signals whole process groups.
    """

    def test_missingGroup(self) -> None:
        """
        Signalling a group that does not exist returns C{False}.
        """
        child = subprocess.Popen(["true"], start_new_session=True)
        child.wait()
        self.assertFalse(signalGroup(child.pid, "TERM"))

    def test_signalsGroup(self) -> None:
        """
        Signalling an existing group returns C{True} and delivers the signal.
        """
        child = subprocess.Popen(["sleep", "100"], start_new_session=True)
        self.addCleanup(lambda: child.poll() is None and (child.kill(), child.wait()))
        self.assertTrue(signalGroup(child.pid, "KILL"))
        self.assertEqual(child.wait(timeout=5), -9)


class LogRingTests(TestCase):
    """
    L{LogRing} keeps the last lines.
    """

    def test_keepsLast(self) -> None:
        """
        Only the last C{size} lines are kept, oldest first.
        """
        ring = LogRing(3)
        for i in range(5):
            ring.append(str(i))
        self.assertEqual(ring.tail(10), ["2", "3", "4"])
        self.assertEqual(ring.tail(2), ["3", "4"])
        self.assertEqual(ring.tail(0), [])

    def test_defaultSize(self) -> None:
        """
        The default ring keeps 200 lines.
        """
        ring = LogRing()
        for i in range(250):
            ring.append(str(i))
        self.assertEqual(ring.tail(1000), [str(i) for i in range(50, 250)])


class ProtocolTests(TestCase):
    """
    L{BackendProcessProtocol} tells apart the exit of a process and the end
    of its output.
    """

    def test_endedAfterLastOutput(self) -> None:
        """
        When the process is reaped before its last output has been read,
        C{whenExited} fires at once but C{whenEnded} only once the pipes
        have closed, with every line read.
        """
        lines: list[str] = []
        protocol = BackendProcessProtocol("p", LogRing(), lines.append)
        exited, ended = protocol.whenExited(), protocol.whenEnded()
        protocol.processExited(Failure(error.ProcessTerminated(exitCode=3)))
        self.assertEqual(self.successResultOf(exited).exitCode, 3)
        self.assertNoResult(ended)
        protocol.childDataReceived(2, b"oops\n")
        protocol.processEnded(Failure(error.ProcessTerminated(exitCode=3)))
        self.assertEqual(self.successResultOf(ended).exitCode, 3)
        self.assertEqual(lines, ["oops"])
        self.assertEqual(self.successResultOf(protocol.whenEnded()).exitCode, 3)


class OutputTests(TestCase):
    """
    L{BackendProcessProtocol} logs a backend's output one event per line,
    within a budget per interval (L{process_module.LogBudget}), and keeps
    the last lines in its ring whatever the log got.
    """

    def setUp(self) -> None:
        self.events: list[dict] = []
        self.patch(process_module, "log", Logger(namespace="dynllm.process", observer=self.events.append))
        self.clock = task.Clock()
        self.ring = LogRing()
        self.protocol = BackendProcessProtocol("chatty", self.ring, clock=self.clock)

    def lines(self) -> list[str]:
        """
        @return: the backend lines logged, as the events render them.
        """
        return [formatEvent(e) for e in self.events if "line" in e]

    def test_oneEventPerLine(self) -> None:
        """
        Three lines read at once are three events, each naming the model
        and the stream; a partial line waits for its end.
        """
        self.protocol.childDataReceived(2, b"one\ntwo\nthr")
        self.assertEqual(self.lines(), ["[chatty] one", "[chatty] two"])
        self.protocol.childDataReceived(2, b"ee\n")
        self.protocol.childDataReceived(1, b"out\n")
        self.assertEqual(self.lines(), ["[chatty] one", "[chatty] two", "[chatty] three", "[chatty] out"])
        self.assertEqual([(e["model"], e["stream"]) for e in self.events],
                         [("chatty", "stderr")] * 3 + [("chatty", "stdout")])

    def test_carriageReturnEndsLine(self) -> None:
        """
        A carriage return ends a line (a progress bar redraws its line with
        one), and CRLF is one line end.
        """
        self.protocol.childDataReceived(2, b" 10%\r 20%\r 30%\r\ndone\r\n")
        self.assertEqual(self.lines(), ["[chatty]  10%", "[chatty]  20%", "[chatty]  30%", "[chatty] done"])

    def test_endlessLineCut(self) -> None:
        """
        A line longer than C{maxLineLength} is cut into pieces of that
        length as they arrive (the buffer stays bounded); each piece is an
        event that says it was cut, and the end of the line is a plain
        event.
        """
        self.protocol.maxLineLength = 10
        self.protocol.childDataReceived(1, b"a" * 25)
        self.assertEqual(len(self.protocol._buffers[1]), 5)
        self.protocol.childDataReceived(1, b"b\n")
        self.assertEqual(
            self.lines(),
            ["[chatty] aaaaaaaaaa [cut: longer than 10 bytes; continued on the next line]"] * 2
            + ["[chatty] aaaaab"],
        )
        self.assertEqual(self.ring.tail(3), ["a" * 10, "a" * 10, "aaaaab"])

    def test_budget(self) -> None:
        """
        Beyond C{maxLines} lines in an interval, lines are not logged but
        counted; at the end of the interval one warning gives the count and
        where the lines are; the ring keeps the most recent lines; the next
        interval logs again.
        """
        budget = self.protocol.budget
        assert budget is not None
        self.protocol.childDataReceived(2, b"".join(b"line %d\n" % i for i in range(1500)))
        self.clock.advance(5)
        self.protocol.childDataReceived(2, b"".join(b"more %d\n" % i for i in range(123456)))
        self.assertEqual(len(self.lines()), budget.maxLines)
        self.assertEqual(self.lines()[-1], "[chatty] line 999")
        self.assertEqual(self.ring.tail(2), ["more 123454", "more 123455"])
        self.assertEqual([e for e in self.events if "line" not in e], [])
        self.clock.advance(5)
        (warning,) = [e for e in self.events if "line" not in e]
        self.assertEqual(
            formatEvent(warning),
            "model chatty: 123,956 lines of backend output not logged in the last 10 s;"
            " see /admin/models/chatty/logs",
        )
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.protocol.childDataReceived(2, b"again\n")
        self.assertEqual(self.lines()[-1], "[chatty] again")
        self.assertEqual(budget.droppedTotal, 123956)

    def test_budgetBytes(self) -> None:
        """
        The budget bounds the bytes logged per interval too.
        """
        budget = self.protocol.budget
        assert budget is not None
        budget.maxBytes = 1000
        self.protocol.childDataReceived(1, (b"x" * 99 + b"\n") * 20)
        self.assertEqual(len(self.lines()), 10)
        self.assertEqual(budget.dropped, 10)

    def test_reportAtExit(self) -> None:
        """
        When the backend exits, what was not logged is said at once.
        """
        self.protocol.childDataReceived(2, b"x\n" * 1001)
        self.clock.advance(2)
        self.protocol.processEnded(Failure(error.ProcessDone(0)))
        (warning,) = [e for e in self.events if "line" not in e]
        self.assertIn("model chatty: 1 line of backend output not logged in the last 2 s", formatEvent(warning))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lineOfMaximumLength(self) -> None:
        """
        A line of exactly C{maxLineLength} bytes whose newline comes in the
        next read is one plain line, not a cut one.
        """
        self.protocol.maxLineLength = 10
        self.protocol.childDataReceived(1, b"a" * 10)
        self.protocol.childDataReceived(1, b"\n")
        self.assertEqual(self.lines(), ["[chatty] aaaaaaaaaa"])
