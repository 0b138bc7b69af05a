"""
Integration tests: backends die with a real daemon (C{twistd dynllm}) killed
by SIGKILL, before any restart (L{dynllm._launch}); the fake backend and the
real llama-server.
"""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from dynllm.runner import portIsFree
from tests.support import FAKE_BACKEND, Daemon, fakeModel, llamaServer, pidAlive, tinyModels, waitFor
from tests.test_process import groupMembers


class Kill9Tests(SynchronousTestCase):
    """
    After C{kill -9} of the daemon nothing of its backends is left, with no
    restart.
    """

    def assertAllGone(self, daemon: Daemon, seconds: float = 3.0) -> None:
        """
        Load every model of C{daemon}, kill the daemon with SIGKILL, and
        check that within C{seconds} no process of any backend's group is
        left and every backend port is free.
        """
        for name in [m["name"] for m in daemon.config["models"]]:
            status, _, body = daemon.post("/admin/models/load", {"model": name})
            self.assertEqual(status, 200, body)
        backends = {n: (m["pid"], m["port"]) for n, m in daemon.models().items()}
        self.assertTrue(all(pid for pid, _ in backends.values()), backends)
        daemon.kill9()
        began = time.monotonic()
        for name, (pid, port) in backends.items():
            self.assertTrue(
                waitFor(lambda: not groupMembers(pid), timeout=seconds), f"{name}: {groupMembers(pid)} left"
            )
            self.assertTrue(waitFor(lambda: portIsFree(port), timeout=1), f"{name}: port {port} still taken")
        self.assertLess(time.monotonic() - began, seconds)

    def test_fakeBackends(self) -> None:
        """
        Two fake backends, one of which has forked a child of its own, are
        gone with all their processes within 3 s of the daemon's SIGKILL.
        """
        daemon = Daemon(
            {
                "total_vram_mb": 1000,
                "enabled_backends": ["llamacpp"],
                "backend": {"llamacpp_binary": FAKE_BACKEND},
                "models": [fakeModel("plain"), fakeModel("forks", fake_child=1)],
            }
        ).start()
        self.addCleanup(daemon.stop)
        self.assertAllGone(daemon)

    def test_llamaServer(self) -> None:
        """
        Two real llama-servers are gone within 3 s of the daemon's SIGKILL.
        """
        models = tinyModels()
        daemon = Daemon(
            {
                "total_vram_mb": 1000,
                "enabled_backends": ["llamacpp"],
                "backend": {"llamacpp_binary": llamaServer()},
                "models": [
                    {"name": "tiny-chat", "path": models["tiny-llama.gguf"], "backend": "llamacpp",
                     "vram_mb": 400, "context_size": 512},
                    {"name": "tiny-embed", "path": models["tiny-embed.gguf"], "backend": "llamacpp",
                     "model_type": "embedding", "vram_mb": 300, "context_size": 512},
                ],
            }
        ).start()
        self.addCleanup(daemon.stop)
        self.assertAllGone(daemon)

    def test_restartAfterwards(self) -> None:
        """
        A daemon started after the SIGKILL on the same database finds
        nothing to stop, and serves the models again.
        """
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "models": [fakeModel("plain")],
        }
        first = Daemon(config).start()
        self.addCleanup(first.stop)
        self.assertAllGone(first)
        second = Daemon(first.config, directory=first.directory)
        second.port, second.url = first.port, first.url
        second.start()
        self.addCleanup(second.stop)
        self.assertNotIn("left by a previous run", second.log())
        self.assertEqual(second.post("/admin/models/load", {"model": "plain"})[0], 200)
        self.assertTrue(pidAlive(second.models()["plain"]["pid"]))
