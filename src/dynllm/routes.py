# -*- test-case-name: tests.test_routes -*-
"""
The HTTP API: OpenAI-compatible routes that lease a model from the
scheduler and relay the request to it, plus health and admin routes.

Data flows one way: route -> scheduler (L{IModelManager.acquire}) -> backend
(L{IBackend.upstreamPath}) -> proxy (L{forward}). A streamed request whose
model is not ready gets its headers and loading comments meanwhile
(L{dynllm.feedback}).
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any, Callable, Sequence, cast
from urllib.parse import quote, urlsplit

from attrs import define, evolve, field
from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import PathConverter, RequestRedirect

from dynllm import console, endpoints, errors, multipart
from dynllm.bodies import BodyExaminer
from dynllm.config import Config, ConfigError, ModelConfig
from dynllm.controls import requestOptions
from dynllm.endpoints import JSON, MULTIPART, PATH, Endpoint
from dynllm.exceptions import SchedulerError, UpstreamTimeout
from dynllm.feedback import LoadingStream
from dynllm.interfaces import IBackend, IModelManager
from dynllm.lease import Lease
from dynllm.metrics import CONTENT_TYPE, Metrics
from dynllm.logs import logger
from dynllm.proxy import RelayGuard, fileProducer, forward, requestBody
from dynllm.reload import ConfigChanges, RestartRequired, refusalLines
from dynllm.rewrite import NameRewriter, jsonString
from dynllm.lifecycle import FAILED
from dynllm.events import MODEL, REMOVED, ModelEvents
from dynllm.logs import RecentLog
from dynllm.sse import Backlog, EventStream, SharedFrames

_log = Logger()

#: Header that tells a KServe readiness check the model's state in dynllm.
STATE_HEADER = b"X-DynLLM-Model-State"

#: How messages name the KServe routes.
KSERVE_ROUTE = "the KServe v2 API"

#: Characters left as they are when a decoded path is sent on (RFC 3986
#: C{pchar} and C{/}).
PATH_SAFE = "/:@!$&'()*+,;=-._~"


log = logger(__name__)

#: The values of a yes-or-no query parameter (C{follow}).
FLAGS = {b"1": True, b"true": True, b"yes": True, b"0": False, b"false": False, b"no": False}

#: The kind of the events of a followed log.
LOG_EVENT = "log"

class NamePath(PathConverter):
    """
    A path that begins with a model's name: any characters, C{/}, line
    breaks and empty segments included (a YAML string may hold any of
    them); werkzeug's C{path} stops at a line break and must not begin with
    C{/}.
    """

    regex = "[\\s\\S]+?"
    part_isolating = False


#: Keyword arguments of the routes whose path holds a model's name: kept
#: as the client sent it (no merging of C{//}, no redirect for a trailing
#: C{/}), since the name may hold both.
NAMED = {"merge_slashes": False, "strict_slashes": False}


def nameRewriter(upstreamName: str, clientName: str) -> NameRewriter:
    """
    @return: a rewriter of C{upstreamName} back to C{clientName}, the name
        the client used, in responses, including the spelling with C{@main}
        appended that some backends echo for a name given without a
        revision.
    """
    variants = () if "@" in upstreamName else (upstreamName + "@main",)
    return NameRewriter(upstreamName, clientName, variants)


def _json(request: IRequest, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(value).encode("utf-8")


def requestedModel(fields: dict[str, Any]) -> str:
    """
    @param fields: The top-level fields of a request body
        (L{dynllm.bodies.Examined.fields}).
    @return: the C{model} field of a request body.
    @raise errors.APIError: 400 when it is missing or not a string.
    """
    name = fields.get("model")
    if not isinstance(name, str) or not name:
        raise errors.badRequest("the request must name a model in its 'model' field", param="model")
    return name


def splice(body: bytes, span: tuple[int, int], replacement: bytes) -> bytes:
    """
    @return: C{body} with the bytes in C{span} replaced.
    """
    start, end = span
    return body[:start] + replacement + body[end:]


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
    @ivar reload: Reads the configuration again and applies it (see
        L{dynllm.service.DynLLMService.reload}), for C{POST /admin/reload};
        C{None} when there is nothing to reload.
    @ivar examiner: Examines JSON bodies (L{dynllm.bodies}); one on
        C{clock} by default.
    @ivar events: The model and memory events of C{/admin/events}; made
        from C{manager} by default.
    @ivar daemonLog: The daemon's own last messages, for C{/admin/logs}
        (L{dynllm.service.DynLLMService} has it observe the log).
    """

    config: Config
    manager: IModelManager
    agent: Any
    clock: Any = None
    metrics: Metrics = field(default=None)
    reload: Callable[[], ConfigChanges] | None = None
    examiner: BodyExaminer = field(default=None)
    events: ModelEvents = field(default=None)
    daemonLog: RecentLog = field(factory=RecentLog)
    _streams: set[EventStream] = field(factory=set, init=False)
    #: What the streams keep for slow readers, together.
    _backlog: Backlog = field(factory=Backlog, init=False)
    #: The frames of the last lines a log's followers were sent.
    _logFrames: SharedFrames = field(factory=SharedFrames, init=False)

    def __attrs_post_init__(self) -> None:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        if self.metrics is None:
            self.metrics = Metrics(self.manager, self.config.total_vram_mb)
        if self.examiner is None:
            self.examiner = BodyExaminer(self.clock)
        if self.events is None:
            self.events = ModelEvents(self.manager, self.clock)
    app = Klein()
    app.url_map.converters["name"] = NamePath

    def closeStreams(self) -> None:
        """
        End every event stream of C{/admin/events} and the followed logs
        (their responses finish): the daemon is stopping.
        """
        for stream in list(self._streams):
            stream.close()

    def _stream(self, request: Request, label: str) -> EventStream:
        """
        Start an event stream on C{request}, closed by L{closeStreams}.
        """
        stream = EventStream(request, self.clock, label=label, backlog=self._backlog)
        stream.start()
        self._streams.add(stream)
        stream.whenDone().addCallback(lambda _: self._streams.discard(stream))
        return stream

    def resource(self) -> Any:
        """
        @return: the C{IResource} to serve.
        """
        return self.app.resource()

    # Authentication.

    def _checkKey(self, request: IRequest, keys: Sequence[str], kind: str = "an API key") -> None:
        """
        Let a request through if it carries one of C{keys}, as
        C{Authorization: Bearer KEY} or C{X-Api-Key: KEY}, or if C{keys} is
        empty.

        @param kind: What the route needs, for the message (C{"an admin key
            (server.admin_api_keys)"}): a valid key of another kind on the
            wrong route is told what it lacks.

        @raise errors.APIError: 401 C{invalid_api_key}, with
            C{WWW-Authenticate: Bearer} (RFC 6750 section 3), and
            C{error="invalid_token"} in it when a key was given but is not
            one of C{keys} (section 3.1).
        """
        if not keys:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            given = (request.getHeader(b"x-api-key") or b"").decode("latin-1")
        given = given.strip()
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            if given:
                request.setHeader(b"WWW-Authenticate", b'Bearer error="invalid_token"')
                raise errors.APIError(
                    401, f"Invalid API key: this route needs {kind}", "authentication_error", "invalid_api_key"
                )
            request.setHeader(b"WWW-Authenticate", b"Bearer")
            raise errors.APIError(
                401,
                f"This route needs {kind}: send it as 'Authorization: Bearer KEY' (or 'X-Api-Key: KEY')",
                "authentication_error",
                "invalid_api_key",
            )

    def _checkClientKey(self, request: IRequest) -> None:
        self._checkKey(request, self.config.server.api_keys, "an API key (server.api_keys)")

    def _checkAdminKey(self, request: IRequest) -> None:
        server = self.config.server
        if server.admin_api_keys:
            self._checkKey(request, server.admin_api_keys, "an admin key (server.admin_api_keys)")
        else:
            self._checkKey(request, server.api_keys, "an API key (server.api_keys)")

    def _checkMetricsKey(self, request: IRequest) -> None:
        """
        C{/metrics} needs no key with C{server.metrics_public}; else a key
        of C{server.metrics_api_keys} or an admin key, if any is set.
        """
        server = self.config.server
        if not server.metrics_public:
            self._checkKey(
                request,
                server.metrics_api_keys + (server.admin_api_keys or server.api_keys),
                "a metrics key (server.metrics_api_keys) or an admin key",
            )

    # Bodies.

    async def _fields(self, request: IRequest) -> dict[str, Any]:
        """
        @return: the top-level C{model} and C{stream} of C{request}'s JSON
            body (L{dynllm.bodies}).
        @raise errors.APIError: 400 for a body that is not a JSON object
            the routes accept.
        """
        content = request.content
        assert content is not None  # twisted.web has received the whole body
        examined = await self.examiner.examine(content)
        return examined.fields

    # Errors.

    @app.handle_errors(errors.APIError)
    def apiError(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(errors.APIError, failure.value)
        request.setResponseCode(error.status, errors.reasonPhrase(error.status))
        for name, value in error.headers().items():
            request.setHeader(name, value)
        return error.body()

    @app.handle_errors(SchedulerError)
    def schedulerError(self, request: IRequest, failure: Failure) -> bytes:
        error = errors.fromScheduler(cast(SchedulerError, failure.value))
        body: bytes = self.apiError(request, Failure(error))
        return body

    @app.handle_errors(HTTPException)
    def httpError(self, request: IRequest, failure: Failure) -> bytes:
        e = cast(HTTPException, failure.value)
        kind = "not_found_error" if e.code == 404 else "invalid_request_error"
        message = f"{request.method.decode()} {request.path.decode('latin-1')}: {e.name}"
        if isinstance(e, RequestRedirect):
            # werkzeug's URL is absolute, built from the Host header: a
            # relative reference (RFC 9110 section 10.2.2) is enough.
            target = urlsplit(e.new_url)
            location = target.path + (f"?{target.query}" if target.query else _query(request))
            request.setHeader(b"Location", location.encode("ascii", "replace"))
            message += f"; use {target.path}"
        if isinstance(e, MethodNotAllowed) and e.valid_methods:
            # RFC 9110 section 15.5.6: a 405 lists the methods allowed.
            request.setHeader(b"Allow", ", ".join(sorted(e.valid_methods)).encode("ascii"))
        # No route: the API is known only from the client's headers.
        error = errors.inShapeOf(errors.APIError(e.code or 500, message, kind), request.requestHeaders)
        body: bytes = self.apiError(request, Failure(error))
        return body

    @app.handle_errors(Exception)
    def unexpectedError(self, request: IRequest, failure: Failure) -> bytes:
        """
        Any other failure is a bug: logged with its traceback, and answered
        500 in the envelope, never with twisted.web's HTML page.
        """
        _log.failure("unexpected error serving {method} {path}", failure,
                     method=request.method.decode("latin-1"), path=request.path.decode("latin-1"))
        if cast(Request, request).startedWriting:
            return b""
        error = errors.inShapeOf(
            errors.APIError(500, "internal error; the daemon's log has the details", "server_error"),
            request.requestHeaders,
        )
        body: bytes = self.apiError(request, Failure(error))
        return body

    # Models by name.

    def _model(self, name: str) -> ModelConfig:
        """
        @return: the model that C{name} (a name or an alias) names.
        @raise errors.APIError: 404 if there is none.
        """
        model = self.config.model(name)
        if model is None:
            raise errors.modelNotFound(name)
        return model

    def _splitModelPath(self, rest: str) -> tuple[str, str]:
        """
        Split a path that starts with a model's name, such as
        C{Qwen/Qwen2.5-0.5B/versions/1/infer}, where the name may hold C{/}
        (sent as it is or as C{%2F}): the longest configured name or alias
        that the path starts with, followed by the end of the path or C{/},
        is the name.

        @param rest: The decoded path after the route's prefix.
        @return: the name and what follows it (C{""} or starting with
            C{/}).
        @raise errors.APIError: 404 if no configured model begins it.
        """
        best = ""
        for model in self.config.models:
            for name in model.names:
                if len(name) > len(best) and (rest == name or rest.startswith(name + "/")):
                    best = name
        if not best:
            raise errors.modelNotFound(rest.split("/", 1)[0])
        return best, rest[len(best):]

    # OpenAI routes.

    @app.route("/v1/models", methods=["GET"])
    @app.route("/models", methods=["GET"])
    def listModels(self, request: IRequest) -> bytes:
        """
        The models in OpenAI's list shape, with the fields dynllm adds:
        C{model_type}, C{status} and C{aliases}. Unlisted models are left
        out.
        """
        self._checkClientKey(request)
        data = [self._modelObject(m, m.name) for m in self.config.models if m.listed]
        return _json(request, {"object": "list", "data": data})

    @app.route("/v1/models/<name:name>", methods=["GET"], **NAMED)
    @app.route("/models/<name:name>", methods=["GET"], **NAMED)
    def retrieveModel(self, request: IRequest, name: str) -> bytes:
        """
        One model, under the id the client used (a name or an alias); a
        name may hold C{/}, sent as it is or as C{%2F}.
        """
        self._checkClientKey(request)
        return _json(request, self._modelObject(self._model(name), name))

    def _modelObject(self, model: ModelConfig, id: str) -> dict[str, Any]:
        return {
            "id": id,
            "object": "model",
            "created": model.created,
            "owned_by": "dynllm",
            "model_type": model.model_type,
            "status": self.manager.describe(model.name)["status"],
            "aliases": list(model.aliases),
        }

    async def _endpoint(self, request: Request, endpoint: Endpoint) -> None:
        """
        Serve one endpoint of the table: find the model the request names,
        check that the endpoint serves it, and relay the request to its
        backend, renaming the model on the way if the backend knows it by
        another name than the one the client used.
        """
        self._checkClientKey(request)
        body: Any
        fields: dict[str, Any] = {}
        if endpoint.modelIn == JSON:
            content = request.content
            assert content is not None  # twisted.web has received the whole body
            examined = await self.examiner.examine(content)
            fields = examined.fields
            name = requestedModel(fields)
            model, backend, upstream = self._resolve(name, endpoint.path, endpoint)
            upstreamName = backend.upstreamModel(model, name)
            body = requestBody(request, self.clock)
            if upstreamName != name:
                # The body as sent, with the model's value replaced.
                assert examined.modelSpan is not None
                replacement = jsonString(upstreamName)
                if isinstance(body, bytes):
                    body = splice(body, examined.modelSpan, replacement)
                else:
                    start, end = examined.modelSpan
                    body = fileProducer(multipart.SplicedFile(content, start, end, replacement), self.clock)
        elif endpoint.modelIn == MULTIPART:
            content = request.content
            assert content is not None  # twisted.web has spooled the whole body
            try:
                found = multipart.findField(content, request.getHeader(b"content-type"), "model")
            except multipart.MultipartError as e:
                raise errors.badRequest(str(e), code="invalid_multipart") from None
            if found is None or not found.value:
                raise errors.badRequest("the request must name a model in its 'model' field", param="model")
            name = found.value
            model, backend, upstream = self._resolve(name, endpoint.path, endpoint)
            upstreamName = backend.upstreamModel(model, name)
            if upstreamName == name:
                body = requestBody(request, self.clock)
            else:
                spliced = multipart.SplicedFile(content, found.start, found.end, upstreamName.encode("utf-8"))
                body = fileProducer(spliced, self.clock)
        else:
            values = request.args.get(b"model", [])
            if len(values) != 1 or not values[0]:
                problem = "more than once" if len(values) > 1 else "in its 'model' query parameter"
                raise errors.badRequest(f"the request must name a model {problem}", param="model")
            name = values[0].decode("utf-8", "replace")
            model, backend, upstream = self._resolve(name, endpoint.path, endpoint)
            upstreamName = backend.upstreamModel(model, name)  # for the answer: a query has no body to rename
            body = requestBody(request, self.clock) if request.method != b"GET" else None
        rewriter = nameRewriter(upstreamName, name) if upstreamName != name else None
        streamed = None
        if endpoint.streams and fields.get("stream") is True:
            streamed = errors.ANTHROPIC if endpoint.api == endpoints.ANTHROPIC else errors.OPENAI
        await self._proxy(request, endpoint.path, model, upstream + _query(request), body, rewriter, streamed=streamed)

    # KServe v2.

    @app.route("/v2/models/<name:rest>", methods=["GET", "POST"], **NAMED)
    async def kserve(self, request: Request, rest: str) -> bytes | None:
        """
        KServe v2 by model: C{NAME[/versions/V]} (metadata, C{GET}),
        C{.../infer} (C{POST}) and C{.../ready} (C{GET}). The model is loaded
        if it is not, except for readiness (see L{_kserveReady}).
        """
        self._checkClientKey(request)
        name, tail = self._splitModelPath(rest)
        operation = tail
        version = re.match(r"/versions/[^/]+", tail)
        if version is not None:
            operation = tail[version.end():]
        method = "POST" if operation == "/infer" else "GET"
        if operation not in ("", "/infer", "/ready"):
            raise errors.APIError(404, f"{request.method.decode()} {request.path.decode('latin-1')}: Not Found",
                                  "not_found_error")
        if request.method.decode() != method:
            request.setHeader(b"Allow", method.encode("ascii"))
            raise errors.APIError(405, f"{request.method.decode()} is not allowed here; use {method}",
                                  "invalid_request_error")
        route = "/v2/models/{name}" + ("/infer" if operation == "/infer" else "")
        model, _, _ = self._resolve(name, route, endpoints.BY_PATH[route])
        upstream = f"/v2/models/{quote(model.name, safe='')}{tail}"
        if operation == "/ready":
            return await self._kserveReady(request, model, upstream)
        body = requestBody(request, self.clock) if method == "POST" else None
        rewriter = nameRewriter(model.name, name) if name != model.name else None
        await self._proxy(request, upstream, model, upstream, body, rewriter, label=route)
        return None

    async def _kserveReady(self, request: Request, model: ModelConfig, upstream: str) -> bytes | None:
        """
        Model readiness, answered without loading the model or resetting
        its idle timer, so that a client polling it does not keep the model
        loaded forever.

        A loaded model's backend answers for it. A model that is not
        loaded answers 200 (an inference request would load it), unless
        its last load failed (503). The header L{STATE_HEADER} tells which.
        """
        lease = self.manager.peek(model.name)
        if lease is None:
            state = self.manager.describe(model.name)
            request.setHeader(STATE_HEADER, state["status"].encode("ascii"))
            if state["status"] == FAILED:
                raise errors.modelFailed(model.name, state["last_error"])
            return b""
        request.setHeader(STATE_HEADER, b"loaded")
        try:
            await forward(
                self.agent,
                request,
                (lease.baseURL + upstream).encode("ascii"),
                None,
                clock=self.clock,
                upstreamHeaders=lease.upstreamHeaders,
            )
        finally:
            lease.release()
        return None

    # Any request to a model's server.

    @app.route("/upstream/<name:rest>", **NAMED)
    async def upstream(self, request: Request, rest: str) -> None:
        """
        C{ANY /upstream/MODEL/PATH}: the request passed to the model's own
        server at C{/PATH} (with its query) as it is, the model loaded
        first: llama-server's C{/props}, C{/slots}, C{/metrics} or its web
        UI. Client keys apply; the body is not read or renamed.

        Only for the backends of L{endpoints.PASSTHROUGH_BACKENDS}.
        """
        self._checkClientKey(request)
        name, tail = self._splitModelPath(rest)
        model = self._model(name)
        if model.backend not in endpoints.PASSTHROUGH_BACKENDS:
            raise errors.badRequest(
                f"model {name!r} runs on the {model.backend} backend, whose own API can load any local"
                " model, outside the configuration and the memory budget: /upstream does not reach it",
                param="model",
                code="unsupported_endpoint",
            )
        upstream = quote(tail or "/", safe=PATH_SAFE) + _query(request)
        body = requestBody(request, self.clock)
        await self._proxy(request, "/upstream/{model}", model, upstream, body)

    # Relaying.

    def _resolve(
        self, name: str, route: str, endpoint: Endpoint
    ) -> tuple[ModelConfig, IBackend, str]:
        """
        Check that model C{name} exists and that C{endpoint} serves it.

        @param route: The path to ask the backend for: the endpoint's own,
            or for KServe the request's path.
        @return: the model, its backend, and the path of C{route} on it.
        @raise errors.APIError: 404 for an unknown model, 400 for a model
            of a type C{endpoint} does not serve, or whose backend does not
            serve it.
        """
        model = self._model(name)
        public = KSERVE_ROUTE if endpoint.api == endpoints.KSERVE else endpoint.path
        if model.model_type not in endpoint.modelTypes:
            raise errors.badRequest(
                f"model {name!r} is {errors.article(model.model_type)} model; {public} serves"
                f" {', '.join(endpoint.modelTypes)} models",
                param="model",
                code="model_type_mismatch",
            )
        backend = self.manager.backendOf(model.name)
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
        streamed: str | None = None,
    ) -> None:
        """
        Lease C{model}, relay the request to it, and hold the lease until
        the response has been written or the client has gone.

        @param upstream: The path (and query) on the backend (see
            L{_resolve}).
        @param body: What to send upstream: bytes, an C{IBodyProducer}, or
            C{None}.
        @param rewriter: Renames the model in the response, if needed.
        @param label: The route as metrics name it, if not C{route}.
        @param streamed: For a request that asked for a stream, the shape
            of its API's errors (L{errors.OPENAI} or L{errors.ANTHROPIC}):
            if the lease is not there at once, the stream starts while it
            waits (see L{_streamWhileLoading}). C{None} for any other.
        """
        self.metrics.observe(request, model.name, label or route, self.clock.seconds(), self.clock)
        acquiring = self.manager.acquire(model.name, requestOptions(request.requestHeaders))
        if streamed is not None and not acquiring.called:
            await self._streamWhileLoading(request, model, acquiring, upstream, body, rewriter, streamed)
            return
        await self._relay(request, await acquiring, upstream, body, rewriter)

    async def _relay(
        self,
        request: Request,
        lease: Lease,
        upstream: str,
        body: Any,
        rewriter: NameRewriter | None,
        started: bool = False,
        onResponse: Callable[[], object] | None = None,
    ) -> None:
        """
        Relay the request to the backend of C{lease} (a
        L{dynllm.lease.Lease}) with L{forward}, and release the lease once
        the response has been written or the client has gone.

        The relay ends early with L{UpstreamTimeout} when the backend sends
        nothing for the model's C{backend_idle_timeout_seconds}, and with
        L{dynllm.exceptions.ModelUnloaded} when the lease is revoked (a
        forced unload): see L{RelayGuard}.

        @param started: Whether the response has begun already (see
            L{forward}).
        @param onResponse: See L{forward}.
        """
        name = lease.model.name
        timeout = self.config.backendIdleTimeout(lease.model)

        def stalled() -> Exception:
            self.metrics.upstreamTimeout(name)
            log.warn("{model}: the backend sent nothing for {seconds}s; ending the request", model=name, seconds=timeout)
            return UpstreamTimeout(name, timeout)

        guard = RelayGuard(self.clock, timeout, stalled)
        withdraw = lease.whenRevoked(guard.end)
        try:
            if lease.revokedBy is not None:
                raise lease.revokedBy
            url = (lease.baseURL + upstream).encode("ascii")
            await forward(
                self.agent,
                request,
                url,
                body,
                clock=self.clock,
                rewriter=rewriter,
                upstreamHeaders=lease.upstreamHeaders,
                started=started,
                onResponse=onResponse,
                guard=guard,
            )
        finally:
            withdraw()
            lease.release()

    async def _streamWhileLoading(
        self,
        request: Request,
        model: ModelConfig,
        acquiring: defer.Deferred[Lease],
        upstream: str,
        body: Any,
        rewriter: NameRewriter | None,
        shape: str,
    ) -> None:
        """
        Serve a streamed request whose lease is not there yet: its SSE
        headers now and a loading comment a second (L{LoadingStream}),
        then the backend's body relayed into the same response. A failure
        to load, a backend that cannot be reached or that answers an error
        status ends the stream with an error event in C{shape}. A client
        that leaves cancels C{acquiring} (Klein cancels the route, and so
        the await), which withdraws it from the scheduler.

        @param acquiring: The Deferred of the L{dynllm.lease.Lease}, not
            fired yet.
        @param shape: L{errors.OPENAI} or L{errors.ANTHROPIC}.
        """
        stream = LoadingStream(request, model.name, self.clock, shape)
        stream.begin()
        try:
            lease = await acquiring
            await self._relay(request, lease, upstream, body, rewriter, started=True, onResponse=stream.stopComments)
        except defer.CancelledError:
            raise
        except Exception as e:
            stream.fail(e)
        finally:
            stream.stopComments()

    # The web console (dynllm.console).

    @app.route("/", methods=["GET"])
    def home(self, request: IRequest) -> bytes:
        return console.home(request)

    @app.route("/ui/", methods=["GET"])
    @app.route("/ui/<path:name>", methods=["GET"])
    def ui(self, request: IRequest, name: str = "") -> bytes:
        return console.packaged().serve(request, name)

    # Health and administration.

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        if not self.manager.started:
            return _json(request, {"status": "starting"}, 503)
        return _json(request, {"status": "ok"})

    @app.route("/metrics", methods=["GET"])
    def prometheusMetrics(self, request: Request) -> bytes:
        self._checkMetricsKey(request)
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

    @app.route("/admin/events", methods=["GET"])
    async def adminEvents(self, request: Request) -> None:
        """
        C{GET /admin/events}: every change of the models' states and of the
        memory they hold, as Server-Sent Events (C{event: model},
        C{event: memory}; see L{dynllm.events}), the current state first.
        """
        self._checkAdminKey(request)
        stream = self._stream(request, "/admin/events")
        stop = self.events.listen(lambda kind, data: stream.send(data, kind))
        try:
            await stream.whenDone()
        finally:
            stop()

    @app.route("/admin/logs", methods=["GET"])
    async def adminDaemonLog(self, request: Request) -> bytes | None:
        """
        C{GET /admin/logs?lines=N[&follow=1]}: the daemon's own last log
        lines, as the text log writes them (see L{adminLogs}).
        """
        self._checkAdminKey(request)
        ring = self.daemonLog.ring
        return await self._logs(request, "/admin/logs", ring.tail, ring.follow)

    @app.route("/admin/models/<name:rest>", methods=["GET"], **NAMED)
    async def adminLogs(self, request: Request, rest: str) -> bytes | None:
        """
        C{GET /admin/models/NAME/logs?lines=N}: the model's last lines of
        output (100 by default), as text. With C{&follow=1}: Server-Sent
        Events, one C{event: log} per line, the last N lines first, then
        each line as its backends print it, across restarts, until a
        reload removes the model (then the response ends).
        """
        self._checkAdminKey(request)
        name, tail = self._splitModelPath(rest)
        if tail != "/logs":
            raise errors.APIError(404, f"GET {request.path.decode('latin-1')}: Not Found", "not_found_error")
        name = self._model(name).name
        return await self._logs(
            request,
            f"/admin/models/{name}/logs",
            lambda count: self.manager.logTail(name, count),
            lambda onLines: self.manager.followLog(name, onLines),
            model=name,
        )

    async def _logs(
        self,
        request: Request,
        label: str,
        tail: Callable[[int], list[str]],
        follow: Callable[[Callable[[list[str]], None]], Callable[[], None]],
        model: str | None = None,
    ) -> bytes | None:
        """
        Answer a logs route: the last C{lines} lines as text, or with
        C{follow} an event stream of them and of the new ones.

        @param model: The model whose log it is: its stream ends when a
            reload removes it (its log is then no one's).
        """
        try:
            count = int(request.args.get(b"lines", [b"100"])[0])
        except ValueError:
            raise errors.badRequest("lines must be a number", param="lines") from None
        following = request.args.get(b"follow", [b"0"])[0].lower()
        if following not in FLAGS:
            raise errors.badRequest("follow must be 1 or 0 (true or false)", param="follow")
        if not FLAGS[following]:
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return "".join(line + "\n" for line in tail(count)).encode("utf-8")
        stream = self._stream(request, label)
        stream.sendLines(tail(count), LOG_EVENT)
        stop = follow(lambda lines: stream.sendFramed(self._logFrames(lines, LOG_EVENT)))
        stopEvents = None
        if model is not None:

            def removed(kind: str, data: dict[str, Any]) -> None:
                if kind == MODEL and data == {"name": model, "status": REMOVED}:
                    stream.close()

            stopEvents = self.events.listen(removed)
        try:
            await stream.whenDone()
        finally:
            stop()
            if stopEvents is not None:
                stopEvents()
        return None

    @app.route("/admin/models/unload", methods=["POST"])
    async def adminUnload(self, request: IRequest) -> bytes:
        """
        C{POST /admin/models/unload} with C{{"model": NAME}}: stop the model
        once idle (409 while it serves requests or loads), or, with
        C{"force": true}, now: its requests in flight and waiting fail with
        503 C{model_unloaded}.
        """
        self._checkAdminKey(request)
        parsed = await self._fields(request)
        force = parsed.get("force", False)
        if not isinstance(force, bool):
            raise errors.badRequest("force must be true or false", param="force")
        name = self._model(requestedModel(parsed)).name
        await self.manager.unload(name, force=force)
        return _json(request, {"model": name, "status": self.manager.describe(name)["status"]})

    @app.route("/admin/reload", methods=["POST"])
    def adminReload(self, request: IRequest) -> bytes:
        """
        C{POST /admin/reload}: read the configuration file again and apply
        it, as C{SIGHUP} does. Answers the changes (C{added}, C{removed},
        C{changed}, C{settings}, C{at_next_start}), or 400
        C{invalid_config} / C{restart_required} with the reason, when
        nothing was changed.
        """
        self._checkAdminKey(request)
        if self.reload is None:
            raise errors.APIError(404, "this dynllm has no configuration file to reload", "not_found_error")
        try:
            changes = self.reload()
        except ConfigError as e:
            for line in refusalLines(e):
                log.error("{line}", line=line)
            raise errors.badRequest(f"the configuration was not reloaded: {e}", code="invalid_config") from None
        except RestartRequired as e:
            for line in refusalLines(e):
                log.error("{line}", line=line)
            raise errors.badRequest(str(e), code="restart_required") from None
        log.info("configuration reloaded ({changes})", changes=changes.describe())
        return _json(request, {"status": "reloaded", "changes": changes.asDict()})

    @app.route("/admin/models/load", methods=["POST"])
    async def adminLoad(self, request: IRequest) -> bytes:
        self._checkAdminKey(request)
        name = self._model(requestedModel(await self._fields(request))).name
        await self.manager.load(name)
        return _json(request, {"model": name, "status": self.manager.describe(name)["status"]})


def _query(request: IRequest) -> str:
    """
    @return: C{request}'s query string with its C{?}, or C{""}.
    """
    _, mark, query = request.uri.partition(b"?")
    return (mark + query).decode("ascii", "replace") if query else ""


def _endpointRoute(endpoint: Endpoint) -> Callable[..., Any]:
    """
    @return: the Klein route function that serves C{endpoint}, whose
        errors take the shape of its API (Anthropic's for its endpoints,
        OpenAI's for the rest).
    """

    async def serve(self: DynLLMRoutes, request: Request) -> None:
        try:
            try:
                await self._endpoint(request, endpoint)
            except SchedulerError as e:
                raise errors.fromScheduler(e) from None
        except errors.APIError as e:
            if endpoint.api == endpoints.ANTHROPIC:
                raise evolve(e, shape=errors.ANTHROPIC) from None
            raise

    serve.__name__ = serve.__qualname__ = f"endpoint {endpoint.path}"
    return serve


for _endpoint in endpoints.ENDPOINTS:
    if _endpoint.modelIn != PATH:
        for _path in _endpoint.paths:
            DynLLMRoutes.app.route(_path, methods=[_endpoint.method], endpoint=f"endpoint {_path}")(
                _endpointRoute(_endpoint)
            )
