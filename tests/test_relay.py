"""
Integration tests of the relay on real sockets: no request is lost to a
connection the real llama-server closed (its keep-alive timeout, its close
after a streamed response), and a client sees a stream's headers as soon as
the backend sends them (the fake backend of C{tests/fakebackend.py}, told to
wait between its headers and its first frame: llama-server sends its
headers with its first token).
"""

from __future__ import annotations

import json
import socket
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support import FAKE_BACKEND, Daemon, environmentOf, llamaServer, tinyModels

#: Gaps, in seconds, between sequential requests: around llama-server's
#: keep-alive timeout (cpp-httplib's CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND, 5 s).
GAPS = (4.9, 5.0, 5.05, 5.1, 5.15, 5.2, 4.95)


def chatConfig(*extraArgs):
    """
    @return: a configuration with one tiny chat model on the real
        llama-server, started with C{extraArgs} too.
    """
    return {
        "total_vram_mb": 1000,
        "enabled_backends": ["llamacpp"],
        "idle_timeout_seconds": 300,
        "backend": {"llamacpp_binary": llamaServer()},
        "models": [
            {"name": "tiny-chat", "path": tinyModels()["tiny-llama.gguf"], "backend": "llamacpp",
             "vram_mb": 400, "context_size": 2048, "extra_args": list(extraArgs)},
        ],
    }


def chat(daemon, stream, maxTokens=4):
    """
    Send one chat completion through C{daemon}.

    @return: a description of what went wrong, or C{None} if nothing did.
    """
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": maxTokens, "stream": stream}
    try:
        status, _, data = daemon.post("/v1/chat/completions", body)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    complete = data.rstrip().endswith(b"data: [DONE]") if stream else b'"choices"' in data
    if status != 200 or not complete:
        return f"{status} {data[:300]!r}"
    return None


class KeepAliveTests(SynchronousTestCase):
    """
    Requests through a daemon in front of one real llama-server all
    succeed, whatever llama-server did with the connections they reuse.
    """

    def setUp(self):
        self.daemon = Daemon(chatConfig("-np", "4")).start()
        self.addCleanup(self.daemon.stop)
        status, _, body = self.daemon.post("/admin/models/load", {"model": "tiny-chat"})
        self.assertEqual(status, 200, body)

    def test_idleGapsAroundKeepAlive(self):
        """
        Sequential requests, streamed and not, separated by idle gaps from
        4.9 to 5.2 s (llama-server's keep-alive is 5 s) all succeed.
        """
        failures = [chat(self.daemon, stream=False)]
        for i, gap in enumerate(GAPS):
            time.sleep(gap)
            failures.append(chat(self.daemon, stream=i % 2 == 0))
        self.assertEqual([f for f in failures if f], [])

    def test_concurrentMixedBursts(self):
        """
        Bursts of 20 concurrent requests, half streamed (after which
        llama-server closes the connection without saying so), separated by
        short pauses, all succeed.
        """
        failures = []

        def client(stream):
            for _ in range(4):
                failure = chat(self.daemon, stream)
                if failure:
                    failures.append(failure)

        for pause in (0.0, 0.2, 1.0, 2.1):
            threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(pause)
        self.assertEqual(failures, [])
        self.assertNotIn("backend_error", self.daemon.log())


def readStream(port, body, key=None, timeout=30):
    """
    Send a streamed chat completion to 127.0.0.1:C{port} and read until its
    response headers are complete, then until the first body byte.

    @param key: A bearer key to send, if any (a backend's own).

    @return: C{(seconds to the end of the headers, body bytes that came with
        them, seconds to the first body byte)}.
    """
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        authorization = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n%s"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (authorization, len(data), data)
        )
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before the headers: {received!r}")
            received += chunk
        headersAt = time.monotonic() - started
        early = received.partition(b"\r\n\r\n")[2]
        if not early and not sock.recv(1):
            raise ConnectionError("closed before the body")
        return headersAt, early, time.monotonic() - started


class HeadersFirstTests(SynchronousTestCase):
    """
    A client sees a backend's response headers when the backend sends them,
    not with the first body byte.
    """

    def test_streamHeadersBeforeFirstFrame(self):
        """
        A backend that sends a stream's headers and then waits 1.5 s for
        its first frame: the client gets the headers at once through dynllm,
        as directly, and the first frame when it comes.
        """
        model = {"name": "waits", "path": tinyModels()["tiny-llama.gguf"], "backend": "llamacpp",
                 "vram_mb": 100, "env": {"FAKE_HEADERS_WAIT": "1.5", "FAKE_FRAMES": "1"}}
        daemon = Daemon({"total_vram_mb": 1000, "enabled_backends": ["llamacpp"],
                         "backend": {"llamacpp_binary": FAKE_BACKEND}, "models": [model]}).start()
        self.addCleanup(daemon.stop)
        status, _, body = daemon.post("/admin/models/load", {"model": "waits"})
        self.assertEqual(status, 200, body)
        stream = {"model": "waits", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        backend = daemon.models()["waits"]
        key = environmentOf(backend["pid"])["LLAMA_API_KEY"]
        results = {"direct": readStream(backend["port"], stream, key), "dynllm": readStream(daemon.port, stream)}
        for name, (headersAt, early, firstByteAt) in results.items():
            self.assertEqual(early, b"", name)
            self.assertLess(headersAt, 0.5, (name, results))
            self.assertGreater(firstByteAt, 1.4, (name, results))
