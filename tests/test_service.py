"""
The public API for Twisted programs: L{dynllm.makeService} and leases from
C{service.manager.acquire}, with a real llama-server.
"""

from __future__ import annotations

import os
import subprocess
import sys

import treq
import yaml
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

import dynllm
from tests.support import ROOT, llamaServer, pidAlive, tinyModels


def writeConfig(directory):
    """
    @return: the path of a configuration with one tiny chat model.
    """
    path = os.path.join(directory, "dynllm.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(
            {
                "enabled_backends": ["llamacpp"],
                "total_vram_mb": 1000,
                "db_path": os.path.join(directory, "state.db"),
                "backend": {"llamacpp_binary": llamaServer(), "port_range_start": 47100, "port_range_end": 47150},
                "models": [{"name": "tiny-chat", "path": tinyModels()["tiny-llama.gguf"], "backend": "llamacpp",
                            "vram_mb": 100, "context_size": 512}],
            },
            f,
        )
    return path


class PublicAPITests(TestCase):
    """
    What a Twisted program that embeds dynllm relies on.
    """

    timeout = 60

    def test_exports(self):
        """
        The documented names are importable from C{dynllm}.
        """
        for name in ("makeService", "loadConfig", "Lease", "ModelManager", "IBackend", "APIError", "__version__"):
            self.assertIn(name, dynllm.__all__)
            self.assertTrue(hasattr(dynllm, name))

    async def test_lease(self):
        """
        C{makeService(config, listen=False)} starts no HTTP server;
        C{manager.acquire(name)} loads the model and gives a lease whose
        C{baseURL} answers; the model stays loaded with the lease counted
        until it is released; stopping the service stops the backend.
        """
        config = dynllm.loadConfig(writeConfig(_tempdir(self)))
        service = dynllm.makeService(config, reactor, listen=False, persist=False)
        self.assertEqual([s.name for s in service], ["models", "idle-reaper"])
        service.startService()
        lease = await service.manager.acquire("tiny-chat")
        (entry,) = service.manager.models()
        self.assertEqual((entry["status"], entry["active_requests"]), ("loaded", 1))
        response = await treq.get(lease.baseURL + "/health", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
        lease.release()
        self.assertEqual(service.manager.models()[0]["active_requests"], 0)
        pid = entry["pid"]
        await service.stopService()
        self.assertFalse(pidAlive(pid))

    def test_example(self):
        """
        C{examples/lease.py}, the README's example, runs and prints the
        model's reply.
        """
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "lease.py"), writeConfig(_tempdir(self)), "tiny-chat",
             "Hello!"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("tiny-chat on http://127.0.0.1:", result.stdout)


def _tempdir(case):
    path = case.mktemp()
    os.makedirs(path)
    return path
