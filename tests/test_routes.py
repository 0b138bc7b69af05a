"""
The HTTP routes, in memory: C{treq.testing.StubTreq} is the client, and the
relay reaches a fake backend resource through treq's
C{RequestTraversalAgent}, with a stub in place of the scheduler.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

from attrs import evolve
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource

from dynllm import endpoints
from dynllm.config import parseConfig
from dynllm.exceptions import ModelBusy, NoCapacity
from dynllm.routes import DynLLMRoutes
from dynllm import exceptions
from dynllm.lease import RequestOptions
from dynllm.testing import StubManager
from dynllm.bodies import INLINE_BYTES, MAX_DEPTH, BodyExaminer
from dynllm.site import DynLLMSite
from tests.support import checkEnvelope
from tests.test_site import Response


class FakeBackendResource(resource.Resource):
    """
    Records requests and answers them as a backend would.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.uris = []
        self.status = 200
        self.body = b'{"object": "chat.completion"}'

    def render(self, request):
        self.requests.append(
            (request.method, request.path, dict(request.requestHeaders.getAllRawHeaders()), request.content.read())
        )
        self.uris.append(request.uri)
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


class RoutesTestCase(SynchronousTestCase):
    """
    Routes on a configuration, in front of a L{FakeBackendResource} and a
    L{StubManager}.
    """

    def serve(self, config):
        """
        Serve the routes of C{config}.
        """
        self.config = config
        self.backend = FakeBackendResource()
        self.manager = StubManager(self.config)
        self.manager.logs = {model.name: ["line one", "line two"] for model in self.config.models}
        self.clock = Clock()
        self.agent = RequestTraversalAgent(self.backend)
        self.routes = DynLLMRoutes(config=self.config, manager=self.manager, agent=self.agent, clock=self.clock)
        self.client = StubTreq(self.routes.resource())

    def call(self, method, path, body=None, headers=None):
        """
        @return: C{(status, headers, body)} of a request to the routes.
        """
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        d = self.client.request(method, "http://dynllm" + path, data=data, headers=headers)
        responses, contents = [], []
        d.addCallback(lambda response: responses.append(response) or self.client.content(response))
        d.addCallback(contents.append)
        for _ in range(100):
            self.client.flush()
            self.agent.flush()
            if contents:
                break
            self.clock.advance(0)
        self.successResultOf(d)
        response, content = responses[0], contents[0]
        return response.code, response.headers, content

    def assertEnvelope(self, result, status, code=None):
        """
        Assert that C{result} is an OpenAI error envelope with C{status}.
        """
        return checkEnvelope(self, result[0], result[2], status, code)


class RoutesTests(RoutesTestCase):
    """
    What the API answers, and what reaches the backend.
    """

    def setUp(self):
        self.directory = directory = self.mktemp()
        os.makedirs(directory)
        for name in ("chat.gguf", "emb.gguf"):
            open(os.path.join(directory, name), "w").close()
        self.raw = {
            "enabled_backends": ["llamacpp"],
            "server": {"admin_api_keys": ["admin"]},
            "models": [
                {"name": "chat", "path": "chat.gguf", "backend": "llamacpp", "vram_mb": 1},
                {"name": "emb", "path": "emb.gguf", "backend": "llamacpp", "vram_mb": 1,
                 "model_type": "embedding"},
            ],
        }
        self.serve(parseConfig(self.raw, directory, which=lambda name: "/bin/true"))

    def test_listModels(self):
        """
        C{GET /v1/models} (and C{/models}) lists the configured models in
        OpenAI's format, plus C{model_type}, C{status} and C{aliases};
        C{created} is the model file's modification time.
        """
        os.utime(self.config.model("chat").path, (1700000000, 1700000000))
        self.serve(parseConfig(self.raw, self.directory, which=lambda name: "/bin/true"))
        self.manager.states["emb"] = "loaded"
        for path in ("/v1/models", "/models"):
            status, _, body = self.call("GET", path)
            self.assertEqual(status, 200)
            listed = json.loads(body)
            self.assertEqual(listed["object"], "list")
            chat, emb = listed["data"]
            self.assertEqual(
                chat,
                {"id": "chat", "object": "model", "created": 1700000000, "owned_by": "dynllm",
                 "model_type": "llm", "status": "unloaded", "aliases": []},
            )
            self.assertEqual((emb["id"], emb["model_type"], emb["status"]), ("emb", "embedding", "loaded"))

    def test_retrieveUnknownModel(self):
        """
        C{GET /v1/models/NAME} of an unknown model is a 404 envelope.
        """
        self.assertEnvelope(self.call("GET", "/v1/models/nope"), 404, "model_not_found")

    def test_relay(self):
        """
        A chat request reaches the backend at the same path with the same
        body, the backend's answer comes back, and the lease is released.
        """
        body = {"model": "chat", "messages": []}
        status, headers, content = self.call(
            "POST", "/v1/chat/completions", body, {"X-Trace": "1", "Authorization": "Bearer k"}
        )
        self.assertEqual((status, content), (200, b'{"object": "chat.completion"}'))
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        ((method, path, sent, received),) = self.backend.requests
        self.assertEqual((method, path, json.loads(received)), (b"POST", b"/v1/chat/completions", body))
        self.assertEqual(sent[b"X-Trace"], [b"1"])
        self.assertEqual(self.manager.released, 1)

    def test_relaySendsBackendKey(self):
        """
        The backend gets the lease's key as C{Authorization: Bearer KEY},
        and none of the client's credentials (C{Authorization},
        C{X-Api-Key}, C{api-key}, C{Cookie}).
        """
        credentials = {"Authorization": "Bearer client", "X-Api-Key": "client", "Api-Key": "client",
                       "Cookie": "session=client"}
        status = self.call("POST", "/v1/chat/completions", {"model": "chat", "messages": []}, credentials)[0]
        self.assertEqual(status, 200)
        sent = self.backend.requests[-1][2]
        self.assertEqual(sent[b"Authorization"], [b"Bearer backend-key"])
        for name in (b"X-Api-Key", b"Api-Key", b"Cookie"):
            self.assertNotIn(name, sent)

    def test_relayWithoutBackendKey(self):
        """
        For a backend without a key (the lease has none), no
        C{Authorization} is sent at all, not even the client's.
        """
        self.manager.apiKey = None
        self.call("POST", "/v1/chat/completions", {"model": "chat", "messages": []}, {"Authorization": "Bearer k"})
        self.assertNotIn(b"Authorization", self.backend.requests[-1][2])

    def test_backendErrorRelayed(self):
        """
        A backend's error status and body reach the client unchanged.
        """
        self.backend.status = 400
        self.backend.body = b'{"error": {"message": "bad"}}'
        self.assertEqual(self.call("POST", "/v1/embeddings", {"model": "emb", "input": "x"})[::2],
                         (400, b'{"error": {"message": "bad"}}'))

    def test_badJSON(self):
        """
        A body that is not JSON, or not an object, is a 400.
        """
        self.assertEnvelope(self.call("POST", "/v1/chat/completions", b"{nope"), 400, "invalid_json")
        self.assertEnvelope(self.call("POST", "/v1/chat/completions", b"[1]"), 400, "invalid_json")

    def test_missingModel(self):
        """
        A body without a string C{model} is a 400 naming C{model}.
        """
        error = self.assertEnvelope(self.call("POST", "/v1/completions", {"prompt": "x"}), 400)
        self.assertEqual(error["param"], "model")

    def test_unknownModel(self):
        """
        An unknown model is a 404, and nothing is leased.
        """
        self.assertEnvelope(self.call("POST", "/v1/chat/completions", {"model": "nope"}), 404, "model_not_found")
        self.assertEqual(self.manager.leases, [])

    def test_typeMismatch(self):
        """
        A model of another type than the endpoint serves is a 400.
        """
        error = self.assertEnvelope(
            self.call("POST", "/v1/chat/completions", {"model": "emb"}), 400, "model_type_mismatch"
        )
        self.assertIn("embedding", error["message"])
        self.assertEnvelope(self.call("POST", "/v1/rerank", {"model": "chat"}), 400, "model_type_mismatch")

    def test_schedulerErrors(self):
        """
        An error from the scheduler (here a 503) is answered in the envelope
        with its C{Retry-After}.
        """
        self.manager.failure = NoCapacity("chat", 1, 0, 1, 5.0, ("emb",), retryAfter=5)
        status, headers, _ = result = self.call("POST", "/v1/chat/completions", {"model": "chat"})
        self.assertEnvelope(result, 503, "model_capacity")
        self.assertEqual(headers.getRawHeaders("retry-after"), ["5"])

    def test_domainErrorsMapped(self):
        """
        Each exception of the scheduler is answered with its status and
        code in the envelope, in one place: unknown model 404, busy 409,
        load failed 502, load timed out 504, no capacity 503 with its
        C{Retry-After}, shutting down 503.
        """
        cases = [
            (exceptions.UnknownModel("chat"), 404, "model_not_found"),
            (exceptions.LoadFailed("chat", "it died", ("last line",)), 502, "backend_error"),
            (exceptions.LoadTimedOut("chat", 30), 504, "load_timeout"),
            (exceptions.NoCapacity("chat", 600, 400, 1000, 60, ("a",), 7), 503, "model_capacity"),
            (exceptions.ShuttingDown(), 503, "shutting_down"),
        ]
        for error, status, code in cases:
            self.manager.failure = error
            result = self.call("POST", "/v1/chat/completions", {"model": "chat"})
            message = self.assertEnvelope(result, status, code)["message"]
            if isinstance(error, exceptions.LoadFailed):
                # Not the output: where it is.
                self.assertEqual(message, "it died; its backend's output is at /admin/models/chat/logs and in dynllm's log")
            else:
                self.assertEqual(message, str(error))
        self.assertEqual(result[1].getRawHeaders("retry-after"), None)
        self.manager.failure = cases[3][0]
        self.assertEqual(self.call("POST", "/v1/chat/completions", {"model": "chat"})[1].getRawHeaders("retry-after"), ["7"])
        self.manager.unloadFailure = exceptions.ModelBusy("chat", activeRequests=2)
        self.assertEnvelope(self.call("POST", "/admin/models/unload", {"model": "chat"}, {"Authorization": "Bearer admin"}), 409, "model_busy")
        self.manager.unloadFailure = exceptions.ModelBusy("chat", loading=True)
        self.assertEnvelope(self.call("POST", "/admin/models/unload", {"model": "chat"}, {"Authorization": "Bearer admin"}), 409, "model_loading")

    def test_controlHeaders(self):
        """
        C{X-DynLLM-Queue-Timeout}, C{X-DynLLM-Priority} and
        C{X-DynLLM-Keep-Alive} reach the scheduler as the request's
        L{RequestOptions}, and never reach the backend.
        """
        headers = {"X-DynLLM-Queue-Timeout": "0", "X-DynLLM-Priority": "-3", "X-DynLLM-Keep-Alive": "-1"}
        status, _, _ = self.call("POST", "/v1/chat/completions", {"model": "chat"}, headers)
        self.assertEqual(status, 200)
        self.assertEqual(self.manager.options[-1], ("chat", RequestOptions(queueTimeout=0.0, priority=-3, keepAlive=-1.0)))
        sent = {name.lower() for name in self.backend.requests[-1][2]}
        self.assertFalse(sent & {b"x-dynllm-queue-timeout", b"x-dynllm-priority", b"x-dynllm-keep-alive"})
        self.call("POST", "/v1/chat/completions", {"model": "chat"})
        self.assertEqual(self.manager.options[-1], ("chat", RequestOptions()))

    def test_badControlHeader(self):
        """
        A control header with a bad value is a 400 naming the header, and
        nothing is acquired for the request.
        """
        for name, value in [
            ("X-DynLLM-Queue-Timeout", "soon"),
            ("X-DynLLM-Queue-Timeout", "-1"),
            ("X-DynLLM-Priority", "1.5"),
            ("X-DynLLM-Keep-Alive", "-2"),
            ("X-DynLLM-Keep-Alive", "inf"),
        ]:
            before = len(self.manager.options)
            result = self.call("POST", "/v1/chat/completions", {"model": "chat"}, {name: value})
            self.assertEqual(self.assertEnvelope(result, 400, "invalid_header")["param"], name)
            self.assertEqual(len(self.manager.options), before)

    def test_unknownRouteAndMethod(self):
        """
        An unknown path is a 404 envelope and a wrong method a 405.
        """
        self.assertEnvelope(self.call("GET", "/nothing"), 404)
        self.assertEnvelope(self.call("GET", "/v1/embeddings"), 405)

    def test_healthWhileStarting(self):
        """
        C{/health} is 503 until start-up reconciliation is done, then 200.
        """
        self.manager.started = False
        self.assertEqual(self.call("GET", "/health")[0], 503)
        self.manager.started = True
        self.assertEqual(self.call("GET", "/health")[0], 200)

    def test_adminNeedsAdminKey(self):
        """
        C{/admin} routes need the admin key.
        """
        self.assertEnvelope(self.call("GET", "/admin/models"), 401, "invalid_api_key")
        status, _, body = self.call("GET", "/admin/models", headers={"Authorization": "Bearer admin"})
        self.assertEqual(status, 200)
        self.assertEqual([m["name"] for m in json.loads(body)["models"]], ["chat", "emb"])

    def test_adminUnloadBusy(self):
        """
        An unload refused by the scheduler (409) is answered in the envelope.
        """
        self.manager.unloadFailure = ModelBusy("chat", activeRequests=1)
        result = self.call("POST", "/admin/models/unload", {"model": "chat"}, {"Authorization": "Bearer admin"})
        self.assertEnvelope(result, 409, "model_busy")

    def test_adminUnload(self):
        """
        C{POST /admin/models/unload} of a loaded model unloads it and
        answers with its new state.
        """
        self.manager.states["chat"] = "loaded"
        status, _, body = self.call(
            "POST", "/admin/models/unload", {"model": "chat"}, {"Authorization": "Bearer admin"}
        )
        self.assertEqual((status, json.loads(body)), (200, {"model": "chat", "status": "unloaded"}))
        self.assertEqual(self.manager.unloaded, ["chat"])
        self.assertEqual(self.manager.describe("chat")["status"], "unloaded")

    def test_adminLoad(self):
        """
        C{POST /admin/models/load} loads the model and answers with its new
        state.
        """
        status, _, body = self.call(
            "POST", "/admin/models/load", {"model": "chat"}, {"Authorization": "Bearer admin"}
        )
        self.assertEqual((status, json.loads(body)), (200, {"model": "chat", "status": "loaded"}))
        self.assertEqual(self.manager.loaded, ["chat"])

    def test_metrics(self):
        """
        C{/metrics} (admin key) serves Prometheus text that counts each
        finished request by model, route and status, and times it.
        """
        self.call("POST", "/v1/chat/completions", {"model": "chat", "messages": []})
        self.backend.status = 400
        self.call("POST", "/v1/chat/completions", {"model": "chat"})
        self.call("POST", "/v1/chat/completions", {"model": "nope"})
        self.assertEqual(self.call("GET", "/metrics")[0], 401)
        status, headers, body = self.call("GET", "/metrics", headers={"Authorization": "Bearer admin"})
        self.assertEqual(status, 200)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/plain; version=0.0.4"))
        text = body.decode()
        self.assertIn('dynllm_requests_total{code="200",model="chat",route="/v1/chat/completions"} 1.0', text)
        self.assertIn('dynllm_requests_total{code="400",model="chat",route="/v1/chat/completions"} 1.0', text)
        self.assertIn('dynllm_request_duration_seconds_count{model="chat",route="/v1/chat/completions"} 2.0', text)
        self.assertNotIn('model="nope"', text)
        self.assertIn("dynllm_vram_total_bytes", text)

    def test_adminLogs(self):
        """
        C{/admin/models/NAME/logs?lines=N} is the model's last output lines
        as plain text; a bad C{lines} is a 400.
        """
        admin = {"Authorization": "Bearer admin"}
        status, headers, body = self.call("GET", "/admin/models/chat/logs?lines=1", headers=admin)
        self.assertEqual((status, body), (200, b"line two\n"))
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        self.assertEnvelope(self.call("GET", "/admin/models/chat/logs?lines=x", headers=admin), 400)


def multipartBody(fields, boundary=b"b0undary"):
    """
    @param fields: C{(name, value, filename)} triples.
    @return: C{(body, content type)} of a multipart/form-data upload.
    """
    out = b""
    for name, value, filename in fields:
        disposition = b'form-data; name="' + name.encode() + b'"'
        if filename:
            disposition += b'; filename="' + filename.encode() + b'"'
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    out += b"--" + boundary + b"--\r\n"
    return out, b"multipart/form-data; boundary=" + boundary


class EveryEndpointTests(RoutesTestCase):
    """
    Every endpoint of the spec, for models of the three backends: which
    model types each accepts, the upstream path each backend gets, and the
    renaming of the model for transformers.
    """

    MODELS = [
        ("llama", "llamacpp", "llm"),
        ("ov-chat", "openvino", "llm"),
        ("ov-emb", "openvino", "embedding"),
        ("ov-rerank", "openvino", "rerank"),
        ("ov-whisper", "openvino", "transcription"),
        ("ov-tts", "openvino", "speech"),
        ("ov-sd", "openvino", "image_generation"),
        ("ov-ocr", "openvino", "ocr"),
        ("ov-resnet", "openvino", "classification"),
        ("hf-chat", "transformers", "llm"),
        ("hf-whisper", "transformers", "transcription"),
    ]

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        models = []
        for name, backend, kind in self.MODELS:
            os.makedirs(os.path.join(self.directory, name))
            models.append({"name": name, "path": name, "backend": backend, "vram_mb": 1, "model_type": kind})
        self.serve(
            parseConfig(
                {"enabled_backends": ["llamacpp", "openvino", "transformers"], "models": models},
                self.directory,
                which=lambda name: "/bin/true",
            )
        )

    def path(self, name):
        return os.path.join(self.directory, name)

    def test_openvinoPaths(self):
        """
        Each OpenAI endpoint reaches OVMS at its C{/v3} path with the body
        unchanged.
        """
        cases = [
            ("/v1/chat/completions", "ov-chat", "/v3/chat/completions"),
            ("/v1/completions", "ov-chat", "/v3/completions"),
            ("/v1/embeddings", "ov-emb", "/v3/embeddings"),
            ("/v1/rerank", "ov-rerank", "/v3/rerank"),
            ("/v1/audio/speech", "ov-tts", "/v3/audio/speech"),
            ("/v1/images/generations", "ov-sd", "/v3/images/generations"),
        ]
        for route, model, upstream in cases:
            body = json.dumps({"model": model, "input": "x"}).encode()
            self.assertEqual(self.call("POST", route, body)[0], 200, route)
            method, path, _, received = self.backend.requests[-1]
            self.assertEqual((path, received), (upstream.encode(), body))

    def test_typesPerEndpoint(self):
        """
        Each endpoint refuses, with a 400 envelope naming the types it
        serves, models of any other type.
        """
        cases = [
            ("/v1/audio/speech", "ov-chat", "speech"),
            ("/v1/images/generations", "ov-tts", "image_generation"),
            ("/v1/embeddings", "ov-rerank", "embedding"),
            ("/v1/chat/completions", "ov-whisper", "llm"),
        ]
        for route, model, served in cases:
            error = self.assertEnvelope(self.call("POST", route, {"model": model}), 400, "model_type_mismatch")
            self.assertIn(served, error["message"])
        body, contentType = multipartBody([("model", b"ov-chat", None), ("file", b"RIFF", "a.wav")])
        self.assertEnvelope(
            self.call("POST", "/v1/audio/transcriptions", body, {"Content-Type": contentType}),
            400,
            "model_type_mismatch",
        )
        self.assertEqual(self.backend.requests, [])
        self.assertEqual(self.manager.leases, [])

    def test_transcriptionPassesThrough(self):
        """
        A transcription upload reaches OVMS byte for byte, at
        C{/v3/audio/transcriptions}, with its own Content-Type.
        """
        audio = os.urandom(200000)
        body, contentType = multipartBody(
            [("file", audio, "speech.wav"), ("model", b"ov-whisper", None), ("language", b"en", None)]
        )
        for route in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            status, _, _ = self.call("POST", route, body, {"Content-Type": contentType})
            self.assertEqual(status, 200)
            _, path, headers, received = self.backend.requests[-1]
            self.assertEqual(path, route.replace("/v1/", "/v3/").encode())
            self.assertEqual(received, body)
            self.assertEqual(headers[b"Content-Type"], [contentType])

    def test_transcriptionRenamed(self):
        """
        For transformers, only the C{model} field's value changes on the way
        up: to the model's path. The rest of the upload is unchanged.
        """
        audio = os.urandom(5000)
        body, contentType = multipartBody([("model", b"hf-whisper", None), ("file", audio, "a.wav")])
        self.backend.body = json.dumps({"text": "hi", "model": self.path("hf-whisper")}).encode()
        status, _, answer = self.call("POST", "/v1/audio/transcriptions", body, {"Content-Type": contentType})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(answer), {"text": "hi", "model": "hf-whisper"})
        _, path, _, received = self.backend.requests[-1]
        self.assertEqual(path, b"/v1/audio/transcriptions")
        self.assertEqual(received, body.replace(b"hf-whisper", self.path("hf-whisper").encode()))

    def test_multipartErrors(self):
        """
        An upload without a C{model} field, or that is not multipart, is a
        400 envelope.
        """
        body, contentType = multipartBody([("file", b"RIFF", "a.wav")])
        error = self.assertEnvelope(
            self.call("POST", "/v1/audio/transcriptions", body, {"Content-Type": contentType}), 400
        )
        self.assertEqual(error["param"], "model")
        self.assertEnvelope(
            self.call("POST", "/v1/audio/transcriptions", b"{}", {"Content-Type": "application/json"}),
            400,
            "invalid_multipart",
        )

    def test_unsupportedByBackend(self):
        """
        An endpoint that fits the model's type but that its backend does
        not serve (transformers has no translations) is a 400 envelope.
        """
        body, contentType = multipartBody([("model", b"hf-whisper", None), ("file", b"x", "a.wav")])
        error = self.assertEnvelope(
            self.call("POST", "/v1/audio/translations", body, {"Content-Type": contentType}),
            400,
            "unsupported_endpoint",
        )
        self.assertIn("transformers", error["message"])

    def test_transformersRenamed(self):
        """
        A chat request for a transformers model reaches the backend naming
        the model's path, and the path is renamed back to the public name
        in the answer, whose Content-Length fits the new body.
        """
        path = self.path("hf-chat")
        self.backend.body = json.dumps({"model": path, "choices": [], "note": "x"}).encode()
        status, headers, answer = self.call("POST", "/v1/chat/completions", {"model": "hf-chat", "messages": []})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(answer), {"model": "hf-chat", "choices": [], "note": "x"})
        self.assertNotEqual(headers.getRawHeaders("content-length"), [str(len(self.backend.body))])
        received = json.loads(self.backend.requests[-1][3])
        self.assertEqual(received, {"model": path, "messages": []})

    def test_kserve(self):
        """
        KServe metadata and inference reach OVMS at the same path, for the
        vision model types only.
        """
        infer = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
        for method, route, body in [
            ("GET", "/v2/models/ov-ocr", None),
            ("GET", "/v2/models/ov-ocr/versions/1", None),
            ("POST", "/v2/models/ov-resnet/infer", infer),
            ("POST", "/v2/models/ov-resnet/versions/1/infer", infer),
        ]:
            self.assertEqual(self.call(method, route, body)[0], 200, route)
            sent = self.backend.requests[-1]
            self.assertEqual((sent[0], sent[1]), (method.encode(), route.encode()))
            if body is not None:
                self.assertEqual(json.loads(sent[3]), infer)
        self.assertEnvelope(self.call("POST", "/v2/models/ov-chat/infer", infer), 400, "model_type_mismatch")
        metrics = self.routes.metrics.render().decode()
        self.assertIn('code="200",model="ov-resnet",route="/v2/models/{name}/infer"} 2.0', metrics)
        self.assertIn('code="200",model="ov-ocr",route="/v2/models/{name}"} 2.0', metrics)
        self.assertEnvelope(self.call("GET", "/v2/models/nope"), 404, "model_not_found")

    def test_readyDoesNotLoad(self):
        """
        C{/v2/models/NAME/ready} of a model that is not loaded answers 200
        with its state in a header, without loading it.
        """
        for route in ("/v2/models/ov-ocr/ready", "/v2/models/ov-ocr/versions/1/ready"):
            status, headers, body = self.call("GET", route)
            self.assertEqual((status, body), (200, b""))
            self.assertEqual(headers.getRawHeaders("x-dynllm-model-state"), ["unloaded"])
        self.assertEqual(self.manager.leases, [])
        self.assertEqual(self.backend.requests, [])

    def test_readyLoadedAsksBackend(self):
        """
        For a loaded model, the backend answers C{/ready}, through a lease
        that does not count as a use, asked with the backend's key.
        """
        self.manager.states["ov-ocr"] = "loaded"
        self.backend.status = 404
        self.backend.body = b'{"error": "Model with requested version is not loaded yet"}'
        status, headers, body = self.call("GET", "/v2/models/ov-ocr/ready")
        self.assertEqual((status, body), (404, self.backend.body))
        self.assertEqual(headers.getRawHeaders("x-dynllm-model-state"), ["loaded"])
        self.assertEqual(self.backend.requests[-1][1], b"/v2/models/ov-ocr/ready")
        self.assertEqual(self.backend.requests[-1][2][b"Authorization"], [b"Bearer backend-key"])
        self.assertEqual((self.manager.leases, self.manager.released), ([], 1))

    def test_readyFailed(self):
        """
        C{/ready} of a model whose last load failed is a 503 envelope that
        says why.
        """
        self.manager.states["ov-ocr"] = "failed"
        self.manager.lastErrors["ov-ocr"] = "it broke"
        error = self.assertEnvelope(self.call("GET", "/v2/models/ov-ocr/ready"), 503, "model_failed")
        self.assertIn("it broke", error["message"])


class TableTests(EveryEndpointTests):
    """
    Every endpoint of L{endpoints.ENDPOINTS}, at every one of its paths, for
    a model of every type on every backend.
    """

    def request(self, endpoint, path, model):
        """
        @return: the answer to a request for C{model} at C{path}, with the
            model named where C{endpoint} expects it.
        """
        if endpoint.modelIn == endpoints.JSON:
            return self.call(endpoint.method, path, {"model": model, "input": "x"})
        if endpoint.modelIn == endpoints.MULTIPART:
            body, contentType = multipartBody([("model", model.encode(), None), ("file", b"RIFF", "a.wav")])
            return self.call(endpoint.method, path, body, {"Content-Type": contentType})
        return self.call(endpoint.method, f"{path}?model={model}")

    def assertRefused(self, endpoint, result, code):
        """
        Assert that C{result} is a 400 with C{code} in the shape of
        C{endpoint}'s API (Anthropic's has no code, only a type).
        """
        if endpoint.api == endpoints.ANTHROPIC:
            self.assertEqual(result[0], 400)
            self.assertEqual(json.loads(result[2])["error"]["type"], "invalid_request_error")
        else:
            self.assertEnvelope(result, 400, code)

    def test_everyEndpoint(self):
        """
        A model of a type the endpoint serves, on a backend that serves it,
        reaches the backend at the table's upstream path; a model of another
        type is a 400 C{model_type_mismatch}; a backend that does not serve
        the endpoint is a 400 C{unsupported_endpoint}. Nothing is leased for
        a refused request.
        """
        checked = 0
        for endpoint in endpoints.ENDPOINTS:
            if endpoint.modelIn == endpoints.PATH:
                continue
            for path in endpoint.paths:
                for name, backend, kind in self.MODELS:
                    leases = len(self.manager.leases)
                    result = self.request(endpoint, path, name)
                    if kind not in endpoint.modelTypes:
                        self.assertRefused(endpoint, result, "model_type_mismatch")
                    elif backend not in endpoint.upstream:
                        self.assertRefused(endpoint, result, "unsupported_endpoint")
                    else:
                        self.assertEqual(result[0], 200, (path, name))
                        method, sent, _, _ = self.backend.requests[-1]
                        expected = endpoints.upstreamPath(backend, endpoint.path)
                        self.assertEqual((method, sent), (endpoint.method.encode(), expected.encode()))
                        checked += 1
                        continue
                    self.assertEqual(len(self.manager.leases), leases, (path, name))
        self.assertGreater(checked, 40)

    def test_unversionedSpellings(self):
        """
        llama-server's unversioned spellings reach a llama.cpp model at the
        path of their C{/v1} form, and other backends' models at theirs.
        """
        for path, model, upstream in [
            ("/chat/completions", "llama", b"/v1/chat/completions"),
            ("/completions", "llama", b"/v1/completions"),
            ("/responses", "hf-chat", b"/v1/responses"),
            ("/chat/completions", "ov-chat", b"/v3/chat/completions"),
            ("/embeddings", "ov-emb", b"/v3/embeddings"),
            ("/reranking", "ov-rerank", b"/v3/rerank"),
        ]:
            self.assertEqual(self.call("POST", path, {"model": model})[0], 200)
            self.assertEqual(self.backend.requests[-1][1], upstream)

    def test_responsesRenamed(self):
        """
        C{/v1/responses} for a transformers model names its path upstream
        and the public name in the answer, as chat does.
        """
        path = self.path("hf-chat")
        self.backend.body = json.dumps({"object": "response", "model": path}).encode()
        status, _, answer = self.call("POST", "/v1/responses", {"model": "hf-chat", "input": "hi"})
        self.assertEqual((status, json.loads(answer)), (200, {"object": "response", "model": "hf-chat"}))
        self.assertEqual(json.loads(self.backend.requests[-1][3]), {"model": path, "input": "hi"})

    def test_queryModel(self):
        """
        An endpoint without a body (C{GET /props}) is routed by its C{model}
        query parameter, which is passed on with the rest of the query; one
        without it, or with two, is a 400.
        """
        self.assertEqual(self.call("GET", "/props?model=llama&x=1")[0], 200)
        self.assertEqual(self.backend.uris[-1], b"/props?model=llama&x=1")
        for query in ("", "?model=llama&model=ov-chat", "?model="):
            error = self.assertEnvelope(self.call("GET", "/props" + query), 400)
            self.assertEqual(error["param"], "model")

    def test_upstreamBackends(self):
        """
        C{/upstream} reaches llama.cpp and OVMS models, but not a
        transformers model: its own API loads any local model a request
        names (C{/load_model}), outside the configuration and the budget.
        """
        for model in ("llama", "ov-chat"):
            self.assertEqual(self.call("GET", f"/upstream/{model}/health")[0], 200)
        leases = len(self.manager.leases)
        for model in ("hf-chat", "hf-whisper"):
            error = self.assertEnvelope(
                self.call("POST", f"/upstream/{model}/load_model", {"model": "/elsewhere"}), 400, "unsupported_endpoint"
            )
            self.assertIn("transformers", error["message"])
        self.assertEqual(len(self.manager.leases), leases)

    def test_queryPassedOn(self):
        """
        The query string of a JSON request reaches the backend.
        """
        self.call("POST", "/v1/chat/completions?api-version=1", {"model": "llama"})
        self.assertEqual(self.backend.uris[-1], b"/v1/chat/completions?api-version=1")


class AnthropicTests(EveryEndpointTests):
    """
    The Anthropic routes answer dynllm's own errors in Anthropic's shape.
    """

    def assertAnthropic(self, result, status, kind):
        """
        Assert that C{result} is Anthropic's error shape with C{status} and
        error type C{kind}.
        """
        self.assertEqual(result[0], status)
        body = json.loads(result[2])
        self.assertEqual(set(body), {"type", "error"})
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], kind)
        self.assertIsInstance(body["error"]["message"], str)

    def test_errors(self):
        """
        An unknown model, a model of another backend or type, a bad body and
        a scheduler error are answered in Anthropic's shape on both routes.
        """
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            self.assertAnthropic(self.call("POST", path, {"model": "nope"}), 404, "not_found_error")
            self.assertAnthropic(self.call("POST", path, {"model": "ov-chat"}), 400, "invalid_request_error")
            self.assertAnthropic(self.call("POST", path, {"model": "ov-emb"}), 400, "invalid_request_error")
            self.assertAnthropic(self.call("POST", path, b"{"), 400, "invalid_request_error")
        self.manager.failure = NoCapacity("llama", 1, 0, 1, 5.0, (), retryAfter=5)
        self.assertAnthropic(self.call("POST", "/v1/messages", {"model": "llama"}), 503, "overloaded_error")

    def test_noRoute(self):
        """
        A request with C{anthropic-version} that matches no route (a wrong
        method, an unknown path) is answered in Anthropic's shape.
        """
        headers = {"anthropic-version": "2023-06-01"}
        for method, path, status in (("GET", "/v1/messages", 405), ("POST", "/v1/messages/batches", 404)):
            result = self.call(method, path, None, headers)
            self.assertEqual((result[0], json.loads(result[2])["type"]), (status, "error"))
        self.assertEnvelope(self.call("GET", "/v1/messages"), 405)

    def test_key(self):
        """
        With client keys set, Anthropic's C{x-api-key} header is accepted,
        a wrong one is a 401 in Anthropic's shape, and neither reaches the
        backend.
        """
        self.serve(evolve(self.config, server=evolve(self.config.server, api_keys=("k",))))
        self.assertAnthropic(
            self.call("POST", "/v1/messages", {"model": "llama"}, {"x-api-key": "bad"}), 401, "authentication_error"
        )
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        self.assertEqual(self.call("POST", "/v1/messages", {"model": "llama"}, headers)[0], 200)
        sent = {k.lower() for k in self.backend.requests[-1][2]}
        self.assertIn(b"anthropic-version", sent)
        self.assertNotIn(b"x-api-key", sent)


class NamesTests(RoutesTestCase):
    """
    Model names with any character, and aliases, in every route that names
    a model.
    """

    NAMES = ["Qwen/Qwen2.5-0.5B-Instruct", "a b?c#d%e&f=g+h", "mod\u00e8le/\u6a21\u578b", "x/y/z/infer",
             "tab\there new\nline", "/leading", "trailing/", "..", "%2F", "x:y;z@w"]

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        models = []
        for index, name in enumerate(self.NAMES):
            open(os.path.join(self.directory, f"{index}.gguf"), "w").close()
            models.append({"name": name, "path": f"{index}.gguf", "backend": "llamacpp", "vram_mb": 1})
        os.makedirs(os.path.join(self.directory, "ocr"))
        models.append({"name": "org/ocr", "path": "ocr", "backend": "openvino", "vram_mb": 1,
                       "model_type": "ocr", "aliases": ["ocr/v1"]})
        open(os.path.join(self.directory, "chat.gguf"), "w").close()
        models.append({"name": "chat", "path": "chat.gguf", "backend": "llamacpp", "vram_mb": 1,
                       "aliases": ["gpt-4o", "org/chat"], "listed": False})
        self.serve(parseConfig(
            {"enabled_backends": ["llamacpp", "openvino"], "server": {"admin_api_keys": ["admin"]},
             "models": models},
            self.directory, which=lambda name: "/bin/true",
        ))

    def spellings(self, name):
        """
        @return: C{name} in a path, with C{/} sent as C{%2F} and as it is.
        """
        return {quote(name, safe=""), quote(name, safe="/")}

    def test_retrieve(self):
        """
        C{GET /v1/models/ID} finds every model by its name, however the
        C{/} in it is sent, and answers under that id.
        """
        for name in self.NAMES:
            for spelled in self.spellings(name):
                status, _, body = self.call("GET", "/v1/models/" + spelled)
                self.assertEqual((status, json.loads(body)["id"]), (200, name), spelled)

    def test_logs(self):
        """
        C{/admin/models/NAME/logs} finds every model by its name.
        """
        admin = {"Authorization": "Bearer admin"}
        for name in self.NAMES:
            for spelled in self.spellings(name):
                status, _, body = self.call("GET", f"/admin/models/{spelled}/logs?lines=1", headers=admin)
                self.assertEqual((status, body), (200, b"line two\n"), spelled)
        self.assertEnvelope(self.call("GET", "/admin/models/nope/logs", headers=admin), 404, "model_not_found")
        self.assertEnvelope(self.call("GET", "/admin/models/chat/other", headers=admin), 404)

    def test_kserve(self):
        """
        The KServe routes find a model whose name holds C{/} (or an alias)
        and send the backend its name with C{/} as C{%2F}, as OVMS wants.
        """
        for spelled in self.spellings("org/ocr") | self.spellings("ocr/v1"):
            self.assertEqual(self.call("POST", f"/v2/models/{spelled}/versions/1/infer", b"{}")[0], 200)
            self.assertEqual(self.backend.uris[-1], b"/v2/models/org%2Focr/versions/1/infer")
            self.assertEqual(self.call("GET", f"/v2/models/{spelled}")[0], 200)
            self.assertEqual(self.backend.uris[-1], b"/v2/models/org%2Focr")
            status, headers, _ = self.call("GET", f"/v2/models/{spelled}/ready")
            self.assertEqual(headers.getRawHeaders("x-dynllm-model-state"), ["loaded"])
            self.assertEqual(self.backend.uris[-1], b"/v2/models/org%2Focr/ready")
        self.assertEnvelope(self.call("GET", "/v2/models/org/ocr/infer"), 405)
        self.assertEnvelope(self.call("GET", "/v2/models/org/ocr/nothing"), 404)

    def test_upstream(self):
        """
        C{ANY /upstream/MODEL/PATH} passes the request to the model's server
        at C{/PATH} with its query, method and body, for any name.
        """
        for name in self.NAMES:
            for spelled in self.spellings(name):
                status, _, _ = self.call("PUT", f"/upstream/{spelled}/slots/0?action=save", b"raw body")
                self.assertEqual(status, 200)
                method, _, _, body = self.backend.requests[-1]
                self.assertEqual((method, self.backend.uris[-1], body), (b"PUT", b"/slots/0?action=save", b"raw body"))
        self.call("GET", "/upstream/chat")
        self.assertEqual(self.backend.uris[-1], b"/")
        self.call("GET", "/upstream/x/y/z/infer/props")
        self.assertEqual(self.backend.uris[-1], b"/props")
        self.assertEnvelope(self.call("GET", "/upstream/nope/props"), 404, "model_not_found")

    def test_aliases(self):
        """
        An alias is served like the name; the request reaches the backend
        under the model's name and the answer names the alias.
        """
        self.backend.body = json.dumps({"model": "chat", "object": "chat.completion"}).encode()
        for alias in ("gpt-4o", "org/chat"):
            status, _, body = self.call("POST", "/v1/chat/completions", {"model": alias, "messages": []})
            self.assertEqual((status, json.loads(body)["model"]), (200, alias))
            self.assertEqual(json.loads(self.backend.requests[-1][3])["model"], "chat")
            self.assertEqual(self.manager.leases[-1].model.name, "chat")
            status, _, body = self.call("GET", "/v1/models/" + quote(alias, safe=""))
            self.assertEqual((status, json.loads(body)["id"]), (200, alias))

    def test_aliasRenamedInAnswers(self):
        """
        A KServe answer and a query-routed answer name the alias the client
        used, not the model's name.
        """
        self.backend.body = json.dumps({"name": "org/ocr", "versions": ["1"]}).encode()
        status, _, body = self.call("GET", "/v2/models/ocr%2Fv1")
        self.assertEqual((status, json.loads(body)["name"]), (200, "ocr/v1"))
        self.assertEqual(self.backend.uris[-1], b"/v2/models/org%2Focr")
        self.backend.body = json.dumps({"model_alias": "chat"}).encode()
        status, _, body = self.call("GET", "/props?model=gpt-4o")
        self.assertEqual((status, json.loads(body)), (200, {"model_alias": "gpt-4o"}))

    def test_unlisted(self):
        """
        A model with C{listed: false} is not in C{/v1/models} but is served.
        """
        status, _, body = self.call("GET", "/v1/models")
        listed = {m["id"] for m in json.loads(body)["data"]}
        self.assertEqual(listed, {*self.NAMES, "org/ocr"})
        self.assertEqual(self.call("POST", "/v1/chat/completions", {"model": "chat"})[0], 200)


class AmbiguityTests(EveryEndpointTests):
    """
    A request that names its model twice is refused: the backend might
    read the other one.
    """

    def test_duplicateJSONKey(self):
        """
        A JSON body with a key twice is a 400 C{duplicate_key}, and nothing
        reaches a backend.
        """
        for body in (b'{"model": "llama", "model": "hf-chat"}', b'{"model": "llama", "x": {"a": 1, "a": 2}}'):
            self.assertEnvelope(self.call("POST", "/v1/chat/completions", body), 400, "duplicate_key")
        self.assertEqual(self.backend.requests, [])

    def test_nestedTooDeeply(self):
        """
        JSON nested deeper than L{MAX_DEPTH} levels is a 400
        C{invalid_json}, in Anthropic's shape on its routes, never a 500
        page.
        """
        body = b'{"model": "llama", "x": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
        self.assertEnvelope(self.call("POST", "/v1/chat/completions", body), 400, "invalid_json")
        status, _, answer = self.call("POST", "/v1/messages", body)
        self.assertEqual((status, json.loads(answer)["type"]), (400, "error"))

    def test_duplicateFormField(self):
        """
        An upload with two C{model} fields, before or after the file, is a
        400 C{invalid_multipart}.
        """
        for fields in (
            [("model", b"hf-whisper", None), ("model", b"ov-whisper", None), ("file", b"x", "a.wav")],
            [("model", b"hf-whisper", None), ("file", b"x" * 100000, "a.wav"), ("model", b"/etc", None)],
        ):
            body, contentType = multipartBody(fields)
            error = self.assertEnvelope(
                self.call("POST", "/v1/audio/transcriptions", body, {"Content-Type": contentType}),
                400, "invalid_multipart",
            )
            self.assertIn("more than once", error["message"])
        self.assertEqual(self.backend.requests, [])


class PathSpellingTests(SynchronousTestCase):
    """
    Every spelling of every route's path (C{//v1/...} from a base URL that
    ends in C{/}, C{//} inside, a trailing C{/}) gets the canonical path's
    answer or a clear error in the envelope, through the real site (in
    memory, fed raw HTTP): a 308 with C{Location}, a 404, or a 405 with
    C{Allow}; never a 500 or a page that is not JSON (unless the canonical
    path's answer is one: the console's).
    """

    def setUp(self):
        routes = RoutesTests("test_listModels")
        routes.setUp()
        self.routes = routes
        self.site = DynLLMSite(routes.routes.resource(), 1 << 20, reactor=routes.clock)

    def send(self, method, path, body=b""):
        """
        @return: the status, the headers (lower-case names) and the body
            of the answer to one request on a new connection.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(
            b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (method.encode(), path.encode(), len(body), body)
        )
        for _ in range(20):
            self.routes.agent.flush()
            self.routes.clock.advance(0)
        response = Response(transport.value())
        return response.status, {k: ", ".join(v) for k, v in response.headers.items()}, response.body

    def routesToTry(self):
        """
        @return: C{(method, canonical path, body)} for every route.
        """
        chat = json.dumps({"model": "chat", "messages": []}).encode()
        found = set()
        for rule in self.routes.routes.app.url_map.iter_rules():
            for method in (rule.methods or {"GET", "POST"}) - {"HEAD", "OPTIONS"}:
                path = rule.rule.replace("<name:name>", "chat").replace("<name:rest>", "chat")
                path = path.replace("<path:name>", "app.js")
                found.add((method, path, chat if method == "POST" else b""))
        return sorted(found)

    def spellings(self, path):
        """
        @return: the ways a client may mangle C{path}.
        """
        segments = path.split("/")
        spelled = {"/" + path, path + "/", "//" + path}
        spelled |= {"/".join(segments[:i]) + "//" + "/".join(segments[i:]) for i in range(2, len(segments))}
        return sorted(spelled - {path})

    def test_everySpelling(self):
        """
        The rule of this class, for each route and spelling.
        """
        for method, path, body in self.routesToTry():
            canonical = self.send(method, path, body)
            for spelled in self.spellings(path):
                status, headers, answer = self.send(method, spelled, body)
                where = f"{method} {spelled}"
                self.assertLess(status, 500, where)
                # The canonical answer itself may be a page (the console's).
                kind = headers.get("content-type", "application/json")
                same = status == canonical[0] and kind == canonical[1].get("content-type")
                self.assertEqual(kind.split(";")[0] in ("application/json", "text/plain") or same, True, where)
                if status == canonical[0]:
                    continue
                if status == 308:
                    self.assertEqual(headers.get("location", "").rstrip("/"), path.rstrip("/"), where)
                elif status == 405:
                    self.assertIn("allow", headers, where)
                else:
                    self.assertIn(status, (400, 404), where)
                if status >= 400:
                    self.assertIn("error", json.loads(answer), where)

    def test_leadingSlashes(self):
        """
        C{//v1/...} (a base URL ending in C{/}) is served as C{/v1/...}.
        """
        chat = json.dumps({"model": "chat", "messages": []}).encode()
        self.assertEqual(self.send("POST", "//v1/chat/completions", chat)[0], 200)
        self.assertEqual(self.send("GET", "//v1/models")[0], 200)
        self.assertEqual(self.send("POST", "//v1/embeddings", json.dumps({"model": "emb"}).encode())[0], 200)

    def test_redirectHasLocation(self):
        """
        C{//} inside a path is a 308 to the path with it merged, with
        C{Location}, in the envelope.
        """
        status, headers, body = self.send("GET", "/v1//models?x=1")
        self.assertEqual((status, headers["location"]), (308, "/v1/models?x=1"))
        self.assertIn("/v1/models", json.loads(body)["error"]["message"])

    def test_methodNotAllowedHasAllow(self):
        """
        A 405 says which methods the path takes, in C{Allow}, for the
        table's routes and for KServe's.
        """
        status, headers, _ = self.send("GET", "/v1/chat/completions")
        self.assertEqual((status, headers["allow"]), (405, "POST"))
        status, headers, _ = self.send("GET", "/v2/models/chat/infer")
        self.assertEqual((status, headers["allow"]), (405, "POST"))


class LargeBodyTests(TestCase):
    """
    Bodies too large to examine in the daemon, on the real reactor (the
    routes' other collaborators stay in memory).
    """

    def setUp(self):
        self.case = EveryEndpointTests("test_openvinoPaths")
        self.case.setUp()
        self.case.routes.examiner = BodyExaminer(reactor)

    @defer.inlineCallbacks
    def call(self, path, body):
        """
        @return: C{(status, body)} of a POST of C{body} to C{path}.
        """
        case = self.case
        d = case.client.request("POST", "http://dynllm" + path, data=body)
        responses, contents = [], []
        d.addCallback(lambda response: responses.append(response) or case.client.content(response))
        d.addCallback(contents.append)
        while not contents:
            case.client.flush()
            case.agent.flush()
            case.clock.advance(0)
            yield task.deferLater(reactor, 0.005, lambda: None)
        return responses[0].code, contents[0]

    @defer.inlineCallbacks
    def test_renamedLarge(self):
        """
        A large chat request for a transformers model reaches the backend
        as sent, byte for byte, but for the model's value, which names the
        model's path.
        """
        path = self.case.path("hf-chat")
        body = b'{"model" : "hf-chat", "messages": [{"role": "user", "content": "%s"}], "x": 1.50}' % (
            b"\\u00e9" * INLINE_BYTES,
        )
        status, _ = yield self.call("/v1/chat/completions", body)
        self.assertEqual(status, 200)
        sent = self.case.backend.requests[-1][3]
        self.assertEqual(sent, body.replace(b'"hf-chat"', json.dumps(path).encode(), 1))

    @defer.inlineCallbacks
    def test_refusedLarge(self):
        """
        A large body that is not JSON gets the same 400 as a small one, and
        nothing reaches a backend.
        """
        status, answer = yield self.call("/v1/chat/completions", b'{"model": "llama", "x": "' + b"a" * INLINE_BYTES)
        self.assertEqual((status, json.loads(answer)["error"]["code"]), (400, "invalid_json"))
        self.assertEqual(self.case.backend.requests, [])


class CommandModelRoutesTests(RoutesTestCase):
    """
    What reaches a C{backend: command} server's C{model} field, by its
    C{upstream_model}.
    """

    def setUp(self):
        common = {"backend": "command", "command": ["server", "--port", "{port}"], "vram_mb": 1}
        self.serve(
            parseConfig(
                {
                    "enabled_backends": ["command"],
                    "models": [
                        dict(common, name="kept", aliases=["kept-alias"], upstream_model="keep"),
                        dict(common, name="fixed", aliases=["fixed-alias"], upstream_model="served/name"),
                    ],
                },
                os.path.abspath(self.mktemp()),
                which=lambda name: "/bin/true",
            )
        )

    def sent(self, model):
        self.backend.body = json.dumps({"model": "whatever", "choices": []}).encode()
        status, _, answer = self.call("POST", "/v1/chat/completions", {"model": model, "messages": []})
        self.assertEqual(status, 200, answer)
        return json.loads(self.backend.requests[-1][3])["model"], json.loads(answer)["model"]

    def test_keep(self):
        """
        C{upstream_model: keep} sends the name the request gave, an alias
        included, as it was given.
        """
        self.assertEqual(self.sent("kept-alias")[0], "kept-alias")
        self.assertEqual(self.sent("kept")[0], "kept")

    def test_fixed(self):
        """
        A fixed C{upstream_model} is sent whatever name the request gave,
        and the answer names the model as the request did.
        """
        self.backend.body = json.dumps({"model": "served/name", "choices": []}).encode()
        status, _, answer = self.call("POST", "/v1/chat/completions", {"model": "fixed-alias", "messages": []})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(self.backend.requests[-1][3])["model"], "served/name")
        self.assertEqual(json.loads(answer)["model"], "fixed-alias")
