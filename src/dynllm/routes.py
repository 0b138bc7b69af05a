# -*- test-case-name: tests.test_routes -*-
"""
The HTTP API: OpenAI-compatible routes that lease a model from the
scheduler and relay the request to it, plus health and admin routes.

Data flows one way: route -> scheduler (L{ModelManager.acquire}) -> backend
(L{IBackend.upstreamPath}) -> proxy (L{forward}).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Sequence, cast

from attrs import define, field
from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from dynllm import errors, multipart
from dynllm.config import Config, ModelConfig
from dynllm.interfaces import IBackend
from dynllm.metrics import CONTENT_TYPE, Metrics
from dynllm.proxy import fileProducer, forward, requestBody
from dynllm.rewrite import NameRewriter, renameInRequest
from dynllm.scheduler import FAILED, ModelManager

#: The OpenAI endpoints whose body is JSON, and the model types each serves.
JSON_ENDPOINTS = {
    "/v1/chat/completions": ("llm",),
    "/v1/completions": ("llm",),
    "/v1/embeddings": ("embedding",),
    "/v1/rerank": ("rerank",),
    "/v1/audio/speech": ("speech",),
    "/v1/images/generations": ("image_generation",),
}

#: The OpenAI endpoints whose body is a multipart upload, and their types.
MULTIPART_ENDPOINTS = {
    "/v1/audio/transcriptions": ("transcription",),
    "/v1/audio/translations": ("transcription",),
}

#: The model types the KServe v2 routes serve.
KSERVE_TYPES = ("classification", "detection", "segmentation", "ocr")

#: Header that tells a KServe readiness check the model's state in dynllm.
STATE_HEADER = b"X-DynLLM-Model-State"


#: How messages name the KServe routes.
KSERVE_ROUTE = "the KServe v2 API"


def nameRewriter(upstreamName: str, model: ModelConfig) -> NameRewriter:
    """
    @return: a rewriter of C{upstreamName} back to C{model}'s public name in
        responses, including the spelling with C{@main} appended that some
        backends echo for a name given without a revision.
    """
    variants = () if "@" in upstreamName else (upstreamName + "@main",)
    return NameRewriter(upstreamName, model.name, variants)


def _json(request: IRequest, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(value).encode("utf-8")


def readBody(request: IRequest) -> bytes:
    """
    @return: the whole body of C{request} (twisted.web has received it all).
    """
    request.content.seek(0)
    body: bytes = request.content.read()
    return body


def parseJSON(body: bytes) -> dict[str, Any]:
    """
    @return: C{body}'s JSON object.
    @raise errors.APIError: 400 when it is not a JSON object.
    """
    try:
        value = json.loads(body)
    except ValueError as e:
        raise errors.badRequest(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise errors.badRequest("the request body must be a JSON object", code="invalid_json")
    return value


def requestedModel(body: dict[str, Any]) -> str:
    """
    @return: the C{model} field of a request body.
    @raise errors.APIError: 400 when it is missing or not a string.
    """
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise errors.badRequest("the request must name a model in its 'model' field", param="model")
    return name


@define
class DynLLMRoutes:
    """
    The Klein application of the daemon.

    @ivar config: The configuration (models, keys).
    @ivar manager: Hands out leases on models.
    @ivar agent: The C{IAgent} that reaches backends.
    @ivar clock: Schedules writes of relayed bodies and times requests; the
        global reactor by default.
    @ivar metrics: What C{/metrics} serves.
    """

    config: Config
    manager: ModelManager
    agent: Any
    clock: Any = None
    metrics: Metrics = field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        if self.metrics is None:
            self.metrics = Metrics(self.manager)
    app = Klein()

    def resource(self) -> Any:
        """
        @return: the C{IResource} to serve.
        """
        return self.app.resource()

    # Authentication.

    def _checkKey(self, request: IRequest, keys: Sequence[str]) -> None:
        if not keys:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            given = (request.getHeader(b"x-api-key") or b"").decode("latin-1")
        given = given.strip()
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise errors.APIError(401, "Invalid API key", "authentication_error", "invalid_api_key")

    def _checkClientKey(self, request: IRequest) -> None:
        self._checkKey(request, self.config.server.api_keys)

    def _checkAdminKey(self, request: IRequest) -> None:
        self._checkKey(request, self.config.server.admin_api_keys or self.config.server.api_keys)

    # Errors.

    @app.handle_errors(errors.APIError)
    def apiError(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(errors.APIError, failure.value)
        request.setResponseCode(error.status)
        for name, value in error.headers().items():
            request.setHeader(name, value)
        return error.body()

    @app.handle_errors(HTTPException)
    def httpError(self, request: IRequest, failure: Failure) -> bytes:
        e = cast(HTTPException, failure.value)
        kind = "not_found_error" if e.code == 404 else "invalid_request_error"
        message = f"{request.method.decode()} {request.path.decode('latin-1')}: {e.name}"
        body: bytes = self.apiError(request, Failure(errors.APIError(e.code or 500, message, kind)))
        return body

    # OpenAI routes.

    @app.route("/v1/models", methods=["GET"])
    def listModels(self, request: IRequest) -> bytes:
        self._checkClientKey(request)
        return _json(request, {"object": "list", "data": [self._modelObject(m.name) for m in self.config.models]})

    @app.route("/v1/models/<string:name>", methods=["GET"])
    def retrieveModel(self, request: IRequest, name: str) -> bytes:
        self._checkClientKey(request)
        if self.config.model(name) is None:
            raise errors.modelNotFound(name)
        return _json(request, self._modelObject(name))

    def _modelObject(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "dynllm"}

    @app.route("/v1/chat/completions", methods=["POST"])
    @app.route("/v1/completions", methods=["POST"])
    @app.route("/v1/embeddings", methods=["POST"])
    @app.route("/v1/rerank", methods=["POST"])
    @app.route("/v1/audio/speech", methods=["POST"])
    @app.route("/v1/images/generations", methods=["POST"])
    async def jsonEndpoint(self, request: Request) -> None:
        self._checkClientKey(request)
        route = request.path.decode("ascii")
        raw = readBody(request)
        parsed = parseJSON(raw)
        model, backend, upstream = self._resolve(requestedModel(parsed), route, JSON_ENDPOINTS[route])
        body: Any = raw
        rewriter = None
        upstreamName = backend.upstreamModel(model)
        if upstreamName != model.name:
            body = renameInRequest(parsed, upstreamName)
            rewriter = nameRewriter(upstreamName, model)
        await self._proxy(request, route, model, upstream, body, rewriter)

    @app.route("/v1/audio/transcriptions", methods=["POST"])
    @app.route("/v1/audio/translations", methods=["POST"])
    async def multipartEndpoint(self, request: Request) -> None:
        """
        An upload passes through byte for byte: the C{model} field is found
        by reading the spooled body once, in blocks, and only its value is
        replaced when the backend knows the model by another name.
        """
        self._checkClientKey(request)
        route = request.path.decode("ascii")
        content = request.content
        assert content is not None  # twisted.web has spooled the whole body
        try:
            found = multipart.findField(content, request.getHeader(b"content-type"), "model")
        except multipart.MultipartError as e:
            raise errors.badRequest(str(e), code="invalid_multipart") from None
        if found is None or not found.value:
            raise errors.badRequest("the request must name a model in its 'model' field", param="model")
        model, backend, upstream = self._resolve(found.value, route, MULTIPART_ENDPOINTS[route])
        body: Any
        rewriter = None
        upstreamName = backend.upstreamModel(model)
        if upstreamName != model.name:
            spliced = multipart.SplicedFile(content, found.start, found.end, upstreamName.encode("utf-8"))
            body = fileProducer(spliced, self.clock)
            rewriter = nameRewriter(upstreamName, model)
        else:
            body = requestBody(request, self.clock)
        await self._proxy(request, route, model, upstream, body, rewriter)

    # KServe v2.

    @app.route("/v2/models/<string:name>", methods=["GET"])
    @app.route("/v2/models/<string:name>/versions/<string:version>", methods=["GET"])
    @app.route("/v2/models/<string:name>/infer", methods=["POST"])
    @app.route("/v2/models/<string:name>/versions/<string:version>/infer", methods=["POST"])
    async def kserve(self, request: Request, name: str, version: str | None = None) -> None:
        """
        Model metadata and inference: the model is loaded if it is not.
        """
        self._checkClientKey(request)
        route = request.path.decode("ascii")
        model, _, upstream = self._resolve(name, route, KSERVE_TYPES)
        body = requestBody(request, self.clock) if request.method == b"POST" else None
        label = "/v2/models/{name}" + ("/infer" if request.method == b"POST" else "")
        await self._proxy(request, route, model, upstream, body, label=label)

    @app.route("/v2/models/<string:name>/ready", methods=["GET"])
    @app.route("/v2/models/<string:name>/versions/<string:version>/ready", methods=["GET"])
    async def kserveReady(self, request: Request, name: str, version: str | None = None) -> bytes | None:
        """
        Model readiness, answered without loading the model or resetting
        its idle timer, so that a client polling it does not keep the model
        loaded forever.

        A loaded model's backend answers for it. A model that is not
        loaded answers 200 (an inference request would load it), unless
        its last load failed (503). The header L{STATE_HEADER} tells which.
        """
        self._checkClientKey(request)
        route = request.path.decode("ascii")
        _, _, upstream = self._resolve(name, route, KSERVE_TYPES)
        lease = self.manager.peek(name)
        if lease is None:
            state = self.manager.describe(name)
            request.setHeader(STATE_HEADER, state["status"].encode("ascii"))
            if state["status"] == FAILED:
                raise errors.APIError(
                    503, f"model {name!r} failed to load: {state['last_error']}", "server_error", "model_failed"
                )
            return b""
        request.setHeader(STATE_HEADER, b"loaded")
        try:
            await forward(
                self.agent,
                request,
                (lease.baseURL + upstream).encode("ascii"),
                None,
                clock=self.clock,
                upstreamKey=lease.apiKey,
            )
        finally:
            lease.release()
        return None

    # Relaying.

    def _resolve(
        self, name: str, route: str, modelTypes: Sequence[str]
    ) -> tuple[ModelConfig, IBackend, str]:
        """
        Check that model C{name} exists and that C{route} serves it.

        @return: the model, its backend, and the path of C{route} on it.
        @raise errors.APIError: 404 for an unknown model, 400 for a model
            of a type C{route} does not serve, or whose backend does not
            serve C{route}.
        """
        model = self.config.model(name)
        if model is None:
            raise errors.modelNotFound(name)
        public = KSERVE_ROUTE if route.startswith("/v2/") else route
        if model.model_type not in modelTypes:
            raise errors.badRequest(
                f"model {name!r} is a {model.model_type} model; {public} serves"
                f" {', '.join(modelTypes)} models",
                param="model",
                code="model_type_mismatch",
            )
        backend = self.manager.backendOf(name)
        upstream = backend.upstreamPath(route, model)
        if upstream is None:
            raise errors.badRequest(
                f"model {name!r} runs on the {model.backend} backend, which does not serve {public}",
                param="model",
                code="unsupported_endpoint",
            )
        return model, backend, upstream

    async def _proxy(
        self,
        request: Request,
        route: str,
        model: ModelConfig,
        upstream: str,
        body: Any,
        rewriter: NameRewriter | None = None,
        label: str | None = None,
    ) -> None:
        """
        Lease C{model}, relay the request to it, and hold the lease until
        the response has been written or the client has gone.

        @param upstream: The path on the backend (see L{_resolve}).
        @param body: What to send upstream: bytes, an C{IBodyProducer}, or
            C{None}.
        @param rewriter: Renames the model in the response, if needed.
        @param label: The route as metrics name it, if not C{route}.
        """
        self.metrics.observe(request, model.name, label or route, self.clock.seconds(), self.clock)
        lease = await self.manager.acquire(model.name)
        try:
            url = (lease.baseURL + upstream).encode("ascii")
            await forward(
                self.agent, request, url, body, clock=self.clock, rewriter=rewriter, upstreamKey=lease.apiKey
            )
        finally:
            lease.release()

    # Health and administration.

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        if not self.manager.started:
            return _json(request, {"status": "starting"}, 503)
        return _json(request, {"status": "ok"})

    @app.route("/metrics", methods=["GET"])
    def prometheusMetrics(self, request: Request) -> bytes:
        self._checkAdminKey(request)
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        return self.metrics.render()

    @app.route("/admin/models", methods=["GET"])
    def adminModels(self, request: IRequest) -> bytes:
        self._checkAdminKey(request)
        return _json(
            request,
            {
                "total_vram_mb": self.config.total_vram_mb,
                "used_vram_mb": self.manager.memoryInUse(),
                "models": self.manager.models(),
            },
        )

    @app.route("/admin/models/<string:name>/logs", methods=["GET"])
    def adminLogs(self, request: IRequest, name: str) -> bytes:
        self._checkAdminKey(request)
        try:
            count = int(request.args.get(b"lines", [b"100"])[0])
        except ValueError:
            raise errors.badRequest("lines must be a number", param="lines") from None
        lines = self.manager.logTail(name, count)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return "".join(line + "\n" for line in lines).encode("utf-8")

    @app.route("/admin/models/unload", methods=["POST"])
    async def adminUnload(self, request: IRequest) -> bytes:
        self._checkAdminKey(request)
        name = requestedModel(parseJSON(readBody(request)))
        await self.manager.unload(name)
        return _json(request, {"model": name, "status": self.manager.slots[name].state})

    @app.route("/admin/models/load", methods=["POST"])
    async def adminLoad(self, request: IRequest) -> bytes:
        self._checkAdminKey(request)
        name = requestedModel(parseJSON(readBody(request)))
        await self.manager.load(name)
        return _json(request, {"model": name, "status": self.manager.slots[name].state})
