"""
The Prometheus metrics of L{dynllm.metrics}: model state read from a real
L{ModelManager} on a fake reactor, and request counts from the routes.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from dynllm.config import parseConfig
from dynllm.metrics import Metrics
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
        The budget, the memory in use, each model's state (one series per
        state), and its requests in flight are reported.
        """
        lease = self.load("a")
        found = samples(self.metrics)
        self.assertEqual(found[("dynllm_vram_total_mb", ())], 1000)
        self.assertEqual(found[("dynllm_vram_used_mb", ())], 600)
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
