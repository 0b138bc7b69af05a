# -*- test-case-name: tests.test_exceptions -*-
"""
What the scheduler raises: domain exceptions, with no HTTP in them.

A program that embeds dynllm handles these by type; the routes turn each into
a status and an error envelope in one place (L{dynllm.errors.fromScheduler}).
"""

from __future__ import annotations

from attrs import frozen


class SchedulerError(Exception):
    """
    A model could not be served, or could not be loaded or unloaded as
    asked. Every subclass says why.
    """


@frozen(auto_exc=True)
class UnknownModel(SchedulerError):
    """
    The configuration declares no model (or alias) by this name.

    @ivar name: The name asked for.
    """

    name: str

    def __str__(self) -> str:
        return f"The model {self.name!r} does not exist"


@frozen(auto_exc=True)
class ModelBusy(SchedulerError):
    """
    An unload was asked of a model that is serving requests or loading.

    @ivar name: The model.
    @ivar activeRequests: Requests in flight on it.
    @ivar loading: Whether it is loading (then C{activeRequests} is 0).
    """

    name: str
    activeRequests: int = 0
    loading: bool = False

    def __str__(self) -> str:
        if self.loading:
            return f"model {self.name!r} is loading"
        return f"model {self.name!r} has {self.activeRequests} request(s) in flight"


@frozen(auto_exc=True)
class LoadFailed(SchedulerError):
    """
    The model's backend could not be started, or exited before it was
    ready.

    @ivar name: The model.
    @ivar reason: A sentence saying what happened (it may name files).
    @ivar logTail: The backend's last lines of output in this run, oldest
        first.
    """

    name: str
    reason: str
    logTail: tuple[str, ...] = ()

    def __str__(self) -> str:
        """
        @return: the reason and the output, for the daemon's log and the
            admin's C{last_error}: clients get less
            (L{dynllm.errors.fromScheduler}).
        """
        if self.logTail:
            return f"{self.reason}{LAST_OUTPUT}" + "\n".join(self.logTail)
        return self.reason


#: What separates the reason of a L{LoadFailed} from its output lines in
#: its text (and so in a model's C{last_error}).
LAST_OUTPUT = "; last output:\n"


@frozen(auto_exc=True)
class LoadTimedOut(SchedulerError):
    """
    The model's backend was not ready within its C{load_timeout_seconds}; it
    has been stopped.

    @ivar name: The model.
    @ivar seconds: The load timeout.
    """

    name: str
    seconds: float

    def __str__(self) -> str:
        return f"model {self.name!r} was not ready within its load timeout of {self.seconds:g}s"


@frozen(auto_exc=True)
class NoCapacity(SchedulerError):
    """
    The model could not be loaded within the request's queue timeout:
    memory is held by models serving requests, or by loads ahead of it.

    @ivar name: The model.
    @ivar neededMB: Its C{vram_mb}.
    @ivar freeMB: Memory free when the wait ended.
    @ivar totalMB: C{total_vram_mb}.
    @ivar waitedSeconds: How long the request waited (its queue timeout).
    @ivar busyModels: Models that had requests in flight, by name.
    @ivar retryAfter: Whole seconds until memory is expected to free, at
        least 1 (see L{dynllm.planner.retryAfter}).
    @ivar givingWayTo: When the model is loaded but gives way to a load
        that waits for its memory (its new requests queue behind that
        load), that load's model; else C{None}.
    """

    name: str
    neededMB: int
    freeMB: int
    totalMB: int
    waitedSeconds: float
    busyModels: tuple[str, ...]
    retryAfter: int
    givingWayTo: str | None = None

    def __str__(self) -> str:
        if self.givingWayTo is not None:
            return (
                f"model {self.name!r} is loaded but gives way to model {self.givingWayTo!r}, which waits"
                f" for the memory it holds; not served within {self.waitedSeconds:g}s"
            )
        return (
            f"not enough memory to load model {self.name!r} ({self.neededMB} MB needed,"
            f" {self.freeMB} MB free of {self.totalMB} MB) within {self.waitedSeconds:g}s;"
            f" busy models: {', '.join(self.busyModels) or 'none'}"
        )


@frozen(auto_exc=True)
class ShuttingDown(SchedulerError):
    """
    dynllm is stopping: no new request is served, and requests waiting for a
    model are answered with this.
    """

    def __str__(self) -> str:
        return "dynllm is shutting down"


@frozen(auto_exc=True)
class ModelUnloaded(SchedulerError):
    """
    A request's model was stopped while the request waited for it or was
    being served: an administrator unloaded it with C{"force": true}, or a
    configuration reload removed it.

    @ivar name: The model's name.
    @ivar cause: C{"forced"} or C{"removed"}.
    """

    name: str
    cause: str = "forced"

    def __str__(self) -> str:
        if self.cause == "removed":
            return f"model {self.name!r} was removed from the configuration"
        return f"model {self.name!r} was unloaded by an administrator (forced) while this request was in flight"


@frozen(auto_exc=True)
class UpstreamTimeout(SchedulerError):
    """
    A backend sent nothing for C{backend_idle_timeout_seconds} while a
    request was relayed to it: it stalled, or is frozen.

    @ivar name: The model's name.
    @ivar seconds: The timeout that passed.
    """

    name: str
    seconds: float

    def __str__(self) -> str:
        return (
            f"model {self.name!r}: its backend sent nothing for {self.seconds:g}s"
            " (backend_idle_timeout_seconds); the request was ended"
        )
