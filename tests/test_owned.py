"""
Tests for L{dynllm.owned}: the table of launch settings dynllm owns, and how
an argument or a variable is matched against it.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dynllm.backends import backendFor
from dynllm.config import BACKEND_KINDS
from dynllm.owned import LLAMACPP, OPENVINO, OWNED, TRANSFORMERS


class OwnedTests(SynchronousTestCase):
    """
    L{dynllm.owned.OwnedSettings} finds the owned setting an argument or a
    variable sets.
    """

    def test_everyKindDeclared(self) -> None:
        """
        Every backend kind has a table, and its backend declares that table
        as its C{owned} settings.
        """
        self.assertEqual(set(OWNED), set(BACKEND_KINDS))
        for kind in BACKEND_KINDS:
            self.assertIs(backendFor(kind).owned, OWNED[kind])

    def test_flagForms(self) -> None:
        """
        An option is found as it is and in its C{--flag=value} form; the
        result names the option without the value.
        """
        for arg in ("--port", "--port=8080"):
            found = LLAMACPP.flag(arg)
            assert found is not None
            self.assertEqual(found[0], "--port")
            self.assertEqual(found[1].what, "the listen port")

    def test_llamaUnderscores(self) -> None:
        """
        llama-server reads C{_} as C{-} in long options
        (C{common/arg.cpp}), so C{--api_key} is C{--api-key}; OVMS does
        not.
        """
        found = LLAMACPP.flag("--api_key")
        assert found is not None
        self.assertEqual(found[0], "--api-key")
        self.assertIsNone(OPENVINO.flag("--rest-port"))

    def test_valuesAndOtherOptions(self) -> None:
        """
        Values and options that only share a prefix with an owned one are
        not owned.
        """
        for arg in ("9000", "x=--port", "--portable", "--port-x", "-mg", "--model-draft"):
            self.assertIsNone(LLAMACPP.flag(arg), arg)
        self.assertIsNone(TRANSFORMERS.flag("--device"))

    def test_variables(self) -> None:
        """
        Variables are found by their exact name, and each table lists all
        of its variables.
        """
        variable = LLAMACPP.variable("LLAMA_API_KEY")
        assert variable is not None
        self.assertEqual(variable.what, "the API key")
        self.assertIsNone(LLAMACPP.variable("llama_api_key"))
        self.assertIn("LLAMA_ARG_PORT", LLAMACPP.variables)
        self.assertEqual(set(OPENVINO.variables), {"API_KEY", "OVMS_MODEL_REPOSITORY_PATH"})
        self.assertEqual(TRANSFORMERS.variables, ())
