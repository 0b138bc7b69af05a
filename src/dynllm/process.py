# -*- test-case-name: tests.test_process -*-
"""
Backend processes: spawned in a session of their own that the kernel kills
when the daemon ends (L{dynllm._launch}), their output drained into a
bounded log, stopped with TERM then KILL to the whole process group,
and reported only once they have really exited.

This keeps the policy of L{twisted.runner.procmon} (TERM, then KILL after a
grace period) without its gaps: a stop fires only on the real exit, and a
process that is stopped stays stopped.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, cast

from attrs import define, field
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from dynllm.logs import LogRing, logger

log = logger(__name__)

#: The name of each output stream, for the C{stream} field of a line's event.
STREAMS = {1: "stdout", 2: "stderr"}

#: What a secret (a run's API key) becomes in a program's output and in the
#: daemon's log.
REDACTED = "<api_key>"
REDACTED_BYTES = REDACTED.encode("ascii")

#: Prefix that starts a program in a session of its own (so in its own
#: process group), under the pid we spawn (it execs in place), killed by the
#: kernel when the daemon ends, even by SIGKILL, with every process of its
#: group: see L{dynllm._launch}. Followed by the daemon's pid, then the
#: program's command line.
_LAUNCH_ARGV = [sys.executable, "-I", "-S", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch.py")]


@define
class LogBudget:
    """
    How much of one backend's output goes to the daemon's log: at most
    L{maxLines} lines and L{maxBytes} bytes in each L{interval} (a window that
    starts with the first line after the last one ended). Lines beyond
    that are counted, not logged, and the count is logged once at the end
    of the window: a backend printing 50 MB/s would otherwise grow the
    daemon's log as fast, and cost the daemon most of a core to format it.

    @ivar model: The model whose backend prints (for the message).
    @ivar clock: Times the windows.
    @ivar maxLines: Lines logged per window, at most.
    @ivar maxBytes: Bytes of lines logged per window, at most.
    @ivar interval: The window's length, in seconds.
    @ivar dropped: Lines not logged in the current window.
    @ivar droppedTotal: Lines not logged since the backend started.
    """

    model: str
    clock: IReactorTime
    maxLines: int = 1000
    maxBytes: int = 1 << 20
    interval: float = 10.0
    dropped: int = field(default=0, init=False)
    droppedTotal: int = field(default=0, init=False)
    _usedLines: int = field(default=0, init=False)
    _usedBytes: int = field(default=0, init=False)
    _windowStart: float | None = field(default=None, init=False)
    _report: IDelayedCall | None = field(default=None, init=False)

    def admit(self, lines: list[bytes]) -> int:
        """
        Take C{lines} (printed in this order) against the window's budget.

        @return: how many of the first C{lines} may be logged; the others
            are counted as dropped.
        """
        now = self.clock.seconds()
        if self._windowStart is None or now - self._windowStart >= self.interval:
            self._newWindow(now)
        admitted = 0
        if self.dropped == 0:
            for line in lines:
                if self._usedLines >= self.maxLines or self._usedBytes + len(line) > self.maxBytes:
                    break
                self._usedLines += 1
                self._usedBytes += len(line)
                admitted += 1
        rest = len(lines) - admitted
        if rest:
            self.dropped += rest
            self.droppedTotal += rest
            if self._report is None:
                assert self._windowStart is not None
                self._report = self.clock.callLater(self._windowStart + self.interval - now, self.report)
        return admitted

    def _newWindow(self, now: float) -> None:
        self.report()
        self._windowStart = now
        self._usedLines = self._usedBytes = 0

    def report(self) -> None:
        """
        Log how many lines were not logged in the window, if any, and end
        the window (call it when the backend has exited too).
        """
        if self._report is not None:
            if self._report.active():
                self._report.cancel()
            self._report = None
        if self.dropped:
            elapsed = self.clock.seconds() - (self._windowStart or 0.0)
            log.warn(
                "model {model}: {count:,} {unit} of backend output not logged in the last {seconds:.0f} s;"
                " see /admin/models/{model}/logs",
                model=self.model,
                count=self.dropped,
                unit="line" if self.dropped == 1 else "lines",
                seconds=min(max(elapsed, 1.0), self.interval),
                dropped=self.dropped,
            )
            self.dropped = 0
        self._windowStart = None


class BackendProcessProtocol(ProcessProtocol):
    """
    Drains a backend's stdout and stderr into a L{LogRing} and the twistd
    log, one log event per line, and tells waiters when the process has
    exited.

    A line ends at a newline or at a carriage return (progress bars redraw
    their line with one); a line longer than L{maxLineLength} bytes is cut
    into pieces of that length, each logged as a line that says so. The
    log gets at most what L{LogBudget} admits; the ring keeps the last lines
    whatever the log got.

    @ivar exitReason: C{None} while running, then the C{ProcessDone} or
        C{ProcessTerminated} exception.
    @ivar budget: The log's budget for this output, or C{None} for none.
    @ivar lineCount: How many lines the process printed.
    """

    maxLineLength = 16384

    def __init__(
        self,
        name: str,
        ring: LogRing,
        onLine: Callable[[str], object] | None = None,
        clock: IReactorTime | None = None,
        secret: str | None = None,
    ) -> None:
        """
        @param clock: Times the log's budget (L{LogBudget}); without one,
            every line is logged.
        @param secret: A text that the program may print (its run's API
            key, as vLLM prints its arguments) and that is replaced by
            L{REDACTED} before a line is kept, logged or reported.
        """
        self.name = name
        self.secret = secret.encode("utf-8") if secret else None
        self.ring = ring
        self.onLine = onLine
        self.budget = LogBudget(name, clock) if clock is not None else None
        self.lineCount = 0
        self.exitReason: Exception | None = None
        self._buffers = {1: b"", 2: b""}
        self._waiters: list[defer.Deferred[Exception]] = []
        self._endWaiters: list[defer.Deferred[Exception]] = []
        self._ended = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        # Cut only what is surely longer than a line may be: a line of
        # exactly maxLineLength bytes may still end with the next read.
        pieces = (len(rest) - 1) // self.maxLineLength if rest else 0
        if pieces:
            end = pieces * self.maxLineLength
            lines.extend(rest[i : i + self.maxLineLength] for i in range(0, end, self.maxLineLength))
            rest = rest[end:]
        self._buffers[childFD] = rest
        self._lines(lines, STREAMS.get(childFD, str(childFD)), pieces)

    def _lines(self, raw: list[bytes], stream: str, pieces: int = 0) -> None:
        """
        Keep, log and report complete lines of output, each line one event.

        @param pieces: How many of the last of C{raw} are pieces of a line
            longer than L{maxLineLength}.
        """
        if b"" in raw:
            raw = [r for r in raw if r]
        if not raw:
            return
        secret = self.secret
        if secret is not None:
            raw = [r.replace(secret, REDACTED_BYTES) if secret in r else r for r in raw]
        self.lineCount += len(raw)
        admitted = len(raw) if self.budget is None else self.budget.admit(raw)
        self.ring.extend(raw)
        cutFrom = len(raw) - pieces
        for i in range(admitted):
            line = raw[i].decode("utf-8", "replace")
            if i >= cutFrom:
                log.info(
                    "[{model}] {line} [cut: longer than {limit} bytes; continued on the next line]",
                    model=self.name, line=line, stream=stream, limit=self.maxLineLength,
                )
            else:
                log.info("[{model}] {line}", model=self.name, line=line, stream=stream)
        if self.onLine is not None:
            for r in raw:
                self.onLine(r.decode("utf-8", "replace"))

    def whenExited(self) -> defer.Deferred[Exception]:
        """
        @return: a fresh Deferred that fires with the exit reason once the
            process has been reaped.
        """
        if self.exitReason is not None:
            return defer.succeed(self.exitReason)
        d: defer.Deferred[Exception] = defer.Deferred()
        self._waiters.append(d)
        return d

    def whenEnded(self) -> defer.Deferred[Exception]:
        """
        @return: a fresh Deferred that fires with the exit reason once the
            process has been reaped I{and} its output pipes have closed, so
            that every line it wrote has been read. (A child it left behind
            may hold the pipes open: L{whenExited} does not wait for that.)
        """
        if self._ended:
            assert self.exitReason is not None
            return defer.succeed(self.exitReason)
        d: defer.Deferred[Exception] = defer.Deferred()
        self._endWaiters.append(d)
        return d

    def _flush(self) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self._lines([rest], STREAMS.get(fd, str(fd)))
                self._buffers[fd] = b""
        if self.budget is not None:
            self.budget.report()

    def processExited(self, reason: Failure) -> None:
        self._flush()
        # Always ProcessDone or ProcessTerminated.
        exitReason = cast(Exception, reason.value)
        self.exitReason = exitReason
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            # Not callback(reason): a Failure would take the errback path.
            d.callback(exitReason)

    def processEnded(self, reason: Failure) -> None:
        self._flush()
        self._ended = True
        if self.exitReason is None:
            self.exitReason = cast(Exception, reason.value)
        waiters, self._endWaiters = self._endWaiters, []
        for d in waiters:
            d.callback(self.exitReason)


def processStartTime(pid: int) -> int | None:
    """
    Read when a process started, in clock ticks since boot: with the pid, it
    tells one process from a later one that reuses the pid.

    @return: the start time, or C{None} if there is no such process or it
        has exited and only its zombie is left.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces or ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def signalGroup(pgid: int, signalName: str) -> bool:
    """
    Send a signal to a whole process group.

    @return: C{False} if the group no longer exists.
    """
    try:
        os.killpg(pgid, getattr(signal, "SIG" + signalName))
    except ProcessLookupError:
        return False
    return True


def _passOnLine(process: ManagedProcess, attribute: object, onLine: Callable[[str], object] | None) -> object:
    # A new onLine reaches the running program's protocol too (decoding
    # every line for a callback that is done with them costs a chatty
    # backend's daemon dearly).
    if process._proto is not None:
        process._proto.onLine = onLine
    return onLine


@define
class ManagedProcess:
    """
    One backend program: started in its own session, stopped for good.

    @ivar name: The model it serves (for logs).
    @ivar argv: The command line.
    @ivar reactor: Spawns the process and times the KILL escalation.
    @ivar env: The complete environment, or C{None} to inherit ours.
    @ivar killTime: Seconds between TERM and KILL.
    @ivar newSession: Run in a new session that dies with the daemon (see
        L{dynllm._launch}) and signal the whole group; turn
        off only for fake reactors in tests.
    @ivar onLine: Called with each line the program prints, from now on
        (set it to C{None} when no more lines are wanted).
    @ivar ring: The program's last output lines.
    @ivar secret: Replaced by L{REDACTED} in the program's output (see
        L{BackendProcessProtocol}).
    """

    name: str
    argv: list[str]
    reactor: IReactorProcess
    env: dict[str, str] | None = field(default=None, repr=False)  # holds backend keys
    killTime: float = 5.0
    newSession: bool = True
    onLine: Callable[[str], object] | None = field(default=None, on_setattr=_passOnLine)
    ring: LogRing = field(factory=LogRing)
    secret: str | None = field(default=None, repr=False)
    pid: int | None = field(default=None, init=False)
    startTime: int | None = field(default=None, init=False)
    _proto: BackendProcessProtocol | None = field(default=None, init=False)
    _transport: object = field(default=None, init=False)
    _murder: IDelayedCall | None = field(default=None, init=False)

    def start(self) -> int:
        """
        Spawn the program.

        @return: its pid, which is also its process group id.
        @raise OSError: if it could not be spawned.
        """
        proto = BackendProcessProtocol(self.name, self.ring, self.onLine, IReactorTime(self.reactor), self.secret)
        argv = [*_LAUNCH_ARGV, str(os.getpid()), *self.argv] if self.newSession else list(self.argv)
        self._transport = self.reactor.spawnProcess(
            proto, argv[0], argv, env=self.env, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self._proto = proto
        self.pid = self._transport.pid
        self.startTime = processStartTime(self.pid) if self.newSession else None
        proto.whenExited().addCallback(self._reapGroup)
        return self.pid

    @property
    def running(self) -> bool:
        """
        Whether the program has been started and not yet exited.
        """
        return self._proto is not None and self._proto.exitReason is None

    def whenExited(self) -> defer.Deferred[Exception]:
        """
        @return: a fresh Deferred firing with the exit reason once the
            program has exited (at once if it was never started).
        """
        if self._proto is None:
            return defer.succeed(error.ProcessDone(0))
        return self._proto.whenExited()

    def whenEnded(self) -> defer.Deferred[Exception]:
        """
        @return: a fresh Deferred firing with the exit reason once the
            program has exited and all its output has been read (see
            L{BackendProcessProtocol.whenEnded}).
        """
        if self._proto is None:
            return defer.succeed(error.ProcessDone(0))
        return self._proto.whenEnded()

    def tail(self, count: int) -> list[str]:
        """
        @return: the last C{count} lines that this run of the program
            printed, oldest first: none of an earlier run's, though the
            ring may hold them.
        """
        if self._proto is None:
            return []
        return self.ring.tail(min(count, self._proto.lineCount))

    def _reapGroup(self, reason: Exception) -> Exception:
        # The leader is gone; anything it left in its group goes too.
        if self.newSession and self.pid is not None:
            signalGroup(self.pid, "KILL")
        return reason

    def _signal(self, signalName: str) -> bool:
        if self.newSession:
            assert self.pid is not None
            if signalGroup(self.pid, signalName):
                return True
            # No such group yet: the child has not called setsid, so it has
            # no children either; signal it alone.
        try:
            self._transport.signalProcess(signalName)  # type: ignore[attr-defined]
        except error.ProcessExitedAlready:
            return False
        return True

    def stop(self, signalName: str | None = "TERM") -> defer.Deferred[Exception]:
        """
        Send TERM (or C{signalName}) to the program's group, and KILL after
        L{killTime}. A stop asked while one is pending joins it: no second
        signal, no second KILL.

        @param signalName: The signal, without C{SIG}; C{None} sends none,
            for a program that something else is stopping (a stop command),
            which only gets the KILL if it is still there after L{killTime}.
        @return: a Deferred firing with the exit reason after the real exit.
        """
        if not self.running:
            return self.whenExited()
        if self._murder is None:
            if signalName is not None:
                self._signal(signalName)
            clock = IReactorTime(self.reactor)
            self._murder = clock.callLater(self.killTime, self._kill)

            def cancelMurder(reason: Exception) -> Exception:
                if self._murder is not None and self._murder.active():
                    self._murder.cancel()
                return reason

            self.whenExited().addCallback(cancelMurder)
        return self.whenExited()

    def signal(self, signalName: str) -> None:
        """
        Send C{signalName} (without C{SIG}) to the running program's group
        now, during a stop that sent none (L{stop} with C{None}), whose
        KILL stays scheduled.
        """
        if self.running:
            self._signal(signalName)

    def _kill(self) -> None:
        if self.running:
            log.warn(
                "[{model}] did not exit within {seconds}s of being stopped; sending SIGKILL",
                model=self.name,
                seconds=self.killTime,
            )
            self._signal("KILL")
