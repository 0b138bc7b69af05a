"""
The real implementations of L{dynllm.interfaces} provide them, so that the
routes, the metrics and embedding programs may be given either the real one
or a fake of L{dynllm.testing}.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dynllm.config import parseConfig
from dynllm.interfaces import IModelManager
from dynllm.scheduler import ModelManager
from dynllm.testing import FakeBackend, FakeProcessReactor, MemoryStateStore


class ModelManagerTests(SynchronousTestCase):
    """
    L{ModelManager} is an L{IModelManager}.
    """

    def test_providesIModelManager(self) -> None:
        """
        L{ModelManager} provides L{IModelManager}: it declares it, and has
        its attributes and methods with compatible signatures.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        open(os.path.join(directory, "m.gguf"), "w").close()
        config = parseConfig(
            {"enabled_backends": ["llamacpp"], "total_vram_mb": 100,
             "models": [{"name": "m", "path": "m.gguf", "backend": "llamacpp", "vram_mb": 10}]},
            directory,
            which=lambda name: "/bin/true",
        )
        backend = FakeBackend()
        manager = ModelManager(
            config=config, reactor=FakeProcessReactor(), http=None, store=MemoryStateStore(),
            backendFor=lambda kind: backend,
        )
        self.assertTrue(verifyObject(IModelManager, manager))
