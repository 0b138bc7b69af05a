# -*- test-case-name: tests.test_scheduler -*-
"""
Which models run: loads on demand, the memory budget, eviction, leases.

A request calls L{ModelManager.acquire} and gets a L{Lease} on a ready model;
it holds the lease until its response is fully written or its client has
gone. A model with a lease out is never stopped: not by eviction, the idle
reaper or an admin unload.

Memory: the C{vram_mb} of every model that is loading, loaded or still
unloading (its process has not exited yet) counts against C{total_vram_mb}.
A load that does not fit waits in a FIFO queue. The first waiting load evicts
idle models, in the order of C{eviction_policy}, until it fits; when there
is nothing it may evict, its requests wait up to C{queue_timeout_seconds}
for busy models to finish, then get a 503.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from attrs import define, field
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from dynllm import errors
from dynllm.backends import backendFor
from dynllm.config import Config, ModelConfig
from dynllm.interfaces import IBackend
from dynllm.lease import ModelCounters
from dynllm.logs import logger
from dynllm.process import LogRing
from dynllm.runner import (
    BackendExited,
    BackendRun,
    LoadTimeout,
    NoFreePort,
    describeExit,
    findFreePort,
)
from dynllm.store import MemoryStateStore, reconcile

log = logger(__name__)

UNLOADED = "unloaded"
LOADING = "loading"
LOADED = "loaded"
UNLOADING = "unloading"
FAILED = "failed"

#: States whose model holds memory.
HOLDS_MEMORY = (LOADING, LOADED, UNLOADING)

#: Seconds suggested to a client in C{Retry-After} when memory is short.
RETRY_AFTER = 5

#: Loads retried on another port when a backend finds its port taken.
PORT_RETRIES = 3


@define(eq=False)
class Lease:
    """
    The right to send requests to a ready model, until L{release}d.

    @ivar model: The model's configuration.
    @ivar backend: The kind of server that runs it.
    @ivar baseURL: The server's address, C{http://127.0.0.1:PORT}.
    @ivar apiKey: The key the server requires, which the relay sends as
        C{Authorization: Bearer KEY}; C{None} when it requires none (see
        L{dynllm.runner.BackendRun.apiKey}).
    """

    model: ModelConfig
    backend: IBackend
    baseURL: str
    _onRelease: Callable[[Lease], None]
    released: bool = False
    apiKey: str | None = field(default=None, repr=False)

    @property
    def upstreamHeaders(self) -> dict[str, str]:
        """
        The headers every request to the server must carry: its key as
        C{Authorization: Bearer KEY}, or none for a server without keys.
        """
        if self.apiKey is None:
            return {}
        return {"Authorization": "Bearer " + self.apiKey}

    def release(self) -> None:
        """
        Give the model back; calling this again does nothing.
        """
        if not self.released:
            self.released = True
            self._onRelease(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@define(eq=False)
class _Waiter:
    """
    A request waiting for a model to be ready.
    """

    deferred: defer.Deferred[Lease]
    queueTimer: IDelayedCall | None = None

    def stopTimer(self) -> None:
        if self.queueTimer is not None and self.queueTimer.active():
            self.queueTimer.cancel()
        self.queueTimer = None


@define(eq=False)
class ModelSlot:
    """
    The runtime state of one configured model.

    @ivar state: One of C{unloaded}, C{loading}, C{loaded}, C{unloading},
        C{failed}.
    @ivar run: The backend process, while there is one.
    @ivar active: Leases out on the current run.
    @ivar loadSeq: Increases with each load (the order for LIFO eviction).
    @ivar log: The last lines its backends printed, across restarts.
    """

    config: ModelConfig
    backend: IBackend
    state: str = UNLOADED
    run: BackendRun | None = None
    active: int = 0
    loadedAt: float | None = None
    lastUsedAt: float | None = None
    loadSeq: int = 0
    lastError: str | None = None
    waiters: list[_Waiter] = field(factory=list)
    log: LogRing = field(factory=LogRing)
    #: The current run failed to load and is being stopped.
    failing: bool = False
    #: Loads in a row whose backend found its port taken.
    portConflicts: int = 0
    #: Counters since start-up, for metrics: loads that succeeded and
    #: failed, seconds spent in successful loads, unloads by cause, and
    #: backends that died while loaded.
    loads: int = 0
    loadFailures: int = 0
    loadSeconds: float = 0.0
    unloads: dict[str, int] = field(factory=dict)
    crashes: int = 0
    loadStartedAt: float | None = None
    #: C{lastUsedAt} changed since the row was last written.
    dirty: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    def describe(self) -> dict[str, Any]:
        """
        @return: this model as C{/admin/models} shows it.
        """
        process = self.run.process if self.run is not None else None
        return {
            "name": self.name,
            "status": self.state,
            "backend": self.config.backend,
            "model_type": self.config.model_type,
            "vram_mb": self.config.vram_mb,
            "pid": process.pid if process is not None else None,
            "port": self.run.port if self.run is not None else None,
            "loaded_at": self.loadedAt,
            "last_used_at": self.lastUsedAt,
            "active_requests": self.active,
            "waiting_requests": len(self.waiters),
            "last_error": self.lastError,
        }


@define(eq=False)
class ModelManager(Service):
    """
    Runs the configured models on demand within the memory budget.

    @ivar config: The configuration.
    @ivar reactor: Spawns processes and keeps time.
    @ivar http: A C{treq} client used for readiness probes.
    @ivar store: Where model state is recorded (see L{dynllm.store}).
    @ivar killTime: Seconds from TERM to KILL when a backend is stopped.
    @ivar newSession: See L{dynllm.process.ManagedProcess.newSession}.
    """

    config: Config
    reactor: Any
    http: Any
    store: Any = field(factory=MemoryStateStore)
    killTime: float = 5.0
    newSession: bool = True
    backendFor: Callable[[str], IBackend] = backendFor
    slots: dict[str, ModelSlot] = field(init=False)
    _pending: list[ModelSlot] = field(factory=list, init=False)
    _loadCounter: int = field(default=0, init=False)
    _lastPort: int | None = field(default=None, init=False)
    _readyWaiters: list[defer.Deferred[None]] = field(factory=list, init=False)
    _started: bool = field(default=False, init=False)
    _stopping: bool = field(default=False, init=False)
    _drained: defer.Deferred[None] | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.slots = {
            m.name: ModelSlot(m, self.backendFor(m.backend)) for m in self.config.models
        }

    # Service.

    def privilegedStartService(self) -> None:
        """
        Open the store first, so that a database in use by another daemon
        stops start-up before anything else happens.
        """
        Service.privilegedStartService(self)
        self.store.open()

    def startService(self) -> None:
        """
        Open the store (if not yet), stop what a previous run left behind,
        then preload.
        """
        Service.startService(self)
        self.store.open()
        defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        try:
            await reconcile(self.store, list(self.slots), self.reactor)
        except Exception:
            log.failure("could not reconcile the state database; carrying on")
        for slot in self.slots.values():
            self._record(slot)
        self._started = True
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            d.callback(None)
        # Requests that arrived during reconciliation are waiting.
        self._schedule()

        def preloadFailed(f: Failure, name: str) -> None:
            log.error("preloading {name} failed: {why}", name=name, why=f.getErrorMessage())

        for name in self.config.preload_models:
            log.info("preloading {name}", name=name)
            self.load(name).addErrback(preloadFailed, name)

    def whenStarted(self) -> defer.Deferred[None]:
        """
        @return: a fresh Deferred that fires once start-up reconciliation
            is done and requests can be served.
        """
        if self._started:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._readyWaiters.append(d)
        return d

    def stopService(self) -> defer.Deferred[None]:
        """
        Drain, then stop every backend: new requests and those waiting for a
        model get a 503 at once, and requests in flight may finish (up to
        C{shutdown_timeout_seconds}) before the backends are stopped.

        @return: a Deferred that fires once every backend has really exited
            and its state is recorded.
        """
        Service.stopService(self)
        self._stopping = True
        shutdown = errors.APIError(503, "dynllm is shutting down", "server_error", "shutting_down")
        for slot in self.slots.values():
            self._failWaiters(slot, shutdown)
        self._pending.clear()
        return defer.ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        await self._drain(self.config.shutdown_timeout_seconds)
        exits = [
            self._unload(slot, "shutting down", "shutdown") for slot in self.slots.values() if slot.run is not None
        ]
        await defer.DeferredList(exits, consumeErrors=True)
        self.store.close()

    async def _drain(self, timeout: float) -> None:
        """
        Wait until no request is in flight, or C{timeout} seconds.
        """
        inFlight = sum(slot.active for slot in self.slots.values())
        if not inFlight or timeout <= 0:
            return
        log.info(
            "waiting up to {timeout}s for {count} request(s) in flight to finish",
            timeout=timeout,
            count=inFlight,
        )
        drained: defer.Deferred[None] = defer.Deferred()
        self._drained = drained
        timer = self.reactor.callLater(timeout, self._drainedNow)
        await drained
        if timer.active():
            timer.cancel()
        else:
            log.warn("stopping with requests still in flight after {timeout}s", timeout=timeout)

    def _drainedNow(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)

    def _checkDrained(self) -> None:
        if self._drained is not None and not any(slot.active for slot in self.slots.values()):
            self._drainedNow()

    # Requests.

    def acquire(self, name: str) -> defer.Deferred[Lease]:
        """
        Get a lease on model C{name}, loading it first if it is not running.

        Concurrent requests for a model that is not running share one load.
        Each caller gets its own Deferred; cancelling it withdraws that
        caller only.

        @return: a Deferred that fires with a L{Lease}, or fails with an
            L{errors.APIError}: 404 for an unknown model, 502 if the backend
            died while loading, 503 if memory could not be freed within
            C{queue_timeout_seconds}, 504 if the load timed out.
        """
        slot = self.slots.get(name)
        if slot is None:
            return defer.fail(errors.modelNotFound(name))
        if self._stopping:
            return defer.fail(errors.APIError(503, "dynllm is shutting down", "server_error"))
        if slot.state == LOADED:
            return defer.succeed(self._lease(slot))
        waiter = _Waiter(defer.Deferred(lambda d: self._withdraw(slot, waiter)))
        slot.waiters.append(waiter)
        if slot.state != LOADING:
            if slot not in self._pending:
                self._pending.append(slot)
            waiter.queueTimer = self.reactor.callLater(
                self.config.queue_timeout_seconds, self._queueTimedOut, slot, waiter
            )
            self._schedule()
        return waiter.deferred

    def peek(self, name: str) -> Lease | None:
        """
        Get a lease on model C{name} only if it is loaded now, for a look
        that is not a use: the model is not loaded for it, and its idle
        timer is not reset by it (a readiness check must not
        keep a model loaded forever).

        @return: a L{Lease}, or C{None} if the model is not loaded.
        @raise errors.APIError: 404 for an unknown model.
        """
        slot = self._slot(name)
        if slot.state != LOADED or self._stopping:
            return None
        return self._lease(slot, use=False)

    def describe(self, name: str) -> dict[str, Any]:
        """
        @return: model C{name}'s state, as C{/admin/models} shows it.
        @raise errors.APIError: 404 for an unknown model.
        """
        return self._slot(name).describe()

    def backendOf(self, name: str) -> IBackend:
        """
        @return: the backend that runs model C{name}.
        @raise errors.APIError: 404 for an unknown model.
        """
        return self._slot(name).backend

    def load(self, name: str) -> defer.Deferred[None]:
        """
        Make sure model C{name} is loaded, without holding it.

        @return: a Deferred that fires when it is loaded (see L{acquire}).
        """
        return self.acquire(name).addCallback(Lease.release)

    def unload(self, name: str) -> defer.Deferred[None]:
        """
        Stop model C{name} now.

        @return: a Deferred that fires once its backend has exited, or
            fails with an L{errors.APIError}: 404 for an unknown model, 409
            if it has requests in flight or is loading.
        """
        slot = self.slots.get(name)
        if slot is None:
            return defer.fail(errors.modelNotFound(name))
        if slot.active:
            return defer.fail(
                errors.APIError(
                    409,
                    f"model {name!r} has {slot.active} request(s) in flight",
                    "invalid_request_error",
                    "model_busy",
                )
            )
        if slot.state == LOADING:
            return defer.fail(
                errors.APIError(409, f"model {name!r} is loading", "invalid_request_error", "model_loading")
            )
        if slot.run is None:
            return defer.succeed(None)
        return self._unload(slot, "unloaded on request", "request").addCallback(lambda _: None)

    @property
    def started(self) -> bool:
        """
        Whether start-up reconciliation is done and requests are served.
        """
        return self._started

    def logTail(self, name: str, count: int) -> list[str]:
        """
        @return: the last C{count} lines that model C{name}'s backends
            printed (across restarts).
        @raise errors.APIError: 404 for an unknown model.
        """
        return self._slot(name).log.tail(count)

    def models(self) -> list[dict[str, Any]]:
        """
        @return: every configured model's state, as C{/admin/models} shows.
        """
        return [slot.describe() for slot in self.slots.values()]

    def counters(self, name: str) -> ModelCounters:
        """
        @return: model C{name}'s counters since start-up.
        @raise errors.APIError: 404 for an unknown model.
        """
        slot = self._slot(name)
        return ModelCounters(
            loads=slot.loads,
            loadFailures=slot.loadFailures,
            loadSeconds=slot.loadSeconds,
            unloads=dict(slot.unloads),
            crashes=slot.crashes,
        )

    def memoryInUse(self) -> int:
        """
        @return: the C{vram_mb} held by models loading, loaded or unloading.
        """
        return sum(s.config.vram_mb for s in self.slots.values() if s.state in HOLDS_MEMORY)

    def reapIdle(self) -> None:
        """
        Stop every loaded model idle for longer than its idle timeout, and
        record when models were last used.
        """
        now = self.reactor.seconds()
        for slot in self.slots.values():
            if slot.dirty:
                self._record(slot)
            if slot.state != LOADED or slot.active:
                continue
            timeout = self.config.idleTimeout(slot.config)
            if math.isinf(timeout) or slot.lastUsedAt is None:
                continue
            if now - slot.lastUsedAt >= timeout:
                self._unload(slot, f"idle for {now - slot.lastUsedAt:.0f}s", "idle")

    def _slot(self, name: str) -> ModelSlot:
        """
        @return: the slot of model C{name}.
        @raise errors.APIError: 404 for an unknown model.
        """
        slot = self.slots.get(name)
        if slot is None:
            raise errors.modelNotFound(name)
        return slot

    # Leases.

    def _lease(self, slot: ModelSlot, use: bool = True) -> Lease:
        assert slot.run is not None
        slot.active += 1
        if use:
            slot.lastUsedAt = self.reactor.seconds()
        run = slot.run
        return Lease(
            slot.config,
            slot.backend,
            run.baseURL,
            lambda lease: self._release(slot, run, use),
            apiKey=run.apiKey,
        )

    def _release(self, slot: ModelSlot, run: BackendRun, use: bool = True) -> None:
        if slot.run is not run:
            return  # that backend is gone already
        slot.active -= 1
        if use:
            slot.lastUsedAt = self.reactor.seconds()
            slot.dirty = True
        if slot.active == 0:
            if self._pending:
                self._schedule()
            self._checkDrained()

    # Waiting.

    def _withdraw(self, slot: ModelSlot, waiter: _Waiter) -> None:
        waiter.stopTimer()
        if waiter in slot.waiters:
            slot.waiters.remove(waiter)
        if not slot.waiters and slot in self._pending:
            self._pending.remove(slot)
            self._schedule()

    def _queueTimedOut(self, slot: ModelSlot, waiter: _Waiter) -> None:
        waiter.queueTimer = None
        if waiter not in slot.waiters:
            return
        busy = [s.name for s in self.slots.values() if s.active]
        message = (
            f"not enough memory to load model {slot.name!r} ({slot.config.vram_mb} MB needed,"
            f" {self.config.total_vram_mb - self.memoryInUse()} MB free of"
            f" {self.config.total_vram_mb} MB) within {self.config.queue_timeout_seconds:g}s;"
            f" busy models: {', '.join(busy) or 'none'}"
        )
        self._withdraw(slot, waiter)
        waiter.deferred.errback(errors.noCapacity(message, RETRY_AFTER))

    def _failWaiters(self, slot: ModelSlot, error: Exception) -> None:
        waiters, slot.waiters = slot.waiters, []
        for waiter in waiters:
            waiter.stopTimer()
            if not waiter.deferred.called:
                waiter.deferred.errback(error)

    # Scheduling.

    def _evictable(self, exclude: ModelSlot) -> list[ModelSlot]:
        idle = [
            s for s in self.slots.values() if s.state == LOADED and not s.active and s is not exclude
        ]
        if self.config.eviction_policy == "lru":
            return sorted(idle, key=lambda s: s.lastUsedAt or 0.0)
        return sorted(idle, key=lambda s: s.loadSeq, reverse=True)

    def _schedule(self) -> None:
        """
        Start the waiting loads that fit, in order; evict for the first one
        that does not. Nothing starts before start-up reconciliation is done.
        """
        if self._stopping or not self._started:
            return
        total = self.config.total_vram_mb
        free = total - self.memoryInUse()
        releasing = sum(s.config.vram_mb for s in self.slots.values() if s.state == UNLOADING)
        # Once one load is blocked, only it may evict; later loads may use
        # only memory that is free beyond what it waits for.
        blocked = False
        for slot in list(self._pending):
            if slot.state in HOLDS_MEMORY and slot.state != UNLOADING:
                self._pending.remove(slot)
                continue
            need = slot.config.vram_mb
            if slot.state != UNLOADING and need <= free:
                self._pending.remove(slot)
                if self._startLoad(slot):
                    free -= need
                continue
            if not blocked and need > free + releasing:
                victims = []
                freeable = free + releasing
                for victim in self._evictable(exclude=slot):
                    if need <= freeable:
                        break
                    victims.append(victim)
                    freeable += victim.config.vram_mb
                if need <= freeable:
                    for victim in victims:
                        self._unload(victim, f"evicted to make room for {slot.name}", "evicted")
            blocked = True
            free -= need

    def _startLoad(self, slot: ModelSlot) -> bool:
        """
        Start loading C{slot}'s model.

        @return: whether its backend was started (if not, its waiters have
            been failed with a 502).
        """
        for waiter in slot.waiters:
            waiter.stopTimer()
        model = slot.config
        try:
            port = findFreePort(
                self.config.backend.port_range_start,
                self.config.backend.port_range_end,
                {s.run.port for s in self.slots.values() if s.run is not None},
                self._lastPort,
            )
        except NoFreePort as e:
            self._loadFailed(slot, errors.backendFailed(f"cannot start model {slot.name!r}: {e}"))
            return False
        self._lastPort = port
        run = BackendRun(
            model=model,
            backend=slot.backend,
            port=port,
            reactor=self.reactor,
            http=self.http,
            binary=self.config.backend.binaryFor(model.backend),
            killTime=self.killTime,
            newSession=self.newSession,
            ring=slot.log,
        )
        try:
            loaded = run.start(self.config.loadTimeout(model))
        except OSError as e:
            self._loadFailed(slot, errors.backendFailed(f"cannot start model {slot.name!r}: {e}"))
            return False
        self._loadCounter += 1
        slot.run = run
        slot.state = LOADING
        slot.loadStartedAt = self.reactor.seconds()
        slot.loadSeq = self._loadCounter
        slot.lastError = None
        slot.failing = False
        self._record(slot)
        run.whenExited().addCallback(self._exited, slot, run)
        loaded.addCallbacks(self._loaded, self._loadError, callbackArgs=(slot, run), errbackArgs=(slot, run))
        return True

    def _loaded(self, _: None, slot: ModelSlot, run: BackendRun) -> None:
        if slot.run is not run:
            return
        now = self.reactor.seconds()
        slot.state = LOADED
        slot.portConflicts = 0
        slot.loadedAt = slot.lastUsedAt = now
        slot.loads += 1
        if slot.loadStartedAt is not None:
            slot.loadSeconds += now - slot.loadStartedAt
        log.info("{name} is ready on port {port}", name=slot.name, port=run.port)
        self._record(slot)
        waiters, slot.waiters = slot.waiters, []
        for waiter in waiters:
            if not waiter.deferred.called:
                waiter.deferred.callback(self._lease(slot))
        if slot.active == 0 and self._pending:
            # Every waiter withdrew: it is idle now, so a load waiting for
            # memory may evict it.
            self._schedule()

    def _loadError(self, failure: Any, slot: ModelSlot, run: BackendRun) -> None:
        reason = failure.value
        if self._stopping or isinstance(reason, defer.CancelledError):
            # Stopped on purpose; its waiters have had their answer.
            return
        if isinstance(reason, BackendExited) and reason.portInUse and slot.portConflicts < PORT_RETRIES:
            # Another program took the port after we found it free: the
            # waiters stay, and the exit puts the load back in the queue,
            # where it gets the next free port.
            slot.portConflicts += 1
            log.warn("{name}: port {port} was taken; trying another", name=slot.name, port=run.port)
            return
        if isinstance(reason, BackendExited):
            tail = "\n".join(reason.logTail)
            error = errors.backendFailed(f"{reason}; last output:\n{tail}" if tail else str(reason))
        elif isinstance(reason, LoadTimeout):
            error = errors.loadTimedOut(str(reason))
        else:
            error = errors.backendFailed(f"model {slot.name!r} failed to load: {reason}")
        self._loadFailed(slot, error)

    def _loadFailed(self, slot: ModelSlot, error: errors.APIError) -> None:
        log.error("{name}: {message}", name=slot.name, message=error.message)
        slot.lastError = error.message
        slot.loadFailures += 1
        if slot.run is None:
            slot.state = FAILED
        elif slot.run.process.running:
            # Timed out: it holds its memory until it has exited.
            slot.failing = True
            slot.state = UNLOADING
        self._record(slot)
        self._failWaiters(slot, error)

    def _unload(self, slot: ModelSlot, why: str, cause: str) -> defer.Deferred[Exception]:
        """
        Stop C{slot}'s backend.

        @param why: For the log.
        @param cause: For metrics: C{idle}, C{evicted}, C{request} or
            C{shutdown}.
        """
        assert slot.run is not None
        if slot.state != UNLOADING:
            slot.unloads[cause] = slot.unloads.get(cause, 0) + 1
            log.info("stopping {name}: {why}", name=slot.name, why=why)
            slot.state = UNLOADING
            self._record(slot)
        return slot.run.stop()

    def _exited(self, reason: Exception, slot: ModelSlot, run: BackendRun) -> None:
        if slot.run is not run:
            return
        if slot.state == UNLOADING and not slot.failing:
            slot.state = UNLOADED
        else:
            if slot.state == LOADED:
                slot.lastError = f"backend {describeExit(reason)} while loaded"
                slot.crashes += 1
                log.error("{name}: {error}", name=slot.name, error=slot.lastError)
            slot.state = FAILED
        slot.run = None
        slot.active = 0
        slot.loadedAt = None
        slot.failing = False
        self._record(slot)
        self._checkDrained()
        if slot.waiters and slot not in self._pending and not self._stopping:
            # Requests arrived while it was stopping: load it again.
            self._pending.append(slot)
        self._schedule()

    def _record(self, slot: ModelSlot) -> None:
        slot.dirty = False
        process = slot.run.process if slot.run is not None else None
        self.store.save(
            {
                "name": slot.name,
                "status": slot.state,
                "backend": slot.config.backend,
                "pid": process.pid if process is not None else None,
                "pgid": process.pid if process is not None and self.newSession else None,
                "start_time": process.startTime if process is not None else None,
                "port": slot.run.port if slot.run is not None else None,
                "vram_mb": slot.config.vram_mb,
                "loaded_at": slot.loadedAt,
                "last_used_at": slot.lastUsedAt,
                "load_seq": slot.loadSeq,
                "last_error": slot.lastError,
                "updated_at": self.reactor.seconds(),
            }
        )
