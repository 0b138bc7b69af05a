"""
Signals to a real daemon (C{twistd -n dynllm}), as service managers send
them: SIGHUP reloads the configuration (with real llama-server backends),
the stopping signals stop it in order with nothing left behind, and the
others are logged and ignored. C{POST /admin/reload} does what SIGHUP does
and answers what changed, or why nothing did.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import yaml
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dynllm.signals import IGNORE, STOP, SignalHandlers
from tests.support import (
    FAKE_BACKEND,
    Daemon,
    checkEnvelope,
    commandLine,
    fakeModel,
    flag,
    llamaServer,
    pidAlive,
    tinyModels,
    waitFor,
)


def llamaModel(name: str, **settings: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": tinyModels()["tiny-llama.gguf"],
        "backend": "llamacpp",
        "vram_mb": 300,
        "context_size": 256,
        **settings,
    }


class ReloadTests(SynchronousTestCase):
    """
    SIGHUP and C{POST /admin/reload} on a daemon with real llama-server
    models.
    """

    def setUp(self) -> None:
        self.daemon = Daemon(
            {
                "total_vram_mb": 1000,
                "enabled_backends": ["llamacpp"],
                "backend": {"llamacpp_binary": llamaServer()},
                "models": [llamaModel("kept"), llamaModel("changed"), llamaModel("removed")],
            }
        ).start()
        self.addCleanup(self.daemon.stop)

    def rewrite(self, **changes: Any) -> None:
        """
        Write the daemon's configuration file again with C{changes}.
        """
        config = dict(self.daemon.config, **changes)
        with open(self.daemon.configPath, "w") as f:
            yaml.safe_dump(config, f)

    def load(self, name: str) -> int:
        status, _, body = self.daemon.post("/admin/models/load", {"model": name}, timeout=60)
        self.assertEqual(status, 200, body)
        pid: int = self.daemon.models()[name]["pid"]
        return pid

    def chat(self, name: str) -> int:
        status, _, body = self.daemon.post(
            "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60,
        )
        return status

    def test_hup(self) -> None:
        """
        After SIGHUP: an unchanged loaded model keeps its process; a
        changed loaded one is restarted with its new settings (a new
        llama-server with the new C{--ctx-size}); a removed one is stopped
        and gone from C{/admin/models} and refused (404); an added one
        serves; the log says what changed.
        """
        keptPid = self.load("kept")
        changedPid = self.load("changed")
        removedPid = self.load("removed")
        self.rewrite(models=[llamaModel("kept"), llamaModel("changed", context_size=512), llamaModel("added")])
        assert self.daemon.process is not None
        self.daemon.process.send_signal(signal.SIGHUP)
        self.assertTrue(waitFor(lambda: "configuration reloaded" in self.daemon.log(), timeout=10), self.daemon.log())
        self.assertTrue(waitFor(lambda: not pidAlive(removedPid) and not pidAlive(changedPid), timeout=15))
        self.assertTrue(waitFor(lambda: self.daemon.models()["changed"]["status"] == "loaded", timeout=60))
        models = self.daemon.models()
        self.assertEqual(sorted(models), ["added", "changed", "kept"])
        self.assertEqual(models["kept"]["pid"], keptPid)
        self.assertEqual(flag(commandLine(models["changed"]["pid"]), "--ctx-size"), "512")
        self.assertEqual(self.chat("removed"), 404)
        self.assertEqual(self.chat("added"), 200)
        self.assertEqual(self.chat("changed"), 200)
        self.assertIn("added: added; removed: removed; changed: changed", self.daemon.log())

    def test_invalid(self) -> None:
        """
        An invalid file keeps the running configuration: after SIGHUP the
        log says why and the daemon serves on; C{POST /admin/reload}
        answers 400 C{invalid_config} with the reason.
        """
        keptPid = self.load("kept")
        with open(self.daemon.configPath, "a") as f:
            f.write("total_vram_mb: lots\n")
        assert self.daemon.process is not None
        self.daemon.process.send_signal(signal.SIGHUP)
        self.assertTrue(waitFor(lambda: "was not reloaded" in self.daemon.log(), timeout=10))
        self.assertIn("total_vram_mb", self.daemon.log())
        status, _, body = self.daemon.post("/admin/reload", {})
        error = checkEnvelope(self, status, body, 400, "invalid_config")
        self.assertIn("total_vram_mb", error["message"])
        self.assertEqual(self.daemon.models()["kept"]["pid"], keptPid)
        self.assertEqual(self.chat("kept"), 200)

    def test_restartRequired(self) -> None:
        """
        A new port is refused as a whole, saying a restart is needed; the
        rest of the file (a removed model) is not applied either.
        """
        server = dict(self.daemon.config["server"], port=self.daemon.port + 1)
        self.rewrite(server=server, models=[llamaModel("kept")])
        status, _, body = self.daemon.post("/admin/reload", {})
        error = checkEnvelope(self, status, body, 400, "restart_required")
        self.assertIn("server.port", error["message"])
        self.assertEqual(sorted(self.daemon.models()), ["changed", "kept", "removed"])

    def test_adminReload(self) -> None:
        """
        C{POST /admin/reload} answers the changes.
        """
        self.rewrite(models=[llamaModel("kept"), llamaModel("changed", context_size=512)], total_vram_mb=2000)
        status, _, body = self.daemon.post("/admin/reload", {})
        self.assertEqual(status, 200, body)
        self.assertEqual(
            json.loads(body)["changes"],
            {"added": [], "removed": ["removed"], "changed": ["changed"], "settings": ["total_vram_mb"],
             "at_next_start": []},
        )


class StopSignalTests(SynchronousTestCase):
    """
    Every signal that ends a process by default, as a service manager may
    send it, leaves no backend behind.
    """

    def daemonWithBackend(self, shutdownTimeout: float = 1) -> tuple[Daemon, int]:
        daemon = Daemon(
            {
                "enabled_backends": ["llamacpp"],
                "backend": {"llamacpp_binary": FAKE_BACKEND},
                "shutdown_timeout_seconds": shutdownTimeout,
                "models": [fakeModel("m")],
            }
        ).start()
        self.addCleanup(daemon.stop)
        status, _, body = daemon.post("/admin/models/load", {"model": "m"})
        self.assertEqual(status, 200, body)
        return daemon, daemon.models()["m"]["pid"]

    def test_stopping(self) -> None:
        """
        SIGTERM, SIGINT and each of L{STOP}: the daemon exits, its backend
        was stopped first, and the log says which signal.
        """
        for number in (signal.SIGTERM, signal.SIGINT, *STOP):
            daemon, pid = self.daemonWithBackend()
            assert daemon.process is not None
            daemon.process.send_signal(number)
            daemon.process.wait(30)
            self.assertFalse(pidAlive(pid), signal.Signals(number).name)
            self.assertIn("stopping m: shutdown", daemon.log(), signal.Signals(number).name)

    def test_ignored(self) -> None:
        """
        Each of L{IGNORE} is logged; the daemon and its backend run on.
        """
        daemon, pid = self.daemonWithBackend()
        assert daemon.process is not None
        for number in IGNORE:
            daemon.process.send_signal(number)
            name = signal.Signals(number).name
            self.assertTrue(waitFor(lambda: f"{name} ignored" in daemon.log(), timeout=10), name)
        self.assertEqual(daemon.get("/health")[0], 200)
        self.assertTrue(pidAlive(pid))
        self.assertIsNone(daemon.process.poll())

    def test_secondStopSignal(self) -> None:
        """
        A second stopping signal while the daemon stops (here while a
        request drains) is logged, not an error; so is a SIGHUP then.
        """
        for first, second in ((signal.SIGTERM, signal.SIGTERM), (signal.SIGQUIT, signal.SIGINT)):
            daemon, pid = self.daemonWithBackend(shutdownTimeout=3)
            assert daemon.process is not None
            stalled = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "fake_stall": "headers"}
            threading.Thread(target=lambda: daemon.post("/v1/chat/completions", stalled, timeout=30), daemon=True).start()
            self.assertTrue(waitFor(lambda: daemon.models()["m"]["active_requests"] == 1, timeout=10))
            daemon.process.send_signal(first)
            self.assertTrue(waitFor(lambda: "stopping" in daemon.log().lower(), timeout=10))
            daemon.process.send_signal(second)
            daemon.process.send_signal(signal.SIGHUP)
            daemon.process.wait(30)
            self.assertFalse(pidAlive(pid))
            log = daemon.log()
            self.assertIn("already stopping", log)
            self.assertNotIn("Traceback", log)
            self.assertNotIn("ReactorNotRunning", log)


class EarlyInstallTests(SynchronousTestCase):
    """
    L{SignalHandlers} installs its handlers of the signals the reactor
    leaves alone when the service starts, before the reactor runs.
    """

    def test_hupBeforeReactorRuns(self) -> None:
        """
        Right after C{startService}, before the reactor has run anything,
        SIGHUP is already handled (not deadly): it asks for a reload, which
        waits for the reactor.
        """
        saved = {number: signal.getsignal(number) for number in (signal.SIGHUP, signal.SIGUSR1, *STOP, *IGNORE)}
        for number, handler in saved.items():
            self.addCleanup(signal.signal, number, handler)

        class Reactor(Clock):
            def __init__(self) -> None:
                super().__init__()
                self.fromThread: list[Any] = []

            def callFromThread(self, f: Any, *args: Any) -> None:
                self.fromThread.append(f)

        reactor = Reactor()
        reloads: list[None] = []
        handlers = SignalHandlers(reactor, lambda: reloads.append(None))
        handlers.startService()
        self.addCleanup(handlers.stopService)
        hup = signal.getsignal(signal.SIGHUP)
        self.assertTrue(callable(hup))
        assert callable(hup)
        hup(signal.SIGHUP, None)
        self.assertEqual(reactor.fromThread, [handlers.reloadNow])
        self.assertEqual(reloads, [])
