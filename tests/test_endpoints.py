"""
Tests for L{dynllm.endpoints}: the one table of which endpoint serves which
model types on which backend.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from dynllm import endpoints
from dynllm.backends import backendFor
from dynllm.config import BACKEND_MODEL_TYPES

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")


class TableTests(SynchronousTestCase):
    """
    The table is consistent, and everything that says what it says reads
    it.
    """

    def test_pathsUnique(self) -> None:
        """
        No public path belongs to two endpoints.
        """
        paths = [p for e in endpoints.ENDPOINTS for p in e.paths]
        self.assertEqual(len(paths), len(set(paths)))

    def test_knownNames(self) -> None:
        """
        Every endpoint names known model types, backend kinds, API families
        and places for the model.
        """
        for e in endpoints.ENDPOINTS:
            self.assertTrue(set(e.modelTypes) <= set(endpoints.MODEL_TYPES), e.path)
            self.assertTrue(set(e.upstream) <= set(endpoints.BACKEND_KINDS), e.path)
            self.assertIn(e.api, (endpoints.OPENAI, endpoints.ANTHROPIC, endpoints.LLAMACPP, endpoints.KSERVE))
            self.assertIn(e.modelIn, (endpoints.JSON, endpoints.MULTIPART, endpoints.QUERY, endpoints.PATH))

    def test_backendsRead(self) -> None:
        """
        Each backend's model types and upstream paths are the table's.
        """
        for kind in endpoints.BACKEND_KINDS:
            backend = backendFor(kind)
            self.assertEqual(backend.modelTypes, endpoints.modelTypesOf(kind))
            self.assertEqual(BACKEND_MODEL_TYPES[kind], endpoints.modelTypesOf(kind))

    def test_servedBy(self) -> None:
        """
        L{endpoints.servedBy} lists what a model of a type on a backend can
        be sent to.
        """
        self.assertEqual(
            [e.path for e in endpoints.servedBy("transformers", "llm")],
            ["/v1/chat/completions", "/v1/completions", "/v1/responses"],
        )
        self.assertEqual(endpoints.servedBy("llamacpp", "speech"), ())

    def test_readme(self) -> None:
        """
        README.rst shows the table as the code has it.
        """
        with open(README, encoding="utf-8") as f:
            self.assertIn(endpoints.rstTable(), f.read())
