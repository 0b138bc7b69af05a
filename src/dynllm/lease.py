# -*- test-case-name: tests.test_scheduler -*-
"""
The values that pass between the routes and the scheduler: a L{Lease} on a
ready model, the L{RequestOptions} a request may set, and a model's
L{ModelCounters}.
"""

from __future__ import annotations

from typing import Callable

from attrs import define, field, frozen

from dynllm.config import ModelConfig
from dynllm.interfaces import IBackend


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
    revokedBy: Exception | None = None
    _onRevoke: list[Callable[[Exception], object]] = field(factory=list, repr=False)

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

    def revoke(self, reason: Exception) -> None:
        """
        Take the model back while the lease is held (a forced unload): the
        lease is released at once, and what L{whenRevoked} registered is
        called with C{reason} (the holder then ends its request). Nothing
        happens for a lease released already.

        @param reason: Why, a L{dynllm.exceptions.SchedulerError} such as
            L{dynllm.exceptions.ModelUnloaded}.
        """
        if self.released:
            return
        self.revokedBy = reason
        self.release()
        handlers, self._onRevoke = self._onRevoke, []
        for handler in handlers:
            handler(reason)

    def whenRevoked(self, handler: Callable[[Exception], object]) -> Callable[[], None]:
        """
        Call C{handler} with the reason if the lease is revoked before it is
        released (see L{revoke}).

        @return: a function that withdraws C{handler}.
        """
        self._onRevoke.append(handler)

        def withdraw() -> None:
            if handler in self._onRevoke:
                self._onRevoke.remove(handler)

        return withdraw

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@frozen
class RequestOptions:
    """
    What one request may ask of the scheduler, beyond the configuration
    (the routes read these from C{X-DynLLM-*} headers).

    @ivar queueTimeout: Seconds this request may wait for memory, instead of
        C{queue_timeout_seconds}; C{0} answers at once when the model
        cannot be loaded now. C{None}: the configured value.
    @ivar priority: This request's place in the queue: higher is served
        first. C{None}: the model's C{priority}.
    @ivar keepAlive: The model's idle timeout, in seconds, from this request
        on, like Ollama's C{keep_alive}; C{-1} never unloads it for being
        idle, C{0} unloads it as soon as it is idle. C{None}: unchanged.
    """

    queueTimeout: float | None = None
    priority: int | None = None
    keepAlive: float | None = None


@frozen
class ModelCounters:
    """
    One model's counters since start-up, for metrics.

    @ivar loads: Loads that became ready.
    @ivar loadFailures: Loads that failed (exited, timed out, or could not
        be spawned).
    @ivar loadSeconds: Seconds spent in loads that became ready.
    @ivar unloads: Backends stopped, by cause: C{idle}, C{evicted},
        C{request}, C{shutdown}, C{abandoned}.
    @ivar crashes: Backends that died while loaded.
    """

    loads: int = 0
    loadFailures: int = 0
    loadSeconds: float = 0.0
    unloads: dict[str, int] = field(factory=dict)
    crashes: int = 0
