# -*- test-case-name: tests.test_backends -*-
"""
The interfaces of dynllm's public surface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from dynllm.config import ModelConfig


class IBackend(Interface):
    """
    One kind of inference server: how to start it for a model, how to tell
    that it is ready, and where it serves each public endpoint.

    Implementations hold no per-process state; L{dynllm.runner.BackendRun}
    runs one process with the help of one of these.
    """

    kind = Attribute("C{str}: the C{backend} value in the configuration, e.g. C{'llamacpp'}.")
    modelTypes = Attribute("C{tuple} of the C{model_type} values this backend can serve.")
    owned = Attribute(
        "L{dynllm.owned.OwnedSettings}: the launch settings dynllm owns (listen"
        " address, model, served name, API key), in every spelling the backend"
        " accepts; the configuration refuses them in C{extra_args} and C{env}."
    )
    keyVariable = Attribute(
        "C{str} or C{None}: the environment variable the backend reads its API"
        " key from. Each run gets a fresh random key there (never on its command"
        " line, which every local user can read), and dynllm sends it as"
        " C{Authorization: Bearer KEY}. C{None} for a backend without keys."
    )

    def wantsKey(model: ModelConfig) -> bool:
        """
        @return: whether a run of C{model} gets a fresh random API key (in
            L{keyVariable}, or where the model's command puts it), which
            dynllm then sends as C{Authorization: Bearer KEY}.
        """

    def argv(model: ModelConfig, binary: str, port: int, apiKey: str | None = None) -> list[str]:
        """
        The command line that serves C{model} on 127.0.0.1:C{port}.

        @param model: The L{dynllm.config.ModelConfig}.
        @param binary: The program to run, as configured.
        @param port: The TCP port it must listen on.
        @param apiKey: This run's key when L{wantsKey}, else C{None}; only a
            backend whose command line carries it uses it here.
        @return: a C{list} of C{str}, program first, C{extra_args} last.
        """

    def environment(model: ModelConfig) -> dict[str, str | None]:
        """
        @return: a C{dict} of variables the backend needs beyond ours, and
            of ours it must not inherit (with the value C{None}: at least
            every variable of L{owned}); the model's C{env} overrides these.
        """

    def probe(http: Any, baseURL: str, model: ModelConfig) -> Deferred[bool]:
        """
        Ask a started backend once whether it is ready to serve C{model}.

        @param http: A C{treq.client.HTTPClient}.
        @param baseURL: C{http://127.0.0.1:PORT}.
        @return: a Deferred firing with C{True} when ready, else C{False}.
        """

    def readyHint(line: str) -> bool:
        """
        @param line: One line the backend printed.
        @return: C{True} if the line suggests it just became ready, so that
            a probe should be sent at once rather than at the next tick.
        """

    def upstreamPath(route: str, model: ModelConfig) -> str | None:
        """
        @param route: The public path, e.g. C{'/v1/chat/completions'}, or
            for the KServe routes the request's own path
            (C{'/v2/models/NAME/infer'}).
        @return: the path on the backend that serves C{route} for C{model},
            or C{None} if this backend does not serve it.
        """

    def upstreamModel(model: ModelConfig, requested: str | None = None) -> str:
        """
        @param requested: The name (or alias) the request gave, if known.
        @return: the name the backend knows C{model} by, which requests must
            carry in their C{model} field; when it is not the name the
            client sent, requests and responses are renamed on the way (see
            L{dynllm.rewrite}).
        """


class IStateStore(Interface):
    """
    Where the scheduler records each model's state, so that a daemon started
    after a crash can find and stop the backends the crashed one left
    behind (L{dynllm.store.reconcile}).

    Rows are C{dict}s keyed by L{dynllm.store.COLUMNS}: C{name}, C{status},
    C{backend}, C{pid}, C{pgid}, C{start_time}, C{port}, C{vram_mb},
    C{loaded_at}, C{last_used_at}, C{load_seq}, C{last_error},
    C{updated_at}, C{stop_command} (the run's C{stop.command} as expanded,
    a JSON list, or C{None}). Implementations: L{dynllm.store.SQLiteStateStore} and
    L{dynllm.store.MemoryStateStore}.
    """

    def open() -> None:
        """
        Take the store for this process; calling it again does nothing.

        @raise dynllm.store.StateInUse: if another process holds it.
        @raise dynllm.store.StateUnavailable: if it cannot be made or
            written (its directory missing, read-only or full).
        """

    def close() -> None:
        """
        Let go of the store once the writes queued so far are done.
        """

    def rows() -> Deferred[list[dict[str, Any]]]:
        """
        @return: a Deferred firing with every row, ordered by name.
        """

    def save(row: Any) -> Deferred[None]:
        """
        Insert or replace the row of C{row["name"]}. Writes happen in the
        order they are asked for.

        @param row: A mapping keyed by column names; missing ones are null.
        @return: a Deferred that fires once written (or once the store is
            closed). It never fails: a write that fails is logged and
            retried until it lands, and the daemon keeps serving.
        """

    def reset(names: list[str]) -> Deferred[None]:
        """
        Forget the rows of models not in C{names}, and mark the others
        C{unloaded} with no process.
        """


class IModelManager(Interface):
    """
    What the routes, the metrics and programs that embed dynllm use of the
    scheduler (L{dynllm.scheduler.ModelManager}; a stub for tests is
    L{dynllm.testing.StubManager}).

    Every method taking a model name accepts the model's configured name
    only (the routes resolve aliases) and raises or fails with
    L{dynllm.exceptions.UnknownModel} for any other.
    """

    config = Attribute("The L{dynllm.config.Config} whose models it runs.")
    started = Attribute(
        "C{bool}: whether start-up (the reconciliation of what a previous run"
        " left behind) is done, so that loads can start."
    )

    def whenStarted() -> Deferred[None]:
        """
        @return: a fresh Deferred that fires once L{started} is true.
        """

    def acquire(name: str, options: Any = None) -> Deferred[Any]:
        """
        Get a L{dynllm.lease.Lease} on a ready model, loading it first if
        needed. Concurrent requests for a model share one load; cancelling
        the returned Deferred withdraws that caller only.

        @param options: A L{dynllm.lease.RequestOptions} (queue timeout,
            priority, keep-alive for this request), or C{None} for the
            configured defaults.
        @return: a Deferred firing with the lease, or failing with a
            L{dynllm.exceptions.SchedulerError}: L{UnknownModel
            <dynllm.exceptions.UnknownModel>}, L{NoCapacity
            <dynllm.exceptions.NoCapacity>}, L{LoadFailed
            <dynllm.exceptions.LoadFailed>}, L{LoadTimedOut
            <dynllm.exceptions.LoadTimedOut>} or L{ShuttingDown
            <dynllm.exceptions.ShuttingDown>}.
        """

    def peek(name: str) -> Any:
        """
        @return: a L{dynllm.lease.Lease} on the model if it is loaded now,
            else C{None}. Nothing is loaded for a peek, and its idle timer
            is not reset by it.
        """

    def load(name: str) -> Deferred[None]:
        """
        Make sure the model is loaded, without holding it.

        @return: a Deferred firing once it is loaded; failures as L{acquire}.
        """

    def reconfigure(config: Any) -> None:
        """
        Run the L{dynllm.config.Config} C{config} from now on (a reload):
        models added, removed (drained, then stopped) and changed
        (restarted when idle), global settings from their next use.
        """

    def unload(name: str, force: bool = False) -> Deferred[None]:
        """
        Stop the model's backend now.

        @param force: Stop it even while it serves requests or loads; they
            fail with L{dynllm.exceptions.ModelUnloaded} (leases are
            revoked: L{dynllm.lease.Lease.revoke}).
        @return: a Deferred firing once its process has exited (at once if
            it had none), or failing with L{dynllm.exceptions.ModelBusy} if
            it is serving requests or loading and C{force} is false.
        """

    def describe(name: str) -> dict[str, Any]:
        """
        @return: the model as C{/admin/models} shows it: C{name}, C{status}
            (C{unloaded}, C{loading}, C{loaded}, C{unloading} or
            C{failed}), C{backend}, C{model_type}, C{vram_mb}, C{pid},
            C{port}, C{loaded_at}, C{last_used_at}, C{active_requests},
            C{waiting_requests}, C{last_error}.
        """

    def models() -> list[dict[str, Any]]:
        """
        @return: L{describe} of every configured model, in configuration
            order.
        """

    def counters(name: str) -> Any:
        """
        @return: the model's L{dynllm.lease.ModelCounters} since start-up,
            for metrics.
        """

    def memoryInUse() -> int:
        """
        @return: megabytes of C{vram_mb} held by models loading, loaded or
            still stopping.
        """

    def watch(onChange: Callable[[], None]) -> Callable[[], None]:
        """
        Call C{onChange()} (cheap, not calling back into the manager) after
        anything L{describe} or L{memoryInUse} shows may have changed; it
        may be called more often than something changed. See
        L{dynllm.events.ModelEvents}, which turns the calls into events.

        @return: a function that stops the calls.
        """

    def followLog(name: str, onLines: Callable[[list[str]], None]) -> Callable[[], None]:
        """
        Call C{onLines(lines)} with each batch of lines the model's backends
        print from now on (across restarts), oldest first.

        @return: a function that stops the calls.
        """

    def logTail(name: str, count: int) -> list[str]:
        """
        @return: the last C{count} lines the model's backends printed,
            across restarts, oldest first.
        """

    def backendOf(name: str) -> IBackend:
        """
        @return: the backend kind that runs the model.
        """
