"""
Loading feedback end to end: a real dynllm daemon in front of the fake
backend of C{tests/fakebackend.py}, told to take a few seconds to load (or
to exit while loading), read by the official C{openai} and C{anthropic}
SDKs and by a raw socket.
"""

from __future__ import annotations

import json
import socket
import time

import anthropic
import openai
from twisted.trial.unittest import SynchronousTestCase

from tests.support import FAKE_BACKEND, Daemon, fakeModel, pidAlive, waitFor

#: Seconds the slow fake backend takes to load.
LOAD_SECONDS = 3

MESSAGES = [{"role": "user", "content": "hi"}]


class LoadingTestCase(SynchronousTestCase):
    """
    A daemon with a model that loads in L{LOAD_SECONDS} seconds (C{slow})
    and one that exits after loading for 2 seconds (C{crashy}).
    """

    def setUp(self):
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "models": [
                fakeModel("slow", vram=100, fake_load_delay=LOAD_SECONDS),
                fakeModel("crashy", vram=100, fake_mode="crash", fake_load_delay=2),
            ],
        }
        self.daemon = Daemon(config).start()
        self.addCleanup(self.stop)

    def stop(self):
        try:
            pids = [m["pid"] for m in self.daemon.models().values() if m["pid"]]
        finally:
            self.daemon.stop()
        self.assertTrue(waitFor(lambda: not any(pidAlive(p) for p in pids), timeout=10))

    def openai(self):
        """
        @return: an OpenAI client of the daemon, without retries.
        """
        client = openai.OpenAI(base_url=self.daemon.url + "/v1", api_key="none", max_retries=0, timeout=30)
        self.addCleanup(client.close)
        return client

    def anthropic(self):
        """
        @return: an Anthropic client of the daemon, without retries.
        """
        client = anthropic.Anthropic(base_url=self.daemon.url, api_key="none", max_retries=0, timeout=30)
        self.addCleanup(client.close)
        return client


class OpenAILoadingTests(LoadingTestCase):
    """
    The C{openai} SDK streaming from a model that loads.
    """

    def test_streamThroughLoad(self):
        """
        The SDK gets the stream's headers at once (C{create} returns well
        before the load ends), skips the loading comments and receives the
        whole text.
        """
        started = time.monotonic()
        stream = self.openai().chat.completions.create(model="slow", messages=MESSAGES, stream=True)
        headers = time.monotonic() - started
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        total = time.monotonic() - started
        self.assertLess(headers, 1.0)
        self.assertGreaterEqual(total, LOAD_SECONDS - 0.5)
        self.assertEqual(text, "01234")

    def test_failedLoadRaises(self):
        """
        A backend that exits while loading makes the SDK raise an
        C{APIError} with dynllm's message, after the stream has begun: it
        says where the backend's output is, without quoting it.
        """
        stream = self.openai().chat.completions.create(model="crashy", messages=MESSAGES, stream=True)
        with self.assertRaises(openai.APIError) as caught:
            list(stream)
        self.assertIn("exited with code 1 while loading", caught.exception.message)
        self.assertIn("/admin/models/crashy/logs", caught.exception.message)
        self.assertNotIn("exiting due to model loading error", caught.exception.message)

    def test_loadingComments(self):
        """
        On the wire, the stream starts with 200 and C{text/event-stream},
        then C{: dynllm: loading slow, N s} for N = 1, 2, ... while the
        model loads, then the backend's events.
        """
        body = json.dumps({"model": "slow", "messages": MESSAGES, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        head, _, stream = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200 OK\r\n"), head)
        self.assertIn(b"\r\nContent-Type: text/event-stream", head)
        comments = [line for line in stream.split(b"\n") if line.startswith(b":")]
        self.assertEqual(comments[:2], [b": dynllm: loading slow, 1 s", b": dynllm: loading slow, 2 s"])
        self.assertTrue(stream.endswith(b"data: [DONE]\n\n"), stream[-200:])

    def test_clientGoneWithdraws(self):
        """
        A streaming client that leaves after the first loading comment is
        withdrawn from the model's waiters (the daemon's count drops to 0).
        """
        body = json.dumps({"model": "slow", "messages": MESSAGES, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = b""
            while b": dynllm: loading slow, 1 s" not in received:
                received += sock.recv(65536)
            self.assertEqual(self.daemon.models()["slow"]["waiting_requests"], 1)
        self.assertTrue(waitFor(lambda: self.daemon.models()["slow"]["waiting_requests"] == 0, timeout=1))


class AnthropicLoadingTests(LoadingTestCase):
    """
    The C{anthropic} SDK streaming from a model that loads
    (C{/v1/messages}).
    """

    def test_streamThroughLoad(self):
        """
        The SDK skips the loading comments and receives the whole text.
        """
        stream = self.anthropic().messages.create(model="slow", max_tokens=8, messages=MESSAGES, stream=True)
        text = "".join(e.delta.text for e in stream if e.type == "content_block_delta")
        self.assertEqual(text, "01234")

    def test_failedLoadRaises(self):
        """
        A backend that exits while loading makes the SDK raise an
        C{APIStatusError} holding dynllm's message, from the stream's
        Anthropic-shaped error event.
        """
        stream = self.anthropic().messages.create(model="crashy", max_tokens=8, messages=MESSAGES, stream=True)
        with self.assertRaises(anthropic.APIStatusError) as caught:
            list(stream)
        self.assertIn("exited with code 1 while loading", str(caught.exception))
        self.assertEqual(caught.exception.body["type"], "error")
