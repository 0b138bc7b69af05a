"""
The Prometheus metrics of L{dynllm.metrics}: model state read from a real
L{ModelManager} on a fake reactor, request outcomes from real
C{twisted.web} requests, upstream timeouts as the relay counts them, and
the daemon's own process.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from dynllm.config import parseConfig
from dynllm.lease import ModelCounters
from dynllm.lifecycle import STOP_CAUSES
from dynllm.metrics import FORCED, UNLOAD_CAUSES, Metrics
from dynllm.scheduler import ModelManager
from dynllm.store import MemoryStateStore
from dynllm.testing import FakeBackend, FakeProcessReactor


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    @return: every sample of C{metrics}, keyed by name and sorted labels.
    """
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class ModelCollectorTests(SynchronousTestCase):
    """
    Model state and counters are read from the manager when scraped.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        for name in ("a", "b"):
            open(os.path.join(directory, name), "w").close()
        config = parseConfig(
            {
                "enabled_backends": ["llamacpp"],
                "total_vram_mb": 1000,
                "backend": {"port_range_start": 41300, "port_range_end": 41340},
                "models": [
                    {"name": n, "path": n, "backend": "llamacpp", "vram_mb": 600} for n in ("a", "b")
                ],
            },
            directory,
            which=lambda name: "/bin/true",
        )
        self.reactor = FakeProcessReactor()
        self.backend = FakeBackend(self.reactor)
        self.manager = ModelManager(
            config=config, reactor=self.reactor, http=None, store=MemoryStateStore(),
            newSession=False, backendFor=lambda kind: self.backend,
        )
        self.manager.startService()
        self.metrics = Metrics(self.manager, config.total_vram_mb)

    def load(self, name: str) -> Any:
        """
        Load model C{name} (one second after asking) and return its lease.
        """
        d = self.manager.acquire(name)
        self.backend.ready.add(name)
        self.reactor.advance(1)
        return self.successResultOf(d)

    def test_state(self) -> None:
        """
        The budget and the memory in use (in bytes), each model's state (one series per
        state), and its requests in flight are reported.
        """
        lease = self.load("a")
        found = samples(self.metrics)
        self.assertEqual(found[("dynllm_vram_total_bytes", ())], 1000 * 1024 * 1024)
        self.assertEqual(found[("dynllm_vram_used_bytes", ())], 600 * 1024 * 1024)
        self.assertEqual(found[("dynllm_model_state", (("model", "a"), ("state", "loaded")))], 1)
        self.assertEqual(found[("dynllm_model_state", (("model", "a"), ("state", "unloaded")))], 0)
        self.assertEqual(found[("dynllm_model_state", (("model", "b"), ("state", "unloaded")))], 1)
        self.assertEqual(found[("dynllm_model_active_requests", (("model", "a"),))], 1)
        lease.release()
        self.assertEqual(samples(self.metrics)[("dynllm_model_active_requests", (("model", "a"),))], 0)

    def test_counters(self) -> None:
        """
        Loads, the seconds they took, evictions and crashes are counted.
        """
        self.load("a").release()
        d = self.manager.acquire("b")
        self.reactor.spawned[0].exit()  # "a" evicted for "b"
        self.backend.ready.add("b")
        self.reactor.advance(1)
        self.successResultOf(d).release()
        self.reactor.spawned[1].exit()  # "b" dies while loaded
        found = samples(self.metrics)
        self.assertEqual(found[("dynllm_model_loads_total", (("model", "a"),))], 1)
        self.assertGreater(found[("dynllm_model_load_seconds_total", (("model", "a"),))], 0)
        self.assertEqual(found[("dynllm_model_unloads_total", (("cause", "evicted"), ("model", "a")))], 1)
        self.assertEqual(found[("dynllm_model_crashes_total", (("model", "b"),))], 1)
        self.assertEqual(found[("dynllm_model_crashes_total", (("model", "a"),))], 0)

    def test_noMegabytes(self) -> None:
        """
        No metric is named in megabytes: memory is in bytes, as Prometheus'
        naming guide asks.
        """
        self.load("a")
        names = {name for name, labels in samples(self.metrics)}
        self.assertEqual([name for name in names if "_mb" in name], [])

    def test_forcedCauseAlways(self) -> None:
        """
        Every model reports the C{forced} unload cause, 0 before any forced
        unload, with the causes the lifecycle names.
        """
        self.assertEqual(UNLOAD_CAUSES[: len(STOP_CAUSES)], STOP_CAUSES)
        self.assertIn(FORCED, UNLOAD_CAUSES)
        found = samples(self.metrics)
        for name in ("a", "b"):
            self.assertEqual(found[("dynllm_model_unloads_total", (("cause", FORCED), ("model", name)))], 0)

    def test_upstreamTimeouts(self) -> None:
        """
        L{Metrics.upstreamTimeout} counts one stalled request of a model in
        C{dynllm_upstream_timeouts_total}; every other model reports 0.
        """
        self.metrics.upstreamTimeout("a")
        self.metrics.upstreamTimeout("a")
        found = samples(self.metrics)
        self.assertEqual(found[("dynllm_upstream_timeouts_total", (("model", "a"),))], 2)
        self.assertEqual(found[("dynllm_upstream_timeouts_total", (("model", "b"),))], 0)


class FakeManager:
    """
    The part of an L{IModelManager} the metrics read, with counters given
    as they are.

    @ivar counted: Each model's L{ModelCounters}.
    """

    def __init__(self, counted: dict[str, ModelCounters]) -> None:
        self.counted = counted

    def models(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "status": "unloaded", "active_requests": 0, "waiting_requests": 0}
            for name in self.counted
        ]

    def counters(self, name: str) -> ModelCounters:
        return self.counted[name]

    def memoryInUse(self) -> int:
        return 0


class UnloadCauseTests(SynchronousTestCase):
    """
    Unloads are reported by the cause the scheduler counted them under.
    """

    def test_forced(self) -> None:
        """
        A forced unload counted under C{forced} is reported with that cause,
        apart from the others.
        """
        metrics = Metrics(FakeManager({"m": ModelCounters(unloads={FORCED: 1, "idle": 2})}), 100)  # type: ignore[arg-type]
        found = samples(metrics)
        self.assertEqual(found[("dynllm_model_unloads_total", (("cause", FORCED), ("model", "m")))], 1)
        self.assertEqual(found[("dynllm_model_unloads_total", (("cause", "idle"), ("model", "m")))], 2)
        self.assertEqual(found[("dynllm_model_unloads_total", (("cause", "evicted"), ("model", "m")))], 0)

    def test_otherCause(self) -> None:
        """
        A cause not in L{UNLOAD_CAUSES} is reported once counted.
        """
        metrics = Metrics(FakeManager({"m": ModelCounters(unloads={"reload": 3})}), 100)  # type: ignore[arg-type]
        self.assertEqual(samples(metrics)[("dynllm_model_unloads_total", (("cause", "reload"), ("model", "m")))], 3)

    def test_removedModelTimeouts(self) -> None:
        """
        Upstream timeouts of a model no longer configured (removed by a
        reload) are still reported.
        """
        metrics = Metrics(FakeManager({}), 100)  # type: ignore[arg-type]
        metrics.upstreamTimeout("gone")
        self.assertEqual(samples(metrics)[("dynllm_upstream_timeouts_total", (("model", "gone"),))], 1)


class RequestOutcomeTests(SynchronousTestCase):
    """
    L{Metrics.observe} counts requests by model, route and outcome (the
    status sent, or C{disconnected}) and times them.
    """

    def setUp(self) -> None:
        self.metrics = Metrics(FakeManager({"m": ModelCounters()}), 100)  # type: ignore[arg-type]
        self.clock = Clock()

    def request(self) -> Request:
        """
        @return: a real C{twisted.web} request on a dummy channel, observed
            as a request to model C{m} on C{/v1/chat/completions}.
        """
        request = Request(DummyChannel())
        request.method = b"POST"
        request.clientproto = b"HTTP/1.1"
        self.metrics.observe(request, "m", "/v1/chat/completions", self.clock.seconds(), self.clock)
        return request

    def count(self, code: str) -> float:
        """
        @return: the requests counted with C{code}.
        """
        labels = (("code", code), ("model", "m"), ("route", "/v1/chat/completions"))
        return samples(self.metrics).get(("dynllm_requests_total", labels), 0)

    def test_status(self) -> None:
        """
        A finished request is counted under the status it was sent with,
        each status apart.
        """
        for code in (200, 200, 503, 504):
            request = self.request()
            request.setResponseCode(code)
            request.finish()
        self.assertEqual((self.count("200"), self.count("503"), self.count("504")), (2, 1, 1))

    def test_disconnected(self) -> None:
        """
        A request whose connection closed before its response's end is
        counted as C{disconnected}, not under the status it had begun with.
        """
        request = self.request()
        request.setResponseCode(200)
        request.write(b"data: {}\n\n")
        request.connectionLost(Failure(ConnectionLost()))
        self.assertEqual((self.count("disconnected"), self.count("200")), (1, 0))

    def test_duration(self) -> None:
        """
        The time from arrival to the end is observed in seconds, by model
        and route.
        """
        request = self.request()
        self.clock.advance(3)
        request.finish()
        found = samples(self.metrics)
        labels = (("model", "m"), ("route", "/v1/chat/completions"))
        self.assertEqual(found[("dynllm_request_duration_seconds_sum", labels)], 3)
        self.assertEqual(found[("dynllm_request_duration_seconds_bucket", (("le", "2.5"),) + labels)], 0)
        self.assertEqual(found[("dynllm_request_duration_seconds_bucket", (("le", "5.0"),) + labels)], 1)


class ProcessMetricsTests(SynchronousTestCase):
    """
    The daemon's own process is reported under the standard C{process_*}
    names.
    """

    def test_process(self) -> None:
        """
        CPU seconds, resident and virtual memory in bytes, open and
        maximum file descriptors, and the start time are reported for this
        process.
        """
        metrics = Metrics(FakeManager({}), 100)  # type: ignore[arg-type]
        found = samples(metrics)
        for name in ("process_cpu_seconds_total", "process_start_time_seconds", "process_max_fds"):
            self.assertGreater(found[(name, ())], 0)
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        rss = found[("process_resident_memory_bytes", ())]
        self.assertGreater(rss, pages * os.sysconf("SC_PAGE_SIZE") / 2)
        self.assertGreater(found[("process_virtual_memory_bytes", ())], rss)

    def test_openFds(self) -> None:
        """
        C{process_open_fds} counts this process's open descriptors: one
        more file open is one more.
        """
        metrics = Metrics(FakeManager({}), 100)  # type: ignore[arg-type]
        before = samples(metrics)[("process_open_fds", ())]
        with open(__file__):
            self.assertEqual(samples(metrics)[("process_open_fds", ())], before + 1)
