"""
Tests for L{dynllm.planner}: what starts, what is stopped, what is held, and
the C{Retry-After} of a refusal, from plain values (no reactor).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dynllm.planner import DEFAULT_LOAD_SECONDS, ModelView, Plan, plan, retryAfter


def view(name: str, vram: int = 600, status: str = "unloaded", **kw: object) -> ModelView:
    return ModelView(name=name, vramMB=vram, status=status, **kw)  # type: ignore[arg-type]


class PlanTests(SynchronousTestCase):
    """
    Tests for L{plan}.
    """

    def test_nothingToDo(self) -> None:
        """
        With nobody waiting, nothing starts, stops or is held.
        """
        models = [view("a", status="loaded"), view("b")]
        self.assertEqual(plan(models, 1000, "lifo"), Plan())

    def test_startWhatFits(self) -> None:
        """
        Waiting loads that fit start, in queue order.
        """
        models = [view("a", 300, waiting=1, since=2.0), view("b", 300, waiting=1, since=1.0)]
        self.assertEqual(plan(models, 1000, "lifo").start, ("b", "a"))

    def test_priorityFirst(self) -> None:
        """
        A waiting load of higher priority is served before older ones.
        """
        models = [
            view("old", waiting=1, since=1.0),
            view("urgent", waiting=1, since=5.0, priority=10),
        ]
        result = plan(models, 1000, "lifo")
        self.assertEqual(result.queue, ("urgent", "old"))
        self.assertEqual(result.start, ("urgent",))

    def test_nothingJumpsTheHead(self) -> None:
        """
        Once a load waits for memory, loads behind it do not start, even
        small ones that would fit now: they would take memory the first one
        waits for.
        """
        models = [
            view("busy", 500, status="loaded", active=1),
            view("big", 600, waiting=1, since=1.0),
            view("small", 100, waiting=1, since=2.0),
        ]
        self.assertEqual(plan(models, 1000, "lifo").start, ())

    def test_behindStoppingModelInWhatIsFree(self) -> None:
        """
        A model that waits to load again once its backend has stopped keeps
        the memory it holds for that; loads behind it start in the memory
        that is free (it is not counted twice), and its requests see it
        load without waiting for anyone.
        """
        models = [
            view("restarting", 300, status="unloading", waiting=1, since=1.0),
            view("busy", 100, status="loaded", active=1),
            view("big", 600, waiting=1, since=2.0),
        ]
        result = plan(models, 1000, "lifo")
        self.assertEqual((result.start, result.clearing), (("big",), frozenset({"restarting"})))

    def test_evictIdleForHead(self) -> None:
        """
        Idle models are stopped for the head until it fits.
        """
        models = [
            view("idle", 600, status="loaded", loadSeq=1),
            view("b", 600, waiting=1, since=1.0),
        ]
        self.assertEqual(plan(models, 1000, "lifo").stop, (("idle", "evicted"),))

    def test_lifoOrder(self) -> None:
        """
        Under C{lifo}, the most recently loaded idle model goes first.
        """
        models = [
            view("first", 300, status="loaded", loadSeq=1),
            view("last", 300, status="loaded", loadSeq=2),
            view("c", 600, waiting=1, since=1.0),
        ]
        self.assertEqual(plan(models, 1000, "lifo").stop, (("last", "evicted"),))

    def test_lruOrder(self) -> None:
        """
        Under C{lru}, the least recently used idle model goes first.
        """
        models = [
            view("stale", 300, status="loaded", loadSeq=2, lastUsedAt=1.0),
            view("fresh", 300, status="loaded", loadSeq=1, lastUsedAt=9.0),
            view("c", 600, waiting=1, since=1.0),
        ]
        self.assertEqual(plan(models, 1000, "lru").stop, (("stale", "evicted"),))

    def test_lowPriorityEvictedFirst(self) -> None:
        """
        Idle models of lower configured priority are evicted before the
        policy's order applies.
        """
        models = [
            view("precious", 300, status="loaded", loadSeq=2, modelPriority=5),
            view("cheap", 300, status="loaded", loadSeq=1),
            view("c", 600, waiting=1, since=1.0),
        ]
        self.assertEqual(plan(models, 1000, "lifo").stop, (("cheap", "evicted"),))

    def test_nothingStoppedInVain(self) -> None:
        """
        Idle models are not stopped when the head would not fit even then
        (and no busy model could make room): nothing is stopped or held.
        """
        models = [
            view("idle", 200, status="loaded"),
            view("loading", 600, status="loading", waiting=1),
            view("b", 600, waiting=1, since=1.0),
        ]
        self.assertEqual(plan(models, 1000, "lifo"), Plan(queue=("b",), head="b"))

    def test_waitForStopping(self) -> None:
        """
        Memory that models already stopping will free counts: nothing more
        is stopped.
        """
        models = [
            view("going", 600, status="unloading"),
            view("idle", 300, status="loaded"),
            view("b", 600, waiting=1, since=1.0),
        ]
        self.assertEqual(plan(models, 1000, "lifo").stop, ())

    def test_holdBusyForHead(self) -> None:
        """
        When the head fits only once a busy model is gone, that model is
        held (it drains) and nothing is stopped yet: a busy model is never
        stopped.
        """
        models = [view("a", status="loaded", active=1), view("b", waiting=1, since=1.0)]
        result = plan(models, 1000, "lifo")
        self.assertEqual((result.stop, result.hold, result.head, result.clearing), ((), frozenset({"a"}), "b", frozenset()))

    def test_idleNotHeldWithBusy(self) -> None:
        """
        When the head needs an idle model and a busy one, only the busy one
        is held (the idle one goes on serving), nothing is stopped yet, and
        once the busy one is idle both are stopped.
        """
        models = [
            view("idle", 300, status="loaded"),
            view("busy", 300, status="loaded", active=2),
            view("c", 800, waiting=1, since=1.0),
        ]
        result = plan(models, 1000, "lifo")
        self.assertEqual((result.stop, result.hold, result.clearing), ((), frozenset({"busy"}), frozenset()))
        models[1] = view("busy", 300, status="loaded")
        result = plan(models, 1000, "lifo")
        self.assertEqual(set(result.stop), {("idle", "evicted"), ("busy", "evicted")})
        self.assertEqual(result.clearing, frozenset({"c"}))

    def test_servesWaitersAheadFirst(self) -> None:
        """
        A model that requests ahead of the head still wait for (it just
        loaded for them) is not evicted: it is held, and the plan lets it
        serve those requests first.
        """
        models = [
            view("b", status="loaded", waiting=1, since=1.0),
            view("a", waiting=1, since=2.0),
        ]
        result = plan(models, 1000, "lifo")
        self.assertEqual((result.stop, result.hold, result.admitBefore), ((), frozenset({"b"}), (0, 2.0)))

    def test_waitersBehindHeadDoNotProtect(self) -> None:
        """
        An idle model whose waiting requests all came after the head's is
        evicted for it (they wait behind the head), and so is one whose
        requests are of lower priority.
        """
        models = [view("b", status="loaded", waiting=1, since=3.0), view("a", waiting=1, since=2.0)]
        self.assertEqual(plan(models, 1000, "lifo").stop, (("b", "evicted"),))
        models = [view("b", status="loaded", waiting=1, since=1.0), view("a", waiting=1, since=2.0, priority=1)]
        self.assertEqual(plan(models, 1000, "lifo").stop, (("b", "evicted"),))

    def test_abandonedStoppedForHead(self) -> None:
        """
        A load nobody waits for any more is stopped at once when the head
        needs its memory, before any idle model.
        """
        models = [
            view("idle", 400, status="loaded"),
            view("abandoned", 600, status="loading"),
            view("b", 600, waiting=1, since=1.0),
        ]
        self.assertEqual(plan(models, 1000, "lifo").stop, (("abandoned", "abandoned"),))

    def test_abandonedLeftWithoutNeed(self) -> None:
        """
        A load nobody waits for goes on when no load needs its memory.
        """
        models = [view("abandoned", 600, status="loading"), view("b", 300, waiting=1)]
        result = plan(models, 1000, "lifo")
        self.assertEqual((result.start, result.stop), (("b",), ()))

    def test_reloadAfterStop(self) -> None:
        """
        A model that requests wait for while it is stopping is queued but
        not started before it has exited.
        """
        models = [view("a", 300, status="unloading", waiting=1, since=1.0)]
        result = plan(models, 1000, "lifo")
        self.assertEqual((result.start, result.queue), ((), ("a",)))


class RetryAfterTests(SynchronousTestCase):
    """
    Tests for L{retryAfter}.
    """

    def test_atLeastOne(self) -> None:
        """
        The answer is never below one second.
        """
        models = [view("a", loadSeconds=0.01)]
        self.assertEqual(retryAfter(models, "a"), 1)

    def test_defaultWhenNothingSeen(self) -> None:
        """
        With no load seen, a load is expected to take
        L{DEFAULT_LOAD_SECONDS}.
        """
        self.assertEqual(retryAfter([view("a")], "a"), DEFAULT_LOAD_SECONDS)

    def test_queueAheadAndLoadsInProgress(self) -> None:
        """
        The loads queued ahead, its own, and the rest of the loads in
        progress count, each at its model's average load time (else the
        average of those seen).
        """
        models = [
            view("loading", status="loading", loadSeconds=10.0, loadingFor=4.0),
            view("ahead", waiting=1, since=1.0, loadSeconds=3.0),
            view("me", waiting=1, since=2.0),
            view("behind", waiting=1, since=3.0, loadSeconds=100.0),
        ]
        # 6 left of "loading", 3 for "ahead", (10 + 3 + 100) / 3 for "me".
        self.assertEqual(retryAfter(models, "me"), 47)
