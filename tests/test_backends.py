"""
Tests for the backend kinds: the command line each model gets, the paths
each backend serves, how readiness is probed, and the name each backend
knows a model by.
"""

from __future__ import annotations

import os

from attrs import evolve
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dynllm.backends import (
    LlamaCppBackend,
    OpenVINOBackend,
    TransformersBackend,
    backendFor,
)
from dynllm.config import BACKEND_KINDS, BACKEND_MODEL_TYPES, ModelConfig
from dynllm.interfaces import IBackend
from tests.support import flag


def model(**kw: object) -> ModelConfig:
    """
    @return: a model with a name, path, backend and size, plus C{kw}.
    """
    settings: dict[str, object] = {"name": "m", "path": "/models/m", "backend": "openvino", "vram_mb": 1}
    settings.update(kw)
    return ModelConfig(**settings)  # type: ignore[arg-type]


class FakeResponse:
    def __init__(self, code: int) -> None:
        self.code = code

    def content(self) -> defer.Deferred[bytes]:
        return defer.succeed(b"")


class FakeHTTP:
    """
    Answers each URL with a status from C{codes} (404 for others) and
    records the URLs asked.
    """

    def __init__(self, codes: dict[str, int]) -> None:
        self.codes = codes
        self.asked: list[str] = []
        self.headers: list[dict[bytes, list[bytes]] | None] = []

    def request(
        self, method: str, url: str, timeout: float, headers: dict[bytes, list[bytes]] | None = None
    ) -> defer.Deferred[FakeResponse]:
        self.asked.append(url)
        self.headers.append(headers)
        return defer.succeed(FakeResponse(self.codes.get(url, 404)))


class InterfaceTests(SynchronousTestCase):
    """
    Every backend kind has an L{IBackend} that serves the model types the
    configuration allows for it.
    """

    def test_everyKind(self) -> None:
        """
        Each kind of the configuration has a backend that provides
        L{IBackend}, with the configuration's model types.
        """
        for kind in BACKEND_KINDS:
            backend = backendFor(kind)
            self.assertTrue(verifyObject(IBackend, backend))
            self.assertEqual(backend.kind, kind)
            self.assertEqual(set(backend.modelTypes), set(BACKEND_MODEL_TYPES[kind]))


class OpenVINOTests(SynchronousTestCase):
    """
    L{OpenVINOBackend} runs OVMS on loopback with gRPC off, with the task
    each model type needs.
    """

    backend = OpenVINOBackend()

    def test_commandLine(self) -> None:
        """
        REST on 127.0.0.1 at the given port, gRPC port 0 (off), the model
        under its public name, the target device, the shape when given,
        and the extra arguments last.
        """
        args = self.backend.argv(
            model(target_device="GPU", ovms_shape="auto", extra_args=("--nireq", "2")), "/bin/ovms", 9100
        )
        self.assertEqual(args[0], "/bin/ovms")
        self.assertEqual(flag(args, "--rest_port"), "9100")
        self.assertEqual(flag(args, "--rest_bind_address"), "127.0.0.1")
        self.assertEqual(flag(args, "--port"), "0")
        self.assertEqual(flag(args, "--model_name"), "m")
        self.assertEqual(flag(args, "--model_path"), "/models/m")
        self.assertEqual(flag(args, "--target_device"), "GPU")
        self.assertEqual(flag(args, "--shape"), "auto")
        self.assertEqual(args[-2:], ["--nireq", "2"])

    def test_keyAndEnvironment(self) -> None:
        """
        OVMS reads its key from C{API_KEY}, and inherits neither that nor
        C{OVMS_MODEL_REPOSITORY_PATH} (another source of the model) from
        dynllm's environment.
        """
        self.assertEqual(self.backend.keyVariable, "API_KEY")
        self.assertEqual(
            self.backend.environment(model()), {"API_KEY": None, "OVMS_MODEL_REPOSITORY_PATH": None}
        )

    def test_tasks(self) -> None:
        """
        Generative types get the C{--task} that builds their MediaPipe
        graph; vision types are classic models with no task.
        """
        expected = {
            "llm": "text_generation",
            "embedding": "embeddings",
            "rerank": "rerank",
            "transcription": "speech2text",
            "speech": "text2speech",
            "image_generation": "image_generation",
            "classification": None,
            "detection": None,
            "segmentation": None,
            "ocr": None,
        }
        for kind, task in expected.items():
            self.assertEqual(flag(self.backend.argv(model(model_type=kind), "ovms", 1), "--task"), task, kind)
        self.assertIsNone(flag(self.backend.argv(model(), "ovms", 1), "--shape"))

    def test_ownGraph(self) -> None:
        """
        A model directory with its own C{graph.pbtxt} is served by that
        graph: no C{--task}.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "graph.pbtxt"), "w") as f:
            f.write('node { calculator: "EmbeddingsCalculatorOV" }\n')
        args = self.backend.argv(model(path=directory, model_type="embedding"), "ovms", 1)
        self.assertIsNone(flag(args, "--task"))

    def test_ownGraphNoTargetDevice(self) -> None:
        """
        A model with its own C{graph.pbtxt} gets no C{--target_device},
        which OVMS refuses with a ready-made graph (the graph names its
        device); a C{--task} graph does get one.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "graph.pbtxt"), "w") as f:
            f.write('node { calculator: "EmbeddingsCalculatorOV" }\n')
        self.assertIsNone(flag(self.backend.argv(model(path=directory, model_type="embedding"), "ovms", 1), "--target_device"))
        self.assertEqual(flag(self.backend.argv(model(model_type="embedding"), "ovms", 1), "--target_device"), "CPU")

    def test_paths(self) -> None:
        """
        OpenAI routes go to OVMS's C{/v3} paths; KServe paths pass as they
        are, for vision models only.
        """
        llm, ocr = model(), model(model_type="ocr")
        self.assertEqual(self.backend.upstreamPath("/v1/chat/completions", llm), "/v3/chat/completions")
        self.assertEqual(self.backend.upstreamPath("/v1/rerank", llm), "/v3/rerank")
        self.assertEqual(self.backend.upstreamPath("/v1/audio/translations", llm), "/v3/audio/translations")
        self.assertEqual(self.backend.upstreamPath("/v2/models/m/infer", ocr), "/v2/models/m/infer")
        self.assertIsNone(self.backend.upstreamPath("/v2/models/m/infer", llm))
        self.assertEqual(self.backend.upstreamModel(llm), "m")

    def test_probeKServe(self) -> None:
        """
        A model is ready when C{/v2/models/NAME/ready} answers 200.
        """
        http = FakeHTTP({"http://h/v2/models/m%2Fx/ready": 200})
        ready = self.successResultOf(self.backend.probe(http, "http://h", model(name="m/x", model_type="ocr")))
        self.assertTrue(ready)
        http = FakeHTTP({})
        self.assertFalse(self.successResultOf(self.backend.probe(http, "http://h", model(model_type="ocr"))))
        self.assertEqual(http.asked, ["http://h/v2/models/m/ready"])

    def test_probeTaskGraph(self) -> None:
        """
        A graph built by C{--task} that the OVMS version does not list
        under KServe is ready when C{/v3/models/NAME} answers 200.
        """
        http = FakeHTTP({"http://h/v3/models/m": 200})
        self.assertTrue(self.successResultOf(self.backend.probe(http, "http://h", model(model_type="speech"))))
        self.assertEqual(http.asked, ["http://h/v2/models/m/ready", "http://h/v3/models/m"])


class TransformersTests(SynchronousTestCase):
    """
    L{TransformersBackend} runs C{transformers serve} with the model pinned.
    """

    backend = TransformersBackend()

    def hf(self, **kw: object) -> ModelConfig:
        return model(backend="transformers", path="/models/tiny", **kw)

    def test_defaults(self) -> None:
        """
        The model's path is pinned (the positional argument), on
        127.0.0.1, with transformers' own idle unload off.
        """
        args = self.backend.argv(self.hf(), "/venv/bin/transformers", 9200)
        self.assertEqual(args[:3], ["/venv/bin/transformers", "serve", "/models/tiny"])
        self.assertEqual(flag(args, "--host"), "127.0.0.1")
        self.assertEqual(flag(args, "--port"), "9200")
        self.assertEqual(flag(args, "--device"), "auto")
        self.assertEqual(flag(args, "--dtype"), "auto")
        self.assertEqual(flag(args, "--model-timeout"), "-1")
        for absent in ("--quantization", "--trust-remote-code", "--attn-implementation", "--compile"):
            self.assertNotIn(absent, args)
        self.assertEqual(self.backend.environment(self.hf()), {"HF_HUB_OFFLINE": "1"})

    def test_noKey(self) -> None:
        """
        C{transformers serve} has no API key, so none is made for it.
        """
        self.assertIsNone(self.backend.keyVariable)

    def test_everyField(self) -> None:
        """
        Each transformers field of the spec maps to its flag; the revision
        is appended to the pinned path.
        """
        m = self.hf(
            device="cuda",
            dtype="bfloat16",
            quantization="bnb-4bit",
            trust_remote_code=True,
            compile_model=True,
            continuous_batching=True,
            attn_implementation="sdpa",
            model_timeout=120.0,
            revision="v2",
        )
        args = self.backend.argv(m, "transformers", 1)
        self.assertEqual(args[2], "/models/tiny@v2")
        self.assertEqual(flag(args, "--device"), "cuda")
        self.assertEqual(flag(args, "--dtype"), "bfloat16")
        self.assertEqual(flag(args, "--quantization"), "bnb-4bit")
        self.assertEqual(flag(args, "--attn-implementation"), "sdpa")
        self.assertEqual(flag(args, "--model-timeout"), "120")
        for present in ("--trust-remote-code", "--compile", "--continuous-batching"):
            self.assertIn(present, args)
        self.assertEqual(self.backend.upstreamModel(m), "/models/tiny@v2")

    def test_noneAndAuto(self) -> None:
        """
        C{quantization: none} and C{attn_implementation: auto} add no flag.
        """
        args = self.backend.argv(self.hf(quantization="none", attn_implementation="auto"), "t", 1)
        self.assertNotIn("--quantization", args)
        self.assertNotIn("--attn-implementation", args)

    def test_paths(self) -> None:
        """
        Chat, completions and responses, and transcriptions, at the same
        paths (which model types each serves is the routes' check); no
        translations.
        """
        llm, whisper = self.hf(), self.hf(model_type="transcription")
        self.assertEqual(self.backend.upstreamPath("/v1/chat/completions", llm), "/v1/chat/completions")
        self.assertEqual(self.backend.upstreamPath("/v1/completions", llm), "/v1/completions")
        self.assertEqual(self.backend.upstreamPath("/responses", llm), "/v1/responses")
        self.assertEqual(
            self.backend.upstreamPath("/v1/audio/transcriptions", whisper), "/v1/audio/transcriptions"
        )
        self.assertIsNone(self.backend.upstreamPath("/v1/audio/translations", whisper))
        self.assertEqual(self.backend.upstreamModel(llm), "/models/tiny")


class LlamaCppTests(SynchronousTestCase):
    """
    L{LlamaCppBackend} serves its routes at the same paths, under the alias.
    """

    def test_paths(self) -> None:
        """
        llama.cpp's routes pass as they are, unversioned spellings go to
        their C{/v1} form; others are not served.
        """
        backend = LlamaCppBackend()
        m = evolve(model(), backend="llamacpp")
        self.assertEqual(backend.upstreamPath("/v1/embeddings", m), "/v1/embeddings")
        self.assertEqual(backend.upstreamPath("/embeddings", m), "/v1/embeddings")
        self.assertEqual(backend.upstreamPath("/v1/messages", m), "/v1/messages")
        self.assertEqual(backend.upstreamPath("/tokenize", m), "/tokenize")
        self.assertIsNone(backend.upstreamPath("/v1/tokenize", m))
        self.assertIsNone(backend.upstreamPath("/v1/audio/speech", m))
        self.assertEqual(backend.upstreamModel(m), "m")

    def test_keyAndEnvironment(self) -> None:
        """
        llama-server reads its key from C{LLAMA_API_KEY}, and inherits no
        variable of a setting dynllm owns (address, model, alias, keys)
        from dynllm's environment.
        """
        backend = LlamaCppBackend()
        m = evolve(model(), backend="llamacpp")
        self.assertEqual(backend.keyVariable, "LLAMA_API_KEY")
        environment = backend.environment(m)
        for name in ("LLAMA_API_KEY", "LLAMA_ARG_API_KEY_FILE", "LLAMA_ARG_PORT", "LLAMA_ARG_HOST",
                     "LLAMA_ARG_MODEL", "LLAMA_ARG_ALIAS", "LLAMA_ARG_HF_REPO"):
            self.assertIn(name, environment)
            self.assertIsNone(environment[name])
        self.assertNotIn("--api-key", backend.argv(m, "llama-server", 1))
