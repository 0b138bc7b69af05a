# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics, served at C{GET /metrics}.

The state of the models (loaded, memory, requests in flight or waiting) and
their counters (loads, failures, unloads by cause, crashes) are read from
the manager (an L{IModelManager}) when the metrics are scraped, so nothing
is kept twice; request counts and durations are observed by the routes.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dynllm.interfaces import IModelManager
from dynllm.lease import ModelCounters
from dynllm.lifecycle import STATUSES, STOP_CAUSES

#: The content type of L{Metrics.render}'s output.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: States a model can be in (one gauge series each).
STATES = STATUSES

#: Causes of unloads, each always reported (0 until it happens; see
#: L{ModelCounters.unloads}); any other cause is reported once counted.
UNLOAD_CAUSES = STOP_CAUSES


class ModelCollector(Collector):
    """
    Reads the models' state (L{IModelManager.models}) and counters
    (L{IModelManager.counters}) from a manager.

    @ivar manager: The manager.
    @ivar totalMB: The memory budget, C{total_vram_mb}.
    """

    def __init__(self, manager: IModelManager, totalMB: int) -> None:
        self.manager = manager
        self.totalMB = totalMB

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        total = GaugeMetricFamily("dynllm_vram_total_mb", "The memory budget, total_vram_mb.")
        total.add_metric([], self.totalMB)
        used = GaugeMetricFamily(
            "dynllm_vram_used_mb", "Memory held by models loading, loaded or still stopping."
        )
        used.add_metric([], manager.memoryInUse())
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
        for model in manager.models():
            name = model["name"]
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
        yield from (total, used, state, active, waiting, loads, failures, loadSeconds, unloads, crashes)


class Metrics:
    """
    The metrics of one daemon, in a registry of its own.

    @ivar registry: Where they are registered.
    """

    def __init__(self, manager: IModelManager, totalMB: int) -> None:
        """
        @param manager: Whose models are reported.
        @param totalMB: The memory budget, C{total_vram_mb}.
        """
        self.registry = CollectorRegistry()
        self.registry.register(ModelCollector(manager, totalMB))
        self._requests = Counter(
            "dynllm_requests",
            "Requests to the OpenAI routes, by model, route and status.",
            ["model", "route", "status"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "dynllm_request_duration_seconds",
            "Time from a request's arrival to its last byte, load included.",
            ["model", "route"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self._upstreamTimeouts = Counter(
            "dynllm_upstream_timeouts",
            "Relays ended because the backend sent nothing for backend_idle_timeout_seconds.",
            ["model"],
            registry=self.registry,
        )

    def upstreamTimeout(self, model: str) -> None:
        """
        Count a relay to C{model} ended because its backend sent nothing for
        C{backend_idle_timeout_seconds}.
        """
        self._upstreamTimeouts.labels(model).inc()

    def observe(self, request: Any, model: str, route: str, started: float, clock: Any) -> None:
        """
        Count C{request} and its duration once it has finished (or its
        client has gone, counted with status C{disconnected}).
        """

        def done(result: object) -> None:
            status = "disconnected" if result is not None else str(request.code)
            self._requests.labels(model, route, status).inc()
            self._seconds.labels(model, route).observe(clock.seconds() - started)

        request.notifyFinish().addBoth(done)

    def render(self) -> bytes:
        """
        @return: every metric in Prometheus' text format.
        """
        return generate_latest(self.registry)
