# -*- test-case-name: tests.test_backends -*-
"""
llama.cpp's C{llama-server}: one process per GGUF model, for chat and text
completion (C{llm}), embeddings and reranking.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet import defer
from zope.interface import implementer

from dynllm.backends._http import getIsOK
from dynllm.config import ModelConfig
from dynllm.endpoints import modelTypesOf, upstreamPath
from dynllm.interfaces import IBackend
from dynllm.owned import LLAMACPP, OwnedSettings

@implementer(IBackend)
@frozen
class LlamaCppBackend:
    """
    Runs C{llama-server -m PATH --host 127.0.0.1 --port N}, with its API
    key in C{LLAMA_API_KEY} (C{/health} stays public, so probes need none).

    It binds before loading and answers 503 until the model is in memory, so
    C{GET /health} == 200 means ready; the C{model loaded} log line (or the
    older C{server is listening}) prompts an immediate probe.
    """

    kind: str = "llamacpp"
    modelTypes: tuple[str, ...] = modelTypesOf("llamacpp")
    owned: OwnedSettings = LLAMACPP
    keyVariable: str | None = "LLAMA_API_KEY"

    def wantsKey(self, model: ModelConfig) -> bool:
        return self.keyVariable is not None

    def argv(self, model: ModelConfig, binary: str, port: int, apiKey: str | None = None) -> list[str]:
        args = [
            binary,
            "--model", model.path,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--alias", model.name,
            "--n-gpu-layers", str(model.n_gpu_layers),
            "--ctx-size", str(model.context_size),
        ]
        if model.model_type == "embedding":
            args.append("--embedding")
        elif model.model_type == "rerank":
            args.append("--rerank")
        return args + list(model.extra_args)

    def environment(self, model: ModelConfig) -> dict[str, str | None]:
        return dict.fromkeys(self.owned.variables)

    def probe(self, http: Any, baseURL: str, model: ModelConfig) -> defer.Deferred[bool]:
        return defer.ensureDeferred(getIsOK(http, baseURL + "/health"))

    def readyHint(self, line: str) -> bool:
        return "model loaded" in line or "listening on" in line

    def upstreamPath(self, route: str, model: ModelConfig) -> str | None:
        return upstreamPath(self.kind, route)

    def upstreamModel(self, model: ModelConfig, requested: str | None = None) -> str:
        return model.name
