"""
Integration tests of the OpenVINO backend: a real dynllm daemon in front of
the OVMS fake (L{tests.fakeovms}), which takes OVMS's command line and
answers as OVMS does (OVMS itself cannot be installed here). Clients are the
official C{openai} SDK and plain HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time

import openai
from twisted.trial.unittest import SynchronousTestCase

from tests import fakeovms
from tests.support import Daemon, checkEnvelope, commandLine, environmentOf, flag, pidAlive, request, waitFor

#: Every OpenVINO model type, with a model name for each.
MODELS = {
    "ov-chat": "llm",
    "ov-embed": "embedding",
    "ov-rerank": "rerank",
    "ov-whisper": "transcription",
    "ov-tts": "speech",
    "ov-sd": "image_generation",
    "ov-resnet": "classification",
    "ov-ocr": "ocr",
}

#: The model types OVMS serves as classic models, through KServe only.
CLASSIC = ("classification", "detection", "segmentation", "ocr")


def ovmsConfig(directory: str, models: dict[str, str] = MODELS, **overrides):
    """
    @return: a configuration with one OpenVINO model per entry of
        C{models} (name -> model type), run by the OVMS fake.
    """
    entries = []
    for name, kind in models.items():
        path = os.path.join(directory, "models", name)
        os.makedirs(path, exist_ok=True)
        if kind in CLASSIC:
            # A classic OpenVINO model: IR files in a version directory.
            os.makedirs(os.path.join(path, "1"), exist_ok=True)
            for file in ("model.xml", "model.bin"):
                open(os.path.join(path, "1", file), "w").close()
        entry = {"name": name, "path": path, "backend": "openvino", "model_type": kind, "vram_mb": 100}
        if kind in CLASSIC:
            entry["ovms_shape"] = "(1,3)"
        entries.append(entry)
    config = {
        "total_vram_mb": 1000,
        "enabled_backends": ["openvino"],
        "backend": {"ovms_binary": fakeovms.launcher(directory)},
        "models": entries,
    }
    config.update(overrides)
    return config


class OpenVINOTests(SynchronousTestCase):
    """
    Every endpoint of the spec through one daemon and the OVMS fake.
    """

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="dynllm-ovms-")
        self.daemon = Daemon(ovmsConfig(self.directory), directory=self.directory).start()
        self.addCleanup(self._stop)
        self.client = openai.OpenAI(base_url=self.daemon.url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(self.client.close)

    def _stop(self):
        pids = [m["pid"] for m in self.daemon.models().values() if m["pid"]]
        self.daemon.stop()
        self.assertEqual([p for p in pids if pidAlive(p)], [], "backends outlived the daemon")

    def test_commandLines(self):
        """
        Each model runs as C{ovms} with REST on 127.0.0.1 at its port, gRPC
        off, its public name, its path, the target device, and the task of
        its type (none for the KServe vision models).
        """
        tasks = {"ov-chat": "text_generation", "ov-whisper": "speech2text", "ov-resnet": None}
        for name, task in tasks.items():
            self.assertEqual(self.daemon.post("/admin/models/load", {"model": name})[0], 200)
            entry = self.daemon.models()[name]
            args = commandLine(entry["pid"])
            self.assertEqual(flag(args, "--rest_port"), str(entry["port"]))
            self.assertEqual(flag(args, "--rest_bind_address"), "127.0.0.1")
            self.assertEqual(flag(args, "--port"), "0")
            self.assertEqual(flag(args, "--model_name"), name)
            self.assertEqual(flag(args, "--model_path"), os.path.join(self.directory, "models", name))
            self.assertEqual(flag(args, "--target_device"), "CPU")
            self.assertEqual(flag(args, "--task"), task)
            logs = self.daemon.get(f"/admin/models/{name}/logs?lines=100")[2].decode()
            self.assertIn(f"Binding REST server to address: 127.0.0.1:{entry['port']}", logs)

    def test_backendKey(self):
        """
        Each OVMS run gets a fresh key in C{API_KEY}, never on its command
        line; dynllm's requests carry it, and the fake, like OVMS, refuses
        a POST sent to its port without it (500) while its readiness and
        model list stay public.
        """
        body = {"model": "ov-embed", "input": "x"}
        status, _, answer = self.daemon.post("/v1/embeddings", body, headers={"Authorization": "Bearer client"})
        self.assertEqual(status, 200, answer)
        entry = self.daemon.models()["ov-embed"]
        key = environmentOf(entry["pid"])["API_KEY"]
        self.assertGreaterEqual(len(key), 32)
        self.assertFalse(any(key in arg for arg in commandLine(entry["pid"])))
        base = f"http://127.0.0.1:{entry['port']}"
        for headers in ({}, {"Authorization": "Bearer client"}):
            status, _, answer = request("POST", base + "/v3/embeddings", body, headers)
            self.assertEqual(
                (status, json.loads(answer)),
                (500, {"error": "Unauthorized request due to invalid or missing api-key"}),
            )
        self.assertEqual(request("POST", base + "/v3/embeddings", body, {"Authorization": "Bearer " + key})[0], 200)
        self.assertEqual(request("GET", base + "/v2/models/ov-embed/ready")[0], 200)
        self.assertEqual(request("GET", base + "/v3/models")[0], 200)

    def test_chat(self):
        """
        Chat completions, streamed and not, reach OVMS's C{/v3} endpoint;
        the stream ends with C{[DONE]}.
        """
        reply = self.client.chat.completions.create(
            model="ov-chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=4
        )
        self.assertEqual((reply.object, reply.model), ("chat.completion", "ov-chat"))
        chunks = list(
            self.client.chat.completions.create(
                model="ov-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
            )
        )
        self.assertGreaterEqual(len(chunks), 4)
        status, headers, body = self.daemon.post(
            "/v1/chat/completions",
            {"model": "ov-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2},
        )
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/event-stream"))
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))
        completion = self.client.completions.create(model="ov-chat", prompt="once upon", max_tokens=3)
        self.assertEqual(completion.object, "text_completion")

    def test_embeddingsAndRerank(self):
        """
        Embeddings and rerank reach OVMS's C{/v3/embeddings} and
        C{/v3/rerank}.
        """
        result = self.client.embeddings.create(model="ov-embed", input=["one", "two", "three"])
        self.assertEqual(len(result.data), 3)
        status, _, body = self.daemon.post(
            "/v1/rerank", {"model": "ov-rerank", "query": "fox", "documents": ["a fox", "a dog"]}
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(sorted(r["index"] for r in json.loads(body)["results"]), [0, 1])

    def test_transcriptionByteForByte(self):
        """
        A 3 MB upload through the SDK reaches OVMS's transcription and
        translation endpoints byte for byte (the fake answers with the
        file's SHA-256).
        """
        audio = os.urandom(3 * 1024 * 1024)
        digest = hashlib.sha256(audio).hexdigest()
        text = self.client.audio.transcriptions.create(model="ov-whisper", file=("speech.wav", audio)).text
        self.assertIn(f"{len(audio)} bytes sha256={digest}", text)
        text = self.client.audio.translations.create(model="ov-whisper", file=("speech.wav", audio)).text
        self.assertIn("translation", text)
        self.assertIn(digest, text)

    def test_speech(self):
        """
        Text to speech relays OVMS's binary WAV answer unchanged.
        """
        audio = self.client.audio.speech.create(model="ov-tts", input="Hello from dynllm", voice="alloy")
        data = audio.read()
        self.assertEqual((data[:4], data[8:12]), (b"RIFF", b"WAVE"))
        status, headers, direct = self.daemon.post("/v1/audio/speech", {"model": "ov-tts", "input": "Hello from dynllm"})
        self.assertEqual((status, headers["Content-Type"]), (200, "audio/wav"))
        self.assertEqual(direct, data)

    def test_responses(self):
        """
        OpenAI's Responses API reaches OVMS's C{/v3/responses}: one response
        object unless streaming is asked for, then C{data:} events (no
        C{event:} lines) that the SDK reads, from C{response.created} to
        C{response.completed}, and C{[DONE]}.
        """
        response = self.client.responses.create(model="ov-chat", input="hello there", max_output_tokens=4)
        self.assertEqual((response.object, response.model), ("response", "ov-chat"))
        self.assertEqual(response.output[-1].type, "message")
        events = list(self.client.responses.create(model="ov-chat", input="hello", max_output_tokens=4, stream=True))
        self.assertEqual(events[0].type, "response.created")
        self.assertIn("response.output_text.delta", [e.type for e in events])
        self.assertIn(events[-1].type, ("response.completed", "response.incomplete"))
        status, _, body = self.daemon.post("/v1/responses", {"model": "ov-chat", "input": "hi", "stream": True})
        self.assertEqual(status, 200)
        self.assertNotIn(b"event:", body)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))

    def test_tokenize(self):
        """
        C{/v1/tokenize} reaches OVMS's C{/v3/tokenize} for chat, embedding
        and rerank models.
        """
        for model in ("ov-chat", "ov-embed", "ov-rerank"):
            status, _, body = self.daemon.post("/v1/tokenize", {"model": model, "text": ["one two", "three"]})
            self.assertEqual(status, 200, body)
            self.assertEqual([len(t) for t in json.loads(body)["tokens"]], [2, 1])
        status, _, body = self.daemon.post("/v1/tokenize", {"model": "ov-whisper", "text": "x"})
        checkEnvelope(self, status, body, 400, "model_type_mismatch")

    def test_imageEdits(self):
        """
        An image edit, an upload of an image and a prompt, reaches OVMS's
        C{/v3/images/edits} through the SDK.
        """
        png = base64.b64decode(
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
        )
        result = self.client.images.edit(model="ov-sd", image=("in.png", png), prompt="add a hat", size="64x64")
        self.assertEqual(len(result.data), 1)
        self.assertTrue(base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG"))

    def test_images(self):
        """
        Image generation returns OVMS's base64 PNG images.
        """
        result = self.client.images.generate(model="ov-sd", prompt="a cat in a hat", n=2, size="64x64")
        self.assertEqual(len(result.data), 2)
        self.assertTrue(base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG"))

    def test_kserve(self):
        """
        KServe metadata and inference reach OVMS for the vision models.
        """
        status, _, body = self.daemon.get("/v2/models/ov-resnet")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["name"], "ov-resnet")
        request = {"id": "r1", "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        for path in ("/v2/models/ov-ocr/infer", "/v2/models/ov-ocr/versions/1/infer"):
            status, _, body = self.daemon.post(path, request)
            self.assertEqual(status, 200, body)
            answer = json.loads(body)
            self.assertEqual((answer["model_name"], answer["id"]), ("ov-ocr", "r1"))

    def test_typesPerEndpoint(self):
        """
        Each endpoint refuses models of the wrong type with a 400 envelope,
        without starting them.
        """
        cases = [
            ("/v1/audio/speech", {"model": "ov-chat", "input": "x"}),
            ("/v1/images/generations", {"model": "ov-tts", "prompt": "x"}),
            ("/v2/models/ov-chat/infer", {"inputs": []}),
            ("/v1/chat/completions", {"model": "ov-sd", "messages": []}),
        ]
        for path, body in cases:
            status, _, answer = self.daemon.post(path, body)
            checkEnvelope(self, status, answer, 400, "model_type_mismatch")
        self.assertTrue(all(m["status"] == "unloaded" for m in self.daemon.models().values()))

    def test_upstreamErrorRelayed(self):
        """
        OVMS's own errors (its C{{"error": "..."}} shape) come back with
        their status.
        """
        status, _, body = self.daemon.post("/v1/images/generations", {"model": "ov-sd", "prompt": "x", "size": "big"})
        self.assertEqual(status, 400)
        self.assertIsInstance(json.loads(body)["error"], str)


class ReadinessTests(SynchronousTestCase):
    """
    C{GET /v2/models/NAME/ready} through dynllm.
    """

    def test_readyDoesNotLoadOrKeepLoaded(self):
        """
        An unloaded model is reported ready (an inference would load it)
        without being loaded; a loaded one is asked; and polling C{/ready}
        does not keep a model from its idle unload.
        """
        directory = tempfile.mkdtemp(prefix="dynllm-ovms-")
        config = ovmsConfig(directory, {"ov-resnet": "classification"}, idle_check_interval_seconds=0.1)
        config["models"][0]["unload_time"] = 1
        daemon = Daemon(config, directory=directory).start()
        self.addCleanup(daemon.stop)
        status, headers, body = daemon.get("/v2/models/ov-resnet/ready")
        self.assertEqual((status, body, headers["X-Dynllm-Model-State"]), (200, b"", "unloaded"))
        self.assertEqual(daemon.models()["ov-resnet"]["status"], "unloaded")

        self.assertEqual(daemon.post("/admin/models/load", {"model": "ov-resnet"})[0], 200)
        status, headers, _ = daemon.get("/v2/models/ov-resnet/ready")
        self.assertEqual((status, headers["X-Dynllm-Model-State"]), (200, "loaded"))
        loadedAt = time.monotonic()
        # Poll /ready all along; the reaper still stops the model (the
        # status passes through "unloading" while its process exits).
        while daemon.models()["ov-resnet"]["status"] == "loaded" and time.monotonic() - loadedAt < 10:
            daemon.get("/v2/models/ov-resnet/ready")
            time.sleep(0.05)
        self.assertLess(time.monotonic() - loadedAt, 5)
        self.assertTrue(waitFor(lambda: daemon.models()["ov-resnet"]["status"] == "unloaded"))


class FailureTests(SynchronousTestCase):
    """
    OVMS failures are handled as for any backend.
    """

    def startDaemon(self, models, **overrides):
        directory = tempfile.mkdtemp(prefix="dynllm-ovms-")
        config = ovmsConfig(directory, models, **overrides)
        return directory, config

    def test_modelNeverLoads(self):
        """
        A model OVMS never makes available (it keeps running) fails its
        load after C{load_timeout_seconds} with a 504; its process is
        stopped, and C{/ready} then says 503.
        """
        directory, config = self.startDaemon({"ov-resnet": "classification"})
        config["models"][0].update(load_timeout_seconds=1, env={"FAKE_OVMS_FAIL_LOAD": "1"})
        daemon = Daemon(config, directory=directory).start()
        self.addCleanup(daemon.stop)
        status, _, body = daemon.post("/v2/models/ov-resnet/infer", {"inputs": []})
        checkEnvelope(self, status, body, 504)
        self.assertTrue(waitFor(lambda: daemon.models()["ov-resnet"]["status"] == "failed"))
        self.assertIsNone(daemon.models()["ov-resnet"]["pid"])
        status, _, body = daemon.get("/v2/models/ov-resnet/ready")
        checkEnvelope(self, status, body, 503, "model_failed")

    def test_badPathExits(self):
        """
        An OVMS that exits at start-up (a model path it cannot use) fails
        the request with a 502 that says it exited.
        """
        directory, config = self.startDaemon({"ov-chat": "llm"})
        daemon = Daemon(config, directory=directory).start()
        self.addCleanup(daemon.stop)
        # The directory existed when dynllm checked its configuration.
        os.rmdir(config["models"][0]["path"])
        status, _, body = daemon.post("/v1/chat/completions", {"model": "ov-chat", "messages": []})
        error = checkEnvelope(self, status, body, 502)
        self.assertIn("exited", error["message"])

    def test_evictionAndKill9(self):
        """
        The memory budget evicts OVMS models like any other, and after
        C{kill -9} of the daemon the OVMS dies with it (its parent-death
        signal), and a restart serves again.
        """
        directory, config = self.startDaemon({"ov-chat": "llm", "ov-embed": "embedding"}, total_vram_mb=150)
        first = Daemon(config, directory=directory).start()
        self.assertEqual(first.post("/admin/models/load", {"model": "ov-chat"})[0], 200)
        chatPid = first.models()["ov-chat"]["pid"]
        status, _, _ = first.post("/v1/embeddings", {"model": "ov-embed", "input": "x"})
        self.assertEqual(status, 200)
        self.assertFalse(pidAlive(chatPid))
        embedPid = first.models()["ov-embed"]["pid"]
        first.kill9()
        self.assertTrue(waitFor(lambda: not pidAlive(embedPid), timeout=5))
        second = Daemon(first.config, directory=directory)
        second.port, second.url = first.port, first.url
        second.start()
        self.addCleanup(second.stop)
        self.assertEqual(second.post("/v1/embeddings", {"model": "ov-embed", "input": "x"})[0], 200)

    def test_inheritedApiKeyIgnored(self):
        """
        An C{API_KEY} in dynllm's own environment does not reach OVMS (which
        would then refuse dynllm's requests on C{/v3}).
        """
        directory, config = self.startDaemon({"ov-embed": "embedding"})
        self.patch(os, "environ", dict(os.environ, API_KEY="secret"))
        daemon = Daemon(config, directory=directory).start()
        self.addCleanup(daemon.stop)
        status, _, body = daemon.post("/v1/embeddings", {"model": "ov-embed", "input": "x"})
        self.assertEqual(status, 200, body)
