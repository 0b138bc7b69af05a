"""
The HTTP routes, in memory: C{treq.testing.StubTreq} is the client, and the
relay reaches a fake backend resource through treq's
C{RequestTraversalAgent}, with a stub in place of the scheduler.
"""

from __future__ import annotations

import json
import os

from attrs import define, field
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource

from dynllm import errors
from dynllm.backends import LlamaCppBackend
from dynllm.config import parseConfig
from dynllm.routes import DynLLMRoutes
from dynllm.scheduler import Lease
from tests.support import checkEnvelope


class FakeBackendResource(resource.Resource):
    """
    Records requests and answers them as a backend would.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.status = 200
        self.body = b'{"object": "chat.completion"}'

    def render(self, request):
        self.requests.append(
            (request.method, request.path, dict(request.requestHeaders.getAllRawHeaders()), request.content.read())
        )
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


@define
class StubManager:
    """
    Stands in for L{dynllm.scheduler.ModelManager}: hands out leases on
    C{http://backend}, or fails as told.
    """

    config: object
    started: bool = True
    failure: Exception | None = None
    leases: list = field(factory=list)
    released: int = 0
    unloadFailure: Exception | None = None

    def acquire(self, name):
        if self.failure is not None:
            return defer.fail(self.failure)
        lease = Lease(self.config.model(name), LlamaCppBackend(), "http://backend", self._release)
        self.leases.append(lease)
        return defer.succeed(lease)

    def _release(self, lease):
        self.released += 1

    def unload(self, name):
        return defer.fail(self.unloadFailure) if self.unloadFailure else defer.succeed(None)

    def models(self):
        return [{"name": m.name} for m in self.config.models]

    def memoryInUse(self):
        return 0

    def logTail(self, name, count):
        return ["line one", "line two"][-count:]

    @property
    def slots(self):
        return {}


class RoutesTests(SynchronousTestCase):
    """
    What the API answers, and what reaches the backend.
    """

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        for name in ("chat.gguf", "emb.gguf"):
            open(os.path.join(directory, name), "w").close()
        self.config = parseConfig(
            {
                "enabled_backends": ["llamacpp"],
                "server": {"admin_api_keys": ["admin"]},
                "models": [
                    {"name": "chat", "path": "chat.gguf", "backend": "llamacpp", "vram_mb": 1},
                    {"name": "emb", "path": "emb.gguf", "backend": "llamacpp", "vram_mb": 1,
                     "model_type": "embedding"},
                ],
            },
            directory,
            which=lambda name: "/bin/true",
        )
        self.backend = FakeBackendResource()
        self.manager = StubManager(self.config)
        self.clock = Clock()
        routes = DynLLMRoutes(
            config=self.config, manager=self.manager, agent=RequestTraversalAgent(self.backend), clock=self.clock
        )
        self.client = StubTreq(routes.resource())

    def call(self, method, path, body=None, headers=None):
        """
        @return: C{(status, headers, body)} of a request to the routes.
        """
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        d = self.client.request(method, "http://dynllm" + path, data=data, headers=headers)
        self.client.flush()
        self.clock.advance(0)
        self.client.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.client.content(response))
        return response.code, response.headers, content

    def assertEnvelope(self, result, status, code=None):
        """
        Assert that C{result} is an OpenAI error envelope with C{status}.
        """
        return checkEnvelope(self, result[0], result[2], status, code)

    def test_listModels(self):
        """
        C{GET /v1/models} lists the configured models in OpenAI's format.
        """
        status, _, body = self.call("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(
            json.loads(body),
            {"object": "list", "data": [
                {"id": "chat", "object": "model", "created": 0, "owned_by": "dynllm"},
                {"id": "emb", "object": "model", "created": 0, "owned_by": "dynllm"},
            ]},
        )

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
        self.assertNotIn(b"Authorization", sent)
        self.assertEqual(self.manager.released, 1)

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
        self.manager.failure = errors.noCapacity("no room", 5)
        status, headers, _ = result = self.call("POST", "/v1/chat/completions", {"model": "chat"})
        self.assertEnvelope(result, 503, "model_capacity")
        self.assertEqual(headers.getRawHeaders("retry-after"), ["5"])

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
        self.manager.unloadFailure = errors.APIError(409, "busy", code="model_busy")
        result = self.call("POST", "/admin/models/unload", {"model": "chat"}, {"Authorization": "Bearer admin"})
        self.assertEnvelope(result, 409, "model_busy")

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
        self.assertIn('dynllm_requests_total{model="chat",route="/v1/chat/completions",status="200"} 1.0', text)
        self.assertIn('dynllm_requests_total{model="chat",route="/v1/chat/completions",status="400"} 1.0', text)
        self.assertIn('dynllm_request_duration_seconds_count{model="chat",route="/v1/chat/completions"} 2.0', text)
        self.assertNotIn('model="nope"', text)
        self.assertIn("dynllm_vram_total_mb", text)

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
