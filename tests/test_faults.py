"""
Fault and protocol tests: a real dynllm daemon in front of the small fake
backend of C{tests/fakebackend.py}, which takes llama-server's command line
and can be told (through the model's C{env}) to crash, hang, die mid-stream,
ignore SIGTERM, spawn a child or flood its output.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support import (
    FAKE_BACKEND,
    Daemon,
    checkEnvelope,
    commandLine,
    fakeModel,
    pidAlive,
    waitFor,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def fakeDaemon(*models, **settings):
    """
    @return: a started daemon whose llama-server is the fake backend.
    """
    config = {
        "total_vram_mb": 1000,
        "enabled_backends": ["llamacpp"],
        "backend": {"llamacpp_binary": FAKE_BACKEND},
        "models": list(models),
    }
    config.update(settings)
    return Daemon(config).start()


def chat(daemon, model, **extra):
    """
    @return: C{(status, headers, body)} of a chat completion.
    """
    return daemon.post("/v1/chat/completions", dict(CHAT, model=model, **extra))


def inThread(function, *args, **kwargs):
    """
    Run C{function(*args, **kwargs)} in a thread.

    @return: a callable that joins the thread and returns the result.
    """
    result = {}

    def run():
        result["value"] = function(*args, **kwargs)

    thread = threading.Thread(target=run)
    thread.start()

    def join(timeout=30):
        thread.join(timeout)
        return result.get("value")

    return join


def startCount(daemon, model):
    """
    @return: how many times the daemon has started C{model}'s backend.
    """
    return daemon.log().count(f"[{model}] started ")


class DaemonTestCase(SynchronousTestCase):
    """
    Stops the test's daemon and checks it left no backend running.
    """

    def startDaemon(self, *models, **settings):
        daemon = fakeDaemon(*models, **settings)
        self.addCleanup(self._stop, daemon)
        return daemon

    def _stop(self, daemon):
        try:
            pids = [m["pid"] for m in daemon.models().values() if m["pid"]]
        finally:
            daemon.stop()
        self.assertTrue(waitFor(lambda: not any(pidAlive(p) for p in pids), timeout=10))


class LoadFailureTests(DaemonTestCase):
    """
    Backends that fail while loading.
    """

    def test_crashAtStart(self):
        """
        A backend that exits while loading fails the waiting request at once
        with a 502 that says so and where its output is, without quoting
        it (paths, an earlier run's lines); the model is C{failed}, and the
        admin's C{/logs} has the output.
        """
        daemon = self.startDaemon(fakeModel("crashy", fake_mode="crash"))
        started = time.monotonic()
        status, _, body = chat(daemon, "crashy")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(status, 502)
        error = json.loads(body)["error"]
        self.assertEqual(error["type"], "server_error")
        self.assertIn("exited with code 1 while loading", error["message"])
        self.assertIn("/admin/models/crashy/logs", error["message"])
        self.assertNotIn("exiting due to model loading error", error["message"])
        self.assertNotIn("/", error["message"].replace("/admin/models/crashy/logs", ""))
        entry = daemon.models()["crashy"]
        self.assertEqual((entry["status"], entry["pid"]), ("failed", None))
        status, headers, logs = daemon.get("/admin/models/crashy/logs?lines=2")
        self.assertEqual(status, 200)
        self.assertEqual(
            logs.decode().splitlines(),
            ["fake: load_model: failed to load model", "fake: exiting due to model loading error"],
        )
        self.assertIn("exited with code 1", entry["last_error"])
        # The next request tries again.
        self.assertEqual(chat(daemon, "crashy")[0], 502)
        self.assertEqual(startCount(daemon, "crashy"), 2)

    def test_hangTimesOut(self):
        """
        A backend that is not ready within its load timeout is stopped and
        its request gets a 504; its memory is released once it has exited.
        """
        model = fakeModel("hangs", fake_mode="hang")
        model["load_timeout_seconds"] = 0.5
        daemon = self.startDaemon(model)
        status, _, body = chat(daemon, "hangs")
        self.assertEqual(status, 504)
        self.assertIn("load timeout of 0.5s", json.loads(body)["error"]["message"])
        self.assertTrue(waitFor(lambda: daemon.models()["hangs"]["status"] == "failed"))
        self.assertEqual(json.loads(daemon.get("/admin/models")[2])["used_vram_mb"], 0)

    def test_portTakenRetried(self):
        """
        A backend that finds its port taken is started again on another
        port, and the request is served.
        """
        marker = os.path.abspath(self.mktemp())
        daemon = self.startDaemon(fakeModel("racy", fake_port_taken_once=marker))
        self.assertEqual(chat(daemon, "racy")[0], 200)
        self.assertEqual(startCount(daemon, "racy"), 2)
        self.assertIn("was taken; trying another", daemon.log())

    def test_sharedLoad(self):
        """
        Concurrent requests for a cold model share one load: one backend is
        started, and all of them are served.
        """
        daemon = self.startDaemon(fakeModel("slow", fake_load_delay=0.5))
        joins = [inThread(chat, daemon, "slow") for _ in range(5)]
        self.assertEqual([join()[0] for join in joins], [200] * 5)
        self.assertEqual(startCount(daemon, "slow"), 1)

    def test_manyConcurrentClients(self):
        """
        Forty streams and a hundred plain requests arriving together at a
        cold model share one load, all complete whole, and leave no lease
        behind.
        """
        daemon = self.startDaemon(fakeModel("busy", fake_frames=20, fake_frame_delay=0.02, fake_load_delay=0.3))
        streams = [inThread(chat, daemon, "busy", stream=True) for _ in range(40)]
        plain = [inThread(chat, daemon, "busy") for _ in range(100)]
        for join in streams:
            status, _, body = join()
            self.assertEqual((status, body.count(b"data: {")), (200, 20))
            self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))
        self.assertEqual([join()[0] for join in plain], [200] * 100)
        self.assertEqual(startCount(daemon, "busy"), 1)
        entry = daemon.models()["busy"]
        self.assertEqual((entry["active_requests"], entry["waiting_requests"]), (0, 0))

    def test_loadedModelServesDuringLoad(self):
        """
        A loaded model keeps answering while another model loads.
        """
        daemon = self.startDaemon(fakeModel("fast", vram=100), fakeModel("slow", vram=100, fake_load_delay=3))
        self.assertEqual(chat(daemon, "fast")[0], 200)
        slow = inThread(chat, daemon, "slow")
        self.assertTrue(waitFor(lambda: daemon.models()["slow"]["status"] == "loading"))
        started = time.monotonic()
        self.assertEqual(chat(daemon, "fast")[0], 200)
        self.assertLess(time.monotonic() - started, 1)
        self.assertEqual(slow()[0], 200)


class InFlightTests(DaemonTestCase):
    """
    A request holds its model until its last byte.
    """

    def test_streamNotEvicted(self):
        """
        While a model streams, a request for another model that needs its
        memory waits; once the stream has ended, the streaming model is
        evicted and the other one served. The stream arrives whole.
        """
        daemon = self.startDaemon(
            fakeModel("streamer", vram=600, fake_frames=10, fake_frame_delay=0.15),
            fakeModel("other", vram=600),
        )
        self.assertEqual(daemon.post("/admin/models/load", {"model": "streamer"})[0], 200)
        stream = inThread(chat, daemon, "streamer", stream=True)
        self.assertTrue(waitFor(lambda: daemon.models()["streamer"]["active_requests"] == 1))
        other = inThread(chat, daemon, "other")
        time.sleep(0.5)
        self.assertEqual(daemon.models()["streamer"]["status"], "loaded")
        self.assertEqual(daemon.models()["other"]["waiting_requests"], 1)
        status, _, body = stream()
        self.assertEqual(status, 200)
        self.assertEqual(body.count(b"data: {"), 10)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))
        self.assertEqual(other()[0], 200)
        self.assertEqual(daemon.models()["streamer"]["status"], "unloaded")

    def test_unloadWhileStreaming(self):
        """
        C{/admin/models/unload} answers 409 while the model streams.
        """
        daemon = self.startDaemon(fakeModel("streamer", fake_frames=10, fake_frame_delay=0.1))
        stream = inThread(chat, daemon, "streamer", stream=True)
        self.assertTrue(waitFor(lambda: daemon.models()["streamer"]["active_requests"] == 1))
        status, _, body = daemon.post("/admin/models/unload", {"model": "streamer"})
        self.assertEqual(status, 409)
        self.assertEqual(json.loads(body)["error"]["code"], "model_busy")
        self.assertEqual(stream()[0], 200)

    def test_queueTimeout(self):
        """
        When memory stays busy past C{queue_timeout_seconds}, the waiting
        request gets a 503 with C{Retry-After}.
        """
        daemon = self.startDaemon(
            fakeModel("streamer", vram=600, fake_frames=20, fake_frame_delay=0.1),
            fakeModel("other", vram=600),
            queue_timeout_seconds=0.3,
        )
        stream = inThread(chat, daemon, "streamer", stream=True)
        self.assertTrue(waitFor(lambda: daemon.models()["streamer"]["active_requests"] == 1))
        status, headers, body = chat(daemon, "other")
        self.assertEqual(status, 503)
        self.assertIn("Retry-After", headers)
        self.assertIn("busy models: streamer", json.loads(body)["error"]["message"])
        self.assertEqual(stream()[0], 200)

    def test_clientDisconnectReleases(self):
        """
        A client that goes away mid-stream releases its model at once.
        """
        daemon = self.startDaemon(fakeModel("streamer", fake_frames=200, fake_frame_delay=0.05))
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port)
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(dict(CHAT, model="streamer", stream=True)),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        response.read1(10)
        self.assertEqual(daemon.models()["streamer"]["active_requests"], 1)
        connection.sock.close()
        connection.close()
        self.assertTrue(waitFor(lambda: daemon.models()["streamer"]["active_requests"] == 0, timeout=3))


class BackendDeathTests(DaemonTestCase):
    """
    Backends that die after loading.
    """

    def test_diesMidStream(self):
        """
        A backend that dies mid-stream cuts the client's response short (no
        C{[DONE]}), is marked failed with its memory released, and the next
        request starts it again.
        """
        daemon = self.startDaemon(fakeModel("dies", fake_mode="die-mid-stream"))
        firstPid = None
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(dict(CHAT, model="dies", stream=True)),
            {"Content-Type": "application/json"},
        )
        firstPid = daemon.models()["dies"]["pid"]
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        with self.assertRaises(http.client.IncompleteRead):
            response.read()
        connection.close()
        self.assertTrue(waitFor(lambda: daemon.models()["dies"]["status"] == "failed"))
        self.assertIn("exited with code 3 while loaded", daemon.models()["dies"]["last_error"])
        self.assertEqual(json.loads(daemon.get("/admin/models")[2])["used_vram_mb"], 0)
        self.assertEqual(chat(daemon, "dies")[0], 200)
        self.assertNotEqual(daemon.models()["dies"]["pid"], firstPid)

    def test_deathDoesNotAffectOthers(self):
        """
        One backend dying leaves the daemon and the other models serving.
        """
        daemon = self.startDaemon(fakeModel("dies", vram=100, fake_mode="die-mid-stream"), fakeModel("ok", vram=100))
        self.assertEqual(chat(daemon, "ok")[0], 200)
        with self.assertRaises(http.client.IncompleteRead):
            chat(daemon, "dies", stream=True)
        self.assertEqual(chat(daemon, "ok")[0], 200)
        self.assertEqual(daemon.get("/health")[0], 200)


class ProcessHygieneTests(DaemonTestCase):
    """
    Process groups, output draining and shutdown.
    """

    def test_unloadKillsGroup(self):
        """
        Unloading stops the backend's children too (the whole group): the
        one it started, and the guard L{dynllm._launch} gave it.
        """
        daemon = self.startDaemon(fakeModel("parent", fake_child=1))
        self.assertEqual(chat(daemon, "parent")[0], 200)
        pid = daemon.models()["parent"]["pid"]
        children = [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
        guards = [c for c in children if any(a.endswith("_launch.py") for a in commandLine(c))]
        self.assertEqual((len(children), len(guards)), (2, 1))
        self.assertEqual(daemon.post("/admin/models/unload", {"model": "parent"})[0], 200)
        self.assertTrue(waitFor(lambda: not any(pidAlive(c) for c in children), timeout=5))
        self.assertFalse(pidAlive(pid))

    def test_chattyBackend(self):
        """
        A backend that prints thousands of lines per request never blocks:
        its output is drained continuously.
        """
        daemon = self.startDaemon(fakeModel("chatty", fake_chatty=2000))
        for _ in range(10):
            self.assertEqual(chat(daemon, "chatty")[0], 200)

    def test_secondDaemonOnSameDatabase(self):
        """
        A second daemon started on the same state database (on another
        port) refuses to start, naming the first one's pid, and leaves the
        first one's backends running.
        """
        first = self.startDaemon(fakeModel("m"))
        self.assertEqual(chat(first, "m")[0], 200)
        pid = first.models()["m"]["pid"]
        config = dict(first.config, server={"host": "127.0.0.1"}, backend={"llamacpp_binary": FAKE_BACKEND})
        second = Daemon(config)
        with self.assertRaises(RuntimeError) as caught:
            second.start()
        self.assertIn(f"in use by another dynllm (pid {first.process.pid})", str(caught.exception))
        self.assertTrue(pidAlive(pid))
        self.assertEqual(chat(first, "m")[0], 200)

    def test_shutdownFinishesStreams(self):
        """
        On SIGTERM the daemon refuses new requests but lets a stream in
        flight finish whole before it stops the backend and exits.
        """
        daemon = fakeDaemon(fakeModel("streamer", fake_frames=10, fake_frame_delay=0.1))
        self.addCleanup(daemon.stop)
        stream = inThread(chat, daemon, "streamer", stream=True)
        self.assertTrue(waitFor(lambda: daemon.models()["streamer"]["active_requests"] == 1))
        pid = daemon.models()["streamer"]["pid"]
        daemon.process.send_signal(signal.SIGTERM)
        status, _, body = stream()
        self.assertEqual(status, 200)
        self.assertEqual(body.count(b"data: {"), 10)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))
        daemon.process.wait(15)
        self.assertFalse(pidAlive(pid))
        self.assertIn("request(s) in flight to finish", daemon.log())

    def test_shutdownKillsStubbornBackend(self):
        """
        On SIGTERM the daemon stops a backend that ignores SIGTERM with
        SIGKILL, and exits only after it is gone.
        """
        daemon = fakeDaemon(fakeModel("stubborn", fake_ignore_term=1))
        self.assertEqual(chat(daemon, "stubborn")[0], 200)
        pid = daemon.models()["stubborn"]["pid"]
        daemon.stop()
        self.assertFalse(pidAlive(pid))
        self.assertIn("sending SIGKILL", daemon.log())


class RequestErrorTests(DaemonTestCase):
    """
    Errors that dynllm answers itself, in the OpenAI envelope.
    """

    def setUp(self):
        self.daemon = self.startDaemon(fakeModel("m"), max_request_body_mb=1)

    def assertEnvelope(self, response, status, code=None):
        """
        Assert that C{response} is an OpenAI error envelope with C{status}.
        """
        self.assertEqual(response[1]["Content-Type"], "application/json")
        return checkEnvelope(self, response[0], response[2], status, code)

    def test_badJSON(self):
        """
        An unparsable body is a 400.
        """
        self.assertEnvelope(self.daemon.post("/v1/chat/completions", b"{nope"), 400, "invalid_json")

    def test_missingModel(self):
        """
        A body without C{model} is a 400 naming the C{model} parameter.
        """
        error = self.assertEnvelope(self.daemon.post("/v1/chat/completions", CHAT), 400)
        self.assertEqual(error["param"], "model")

    def test_unknownRoute(self):
        """
        An unknown path is a 404 in the envelope, a wrong method a 405.
        """
        self.assertEnvelope(self.daemon.get("/v1/nothing"), 404)
        self.assertEnvelope(self.daemon.get("/v1/chat/completions"), 405)

    def test_bodyTooLarge(self):
        """
        A body above C{max_request_body_mb} is refused with 413, whether
        its size is declared or it arrives chunked.
        """
        big = b'{"model": "m", "x": "' + b"a" * (2 * 1024 * 1024) + b'"}'
        self.assertEnvelope(self.daemon.post("/v1/chat/completions", big), 413, "request_too_large")
        connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=10)
        chunks = iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
        try:
            connection.request(
                "POST", "/v1/chat/completions", chunks, {"Content-Type": "application/json"}, encode_chunked=True
            )
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        self.assertEqual(response.status, 413)
        connection.close()

    def test_upstreamStatusRelayed(self):
        """
        A backend's own error status and body reach the client as sent.
        """
        status, _, body = chat(self.daemon, "m", teapot=True)
        self.assertEqual(status, 418)
        self.assertEqual(json.loads(body)["error"]["message"], "teapot")

    def test_hopByHopHeadersDropped(self):
        """
        The backend sees the client's end-to-end headers but not its
        hop-by-hop ones nor its credentials: its C{Authorization} is
        dynllm's key for it.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=10)
        self.addCleanup(connection.close)
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(dict(CHAT, model="m")),
            {"Content-Type": "application/json", "X-Custom": "kept", "Authorization": "Bearer secret",
             "Connection": "keep-alive, X-Drop", "X-Drop": "dropped"},
        )
        response = connection.getresponse()
        status, body = response.status, response.read()
        self.assertEqual(status, 200)
        seen = json.loads(body)["echo_headers"]
        self.assertEqual(seen.get("x-custom"), "kept")
        self.assertNotEqual(seen.get("authorization"), "Bearer secret")
        self.assertTrue(seen.get("authorization", "").startswith("Bearer "))
        self.assertNotIn("x-drop", seen)


class APIKeyTests(DaemonTestCase):
    """
    Client and admin keys.
    """

    def test_keys(self):
        """
        With C{api_keys} set, the API needs a client key (as a bearer token
        or C{X-Api-Key}) and C{/admin} needs an admin key; C{/health} stays
        open.
        """
        daemon = self.startDaemon(
            fakeModel("m"), server={"api_keys": ["client"], "admin_api_keys": ["admin"]}
        )
        client = {"Authorization": "Bearer client"}
        self.assertEqual(daemon.get("/health")[0], 200)
        self.assertEqual(daemon.get("/v1/models")[0], 401)
        self.assertEqual(daemon.get("/v1/models", headers={"Authorization": "Bearer wrong"})[0], 401)
        self.assertEqual(daemon.get("/v1/models", headers=client)[0], 200)
        self.assertEqual(daemon.get("/v1/models", headers={"X-Api-Key": "client"})[0], 200)
        self.assertEqual(chat(daemon, "m")[0], 401)
        self.assertEqual(daemon.post("/v1/chat/completions", dict(CHAT, model="m"), headers=client)[0], 200)
        self.assertEqual(daemon.get("/admin/models", headers=client)[0], 401)
        self.assertEqual(daemon.get("/admin/models", headers={"Authorization": "Bearer admin"})[0], 200)
