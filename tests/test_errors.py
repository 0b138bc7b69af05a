"""
Tests for the texts of L{dynllm.errors} that clients see: no absolute
paths, no backend output, no Python reprs.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestTransmissionFailed

from dynllm import errors
from dynllm.exceptions import LoadFailed


class WithoutPathsTests(SynchronousTestCase):
    """
    L{errors.withoutPaths} cuts absolute paths to their last part.
    """

    def test_paths(self) -> None:
        """
        An absolute path, quoted or not, becomes its file name.
        """
        self.assertEqual(
            errors.withoutPaths(
                "cannot start model 'x': [Errno 2] No such file or directory: '/opt/llama.cpp/bin/llama-server'"
            ),
            "cannot start model 'x': [Errno 2] No such file or directory: 'llama-server'",
        )
        self.assertEqual(errors.withoutPaths("failed to open /home/me/models/q4.gguf"), "failed to open q4.gguf")
        self.assertEqual(errors.withoutPaths("path=/tmp/a/b.gguf,"), "path=b.gguf,")

    def test_notPaths(self) -> None:
        """
        URLs, relative paths and model names with slashes stay as they are.
        """
        for text in ("see http://127.0.0.1:8000/v1/models", "model org/name", "at ./rel/p or ~/x", "1/2 done"):
            self.assertEqual(errors.withoutPaths(text), text)


class LoadFailedTests(SynchronousTestCase):
    """
    The 502 for a failed load says what happened and where the output is,
    without the output.
    """

    def test_noOutput(self) -> None:
        """
        The backend's output lines, kept in L{LoadFailed} for the daemon's
        log, are not in the client's message; the admin route that has
        them is named.
        """
        error = LoadFailed("m", "backend for model 'm' exited with code 1 while loading",
                           ("error: /srv/models/m.gguf: bad magic",))
        api = errors.fromScheduler(error)
        self.assertEqual((api.status, api.code), (502, "backend_error"))
        self.assertEqual(
            api.message,
            "backend for model 'm' exited with code 1 while loading;"
            " its backend's output is at /admin/models/m/logs and in dynllm's log",
        )
        self.assertIn("/srv/models/m.gguf", str(error))

    def test_reasonWithoutPaths(self) -> None:
        """
        A reason that names a file (a program that could not be spawned)
        names only its last part.
        """
        error = LoadFailed("m", "cannot start model 'm': [Errno 13] Permission denied: '/opt/ovms/bin/ovms'")
        self.assertTrue(errors.fromScheduler(error).message.startswith(
            "cannot start model 'm': [Errno 13] Permission denied: 'ovms';"))

    def test_modelFailed(self) -> None:
        """
        The 503 for a model whose last load failed gives the reason of its
        C{last_error} without its output or paths.
        """
        lastError = str(LoadFailed("m", "backend for model 'm' exited with code 1 while loading",
                                   ("loading /srv/m.gguf", "bad magic")))
        api = errors.modelFailed("m", lastError)
        self.assertEqual((api.status, api.code), (503, "model_failed"))
        self.assertEqual(
            api.message,
            "model 'm' failed to load: backend for model 'm' exited with code 1 while loading;"
            " its backend's output is at /admin/models/m/logs and in dynllm's log",
        )
        self.assertEqual(errors.modelFailed("m", None).message,
                         "model 'm' failed to load; its backend's output is at /admin/models/m/logs and in dynllm's log")


class DescribeErrorTests(SynchronousTestCase):
    """
    L{errors.describeError} gives a sentence, never a repr.
    """

    def test_wrapped(self) -> None:
        """
        The failures a web client error wraps are given by their messages.
        """
        error = RequestTransmissionFailed([Failure(ConnectionDone())])
        self.assertNotIn("<", str(errors.describeError(error)))
        self.assertEqual(errors.describeError(error), "Connection was closed cleanly.")

    def test_plain(self) -> None:
        """
        Another error is its own text, or its class name if it has none.
        """
        self.assertEqual(errors.describeError(ConnectionRefusedError("111: Connection refused")),
                         "Connection was refused by other side: 111: Connection refused.")
        self.assertEqual(errors.describeError(RuntimeError()), "RuntimeError")
