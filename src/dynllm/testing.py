# -*- test-case-name: tests.test_testing -*-
"""
Fakes for testing dynllm, and programs that embed it, without processes,
sockets or a database, as C{treq.testing} does for treq.

  - L{FakeProcessReactor}: a L{MemoryReactorClock} that also "spawns"
    processes, each a L{FakeProcessTransport} whose output and exit the test
    decides; give it to L{dynllm.scheduler.ModelManager} (or a
    L{dynllm.runner.BackendRun}) as its reactor.
  - L{FakeBackend}: an L{IBackend} whose readiness the test decides; give it
    to the manager as C{backendFor=lambda kind: backend}.
  - L{MemoryStateStore}: an L{IStateStore} kept in a C{dict}.
  - L{StubManager}: an L{IModelManager} with no scheduler behind it, for
    testing what uses a manager (the routes, the metrics, an embedding
    program): its models' states are set by the test, it hands out leases
    on one address, and it fails as told.

For example, to serve the routes in memory against a backend that is a
C{twisted.web} resource::

    from treq.testing import RequestTraversalAgent, StubTreq
    from twisted.internet.task import Clock

    manager = StubManager(config)
    routes = DynLLMRoutes(config=config, manager=manager,
                          agent=RequestTraversalAgent(backendResource), clock=Clock())
    client = StubTreq(routes.resource())
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from attrs import define, evolve, field, frozen
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import (
    IAddress,
    IProcessProtocol,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from dynllm.backends import backendFor as realBackendFor
from dynllm.config import Config, ModelConfig
from dynllm.exceptions import ModelBusy, ModelUnloaded, SchedulerError, UnknownModel
from dynllm.interfaces import IBackend, IModelManager
from dynllm.lease import Lease, ModelCounters, RequestOptions
from dynllm.owned import LLAMACPP
from dynllm.store import MemoryStateStore

__all__ = [
    "FakeBackend",
    "FakeProcessAddress",
    "FakeProcessReactor",
    "FakeProcessTransport",
    "MemoryStateStore",
    "StubManager",
]


# Processes.


@implementer(IAddress)
@frozen
class FakeProcessAddress:
    """
    The address of either end of a L{FakeProcessTransport}: a process has
    none to speak of.
    """


@implementer(IProcessTransport)
class FakeProcessTransport:
    """
    The transport of a process that is not really running: it records the
    signals it is sent, and exits only when the test calls L{exit}.

    @ivar proto: The process protocol connected to it.
    @ivar executable: The program, as given to C{spawnProcess}.
    @ivar args: The command line, program first.
    @ivar env: The environment, as given to C{spawnProcess}.
    @ivar childFDs: As given to C{spawnProcess}.
    @ivar pid: The process id, until it exits; then C{None}.
    @ivar signals: The names of the signals sent (C{"TERM"}, C{"KILL"}), in
        order.
    @ivar lateSignals: The names of the signals sent after the process
        exited (each raised L{ProcessExitedAlready}, as a real transport
        does), in order: a correct owner sends none.
    @ivar exited: Whether L{exit} was called.
    @ivar written: C{(fd, bytes)} of everything written to the process, in
        order (C{fd} 0 for its standard input).
    @ivar closed: The file descriptors closed, in order.
    """

    def __init__(
        self,
        proto: IProcessProtocol,
        executable: bytes | str,
        args: list[bytes | str],
        env: Mapping[Any, Any] | None,
        childFDs: Mapping[int, Any] | None,
        pid: int,
    ) -> None:
        self.proto = proto
        self.executable = executable
        self.args = args
        self.env = env
        self.childFDs = childFDs
        self.pid: int | None = pid
        self.signals: list[str] = []
        self.lateSignals: list[str] = []
        self.exited = False
        self.written: list[tuple[int, bytes]] = []
        self.closed: list[int] = []

    def signalProcess(self, signalID: str | int) -> None:
        """
        Record C{signalID}.

        @raise ProcessExitedAlready: once the process has exited, as a real
            transport does.
        """
        if self.exited:
            self.lateSignals.append(str(signalID))
            raise ProcessExitedAlready()
        self.signals.append(str(signalID))

    def output(self, data: bytes, fd: int = 2) -> None:
        """
        Make the process print C{data} on C{fd} (by default its standard
        error).
        """
        self.proto.childDataReceived(fd, data)

    def exit(self, reason: Exception | None = None) -> None:
        """
        Make the process exit with C{reason} (by default, code 0): its
        protocol gets C{processExited}, then C{processEnded}.

        @param reason: A L{ProcessDone} or a
            L{twisted.internet.error.ProcessTerminated}.
        """
        if reason is None:
            reason = ProcessDone(0)
        self.exited = True
        self.pid = None
        self.proto.processExited(Failure(reason))
        self.proto.processEnded(Failure(reason))

    def closeStdin(self) -> None:
        self.closeChildFD(0)

    def closeStdout(self) -> None:
        self.closeChildFD(1)

    def closeStderr(self) -> None:
        self.closeChildFD(2)

    def closeChildFD(self, descriptor: int) -> None:
        self.closed.append(descriptor)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.written.append((childFD, data))

    def write(self, data: bytes) -> None:
        self.writeToChild(0, data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """
        Close the process's standard input, output and error; it goes on
        running, as a real process would until it notices.
        """
        for fd in (0, 1, 2):
            self.closeChildFD(fd)

    def getPeer(self) -> FakeProcessAddress:
        return FakeProcessAddress()

    def getHost(self) -> FakeProcessAddress:
        return FakeProcessAddress()


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    """
    A memory reactor and clock that also "spawns" processes: each spawn
    connects the process protocol to a new L{FakeProcessTransport}, which
    the test then drives.

    @ivar spawned: The L{FakeProcessTransport} of every spawn, in order.
    @ivar spawnError: If set, raised by every spawn.
    @ivar spawnErrorFor: Exceptions to raise instead of spawning, by the
        second argument of the command line (the model's name for
        L{FakeBackend}).
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcessTransport] = []
        self.spawnError: Exception | None = None
        self.spawnErrorFor: dict[bytes | str, Exception] = {}
        self._nextPid = 1000

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str] = (),
        env: Mapping[Any, Any] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, Any] | None = None,
    ) -> FakeProcessTransport:
        """
        Record the spawn and connect C{processProtocol} to a fake transport,
        with pids counting up from 1001.

        @raise Exception: L{spawnError} or the exception of
            L{spawnErrorFor}, if set.
        """
        if self.spawnError is not None:
            raise self.spawnError
        argv = list(args)
        if len(argv) > 1 and argv[1] in self.spawnErrorFor:
            raise self.spawnErrorFor[argv[1]]
        self._nextPid += 1
        transport = FakeProcessTransport(processProtocol, executable, argv, env, childFDs, self._nextPid)
        processProtocol.makeConnection(transport)
        self.spawned.append(transport)
        return transport


# Backends.


@implementer(IBackend)
class FakeBackend:
    """
    A backend whose readiness the test decides. Its command line is
    C{[binary, model name, port]}; it serves every route at the same path
    and knows each model by its own name.

    @ivar clock: Times the probes, if given.
    @ivar env: What L{environment} returns.
    @ivar keyVariable: See L{IBackend.keyVariable}.
    @ivar ready: Names of the models whose probes answer C{True}.
    @ivar manual: If true, probes return Deferreds kept in L{pendingProbes}
        for the test to fire.
    @ivar pendingProbes: The Deferreds of probes while L{manual}, in order.
    @ivar probes: C{(model name, time)} of every probe, in order; the time
        is C{None} without a clock.
    """

    kind = "llamacpp"
    modelTypes = ("llm",)
    owned = LLAMACPP

    def __init__(
        self,
        clock: IReactorTime | None = None,
        env: dict[str, str | None] | None = None,
        keyVariable: str | None = "FAKE_KEY",
    ) -> None:
        self.clock = clock
        self.keyVariable = keyVariable
        self.env: dict[str, str | None] = env or {}
        self.ready: set[str] = set()
        self.manual = False
        self.pendingProbes: list[defer.Deferred[bool]] = []
        self.probes: list[tuple[str, float | None]] = []

    def argv(self, model: ModelConfig, binary: str, port: int) -> list[str]:
        return [binary, model.name, str(port)]

    def environment(self, model: ModelConfig) -> dict[str, str | None]:
        return dict(self.env)

    def probe(self, http: Any, baseURL: str, model: ModelConfig) -> defer.Deferred[bool]:
        """
        Record the probe; answer whether the model is in L{ready}, or leave
        the answer to the test if L{manual}.
        """
        self.probes.append((model.name, self.clock.seconds() if self.clock is not None else None))
        if self.manual:
            d: defer.Deferred[bool] = defer.Deferred()
            self.pendingProbes.append(d)
            return d
        return defer.succeed(model.name in self.ready)

    def readyHint(self, line: str) -> bool:
        """
        @return: whether C{line} holds C{READY}.
        """
        return "READY" in line

    def upstreamPath(self, route: str, model: ModelConfig) -> str:
        return route

    def upstreamModel(self, model: ModelConfig) -> str:
        return model.name


# The manager.

#: The states of L{IModelManager.describe} that hold memory.
_HOLDS_MEMORY = ("loading", "loaded", "unloading")


@implementer(IModelManager)
@define(eq=False)
class StubManager:
    """
    An L{IModelManager} without a scheduler: each model is in the state the
    test sets (or that the stub's own loads and unloads leave it in), leases
    point at L{baseURL}, and requests fail as told.

    Loads are instant: L{acquire} or L{load} of a model that is not loaded
    makes it C{loaded} at once and counts a load, unless L{holdLoads} is
    set; then the model is C{loading} and its requests wait until the test
    calls L{finishLoad} or L{failLoad}. L{unload} of a loaded model makes it
    C{unloaded} and counts an unload of cause C{request}; of a model with
    leases out or loading it fails with L{ModelBusy}.

    Every method taking a name fails with L{UnknownModel} for a name that is
    not a configured model's (aliases included, as in the real manager).

    @ivar config: The models.
    @ivar backendFor: The backend of each model, by its C{backend} kind;
        L{dynllm.backends.backendFor} by default, or for instance
        C{lambda kind: FakeBackend()}.
    @ivar baseURL: Where every lease points.
    @ivar apiKey: The key every lease carries.
    @ivar clock: Gives C{loaded_at} and C{last_used_at}.
    @ivar states: Each model's state, by name (C{unloaded} if absent); set
        it to put a model in any state.
    @ivar lastErrors: Each model's C{last_error}, by name.
    @ivar logs: Each model's output lines, by name, for L{logTail}; add
        lines with L{printLines} so that followers get them.
    @ivar failure: If set, every L{acquire} and L{load} fails with it.
    @ivar failures: Exceptions that L{acquire} and L{load} of a model fail
        with, by name (after L{failure}).
    @ivar unloadFailure: If set, every L{unload} fails with it.
    @ivar holdLoads: Whether loads wait for L{finishLoad} or L{failLoad}.
    @ivar leases: Every lease handed out by L{acquire}, in order (not those
        of L{peek}).
    @ivar options: C{(name, options)} of every L{acquire}, in order.
    @ivar released: How many leases (of L{acquire} and L{peek}) were
        released.
    @ivar peeks: How many times L{peek} was called.
    @ivar loaded: Names given to L{load}, in order.
    @ivar unloaded: Names of the models L{unload} stopped, in order.
    """

    config: Config
    backendFor: Callable[[str], IBackend] = realBackendFor
    baseURL: str = "http://backend"
    apiKey: str | None = "backend-key"
    clock: IReactorTime = field(factory=Clock)
    _started: bool = field(default=True, alias="started")
    states: dict[str, str] = field(factory=dict)
    lastErrors: dict[str, str] = field(factory=dict)
    logs: dict[str, list[str]] = field(factory=dict)
    failure: SchedulerError | None = None
    failures: dict[str, SchedulerError] = field(factory=dict)
    unloadFailure: SchedulerError | None = None
    holdLoads: bool = False
    leases: list[Lease] = field(factory=list)
    options: list[tuple[str, RequestOptions | None]] = field(factory=list)
    released: int = 0
    peeks: int = 0
    loaded: list[str] = field(factory=list)
    unloaded: list[str] = field(factory=list)
    reconfigured: list[Config] = field(factory=list)
    _active: dict[str, int] = field(factory=dict, init=False)
    _waiting: dict[str, list[defer.Deferred[None]]] = field(factory=dict, init=False)
    _loadedAt: dict[str, float] = field(factory=dict, init=False)
    _lastUsedAt: dict[str, float] = field(factory=dict, init=False)
    _counters: dict[str, ModelCounters] = field(factory=dict, init=False)
    _startWaiters: list[defer.Deferred[None]] = field(factory=list, init=False)
    _watchers: list[Callable[[], None]] = field(factory=list, init=False)
    _followers: dict[str, list[Callable[[list[str]], None]]] = field(factory=dict, init=False)

    # Start-up.

    @property
    def started(self) -> bool:
        """
        Whether start-up is done; setting it to C{True} fires the Deferreds
        of L{whenStarted}.
        """
        return self._started

    @started.setter
    def started(self, value: bool) -> None:
        self._started = value
        if value:
            waiters, self._startWaiters = self._startWaiters, []
            for d in waiters:
                d.callback(None)

    def whenStarted(self) -> defer.Deferred[None]:
        if self._started:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._startWaiters.append(d)
        return d

    # Loads and leases.

    def _model(self, name: str) -> ModelConfig:
        for model in self.config.models:
            if model.name == name:
                return model
        raise UnknownModel(name)

    def _state(self, name: str) -> str:
        return self.states.get(name, "unloaded")

    def _ready(self, name: str) -> defer.Deferred[None]:
        """
        @return: a Deferred that fires once model C{name} is loaded, after
            a load if needed, or fails as told.
        """
        try:
            self._model(name)
        except UnknownModel as e:
            return defer.fail(e)
        error = self.failure or self.failures.get(name)
        if error is not None:
            return defer.fail(error)
        state = self._state(name)
        if state == "loaded":
            return defer.succeed(None)
        if not self.holdLoads and state != "loading":
            self._finish(name)
            return defer.succeed(None)
        self.states[name] = "loading"
        waiters = self._waiting.setdefault(name, [])

        def withdraw(d: defer.Deferred[None]) -> None:
            waiters.remove(d)
            self.changed()

        d: defer.Deferred[None] = defer.Deferred(withdraw)
        waiters.append(d)
        self.changed()
        return d

    def _finish(self, name: str) -> None:
        self.states[name] = "loaded"
        self._loadedAt[name] = self.clock.seconds()
        self._count(name, loads=1)
        self.changed()

    def _count(self, name: str, loads: int = 0, loadFailures: int = 0, unload: str | None = None) -> None:
        counters = self.counters(name)
        unloads = dict(counters.unloads)
        if unload is not None:
            unloads[unload] = unloads.get(unload, 0) + 1
        self._counters[name] = evolve(
            counters, loads=counters.loads + loads, loadFailures=counters.loadFailures + loadFailures, unloads=unloads
        )

    def finishLoad(self, name: str) -> None:
        """
        End the held load of model C{name}: it is C{loaded}, and the
        requests waiting for it get their leases.
        """
        self._finish(name)
        for d in self._waiting.pop(name, []):
            d.callback(None)

    def failLoad(self, name: str, error: SchedulerError) -> None:
        """
        End the held load of model C{name} in failure: it is C{failed} with
        C{error} as its C{last_error}, and the requests waiting for it fail
        with C{error}.
        """
        self.states[name] = "failed"
        self.lastErrors[name] = str(error)
        self._count(name, loadFailures=1)
        self.changed()
        for d in self._waiting.pop(name, []):
            d.errback(error)

    def _lease(self, name: str, use: bool) -> Lease:
        model = self._model(name)
        self._active[name] = self._active.get(name, 0) + 1
        if use:
            self._lastUsedAt[name] = self.clock.seconds()
        self.changed()

        def release(lease: Lease) -> None:
            self.released += 1
            self._active[name] -= 1
            if use:
                self._lastUsedAt[name] = self.clock.seconds()
            self.changed()

        return Lease(model, self.backendFor(model.backend), self.baseURL, release, apiKey=self.apiKey)

    def acquire(self, name: str, options: RequestOptions | None = None) -> defer.Deferred[Lease]:
        """
        Record the request, then lease the model once it is loaded (see the
        class docstring).
        """
        self.options.append((name, options))

        def leased(_: None) -> Lease:
            lease = self._lease(name, use=True)
            self.leases.append(lease)
            return lease

        return self._ready(name).addCallback(leased)

    def peek(self, name: str) -> Lease | None:
        self.peeks += 1
        self._model(name)
        if self._state(name) != "loaded":
            return None
        return self._lease(name, use=False)

    def load(self, name: str) -> defer.Deferred[None]:
        """
        Record the load, then make the model loaded (see the class
        docstring).
        """
        self.loaded.append(name)
        return self._ready(name)

    def reconfigure(self, config: Config) -> None:
        """
        Take C{config} as the configuration; C{reconfigured} records each.
        """
        self.config = config
        self.reconfigured.append(config)
        self.changed()

    def unload(self, name: str, force: bool = False) -> defer.Deferred[None]:
        """
        Fail with L{unloadFailure} if set, or (unless C{force}) with
        L{ModelBusy} if the model has leases out or is loading; else make a
        loaded, loading or unloading model C{unloaded}, and count an unload
        of cause C{request} (C{forced} with C{force}). With C{force}, the
        leases out are revoked and the waiting requests fail, both with
        L{ModelUnloaded}. Other models are left as they are.
        """
        try:
            self._model(name)
        except UnknownModel as e:
            return defer.fail(e)
        if self.unloadFailure is not None:
            return defer.fail(self.unloadFailure)
        active = self._active.get(name, 0)
        state = self._state(name)
        if not force:
            if active:
                return defer.fail(ModelBusy(name, activeRequests=active))
            if state == "loading":
                return defer.fail(ModelBusy(name, loading=True))
        if state in ("loaded", "loading", "unloading"):
            self.states[name] = "unloaded"
            self._loadedAt.pop(name, None)
            self.unloaded.append(name)
            self._count(name, unload="forced" if force else "request")
            self.changed()
        if force:
            error = ModelUnloaded(name, "forced")
            for lease in [lease for lease in self.leases if lease.model.name == name and not lease.released]:
                lease.revoke(error)
            for d in self._waiting.pop(name, []):
                d.errback(error)
        return defer.succeed(None)

    # Descriptions.

    def describe(self, name: str) -> dict[str, Any]:
        model = self._model(name)
        return {
            "name": name,
            "status": self._state(name),
            "backend": model.backend,
            "model_type": model.model_type,
            "vram_mb": model.vram_mb,
            "pid": None,
            "port": None,
            "loaded_at": self._loadedAt.get(name),
            "last_used_at": self._lastUsedAt.get(name),
            "active_requests": self._active.get(name, 0),
            "waiting_requests": len(self._waiting.get(name, [])),
            "last_error": self.lastErrors.get(name),
            "load_seconds": None,
            "loading_seconds": None,
        }

    def models(self) -> list[dict[str, Any]]:
        return [self.describe(model.name) for model in self.config.models]

    def counters(self, name: str) -> ModelCounters:
        """
        @return: the loads, load failures and unloads the stub has done;
            C{loadSeconds} and C{crashes} stay 0.
        """
        self._model(name)
        return self._counters.get(name, ModelCounters())

    def memoryInUse(self) -> int:
        return sum(model.vram_mb for model in self.config.models if self._state(model.name) in _HOLDS_MEMORY)

    def watch(self, onChange: Callable[[], None]) -> Callable[[], None]:
        """
        Call C{onChange()} after each change the stub makes itself, and on
        L{changed} (call it after setting L{states} by hand).
        """
        self._watchers.append(onChange)
        return lambda: self._watchers.remove(onChange) if onChange in self._watchers else None

    def changed(self) -> None:
        """
        Tell the watchers (L{watch}) that something changed.
        """
        for onChange in list(self._watchers):
            onChange()

    def followLog(self, name: str, onLines: Callable[[list[str]], None]) -> Callable[[], None]:
        """
        Call C{onLines} with the lines L{printLines} adds for model C{name}.
        """
        self._model(name)
        followers = self._followers.setdefault(name, [])
        followers.append(onLines)
        return lambda: followers.remove(onLines) if onLines in followers else None

    def printLines(self, name: str, *lines: str) -> None:
        """
        Add C{lines} to model C{name}'s output, as its backend would print
        them: L{logTail} and the followers (L{followLog}) get them.
        """
        self.logs.setdefault(name, []).extend(lines)
        for onLines in list(self._followers.get(name, [])):
            onLines(list(lines))

    def logTail(self, name: str, count: int) -> list[str]:
        """
        @return: the last C{count} lines of L{logs} for model C{name}.
        """
        self._model(name)
        lines = self.logs.get(name, [])
        return lines[-count:] if count > 0 else []

    def backendOf(self, name: str) -> IBackend:
        return self.backendFor(self._model(name).backend)
