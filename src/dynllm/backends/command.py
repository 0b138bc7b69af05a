# -*- test-case-name: tests.test_command -*-
"""
Any OpenAI-compatible server (C{backend: command}): the model gives the
command line, with placeholders (L{dynllm.placeholders}), how readiness is
seen (C{ready}), which routes it serves where (C{endpoints}), what it calls
the model (C{upstream_model}) and how it is stopped (C{stop}).

Everything else (the port, the memory budget, eviction, leases, idle unload,
reconciliation after a crash, logs, metrics, C{/upstream}) is the same code
as for the named backends.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlsplit

from attrs import frozen
from twisted.internet import defer
from zope.interface import implementer

from dynllm.backends._http import getIsStatus
from dynllm.config import ModelConfig
from dynllm.endpoints import endpointOf, modelTypesOf, upstreamPath
from dynllm.interfaces import IBackend
from dynllm.owned import COMMAND, OwnedSettings
from dynllm.placeholders import expand, expandAll, placeholdersIn

#: Lines that many servers print once they listen (uvicorn, llama.cpp, Go's
#: and Node's servers): a hint to probe at once, not a proof of readiness.
LISTENING = re.compile(r"listening|running on|startup complete|server started|ready", re.IGNORECASE)

#: The C{upstream_model} values that are not a fixed name.
UPSTREAM_NAME, UPSTREAM_PATH, UPSTREAM_KEEP = "name", "path", "keep"


@implementer(IBackend)
@frozen
class CommandBackend:
    """
    Runs the model's C{command} (then its C{extra_args}) with its
    placeholders filled in: C{{port}} and C{{host}} (127.0.0.1) where dynllm
    wants it to listen, C{{name}}, C{{path}}, and C{{api_key}}, a fresh
    random key for each run that dynllm then sends as Bearer (only when the
    command or C{env} uses it: else no key is sent). Placeholders in the
    values of C{env} are filled in too: a key in a variable
    (C{VLLM_API_KEY: "{api_key}"}) is not on the command line, which every
    local user can read.

    Ready when C{GET ready.http.path} answers C{ready.http.status} (by
    default C{GET /health} == 200), after a line of its output matched
    C{ready.log} if that is given (L{dynllm.runner.BackendRun} watches the
    lines).
    """

    kind: str = "command"
    modelTypes: tuple[str, ...] = modelTypesOf("command")
    owned: OwnedSettings = COMMAND
    keyVariable: str | None = None

    def wantsKey(self, model: ModelConfig) -> bool:
        templates = (*model.command, *model.extra_args, *model.env.values())
        return any("api_key" in placeholdersIn(t) for t in templates)

    def argv(self, model: ModelConfig, binary: str, port: int, apiKey: str | None = None) -> list[str]:
        return expandAll((*model.command, *model.extra_args), model.placeholders(port, apiKey))

    def environment(self, model: ModelConfig) -> dict[str, str | None]:
        return {}

    def probe(self, http: Any, baseURL: str, model: ModelConfig) -> defer.Deferred[bool]:
        ready = model.ready
        if ready.http_path is None:
            # Readiness is the log line only, which the run has seen.
            return defer.succeed(True)
        # The values fill a URL's path: percent-encoded, "/" kept (a {path}).
        values = model.placeholders(urlsplit(baseURL).port or 0)
        path = expand(ready.http_path, {k: quote(v, safe="/") for k, v in values.items()})
        return defer.ensureDeferred(getIsStatus(http, baseURL + path, ready.http_status))

    def readyHint(self, line: str) -> bool:
        return LISTENING.search(line) is not None

    def upstreamPath(self, route: str, model: ModelConfig) -> str | None:
        if model.endpoints is None:
            return upstreamPath(self.kind, route)
        endpoint = endpointOf(route)
        if endpoint is None:
            return None
        return model.endpoints.get(endpoint.path)

    def upstreamModel(self, model: ModelConfig, requested: str | None = None) -> str:
        how = model.upstream_model
        if how == UPSTREAM_NAME:
            return model.name
        if how == UPSTREAM_PATH:
            return model.path
        if how == UPSTREAM_KEEP:
            return requested if requested is not None else model.name
        return how
