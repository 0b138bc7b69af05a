# -*- test-case-name: tests.test_backends -*-
"""
OpenVINO Model Server (C{ovms}): one process per model, for every model type
of the spec.

Generative models are MediaPipe graphs served on OVMS's OpenAI-style C{/v3}
endpoints; OVMS builds the graph itself from C{--task} (OVMS 2025.2 and
newer), unless the model directory brings its own C{graph.pbtxt}. Vision
models (classification, detection, segmentation, OCR) are classic OpenVINO
IR models served through KServe v2 only.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from attrs import frozen
from twisted.internet import defer
from zope.interface import implementer

from dynllm.backends._http import getIsOK
from dynllm.config import ModelConfig, hasOwnGraph
from dynllm.endpoints import KSERVE_TYPES, modelTypesOf, upstreamPath
from dynllm.interfaces import IBackend
from dynllm.owned import OPENVINO, OwnedSettings

#: The C{--task} of each generative model type.
TASKS = {
    "llm": "text_generation",
    "embedding": "embeddings",
    "rerank": "rerank",
    "transcription": "speech2text",
    "speech": "text2speech",
    "image_generation": "image_generation",
}


@implementer(IBackend)
@frozen
class OpenVINOBackend:
    """
    Runs C{ovms --rest_port N --rest_bind_address 127.0.0.1 --port 0
    --model_name NAME --model_path PATH --target_device DEV [--task T]}:
    REST on loopback only, gRPC off, with its API key in C{API_KEY}, which
    guards only the OpenAI-style POSTs under C{/v3} and C{/v1}: the
    readiness probes need none (C{src/http_rest_api_handler.cpp};
    C{backends.md} 3.9). A model that brings its own C{graph.pbtxt} gets
    no C{--target_device} (OVMS refuses it there: the graph names its
    device).

    OVMS answers REST before its model is loaded. Every servable, classic
    model or MediaPipe graph, is registered under C{--model_name}, and
    C{GET /v2/models/NAME/ready} turns 200 once it is available. Some OVMS
    versions do not list the graphs that C{--task} builds under KServe; for
    those, a graph is also taken as ready when C{GET /v3/models/NAME}
    (which lists available graphs only) answers 200.
    """

    kind: str = "openvino"
    modelTypes: tuple[str, ...] = modelTypesOf("openvino")
    owned: OwnedSettings = OPENVINO
    keyVariable: str | None = "API_KEY"

    def wantsKey(self, model: ModelConfig) -> bool:
        return self.keyVariable is not None

    def argv(self, model: ModelConfig, binary: str, port: int, apiKey: str | None = None) -> list[str]:
        args = [
            binary,
            "--rest_port", str(port),
            "--rest_bind_address", "127.0.0.1",
            "--port", "0",
            "--model_name", model.name,
            "--model_path", model.path,
        ]
        ownGraph = hasOwnGraph(model.path)
        if not ownGraph:
            args += ["--target_device", model.target_device]
        if model.ovms_shape is not None:
            args += ["--shape", model.ovms_shape]
        task = TASKS.get(model.model_type)
        if task is not None and not ownGraph:
            args += ["--task", task]
        return args + list(model.extra_args)

    def environment(self, model: ModelConfig) -> dict[str, str | None]:
        # API_KEY (the run sets its own) and OVMS_MODEL_REPOSITORY_PATH.
        return dict.fromkeys(self.owned.variables)

    def probe(self, http: Any, baseURL: str, model: ModelConfig) -> defer.Deferred[bool]:
        return defer.ensureDeferred(self._probe(http, baseURL, model))

    async def _probe(self, http: Any, baseURL: str, model: ModelConfig) -> bool:
        name = quote(model.name, safe="")
        if await getIsOK(http, f"{baseURL}/v2/models/{name}/ready"):
            return True
        if model.model_type in TASKS:
            return await getIsOK(http, f"{baseURL}/v3/models/{name}")
        return False

    def readyHint(self, line: str) -> bool:
        return "AVAILABLE" in line or "ServableManagerModule started" in line

    def upstreamPath(self, route: str, model: ModelConfig) -> str | None:
        if route.startswith("/v2/models/") and model.model_type not in KSERVE_TYPES:
            return None
        return upstreamPath(self.kind, route)

    def upstreamModel(self, model: ModelConfig, requested: str | None = None) -> str:
        return model.name
