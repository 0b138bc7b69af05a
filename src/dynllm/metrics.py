# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics, served at C{GET /metrics}.

The state of the models (loaded, memory, requests in flight or waiting) and
their counters (loads, failures, unloads by cause, crashes) are read from
the manager (an L{IModelManager}) when the metrics are scraped, so nothing
is kept twice; request outcomes and durations are observed by the routes,
upstream timeouts counted by the relay (L{Metrics.upstreamTimeout}), and
the daemon's own process (CPU, memory, file descriptors) read from
C{/proc/self} by C{prometheus_client}'s C{ProcessCollector}.

Names follow Prometheus' conventions
(U{https://prometheus.io/docs/practices/naming/}): base units (bytes,
seconds), C{_total} on counters, and the HTTP status in a C{code} label as
client_golang's C{promhttp} names it.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dynllm.interfaces import IModelManager
from dynllm.lease import ModelCounters
from dynllm.lifecycle import STATUSES, STOP_CAUSES

#: The content type of L{Metrics.render}'s output.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Bytes in the megabyte of dynllm's C{*_mb} settings (a mebibyte, as for
#: C{max_request_body_mb}).
BYTES_PER_MB = 1024 * 1024

#: States a model can be in (one gauge series each).
STATES = STATUSES

#: The stop cause of C{POST /admin/models/unload} with C{"force": true}.
FORCED = "forced"

#: Causes of unloads, each always reported (0 until it happens; see
#: L{ModelCounters.unloads}); any other cause is reported once counted.
UNLOAD_CAUSES = tuple(dict.fromkeys(STOP_CAUSES + (FORCED,)))

#: The C{code} of a request whose connection closed before its response
#: was finished: its client left, or dynllm cut a stream short because its
#: backend died or stalled (see L{Metrics.upstreamTimeout}).
DISCONNECTED = "disconnected"


def statusCode(request: Any, result: object) -> str:
    """
    @param request: A finished (or abandoned) C{twisted.web} request.
    @param result: What its C{notifyFinish()} Deferred fired with:
        C{None} once the response was written whole, a failure if the
        connection closed first.
    @return: the C{code} label of its outcome: the three-digit status sent
        (C{"200"}, C{"503"}, ...), or L{DISCONNECTED}.
    """
    if result is not None:
        return DISCONNECTED
    return str(request.code)


class ModelCollector(Collector):
    """
    Reads the models' state (L{IModelManager.models}) and counters
    (L{IModelManager.counters}) from a manager.

    @ivar manager: The manager.
    @ivar totalMB: The memory budget, C{total_vram_mb}.
    @ivar upstreamTimeouts: Requests ended because their backend stalled,
        by model (kept by L{Metrics}; reported 0 for every other model).
    """

    def __init__(self, manager: IModelManager, totalMB: int, upstreamTimeouts: dict[str, int]) -> None:
        self.manager = manager
        self.totalMB = totalMB
        self.upstreamTimeouts = upstreamTimeouts

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        total = GaugeMetricFamily("dynllm_vram_total_bytes", "The memory budget, total_vram_mb, in bytes.")
        # The manager's configuration is the running one, after a reload too.
        config = getattr(manager, "config", None)
        totalMB = config.total_vram_mb if config is not None else self.totalMB
        total.add_metric([], totalMB * BYTES_PER_MB)
        used = GaugeMetricFamily(
            "dynllm_vram_used_bytes", "Memory (vram_mb, in bytes) held by models loading, loaded or still stopping."
        )
        used.add_metric([], manager.memoryInUse() * BYTES_PER_MB)
        state = GaugeMetricFamily("dynllm_model_state", "1 for the state each model is in.", labels=["model", "state"])
        active = GaugeMetricFamily("dynllm_model_active_requests", "Requests in flight.", labels=["model"])
        waiting = GaugeMetricFamily(
            "dynllm_model_waiting_requests", "Requests waiting for the model to load.", labels=["model"]
        )
        loads = CounterMetricFamily("dynllm_model_loads", "Loads that became ready.", labels=["model"])
        failures = CounterMetricFamily("dynllm_model_load_failures", "Loads that failed.", labels=["model"])
        loadSeconds = CounterMetricFamily(
            "dynllm_model_load_seconds", "Seconds spent in loads that became ready.", labels=["model"]
        )
        unloads = CounterMetricFamily(
            "dynllm_model_unloads", "Backends stopped, by cause.", labels=["model", "cause"]
        )
        crashes = CounterMetricFamily("dynllm_model_crashes", "Backends that died while loaded.", labels=["model"])
        timeouts = CounterMetricFamily(
            "dynllm_upstream_timeouts",
            "Requests ended because their backend sent nothing for backend_idle_timeout_seconds.",
            labels=["model"],
        )
        names = []
        for model in manager.models():
            name = model["name"]
            names.append(name)
            counters: ModelCounters = manager.counters(name)
            for stateName in STATES:
                state.add_metric([name, stateName], 1 if model["status"] == stateName else 0)
            active.add_metric([name], model["active_requests"])
            waiting.add_metric([name], model["waiting_requests"])
            loads.add_metric([name], counters.loads)
            failures.add_metric([name], counters.loadFailures)
            loadSeconds.add_metric([name], counters.loadSeconds)
            causes = UNLOAD_CAUSES + tuple(sorted(set(counters.unloads) - set(UNLOAD_CAUSES)))
            for cause in causes:
                unloads.add_metric([name, cause], counters.unloads.get(cause, 0))
            crashes.add_metric([name], counters.crashes)
        # Models no longer configured (removed by a reload) keep what they
        # counted.
        for name in names + sorted(set(self.upstreamTimeouts) - set(names)):
            timeouts.add_metric([name], self.upstreamTimeouts.get(name, 0))
        yield from (total, used, state, active, waiting, loads, failures, loadSeconds, unloads, crashes, timeouts)


class Metrics:
    """
    The metrics of one daemon, in a registry of its own.

    @ivar registry: Where they are registered.
    """

    def __init__(self, manager: IModelManager, totalMB: int) -> None:
        """
        Besides the models and requests, this process's CPU seconds,
        resident and virtual memory, open and maximum file descriptors and
        start time are reported under the standard C{process_*} names (read
        from C{/proc/self} at each scrape; absent where there is no
        C{/proc}).

        @param manager: Whose models are reported.
        @param totalMB: The memory budget, C{total_vram_mb}.
        """
        self.registry = CollectorRegistry()
        self._upstreamTimeouts: dict[str, int] = {}
        self.registry.register(ModelCollector(manager, totalMB, self._upstreamTimeouts))
        ProcessCollector(registry=self.registry)
        self._requests = Counter(
            "dynllm_requests",
            "Requests to the model routes, by model, route and outcome: the HTTP status sent"
            f" (a 5xx class is code=~\"5..\"), or {DISCONNECTED} if the connection closed"
            " before the response's end.",
            ["model", "route", "code"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "dynllm_request_duration_seconds",
            "Time from a request's arrival to its last byte, load included.",
            ["model", "route"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )

    def observe(self, request: Any, model: str, route: str, started: float, clock: Any) -> None:
        """
        Count C{request} by its outcome (L{statusCode}) and time it, once it
        has finished or its connection has closed.

        @param request: A C{twisted.web} request, not finished yet.
        @param model: The model's configured name (not an alias).
        @param route: The route as metrics name it (C{/v1/chat/completions}).
        @param started: C{clock.seconds()} when it arrived.
        @param clock: An C{IReactorTime}.
        """

        def done(result: object) -> None:
            self._requests.labels(model, route, statusCode(request, result)).inc()
            self._seconds.labels(model, route).observe(clock.seconds() - started)

        request.notifyFinish().addBoth(done)

    def upstreamTimeout(self, model: str) -> None:
        """
        Count one request to C{model} ended because its backend sent
        nothing for C{backend_idle_timeout_seconds}
        (L{dynllm.config.Config.backendIdleTimeout}): reported as
        C{dynllm_upstream_timeouts_total{model=...}}.

        @param model: The model's configured name.
        """
        self._upstreamTimeouts[model] = self._upstreamTimeouts.get(model, 0) + 1

    def render(self) -> bytes:
        """
        @return: every metric in Prometheus' text format.
        """
        return generate_latest(self.registry)
