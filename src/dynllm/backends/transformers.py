# -*- test-case-name: tests.test_backends -*-
"""
Hugging Face C{transformers serve} (5.5 and newer): one process per local
model directory, for chat and text completion (C{llm}) and speech to text
(C{transcription}).
"""

from __future__ import annotations

import math
from typing import Any

from attrs import frozen
from twisted.internet import defer
from zope.interface import implementer

from dynllm.backends._http import getIsOK
from dynllm.config import ModelConfig
from dynllm.endpoints import modelTypesOf, upstreamPath
from dynllm.interfaces import IBackend
from dynllm.owned import TRANSFORMERS, OwnedSettings

def modelTimeout(model: ModelConfig) -> str:
    """
    @return: the C{--model-timeout} value: the model's C{model_timeout}, or
        C{-1} (never) when it is unset or infinite, so that only dynllm
        decides when the model goes.
    """
    timeout = model.model_timeout
    if timeout is None or math.isinf(timeout):
        return "-1"
    return str(int(timeout))


@implementer(IBackend)
@frozen
class TransformersBackend:
    """
    Runs C{transformers serve PATH[@REVISION] --host 127.0.0.1 --port N}.

    The model is pinned on the command line, so the server loads it before
    it binds: C{GET /health} == 200 means the model is ready. A pinned
    server knows the model by its path, not by its public name, so requests
    and responses are renamed on the way (L{upstreamModel}).

    C{transformers serve} has no API key (no option, no variable, no check
    in C{cli/serving}), so L{keyVariable} is C{None}: like any server on
    127.0.0.1, its port can be used directly by other local users.
    """

    kind: str = "transformers"
    modelTypes: tuple[str, ...] = modelTypesOf("transformers")
    owned: OwnedSettings = TRANSFORMERS
    keyVariable: str | None = None

    def wantsKey(self, model: ModelConfig) -> bool:
        return self.keyVariable is not None

    def argv(self, model: ModelConfig, binary: str, port: int, apiKey: str | None = None) -> list[str]:
        args = [
            binary, "serve", self.upstreamModel(model),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--device", model.device,
            "--dtype", model.dtype,
            "--model-timeout", modelTimeout(model),
        ]
        if model.quantization not in (None, "none"):
            args += ["--quantization", model.quantization]
        if model.trust_remote_code:
            args.append("--trust-remote-code")
        if model.attn_implementation is not None and model.attn_implementation != "auto":
            args += ["--attn-implementation", model.attn_implementation]
        if model.continuous_batching:
            args.append("--continuous-batching")
        if model.compile_model:
            args.append("--compile")
        return args + list(model.extra_args)

    def environment(self, model: ModelConfig) -> dict[str, str | None]:
        # The model is a local directory: never wait on the Hub.
        return {"HF_HUB_OFFLINE": "1"}

    def probe(self, http: Any, baseURL: str, model: ModelConfig) -> defer.Deferred[bool]:
        return defer.ensureDeferred(getIsOK(http, baseURL + "/health"))

    def readyHint(self, line: str) -> bool:
        return "Uvicorn running on" in line or "Application startup complete" in line

    def upstreamPath(self, route: str, model: ModelConfig) -> str | None:
        return upstreamPath(self.kind, route)

    def upstreamModel(self, model: ModelConfig, requested: str | None = None) -> str:
        if model.revision is not None:
            return f"{model.path}@{model.revision}"
        return model.path
