"""
Integration tests: a real dynllm daemon (C{twistd dynllm}) in front of real
llama-server processes serving tiny random-weight GGUF models that the
project generates. Clients are plain HTTP and the official C{openai} SDK.
"""

from __future__ import annotations

import json
import os
import time

import openai
from twisted.trial.unittest import SynchronousTestCase

from dynllm.runner import portIsFree
from tests.support import (
    Daemon,
    commandLine,
    environmentOf,
    llamaServer,
    pidAlive,
    request,
    tinyModels,
    waitFor,
)


def llamaConfig(**overrides):
    """
    @return: a configuration with the three tiny models (chat, embeddings,
        rerank) served by the real llama-server.
    """
    models = tinyModels()
    config = {
        "total_vram_mb": 1000,
        "enabled_backends": ["llamacpp"],
        "idle_timeout_seconds": 300,
        "backend": {"llamacpp_binary": llamaServer()},
        "models": [
            {"name": "tiny-chat", "path": models["tiny-llama.gguf"], "backend": "llamacpp",
             "vram_mb": 400, "context_size": 512, "extra_args": ["-np", "2"]},
            {"name": "tiny-embed", "path": models["tiny-embed.gguf"], "backend": "llamacpp",
             "model_type": "embedding", "vram_mb": 300, "context_size": 512},
            {"name": "tiny-rerank", "path": models["tiny-rerank.gguf"], "backend": "llamacpp",
             "model_type": "rerank", "vram_mb": 300, "context_size": 512},
        ],
    }
    config.update(overrides)
    return config


class LlamaServerTests(SynchronousTestCase):
    """
    Every endpoint of the core through one daemon and real backends.
    """

    def setUp(self):
        self.daemon = Daemon(llamaConfig()).start()
        self.addCleanup(self._stopDaemon)
        self.client = openai.OpenAI(base_url=self.daemon.url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(self.client.close)

    def _stopDaemon(self):
        try:
            pids = [m["pid"] for m in self.daemon.models().values() if m["pid"]]
        finally:
            # twistd stops cleanly, then re-raises the SIGTERM it handled
            # (systemd counts that as a clean exit).
            status = self.daemon.stop()
        self.assertEqual(status, -15)
        self.assertIn("Main loop terminated", self.daemon.log())
        self.assertEqual([p for p in pids if pidAlive(p)], [], "backends outlived the daemon")

    def test_modelsList(self):
        """
        C{GET /v1/models} lists every configured model in OpenAI's format,
        and the SDK reads it.
        """
        ids = [m.id for m in self.client.models.list().data]
        self.assertEqual(ids, ["tiny-chat", "tiny-embed", "tiny-rerank"])
        self.assertEqual(self.client.models.retrieve("tiny-chat").owned_by, "dynllm")

    def test_chat(self):
        """
        A non-streamed chat completion through the SDK loads the model on
        demand and returns the backend's answer.
        """
        reply = self.client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        self.assertEqual(reply.object, "chat.completion")
        self.assertEqual(reply.model, "tiny-chat")
        self.assertEqual(len(reply.choices), 1)
        self.assertGreater(reply.usage.completion_tokens, 0)
        entry = self.daemon.models()["tiny-chat"]
        self.assertEqual(entry["status"], "loaded")
        self.assertTrue(pidAlive(entry["pid"]))
        self.assertEqual(entry["active_requests"], 0)

    def test_chatStream(self):
        """
        A streamed chat completion arrives as SSE chunks the SDK parses, and
        the stream is relayed with C{text/event-stream} and no buffering.
        """
        chunks = list(
            self.client.chat.completions.create(
                model="tiny-chat",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=6,
                stream=True,
            )
        )
        self.assertGreaterEqual(len(chunks), 2)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "length")
        status, headers, body = self.daemon.post(
            "/v1/chat/completions",
            {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
             "stream": True},
        )
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/event-stream"))
        self.assertEqual(headers.get("X-Accel-Buffering"), "no")
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))

    def test_metrics(self):
        """
        C{/metrics} reports the load and the request a chat caused.
        """
        self.client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=2
        )
        status, _, body = self.daemon.get("/metrics")
        self.assertEqual(status, 200)
        text = body.decode()
        self.assertIn('dynllm_model_loads_total{model="tiny-chat"} 1.0', text)
        self.assertIn('dynllm_model_state{model="tiny-chat",state="loaded"} 1.0', text)
        self.assertIn('dynllm_requests_total{code="200",model="tiny-chat",route="/v1/chat/completions"} 1.0', text)

    def test_completions(self):
        """
        C{/v1/completions} reaches the chat model's backend.
        """
        reply = self.client.completions.create(model="tiny-chat", prompt="the quick", max_tokens=3)
        self.assertEqual(reply.object, "text_completion")
        self.assertEqual(len(reply.choices), 1)

    def test_embeddings(self):
        """
        C{/v1/embeddings} on an embedding model returns one vector per
        input, of the model's width (64).
        """
        result = self.client.embeddings.create(model="tiny-embed", input=["hello world", "the fox"])
        self.assertEqual([len(d.embedding) for d in result.data], [64, 64])

    def test_rerank(self):
        """
        C{/v1/rerank} on a rerank model scores every document.
        """
        status, _, body = self.daemon.post(
            "/v1/rerank", {"model": "tiny-rerank", "query": "what is a fox", "documents": ["a fox", "a dog", "hi"]}
        )
        self.assertEqual(status, 200, body)
        results = json.loads(body)["results"]
        self.assertEqual(sorted(r["index"] for r in results), [0, 1, 2])

    def test_wrongModelType(self):
        """
        Asking an endpoint for a model of another type is a 400 in the
        OpenAI envelope, and the SDK raises C{BadRequestError}.
        """
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.embeddings.create(model="tiny-chat", input="hello")
        self.assertEqual(caught.exception.body["code"], "model_type_mismatch")

    def test_unknownModel(self):
        """
        An unknown model is a 404 C{model_not_found}.
        """
        with self.assertRaises(openai.NotFoundError) as caught:
            self.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(caught.exception.body["code"], "model_not_found")

    def test_upstreamErrorRelayed(self):
        """
        A backend's own error (here llama-server's 400 for a chat request
        without messages) comes back with its status and body.
        """
        status, _, body = self.daemon.post("/v1/chat/completions", {"model": "tiny-chat"})
        self.assertEqual(status, 400)
        self.assertIn("messages", json.loads(body)["error"]["message"])

    def test_adminLoadUnload(self):
        """
        C{/admin/models/load} loads a model and C{/admin/models/unload}
        stops its process; C{/admin/models} shows each step.
        """
        status, _, body = self.daemon.post("/admin/models/load", {"model": "tiny-rerank"})
        self.assertEqual((status, json.loads(body)["status"]), (200, "loaded"))
        entry = self.daemon.models()["tiny-rerank"]
        for key in ("name", "status", "backend", "model_type", "vram_mb", "pid", "port",
                    "loaded_at", "last_used_at", "active_requests"):
            self.assertIn(key, entry)
        pid = entry["pid"]
        self.assertTrue(pidAlive(pid))
        status, _, body = self.daemon.post("/admin/models/unload", {"model": "tiny-rerank"})
        self.assertEqual((status, json.loads(body)["status"]), (200, "unloaded"))
        self.assertFalse(pidAlive(pid))
        self.assertEqual(self.daemon.models()["tiny-rerank"]["pid"], None)


class BackendKeyTests(SynchronousTestCase):
    """
    Each llama-server runs with a fresh key of dynllm's, so that its port is
    of no use to other local users, and dynllm's environment cannot change
    its address or key.
    """

    def startDaemon(self):
        """
        @return: a started daemon with the three tiny models, stopped in
            cleanup.
        """
        daemon = Daemon(llamaConfig()).start()
        self.addCleanup(daemon.stop)
        return daemon

    def test_directRequestNeedsKey(self):
        """
        The real llama-server answers 401 to a request sent to its port
        without its key (or with a client's), while the same request
        through dynllm works; the key is in its environment, not on its
        command line.
        """
        daemon = self.startDaemon()
        body = {"model": "tiny-embed", "input": "hello"}
        status, _, answer = daemon.post("/v1/embeddings", body, headers={"X-Api-Key": "client"})
        self.assertEqual(status, 200, answer)
        entry = daemon.models()["tiny-embed"]
        url = f"http://127.0.0.1:{entry['port']}/v1/embeddings"
        self.assertEqual(request("POST", url, body)[0], 401)
        self.assertEqual(request("POST", url, body, {"Authorization": "Bearer client"})[0], 401)
        key = environmentOf(entry["pid"])["LLAMA_API_KEY"]
        self.assertGreaterEqual(len(key), 32)
        self.assertFalse(any(key in arg for arg in commandLine(entry["pid"])))
        self.assertEqual(request("POST", url, body, {"Authorization": "Bearer " + key})[0], 200)

    def test_inheritedVariablesIgnored(self):
        """
        With C{LLAMA_API_KEY}, C{LLAMA_ARG_PORT} and C{LLAMA_ARG_HOST} in
        the daemon's environment, models still load and answer through
        dynllm: the backend gets its own key and none of those.
        """
        self.patch(
            os,
            "environ",
            dict(os.environ, LLAMA_API_KEY="daemon-key", LLAMA_ARG_PORT="1", LLAMA_ARG_HOST="0.0.0.0"),
        )
        daemon = self.startDaemon()
        status, _, answer = daemon.post("/v1/embeddings", {"model": "tiny-embed", "input": "hello"})
        self.assertEqual(status, 200, answer)
        environment = environmentOf(daemon.models()["tiny-embed"]["pid"])
        self.assertNotEqual(environment["LLAMA_API_KEY"], "daemon-key")
        self.assertNotIn("LLAMA_ARG_PORT", environment)
        self.assertNotIn("LLAMA_ARG_HOST", environment)


class EvictionTests(SynchronousTestCase):
    """
    The memory budget with real backends.
    """

    def test_evictsToFit(self):
        """
        With room for one model at a time, asking for a second model stops
        the first (its process exits) before the second starts, and
        C{used_vram_mb} never exceeds the budget.
        """
        daemon = Daemon(llamaConfig(total_vram_mb=450)).start()
        self.addCleanup(daemon.stop)
        status, _, _ = daemon.post("/admin/models/load", {"model": "tiny-chat"})
        self.assertEqual(status, 200)
        chatPid = daemon.models()["tiny-chat"]["pid"]
        status, _, body = daemon.post("/v1/embeddings", {"model": "tiny-embed", "input": "hello"})
        self.assertEqual(status, 200, body)
        models = daemon.models()
        self.assertEqual(models["tiny-chat"]["status"], "unloaded")
        self.assertFalse(pidAlive(chatPid))
        self.assertEqual(models["tiny-embed"]["status"], "loaded")
        self.assertLessEqual(json.loads(daemon.get("/admin/models")[2])["used_vram_mb"], 450)


class IdleUnloadTests(SynchronousTestCase):
    """
    The idle reaper with a real backend.
    """

    def test_idleModelStopped(self):
        """
        A model idle for longer than its C{unload_time} is stopped by the
        reaper; one with C{unload_time: -1} stays.
        """
        config = llamaConfig(idle_check_interval_seconds=0.1)
        config["models"][0]["unload_time"] = 0.5
        config["models"][1]["unload_time"] = -1
        daemon = Daemon(config).start()
        self.addCleanup(daemon.stop)
        for name in ("tiny-chat", "tiny-embed"):
            self.assertEqual(daemon.post("/admin/models/load", {"model": name})[0], 200)
        pid = daemon.models()["tiny-chat"]["pid"]
        self.assertTrue(waitFor(lambda: daemon.models()["tiny-chat"]["status"] == "unloaded", timeout=10))
        self.assertFalse(pidAlive(pid))
        time.sleep(0.5)
        self.assertEqual(daemon.models()["tiny-embed"]["status"], "loaded")


class PreloadTests(SynchronousTestCase):
    """
    C{preload_models} with a real backend.
    """

    def test_preloaded(self):
        """
        A model listed in C{preload_models} is loaded at start-up without
        any request.
        """
        daemon = Daemon(llamaConfig(preload_models=["tiny-embed"])).start()
        self.addCleanup(daemon.stop)
        self.assertTrue(waitFor(lambda: daemon.models()["tiny-embed"]["status"] == "loaded", timeout=20))


class CrashRecoveryTests(SynchronousTestCase):
    """
    C{kill -9} of the daemon, then a restart, leaves nothing behind.
    """

    def test_kill9ThenRestart(self):
        """
        After SIGKILL of the daemon its backends are killed by the kernel
        (their parent-death signal, see L{dynllm._launch}) before any
        restart; a daemon started with the same database finds nothing left
        to stop, their ports free, and serves again. (Reconciliation of
        leftovers the kernel did not kill is tested in L{tests.test_store}.)
        """
        config = llamaConfig()
        first = Daemon(config).start()
        for name in ("tiny-chat", "tiny-embed"):
            self.assertEqual(first.post("/admin/models/load", {"model": name})[0], 200)
        leftovers = {n: (m["pid"], m["port"]) for n, m in first.models().items() if m["pid"]}
        self.assertEqual(len(leftovers), 2)
        first.kill9()
        for pid, _ in leftovers.values():
            self.assertTrue(waitFor(lambda: not pidAlive(pid), timeout=5), f"pid {pid} survived its daemon")

        second = Daemon(first.config, directory=first.directory)
        second.port = first.port
        second.url = first.url
        second.start()
        self.addCleanup(second.stop)
        models = second.models()
        self.assertTrue(all(m["status"] == "unloaded" and m["pid"] is None for m in models.values()))
        for _, port in leftovers.values():
            self.assertTrue(portIsFree(port), f"port {port} is still taken")
        self.assertNotIn("left by a previous run", second.log())
        status, _, _ = second.post(
            "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}],
                                     "max_tokens": 2}
        )
        self.assertEqual(status, 200)
