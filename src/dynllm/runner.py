# -*- test-case-name: tests.test_runner -*-
"""
One run of one model's backend: pick a free port, spawn the server, probe it
until it is ready, and stop it. The same for every backend kind; what differs
between kinds lives behind L{dynllm.interfaces.IBackend}.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
from typing import Any, Container

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from dynllm.config import ModelConfig
from dynllm.interfaces import IBackend
from dynllm.logs import logger
from dynllm.listeners import exposed
from dynllm.logs import LogRing
from dynllm.placeholders import expandAll
from dynllm.process import REDACTED, ManagedProcess

log = logger(__name__)

#: Probe delays: the first probes come quickly so that a fast load is seen
#: within milliseconds, then they slow down for long loads.
FIRST_PROBE_DELAY = 0.005
MAX_PROBE_DELAY = 0.1
PROBE_BACKOFF = 1.25

#: Lines of backend output quoted in a failure message.
FAILURE_LOG_LINES = 5


class NoFreePort(Exception):
    """
    Every port of the configured range is in use.
    """


def portIsFree(port: int) -> bool:
    """
    @return: whether a server can listen on 127.0.0.1:C{port} now. Like the
        servers we start, the check sets C{SO_REUSEADDR}, so a port whose
        old connections linger in TIME_WAIT counts as free; one that a
        process listens on does not.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    finally:
        s.close()
    return True


def findFreePort(start: int, end: int, taken: Container[int], after: int | None = None) -> int:
    """
    Find a port in C{start..end} that no backend of ours holds and that can
    be bound now, looking round-robin from just past C{after} so that a port
    that was just released is not reused at once.

    @raise NoFreePort: if there is none.
    """
    ports = list(range(start, end + 1))
    if after is not None and start <= after <= end:
        cut = after - start + 1
        ports = ports[cut:] + ports[:cut]
    for port in ports:
        if port not in taken and portIsFree(port):
            return port
    raise NoFreePort(f"no free port in {start}-{end}")


#: Output of a server that could not bind its port (llama-server, uvicorn,
#: and the C library's message that most servers print).
PORT_IN_USE = re.compile(r"couldn't bind|address already in use", re.IGNORECASE)


def describeExit(reason: Exception) -> str:
    """
    @return: "exited with code N" or "was killed by signal N".
    """
    code = getattr(reason, "exitCode", None)
    sig = getattr(reason, "signal", None)
    if sig is not None:
        return f"was killed by signal {sig}"
    return f"exited with code {code}"


def backendEnvironment(backend: IBackend, model: ModelConfig, port: int, apiKey: str | None = None) -> dict[str, str]:
    """
    @return: the environment a backend of C{model} runs in on C{port}:
        ours, with what L{IBackend.environment} adds and removes, then the
        model's C{env} (see L{ModelConfig.environment}).
    """
    env = dict(os.environ)
    for name, value in backend.environment(model).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env.update(model.environment(port, apiKey))
    return env


def runCommand(
    name: str,
    argv: list[str],
    reactor: Any,
    env: dict[str, str],
    timeout: float,
    newSession: bool = True,
    ring: LogRing | None = None,
) -> defer.Deferred[Exception]:
    """
    Run a command to its end, such as a model's C{stop.command}: its output
    goes to the model's log; after C{timeout} seconds it is stopped (TERM,
    then KILL after C{timeout} more).

    @param name: The model it is for (for logs).
    @return: a Deferred firing with its exit reason once it has exited.
    @raise OSError: if it could not be spawned.
    """
    process = ManagedProcess(
        name=name, argv=argv, reactor=reactor, env=env, killTime=timeout, newSession=newSession,
        ring=ring if ring is not None else LogRing(),
    )
    process.start()
    log.info("[{model}] running {argv} as pid {pid}", model=name, argv=" ".join(argv), pid=process.pid)
    timer = reactor.callLater(timeout, process.stop)

    def done(reason: Exception) -> Exception:
        if timer.active():
            timer.cancel()
        if getattr(reason, "exitCode", 0) or getattr(reason, "signal", None) is not None:
            log.warn("[{model}] {argv} {how}", model=name, argv=" ".join(argv), how=describeExit(reason))
        return reason

    return process.whenExited().addCallback(done)


@define
class _WithKey:
    """
    The probes' HTTP client, sending a run's key as Bearer: a readiness path
    may be behind the key (vLLM's C{/v1/models}), as every request is.
    """

    http: Any
    apiKey: str = field(repr=False)

    def request(self, method: str, url: str, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", None) or {})
        headers[b"Authorization"] = [b"Bearer " + self.apiKey.encode("ascii")]
        return self.http.request(method, url, headers=headers, **kw)


@define
class BackendRun:
    """
    One process serving one model.

    @ivar model: What it serves.
    @ivar backend: How to run it.
    @ivar port: Where it listens, on 127.0.0.1.
    @ivar reactor: Runs the process and the timers.
    @ivar http: Sends the readiness probes.
    @ivar binary: The program, as configured.
    @ivar killTime: Seconds from TERM (or the stop command) to KILL when
        stopping; the model's C{stop.timeout} when it gives one.
    @ivar newSession: See L{ManagedProcess.newSession}.
    @ivar ring: Keeps the backend's last lines of output.
    @ivar apiKey: This run's API key, fresh and random, which the backend
        reads from its L{IBackend.keyVariable} and requires on every
        request (so that other local users cannot use its port); C{None}
        for a backend without keys. The named backends never have it on
        their command line (C{/proc/PID/cmdline} is world-readable;
        C{/proc/PID/environ} is not); a C{command} backend has it where
        its command puts C{{api_key}}. It never reaches clients.
    """

    model: ModelConfig
    backend: IBackend
    port: int
    reactor: Any
    http: Any
    binary: str
    killTime: float = 5.0
    newSession: bool = True
    ring: LogRing = field(factory=LogRing)
    process: ManagedProcess = field(init=False)
    ready: bool = field(default=False, init=False)
    _probeCall: IDelayedCall | None = field(default=None, init=False)
    _probing: bool = field(default=False, init=False)
    _probeAgain: bool = field(default=False, init=False)
    _readyWaiters: list[defer.Deferred[None]] = field(factory=list, init=False)
    _stopped: bool = field(default=False, init=False)
    apiKey: str | None = field(default=None, init=False, repr=False)
    #: The line that tells of readiness (C{ready.log}), if any, and whether
    #: it has been seen.
    _readyLine: re.Pattern[str] | None = field(default=None, init=False)
    _lineSeen: bool = field(default=False, init=False)
    #: The model's C{stop.command} as this run expands it (what the state
    #: database records, so that a later start stops this run's server even
    #: if the configuration has changed), or C{None} for none.
    stopArgv: list[str] | None = field(default=None, init=False)
    #: The run of the model's stop command, once asked.
    _stopping: defer.Deferred[Exception] | None = field(default=None, init=False)
    _started: bool = field(default=False, init=False)
    #: The run's last lines of output, kept when it exited.
    _lastLines: list[str] | None = field(default=None, init=False)
    #: Why the run ended, once it has (and its stop command has run, if
    #: one ran); who waits for that.
    _exitReason: Exception | None = field(default=None, init=False)
    _exitWaiters: list[defer.Deferred[Exception]] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        if self.model.stop.command:
            self.stopArgv = expandAll(self.model.stop.command, self.model.placeholders(self.port))
        if self.backend.wantsKey(self.model):
            self.apiKey = secrets.token_urlsafe(32)
        env = backendEnvironment(self.backend, self.model, self.port, self.apiKey)
        if self.apiKey is not None and self.backend.keyVariable is not None:
            env[self.backend.keyVariable] = self.apiKey
        if self.model.stop.timeout is not None:
            self.killTime = self.model.stop.timeout
        if self.model.ready.log is not None:
            self._readyLine = re.compile(self.model.ready.log)
        self.process = ManagedProcess(
            name=self.model.name,
            argv=self.backend.argv(self.model, self.binary, self.port, self.apiKey),
            reactor=self.reactor,
            env=env,
            killTime=self.killTime,
            newSession=self.newSession,
            onLine=self._line,
            ring=self.ring,
            secret=self.apiKey,
        )

    @property
    def baseURL(self) -> str:
        """
        The backend's address, C{http://127.0.0.1:PORT}.
        """
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """
        Spawn the backend and probe it until it is ready (see L{whenReady}).
        How long a load may take is not the run's business: its owner stops
        it when it has waited long enough.

        @raise OSError: if the program could not be spawned.
        """
        self.process.start()
        argv = " ".join(self.process.argv)
        if self.apiKey is not None:
            # The key is this run's secret: the log is no place for it.
            argv = argv.replace(self.apiKey, REDACTED)
        log.info("[{model}] started {argv} as pid {pid}", model=self.model.name, argv=argv, pid=self.process.pid)
        self._started = True
        self.process.whenExited().addCallback(self._processExited)
        if self._readyLine is None:
            self._scheduleProbe(FIRST_PROBE_DELAY)
        # Else probing starts when the line is seen.

    def whenReady(self) -> defer.Deferred[None]:
        """
        @return: a fresh Deferred that fires once a probe has found the
            backend ready (at once if it was). It never fires for a run
            that exited or was stopped first: L{whenExited} tells of that.
        """
        if self.ready:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._readyWaiters.append(d)
        return d

    def stop(self) -> defer.Deferred[Exception]:
        """
        Stop probing and stop the backend (see L{ManagedProcess.stop}: a
        second call joins the first and sends no second signal).

        @return: a Deferred that fires with the exit reason after the real
            exit of the backend's whole process group.
        """
        self._stopped = True
        self._stopProbing()
        stop = self.model.stop
        if stop.command and self.process.running:
            if self._stopping is None:
                self._stopping = self._runStopCommand()
                if self._stopping is not None:
                    self._stopping.addCallback(self._stopCommandEnded)
            if self._stopping is not None:
                # KILL after killTime if it is still there; the stop is done
                # once the stop command has ended too (L{whenExited}).
                self.process.stop(None)
                return self.whenExited()
        return self.process.stop(stop.signal)

    def _stopCommandEnded(self, reason: Exception) -> Exception:
        """
        A stop command that failed (exited non-zero or was killed: its
        program missing, its container gone) has not stopped the server:
        it gets the model's signal now rather than KILL after the timeout.
        """
        if getattr(reason, "exitCode", 0) or getattr(reason, "signal", None) is not None:
            if self.process.running:
                log.warn("[{model}] its stop command failed; sending SIG{signal}", model=self.model.name,
                         signal=self.model.stop.signal)
                self.process.signal(self.model.stop.signal)
        return reason

    def _runStopCommand(self) -> defer.Deferred[Exception] | None:
        """
        Run the model's C{stop.command} (its server, as in a container, may
        not be the process dynllm started); the process group gets KILL if
        it is still there after C{killTime}, and so does the stop command.

        @return: a Deferred firing when the stop command has exited, or
            C{None} if it could not be spawned (then the signal is sent).
        """
        argv = self.stopArgv or []
        # The server's environment, without the run's key.
        env = backendEnvironment(self.backend, self.model, self.port)
        try:
            done = runCommand(self.model.name, argv, self.reactor, env, self.killTime, self.newSession, self.ring)
        except OSError as e:
            log.error("[{model}] cannot run its stop command {argv}: {error}; signalling it",
                      model=self.model.name, argv=" ".join(argv), error=e)
            return None
        return done

    def whenExited(self) -> defer.Deferred[Exception]:
        """
        @return: a fresh Deferred that fires with the exit reason on exit
            (at once if the run never started). When the model's
            C{stop.command} ran (to stop it, or because the process exited
            on its own), it fires once that command has ended too: a server
            in a container outlives a C{docker run} client that died, and
            holds its memory and port until it is stopped.
        """
        if self._exitReason is not None:
            return defer.succeed(self._exitReason)
        if not self._started:
            return self.process.whenExited()
        d: defer.Deferred[Exception] = defer.Deferred()
        self._exitWaiters.append(d)
        return d

    def _processExited(self, reason: Exception) -> None:
        self._stopProbing()
        # Its last lines, before a stop command adds its own to the ring.
        self._lastLines = self.process.tail(self.ring.size)
        if self._stopping is not None:
            # Asked to stop by its stop command: the server is gone once
            # that command has ended, not when the process dynllm started
            # (a container's client) has.
            self._stopping.addBoth(self._tellExitAfter, reason)
            return
        if self._stopped or not self.model.stop.command:
            self._tellExit(reason)
            return
        # Not asked to stop: whatever it started may still be running.
        self._stopped = True
        log.warn(
            "[{model}] {how} on its own; running its stop command, in case its server outlives it",
            model=self.model.name,
            how=describeExit(reason),
        )
        self._stopping = self._runStopCommand()
        if self._stopping is None:
            self._tellExit(reason)
        else:
            self._stopping.addBoth(self._tellExitAfter, reason)

    def _tellExitAfter(self, result: object, reason: Exception) -> object:
        """
        Tell of the exit (C{reason}) once the stop command has ended, and
        pass its C{result} on.
        """
        self._tellExit(reason)
        return result

    def _tellExit(self, reason: Exception) -> None:
        self._exitReason = reason
        waiters, self._exitWaiters = self._exitWaiters, []
        for d in waiters:
            d.callback(reason)

    def portTaken(self) -> bool:
        """
        @return: whether the backend's output says that its port was taken
            (a race with another program since the port was found free).
        """
        return any(PORT_IN_USE.search(line) for line in self.logTail())

    def logTail(self, count: int = FAILURE_LOG_LINES) -> list[str]:
        """
        @return: the backend's last C{count} lines of output in this run
            (not an earlier run's, which the model's ring may still hold).
        """
        if self._lastLines is not None:
            return self._lastLines[-count:] if count > 0 else []
        return self.process.tail(count)

    # Readiness.

    def _line(self, line: str) -> None:
        if self.ready or self._stopped:
            return
        if self._readyLine is not None and not self._lineSeen:
            if self._readyLine.search(line):
                self._lineSeen = True
                self._probe(FIRST_PROBE_DELAY)
        elif self.backend.readyHint(line):
            self._probeNow()

    def _scheduleProbe(self, delay: float) -> None:
        self._probeCall = self.reactor.callLater(delay, self._probe, delay)

    def _probeNow(self) -> None:
        if self._probing:
            self._probeAgain = True
        elif self._probeCall is not None and self._probeCall.active():
            self._probeCall.cancel()
            self._probe(FIRST_PROBE_DELAY)

    def _stopProbing(self) -> None:
        if self._probeCall is not None and self._probeCall.active():
            self._probeCall.cancel()
        self._probeCall = None

    def _probe(self, delay: float) -> None:
        self._probeCall = None
        self._probing = True
        http = self.http if self.apiKey is None else _WithKey(self.http, self.apiKey)
        d = self.backend.probe(http, self.baseURL, self.model)
        d.addErrback(self._probeFailed)
        d.addCallback(self._probed, delay)

    def _refuseExposed(self, addresses: list[str]) -> None:
        """
        The server answers, but listens on more than loopback: open to the
        network, outside dynllm's keys. Stop it; its load fails with the
        reason as its last line.
        """
        reason = (
            f"dynllm: stopped {self.model.name}: its server listens on {', '.join(addresses)} port {self.port},"
            " open to the network; it must listen on 127.0.0.1 only: give its command {host}"
            " (as --host {host})"
        )
        log.error("{reason}", reason=reason)
        self.ring.append(reason)
        self.stop()

    def _probeFailed(self, failure: Any) -> bool:
        log.failure("[{model}] readiness probe failed", failure, model=self.model.name)
        return False

    def _probed(self, isReady: bool, delay: float) -> None:
        self._probing = False
        if self.ready or self._stopped or not self.process.running:
            return
        if isReady:
            addresses = exposed(self.port)
            if addresses:
                self._refuseExposed(addresses)
                return
            self.ready = True
            # Its lines are no longer hints of readiness.
            self.process.onLine = None
            waiters, self._readyWaiters = self._readyWaiters, []
            for d in waiters:
                d.callback(None)
        elif self._probeAgain:
            self._probeAgain = False
            self._probe(FIRST_PROBE_DELAY)
        else:
            nextDelay = min(delay * PROBE_BACKOFF, MAX_PROBE_DELAY)
            self._scheduleProbe(nextDelay)
