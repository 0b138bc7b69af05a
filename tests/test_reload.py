"""
Tests for configuration reloads: L{dynllm.reload.compare} on plain values,
L{dynllm.scheduler.ModelManager.reconfigure} on the fake process reactor,
and L{dynllm.service.DynLLMService.reload} with C{POST /admin/reload}.
(C{SIGHUP} against a real daemon and llama-server: L{tests.test_signals}.)
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from dynllm.config import ConfigError
from dynllm.exceptions import ModelUnloaded, UnknownModel
from dynllm.reload import RestartRequired, compare, refusalLines
from dynllm.service import makeService
from tests.test_scheduler import ManagerTestsMixin


class CompareTests(ManagerTestsMixin, SynchronousTestCase):
    """
    L{compare} names what a new configuration changes.
    """

    def test_models(self) -> None:
        """
        Models are told apart by name: added, removed, and changed in any
        setting.
        """
        old = self.makeConfig([{"name": "a", "vram_mb": 1}, {"name": "b", "vram_mb": 1}, {"name": "c", "vram_mb": 1}])
        new = self.makeConfig([{"name": "a", "vram_mb": 1}, {"name": "b", "vram_mb": 2}, {"name": "d", "vram_mb": 1}])
        changes = compare(old, new)
        self.assertEqual((changes.added, changes.removed, changes.changed), (("d",), ("c",), ("b",)))

    def test_settings(self) -> None:
        """
        Global settings are named by their dotted key, nested ones too;
        none of them waits for the next start.
        """
        old = self.makeConfig([])
        new = self.makeConfig([], total_vram_mb=2000, server={"api_keys": ["k"]}, log_format="json")
        changes = compare(old, new)
        self.assertEqual(sorted(changes.settings), ["log_format", "server.api_keys", "total_vram_mb"])
        self.assertEqual(changes.atStart, ())
        self.assertTrue(changes)

    def test_nothing(self) -> None:
        """
        The same configuration read again changes nothing.
        """
        changes = compare(self.makeConfig([{"name": "a", "vram_mb": 1}]), self.makeConfig([{"name": "a", "vram_mb": 1}]))
        self.assertFalse(changes)
        self.assertEqual(changes.describe(), "no changes")

    def test_restartRequired(self) -> None:
        """
        A new listening address or state database refuses the reload,
        naming each key with its old and new values.
        """
        old = self.makeConfig([], server={"port": 8000})
        new = self.makeConfig([], server={"port": 8001, "host": "0.0.0.0"}, db_path="/tmp/other.db")
        error = self.assertRaises(RestartRequired, compare, old, new)
        self.assertEqual(sorted(error.keys), ["db_path", "server.host", "server.port"])
        self.assertIn("server.port from 8000 to 8001", str(error))
        self.assertIn("restart dynllm", str(error))


class ReconfigureTests(ManagerTestsMixin, SynchronousTestCase):
    """
    L{ModelManager.reconfigure} applies a reload to running models.
    """

    def setUp(self) -> None:
        self.models = [{"name": "a", "vram_mb": 400}, {"name": "b", "vram_mb": 400}]
        self.makeManager(self.models)

    def reconfigure(self, models: list[dict[str, Any]], **settings: Any) -> None:
        self.config = self.makeConfig(models, **settings)
        self.manager.reconfigure(self.config)

    def test_added(self) -> None:
        """
        An added model can be requested at once.
        """
        self.reconfigure([*self.models, {"name": "c", "vram_mb": 100}])
        self.loadedLease("c").release()
        self.assertEqual(self.status("c"), "loaded")

    def test_removedIdle(self) -> None:
        """
        A removed idle model is stopped (cause C{removed}), then forgotten;
        a request for it is refused as for an unknown model at once.
        """
        self.loadIdle("b")
        self.reconfigure(self.models[:1])
        self.failureResultOf(self.manager.acquire("b"), UnknownModel)
        self.assertEqual(self.process("b").signals, ["TERM"])
        self.process("b").exit()
        self.assertEqual([m["name"] for m in self.manager.models()], ["a"])

    def test_removedBusy(self) -> None:
        """
        A removed busy model keeps serving its requests in flight, fails
        those waiting with L{ModelUnloaded}, and is stopped once idle.
        """
        lease = self.loadedLease("b")
        self.reconfigure(self.models[:1])
        self.assertEqual(self.process("b").signals, [])
        self.assertFalse(lease.released)
        lease.release()
        self.assertEqual(self.process("b").signals, ["TERM"])
        self.assertEqual(self.manager.counters("b").unloads, {"removed": 1})

    def test_removedWaiters(self) -> None:
        """
        Requests waiting for a removed model fail with L{ModelUnloaded}
        (cause C{removed}).
        """
        d = self.manager.acquire("b")
        self.reconfigure(self.models[:1])
        error = self.failureResultOf(d, ModelUnloaded).value
        self.assertEqual(error.cause, "removed")

    def test_changedUnloaded(self) -> None:
        """
        A changed model without a process takes its new settings at once.
        """
        self.reconfigure([{"name": "a", "vram_mb": 300}, self.models[1]])
        self.assertEqual(self.describe("a")["vram_mb"], 300)
        self.loadedLease("a")
        self.assertEqual(self.manager.memoryInUse(), 300)

    def test_changedIdle(self) -> None:
        """
        A changed model that is loaded and idle is stopped (cause
        C{reconfigured}) and loaded again with its new settings.
        """
        self.loadIdle("a")
        self.reconfigure([{"name": "a", "vram_mb": 300}, self.models[1]])
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual(self.describe("a")["vram_mb"], 400)
        self.process("a").exit()
        self.assertEqual(len(self.spawnedFor("a")), 2)
        self.assertEqual(self.describe("a")["vram_mb"], 300)
        self.makeReady("a")
        self.assertEqual(self.status("a"), "loaded")
        self.assertEqual(self.manager.counters("a").unloads, {"reconfigured": 1})

    def test_changedBusy(self) -> None:
        """
        A changed busy model goes on serving with its old run, new requests
        included, and is restarted with its new settings once idle.
        """
        first = self.loadedLease("a")
        self.reconfigure([{"name": "a", "vram_mb": 300}, self.models[1]])
        second = self.loadedLease("a")
        self.assertEqual(len(self.spawnedFor("a")), 1)
        first.release()
        self.assertEqual(self.process("a").signals, [])
        second.release()
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual(self.describe("a")["vram_mb"], 400)
        self.process("a").exit()
        self.assertEqual(self.describe("a")["vram_mb"], 300)
        self.assertEqual(len(self.spawnedFor("a")), 2)

    def test_budget(self) -> None:
        """
        A new budget applies to the next plan: two models that did not fit
        together do after it grew.
        """
        self.reconfigure(self.models, total_vram_mb=500)
        self.loadIdle("a")
        d = self.manager.acquire("b")
        self.assertEqual(self.status("a"), "unloading")
        self.process("a").exit()
        self.makeReady("b")
        self.successResultOf(d)
        self.reconfigure(self.models, total_vram_mb=1000)
        self.loadedLease("a")
        self.assertEqual((self.status("a"), self.status("b")), ("loaded", "loaded"))

    def test_budgetShrinks(self) -> None:
        """
        A smaller budget stops idle models until what is held fits (here
        one of two is enough; busy ones are left to finish).
        """
        self.loadIdle("a")
        busy = self.loadedLease("b")
        self.reconfigure(self.models, total_vram_mb=500)
        self.assertEqual(self.process("a").signals, ["TERM"])
        self.assertEqual(self.process("b").signals, [])
        self.process("a").exit()
        self.assertEqual(self.manager.memoryInUse(), 400)
        busy.release()
        self.assertEqual(self.process("b").signals, [])

    def test_budgetShrinksBusy(self) -> None:
        """
        When every model is busy, a smaller budget is reached as they
        become idle.
        """
        first, second = self.loadedLease("a"), self.loadedLease("b")
        self.reconfigure(self.models, total_vram_mb=500)
        self.assertEqual((self.process("a").signals, self.process("b").signals), ([], []))
        first.release()
        self.assertEqual(self.process("a").signals, ["TERM"])
        second.release()
        self.assertEqual(self.process("b").signals, [])

    def test_preload(self) -> None:
        """
        A model newly in C{preload_models} is loaded.
        """
        self.reconfigure(self.models, preload_models=["b"])
        self.assertEqual(len(self.spawnedFor("b")), 1)


class ServiceReloadTests(SynchronousTestCase):
    """
    L{DynLLMService.reload} reads the file again and applies it everywhere.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.model = os.path.join(self.directory, "m.gguf")
        open(self.model, "w").close()
        self.path = os.path.join(self.directory, "dynllm.yaml")
        self.write({})
        from dynllm.config import loadConfig

        self.service = makeService(loadConfig(self.path, lambda name: "/bin/true"), listen=False, persist=False)

    def write(self, settings: dict[str, Any]) -> None:
        raw = {"models": [{"name": "m", "path": self.model, "backend": "llamacpp", "vram_mb": 1}], **settings}
        with open(self.path, "w") as f:
            yaml.safe_dump(raw, f)

    def test_keysAtOnce(self) -> None:
        """
        New API keys reach the routes at once.
        """
        self.write({"server": {"api_keys": ["new-key"]}})
        changes = self.service.reload(self.load())
        self.assertEqual(changes.settings, ("server.api_keys",))
        self.assertEqual(self.service.routes.config.server.api_keys, ("new-key",))
        self.assertIs(self.service.manager.config, self.service.config)

    def load(self) -> Any:
        from dynllm.config import loadConfig

        return loadConfig(self.path, lambda name: "/bin/true")

    def test_invalidKeepsRunning(self) -> None:
        """
        A file that does not validate changes nothing: L{ConfigError}.
        """
        before = self.service.config
        with open(self.path, "w") as f:
            f.write("total_vram_mb: lots\n")
        self.assertRaises(ConfigError, self.service.reload)
        self.assertIs(self.service.config, before)
        self.assertIs(self.service.routes.config, before)

    def test_automaticConnections(self) -> None:
        """
        L{siteSettings}, what the site is made with and a reload sets: without
        C{server.max_connections}, the cap is the automatic one, at
        start and after a reload that removes a set value.
        """
        from dynllm.connections import autoMaxConnections
        from dynllm.service import siteSettings

        self.write({"server": {"max_connections": 7, "request_timeout_seconds": 5}})
        settings = siteSettings(self.load())
        self.assertEqual((settings["maxConnections"], settings["requestTimeout"]), (7, 5))
        self.write({})
        self.assertEqual(siteSettings(self.load())["maxConnections"], autoMaxConnections())


class RefusalLinesTests(SynchronousTestCase):
    """
    L{refusalLines} logs a refused reload one line per event.
    """

    def test_oneProblem(self) -> None:
        """
        One problem: one line.
        """
        self.assertEqual(
            refusalLines(ConfigError("total_vram_mb must be 0 or more", source="d.yaml")),
            ["the configuration was not reloaded: d.yaml: total_vram_mb must be 0 or more"],
        )

    def test_problems(self) -> None:
        """
        Several problems: a line counting them, then one each.
        """
        lines = refusalLines(ConfigError("a is wrong", "b is wrong", source="d.yaml"))
        self.assertEqual(
            lines, ["the configuration was not reloaded: d.yaml has 2 problems:", "  a is wrong", "  b is wrong"]
        )

