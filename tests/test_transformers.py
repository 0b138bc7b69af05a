"""
Integration tests of the transformers backend: a real dynllm daemon in front
of real C{transformers serve} processes (CPU torch) serving tiny
random-weight models that the project generates, offline. Clients are the
official C{openai} SDK and plain HTTP.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import wave

import openai
from twisted.trial.unittest import SynchronousTestCase

from tests.support import (
    Daemon,
    checkEnvelope,
    commandLine,
    pidAlive,
    tinyHFModels,
    transformersServe,
)


def unicodePath() -> str:
    """
    @return: a path to the tiny chat model whose name is not plain ASCII (a
        link to it), so that backends write it in more than one JSON
        spelling.
    """
    target = tinyHFModels()["llm"]
    path = os.path.join(os.path.dirname(target), "mod\u00e8le \u6a21\u578b")
    if not os.path.islink(path):
        try:
            os.symlink(target, path)
        except FileExistsError:
            pass
    return path


def transformersConfig(**overrides):
    """
    @return: a configuration with the tiny chat and Whisper models served by
        the real C{transformers serve}, and the chat model once more under a
        path that is not plain ASCII.
    """
    models = tinyHFModels()
    config = {
        "total_vram_mb": 1000,
        "enabled_backends": ["transformers"],
        "load_timeout_seconds": 120,
        "backend": {"transformers_binary": transformersServe()},
        "models": [
            {"name": "hf-chat", "path": models["llm"], "backend": "transformers", "vram_mb": 300,
             "device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"},
            {"name": "hf-whisper", "path": models["whisper"], "backend": "transformers",
             "model_type": "transcription", "vram_mb": 300, "device": "cpu", "dtype": "float32"},
            {"name": "hf-unicode", "path": unicodePath(), "backend": "transformers", "vram_mb": 300,
             "device": "cpu", "dtype": "float32"},
        ],
    }
    config.update(overrides)
    return config


def sineWAV(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """
    @return: a mono 16-bit WAV file of a 440 Hz tone.
    """
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = int(seconds * rate)
        w.writeframes(b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(frames)
        ))
    return out.getvalue()


_shared: Daemon | None = None


def sharedDaemon() -> Daemon:
    """
    @return: one daemon for the tests that only send requests: each model
        takes seconds to load (Python imports), so they load once. It is
        stopped (SIGTERM, so that it stops its backends) when the test run
        exits.
    """
    global _shared
    if _shared is None:
        _shared = Daemon(transformersConfig()).start()
    return _shared


class TransformersTests(SynchronousTestCase):
    """
    Chat, completions and transcription through dynllm and a real
    C{transformers serve}; the client only ever sees the public names.

    One daemon serves every test of this class (see L{sharedDaemon}).
    """

    def setUp(self):
        self.daemon = sharedDaemon()
        self.client = openai.OpenAI(base_url=self.daemon.url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(self.client.close)

    def test_chat(self):
        """
        A non-streamed chat loads the model (pinned, on 127.0.0.1) and
        answers under the public name, not the model's path.
        """
        reply = self.client.chat.completions.create(
            model="hf-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=5
        )
        self.assertEqual((reply.object, reply.model), ("chat.completion", "hf-chat"))
        self.assertEqual(reply.usage.completion_tokens, 5)
        entry = self.daemon.models()["hf-chat"]
        args = commandLine(entry["pid"])
        self.assertIn(tinyHFModels()["llm"], args)
        self.assertEqual(args[args.index("--host") + 1], "127.0.0.1")
        self.assertEqual(args[args.index("--model-timeout") + 1], "-1")

    def test_chatStream(self):
        """
        A streamed chat arrives as SSE chunks naming the public name; the
        stream ends without C{[DONE]} (transformers sends none) and the SDK
        still reads it whole.
        """
        chunks = list(
            self.client.chat.completions.create(
                model="hf-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True
            )
        )
        self.assertEqual({c.model for c in chunks}, {"hf-chat"})
        self.assertEqual(chunks[-1].choices[0].finish_reason, "length")
        status, headers, body = self.daemon.post(
            "/v1/chat/completions",
            {"model": "hf-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        )
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/event-stream"))
        self.assertNotIn(tinyHFModels()["llm"].encode(), body)
        self.assertIn(b'"model": "hf-chat"', body.replace(b'"model":"', b'"model": "'))

    def test_responses(self):
        """
        OpenAI's Responses API, streamed (transformers' default) and not,
        answers under the public name.
        """
        response = self.client.responses.create(model="hf-chat", input="Hello", max_output_tokens=5, stream=False)
        self.assertEqual((response.object, response.model), ("response", "hf-chat"))
        self.assertEqual(response.output[-1].type, "message")
        events = list(self.client.responses.create(model="hf-chat", input="Hello", max_output_tokens=5, stream=True))
        self.assertEqual(events[0].type, "response.created")
        self.assertEqual(events[-1].type, "response.completed")
        self.assertEqual(events[-1].response.model, "hf-chat")
        status, _, body = self.daemon.post("/v1/responses", {"model": "hf-chat", "input": "Hi", "max_output_tokens": 3})
        self.assertEqual(status, 200)
        self.assertIn(b"response.output_text.delta", body)  # streamed by default
        self.assertNotIn(tinyHFModels()["llm"].encode(), body)

    def test_pathNotASCII(self):
        """
        A model whose path is not plain ASCII is renamed in every answer
        (transformers writes the name as raw UTF-8): the client never sees
        the path.
        """
        path = unicodePath()
        spellings = [json.dumps(path).encode(), json.dumps(path, ensure_ascii=False).encode(),
                     os.path.basename(path).encode()]
        for route, body in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                      "stream": True}),
            ("/v1/responses", {"input": "Hi", "max_output_tokens": 3}),
        ]:
            status, _, answer = self.daemon.post(route, dict(body, model="hf-unicode"))
            self.assertEqual(status, 200, answer)
            self.assertIn(b"hf-unicode", answer)
            for spelling in spellings:
                self.assertNotIn(spelling, answer, route)

    def test_completions(self):
        """
        C{/v1/completions} works too, under the public name.
        """
        reply = self.client.completions.create(model="hf-chat", prompt="the quick", max_tokens=3)
        self.assertEqual((reply.object, reply.model), ("text_completion", "hf-chat"))

    def test_transcription(self):
        """
        A WAV upload through the SDK is transcribed by the pinned Whisper
        model (dynllm puts the model's path in the upload's C{model} field).
        """
        result = self.client.audio.transcriptions.create(model="hf-whisper", file=("tone.wav", sineWAV()))
        self.assertIsInstance(result.text, str)
        self.assertGreater(len(result.text), 0)

    def test_translationsRefused(self):
        """
        transformers serves no translations: a 400 envelope, before any
        load.
        """
        status, _, body = self.daemon.post(
            "/v1/audio/translations",
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nhf-whisper\r\n--b--\r\n',
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
        checkEnvelope(self, status, body, 400, "unsupported_endpoint")

    def test_upstreamErrorRelayed(self):
        """
        transformers' own error for a bad request (an unknown field) comes
        back with its status.
        """
        status, _, body = self.daemon.post(
            "/v1/chat/completions", {"model": "hf-chat", "messages": [{"role": "user", "content": "x"}], "foo": 1}
        )
        self.assertEqual(status, 422)
        self.assertIn("foo", json.loads(body)["detail"])


class LifecycleTests(SynchronousTestCase):
    """
    A transformers backend's process is stopped for good, as any other.
    """

    def test_unloadAndStop(self):
        """
        An unloaded transformers model's process group is gone, and so is
        a loaded one's after the daemon's SIGTERM.
        """
        daemon = Daemon(transformersConfig())
        daemon.start()
        self.addCleanup(daemon.stop)
        self.assertEqual(daemon.post("/admin/models/load", {"model": "hf-chat"})[0], 200)
        pid = daemon.models()["hf-chat"]["pid"]
        self.assertEqual(daemon.post("/admin/models/unload", {"model": "hf-chat"})[0], 200)
        self.assertFalse(pidAlive(pid))
        self.assertEqual(daemon.post("/admin/models/load", {"model": "hf-chat"})[0], 200)
        pid = daemon.models()["hf-chat"]["pid"]
        self.assertEqual(daemon.stop(), -15)
        self.assertFalse(pidAlive(pid))
        self.assertIn("execution backends: ['cpu']", daemon.log())
