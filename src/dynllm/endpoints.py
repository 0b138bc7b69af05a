# -*- test-case-name: tests.test_endpoints -*-
"""
Which API operation serves which model types, on which backend, at which
path: one table that the routes, the configuration's checks, the backends and
the README all read.

Facts come from the backends' own route tables, as recorded in
C{shared/reference/backends.md}: llama-server b11434
(C{tools/server/server.cpp}, section 1.4), C{transformers serve} 5.24
(section 2.5) and OVMS 2026.3 (C{src/http_rest_api_handler.cpp} and the
calculators of each task, sections 3.6 and 3.9).

This module imports nothing else of dynllm, so that every other module may
read it.
"""

from __future__ import annotations

from typing import Mapping

from attrs import frozen

#: Model types OVMS serves as classic models, through KServe v2 only.
KSERVE_TYPES = ("classification", "detection", "segmentation", "ocr")

#: Every model type of the spec.
MODEL_TYPES = (
    "llm",
    "transcription",
    "speech",
    "image_generation",
    "embedding",
    "rerank",
    *KSERVE_TYPES,
)

#: The backend kinds this version can run. C{command} runs any server a
#: model's C{command} gives; the table says where it serves each route by
#: default (OpenAI's own paths), which a model's C{endpoints} may change.
BACKEND_KINDS = ("llamacpp", "openvino", "transformers", "command")

#: An upstream path meaning "the endpoint's own public path" (for an
#: endpoint whose path names the model, such as KServe v2's: the request's
#: own path).
SAME_PATH = ""

#: Where a request names its model.
JSON, MULTIPART, QUERY, PATH = "json", "multipart", "query", "path"

#: The API families, which decide the shape of dynllm's own error answers.
OPENAI, ANTHROPIC, LLAMACPP, KSERVE = "openai", "anthropic", "llama.cpp", "kserve"


@frozen
class Endpoint:
    """
    One operation that dynllm routes to the backend of the model a request
    names.

    @ivar path: The public path, e.g. C{/v1/chat/completions}.
    @ivar api: The API it belongs to (L{OPENAI}, L{ANTHROPIC}, L{LLAMACPP},
        L{KSERVE}); Anthropic's answers dynllm's own errors in its shape.
    @ivar modelIn: Where the request names its model: the JSON body's
        C{model} (L{JSON}), a C{model} field of a C{multipart/form-data}
        upload (L{MULTIPART}), the C{model} query parameter (L{QUERY}), or
        the path (L{PATH}).
    @ivar modelTypes: The model types it serves.
    @ivar upstream: Backend kind -> the path that serves it on that backend
        (L{SAME_PATH}: the request's own path).
    @ivar spellings: Other public paths routed the same way, such as
        llama-server's unversioned ones (C{/chat/completions}), which clients
        configured with a base URL without C{/v1} send.
    @ivar method: The HTTP method.
    @ivar streams: Whether C{"stream": true} in its JSON body asks for a
        Server-Sent Events answer (OpenAI's chat, completions and
        responses, Anthropic's messages, llama.cpp's C{/completion} and
        C{/infill}); only those get loading comments while their model
        loads (L{dynllm.feedback}).
    """

    path: str
    api: str
    modelIn: str
    modelTypes: tuple[str, ...]
    upstream: Mapping[str, str]
    spellings: tuple[str, ...] = ()
    method: str = "POST"
    streams: bool = False

    @property
    def paths(self) -> tuple[str, ...]:
        """
        Every public path of this endpoint, L{path} first.
        """
        return (self.path, *self.spellings)


def _everywhere(ovms: str) -> dict[str, str]:
    # llama-server and transformers serve OpenAI's paths as they are; OVMS
    # serves them under /v3 (all versions; /v1 too from 2026.3 on); any
    # other OpenAI-compatible server (command) at OpenAI's paths.
    return {"llamacpp": SAME_PATH, "openvino": ovms, "transformers": SAME_PATH, "command": SAME_PATH}


def _openai(**paths: str) -> dict[str, str]:
    # An OpenAI route: any OpenAI-compatible server serves it at its own path.
    return {**paths, "command": SAME_PATH}


_LLAMA_TYPES = ("llm", "embedding", "rerank")

#: Every endpoint, in the order the README lists them.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", OPENAI, JSON, ("llm",), _everywhere("/v3/chat/completions"),
             ("/chat/completions",), streams=True),
    Endpoint("/v1/completions", OPENAI, JSON, ("llm",), _everywhere("/v3/completions"), ("/completions",),
             streams=True),
    Endpoint("/v1/responses", OPENAI, JSON, ("llm",), _everywhere("/v3/responses"), ("/responses",),
             streams=True),
    Endpoint("/v1/embeddings", OPENAI, JSON, ("embedding",), _openai(llamacpp=SAME_PATH, openvino="/v3/embeddings"),
             ("/embeddings",)),
    Endpoint("/v1/rerank", OPENAI, JSON, ("rerank",), _openai(llamacpp=SAME_PATH, openvino="/v3/rerank"),
             ("/rerank", "/reranking", "/v1/reranking")),
    Endpoint("/v1/audio/transcriptions", OPENAI, MULTIPART, ("transcription",),
             _openai(openvino="/v3/audio/transcriptions", transformers=SAME_PATH), ("/audio/transcriptions",)),
    Endpoint("/v1/audio/translations", OPENAI, MULTIPART, ("transcription",),
             _openai(openvino="/v3/audio/translations")),
    Endpoint("/v1/audio/speech", OPENAI, JSON, ("speech",), _openai(openvino="/v3/audio/speech")),
    Endpoint("/v1/images/generations", OPENAI, JSON, ("image_generation",),
             _openai(openvino="/v3/images/generations")),
    Endpoint("/v1/images/edits", OPENAI, MULTIPART, ("image_generation",), _openai(openvino="/v3/images/edits")),
    Endpoint("/v1/tokenize", OPENAI, JSON, _LLAMA_TYPES, {"openvino": "/v3/tokenize"}),
    Endpoint("/v1/messages", ANTHROPIC, JSON, ("llm",), {"llamacpp": SAME_PATH}, streams=True),
    Endpoint("/v1/messages/count_tokens", ANTHROPIC, JSON, ("llm",), {"llamacpp": SAME_PATH}),
    Endpoint("/completion", LLAMACPP, JSON, ("llm",), {"llamacpp": SAME_PATH}, streams=True),
    Endpoint("/infill", LLAMACPP, JSON, ("llm",), {"llamacpp": SAME_PATH}, streams=True),
    Endpoint("/apply-template", LLAMACPP, JSON, ("llm",), {"llamacpp": SAME_PATH}),
    Endpoint("/tokenize", LLAMACPP, JSON, _LLAMA_TYPES, {"llamacpp": SAME_PATH}),
    Endpoint("/detokenize", LLAMACPP, JSON, _LLAMA_TYPES, {"llamacpp": SAME_PATH}),
    Endpoint("/embedding", LLAMACPP, JSON, ("embedding",), {"llamacpp": SAME_PATH}),
    Endpoint("/props", LLAMACPP, QUERY, _LLAMA_TYPES, {"llamacpp": SAME_PATH}, method="GET"),
    Endpoint("/v2/models/{name}", KSERVE, PATH, KSERVE_TYPES, {"openvino": SAME_PATH}, method="GET"),
    Endpoint("/v2/models/{name}/infer", KSERVE, PATH, KSERVE_TYPES, {"openvino": SAME_PATH}),
)

#: The backends that C{ANY /upstream/MODEL/PATH} passes requests to as they
#: are (a C{command} server too: what its own API does is the operator's
#: choice). Not C{transformers serve}: its own API loads any model a request
#: names (C{POST /load_model}, and transcriptions ignore the pinned model),
#: which would bypass the configuration and the memory budget.
PASSTHROUGH_BACKENDS = ("llamacpp", "openvino", "command")

#: The endpoints of each public path.
BY_PATH: Mapping[str, Endpoint] = {p: e for e in ENDPOINTS for p in e.paths}


def endpointOf(route: str) -> Endpoint | None:
    """
    @param route: A public path (any of an endpoint's L{Endpoint.paths}),
        or the path of a KServe v2 request (C{/v2/models/NAME/...}).
    @return: the endpoint it names, or C{None}.
    """
    endpoint = BY_PATH.get(route)
    if endpoint is None and route.startswith("/v2/models/"):
        return BY_PATH["/v2/models/{name}/infer" if route.endswith("/infer") else "/v2/models/{name}"]
    return endpoint


def upstreamPath(kind: str, route: str) -> str | None:
    """
    @param kind: A backend kind.
    @param route: As for L{endpointOf}.
    @return: the path on a backend of C{kind} that serves C{route}, or
        C{None} if that backend does not serve it.
    """
    endpoint = endpointOf(route)
    if endpoint is None:
        return None
    path = endpoint.upstream.get(kind)
    if path is None:
        return None
    if path == SAME_PATH:
        return endpoint.path if endpoint.modelIn != PATH else route
    return path


def modelTypesOf(kind: str) -> tuple[str, ...]:
    """
    @return: the model types that a backend of C{kind} serves through at
        least one endpoint, in the order of L{MODEL_TYPES}.
    """
    served = {t for e in ENDPOINTS if kind in e.upstream for t in e.modelTypes}
    return tuple(t for t in MODEL_TYPES if t in served)


def servedBy(kind: str, modelType: str) -> tuple[Endpoint, ...]:
    """
    @return: the endpoints that serve a model of C{modelType} on C{kind}.
    """
    return tuple(e for e in ENDPOINTS if kind in e.upstream and modelType in e.modelTypes)


def rstTable() -> str:
    """
    @return: the table as the README shows it (reStructuredText), one row
        per endpoint: its paths, the model types, and the path on each
        backend.
    """
    header = ("route", "model types", *BACKEND_KINDS)
    rows = []
    for e in ENDPOINTS:
        route = " ".join(f"``{p}``" for p in e.paths)
        if e.method != "POST":
            route = f"{e.method} {route}"
        cells = [route, ", ".join(e.modelTypes)]
        for kind in BACKEND_KINDS:
            path = upstreamPath(kind, e.path)
            cells.append("" if path is None else f"``{path}``")
        rows.append(cells)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        return " ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = " ".join("=" * w for w in widths)
    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])
