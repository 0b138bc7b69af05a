"""
Property-based tests of L{dynllm.scheduler.ModelManager}: random sequences
of requests (with random queue timeouts, priorities and keep-alives),
cancellations, releases, loads that succeed, fail, hang or find their port
taken, crashes, backends that exit after TERM or ignore it until KILL,
admin unloads (forced ones too), configuration reloads (a model changed,
removed or added, a smaller budget), idle reaps, clock jumps and
shutdowns, on the fake process reactor and clock of L{tests.test_scheduler}.

After every step the invariants of L{SchedulerMachine} hold: the budget is
never exceeded, every running process is its model's run, a busy model is
never stopped (but by a forced unload, which revokes its leases), no process is signalled after its exit nor twice with one
signal, the store agrees with C{describe()}, the waiting and active counts
agree with the requests and leases, a backend loaded for waiting requests
serves them. At the end (L{SchedulerMachine.finish}) no request has been
left waiting for ever, every request, unload and stop has had exactly one
answer, no process is left, and no unhandled error was logged.

The runs are derandomized (the C{dynllm-ci} profile), so that CI sees the
same examples every time; set C{DYNLLM_HYPOTHESIS_PROFILE=dynllm-explore}
to search more widely with fresh random examples.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, Callable

from attrs import define, field
from automat import NoTransition
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dynllm import lifecycle, process, runner, scheduler, store
from dynllm.config import Config
from dynllm.exceptions import ModelBusy, NoCapacity, SchedulerError, ShuttingDown, UnknownModel
from dynllm.lease import Lease, RequestOptions
from dynllm.lifecycle import FAILED, HOLDS_MEMORY, LOADED, LOADING, UNLOADED
from dynllm.scheduler import ModelManager
from dynllm.store import MemoryStateStore
from dynllm.testing import FakeBackend, FakeProcessReactor, FakeProcessTransport
from tests.test_scheduler import ManagerTestsMixin

#: CI: the same examples on every run (derandomized, no example database),
#: about 10 s of CPU per test on this machine; a failure is reported as found
#: (not shrunk, which takes minutes), with its steps and a blob for
#: C{@reproduce_failure}.
settings.register_profile(
    "dynllm-ci",
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    report_multiple_bugs=False,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: A wider search with fresh random examples, the first failure shrunk to a
#: minimal one (minutes): C{DYNLLM_HYPOTHESIS_PROFILE=dynllm-explore}.
settings.register_profile(
    "dynllm-explore",
    parent=settings.get_profile("dynllm-ci"),
    max_examples=3000,
    stateful_step_count=60,
    derandomize=False,
    phases=tuple(Phase),
)

#: The settings of these tests (not loaded globally: other modules keep theirs).
PROFILE = settings.get_profile(os.environ.get("DYNLLM_HYPOTHESIS_PROFILE", "dynllm-ci"))

#: The budget and the models: a and b never fit together, a and c fill the
#: budget exactly, any three compete; b comes first in the queue, d is the
#: first evicted and never reaped, b is reaped after 10 s idle.
TOTAL_MB = 1000
MODELS: list[dict[str, Any]] = [
    {"name": "a", "vram_mb": 600},
    {"name": "b", "vram_mb": 500, "priority": 1, "unload_time": 10},
    {"name": "c", "vram_mb": 400},
    {"name": "d", "vram_mb": 200, "priority": -1, "unload_time": -1},
]
NAMES = [m["name"] for m in MODELS]
#: With the model a reload may add.
ALL_NAMES = [*NAMES, "e"]
QUEUE_TIMEOUT = 20.0
LOAD_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 10.0
KILL_TIME = 5.0
IDLE_TIMEOUT = 60.0

#: Seconds of clock a quiet end runs for: longer than any queue timeout plus
#: any load timeout plus a KILL, several times over.
QUIET_SECONDS = 4 * (QUEUE_TIMEOUT + LOAD_TIMEOUT + KILL_TIME)
QUIET_STEP = 5.0

options = st.builds(
    RequestOptions,
    queueTimeout=st.sampled_from([None, 0.0, 0.5, 5.0, 25.0]),
    priority=st.sampled_from([None, -1, 0, 1, 2]),
    keepAlive=st.sampled_from([None, -1.0, 0.0, 3.0, 30.0]),
)

#: Exits of a backend that dies by itself.
crashes = st.sampled_from(
    [ProcessDone(0), ProcessTerminated(exitCode=1), ProcessTerminated(exitCode=139), ProcessTerminated(signal=9)]
)

#: Configurations a reload may switch to (and back): a model's memory
#: changed, a model removed, a model added, a smaller budget.
RELOADS: list[tuple[list[dict[str, Any]], int]] = [
    (MODELS, TOTAL_MB),
    ([{**MODELS[0], "vram_mb": 300}, *MODELS[1:]], TOTAL_MB),
    (MODELS[:3], TOTAL_MB),
    ([*MODELS, {"name": "e", "vram_mb": 100}], TOTAL_MB),
    (MODELS, 700),
]

PORT_TAKEN_LINE = b"E srv start: couldn't bind HTTP server socket, hostname: 127.0.0.1\n"


@define(eq=False)
class Request:
    """
    One acquire and every answer it got.

    @ivar name: The model asked for.
    @ivar options: What it asked for besides.
    @ivar at: When, in reactor seconds.
    @ivar deferred: What L{ModelManager.acquire} returned.
    @ivar answers: Its results, in order: a L{Lease} or an exception.
    @ivar cancelled: Whether the test cancelled it while it waited.
    """

    name: str
    options: RequestOptions
    at: float
    deferred: defer.Deferred[Lease]
    answers: list[object] = field(factory=list)
    cancelled: bool = False

    @property
    def pending(self) -> bool:
        return not self.answers


@define(eq=False)
class Held:
    """
    A lease the test holds, and the process it was given on.
    """

    lease: Lease
    process: FakeProcessTransport


@define(eq=False)
class Unload:
    """
    One admin unload and its answers.
    """

    name: str
    deferred: defer.Deferred[None]
    answers: list[object] = field(factory=list)


def describeProcess(t: FakeProcessTransport) -> str:
    """
    @return: C{t} in a few words, for assertion messages.
    """
    return f"process {t.args[1]}@{t.args[2]} ({'exited' if t.exited else 'running'}, signals {t.signals})"


class SchedulerMachine(RuleBasedStateMachine):
    """
    A L{ModelManager} on a fake reactor, driven by random steps; the test
    keeps its own account of requests, leases and processes and checks the
    manager against it after every step.
    """

    def __init__(self, config: Config, configFor: Callable[[list[dict[str, Any]], int], Config]) -> None:
        """
        @param configFor: Makes the configuration a reload reads, from its
            models and budget.
        """
        super().__init__()
        self.config = config
        self.configFor = configFor
        self.reactor = FakeProcessReactor()
        self.backend = FakeBackend(self.reactor)
        self.store = MemoryStateStore()
        self.manager = ModelManager(
            config=config,
            reactor=self.reactor,
            http=None,
            store=self.store,
            newSession=False,
            backendFor=lambda kind: self.backend,
            killTime=KILL_TIME,
        )
        self.requests: list[Request] = []
        self.leases: list[Held] = []
        self.unloads: list[Unload] = []
        self.stopped: defer.Deferred[None] | None = None
        self.stopAnswers: list[object] = []
        self.stopAt: float | None = None
        self.violations: list[str] = []
        self.loggedFailures: list[str] = []
        #: Processes (by C{id}) that became ready while requests waited for
        #: them, and whether they served one.
        self.readyFor: dict[int, bool] = {}
        #: Processes (by C{id}) a forced unload stopped.
        self.forced: set[int] = set()
        globalLogPublisher.addObserver(self._observe)
        self.manager.startService()

    # Bookkeeping.

    def _observe(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            self.loggedFailures.append(failure.getTraceback())

    def live(self) -> list[FakeProcessTransport]:
        """
        @return: the processes that have not exited, in spawn order.
        """
        return [t for t in self.reactor.spawned if not t.exited]

    def liveWhere(self, pick: Callable[[FakeProcessTransport, dict[str, Any]], bool]) -> list[FakeProcessTransport]:
        return [t for t in self.live() if pick(t, self.manager.describe(t.args[1]))]

    def isRun(self, t: FakeProcessTransport, status: str) -> bool:
        """
        @return: whether C{t} is its model's current run and the model has
            C{status}.
        """
        row = self.manager.describe(t.args[1])
        return bool(row["pid"] == t.pid and row["status"] == status)

    def pending(self) -> list[Request]:
        return [r for r in self.requests if r.pending]

    def shutdownMayStopBusy(self) -> bool:
        """
        Whether the shutdown's drain is over, after which busy backends
        are stopped too (see L{ModelManager.stopService}).
        """
        return self.stopAt is not None and self.reactor.seconds() >= self.stopAt + SHUTDOWN_TIMEOUT

    def _answered(self, result: object, request: Request) -> None:
        if isinstance(result, Failure):
            request.answers.append(result.value)
            return
        request.answers.append(result)
        assert isinstance(result, Lease)
        if result.model.name != request.name:
            self.violations.append(f"request for {request.name} got a lease on {result.model.name}")
        port = result.baseURL.rsplit(":", 1)[1]
        runs = [t for t in self.live() if t.args[1] == request.name and t.args[2] == port]
        if len(runs) != 1:
            self.violations.append(f"lease on {result.baseURL} for {request.name}: live processes there: {runs}")
            return
        [process] = runs
        if process.signals:
            self.violations.append(f"lease given on a process being stopped: {describeProcess(process)}")
        if id(process) in self.readyFor:
            self.readyFor[id(process)] = True
        self.leases.append(Held(result, process))

    # Rules.

    @initialize(first=st.lists(st.tuples(st.sampled_from(NAMES), options), min_size=1, max_size=3))
    def firstRequests(self, first: list[tuple[str, RequestOptions]]) -> None:
        """
        The first requests, so that every run has some (hypothesis turns
        rules off at random in each run, L{acquire} too).
        """
        for name, options in first:
            self.acquire(name, options)

    @rule(name=st.sampled_from(ALL_NAMES), options=options)
    def acquire(self, name: str, options: RequestOptions) -> None:
        """
        A request for model C{name}.
        """
        d = self.manager.acquire(name, options)
        request = Request(name, options, self.reactor.seconds(), d)
        self.requests.append(request)
        d.addBoth(self._answered, request)

    @precondition(lambda self: any(r.pending for r in self.requests))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """
        A waiting request's client goes away.
        """
        request = data.draw(st.sampled_from(self.pending()))
        request.cancelled = True
        request.deferred.cancel()

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """
        A request in flight finishes.
        """
        held = data.draw(st.sampled_from(self.leases))
        self.leases.remove(held)
        held.lease.release()

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def ready(self, data: st.DataObject) -> None:
        """
        A backend says it is ready and its probe agrees (whatever state its
        model is in: a stopping backend may finish loading too).
        """
        process = data.draw(st.sampled_from(self.live()))
        name = process.args[1]
        waiting = self.manager.describe(name)["waiting_requests"]
        wasLoading = self.isRun(process, LOADING)
        self.backend.ready.add(name)
        try:
            process.output(b"server is READY\n")
        finally:
            self.backend.ready.discard(name)
        if wasLoading and waiting and id(process) not in self.readyFor:
            self.readyFor[id(process)] = any(h.process is process for h in self.leases)

    @precondition(lambda self: bool(self.liveWhere(lambda t, row: row["status"] == LOADING)))
    @rule(data=st.data(), portTaken=st.booleans())
    def loadFails(self, data: st.DataObject, portTaken: bool) -> None:
        """
        A loading backend exits: it failed, or its port had been taken.
        """
        process = data.draw(st.sampled_from(self.liveWhere(lambda t, row: row["status"] == LOADING)))
        process.output(PORT_TAKEN_LINE if portTaken else b"error: out of memory\n")
        process.exit(ProcessTerminated(exitCode=1))

    @precondition(lambda self: bool(self.liveWhere(lambda t, row: row["status"] == LOADED)))
    @rule(data=st.data(), reason=crashes)
    def crash(self, data: st.DataObject, reason: Exception) -> None:
        """
        A loaded backend dies by itself.
        """
        process = data.draw(st.sampled_from(self.liveWhere(lambda t, row: row["status"] == LOADED)))
        process.exit(reason)

    @precondition(lambda self: any(t.signals for t in self.live()))
    @rule(data=st.data(), portTaken=st.booleans())
    def exitAfterSignal(self, data: st.DataObject, portTaken: bool) -> None:
        """
        A backend that was sent TERM (or KILL) exits; while loading, it may
        have printed that its port was taken first.
        """
        process = data.draw(st.sampled_from([t for t in self.live() if t.signals]))
        if portTaken:
            process.output(PORT_TAKEN_LINE)
        process.exit(ProcessTerminated(signal=9 if "KILL" in process.signals else 15))

    @rule(name=st.sampled_from(NAMES), fails=st.integers(0, 3))
    def spawnFails(self, name: str, fails: int) -> None:
        """
        From now on model C{name}'s program cannot be spawned (one time in
        four), or can again.
        """
        if fails == 3:
            self.reactor.spawnErrorFor[name] = OSError(2, "No such file or directory")
        else:
            self.reactor.spawnErrorFor.pop(name, None)

    @rule(seconds=st.sampled_from([0.001, 0.1, 1.0, 3.0, KILL_TIME, 10.0, QUEUE_TIMEOUT, LOAD_TIMEOUT + 1]))
    def advance(self, seconds: float) -> None:
        """
        Time passes: probes, queue timeouts, load timeouts, KILLs and the
        shutdown's drain timeout fire.
        """
        self.reactor.advance(seconds)

    @rule(name=st.sampled_from(ALL_NAMES))
    def unload(self, name: str) -> None:
        """
        An admin unloads model C{name}.
        """
        try:
            row = self.manager.describe(name)
        except UnknownModel:
            row = {}
        d = self.manager.unload(name)
        unload = Unload(name, d)
        self.unloads.append(unload)
        d.addBoth(lambda result: unload.answers.append(result.value if isinstance(result, Failure) else result))
        if unload.answers and isinstance(unload.answers[0], ModelBusy):
            if not (row.get("active_requests") or row.get("status") == LOADING):
                self.violations.append(f"unload of {name} refused as busy: {row}")

    @rule(name=st.sampled_from(ALL_NAMES))
    def forceUnload(self, name: str) -> None:
        """
        An admin unloads model C{name} with C{force}: its leases are
        revoked (the test's holders let go of them).
        """
        for t in self.live():
            if t.args[1] == name:
                self.forced.add(id(t))
        d = self.manager.unload(name, force=True)
        unload = Unload(name, d)
        self.unloads.append(unload)
        d.addBoth(lambda result: unload.answers.append(result.value if isinstance(result, Failure) else result))
        revoked = [h for h in self.leases if h.lease.revokedBy is not None]
        for held in revoked:
            if held.lease.model.name != name:
                self.violations.append(f"force-unloading {name} revoked a lease on {held.lease.model.name}")
            self.leases.remove(held)

    @rule(which=st.integers(0, len(RELOADS) - 1))
    def reload(self, which: int) -> None:
        """
        The configuration is reloaded with one of L{RELOADS}.
        """
        models, total = RELOADS[which]
        self.manager.reconfigure(self.configFor(models, total))

    @rule()
    def reapIdle(self) -> None:
        """
        The idle reaper runs.
        """
        self.manager.reapIdle()

    @precondition(lambda self: self.stopped is None)
    @rule(now=st.integers(0, 9))
    def stopService(self, now: int = 0) -> None:
        """
        The service is stopped, once in ten tries (its end comes in
        L{teardown}).
        """
        if now:
            return
        self.stopAt = self.reactor.seconds()
        self.stopped = self.manager.stopService()
        self.stopped.addBoth(self.stopAnswers.append)

    # Invariants.

    @invariant()
    def withinBudget(self) -> None:
        """
        The memory of models loading, loaded or unloading fits the budget,
        and so does that of the models whose process runs.
        """
        assert self.manager.memoryInUse() <= TOTAL_MB, self.manager.models()
        running = {t.args[1] for t in self.live()}
        inUse = sum(m["vram_mb"] for m in self.manager.models() if m["name"] in running)
        assert inUse <= TOTAL_MB, (inUse, [describeProcess(t) for t in self.live()])

    @invariant()
    def processesAreRuns(self) -> None:
        """
        Every running process is its model's current run, and its model
        holds memory: none is forgotten, none runs twice.
        """
        for t in self.live():
            row = self.manager.describe(t.args[1])
            assert row["pid"] == t.pid and row["status"] in HOLDS_MEMORY, (describeProcess(t), row)

    @invariant()
    def busyNeverStopped(self) -> None:
        """
        No process with a lease out on it is sent TERM or KILL (but for a
        shutdown whose drain timeout has passed), and no lease is given on
        a stopping process.
        """
        if not self.shutdownMayStopBusy():
            for held in self.leases:
                assert not held.process.signals, f"busy {describeProcess(held.process)} was signalled"
        assert not self.violations, self.violations

    @invariant()
    def signalsWellFormed(self) -> None:
        """
        Each process gets at most one TERM, then at most one KILL, and no
        signal after its exit.
        """
        for t in self.reactor.spawned:
            assert t.signals in ([], ["TERM"], ["TERM", "KILL"]), describeProcess(t)
            assert not t.lateSignals, (describeProcess(t), t.lateSignals)

    @invariant()
    def storeAgrees(self) -> None:
        """
        The store's row of every model shows the status, pid and port that
        C{describe()} shows.
        """
        for row in self.manager.models():
            saved = self.store.saved[row["name"]]
            assert (saved["status"], saved["pid"], saved["port"]) == (row["status"], row["pid"], row["port"]), (
                saved,
                row,
            )

    @invariant()
    def accountsAgree(self) -> None:
        """
        A model's C{waiting_requests} are the requests for it not yet
        answered, and its C{active_requests} the leases out on its current
        process; each request has at most one answer.
        """
        for row in self.manager.models():
            name = row["name"]
            pending = [r for r in self.requests if r.name == name and r.pending]
            assert row["waiting_requests"] == len(pending), (row, pending)
            if row["status"] == LOADED:
                active = [h for h in self.leases if h.process.pid == row["pid"] and not h.process.exited]
                assert row["active_requests"] == len(active), (row, active)
            else:
                assert row["active_requests"] == 0, row
        for r in self.requests:
            assert len(r.answers) <= 1, (r.name, r.answers)

    @invariant()
    def loadsServeTheirWaiters(self) -> None:
        """
        A backend that became ready while requests waited for it serves one
        of them before it is stopped (but for a shutdown or a forced
        unload).
        """
        if self.stopAt is None:
            for t in self.reactor.spawned:
                if t.signals and self.readyFor.get(id(t)) is False and id(t) not in self.forced:
                    raise AssertionError(f"loaded for waiters, stopped before serving any: {describeProcess(t)}")

    def nothingLogged(self) -> None:
        """
        No unhandled error was logged (an error in a Deferred's callbacks,
        such as automat's C{NoTransition}, or a Deferred fired twice).
        Checked only at the end, after a garbage collection: a Deferred
        logs its unhandled error when it is collected, and a check after
        each step would depend on when the collector ran.
        """
        gc.collect()
        assert not self.loggedFailures, "\n".join(self.loggedFailures)

    # The end.

    def exitSignalled(self) -> None:
        """
        Every process that was sent TERM or KILL exits.
        """
        for t in self.live():
            if t.signals:
                t.exit(ProcessTerminated(signal=9 if "KILL" in t.signals else 15))

    def teardown(self) -> None:
        """
        Unless a step already failed, L{finish}.
        """
        try:
            if sys.exc_info()[0] is None:
                self.finish()
        finally:
            # Collect this run's garbage while its observer listens, so
            # that its unhandled errors are not blamed on the next run.
            gc.collect()
            globalLogPublisher.removeObserver(self._observe)

    def finish(self) -> None:
        """
        If no step stopped the service: let the clock run for
        L{QUIET_SECONDS} with nothing becoming ready, no lease released and
        every stopped backend exiting, and check that every request has
        been answered (no request waits forever). Then stop the service,
        let it finish, and check that every request, unload and the stop
        itself was answered exactly once, that no process is left and that
        nothing was logged.
        """
        if self.stopped is None:
            # A quiet end: nothing becomes ready, nobody releases.
            for _ in range(int(QUIET_SECONDS / QUIET_STEP)):
                self.reactor.advance(QUIET_STEP)
                self.exitSignalled()
                self.checkAll()
            stranded = [(r.name, r.options, r.at) for r in self.pending()]
            assert not stranded, (
                f"requests still waiting at {self.reactor.seconds()} s: {stranded}; {self.manager.models()}"
            )
            self.stopService()
        for _ in range(int((SHUTDOWN_TIMEOUT + KILL_TIME) / QUIET_STEP) + 2):
            self.reactor.advance(QUIET_STEP)
            self.exitSignalled()
            self.checkAll()
        assert not self.live(), [describeProcess(t) for t in self.live()]
        assert self.stopAnswers == [None], self.stopAnswers
        for row in self.manager.models():
            assert row["status"] in (UNLOADED, FAILED), row
        assert self.manager.memoryInUse() == 0
        for r in self.requests:
            assert len(r.answers) == 1, (r.name, r.answers)
            [answer] = r.answers
            if r.cancelled:
                assert isinstance(answer, defer.CancelledError), (r, answer)
            else:
                assert isinstance(answer, (Lease, SchedulerError)), (r, answer)
        for u in self.unloads:
            assert len(u.answers) == 1, (u.name, u.answers)
            assert u.answers[0] is None or isinstance(u.answers[0], (ModelBusy, UnknownModel)), (u.name, u.answers)
        for held in self.leases:
            held.lease.release()
        self.leases = []
        for row in self.manager.models():
            assert row["active_requests"] == 0, row
        self.nothingLogged()
        self.assertShutdownRefuses()

    def assertShutdownRefuses(self) -> None:
        """
        Once stopped, the manager refuses requests with L{ShuttingDown}.
        """
        d = self.manager.acquire("a")
        assert isinstance(d.result, Failure) and d.result.check(ShuttingDown), d.result
        d.addErrback(lambda f: None)

    def checkAll(self) -> None:
        """
        Check every invariant (as hypothesis does after each step).
        """
        self.withinBudget()
        self.processesAreRuns()
        self.busyNeverStopped()
        self.signalsWellFormed()
        self.storeAgrees()
        self.accountsAgree()
        self.loadsServeTheirWaiters()


class SchedulerPropertyTests(ManagerTestsMixin, SynchronousTestCase):
    """
    The invariants of L{SchedulerMachine} over random runs, with each
    eviction policy.
    """

    def setUp(self) -> None:
        # Every port of the range counts as free: no real socket makes a run
        # differ from the next.
        self.patch(runner, "portIsFree", lambda port: True)
        # dynllm's info messages would fill the test log; errors still pass.
        quiet = FilteringLogObserver(globalLogPublisher, [LogLevelFilterPredicate(LogLevel.error)])
        for module in (lifecycle, process, runner, scheduler, store):
            self.patch(module, "log", Logger(namespace=module.__name__, observer=quiet))

    def runMachine(self, **settings: Any) -> None:
        def configFor(models: list[dict[str, Any]], total: int) -> Config:
            return self.makeConfig(
                models,
                total_vram_mb=total,
                queue_timeout_seconds=QUEUE_TIMEOUT,
                load_timeout_seconds=LOAD_TIMEOUT,
                shutdown_timeout_seconds=SHUTDOWN_TIMEOUT,
                idle_timeout_seconds=IDLE_TIMEOUT,
                **settings,
            )

        config = configFor(MODELS, TOTAL_MB)
        # The collections that L{SchedulerMachine.nothingLogged} needs then
        # skip the objects made so far (hypothesis's among them): much faster.
        gc.collect()
        gc.freeze()
        self.addCleanup(gc.unfreeze)
        try:
            run_state_machine_as_test(lambda: SchedulerMachine(config, configFor), settings=PROFILE)
        except BaseException:
            # The machine checks what is logged, run by run (see
            # SchedulerMachine.nothingLogged); trial's copies would only
            # repeat the errors of every failing example tried.
            self.flushLoggedErrors()
            raise

    def test_lifo(self) -> None:
        """
        With C{eviction_policy: lifo}, random runs keep every invariant of
        L{SchedulerMachine} after every step, and answer every request
        exactly once by the end.
        """
        self.runMachine(eviction_policy="lifo")

    def test_lru(self) -> None:
        """
        With C{eviction_policy: lru}, random runs keep every invariant of
        L{SchedulerMachine} after every step, and answer every request
        exactly once by the end.
        """
        self.runMachine(eviction_policy="lru")


class RegressionTests(ManagerTestsMixin, SynchronousTestCase):
    """
    The smallest cases of the properties' failures, as plain tests.
    """

    def test_readyModelServedNotStopped(self) -> None:
        """
        A backend that becomes ready while its requests wait serves them,
        and is not stopped while they hold it, even when another load waits
        for memory that stopping it would free.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 500}])
        waitingA = manager.acquire("a")
        waitingB = manager.acquire("b")
        self.assertEqual((self.status("a"), self.status("b")), ("loading", "unloaded"))
        self.makeReady("a")
        lease = self.successResultOf(waitingA)
        self.assertEqual(self.process("a").signals, [])
        self.assertEqual(self.status("a"), "loaded")
        self.assertEqual(self.describe("a")["active_requests"], 1)
        self.assertNoResult(waitingB)
        lease.release()
        self.assertWithinBudget()

    def test_portConflictKeepsQueueTimeout(self) -> None:
        """
        A request whose load found its port taken, and whose retry then
        waits for memory, is still answered within its queue timeout.
        """
        manager = self.makeManager(
            [{"name": "a", "vram_mb": 600}, {"name": "b", "vram_mb": 600, "priority": 5}],
            queue_timeout_seconds=20,
        )
        waitingA = manager.acquire("a")
        waitingB = manager.acquire("b")
        first = self.process("a")
        first.output(b"E srv start: couldn't bind HTTP server socket, hostname: 127.0.0.1\n")
        first.exit(ProcessTerminated(exitCode=1))
        self.assertEqual((self.status("a"), self.status("b")), ("unloaded", "loading"))
        self.makeReady("b")
        busy = self.successResultOf(waitingB)
        self.reactor.advance(20)
        self.failureResultOf(waitingA, NoCapacity)
        busy.release()


    def test_restartAfterExitSpawnsOnce(self) -> None:
        """
        A model that requests wait for while it is being unloaded is
        spawned again exactly once when it exits, even when another load
        starts at the same moment; every process spawned is its model's
        run.
        """
        manager = self.makeManager([{"name": "a", "vram_mb": 400}, {"name": "c", "vram_mb": 300}])
        self.addCleanup(self.flushNoTransition)
        self.loadIdle("a")
        manager.unload("a")
        waitingA = manager.acquire("a")
        waitingC = manager.acquire("c")
        # c fits beside the memory a holds for its reload: it starts now.
        self.assertEqual((self.status("a"), self.status("c")), ("unloading", "loading"))
        self.process("a").exit()
        self.assertEqual((self.status("a"), self.status("c")), ("loading", "loading"))
        self.assertEqual(len(self.spawnedFor("a")), 2)
        self.assertEqual(self.describe("a")["pid"], self.process("a").pid)
        self.assertEqual(len(self.spawnedFor("c")), 1)
        self.makeReady("a")
        self.makeReady("c")
        self.successResultOf(waitingA).release()
        self.successResultOf(waitingC).release()


    def flushNoTransition(self) -> None:
        """
        Collect the Deferred whose callback raised automat's
        C{NoTransition} (the second load of the bug above), and take its
        logged error, so that it is not blamed on a later test.
        """
        gc.collect()
        self.flushLoggedErrors(NoTransition)
