# -*- test-case-name: tests.test_scheduler -*-
"""
Which models run: a thin service that wires each model's lifecycle machine
(L{dynllm.lifecycle}), the planner (L{dynllm.planner}), the state store and
the clock.

A request calls L{ModelManager.acquire} and gets a L{Lease} on a ready model;
it holds the lease until its response is fully written or its client has
gone. A model with a lease out is never stopped: not by eviction, the idle
reaper or an admin unload.

Memory: the C{vram_mb} of every model that is loading, loaded or still
stopping counts against C{total_vram_mb}. What starts, what is stopped to
make room, and which busy models stop taking new requests so that a waiting
load gets its turn is the planner's decision, made again after every change.
A request waits for memory up to its queue timeout, then fails with
L{NoCapacity}.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial
from typing import Any, Callable, Mapping

from attrs import define, field
from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from dynllm import planner
from dynllm.backends import backendFor
from dynllm.config import Config, ModelConfig
from dynllm.exceptions import (
    LoadFailed,
    ModelBusy,
    ModelUnloaded,
    NoCapacity,
    ShuttingDown,
    UnknownModel,
)
from dynllm.interfaces import IBackend, IModelManager, IStateStore
from dynllm.lease import Lease, ModelCounters, RequestOptions
from dynllm.lifecycle import (
    FAILED,
    FORCED,
    HOLDS_MEMORY,
    IDLE,
    EVICTED,
    LOADED,
    LOADING,
    RECONFIGURED,
    REMOVED,
    REQUEST,
    SHUTDOWN,
    UNLOADED,
    UNLOADING,
    ModelCore,
    ModelLifecycle,
    Outbox,
    Tenancy,
    Waiter,
    makeLifecycle,
)
from dynllm.logs import LogRing, logger
from dynllm.placeholders import expandAll
from dynllm.runner import BackendRun, NoFreePort, backendEnvironment, findFreePort, runCommand
from dynllm.store import MemoryStateStore, reconcile

__all__ = ["Lease", "ModelManager"]

log = logger(__name__)


def _recordedArgv(recorded: Any) -> list[str] | None:
    """
    @param recorded: A row's C{stop_command}: a JSON list of strings, or
        C{None}.
    @return: the list, or C{None} for none or one that is not such a list
        (a damaged row is left to the signal).
    """
    if not isinstance(recorded, str):
        return None
    try:
        argv = json.loads(recorded)
    except ValueError:
        return None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    return argv


@define(eq=False)
class _Model:
    """
    One configured model: its shared data and its machine.
    """

    core: ModelCore
    machine: ModelLifecycle


@implementer(IModelManager)
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
    store: IStateStore = field(factory=MemoryStateStore)
    killTime: float = 5.0
    newSession: bool = True
    backendFor: Callable[[str], IBackend] = backendFor
    _models: dict[str, _Model] = field(init=False)
    _outbox: Outbox = field(factory=Outbox, init=False)
    _held: frozenset[str] = field(default=frozenset(), init=False)
    _plan: planner.Plan = field(factory=planner.Plan, init=False)
    _loadCounter: int = field(default=0, init=False)
    _arrivals: int = field(default=0, init=False)
    _lastPort: int | None = field(default=None, init=False)
    _readyWaiters: list[defer.Deferred[None]] = field(factory=list, init=False)
    _started: bool = field(default=False, init=False)
    _stopping: bool = field(default=False, init=False)
    _planning: bool = field(default=False, init=False)
    _replan: bool = field(default=False, init=False)
    _drained: defer.Deferred[None] | None = field(default=None, init=False)
    #: Models whose configuration changed in a reload, with the new one,
    #: applied once the old run has stopped (see L{reconfigure}).
    _pending: dict[str, ModelConfig] = field(factory=dict, init=False)
    #: Models a reload removed: they drain, stop, and are forgotten.
    _removed: set[str] = field(factory=set, init=False)
    #: Models stopped by a reload that are loaded again with their new
    #: configuration.
    _restart: set[str] = field(factory=set, init=False)
    #: Called after anything L{describe} shows may have changed (L{watch}).
    _watchers: list[Callable[[], None]] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self._models = {}
        for model in self.config.models:
            self._models[model.name] = self._makeModel(model)

    def _makeModel(self, model: ModelConfig) -> _Model:
        core = ModelCore(
            config=model,
            backend=self.backendFor(model.backend),
            clock=self.reactor,
            loadTimeout=self.config.loadTimeout(model),
            record=self._record,
            changed=self._schedule,
            outbox=self._outbox,
        )
        return _Model(core, makeLifecycle(core))

    # Reloading.

    def reconfigure(self, config: Config) -> None:
        """
        Run C{config} from now on, as a reload asks (the caller checked that
        it changes nothing that needs a restart, L{dynllm.reload.compare}).

        Global settings (budget, timeouts, eviction, ports, programs) apply
        at once, each from its next use. Added models can be requested at
        once. A removed model takes no new request (L{UnknownModel}), its
        waiters fail with L{ModelUnloaded}, its requests in flight finish,
        then it is stopped and forgotten. A changed model that has no
        process takes its new settings at once; one that runs goes on
        serving with its old settings until it is idle, then is stopped and
        loaded again with the new ones (a loaded one at once; a loading one
        once loaded). Models newly in C{preload_models} are loaded.
        """
        old = self.config
        self.config = config
        for model in config.models:
            existing = self._models.get(model.name)
            if existing is None:
                self._models[model.name] = self._makeModel(model)
                self._record(self._models[model.name].core)
                continue
            self._removed.discard(model.name)
            if existing.core.config != model:
                self._pending[model.name] = model
            else:
                self._pending.pop(model.name, None)
                existing.core.loadTimeout = config.loadTimeout(model)
        names = {m.name for m in config.models}
        for name, model_ in self._models.items():
            if name not in names and name not in self._removed:
                self._removed.add(name)
                self._pending.pop(name, None)
                model_.core.failWaiters(ModelUnloaded(name, REMOVED))
        self._settle()
        self._schedule()
        for name in config.preload_models:
            if name not in old.preload_models:
                self._preload(name)

    def _preload(self, name: str, why: str = "preloading") -> None:
        """
        Load model C{name} for no request (a preload, a restart after a
        reload): its waiter is dynllm's own, and a failure is logged.

        @param why: What the log calls the load.
        """

        def failed(f: Failure) -> None:
            log.error("{why} {name} failed: {reason}", why=why, name=name, reason=f.getErrorMessage())

        log.info("{why} {name}", why=why, name=name)
        self._acquire(name, None, internal=True).addCallback(Lease.release).addErrback(failed)

    def _settle(self) -> None:
        """
        Move the models a reload changed or removed on: stop those that
        are idle, give those without a process their new configuration,
        forget removed ones that are gone.
        """
        for name, model in list(self._models.items()):
            if name not in self._pending and name not in self._removed:
                continue
            core = model.core
            if core.status == LOADED and core.active == 0 and not core.waiters:
                cause = REMOVED if name in self._removed else RECONFIGURED
                if cause == RECONFIGURED:
                    self._restart.add(name)
                log.info("stopping {name}: {cause} by a reload", name=name, cause=cause)
                self._outbox.send(model.machine.stop, cause, defer.Deferred())
            elif core.status in (UNLOADED, FAILED) and not core.waiters:
                if name in self._removed:
                    self._removed.discard(name)
                    # Its row stays, unloaded, until the next start forgets it.
                    del self._models[name]
                elif name in self._pending:
                    new = self._pending.pop(name)
                    core.config = new
                    core.backend = self.backendFor(new.backend)
                    core.loadTimeout = self.config.loadTimeout(new)
                    self._record(core)
                    if name in self._restart:
                        self._restart.discard(name)
                        self._outbox.later(partial(self._preload, name, "loading with its new configuration"))

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
            await reconcile(self.store, list(self._models), self.reactor, stopCommand=self._leftoverStop)
        except Exception:
            log.failure("could not reconcile the state database; carrying on")
        for model in self._models.values():
            self._record(model.core)
        self._started = True
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            d.callback(None)
        # Requests that arrived during reconciliation are waiting.
        self._schedule()

        for name in self.config.preload_models:
            self._preload(name)

    def _leftoverStop(self, row: Mapping[str, Any]) -> defer.Deferred[Any] | None:
        """
        Run the stop command that a previous run recorded for a row it left
        as running (see L{reconcile}): the command as that run expanded
        it, which stops that run's server even if the model has since been
        removed or its stop command changed; for a row recorded without
        one (by an older dynllm), the model's stop command of now with the
        port recorded.

        @return: a Deferred firing once it has exited, or C{None} if there
            is no stop command for the row, or it could not be spawned.
        """
        name = row["name"]
        model = self._models.get(name)
        config = model.core.config if model is not None else None
        argv = _recordedArgv(row.get("stop_command"))
        if argv is None:
            port = row["port"]
            if config is None or not config.stop.command or port is None:
                return None
            argv = expandAll(config.stop.command, config.placeholders(port))
        if config is not None and model is not None:
            timeout = self.killTime if config.stop.timeout is None else config.stop.timeout
            env = backendEnvironment(model.core.backend, config, row["port"] or 0)
            ring = model.core.log
        else:
            timeout, env, ring = self.killTime, dict(os.environ), LogRing()
        try:
            return runCommand(name, argv, self.reactor, env, timeout, self.newSession, ring)
        except OSError as e:
            log.error("{name}: cannot run its stop command {argv}: {error}", name=name,
                      argv=" ".join(argv), error=e)
            return None

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

    @property
    def started(self) -> bool:
        """
        Whether start-up reconciliation is done and requests are served.
        """
        return self._started

    def stopService(self) -> defer.Deferred[None]:
        """
        Drain, then stop every backend: new requests and those waiting for a
        model fail with L{ShuttingDown} at once, and requests in flight may
        finish (up to C{shutdown_timeout_seconds}) before the backends are
        stopped.

        @return: a Deferred that fires once every backend has really exited
            and its state is recorded.
        """
        Service.stopService(self)
        self._stopping = True
        for model in self._models.values():
            model.core.failWaiters(ShuttingDown())
        self._notify()
        return defer.ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        await self._drain(self.config.shutdown_timeout_seconds)
        exits = []
        for model in self._models.values():
            done: defer.Deferred[None] = defer.Deferred()
            self._outbox.send(model.machine.stop, SHUTDOWN, done)
            exits.append(done)
        await defer.DeferredList(exits, consumeErrors=True)
        self.store.close()

    async def _drain(self, timeout: float) -> None:
        """
        Wait until no request is in flight, or C{timeout} seconds.
        """
        inFlight = sum(model.core.active for model in self._models.values())
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
        if self._drained is not None and not any(model.core.active for model in self._models.values()):
            self._drainedNow()

    # Requests.

    def acquire(self, name: str, options: RequestOptions | None = None) -> defer.Deferred[Lease]:
        """
        Get a lease on model C{name}, loading it first if it is not running.

        Concurrent requests for a model that is not running share one load.
        Each caller gets its own Deferred; cancelling it withdraws that
        caller only.

        @param options: This request's queue timeout, priority and
            keep-alive (see L{RequestOptions}); C{None}: the configured ones.
        @return: a Deferred that fires with a L{Lease}, or fails with a
            L{SchedulerError}: L{UnknownModel}, L{ShuttingDown},
            L{LoadFailed} if the backend could not start or died while
            loading, L{LoadTimedOut}, or L{NoCapacity} if memory could not
            be freed within the queue timeout.
        """
        return self._acquire(name, options)

    def _acquire(self, name: str, options: RequestOptions | None, internal: bool = False) -> defer.Deferred[Lease]:
        """
        L{acquire}, for a client's request or (C{internal}) for dynllm's own
        load, which is not counted as a waiting request.
        """
        model = self._models.get(name)
        if model is None or name in self._removed:
            return defer.fail(UnknownModel(name))
        if self._stopping:
            return defer.fail(ShuttingDown())
        options = options or RequestOptions()
        core = model.core
        if core.status == LOADED and name not in self._held:
            return defer.succeed(self._lease(core, keepAlive=options.keepAlive))
        queueTimeout = self.config.queue_timeout_seconds if options.queueTimeout is None else options.queueTimeout
        priority = core.config.priority if options.priority is None else options.priority
        d: defer.Deferred[Any] = defer.Deferred(lambda d: self._withdraw(core, waiter))
        self._arrivals += 1
        waiter = Waiter(
            d, self.reactor.seconds(), priority, queueTimeout, self._arrivals, keepAlive=options.keepAlive, internal=internal
        )
        core.waiters.append(waiter)
        if queueTimeout > 0:
            waiter.timer = self.reactor.callLater(queueTimeout, self._queueTimedOut, core, waiter)
        else:
            # For gateways that fail over: served if its model is loading
            # or can be loaded now, else refused at once.
            waiter.expired = True
        self._schedule()
        if waiter.expired and not self._planning:
            self._refuseExpired()
        result: defer.Deferred[Lease] = d
        return result

    def peek(self, name: str) -> Lease | None:
        """
        Get a lease on model C{name} only if it is loaded now, for a look
        that is not a use: the model is not loaded for it, and its idle
        timer is not reset by it (a readiness check must not keep a model
        loaded forever).

        @return: a L{Lease}, or C{None} if the model is not loaded.
        @raise UnknownModel: for an unknown model.
        """
        core = self._core(name)
        if core.status != LOADED or self._stopping:
            return None
        return self._lease(core, use=False)

    def load(self, name: str) -> defer.Deferred[None]:
        """
        Make sure model C{name} is loaded, without holding it.

        @return: a Deferred that fires when it is loaded (see L{acquire}).
        """
        return self.acquire(name).addCallback(Lease.release)

    def unload(self, name: str, force: bool = False) -> defer.Deferred[None]:
        """
        Stop model C{name} now.

        @param force: Stop it even while it serves requests or loads: the
            requests in flight have their leases revoked and the requests
            waiting for it fail, both with L{ModelUnloaded}.
        @return: a Deferred that fires once its backend has exited (at once
            if it had none), or fails with L{UnknownModel}, or (without
            C{force}) L{ModelBusy} if it has requests in flight or is
            loading.
        """
        model = self._models.get(name)
        if model is None:
            return defer.fail(UnknownModel(name))
        core = model.core
        done: defer.Deferred[None] = defer.Deferred()
        if not force:
            if core.active:
                return defer.fail(ModelBusy(name, activeRequests=core.active))
            if core.status == LOADING:
                return defer.fail(ModelBusy(name, loading=True))
            self._outbox.send(model.machine.stop, REQUEST, done)
            return done
        self._outbox.send(self._force, model, done)
        return done

    def _force(self, model: _Model, done: defer.Deferred[None]) -> None:
        """
        Stop C{model} whatever it is doing (see L{unload}): stop first, so
        that the leases revoked next find it stopping and nothing plans
        with it, then revoke them and fail its waiters.
        """
        core = model.core
        error = ModelUnloaded(core.name, FORCED)
        tenancy = core.tenancy
        log.warn(
            "{name}: forced unload with {active} requests in flight and {waiting} waiting",
            name=core.name,
            active=core.active,
            waiting=len(core.waiters),
        )
        model.machine.stop(FORCED if core.status in (LOADING, LOADED) else REQUEST, done)
        core.failWaiters(error)
        if tenancy is not None:
            for lease in list(tenancy.leases):
                lease.revoke(error)

    # Reading.

    def describe(self, name: str) -> dict[str, Any]:
        """
        @return: model C{name}'s state, as C{/admin/models} shows it (see
            L{IModelManager.describe}).
        @raise UnknownModel: for an unknown model.
        """
        core = self._core(name)
        process = core.run.process if core.run is not None else None
        return {
            "name": core.name,
            "status": core.status,
            "backend": core.config.backend,
            "model_type": core.config.model_type,
            "vram_mb": core.config.vram_mb,
            "pid": process.pid if process is not None else None,
            "port": core.run.port if core.run is not None else None,
            "loaded_at": core.loadedAt,
            "last_used_at": core.lastUsedAt,
            "active_requests": core.active,
            "waiting_requests": sum(1 for w in core.waiters if not w.internal),
            "last_error": core.lastError,
            "load_seconds": round(core.lastLoadSeconds, 3) if core.lastLoadSeconds is not None else None,
            "loading_seconds": round(self.reactor.seconds() - core.loadStartedAt, 3)
            if core.status == LOADING and core.loadStartedAt is not None
            else None,
        }

    def models(self) -> list[dict[str, Any]]:
        """
        @return: every configured model's state, as C{/admin/models} shows.
        """
        return [self.describe(name) for name in self._models]

    def counters(self, name: str) -> ModelCounters:
        """
        @return: model C{name}'s counters since start-up.
        @raise UnknownModel: for an unknown model.
        """
        core = self._core(name)
        return ModelCounters(
            loads=core.loads,
            loadFailures=core.loadFailures,
            loadSeconds=core.loadSeconds,
            unloads=dict(core.unloads),
            crashes=core.crashes,
        )

    def backendOf(self, name: str) -> IBackend:
        """
        @return: the backend that runs model C{name}.
        @raise UnknownModel: for an unknown model.
        """
        return self._core(name).backend

    def watch(self, onChange: Callable[[], None]) -> Callable[[], None]:
        """
        Call C{onChange()} after anything L{describe} or L{memoryInUse}
        shows may have changed: a transition, a request taking or leaving a
        model, a request starting or ending its wait, a reload. It may be
        called more often than something changed, and several times in a
        row; it must be cheap and must not call back into the manager
        (see L{dynllm.events.ModelEvents}, which coalesces the calls).

        @return: a function that stops the calls.
        """
        self._watchers.append(onChange)

        def stop() -> None:
            if onChange in self._watchers:
                self._watchers.remove(onChange)

        return stop

    def _notify(self) -> None:
        if not self._watchers:
            # The common case, on every lease and release: nobody watches.
            return
        for onChange in list(self._watchers):
            onChange()

    def followLog(self, name: str, onLines: Callable[[list[str]], None]) -> Callable[[], None]:
        """
        Call C{onLines(lines)} with each batch of lines model C{name}'s
        backends print from now on (across restarts), as they are read.

        @return: a function that stops the calls.
        @raise UnknownModel: for an unknown model.
        """
        return self._core(name).log.follow(onLines)

    def logTail(self, name: str, count: int) -> list[str]:
        """
        @return: the last C{count} lines that model C{name}'s backends
            printed (across restarts).
        @raise UnknownModel: for an unknown model.
        """
        return self._core(name).log.tail(count)

    def memoryInUse(self) -> int:
        """
        @return: the C{vram_mb} held by models loading, loaded or unloading.
        """
        return sum(m.core.config.vram_mb for m in self._models.values() if m.core.status in HOLDS_MEMORY)

    def reapIdle(self) -> None:
        """
        Stop every loaded model idle for longer than its idle timeout (a
        request's C{X-DynLLM-Keep-Alive}, else the configured one), and
        record when models were last used.
        """
        now = self.reactor.seconds()
        for model in self._models.values():
            core = model.core
            if core.dirty:
                self._record(core)
            if core.status != LOADED or core.active or core.lastUsedAt is None:
                continue
            timeout = self._idleTimeout(core)
            if not math.isinf(timeout) and now - core.lastUsedAt >= timeout:
                self._outbox.send(model.machine.stop, IDLE, defer.Deferred())

    def _idleTimeout(self, core: ModelCore) -> float:
        if core.keepAlive is None:
            return self.config.idleTimeout(core.config)
        return math.inf if core.keepAlive < 0 else core.keepAlive

    def _core(self, name: str) -> ModelCore:
        """
        @raise UnknownModel: for an unknown model.
        """
        model = self._models.get(name)
        if model is None:
            raise UnknownModel(name)
        return model.core

    # Leases.

    def _lease(self, core: ModelCore, use: bool = True, keepAlive: float | None = None) -> Lease:
        """
        @param keepAlive: The request's C{X-DynLLM-Keep-Alive}, which
            becomes the model's idle timeout once it is served.
        """
        run, tenancy = core.run, core.tenancy
        assert run is not None and tenancy is not None
        if keepAlive is not None:
            core.keepAlive = keepAlive
        if use:
            core.lastUsedAt = self.reactor.seconds()
        lease = Lease(
            core.config,
            core.backend,
            run.baseURL,
            lambda lease: self._release(core, tenancy, lease, use),
            apiKey=run.apiKey,
        )
        tenancy.leases.add(lease)
        self._notify()
        return lease

    def _release(self, core: ModelCore, tenancy: Tenancy, lease: Lease, use: bool) -> None:
        # A lease leaves the tenancy it was given on: one on a run that has
        # since stopped changes nothing that is read.
        tenancy.leases.discard(lease)
        self._notify()
        if use:
            core.lastUsedAt = self.reactor.seconds()
            core.dirty = True
        if core.active == 0:
            if use and core.status == LOADED and core.keepAlive == 0:
                self._outbox.send(self._models[core.name].machine.stop, IDLE, defer.Deferred())
            elif (
                core.name in self._pending
                or core.name in self._removed
                or self.memoryInUse() > self.config.total_vram_mb
                or any(m.core.waiters for m in self._models.values())
            ):
                # An idle model may be what a reload waited for, what a
                # smaller budget needs stopped, or what a waiting load needs.
                self._schedule()
            self._checkDrained()

    # Waiting.

    def _withdraw(self, core: ModelCore, waiter: Waiter) -> None:
        waiter.stopTimer()
        if waiter in core.waiters:
            core.waiters.remove(waiter)
            self._schedule()

    def _queueTimedOut(self, core: ModelCore, waiter: Waiter) -> None:
        waiter.timer = None
        waiter.expired = True
        if not self._planning:
            self._refuseExpired()

    def _refuseExpired(self) -> None:
        """
        Refuse the requests whose queue timeout has passed, unless their
        model is loading (the load decides: it is bounded by its own
        timeout) or the memory it needs is being freed now (no busy model
        stands in its way). A request that waited through a load and is
        not then served (its model was held or evicted for a load ahead of
        it) is refused at once.
        """
        for model in self._models.values():
            core = model.core
            if core.status == LOADING or core.name in self._plan.clearing:
                continue
            for waiter in [w for w in core.waiters if w.expired]:
                if waiter in core.waiters:
                    self._refuse(core, waiter)

    def _refuse(self, core: ModelCore, waiter: Waiter) -> None:
        """
        Fail C{waiter} with L{NoCapacity}: its queue timeout has passed.
        """
        error = NoCapacity(
            name=core.name,
            neededMB=core.config.vram_mb,
            freeMB=self.config.total_vram_mb - self.memoryInUse(),
            totalMB=self.config.total_vram_mb,
            waitedSeconds=waiter.queueTimeout,
            busyModels=tuple(m.core.name for m in self._models.values() if m.core.active),
            retryAfter=planner.retryAfter(self._views(), core.name),
            givingWayTo=self._plan.head if core.status == LOADED else None,
        )
        self._withdraw(core, waiter)
        waiter.deferred.errback(error)

    # Scheduling.

    def _views(self) -> list[planner.ModelView]:
        now = self.reactor.seconds()
        views = []
        for model in self._models.values():
            core = model.core
            waiters = core.waiters
            first = min(waiters, key=lambda w: w.queueKey, default=None)
            views.append(
                planner.ModelView(
                    name=core.name,
                    vramMB=core.config.vram_mb,
                    status=core.status,
                    active=core.active,
                    waiting=len(waiters),
                    priority=first.priority if first is not None else core.config.priority,
                    since=first.arrival if first is not None else None,
                    modelPriority=core.config.priority,
                    lastUsedAt=core.lastUsedAt or 0.0,
                    loadSeq=core.loadSeq,
                    loadSeconds=core.loadSeconds / core.loads if core.loads else None,
                    loadingFor=now - core.loadStartedAt
                    if core.status == LOADING and core.loadStartedAt is not None
                    else 0.0,
                )
            )
        return views

    def _schedule(self) -> None:
        """
        Serve the waiters of loaded models that are not held, ask the
        planner what to do, do it, and serve again; again while anything
        changed. Nothing starts before start-up reconciliation is done.

        Serving first means that a model that has just loaded is busy with
        the requests it was loaded for when the planner looks for idle
        models to evict: a load is never wasted.
        """
        self._notify()
        if self._stopping or not self._started:
            return
        if self._planning:
            self._replan = True
            return
        self._planning = True
        try:
            self._replan = True
            while self._replan:
                self._replan = False
                if self._pending or self._removed:
                    self._settle()
                if self.memoryInUse() > self.config.total_vram_mb:
                    self._fitBudget()
                self._serve()
                self._apply(planner.plan(self._views(), self.config.total_vram_mb, self.config.eviction_policy))
        finally:
            self._planning = False

    def _apply(self, plan: planner.Plan) -> None:
        self._plan = plan
        self._held = plan.hold
        for name, cause in plan.stop:
            log.info("stopping {name} to make room ({cause})", name=name, cause=cause)
            self._outbox.send(self._models[name].machine.stop, cause, defer.Deferred())
        for name in plan.start:
            self._startLoad(self._models[name])
        self._serve()
        self._refuseExpired()

    def _serve(self) -> None:
        """
        Give leases to the waiters of loaded models: all of them for a model
        not held; for a held one, those ahead of the load it is held for
        (later ones wait behind that load).
        """
        admitBefore = self._plan.admitBefore
        for model in self._models.values():
            core = model.core
            if core.status != LOADED or not core.waiters:
                continue
            if core.name in self._held:
                admitted = [w for w in core.waiters if admitBefore is not None and w.queueKey < admitBefore]
            else:
                admitted = list(core.waiters)
            core.waiters = [w for w in core.waiters if w not in admitted]
            for waiter in admitted:
                waiter.stopTimer()
                if not waiter.deferred.called:
                    waiter.deferred.callback(self._lease(core, keepAlive=waiter.keepAlive))

    def _startLoad(self, model: _Model) -> None:
        """
        Spawn model's backend on a free port, and tell its machine.
        """
        core = model.core
        try:
            port = findFreePort(
                self.config.backend.port_range_start,
                self.config.backend.port_range_end,
                {m.core.run.port for m in self._models.values() if m.core.run is not None},
                self._lastPort,
            )
            self._lastPort = port
            run = BackendRun(
                model=core.config,
                backend=core.backend,
                port=port,
                reactor=self.reactor,
                http=self.http,
                binary=self.config.backend.binaryFor(core.config.backend),
                killTime=self.killTime,
                newSession=self.newSession,
                ring=core.log,
            )
            run.start()
        except NoFreePort as e:
            if self._freePortFor(core):
                return
            self._outbox.send(model.machine.spawnFailed, LoadFailed(core.name, f"cannot start model {core.name!r}: {e}"))
            return
        except OSError as e:
            self._outbox.send(model.machine.spawnFailed, LoadFailed(core.name, f"cannot start model {core.name!r}: {e}"))
            return
        self._loadCounter += 1
        core.loadSeq = self._loadCounter
        self._outbox.send(model.machine.load, run)

    def _idleModels(self) -> list[_Model]:
        """
        @return: the loaded models with no request in flight or waiting that
            no waiting load holds, in the order idle models give way to a
            load (L{planner.evictionOrder}: lowest C{priority} first, then
            by C{eviction_policy}).
        """
        order = planner.evictionOrder(self._views(), self.config.eviction_policy)
        return [
            self._models[view.name]
            for view in order
            if view.idle and view.waiting == 0 and view.name not in self._held
        ]

    def _fitBudget(self) -> None:
        """
        More memory is held than C{total_vram_mb} allows (a reload made it
        smaller): stop idle models until what is held fits; busy ones are
        stopped once idle, by the next turn of this.
        """
        excess = self.memoryInUse() - self.config.total_vram_mb
        excess -= sum(m.core.config.vram_mb for m in self._models.values() if m.core.status == UNLOADING)
        for victim in self._idleModels():
            if excess <= 0:
                break
            log.info(
                "stopping {name}: {used} MB held, over total_vram_mb ({total} MB)",
                name=victim.core.name,
                used=self.memoryInUse(),
                total=self.config.total_vram_mb,
            )
            excess -= victim.core.config.vram_mb
            self._outbox.send(victim.machine.stop, EVICTED, defer.Deferred())

    def _freePortFor(self, core: ModelCore) -> bool:
        """
        Every port of C{backend.port_range_*} is held: make one free for
        C{core}'s load, as memory is made free, by stopping an idle loaded
        model (lowest C{priority} first, then by C{eviction_policy}), or
        wait for a model that is stopping already. Its load starts again
        when that backend has exited.

        @return: whether a port will be free; C{False} when every port is
            held by a busy or loading model.
        """
        if any(m.core.status == UNLOADING for m in self._models.values()):
            return True
        idle = self._idleModels()
        if not idle:
            return False
        victim = idle[0]
        log.info(
            "no free backend port for {name}: stopping idle {victim}", name=core.name, victim=victim.core.name
        )
        self._outbox.send(victim.machine.stop, EVICTED, defer.Deferred())
        return True

    def _record(self, core: ModelCore) -> None:
        core.dirty = False
        self._notify()
        process = core.run.process if core.run is not None else None
        stopArgv = core.run.stopArgv if core.run is not None and process is not None else None
        self.store.save(
            {
                "name": core.name,
                "status": core.status,
                "backend": core.config.backend,
                "pid": process.pid if process is not None else None,
                "pgid": process.pid if process is not None and self.newSession else None,
                "start_time": process.startTime if process is not None else None,
                "port": core.run.port if core.run is not None else None,
                "vram_mb": core.config.vram_mb,
                "loaded_at": core.loadedAt,
                "last_used_at": core.lastUsedAt,
                "load_seq": core.loadSeq,
                "last_error": core.lastError,
                "updated_at": self.reactor.seconds(),
                "stop_command": json.dumps(stopArgv) if stopArgv is not None else None,
            }
        )
