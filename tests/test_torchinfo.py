"""
Tests for L{dynllm.torchinfo}: the start-up line listing torch's execution
backends, found without importing torch in the daemon.
"""

from __future__ import annotations

import os
import stat
import sys

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from dynllm import torchinfo
from dynllm.config import parseConfig
from dynllm.logs import logger


def writeScript(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


class InterpreterTests(TestCase):
    """
    L{torchinfo.scriptInterpreter} and L{torchinfo.interpreters} find the
    Python that would run the models.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_shebang(self) -> None:
        """
        A console script's interpreter is read from its C{#!} line, also
        through C{/usr/bin/env}; a shell script has none.
        """
        direct = writeScript(os.path.join(self.dir, "a"), f"#!{sys.executable}\nprint(1)\n")
        self.assertEqual(torchinfo.scriptInterpreter(direct), sys.executable)
        viaEnv = writeScript(os.path.join(self.dir, "b"), "#!/usr/bin/env -S python3\n")
        self.assertTrue(os.path.basename(torchinfo.scriptInterpreter(viaEnv) or "").startswith("python3"))
        shell = writeScript(os.path.join(self.dir, "c"), "#!/bin/sh\nexec true\n")
        self.assertIsNone(torchinfo.scriptInterpreter(shell))
        self.assertIsNone(torchinfo.scriptInterpreter(os.path.join(self.dir, "absent")))

    def test_transformersPython(self) -> None:
        """
        With a transformers model, the transformers program's Python is
        asked; dynllm's own only when torch is installed beside it.
        """
        script = writeScript(os.path.join(self.dir, "transformers"), f"#!{sys.executable}\n")
        os.makedirs(os.path.join(self.dir, "hf"))
        config = parseConfig(
            {
                "enabled_backends": ["transformers"],
                "backend": {"transformers_binary": script},
                "models": [{"name": "m", "path": "hf", "backend": "transformers", "vram_mb": 1}],
            },
            self.dir,
        )
        self.assertEqual(torchinfo.interpreters(config, ownHasTorch=False), [sys.executable])
        empty = parseConfig({}, self.dir)
        self.assertEqual(torchinfo.interpreters(empty, ownHasTorch=False), [])
        self.assertEqual(torchinfo.interpreters(empty, ownHasTorch=True), [sys.executable])


class ProbeTests(TestCase):
    """
    L{torchinfo.torchBackends} runs the probe in a child process.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def fakeTorch(self, body: str) -> str:
        """
        @return: a directory with a C{torch} package whose C{__init__} is
            C{body}, to put on C{PYTHONPATH}.
        """
        package = os.path.join(self.dir, "torch")
        os.makedirs(package, exist_ok=True)
        with open(os.path.join(package, "__init__.py"), "w") as f:
            f.write(body)
        return self.dir

    async def test_backendsListed(self) -> None:
        """
        The available execution backends are listed, CPU first.
        """
        path = self.fakeTorch(
            "__version__ = '9.9.9+fake'\n"
            "class _Yes:\n    @staticmethod\n    def is_available(): return True\n"
            "class _No:\n    @staticmethod\n    def is_available(): return False\n"
            "cuda = _Yes()\nxpu = _No()\nclass backends:\n    mps = _No()\n"
        )
        self.patch(os, "environ", dict(os.environ, PYTHONPATH=path))
        info = await torchinfo.torchBackends(reactor, sys.executable)
        self.assertEqual(info, {"version": "9.9.9+fake", "backends": ["cpu", "cuda"]})

    async def test_noTorch(self) -> None:
        """
        A Python without torch answers C{None}.
        """
        package = self.fakeTorch("raise ImportError('no torch here')\n")
        self.patch(os, "environ", dict(os.environ, PYTHONPATH=package))
        self.assertIsNone(await torchinfo.torchBackends(reactor, sys.executable))

    async def test_brokenPython(self) -> None:
        """
        An interpreter that fails says so, with its last output.
        """
        broken = writeScript(os.path.join(self.dir, "python"), "#!/bin/sh\necho oops >&2\nexit 3\n")
        with self.assertRaises(RuntimeError) as caught:
            await torchinfo.torchBackends(reactor, broken)
        self.assertIn("exited with code 3", str(caught.exception))
        self.assertIn("oops", str(caught.exception))

    async def test_timeout(self) -> None:
        """
        A probe that hangs is stopped after the timeout.
        """
        hang = writeScript(os.path.join(self.dir, "python"), "#!/bin/sh\nexec sleep 30\n")
        with self.assertRaises(RuntimeError):
            await torchinfo.torchBackends(reactor, hang, timeout=0.2)

    async def test_logged(self) -> None:
        """
        The start-up line names the version and the backends.
        """
        path = self.fakeTorch("__version__ = '1.0'\n")
        self.patch(os, "environ", dict(os.environ, PYTHONPATH=path))
        events: list[dict] = []
        self.patch(torchinfo, "log", logger("test"))
        self.patch(torchinfo.log, "info", lambda fmt, **kw: events.append(dict(kw, fmt=fmt)))
        self.patch(torchinfo, "interpreters", lambda config: [sys.executable])
        await torchinfo.logTorchBackends(reactor, parseConfig({}, self.dir))
        self.assertEqual([(e["version"], e["backends"]) for e in events], [("1.0", ["cpu"])])
