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
from collections import deque
from typing import Callable, cast

from attrs import define, field
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from dynllm.logs import logger

log = logger(__name__)

#: Prefix that starts a program in a session of its own (so in its own
#: process group), under the pid we spawn (it execs in place), killed by the
#: kernel when the daemon ends, even by SIGKILL, with every process of its
#: group: see L{dynllm._launch}. Followed by the daemon's pid, then the
#: program's command line.
_LAUNCH_ARGV = [sys.executable, "-I", "-S", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch.py")]


@define
class LogRing:
    """
    The last lines a backend printed.

    @ivar size: How many lines are kept.
    """

    size: int = 200
    _lines: deque[str] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._lines = deque(maxlen=self.size)

    def append(self, line: str) -> None:
        """
        Keep C{line}, dropping the oldest one when full.
        """
        self._lines.append(line)

    def tail(self, count: int) -> list[str]:
        """
        @return: the last C{count} lines, oldest first.
        """
        return list(self._lines)[-count:] if count > 0 else []


class BackendProcessProtocol(ProcessProtocol):
    """
    Drains a backend's stdout and stderr line by line into a L{LogRing} and
    the twistd log, and tells waiters when the process has exited.

    @ivar exitReason: C{None} while running, then the C{ProcessDone} or
        C{ProcessTerminated} exception.
    """

    maxLineLength = 16384

    def __init__(
        self, name: str, ring: LogRing, onLine: Callable[[str], object] | None = None
    ) -> None:
        self.name = name
        self.ring = ring
        self.onLine = onLine
        self.exitReason: Exception | None = None
        self._buffers = {1: b"", 2: b""}
        self._waiters: list[defer.Deferred[Exception]] = []
        self._endWaiters: list[defer.Deferred[Exception]] = []
        self._ended = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > self.maxLineLength:
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        self._lines(lines)

    def _lines(self, raw: list[bytes]) -> None:
        """
        Keep, log and report complete lines of output: one log event for
        all the lines of one read (a backend prints several per request).
        """
        lines = [r.rstrip(b"\r").decode("utf-8", "replace") for r in raw]
        lines = [line for line in lines if line]
        if not lines:
            return
        for line in lines:
            self.ring.append(line)
        log.info("[{model}] {lines}", model=self.name, lines="\n".join(lines))
        if self.onLine is not None:
            for line in lines:
                self.onLine(line)

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
                self._lines([rest])
                self._buffers[fd] = b""

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
    @ivar onLine: Called with each line the program prints.
    @ivar ring: The program's last output lines.
    """

    name: str
    argv: list[str]
    reactor: IReactorProcess
    env: dict[str, str] | None = field(default=None, repr=False)  # holds backend keys
    killTime: float = 5.0
    newSession: bool = True
    onLine: Callable[[str], object] | None = None
    ring: LogRing = field(factory=LogRing)
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
        proto = BackendProcessProtocol(self.name, self.ring, self.onLine)
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

    def stop(self) -> defer.Deferred[Exception]:
        """
        Send TERM to the program's group, and KILL after L{killTime}. A stop
        asked while one is pending joins it: no second TERM, no second KILL.

        @return: a Deferred firing with the exit reason after the real exit.
        """
        if not self.running:
            return self.whenExited()
        if self._murder is None:
            self._signal("TERM")
            clock = IReactorTime(self.reactor)
            self._murder = clock.callLater(self.killTime, self._kill)

            def cancelMurder(reason: Exception) -> Exception:
                if self._murder is not None and self._murder.active():
                    self._murder.cancel()
                return reason

            self.whenExited().addCallback(cancelMurder)
        return self.whenExited()

    def _kill(self) -> None:
        if self.running:
            log.warn(
                "[{model}] did not exit within {seconds}s of SIGTERM; sending SIGKILL",
                model=self.name,
                seconds=self.killTime,
            )
            self._signal("KILL")
