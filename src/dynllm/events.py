# -*- test-case-name: tests.test_events -*-
"""
What changed in the models, as events: the domain side of
C{GET /admin/events} (the HTTP side is L{dynllm.sse}).

L{ModelEvents} watches an L{IModelManager} while anyone listens, and tells
each listener two kinds of event, as C{(kind, data)}:

  - C{"model"}: a model's L{IModelManager.describe} whenever any of it
    changed, and every second while it loads (its C{loading_seconds} is the
    load progress); C{{"name": NAME, "status": "removed"}} once a reload
    has forgotten it.
  - C{"memory"}: the budget and what holds it, whenever that changed:
    C{total_vram_mb}, C{used_vram_mb}, and C{loaded_mb}, C{loading_mb},
    C{unloading_mb} (the C{vram_mb} of the models in each state).

A listener first gets the current state (one C{memory} event, then one
C{model} event per configured model), then the changes. Changes are
gathered for one reactor turn, so a burst of them (a load that serves ten
waiting requests) makes one event per model, with its newest state.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall

from dynllm.interfaces import IModelManager
from dynllm.logs import logger

__all__ = ["MEMORY", "MODEL", "REMOVED", "Event", "Listener", "ModelEvents", "memoryOf"]

log = logger(__name__)

#: The event kinds.
MODEL = "model"
MEMORY = "memory"

#: The C{status} of a model a reload removed.
REMOVED = "removed"

#: One event: its kind and its data (a JSON-able C{dict}).
Event = tuple[str, dict[str, Any]]

#: Receives events, in order.
Listener = Callable[[str, dict[str, Any]], object]

#: Seconds between the model events of a model that is loading.
PROGRESS_INTERVAL = 1.0


def memoryOf(totalMB: int, models: list[dict[str, Any]]) -> dict[str, Any]:
    """
    @param totalMB: C{total_vram_mb}.
    @param models: Every model as L{IModelManager.describe} gives it.
    @return: the data of a C{memory} event: C{total_vram_mb},
        C{used_vram_mb}, C{loaded_mb}, C{loading_mb} and C{unloading_mb}
        (megabytes of C{vram_mb}).
    """
    held = {status: 0 for status in ("loaded", "loading", "unloading")}
    for model in models:
        if model["status"] in held:
            held[model["status"]] += model["vram_mb"]
    return {
        "total_vram_mb": totalMB,
        "used_vram_mb": sum(held.values()),
        "loaded_mb": held["loaded"],
        "loading_mb": held["loading"],
        "unloading_mb": held["unloading"],
    }


@define(eq=False)
class ModelEvents:
    """
    The model and memory events of one manager, for any number of
    listeners. It watches the manager only while someone listens.

    @ivar manager: The L{IModelManager} watched.
    @ivar clock: Coalesces changes (a call 0 s later) and times the
        progress of loads.
    """

    manager: IModelManager
    clock: IReactorTime
    _listeners: list[Listener] = field(factory=list, init=False)
    _unwatch: Callable[[], None] | None = field(default=None, init=False)
    _flush: IDelayedCall | None = field(default=None, init=False)
    _progress: LoopingCall | None = field(default=None, init=False)
    #: The data of the last events sent: each model's, by name, and memory.
    _models: dict[str, dict[str, Any]] = field(factory=dict, init=False)
    _memory: dict[str, Any] | None = field(default=None, init=False)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """
        Send C{listener} the current state now (one C{memory} event, then
        one C{model} event per model), then every change as it happens.

        @return: a function that stops the events to C{listener}.
        """
        if not self._listeners:
            self._snapshot()
            self._unwatch = self.manager.watch(self._changed)
        self._listeners.append(listener)
        assert self._memory is not None
        listener(MEMORY, self._memory)
        for data in list(self._models.values()):
            listener(MODEL, data)
        self._watchProgress()

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)
                if not self._listeners:
                    self._quiet()

        return stop

    def _quiet(self) -> None:
        """
        Nobody listens: stop watching, forget what was sent.
        """
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        if self._progress is not None and self._progress.running:
            self._progress.stop()
        self._progress = None
        self._models.clear()
        self._memory = None

    def _snapshot(self) -> list[Event]:
        """
        Take the manager's state now.

        @return: the events that tell what changed since the last one.
        """
        models = self.manager.models()
        events: list[Event] = []
        names = set()
        for data in models:
            names.add(data["name"])
            if self._models.get(data["name"]) != data:
                self._models[data["name"]] = data
                events.append((MODEL, data))
        for name in [name for name in self._models if name not in names]:
            del self._models[name]
            events.append((MODEL, {"name": name, "status": REMOVED}))
        memory = memoryOf(self.manager.config.total_vram_mb, models)
        if memory != self._memory:
            self._memory = memory
            events.insert(0, (MEMORY, memory))
        return events

    def _changed(self) -> None:
        if self._flush is None:
            self._flush = self.clock.callLater(0, self._send)

    def _send(self) -> None:
        self._flush = None
        if not self._listeners:
            return
        for kind, data in self._snapshot():
            for listener in list(self._listeners):
                try:
                    listener(kind, data)
                except Exception:
                    if listener in self._listeners:
                        self._listeners.remove(listener)
                    log.failure("a listener of the model events failed; it is told no more")
            if not self._listeners:
                # The last listener failed or stopped: stop watching, as
                # when it stops itself (else the next listen() would watch
                # the manager a second time).
                self._quiet()
                return
        self._watchProgress()

    def _watchProgress(self) -> None:
        """
        Send the loading models again every L{PROGRESS_INTERVAL} while any
        loads (their C{loading_seconds} grows).
        """
        loading = any(data["status"] == "loading" for data in self._models.values())
        if loading and self._progress is None:
            # Through the same coalescing call as any change.
            self._progress = LoopingCall(self._changed)
            self._progress.clock = self.clock
            self._progress.start(PROGRESS_INTERVAL, now=False)
        elif not loading and self._progress is not None:
            if self._progress.running:
                self._progress.stop()
            self._progress = None
