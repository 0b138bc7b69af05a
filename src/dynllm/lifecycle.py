# -*- test-case-name: tests.test_lifecycle -*-
"""
One model's lifecycle, as an automat machine.

Its states, and the public status each shows (in C{/admin/models}, the state
database and metrics)::

    Unloaded   "unloaded"   no process
    Loading    "loading"    its backend is starting; it holds its memory
    Loaded     "loaded"     ready; requests hold leases on it
    Unloading  "unloading"  being stopped; it holds its memory until it exits
    Failing    "unloading"  a load that timed out, being stopped
    Failed     "failed"     no process; the last load failed or it crashed

Its transitions (L{_makeMachine} declares exactly these; any other input in a
state is a bug, and automat raises)::

    state              input                 next       what happens
    Unloaded, Failed   load(run)             Loading    watch the run; start the load timer
    Unloaded, Failed   spawnFailed(error)    Failed     waiters get the error
    Unloaded, Failed   stop                  (same)     done at once
    Loading            _ready                Loaded     count the load; open a tenancy
    Loading            _exited               Failed     waiters get LoadFailed with its last lines
    Loading            _portTaken            Unloaded   waiters stay: the scheduler loads it again
    Loading            _timedOut             Failing    waiters get LoadTimedOut; TERM
    Loading, Loaded    stop                  Unloading  TERM (KILL after killTime); cause counted
    Loaded             _exited               Failed     a crash: counted, last error set
    Unloading          stop                  Unloading  joins the pending stop: no signal
    Failing            stop                  Failing    joins the pending stop: no signal
    Unloading          _exited, _portTaken   Unloaded   the stops are done
    Failing            _exited, _portTaken   Failed     the stops are done

Inputs are the methods of L{ModelLifecycle}: the scheduler's (C{load},
C{spawnFailed}, C{stop}) and the backend's (C{_ready}, C{_exited},
C{_portTaken}, C{_timedOut}). Each run of a backend is subscribed to once, when
its load starts, so each event reaches the machine once and no handler asks
whether a run is still the current one. A stop while stopping joins the
pending stop: it sends no second signal. Every transition records the model's
row once, in order, through L{ModelCore.record}.

Shared data (the model's configuration, its current run, its waiters and its
counters) is in one L{ModelCore}; data that only one state needs lives in
that state: the load timer in Loading, the request count in Loaded, the
stop's joiners in Unloading and Failing.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Callable, Protocol

from attrs import define, field
from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from dynllm.config import ModelConfig
from dynllm.exceptions import LoadFailed, LoadTimedOut, SchedulerError
from dynllm.interfaces import IBackend
from dynllm.logs import logger
from dynllm.logs import LogRing
from dynllm.runner import FAILURE_LOG_LINES, BackendRun, describeExit

log = logger(__name__)

#: The public statuses, as C{/admin/models}, the state database and the
#: metrics name them.
UNLOADED = "unloaded"
LOADING = "loading"
LOADED = "loaded"
UNLOADING = "unloading"
FAILED = "failed"
STATUSES = (UNLOADED, LOADING, LOADED, UNLOADING, FAILED)

#: Statuses whose model holds its C{vram_mb}.
HOLDS_MEMORY = (LOADING, LOADED, UNLOADING)

#: Why a backend is stopped, for metrics (C{dynllm_model_unloads}).
IDLE, EVICTED, ABANDONED, REQUEST, FORCED, SHUTDOWN = "idle", "evicted", "abandoned", "request", "forced", "shutdown"
RECONFIGURED, REMOVED = "reconfigured", "removed"
STOP_CAUSES = (IDLE, EVICTED, ABANDONED, REQUEST, FORCED, RECONFIGURED, REMOVED, SHUTDOWN)

#: Loads in a row that may be retried on another port when a backend finds
#: its port taken.
PORT_RETRIES = 3


class ModelLifecycle(Protocol):
    """
    The inputs of one model's lifecycle machine.
    """

    def load(self, run: BackendRun) -> None:
        """
        A load has begun: C{run} has been spawned and is being probed.
        Valid when unloaded or failed.
        """

    def spawnFailed(self, error: LoadFailed) -> None:
        """
        A load could not begin: no free port, or the program could not be
        spawned. Its waiters get C{error}. Valid when unloaded or failed.
        """

    def stop(self, cause: str, done: defer.Deferred[None]) -> None:
        """
        Stop the model's backend, if it has one.

        @param cause: One of L{STOP_CAUSES}, for the log and the metrics.
        @param done: Fired once the model has no process (at once if it had
            none). A stop while stopping joins the pending one.
        """

    def _ready(self) -> None:
        """
        A probe found the loading backend ready.
        """

    def _exited(self, reason: Exception) -> None:
        """
        The backend's process has exited (and been reaped).
        """

    def _portTaken(self, reason: Exception) -> None:
        """
        The loading backend exited because another program took its port
        since it was found free; the load is to be tried again elsewhere.
        """

    def _timedOut(self) -> None:
        """
        The load timeout has passed while loading.
        """


@define(eq=False)
class Outbox:
    """
    Runs what a transition must not run itself, once the input that caused
    it has returned: the answers to waiters (code of the requests, which
    may call the scheduler again) and the scheduler's turn. Every input,
    from the scheduler or from a backend, is sent through L{send}, so no
    input ever reaches a machine while one of its transitions is running,
    and what a transition asks for happens in order, after it.
    """

    _pending: deque[Callable[[], object]] = field(factory=deque)
    _depth: int = 0

    def later(self, work: Callable[[], object]) -> None:
        """
        Run C{work} once the input being handled has returned.
        """
        self._pending.append(work)
        if self._depth == 0:
            self._flush()

    def send(self, input: Callable[..., None], *args: Any) -> None:
        """
        Give an input to a machine, then run what its transition asked for.
        """
        self._depth += 1
        try:
            input(*args)
        finally:
            self._depth -= 1
        if self._depth == 0:
            self._flush()

    def _flush(self) -> None:
        while self._pending and self._depth == 0:
            work = self._pending.popleft()
            try:
                work()
            except Exception:
                log.failure("while answering a transition")


@define(eq=False)
class Tenancy:
    """
    The requests on one loaded run: the data of the Loaded state. A lease
    leaves the tenancy it was given on, so a lease on a run that has
    since died changes nothing that is read.

    @ivar leases: The leases out (L{dynllm.lease.Lease}), so that a forced
        stop can revoke them.
    """

    leases: set[Any] = field(factory=set)

    @property
    def active(self) -> int:
        """
        Leases out.
        """
        return len(self.leases)


@define(eq=False)
class Waiter:
    """
    A request waiting for its model: for a load, for memory, or behind a
    load that waits for memory its model holds.

    @ivar deferred: Fires with the lease, or fails with a
        L{dynllm.exceptions.SchedulerError}.
    @ivar since: When it began waiting, in reactor seconds.
    @ivar arrival: Its place in the order of all requests' arrivals (ties
        of C{since} are common on a coarse clock).
    @ivar priority: Its place in the queue: higher first.
    @ivar queueTimeout: Seconds it may wait for memory.
    @ivar keepAlive: Its C{X-DynLLM-Keep-Alive}, applied once it is served.
    @ivar timer: Marks it L{expired} when its queue timeout has passed.
    @ivar internal: It is dynllm's own load (a preload, a restart after a
        reload), not a client's request: it is not counted as a waiting
        request.
    @ivar expired: Its queue timeout has passed (or was 0): it is served if
        its model is loading or can be loaded at once, else refused.
    """

    deferred: defer.Deferred[object]
    since: float
    priority: int
    queueTimeout: float
    arrival: int = 0
    keepAlive: float | None = None
    timer: IDelayedCall | None = None
    internal: bool = False
    expired: bool = False

    @property
    def queueKey(self) -> tuple[float, float]:
        """
        Its place in the queue: lower is served first.
        """
        return (-self.priority, self.arrival)

    def stopTimer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@define(eq=False)
class ModelCore:
    """
    What one model's lifecycle shares between its states.

    @ivar config: The model's configuration.
    @ivar backend: The kind of server that runs it.
    @ivar clock: Times the load timeout.
    @ivar loadTimeout: Seconds a load may take.
    @ivar record: Called once per transition, after the status and run
        changed: writes the model's row.
    @ivar changed: Called after each transition, once the input has
        returned (through L{outbox}): the scheduler's turn.
    @ivar outbox: Where inputs are sent and answers wait for the end of
        a transition (one for all the models of a scheduler).
    @ivar status: One of L{STATUSES}.
    @ivar run: The backend process, while there is one.
    @ivar tenancy: The requests on the run, while loaded.
    @ivar waiters: Requests waiting for the model.
    @ivar log: The last lines its backends printed, across runs.
    """

    config: ModelConfig
    backend: IBackend
    clock: IReactorTime
    loadTimeout: float
    record: Callable[[ModelCore], None]
    changed: Callable[[], None]
    outbox: Outbox = field(factory=Outbox)
    status: str = UNLOADED
    run: BackendRun | None = None
    tenancy: Tenancy | None = None
    waiters: list[Waiter] = field(factory=list)
    log: LogRing = field(factory=LogRing)
    loadedAt: float | None = None
    lastUsedAt: float | None = None
    loadStartedAt: float | None = None
    #: Order of loads across models (for LIFO eviction).
    loadSeq: int = 0
    lastError: str | None = None
    #: Loads in a row whose backend found its port taken.
    portConflicts: int = 0
    #: The idle timeout a request set (C{X-DynLLM-Keep-Alive}), until the
    #: model is unloaded; C{None}: the configured one.
    keepAlive: float | None = None
    #: C{lastUsedAt} changed since the row was last written.
    dirty: bool = False
    # Counters since start-up (see L{dynllm.lease.ModelCounters}).
    loads: int = 0
    loadFailures: int = 0
    loadSeconds: float = 0.0
    #: How long the last load that finished took, in seconds.
    lastLoadSeconds: float | None = None
    unloads: dict[str, int] = field(factory=dict)
    crashes: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def active(self) -> int:
        """
        Requests in flight on the current run.
        """
        return self.tenancy.active if self.tenancy is not None else 0

    def enter(self, status: str) -> None:
        """
        Take C{status} and record it: the last step of every transition.
        """
        self.status = status
        self.record(self)
        self.outbox.later(self.changed)

    def failWaiters(self, error: SchedulerError) -> None:
        """
        Take every waiter off the model, and answer each with C{error} once
        the input being handled has returned.
        """
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.stopTimer()

        def answer() -> None:
            for waiter in waiters:
                if not waiter.deferred.called:
                    waiter.deferred.errback(error)

        self.outbox.later(answer)

    def loadFailed(self, error: SchedulerError) -> None:
        """
        Count and log a failed load, and answer its waiters.
        """
        log.error("{name}: {message}", name=self.name, message=str(error))
        self.lastError = str(error)
        self.loadFailures += 1
        self.failWaiters(error)

    def stopRun(self, cause: str) -> None:
        """
        Signal the backend to stop (its exit comes as C{_exited}).
        """
        assert self.run is not None
        self.unloads[cause] = self.unloads.get(cause, 0) + 1
        log.info("stopping {name}: {cause}", name=self.name, cause=cause)
        self.run.stop()


@define(eq=False)
class Stopping:
    """
    The data of Unloading and Failing: who waits for the exit.
    """

    joiners: list[defer.Deferred[None]] = field(factory=list)

    def finish(self, outbox: Outbox) -> None:
        joiners, self.joiners = self.joiners, []
        for d in joiners:
            outbox.later(partial(d.callback, None))


def _watch(c: ModelLifecycle, s: ModelCore, run: BackendRun) -> None:
    """
    Subscribe to C{run}'s events, once for its whole life.
    """

    def exited(reason: Exception) -> None:
        if not run.ready and run.portTaken() and s.portConflicts < PORT_RETRIES:
            s.outbox.send(c._portTaken, reason)
        else:
            s.outbox.send(c._exited, reason)

    run.whenReady().addCallback(lambda _: s.outbox.send(c._ready))
    run.whenExited().addCallback(exited)


def _loadTimer(c: ModelLifecycle, s: ModelCore, run: BackendRun) -> IDelayedCall:
    return s.clock.callLater(s.loadTimeout, s.outbox.send, c._timedOut)


def _tenancy(c: ModelLifecycle, s: ModelCore) -> Tenancy:
    # A state's data is made before its transition's handler runs, so the
    # handler's record already shows a model that can be leased.
    s.tenancy = Tenancy()
    return s.tenancy


def _stopping(
    c: ModelLifecycle, s: ModelCore, cause: str | None = None, done: defer.Deferred[None] | None = None
) -> Stopping:
    return Stopping([done] if done is not None else [])


def _makeMachine() -> Callable[[ModelCore], ModelLifecycle]:
    machine = TypeMachineBuilder(ModelLifecycle, ModelCore)

    Unloaded = machine.state("Unloaded")
    Failed = machine.state("Failed")
    Loading = machine.state("Loading", _loadTimer)
    Loaded = machine.state("Loaded", _tenancy)
    Unloading = machine.state("Unloading", _stopping)
    Failing = machine.state("Failing", _stopping)

    # From no process.

    @Unloaded.upon(ModelLifecycle.load).to(Loading)
    @Failed.upon(ModelLifecycle.load).to(Loading)
    def startLoad(c: ModelLifecycle, s: ModelCore, run: BackendRun) -> None:
        s.run = run
        s.lastError = None
        s.loadStartedAt = s.clock.seconds()
        _watch(c, s, run)
        s.enter(LOADING)

    @Unloaded.upon(ModelLifecycle.spawnFailed).to(Failed)
    @Failed.upon(ModelLifecycle.spawnFailed).to(Failed)
    def couldNotSpawn(c: ModelLifecycle, s: ModelCore, error: LoadFailed) -> None:
        s.loadFailed(error)
        s.enter(FAILED)

    @Unloaded.upon(ModelLifecycle.stop).loop()
    @Failed.upon(ModelLifecycle.stop).loop()
    def nothingToStop(c: ModelLifecycle, s: ModelCore, cause: str, done: defer.Deferred[None]) -> None:
        s.outbox.later(lambda: done.callback(None))

    # Loading.

    @Loading.upon(ModelLifecycle._ready).to(Loaded)
    def ready(c: ModelLifecycle, s: ModelCore, timer: IDelayedCall) -> None:
        timer.cancel()
        assert s.run is not None
        now = s.clock.seconds()
        s.loads += 1
        if s.loadStartedAt is not None:
            s.lastLoadSeconds = now - s.loadStartedAt
            s.loadSeconds += s.lastLoadSeconds
        s.portConflicts = 0
        s.loadedAt = s.lastUsedAt = now
        log.info("{name} is ready on port {port}", name=s.name, port=s.run.port)
        s.enter(LOADED)

    @Loading.upon(ModelLifecycle._exited).to(Failed)
    def exitedWhileLoading(c: ModelLifecycle, s: ModelCore, timer: IDelayedCall, reason: Exception) -> None:
        timer.cancel()
        assert s.run is not None
        tail = tuple(s.run.logTail(FAILURE_LOG_LINES))
        s.run = None
        message = f"backend for model {s.name!r} {describeExit(reason)} while loading"
        if getattr(reason, "exitCode", None) == 0:
            message += (
                " (a command that starts its server in the background and exits, as docker run -d does,"
                " cannot be run: dynllm watches the process it starts, so run the server in the foreground)"
            )
        s.loadFailed(LoadFailed(s.name, message, tail))
        s.enter(FAILED)

    @Loading.upon(ModelLifecycle._portTaken).to(Unloaded)
    def portTaken(c: ModelLifecycle, s: ModelCore, timer: IDelayedCall, reason: Exception) -> None:
        timer.cancel()
        assert s.run is not None
        log.warn("{name}: port {port} was taken; trying another", name=s.name, port=s.run.port)
        s.portConflicts += 1
        s.run = None
        # Its waiters stay: the scheduler starts the load again.
        s.enter(UNLOADED)

    @Loading.upon(ModelLifecycle._timedOut).to(Failing)
    def timedOut(c: ModelLifecycle, s: ModelCore, timer: IDelayedCall) -> None:
        log.warn("[{model}] not ready after {seconds}s; stopping it", model=s.name, seconds=s.loadTimeout)
        s.loadFailed(LoadTimedOut(s.name, s.loadTimeout))
        assert s.run is not None
        s.run.stop()
        s.enter(UNLOADING)

    @Loading.upon(ModelLifecycle.stop).to(Unloading)
    def stopLoading(
        c: ModelLifecycle, s: ModelCore, timer: IDelayedCall, cause: str, done: defer.Deferred[None]
    ) -> None:
        timer.cancel()
        s.stopRun(cause)
        s.enter(UNLOADING)

    # Loaded.

    @Loaded.upon(ModelLifecycle.stop).to(Unloading)
    def stopLoaded(c: ModelLifecycle, s: ModelCore, tenancy: Tenancy, cause: str, done: defer.Deferred[None]) -> None:
        s.tenancy = None
        s.stopRun(cause)
        s.enter(UNLOADING)

    @Loaded.upon(ModelLifecycle._exited).to(Failed)
    def crashed(c: ModelLifecycle, s: ModelCore, tenancy: Tenancy, reason: Exception) -> None:
        s.tenancy = None
        s.run = None
        s.loadedAt = None
        s.crashes += 1
        s.lastError = f"backend {describeExit(reason)} while loaded"
        log.error("{name}: {error}", name=s.name, error=s.lastError)
        s.enter(FAILED)

    # Stopping.

    @Unloading.upon(ModelLifecycle.stop).loop()
    @Failing.upon(ModelLifecycle.stop).loop()
    def joinStop(c: ModelLifecycle, s: ModelCore, stopping: Stopping, cause: str, done: defer.Deferred[None]) -> None:
        stopping.joiners.append(done)

    @Unloading.upon(ModelLifecycle._exited).to(Unloaded)
    @Unloading.upon(ModelLifecycle._portTaken).to(Unloaded)
    def stopped(c: ModelLifecycle, s: ModelCore, stopping: Stopping, reason: Exception) -> None:
        s.run = None
        s.loadedAt = None
        s.keepAlive = None
        s.enter(UNLOADED)
        stopping.finish(s.outbox)

    @Failing.upon(ModelLifecycle._exited).to(Failed)
    @Failing.upon(ModelLifecycle._portTaken).to(Failed)
    def failedStopped(c: ModelLifecycle, s: ModelCore, stopping: Stopping, reason: Exception) -> None:
        s.run = None
        s.loadedAt = None
        s.enter(FAILED)
        stopping.finish(s.outbox)

    return machine.build()


#: Makes a model's lifecycle machine, in the Unloaded state, from its core.
makeLifecycle = _makeMachine()
