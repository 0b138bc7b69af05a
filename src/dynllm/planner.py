# -*- test-case-name: tests.test_planner -*-
"""
Which loads start, which models are stopped to make room, and which models
stop taking new requests so that a waiting load gets its turn: a pure
function of the models' states (L{plan}), and the C{Retry-After} a refused
request is told (L{retryAfter}). No reactor, no processes: values in,
values out.

The rules, in order:

 1. Models that requests wait to load form the queue, ordered by priority
    (higher first: the C{X-DynLLM-Priority} of its waiters, else the
    model's C{priority}), then by when their first request arrived.
 2. A load starts when its C{vram_mb} fits in the memory not held by
    models loading, loaded or still stopping.
 3. The first load that does not fit is the I{head}: only it may make room.
    Loads behind it may start only in memory free beyond what it needs.
 4. For the head, models are stopped in this order until it fits: loads
    nobody waits for any more (abandoned), then idle loaded models, lowest
    C{priority} first, then by C{eviction_policy} (C{lifo}: the most
    recently loaded first; C{lru}: the least recently used first). Nothing
    is stopped unless the head then fits (counting memory that models
    already stopping will free); abandoned loads are stopped whenever a head
    waits.
 5. If the head would fit only once some busy models are stopped too, the
    idle and busy models it needs are I{held}: they take no request that
    arrived after the head's (those queue), so they drain, become idle,
    and rule 4 stops them. Idle models it needs are not held: they serve
    until it fits. A busy model is never stopped, nor one that requests
    which arrived before the head's still wait for (it serves them first:
    a model that just loaded for its requests is not evicted before it has
    served them).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from attrs import frozen

from dynllm.lifecycle import ABANDONED, EVICTED, FAILED, HOLDS_MEMORY, LOADED, LOADING, UNLOADED, UNLOADING

#: Seconds a load is expected to take when no load has been seen yet; see
#: L{retryAfter}.
DEFAULT_LOAD_SECONDS = 5.0


@frozen
class ModelView:
    """
    What the planner needs to know of one model.

    @ivar name: Its name.
    @ivar vramMB: Its C{vram_mb}.
    @ivar status: One of L{dynllm.lifecycle.STATUSES}.
    @ivar active: Requests in flight on it.
    @ivar waiting: Requests waiting for it.
    @ivar priority: The priority of its first waiting request in queue
        order (the highest priority, the earliest of those), or its
        configured C{priority} when none waits.
    @ivar since: When that request arrived, as any number that increases
        with each arrival (the scheduler gives an arrival count); C{None}
        when none waits.
    @ivar modelPriority: Its configured C{priority}: the lowest are evicted
        first.
    @ivar lastUsedAt: When a request last used it (for C{lru}).
    @ivar loadSeq: The order of its last load among all loads (for
        C{lifo}).
    @ivar loadSeconds: How long its loads took on average, if one was seen.
    @ivar loadingFor: Seconds since its current load began, while loading.
    """

    name: str
    vramMB: int
    status: str
    active: int = 0
    waiting: int = 0
    priority: int = 0
    since: float | None = None
    modelPriority: int = 0
    lastUsedAt: float = 0.0
    loadSeq: int = 0
    loadSeconds: float | None = None
    loadingFor: float = 0.0

    @property
    def wantsLoad(self) -> bool:
        """
        Whether requests wait for it to be loaded (it has no process, or one
        that is stopping and must be started again).
        """
        return self.waiting > 0 and self.status in (UNLOADED, FAILED, UNLOADING)

    @property
    def abandoned(self) -> bool:
        """
        Whether it is loading for nobody: every request that waited for it
        has gone.
        """
        return self.status == LOADING and self.waiting == 0

    @property
    def queueKey(self) -> tuple[float, float]:
        """
        Its first waiting request's place in the queue: lower is served
        first.
        """
        return (-self.priority, self.since if self.since is not None else 0.0)

    @property
    def idle(self) -> bool:
        return self.status == LOADED and self.active == 0

    def evictableFor(self, head: ModelView) -> bool:
        """
        Whether it may be stopped to make room for C{head}: it is loaded,
        serves no request, and no request waits for it that arrived before
        C{head}'s in queue order (those it must serve first; later ones
        queue behind C{head} and load it again in their turn).
        """
        if not self.idle:
            return False
        return self.waiting == 0 or self.queueKey > head.queueKey


@frozen
class Plan:
    """
    What to do now.

    @ivar start: Models whose load starts now, in queue order.
    @ivar stop: C{(model, cause)} pairs: models to stop now, with the cause
        (L{ABANDONED} or L{EVICTED}).
    @ivar hold: Loaded models that take no new requests until the next
        plan: their requests queue behind the load that waits for them.
    @ivar admitBefore: The place in the queue (see L{ModelView.queueKey})
        of that load's first request: held models still serve the requests
        ahead of it. C{None} when nothing is held.
    @ivar queue: The models that wait for a load, in queue order (those
        started now included).
    @ivar head: The first model of the queue that could not start, if any.
    @ivar clearing: The models whose requests will see them load without
        waiting for anyone: the head, when the memory it needs is being
        freed now (by models stopping; no busy model stands in its way),
        and models that load again once their own stopping backend has
        exited.
    """

    start: tuple[str, ...] = ()
    stop: tuple[tuple[str, str], ...] = ()
    hold: frozenset[str] = frozenset()
    queue: tuple[str, ...] = ()
    admitBefore: tuple[float, float] | None = None
    head: str | None = None
    clearing: frozenset[str] = frozenset()


def queueOrder(models: Iterable[ModelView]) -> list[ModelView]:
    """
    @return: the models that wait for a load, first served first (rule 1).
    """
    waiting = [m for m in models if m.wantsLoad]
    return sorted(waiting, key=lambda m: m.queueKey)


def evictionOrder(models: Iterable[ModelView], policy: str) -> list[ModelView]:
    """
    @param policy: C{lifo} or C{lru}.
    @return: the loaded models in the order they are stopped to make room
        (rule 4, busy ones included: the caller skips what it may not
        stop).
    """
    loaded = [m for m in models if m.status == LOADED]
    if policy == "lru":
        return sorted(loaded, key=lambda m: (m.modelPriority, m.lastUsedAt))
    return sorted(loaded, key=lambda m: (m.modelPriority, -m.loadSeq))


def plan(models: Sequence[ModelView], totalMB: int, policy: str) -> Plan:
    """
    Decide what to start, stop and hold now (see the module's rules).

    @param models: Every configured model.
    @param totalMB: C{total_vram_mb}.
    @param policy: C{eviction_policy}: C{lifo} or C{lru}.
    """
    free = totalMB - sum(m.vramMB for m in models if m.status in HOLDS_MEMORY)
    releasing = sum(m.vramMB for m in models if m.status == UNLOADING)
    queue = queueOrder(models)
    start: list[str] = []
    stop: list[tuple[str, str]] = []
    hold: set[str] = set()
    head: ModelView | None = None
    fits = False
    clearing = {m.name for m in queue if m.status == UNLOADING}
    for model in queue:
        need = model.vramMB
        if model.status == UNLOADING:
            # It loads again once it has exited, in the memory it holds now.
            continue
        if need <= free:
            start.append(model.name)
            free -= need
            continue
        if head is None:
            head = model
            stop, hold, fits = _makeRoom(model, models, free + releasing, policy)
        # Loads behind the head use only memory beyond what it needs.
        free -= need
    return Plan(
        tuple(start),
        tuple(stop),
        frozenset(hold),
        tuple(m.name for m in queue),
        head.queueKey if hold and head is not None else None,
        head.name if head is not None else None,
        frozenset(clearing | ({head.name} if head is not None and fits else set())),
    )


def _makeRoom(
    head: ModelView, models: Sequence[ModelView], freeable: int, policy: str
) -> tuple[list[tuple[str, str]], set[str], bool]:
    """
    @param freeable: Memory free now or once the models stopping now exit.
    @return: what to stop for C{head}, what to hold (rules 4 and 5), and
        whether C{head} fits once the models stopping now have exited.
    """
    need = head.vramMB
    if need <= freeable:
        return [], set(), True
    victims: list[tuple[str, str]] = []
    for model in models:
        if model.abandoned and need > freeable:
            victims.append((model.name, ABANDONED))
            freeable += model.vramMB
    order = [m for m in evictionOrder(models, policy) if m.name != head.name]
    for model in order:
        if need <= freeable:
            break
        if model.evictableFor(head):
            victims.append((model.name, EVICTED))
            freeable += model.vramMB
    if need <= freeable:
        return victims, set(), True
    # Idle models stay in service until the busy ones are done: holding
    # them too would only keep their requests waiting for nothing.
    held: set[str] = set()
    for model in order:
        if need <= freeable:
            break
        if not model.evictableFor(head):
            held.add(model.name)
            freeable += model.vramMB
    # Stop the abandoned loads now: nobody wants them.
    abandoned = [v for v in victims if v[1] == ABANDONED]
    return abandoned, held if need <= freeable else set(), False


def retryAfter(models: Sequence[ModelView], name: str) -> int:
    """
    The C{Retry-After} for a request for C{name} that could not be served:
    how long until memory for it is expected to be free. The remaining time
    of busy requests is unknown, so this counts what is known: the loads
    queued ahead of it and its own, and the rest of the loads in progress,
    each at the average load time seen for that model (else the average of
    all models, else L{DEFAULT_LOAD_SECONDS}).

    @return: whole seconds, at least 1.
    """
    seen = [m.loadSeconds for m in models if m.loadSeconds is not None]
    default = sum(seen) / len(seen) if seen else DEFAULT_LOAD_SECONDS

    def expected(model: ModelView) -> float:
        return model.loadSeconds if model.loadSeconds is not None else default

    seconds = sum(max(0.0, expected(m) - m.loadingFor) for m in models if m.status == LOADING)
    for model in queueOrder(models):
        seconds += expected(model)
        if model.name == name:
            break
    else:
        seconds += expected(next(m for m in models if m.name == name))
    return max(1, math.ceil(seconds))
