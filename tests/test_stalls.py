"""
Stalled backends end to end (issue 9): a real daemon (C{twistd -n dynllm})
in front of the fake llama-server of C{tests/fakebackend.py}, told per
request to stall (C{"fake_stall"} in the body) before its headers, in the
middle of a plain answer or of a stream, or frozen with SIGSTOP.

Each stall ends after C{backend_idle_timeout_seconds} (1 s here): 504
C{upstream_timeout} in the envelope before the headers, a cut response
after them; the request no longer counts as active, the timeout is counted
in C{/metrics}, and the model can be unloaded. A forced unload
(C{"force": true}) ends requests in flight with 503 C{model_unloaded}.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests import support
from tests.support import FAKE_BACKEND, Daemon, checkEnvelope, fakeModel, pidAlive, waitFor

#: The daemon's backend_idle_timeout_seconds.
IDLE_TIMEOUT = 1.0

#: How long a stalled request may take to be ended, on a loaded machine.
BOUND = IDLE_TIMEOUT + 6.0


def chatBody(stall: str | None = None, stream: bool = False, model: str = "m") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if stall is not None:
        body["fake_stall"] = stall
    return body


def rawPost(daemon: Daemon, body: dict[str, Any], timeout: float = 30) -> bytes:
    """
    @return: all that C{/v1/chat/completions} answers C{body} (L{support.rawPost}).
    """
    return support.rawPost(daemon.port, "/v1/chat/completions", body, timeout)


class StallTests(SynchronousTestCase):
    """
    A backend that stalls is cut off after C{backend_idle_timeout_seconds}.
    """

    def setUp(self) -> None:
        self.daemon = Daemon(
            {
                "total_vram_mb": 1000,
                "enabled_backends": ["llamacpp"],
                "backend": {"llamacpp_binary": FAKE_BACKEND},
                "backend_idle_timeout_seconds": IDLE_TIMEOUT,
                "server": {"metrics_public": True},
                "models": [
                    fakeModel("m"),
                    dict(fakeModel("patient"), backend_idle_timeout_seconds=-1),
                    fakeModel("slow", fake_load_delay=1.5),
                ],
            }
        ).start()
        self.addCleanup(self.daemon.stop)

    def idle(self, name: str = "m") -> bool:
        return self.daemon.models()[name]["active_requests"] == 0

    def timeouts(self) -> float:
        status, _, body = self.daemon.get("/metrics")
        self.assertEqual(status, 200)
        for line in body.decode().splitlines():
            if line.startswith('dynllm_upstream_timeouts_total{model="m"}'):
                return float(line.split()[-1])
        return 0.0

    def test_noHeaders(self) -> None:
        """
        A backend that never sends its status line: the client gets 504
        C{upstream_timeout} in the envelope, naming the setting, within
        the timeout and some slack; the request is no longer active and
        the timeout is counted.
        """
        started = time.monotonic()
        status, _, body = self.daemon.post("/v1/chat/completions", chatBody("headers"), timeout=30)
        elapsed = time.monotonic() - started
        error = checkEnvelope(self, status, body, 504, "upstream_timeout")
        self.assertIn("backend_idle_timeout_seconds", error["message"])
        self.assertGreaterEqual(elapsed, IDLE_TIMEOUT * 0.9)
        self.assertLess(elapsed, BOUND)
        self.assertTrue(waitFor(self.idle))
        self.assertEqual(self.timeouts(), 1.0)

    def test_midBody(self) -> None:
        """
        A backend that stalls in the middle of a plain answer: its status
        line and the part sent reach the client, then the connection is
        closed without the last chunk (twisted.web's client reads the
        backend's C{Content-Length}; the client's answer is chunked).
        """
        raw = rawPost(self.daemon, chatBody("mid-body"))
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), raw)
        self.assertIn(b'"object"', body)
        self.assertFalse(body.endswith(b"0\r\n\r\n"), raw)
        self.assertTrue(waitFor(self.idle))
        self.assertEqual(self.timeouts(), 1.0)

    def test_midStream(self) -> None:
        """
        A backend that stalls mid-stream: the frames sent reach the client,
        then the connection is closed without the last chunk or
        C{[DONE]}.
        """
        raw = rawPost(self.daemon, chatBody("mid-stream", stream=True))
        self.assertTrue(raw.startswith(b"HTTP/1.1 200"), raw)
        self.assertIn(b'"content": "1"', raw)
        self.assertNotIn(b"[DONE]", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"), raw)
        self.assertTrue(waitFor(self.idle))

    def test_frozen(self) -> None:
        """
        A backend frozen by SIGSTOP mid-stream is cut off like one that
        stalls, and an unload then stops it (SIGKILL reaches a stopped
        process).
        """
        self.assertEqual(self.daemon.post("/admin/models/load", {"model": "m"})[0], 200)
        pid = self.daemon.models()["m"]["pid"]
        self.addCleanup(lambda: pidAlive(pid) and os.kill(pid, signal.SIGKILL))
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(rawPost(self.daemon, chatBody(stream=True))))
        os.kill(pid, signal.SIGSTOP)
        reader.start()
        reader.join(BOUND + 5)
        self.assertFalse(reader.is_alive())
        self.assertTrue(result[0].startswith(b"HTTP/1.1 504"), result[0])
        self.assertTrue(waitFor(self.idle))
        status, _, body = self.daemon.post("/admin/models/unload", {"model": "m"}, timeout=30)
        self.assertEqual(status, 200, body)
        self.assertTrue(waitFor(lambda: not pidAlive(pid), timeout=10))

    def test_afterLoadingComments(self) -> None:
        """
        A stream that waited for its model's load (its 200 and loading
        comments sent already) whose backend then stalls before its status
        line ends with one error event, C{upstream_timeout}, in the API's
        shape, and the request is no longer active.
        """
        raw = rawPost(self.daemon, chatBody("headers", stream=True, model="slow"))
        self.assertTrue(raw.startswith(b"HTTP/1.1 200"), raw)
        self.assertIn(b": dynllm: loading slow", raw)
        self.assertIn(b'"code": "upstream_timeout"', raw)
        self.assertTrue(waitFor(lambda: self.idle("slow")))

    def test_offForModel(self) -> None:
        """
        C{backend_idle_timeout_seconds: -1} on a model turns the timeout off
        for it: its stalled request is still waiting after several times
        the global timeout.
        """
        errors: list[Exception] = []
        results: list[int] = []

        def send() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=60)
            try:
                connection.request("POST", "/v1/chat/completions", json.dumps(chatBody("headers", model="patient")),
                                   {"Content-Type": "application/json"})
                results.append(connection.getresponse().status)
            except Exception as e:
                errors.append(e)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        self.assertTrue(waitFor(lambda: not self.idle("patient"), timeout=10))
        time.sleep(IDLE_TIMEOUT * 3)
        self.assertEqual(self.daemon.models()["patient"]["active_requests"], 1)
        self.assertEqual(results, [])
        # A forced unload ends it.
        status, _, body = self.daemon.post("/admin/models/unload", {"model": "patient", "force": True})
        self.assertEqual(status, 200, body)
        thread.join(10)
        self.assertEqual(results, [503])


class ForcedUnloadTests(SynchronousTestCase):
    """
    C{POST /admin/models/unload} with C{"force": true} stops a busy model.
    """

    def setUp(self) -> None:
        self.daemon = Daemon(
            {
                "total_vram_mb": 1000,
                "enabled_backends": ["llamacpp"],
                "backend": {"llamacpp_binary": FAKE_BACKEND},
                "shutdown_timeout_seconds": 1,
                "models": [fakeModel("m")],
            }
        ).start()
        self.addCleanup(self.daemon.stop)

    def inFlight(self) -> tuple[threading.Thread, list[tuple[int, bytes]]]:
        results: list[tuple[int, bytes]] = []

        def send() -> None:
            status, _, body = self.daemon.post("/v1/chat/completions", chatBody("headers"), timeout=60)
            results.append((status, body))

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        self.assertTrue(waitFor(lambda: self.daemon.models()["m"]["active_requests"] == 1, timeout=15))
        return thread, results

    def test_busyRefusedWithoutForce(self) -> None:
        """
        Without C{force}, a busy model's unload is refused with 409
        C{model_busy}, and its request goes on.
        """
        self.inFlight()
        status, _, body = self.daemon.post("/admin/models/unload", {"model": "m"})
        checkEnvelope(self, status, body, 409, "model_busy")
        self.assertEqual(self.daemon.models()["m"]["status"], "loaded")

    def test_force(self) -> None:
        """
        With C{force}, the model is stopped at once: the request in flight
        gets 503 C{model_unloaded} saying an administrator unloaded it,
        the backend's process is gone, and the unload is counted with
        cause C{forced}.
        """
        thread, results = self.inFlight()
        pid = self.daemon.models()["m"]["pid"]
        status, _, body = self.daemon.post("/admin/models/unload", {"model": "m", "force": True})
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["status"], "unloaded")
        thread.join(10)
        [(status, body)] = results
        error = checkEnvelope(self, status, body, 503, "model_unloaded")
        self.assertIn("forced", error["message"])
        self.assertFalse(pidAlive(pid))
        self.assertEqual(self.daemon.models()["m"]["active_requests"], 0)

    def test_forceNotBoolean(self) -> None:
        """
        C{force} must be true or false: anything else is a 400 naming it.
        """
        status, _, body = self.daemon.post("/admin/models/unload", {"model": "m", "force": "yes"})
        error = checkEnvelope(self, status, body, 400)
        self.assertEqual(error["param"], "force")
