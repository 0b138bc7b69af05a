"""
Tests for L{dynllm.config}: defaults, every kind of error, and the
normalisations (timeouts, arguments, environment, paths) done while parsing,
plus the shipped example configuration.
"""

from __future__ import annotations

import math
import os
import re

import yaml
from attrs import fields
from twisted.trial.unittest import TestCase

from dynllm.config import (
    BackendSettings,
    Config,
    ConfigError,
    ModelConfig,
    ServerConfig,
    loadConfig,
    parseConfig,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "dynllm.example.yaml")


def found(name: str) -> str:
    """
    A C{which} that finds every program.
    """
    return "/usr/bin/" + os.path.basename(name)


def notFound(name: str) -> None:
    """
    A C{which} that finds no program.
    """
    return None


class ConfigTestMixin:
    """
    Helpers: a temporary directory holding model files, a minimal model
    declaration, and assertions on L{ConfigError} messages.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "ov-model"))
        for name in ("model.gguf", "other.gguf"):
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(b"GGUF")

    def model(self, **overrides: object) -> dict:
        """
        @return: a valid llama.cpp model declaration named C{m1}, with
            C{overrides} applied (C{None} removes a key).
        """
        raw = {"name": "m1", "path": "model.gguf", "backend": "llamacpp", "vram_mb": 100}
        raw.update(overrides)
        return {k: v for k, v in raw.items() if v is not None}

    def parse(self, raw: object, which=found) -> Config:
        """
        Parse C{raw} with the temporary directory as the base directory.
        """
        return parseConfig(raw, self.dir, None, which)

    def assertConfigError(self, raw: object, *fragments: str, which=found) -> str:
        """
        Assert that parsing C{raw} raises L{ConfigError} whose message
        contains every one of C{fragments}.

        @return: the message.
        """
        e = self.assertRaises(ConfigError, self.parse, raw, which)
        message = str(e)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def writeConfig(self, raw: object, name: str = "dynllm.yaml") -> str:
        """
        Write C{raw} as YAML into the temporary directory.

        @return: the file's path.
        """
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            if isinstance(raw, str):
                f.write(raw)
            else:
                yaml.safe_dump(raw, f)
        return path


class DefaultsTests(ConfigTestMixin, TestCase):
    """
    Settings left out take the defaults of the reference design.
    """

    def test_topLevelDefaults(self) -> None:
        """
        An empty mapping gives the documented top-level defaults.
        """
        config = self.parse({})
        self.assertEqual(config.server.port, 8000)
        self.assertEqual(config.server.api_keys, ())
        self.assertEqual(config.server.admin_api_keys, ())
        self.assertEqual(config.total_vram_mb, 8192)
        self.assertEqual(config.idle_timeout_seconds, 300)
        self.assertEqual(config.idle_check_interval_seconds, 1)
        self.assertEqual(config.load_timeout_seconds, 300)
        self.assertEqual(config.queue_timeout_seconds, 60)
        self.assertEqual(config.eviction_policy, "lifo")
        self.assertEqual(config.max_request_body_mb, 64)
        self.assertEqual(config.enabled_backends, ("llamacpp", "openvino"))
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.preload_models, ())
        self.assertEqual(config.models, ())
        self.assertIsNone(config.models_dir)

    def test_backendDefaults(self) -> None:
        """
        The backend programs default to C{llama-server}, C{ovms} and
        C{transformers}, and the backend port range to 9100-9200.
        """
        backend = self.parse({}).backend
        self.assertEqual(backend.llamacpp_binary, "llama-server")
        self.assertEqual(backend.ovms_binary, "ovms")
        self.assertEqual(backend.transformers_binary, "transformers")
        self.assertEqual(backend.port_range_start, 9100)
        self.assertEqual(backend.port_range_end, 9200)

    def test_binaryFor(self) -> None:
        """
        L{BackendSettings.binaryFor} gives the configured program of each
        backend kind, including C{ovms_binary} for C{openvino}.
        """
        backend = BackendSettings(
            llamacpp_binary="/l", ovms_binary="/o", transformers_binary="/t"
        )
        self.assertEqual(backend.binaryFor("llamacpp"), "/l")
        self.assertEqual(backend.binaryFor("openvino"), "/o")
        self.assertEqual(backend.binaryFor("transformers"), "/t")

    def test_emptyDocument(self) -> None:
        """
        An empty file (C{None} from YAML) is the default configuration.
        """
        self.assertEqual(self.parse(None).server.port, 8000)

    def test_defaultDatabaseBesideConfig(self) -> None:
        """
        C{db_path} defaults to C{dynllm_state.db} in the base directory.
        """
        config = self.parse({})
        self.assertEqual(config.db_path, os.path.join(self.dir, "dynllm_state.db"))

    def test_modelDefaults(self) -> None:
        """
        A model declaring only the required fields gets the documented
        defaults for the others.
        """
        [model] = self.parse({"models": [self.model()]}).models
        self.assertEqual(model.model_type, "llm")
        self.assertEqual(model.n_gpu_layers, -1)
        self.assertEqual(model.context_size, 4096)
        self.assertEqual(model.target_device, "CPU")
        self.assertIsNone(model.ovms_shape)
        self.assertEqual(model.device, "auto")
        self.assertEqual(model.dtype, "auto")
        self.assertIsNone(model.quantization)
        self.assertFalse(model.trust_remote_code)
        self.assertIsNone(model.unload_time)
        self.assertIsNone(model.load_timeout_seconds)
        self.assertEqual(model.extra_args, ())
        self.assertEqual(dict(model.env), {})

    def test_modelsInFileOrder(self) -> None:
        """
        Models are kept in the order of the file and found by name.
        """
        config = self.parse(
            {"models": [self.model(name="b"), self.model(name="a", path="other.gguf")]}
        )
        self.assertEqual([m.name for m in config.models], ["b", "a"])
        self.assertEqual(config.model("a").path, os.path.join(self.dir, "other.gguf"))
        self.assertIsNone(config.model("c"))


class ErrorTests(ConfigTestMixin, TestCase):
    """
    Every kind of mistake raises L{ConfigError} naming the key, and the
    model where there is one.
    """

    def test_notAMapping(self) -> None:
        """
        A document that is not a mapping is refused.
        """
        self.assertConfigError(["a", "b"], "mapping")

    def test_unknownTopLevelKeyNamesIt(self) -> None:
        """
        An unknown top-level key is refused by name.
        """
        self.assertConfigError({"totl_vram_mb": 10}, "totl_vram_mb", "unknown key")

    def test_unknownServerKeyNamesIt(self) -> None:
        """
        An unknown key under C{server} is named with its section.
        """
        self.assertConfigError({"server": {"prot": 1}}, "server.prot")

    def test_unknownBackendSettingNamesIt(self) -> None:
        """
        An unknown key under C{backend} is named with its section.
        """
        self.assertConfigError({"backend": {"llama_binary": "x"}}, "backend.llama_binary")

    def test_sectionNotAMapping(self) -> None:
        """
        A section that is not a mapping is refused by name.
        """
        self.assertConfigError({"server": "localhost"}, "server", "mapping")

    def test_modelsNotAList(self) -> None:
        """
        C{models} must be a list.
        """
        self.assertConfigError({"models": {"m1": self.model()}}, "models", "list")

    def test_modelNotAMapping(self) -> None:
        """
        A model entry that is not a mapping is refused with its index, for
        any YAML scalar (not only strings).
        """
        for entry in ["m1", 5, True]:
            self.assertConfigError({"models": [entry]}, "models[0]", "mapping")

    def test_unknownModelKeyNamesIt(self) -> None:
        """
        An unknown key in a model is refused naming the key and the model.
        """
        self.assertConfigError(
            {"models": [self.model(gpu_layers=3)]}, "gpu_layers", "'m1'", "unknown key"
        )

    def test_unknownBackendNamesIt(self) -> None:
        """
        A model's unknown C{backend} is refused naming the model and value.
        """
        self.assertConfigError(
            {"models": [self.model(backend="vllm")]}, "'m1'", "backend", "vllm"
        )

    def test_unknownEnabledBackend(self) -> None:
        """
        An unknown name in C{enabled_backends} is refused.
        """
        self.assertConfigError(
            {"enabled_backends": ["llamacpp", "vllm"]}, "enabled_backends", "vllm"
        )

    def test_backendNotEnabled(self) -> None:
        """
        A model whose backend is not in C{enabled_backends} is refused naming
        the model, the backend and C{enabled_backends}.
        """
        self.assertConfigError(
            {
                "enabled_backends": ["llamacpp"],
                "models": [self.model(backend="openvino", path="ov-model")],
            },
            "'m1'",
            "openvino",
            "enabled_backends",
        )

    def test_missingPath(self) -> None:
        """
        A model path that does not exist is refused naming the model, the key
        and the path.
        """
        self.assertConfigError(
            {"models": [self.model(path="missing.gguf")]}, "'m1'", ".path", "missing.gguf"
        )

    def test_missingName(self) -> None:
        """
        A model without a name is refused naming its index and C{name}.
        """
        self.assertConfigError(
            {"models": [self.model(name=None)]}, "models[0]", "name is required"
        )

    def test_missingRequiredFields(self) -> None:
        """
        A model without C{path}, C{backend} or C{vram_mb} is refused naming
        the model and the field.
        """
        for key in ("path", "backend", "vram_mb"):
            self.assertConfigError(
                {"models": [self.model(**{key: None})]}, "'m1'", f"{key} is required"
            )

    def test_vramLargerThanTotal(self) -> None:
        """
        A model that needs more than C{total_vram_mb} is refused, with both
        numbers in the message.
        """
        self.assertConfigError(
            {"total_vram_mb": 1000, "models": [self.model(vram_mb=2000)]},
            "'m1'",
            "vram_mb",
            "2000",
            "1000",
        )

    def test_vramEqualToTotal(self) -> None:
        """
        A model needing exactly C{total_vram_mb} is accepted.
        """
        config = self.parse({"total_vram_mb": 1000, "models": [self.model(vram_mb=1000)]})
        self.assertEqual(config.models[0].vram_mb, 1000)

    def test_duplicateName(self) -> None:
        """
        Two models with one name are refused naming the name and the second.
        """
        self.assertConfigError(
            {"models": [self.model(), self.model(path="other.gguf")]},
            "duplicate",
            "'m1'",
            "models[1]",
        )

    def test_aliases(self) -> None:
        """
        C{aliases} are other ids of the model: L{Config.model} finds it by
        any of them, and C{preload_models} may name one (it is kept as the
        model's name).
        """
        config = self.parse(
            {"preload_models": ["gpt"], "models": [self.model(aliases=["gpt", "org/m1"])]}
        )
        model = config.models[0]
        self.assertEqual(model.names, ("m1", "gpt", "org/m1"))
        self.assertIs(config.model("org/m1"), model)
        self.assertIsNone(config.model("m2"))
        self.assertEqual(config.preload_models, ("m1",))

    def test_aliasesUnique(self) -> None:
        """
        An alias that is a model's name, another model's alias, or given
        twice, is refused naming the model, the key and the alias; so is a
        name that is an earlier model's alias, and an empty alias.
        """
        cases = [
            ([self.model(aliases=["m1"])], "aliases", "'m1'"),
            ([self.model(aliases=["a", "a"])], "aliases", "'a'"),
            ([self.model(), self.model(name="m2", path="other.gguf", aliases=["m1"])], "models[1] ('m2').aliases", "'m1'"),
            ([self.model(aliases=["x"]), self.model(name="m2", path="other.gguf", aliases=["x"])], "('m2').aliases", "'x'"),
            ([self.model(aliases=["m2"]), self.model(name="m2", path="other.gguf")], "duplicate", "'m2'"),
            ([self.model(aliases=[""])], "aliases", "non-empty"),
        ]
        for models, *expected in cases:
            self.assertConfigError({"models": models}, *expected)

    def test_listedAndCreated(self) -> None:
        """
        C{listed} is true by default and may be turned off; C{created} is
        the model file's modification time.
        """
        config = self.parse({"models": [self.model(listed=False), self.model(name="m2", path="other.gguf")]})
        self.assertEqual([m.listed for m in config.models], [False, True])
        self.assertEqual(config.models[0].created, int(os.stat(config.models[0].path).st_mtime))
        self.assertConfigError({"models": [self.model(listed="no")]}, "listed", "true or false")

    def test_preloadUnknownModel(self) -> None:
        """
        C{preload_models} naming a model that is not declared is refused.
        """
        self.assertConfigError(
            {"preload_models": ["ghost"], "models": [self.model()]}, "preload_models", "ghost"
        )

    def test_modelTypeBackendCannotServe(self) -> None:
        """
        A model_type the backend cannot serve is refused naming the model,
        the type and the backend.
        """
        self.assertConfigError(
            {"models": [self.model(model_type="transcription")]},
            "'m1'",
            "model_type",
            "transcription",
            "llamacpp",
        )

    def test_unknownModelType(self) -> None:
        """
        A model_type that does not exist is refused.
        """
        self.assertConfigError({"models": [self.model(model_type="chat")]}, "'m1'", "model_type")

    def test_backendSpecificFieldOnWrongBackend(self) -> None:
        """
        A field of one backend set on a model of another is refused naming
        the field, the model and the backend it belongs to.
        """
        self.assertConfigError(
            {"models": [self.model(target_device="GPU")]}, "'m1'", "target_device", "openvino"
        )
        self.assertConfigError(
            {"models": [self.model(dtype="float16")]}, "'m1'", "dtype", "transformers"
        )
        self.assertConfigError(
            {"models": [self.model(revision="main")]}, "'m1'", "revision", "transformers"
        )

    def test_badEvictionPolicy(self) -> None:
        """
        An eviction policy other than lifo or lru is refused.
        """
        self.assertConfigError({"eviction_policy": "fifo"}, "eviction_policy", "fifo")

    def test_badLogLevel(self) -> None:
        """
        An unknown log level is refused.
        """
        self.assertConfigError({"log_level": "verbose"}, "log_level", "verbose")

    def test_stringForInt(self) -> None:
        """
        A string where an integer belongs is refused, at the top level and
        in a model.
        """
        self.assertConfigError({"total_vram_mb": "8192"}, "total_vram_mb", "integer")
        self.assertConfigError({"server": {"port": "8000"}}, "server.port")
        self.assertConfigError({"models": [self.model(vram_mb="big")]}, "'m1'", "vram_mb", "integer")

    def test_boolForInt(self) -> None:
        """
        C{true}/C{false} are not integers, though Python's bool is an int.
        """
        self.assertConfigError({"server": {"port": True}}, "server.port")
        self.assertConfigError({"total_vram_mb": False}, "total_vram_mb", "integer")
        self.assertConfigError({"models": [self.model(vram_mb=True)]}, "'m1'", "vram_mb")
        self.assertConfigError({"models": [self.model(n_gpu_layers=True)]}, "'m1'", "n_gpu_layers")

    def test_otherWrongTypes(self) -> None:
        """
        Other wrongly-typed values are refused by key: a bool setting given
        as a string, a list given as a string, a number given as a string.
        """
        self.assertConfigError(
            {
                "enabled_backends": ["transformers"],
                "models": [
                    self.model(backend="transformers", path="ov-model", trust_remote_code="yes")
                ],
            },
            "'m1'",
            "trust_remote_code",
        )
        self.assertConfigError({"server": {"api_keys": "secret"}}, "server.api_keys")
        self.assertConfigError({"queue_timeout_seconds": "soon"}, "queue_timeout_seconds")

    def test_negativeOrZeroValues(self) -> None:
        """
        Negative memory and non-positive durations are refused.
        """
        self.assertConfigError({"models": [self.model(vram_mb=-1)]}, "'m1'", "vram_mb")
        self.assertConfigError({"total_vram_mb": -5}, "total_vram_mb")
        self.assertConfigError({"load_timeout_seconds": 0}, "load_timeout_seconds")
        self.assertConfigError({"idle_check_interval_seconds": -1}, "idle_check_interval_seconds")

    def test_portOutOfRange(self) -> None:
        """
        Port numbers must be between 1 and 65535.
        """
        self.assertConfigError({"server": {"port": 70000}}, "server.port", "70000")
        self.assertConfigError({"backend": {"port_range_start": 0}}, "backend.port_range_start")

    def test_portRangeReversed(self) -> None:
        """
        A backend port range whose end is below its start is refused naming
        both keys and values.
        """
        self.assertConfigError(
            {"backend": {"port_range_start": 9200, "port_range_end": 9100}},
            "port_range_start",
            "port_range_end",
            "9100",
            "9200",
        )

    def test_binaryNotFound(self) -> None:
        """
        A backend program that C{which} cannot find is refused naming the
        model, the program and the setting to fix.
        """
        self.assertConfigError(
            {"models": [self.model()]},
            "'m1'",
            "llama-server",
            "llamacpp_binary",
            which=notFound,
        )

    def test_binaryLookedUpAsConfigured(self) -> None:
        """
        The program looked up is the configured one, once per model.
        """
        asked = []

        def which(name: str) -> str:
            asked.append(name)
            return name

        self.parse(
            {"backend": {"llamacpp_binary": "/opt/llama/llama-server"}, "models": [self.model()]},
            which,
        )
        self.assertEqual(asked, ["/opt/llama/llama-server"])

    def test_binaryNotNeededWithoutModels(self) -> None:
        """
        Backends without models need no program installed: the file is
        accepted even though no backend program can be found.
        """
        config = self.parse({"enabled_backends": ["llamacpp", "openvino", "transformers"]}, notFound)
        self.assertEqual(config.enabled_backends, ("llamacpp", "openvino", "transformers"))
        self.assertEqual(config.models, ())

    def test_everyBackendAccepted(self) -> None:
        """
        Models of every backend kind are accepted when their backend is
        enabled and its program exists.
        """
        config = self.parse(
            {
                "enabled_backends": ["llamacpp", "openvino", "transformers"],
                "models": [
                    self.model(name="ov", backend="openvino", path="ov-model", model_type="ocr"),
                    self.model(name="hf", backend="transformers", path="ov-model", dtype="float32"),
                ],
            },
            found,
        )
        self.assertEqual([m.backend for m in config.models], ["openvino", "transformers"])

    def test_missingBinaryNamesItsKey(self) -> None:
        """
        A backend program that cannot be found is reported with the key
        that sets it, which for OpenVINO is C{ovms_binary}.
        """
        self.assertConfigError(
            {
                "enabled_backends": ["openvino"],
                "models": [self.model(backend="openvino", path="ov-model")],
            },
            "backend.ovms_binary",
            which=notFound,
        )

    def test_quantizationOnlyForLLM(self) -> None:
        """
        Quantization is refused for a model that is not an C{llm}, naming
        the key; C{none} is accepted anywhere.
        """
        base = {"enabled_backends": ["transformers"]}
        self.assertConfigError(
            dict(
                base,
                models=[
                    self.model(
                        backend="transformers", path="ov-model", model_type="transcription", quantization="bnb-4bit"
                    )
                ],
            ),
            "quantization",
            "llm",
        )
        config = self.parse(
            dict(
                base,
                models=[
                    self.model(backend="transformers", path="ov-model", model_type="transcription", quantization="none")
                ],
            ),
            found,
        )
        self.assertEqual(config.models[0].quantization, "none")

    def test_invalidYAML(self) -> None:
        """
        A file that is not valid YAML is refused naming the file.
        """
        path = self.writeConfig("models: [\n  - name: x\n")
        e = self.assertRaises(ConfigError, loadConfig, path, found)
        self.assertIn(path, str(e))
        self.assertIn("YAML", str(e))

    def test_unreadableFile(self) -> None:
        """
        A file that cannot be read is refused naming the file.
        """
        path = os.path.join(self.dir, "absent.yaml")
        e = self.assertRaises(ConfigError, loadConfig, path, found)
        self.assertIn(path, str(e))
        e = self.assertRaises(ConfigError, loadConfig, self.dir, found)
        self.assertIn(self.dir, str(e))

    def test_loadConfigMessageNamesFileAndKey(self) -> None:
        """
        L{loadConfig}'s messages start with the file name and keep the key.
        """
        path = self.writeConfig({"models": [self.model(contxt_size=5)]})
        e = self.assertRaises(ConfigError, loadConfig, path, found)
        self.assertTrue(str(e).startswith(path + ": "), str(e))
        self.assertIn("contxt_size", str(e))
        self.assertIn("'m1'", str(e))


class TimeoutTests(ConfigTestMixin, TestCase):
    """
    Idle and load timeouts: spellings of "never", and per-model overrides.
    """

    def test_unloadTimeNever(self) -> None:
        """
        C{unload_time} of -1, C{"inf"} or YAML's C{.inf} means never.
        """
        for value in (-1, -1.0, "inf", "Infinity", "never", math.inf):
            [model] = self.parse({"models": [self.model(unload_time=value)]}).models
            self.assertEqual(model.unload_time, math.inf)
        raw = yaml.safe_load("models:\n - {name: m1, path: model.gguf, backend: llamacpp,"
                             " vram_mb: 1, unload_time: .inf}\n")
        self.assertEqual(self.parse(raw).models[0].unload_time, math.inf)

    def test_unloadTimeFromFile(self) -> None:
        """
        The spellings of never survive a round trip through a file.
        """
        path = self.writeConfig(
            "models:\n"
            "  - {name: a, path: model.gguf, backend: llamacpp, vram_mb: 1, unload_time: -1}\n"
            "  - {name: b, path: model.gguf, backend: llamacpp, vram_mb: 1, unload_time: inf}\n"
            "  - {name: c, path: model.gguf, backend: llamacpp, vram_mb: 1, unload_time: .inf}\n"
            "  - {name: d, path: model.gguf, backend: llamacpp, vram_mb: 1, unload_time: 90}\n"
        )
        config = loadConfig(path, found)
        self.assertEqual(
            [m.unload_time for m in config.models], [math.inf, math.inf, math.inf, 90.0]
        )

    def test_idleTimeoutFallsBack(self) -> None:
        """
        L{Config.idleTimeout} is the model's C{unload_time} when set, else
        C{idle_timeout_seconds}.
        """
        config = self.parse(
            {
                "idle_timeout_seconds": 120,
                "models": [
                    self.model(),
                    self.model(name="m2", unload_time=30),
                    self.model(name="m3", unload_time=-1),
                    self.model(name="m4", unload_time=0),
                ],
            }
        )
        self.assertEqual([config.idleTimeout(m) for m in config.models], [120, 30, math.inf, 0])

    def test_globalIdleTimeoutNever(self) -> None:
        """
        C{idle_timeout_seconds} accepts the spellings of never too.
        """
        for value in (-1, "inf"):
            self.assertEqual(self.parse({"idle_timeout_seconds": value}).idle_timeout_seconds, math.inf)

    def test_badUnloadTime(self) -> None:
        """
        Other negative numbers and other words are refused.
        """
        self.assertConfigError({"models": [self.model(unload_time=-5)]}, "'m1'", "unload_time")
        self.assertConfigError({"models": [self.model(unload_time="soon")]}, "'m1'", "unload_time")
        self.assertConfigError({"models": [self.model(unload_time=True)]}, "'m1'", "unload_time")

    def test_loadTimeoutOverride(self) -> None:
        """
        L{Config.loadTimeout} is the model's C{load_timeout_seconds} when set,
        else the global setting.
        """
        config = self.parse(
            {
                "load_timeout_seconds": 120,
                "models": [self.model(), self.model(name="m2", load_timeout_seconds=600)],
            }
        )
        self.assertEqual([config.loadTimeout(m) for m in config.models], [120, 600])

    def test_badLoadTimeout(self) -> None:
        """
        A model's C{load_timeout_seconds} must be a positive number.
        """
        self.assertConfigError(
            {"models": [self.model(load_timeout_seconds=0)]}, "'m1'", "load_timeout_seconds"
        )


class ArgumentsTests(ConfigTestMixin, TestCase):
    """
    C{extra_args} and C{env} are normalised to strings.
    """

    def test_extraArgsNumbersBecomeStrings(self) -> None:
        """
        Numbers in C{extra_args} become their text.
        """
        [model] = self.parse(
            {"models": [self.model(extra_args=["--threads", 8, "--temp", 0.5])]}
        ).models
        self.assertEqual(model.extra_args, ("--threads", "8", "--temp", "0.5"))

    def test_badExtraArgs(self) -> None:
        """
        C{extra_args} must be a list of strings or numbers.
        """
        self.assertConfigError({"models": [self.model(extra_args="--threads 8")]}, "'m1'", "extra_args")
        self.assertConfigError({"models": [self.model(extra_args=[True])]}, "'m1'", "extra_args")
        self.assertConfigError({"models": [self.model(extra_args=[["a"]])]}, "'m1'", "extra_args")

    def test_envValuesBecomeStrings(self) -> None:
        """
        Numbers in C{env} become their text.
        """
        [model] = self.parse(
            {"models": [self.model(env={"CUDA_VISIBLE_DEVICES": 0, "A": "b", "F": 1.5})]}
        ).models
        self.assertEqual(dict(model.env), {"CUDA_VISIBLE_DEVICES": "0", "A": "b", "F": "1.5"})

    def test_badEnv(self) -> None:
        """
        C{env} must map variable names to strings or numbers.
        """
        self.assertConfigError({"models": [self.model(env=["A=b"])]}, "'m1'", "env")
        self.assertConfigError({"models": [self.model(env={"A": True})]}, "'m1'", "env.A")
        self.assertConfigError({"models": [self.model(env={"A": {"b": 1}})]}, "'m1'", "env.A")
        self.assertConfigError({"models": [self.model(env={"A=B": "c"})]}, "'m1'", "env")


#: For each backend kind, every spelling of a setting dynllm owns, as
#: C{extra_args} (a flag and its value) and as C{env} variables.
OWNED_ARGS = {
    "llamacpp": [
        ["--host", "0.0.0.0"],
        ["--host=0.0.0.0"],
        ["--port", "9000"],
        ["--port=9000"],
        ["--reuse-port"],
        ["--reuse_port"],
        ["--api-prefix", "/x"],
        ["--ssl-key-file", "k.pem"],
        ["--ssl-cert-file", "c.pem"],
        ["-m", "other.gguf"],
        ["--model", "other.gguf"],
        ["--model=other.gguf"],
        ["-mu", "http://x/m.gguf"],
        ["--model-url", "http://x/m.gguf"],
        ["-hf", "org/repo"],
        ["-hfr", "org/repo"],
        ["--hf-repo", "org/repo"],
        ["--hf_repo", "org/repo"],
        ["-hff", "m.gguf"],
        ["--hf-file", "m.gguf"],
        ["-dr", "ai/smollm2"],
        ["--docker-repo", "ai/smollm2"],
        ["--models-dir", "/models"],
        ["--models-preset", "p.ini"],
        ["-a", "other"],
        ["--alias", "other"],
        ["--alias=other"],
        ["--api-key", "k"],
        ["--api_key", "k"],
        ["--api-key=k"],
        ["--api-key-file", "k.txt"],
    ],
    "openvino": [
        ["--rest_port", "9000"],
        ["--rest_port=9000"],
        ["--rest_bind_address", "0.0.0.0"],
        ["--rest_bind_address=0.0.0.0"],
        ["--port", "9001"],
        ["--port=9001"],
        ["--grpc_bind_address", "0.0.0.0"],
        ["--model_name", "other"],
        ["--model_name=other"],
        ["--model_path", "/m"],
        ["--config_path", "c.json"],
        ["--source_model", "org/m"],
        ["--model_repository_path", "/r"],
        ["--api_key_file", "k.txt"],
        ["--api_key_file=k.txt"],
    ],
    "transformers": [
        ["--host", "0.0.0.0"],
        ["--host=0.0.0.0"],
        ["--port", "9000"],
        ["--port=9000"],
    ],
}

OWNED_ENV = {
    "llamacpp": [
        "LLAMA_ARG_HOST",
        "LLAMA_ARG_PORT",
        "LLAMA_ARG_REUSE_PORT",
        "LLAMA_ARG_API_PREFIX",
        "LLAMA_ARG_SSL_KEY_FILE",
        "LLAMA_ARG_SSL_CERT_FILE",
        "LLAMA_ARG_MODEL",
        "LLAMA_ARG_MODEL_URL",
        "LLAMA_ARG_HF_REPO",
        "LLAMA_ARG_HF_FILE",
        "LLAMA_ARG_DOCKER_REPO",
        "LLAMA_ARG_MODELS_DIR",
        "LLAMA_ARG_MODELS_PRESET",
        "LLAMA_ARG_ALIAS",
        "LLAMA_API_KEY",
        "LLAMA_ARG_API_KEY_FILE",
    ],
    "openvino": ["API_KEY", "OVMS_MODEL_REPOSITORY_PATH"],
    "transformers": [],
}


class OwnedSettingsTests(ConfigTestMixin, TestCase):
    """
    C{extra_args} and C{env} may not set what dynllm sets itself: the
    listen address, the model, the served name, the API key.
    """

    def ownModel(self, kind: str, **overrides: object) -> dict:
        """
        @return: a valid declaration of a model of backend C{kind}.
        """
        paths = {"llamacpp": "model.gguf", "openvino": "ov-model", "transformers": "ov-model"}
        return self.model(backend=kind, path=paths[kind], **overrides)

    def test_ownedFlagsRefused(self) -> None:
        """
        Every spelling of an owned setting in C{extra_args} (long and short
        options, C{--flag=value}, and for llama-server C{_} for C{-}) is
        refused, naming the model, C{extra_args} and the option.
        """
        for kind, spellings in OWNED_ARGS.items():
            for args in spellings:
                flag = args[0].partition("=")[0]
                raw = {"enabled_backends": [kind], "models": [self.ownModel(kind, extra_args=args)]}
                message = self.assertConfigError(raw, "models[0] ('m1').extra_args: ", "is set by dynllm")
                self.assertIn(repr(flag).replace("_", "-") if kind == "llamacpp" else repr(flag), message)

    def test_ownedFlagMessage(self) -> None:
        """
        The message says which setting the option sets, and quotes the
        argument when it holds a value.
        """
        raw = {"models": [self.model(extra_args=["--threads", "2", "--port=9000"])]}
        message = self.assertConfigError(raw)
        self.assertEqual(
            message,
            "models[0] ('m1').extra_args: '--port' (in '--port=9000') is set by dynllm"
            " (the listen port of llamacpp backends) and cannot be given here",
        )

    def test_ownedVariablesRefused(self) -> None:
        """
        Every environment variable that sets an owned setting is refused in
        C{env}, naming the model, C{env} and the variable.
        """
        for kind, names in OWNED_ENV.items():
            for name in names:
                raw = {"enabled_backends": [kind], "models": [self.ownModel(kind, env={name: "x"})]}
                self.assertConfigError(raw, "models[0] ('m1').env: ", repr(name), "is set by dynllm")

    def test_otherArgumentsAccepted(self) -> None:
        """
        Arguments and variables that only look like owned ones are accepted:
        values, other options that share a prefix, another backend's flags.
        """
        config = self.parse(
            {
                "enabled_backends": ["llamacpp", "openvino", "transformers"],
                "models": [
                    self.model(
                        extra_args=["--chat-template", "x=--port", "--portable", "-mg", "0", "--rest_port"],
                        env={"LLAMA_ARG_THREADS": "2", "API_KEY": "x"},
                    ),
                    self.ownModel("openvino", name="m2", extra_args=["--nireq", "2", "--host"]),
                    self.ownModel("transformers", name="m3", extra_args=["--rest_port", "1"], env={"API_KEY": "x"}),
                ],
            }
        )
        self.assertEqual(len(config.models), 3)


class OVMSGraphTests(ConfigTestMixin, TestCase):
    """
    OVMS refuses single-model settings for a model it serves as a MediaPipe
    graph, so the configuration refuses them first.
    """

    def ovModel(self, **overrides: object) -> dict:
        """
        @return: a valid OpenVINO model declaration, with C{overrides}.
        """
        return self.model(backend="openvino", path="ov-model", **overrides)

    def test_shapeOnTaskGraphRefused(self) -> None:
        """
        C{ovms_shape} on a model type OVMS serves through a C{--task} graph
        is refused, naming the model and the key.
        """
        for kind in ("llm", "embedding", "rerank", "transcription", "speech", "image_generation"):
            raw = {"models": [self.ovModel(model_type=kind, ovms_shape="(1,3)")]}
            self.assertConfigError(raw, "models[0] ('m1').ovms_shape", "MediaPipe graph", repr(kind))

    def test_shapeOnOwnGraphRefused(self) -> None:
        """
        C{ovms_shape} on a model whose directory holds its own
        C{graph.pbtxt} is refused too, even for a vision model type.
        """
        open(os.path.join(self.dir, "ov-model", "graph.pbtxt"), "w").close()
        raw = {"models": [self.ovModel(model_type="classification", ovms_shape="(1,3)")]}
        self.assertConfigError(raw, "models[0] ('m1').ovms_shape", "graph.pbtxt")

    def test_shapeOnClassicModelAccepted(self) -> None:
        """
        A classic (KServe) model without a graph takes C{ovms_shape}.
        """
        for kind in ("classification", "detection", "segmentation", "ocr"):
            [model] = self.parse({"models": [self.ovModel(model_type=kind, ovms_shape="(1,3)")]}).models
            self.assertEqual(model.ovms_shape, "(1,3)")

    def test_targetDeviceOnOwnGraphRefused(self) -> None:
        """
        An explicit C{target_device} on a model that brings its own
        C{graph.pbtxt} is refused (its graph names the device); the default
        one is fine.
        """
        open(os.path.join(self.dir, "ov-model", "graph.pbtxt"), "w").close()
        raw = {"models": [self.ovModel(model_type="embedding", target_device="GPU")]}
        self.assertConfigError(raw, "models[0] ('m1').target_device", "graph.pbtxt")
        self.assertEqual(len(self.parse({"models": [self.ovModel(model_type="embedding")]}).models), 1)


class AllProblemsTests(ConfigTestMixin, TestCase):
    """
    Every problem of a file is reported at once, in one L{ConfigError}, each
    naming its key (and model); a problem that follows from another is not
    reported besides it.
    """

    def problems(self, raw: object, which=found) -> tuple[str, ...]:
        """
        @return: the problems that parsing C{raw} raises.
        """
        return self.assertRaises(ConfigError, self.parse, raw, which).problems

    def test_unknownKeysAtEveryLevel(self) -> None:
        """
        Unknown keys at the top, under C{server}, under C{backend} and in a
        model are all reported, in the order of the file.
        """
        problems = self.problems(
            {
                "totl_vram_mb": 10,
                "server": {"prot": 1},
                "backend": {"llama_binary": "x"},
                "models": [self.model(contxt_size=5)],
            }
        )
        self.assertEqual(len(problems), 4, problems)
        for problem, key in zip(
            problems, ["'totl_vram_mb'", "'server.prot'", "'backend.llama_binary'", "('m1').contxt_size"]
        ):
            self.assertIn("unknown key", problem)
            self.assertIn(key, problem)

    def test_problemsOfTwoModels(self) -> None:
        """
        A missing path in one model and a wrongly typed value in another are
        reported together, each naming its model and key.
        """
        problems = self.problems(
            {"models": [self.model(path="missing.gguf"), self.model(name="m2", path="other.gguf", vram_mb="big")]}
        )
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("models[0] ('m1').path", problems[0])
        self.assertIn("missing.gguf", problems[0])
        self.assertIn("models[1] ('m2').vram_mb", problems[1])
        self.assertIn("integer", problems[1])

    def test_severalProblemsInOneModel(self) -> None:
        """
        A model lacking a required key is still checked for its other
        problems: here its path does not exist and a value is of the wrong
        type.
        """
        problems = self.problems({"models": [self.model(vram_mb=None, path="missing.gguf", listed="no")]})
        self.assertEqual(len(problems), 3, problems)
        self.assertTrue(any("listed" in p and "true or false" in p for p in problems), problems)
        self.assertTrue(any("vram_mb is required" in p for p in problems), problems)
        self.assertTrue(any(".path" in p and "missing.gguf" in p for p in problems), problems)

    def test_messageOneLinePerProblem(self) -> None:
        """
        The message of several problems is a first line with the file and
        their number, then one line each; C{problems} and C{source} hold
        them for programs.
        """
        path = self.writeConfig("totl_vram_mb: 1\nlog_level: loud\n")
        e = self.assertRaises(ConfigError, loadConfig, path, found)
        lines = str(e).splitlines()
        self.assertEqual(lines[0], f"{path}: 2 problems:")
        self.assertEqual(len(lines), 3, lines)
        self.assertEqual(e.source, path)
        self.assertEqual([line.strip() for line in lines[1:]], list(e.problems))
        self.assertIn("totl_vram_mb", e.problems[0])
        self.assertIn("log_level", e.problems[1])

    def test_oneProblemOneLine(self) -> None:
        """
        A single problem's message is that problem after the file name, as
        it always was.
        """
        path = self.writeConfig({"log_level": "loud"})
        e = self.assertRaises(ConfigError, loadConfig, path, found)
        self.assertEqual(len(e.problems), 1)
        self.assertEqual(str(e), f"{path}: {e.problems[0]}")

    def test_yamlErrorIsOneProblem(self) -> None:
        """
        A YAML syntax error is one problem: nothing after it can be read.
        """
        path = self.writeConfig("totl_vram_mb: 1\nmodels: [\n  - name: x\n")
        e = self.assertRaises(ConfigError, loadConfig, path, found)
        self.assertEqual(len(e.problems), 1)
        self.assertIn("not valid YAML", e.problems[0])

    def test_unknownBackendSaysNothingElse(self) -> None:
        """
        A model whose backend is unknown gets that one problem, not also
        words on fields of one backend or on the model type.
        """
        problems = self.problems(
            {"models": [self.model(backend="vllm", n_gpu_layers=3, model_type="transcription", extra_args=["--port", 1])]}
        )
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("('m1').backend", problems[0])
        self.assertIn("vllm", problems[0])

    def test_foreignFieldNotCheckedFurther(self) -> None:
        """
        A field of another backend is reported as that, not also for its
        value: C{quantization} on a llama.cpp embedding model is one problem.
        """
        problems = self.problems({"models": [self.model(model_type="embedding", quantization="bnb-4bit")]})
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("applies only to backend 'transformers'", problems[0])

    def test_refusedProgramSettingNotLookedUp(self) -> None:
        """
        A backend program setting that is refused is not also reported as
        a program that cannot be found.
        """
        problems = self.problems({"backend": {"llamacpp_binary": 5}, "models": [self.model()]}, notFound)
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("backend.llamacpp_binary", problems[0])

    def test_refusedSectionNotLookedInto(self) -> None:
        """
        A C{backend} section that is not a mapping is one problem: its
        programs and ports are not checked besides.
        """
        problems = self.problems({"backend": "llama-server", "models": [self.model()]}, notFound)
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("backend must be a mapping", problems[0])

    def test_missingProgramOnce(self) -> None:
        """
        A backend program that cannot be found is reported once, at the
        first model that needs it, however many models do.
        """
        models = [self.model(), self.model(name="m2"), self.model(name="m3")]
        problems = self.problems({"models": models}, notFound)
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("models[0] ('m1').backend", problems[0])
        self.assertIn("'llama-server' was not found", problems[0])

    def test_everyMissingProgram(self) -> None:
        """
        Each backend's missing program is reported.
        """
        problems = self.problems(
            {
                "enabled_backends": ["llamacpp", "openvino"],
                "models": [self.model(), self.model(name="m2", backend="openvino", path="ov-model")],
            },
            notFound,
        )
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("backend.llamacpp_binary", problems[0])
        self.assertIn("backend.ovms_binary", problems[1])

    def test_disabledBackendNotLookedUp(self) -> None:
        """
        A model whose backend is not enabled gets that problem, not also
        one about its missing program.
        """
        problems = self.problems(
            {"enabled_backends": ["llamacpp"], "models": [self.model(backend="openvino", path="ov-model")]},
            notFound,
        )
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("enabled_backends", problems[0])

    def test_missingModelsDirOnce(self) -> None:
        """
        A C{models_dir} that is not a directory is said once, before the
        paths of the models that are taken from it (each said not to exist,
        so that one round shows every file the models need).
        """
        problems = self.problems(
            {
                "models_dir": "absent",
                "models": [
                    self.model(path="a.gguf"),
                    self.model(name="m2", path="b.gguf"),
                    self.model(name="m3", path=os.path.join(self.dir, "model.gguf")),
                ],
            }
        )
        self.assertEqual(len(problems), 3, problems)
        self.assertTrue(problems[0].startswith(f"models_dir: {os.path.join(self.dir, 'absent')!r} is not a directory"))
        self.assertIn("models[0] ('m1').path", problems[1])
        self.assertIn("models[1] ('m2').path", problems[2])

    def test_stateDirectoryMissing(self) -> None:
        """
        With C{checkState} (as the daemon loads its file), a C{db_path} in a
        directory that does not exist, or in a file, is a problem naming
        C{db_path} and the directory, listed with the others.
        """
        for parent in ("nowhere", "model.gguf"):
            e = self.assertRaises(
                ConfigError, parseConfig, {"db_path": f"{parent}/state.db", "log_level": "loud"}, self.dir,
                None, found, checkState=True,
            )
            self.assertEqual(len(e.problems), 2, e.problems)
            self.assertIn("log_level", e.problems[0])
            self.assertTrue(e.problems[1].startswith("db_path: the directory"), e.problems[1])
            self.assertIn(repr(os.path.join(self.dir, parent)), e.problems[1])

    def test_stateDirectoryNotCheckedByDefault(self) -> None:
        """
        Without C{checkState}, C{db_path}'s directory is not looked at: a
        program that keeps its state in memory does not need it.
        """
        config = self.parse({"db_path": "nowhere/state.db"})
        self.assertEqual(config.db_path, os.path.join(self.dir, "nowhere", "state.db"))

    def test_preloadOfModelWithProblems(self) -> None:
        """
        C{preload_models} naming a model that has problems of its own is not
        also reported as naming no model.
        """
        problems = self.problems({"preload_models": ["m1"], "models": [self.model(path="missing.gguf")]})
        self.assertEqual(len(problems), 1, problems)
        self.assertIn(".path", problems[0])

    def test_missingPathOfPreloadedModel(self) -> None:
        """
        The missing path of a model that C{preload_models} names says so,
        so that removing the model and its preload is one round.
        """
        [problem] = self.problems(
            {"preload_models": ["m1"], "models": [self.model(path="missing.gguf"), self.model(name="m2", path="other.gguf")]}
        )
        self.assertIn("missing.gguf' does not exist (preload_models names it too", problem)
        [problem] = self.problems({"preload_models": ["m2"], "models": [self.model(path="missing.gguf"), self.model(name="m2")]})
        self.assertTrue(problem.endswith("does not exist"), problem)

    def test_everyUnknownEnabledBackend(self) -> None:
        """
        Each unknown name in C{enabled_backends} is reported.
        """
        problems = self.problems({"enabled_backends": ["vllm", "llamacpp", "tgi"]})
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("'vllm'", problems[0])
        self.assertIn("'tgi'", problems[1])

    def test_everyOwnedArgument(self) -> None:
        """
        Each owned argument and variable of a model is reported.
        """
        problems = self.problems(
            {"models": [self.model(extra_args=["--port", 1, "--host", "0.0.0.0"], env={"LLAMA_ARG_PORT": 1})]}
        )
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("'--port'", problems[0])
        self.assertIn("'--host'", problems[1])
        self.assertIn("'LLAMA_ARG_PORT'", problems[2])

    def test_unknownKeySuggestsKnownOne(self) -> None:
        """
        An unknown key close to a known one names the known one; one close
        to none lists the known keys there.
        """
        [problem] = self.problems({"models": [self.model(contxt_size=5)]})
        self.assertIn("did you mean 'context_size'?", problem)
        [problem] = self.problems({"server": {"zzz": 5}})
        self.assertIn("known keys here: admin_api_keys, allowed_hosts, api_keys,", problem)

    def test_misspeltRequiredKeySaidOnce(self) -> None:
        """
        A misspelt required key is one problem (the unknown key, naming the
        right one), not also a missing key.
        """
        model = self.model()
        model["pth"] = model.pop("path")
        [problem] = self.problems({"models": [model]})
        self.assertIn("did you mean 'path'?", problem)


class PathTests(ConfigTestMixin, TestCase):
    """
    Relative paths are resolved against C{models_dir} or the configuration
    file's directory.
    """

    def test_modelPathAgainstModelsDir(self) -> None:
        """
        A relative model path is taken from C{models_dir}.
        """
        modelsDir = os.path.join(self.dir, "store")
        os.makedirs(os.path.join(modelsDir, "gguf"))
        open(os.path.join(modelsDir, "gguf", "x.gguf"), "w").close()
        config = self.parse({"models_dir": modelsDir, "models": [self.model(path="gguf/x.gguf")]})
        self.assertEqual(config.models[0].path, os.path.join(modelsDir, "gguf", "x.gguf"))
        self.assertEqual(config.models_dir, modelsDir)

    def test_absoluteModelPathIgnoresModelsDir(self) -> None:
        """
        An absolute model path is kept as it is.
        """
        path = os.path.join(self.dir, "model.gguf")
        config = self.parse({"models_dir": "/nonexistent", "models": [self.model(path=path)]})
        self.assertEqual(config.models[0].path, path)

    def test_relativeModelsDirAgainstConfigFile(self) -> None:
        """
        A relative C{models_dir} is taken from the configuration file's
        directory, whatever the current directory.
        """
        os.makedirs(os.path.join(self.dir, "store"))
        open(os.path.join(self.dir, "store", "y.gguf"), "w").close()
        path = self.writeConfig({"models_dir": "store", "models": [self.model(path="y.gguf")]})
        config = loadConfig(path, found)
        self.assertEqual(config.models_dir, os.path.join(self.dir, "store"))
        self.assertEqual(config.models[0].path, os.path.join(self.dir, "store", "y.gguf"))
        self.assertEqual(config.source, path)

    def test_modelPathAgainstConfigFile(self) -> None:
        """
        Without C{models_dir}, a relative model path is taken from the
        configuration file's directory, not the current directory.
        """
        path = self.writeConfig({"models": [self.model()]})
        config = loadConfig(os.path.relpath(path), found)
        self.assertEqual(config.models[0].path, os.path.join(self.dir, "model.gguf"))

    def test_dbPathAgainstConfigFile(self) -> None:
        """
        A relative C{db_path} is taken from the configuration file's
        directory; an absolute one is kept.
        """
        path = self.writeConfig({"db_path": "state/dynllm.db"})
        self.assertEqual(
            loadConfig(os.path.relpath(path), found).db_path,
            os.path.join(self.dir, "state", "dynllm.db"),
        )
        path = self.writeConfig({"db_path": "/var/lib/dynllm/x.db"})
        self.assertEqual(loadConfig(path, found).db_path, "/var/lib/dynllm/x.db")


class ExampleTests(ConfigTestMixin, TestCase):
    """
    The shipped C{etc/dynllm.example.yaml} is valid and documents every key.
    """

    def loadExample(self) -> Config:
        """
        Load the example with C{models_dir} pointed at a temporary directory
        holding (empty) files at every model path it declares.
        """
        with open(EXAMPLE) as f:
            text = f.read()
        modelsDir = os.path.join(self.dir, "models")
        for model in yaml.safe_load(text)["models"]:
            target = os.path.join(modelsDir, model["path"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        text, count = re.subn(r"(?m)^models_dir:.*$", f"models_dir: {modelsDir}", text)
        self.assertEqual(count, 1)
        return loadConfig(self.writeConfig(text), lambda name: "/bin/true")

    def test_exampleValidates(self) -> None:
        """
        The example declares models of the four backends (llama.cpp: llm,
        embedding, rerank; OpenVINO: llm, transcription, speech, image
        generation, classification; transformers: llm, transcription;
        command: llm)
        within the default budget, preloads the embedding model and listens
        on 127.0.0.1:8000.
        """
        config = self.loadExample()
        self.assertEqual(
            [(m.backend, m.model_type) for m in config.models],
            [
                ("llamacpp", "llm"),
                ("llamacpp", "embedding"),
                ("llamacpp", "rerank"),
                ("openvino", "llm"),
                ("openvino", "transcription"),
                ("openvino", "speech"),
                ("openvino", "image_generation"),
                ("openvino", "classification"),
                ("transformers", "llm"),
                ("transformers", "transcription"),
                ("command", "llm"),
            ],
        )
        self.assertEqual(config.server.host, "127.0.0.1")
        self.assertEqual(config.server.port, 8000)
        self.assertEqual(config.total_vram_mb, 8192)
        self.assertEqual(
            config.preload_models,
            tuple(m.name for m in config.models if m.model_type == "embedding"),
        )
        for model in config.models:
            self.assertTrue(model.path.startswith(os.path.join(self.dir, "models") + os.sep))
        embedding = config.models[1]
        self.assertEqual(config.idleTimeout(embedding), math.inf)
        self.assertTrue(all(isinstance(a, str) for m in config.models for a in m.extra_args))

    def test_exampleMentionsEveryKey(self) -> None:
        """
        Every key the configuration accepts appears in the example.
        """
        with open(EXAMPLE) as f:
            text = f.read()
        for cls in (Config, ServerConfig, BackendSettings, ModelConfig):
            for attribute in fields(cls):
                if "check" in attribute.metadata:
                    self.assertRegex(text, rf"(?m)^[ #-]*{attribute.name}:", attribute.name)



class CommandConfigTests(ConfigTestMixin, TestCase):
    """
    The keys of C{backend: command} (C{command}, C{ready}, C{endpoints},
    C{upstream_model}, C{stop}): their defaults, and their problems, each
    naming the model and the key, all at once like the rest.
    """

    def command(self, **overrides: object) -> dict:
        """
        @return: a valid command model named C{c1}, with C{overrides}
            applied (C{None} removes a key).
        """
        raw = {
            "name": "c1",
            "backend": "command",
            "vram_mb": 100,
            "command": ["server", "--host", "{host}", "--port", "{port}"],
        }
        raw.update(overrides)
        return {k: v for k, v in raw.items() if v is not None}

    def parseCommand(self, *models: dict, which=found) -> Config:
        """
        Parse C{models} with C{command} enabled.
        """
        return self.parse({"enabled_backends": ["command", "llamacpp"], "models": list(models)}, which)

    def problems(self, *models: dict, which=found) -> tuple[str, ...]:
        """
        @return: the problems of C{models} with C{command} enabled.
        """
        raw = {"enabled_backends": ["command", "llamacpp"], "models": list(models)}
        return self.assertRaises(ConfigError, self.parse, raw, which).problems

    def test_defaults(self) -> None:
        """
        A command model needs no path; its readiness is C{GET /health} ==
        200, it serves the default routes of its type, sends its name as
        C{model} and is stopped with TERM after the daemon's timeout.
        """
        [model] = self.parseCommand(self.command()).models
        self.assertEqual(model.command, ("server", "--host", "{host}", "--port", "{port}"))
        self.assertEqual((model.ready.http_path, model.ready.http_status, model.ready.log), ("/health", 200, None))
        self.assertIsNone(model.endpoints)
        self.assertEqual(model.upstream_model, "name")
        self.assertEqual((model.stop.signal, model.stop.timeout, model.stop.command), ("TERM", None, ()))

    def test_commandNotEnabled(self) -> None:
        """
        C{command} must be listed in C{enabled_backends} like the other
        kinds.
        """
        self.assertConfigError({"models": [self.command()]}, "models[0] ('c1').backend", "not in enabled_backends")

    def test_commandRequired(self) -> None:
        """
        A command model without C{command} is refused, naming the key.
        """
        [problem] = self.problems(self.command(command=None))
        self.assertIn("models[0] ('c1').command is required", problem)

    def test_pathStillRequiredElsewhere(self) -> None:
        """
        The other backends still need a C{path}.
        """
        self.assertConfigError({"models": [self.model(path=None)]}, "models[0] ('m1').path is required")

    def test_pathNeedNotExist(self) -> None:
        """
        A command model's path may name what is not a file (a Hub id); one
        that exists is made absolute.
        """
        models = self.parseCommand(self.command(path="Qwen/Qwen2.5-0.5B"), self.command(name="c2", path="model.gguf")).models
        self.assertEqual(models[0].path, "Qwen/Qwen2.5-0.5B")
        self.assertEqual(models[1].path, os.path.join(self.dir, "model.gguf"))

    def test_unknownPlaceholder(self) -> None:
        """
        An unknown placeholder in C{command}, C{extra_args} or
        C{stop.command} stops start-up, naming the key and the index.
        """
        problems = self.problems(
            self.command(
                command=["server", "--port", "{port}", "{prot}"],
                extra_args=["{model}"],
                stop={"command": ["kill", "{pid}"]},
            )
        )
        self.assertEqual(len(problems), 3, problems)
        for fragment in (
            "models[0] ('c1').command[3]: unknown placeholder {prot}",
            "models[0] ('c1').extra_args[0]: unknown placeholder {model}",
            "models[0] ('c1').stop.command[1]: unknown placeholder {pid}",
        ):
            self.assertTrue(any(fragment in p for p in problems), (fragment, problems))

    def test_envPlaceholders(self) -> None:
        """
        A command model's C{env} values take placeholders; an unknown one
        is refused naming C{env.NAME}; another backend's values are
        literal.
        """
        [problem] = self.problems(self.command(env={"VLLM_API_KEY": "{api_key}", "X": "{key}"}))
        self.assertIn("models[0] ('c1').env.X: unknown placeholder {key}", problem)
        [model] = self.parse({"models": [self.model(env={"X": "{key}"})]}).models
        self.assertEqual(model.environment(1, "k"), {"X": "{key}"})
        [model] = self.parseCommand(self.command(env={"K": "{api_key}", "P": "{port}"})).models
        self.assertEqual(model.environment(9100, "k"), {"K": "k", "P": "9100"})

    def test_readyPathPlaceholders(self) -> None:
        """
        C{ready.http.path} takes placeholders (C{{name}}); an unknown one is
        refused naming the key.
        """
        [model] = self.parseCommand(self.command(ready={"http": {"path": "/v2/models/{name}/ready"}})).models
        self.assertEqual(model.ready.http_path, "/v2/models/{name}/ready")
        [problem] = self.problems(self.command(ready={"http": {"path": "/v2/models/{model}/ready"}}))
        self.assertIn("models[0] ('c1').ready.http.path[0]: unknown placeholder {model}", problem)

    def test_bracesInOtherBackendsArgs(self) -> None:
        """
        Braces in another backend's C{extra_args} are not placeholders:
        they are passed as they are and not checked.
        """
        [model] = self.parse({"models": [self.model(extra_args=["--json", "{x}"])]}).models
        self.assertEqual(model.extra_args, ("--json", "{x}"))

    def test_pathPlaceholderWithoutPath(self) -> None:
        """
        C{{path}} in a model without a path is refused.
        """
        [problem] = self.problems(self.command(command=["server", "{path}", "--port", "{port}"]))
        self.assertIn("models[0] ('c1').command[1]: {path} is used but the model has no path", problem)

    def test_upstreamPathWithoutPath(self) -> None:
        """
        C{upstream_model: path} in a model without a path is refused.
        """
        [problem] = self.problems(self.command(upstream_model="path"))
        self.assertIn("models[0] ('c1').upstream_model: 'path' sends the model's path", problem)

    def test_apiKeyInStopCommandRefused(self) -> None:
        """
        C{{api_key}} in C{stop.command} is refused: a stop command also runs
        after a crash, when the run's key is gone.
        """
        [problem] = self.problems(self.command(stop={"command": ["stop", "{api_key}"]}))
        self.assertIn("models[0] ('c1').stop.command[1]: {api_key} cannot be used here", problem)

    def test_literalAddressRefused(self) -> None:
        """
        A command, C{extra_args} or C{stop.command} that names a port or a
        host literally is refused, each naming the model and the key.
        """
        problems = self.problems(
            self.command(
                command=["server", "--host", "0.0.0.0", "--port", "8080"],
                extra_args=["-p", "9000"],
                stop={"command": ["curl", "http://127.0.0.1:8080/shutdown"]},
            )
        )
        self.assertEqual(len(problems), 4, problems)
        self.assertIn("models[0] ('c1').command[2]: --host '0.0.0.0' sets the listen host", problems[0])
        self.assertIn("models[0] ('c1').command[4]: --port '8080' sets the listen port", problems[1])
        self.assertIn("models[0] ('c1').extra_args[1]: -p '9000'", problems[2])
        self.assertIn("models[0] ('c1').stop.command[1]:", problems[3])
        self.assertIn("'127.0.0.1:8080'", problems[3])

    def test_listenAddressLiteral(self) -> None:
        """
        C{0.0.0.0:8000} as an argument of its own is refused.
        """
        [problem] = self.problems(self.command(command=["server", "--bind-all", "0.0.0.0:8000"]))
        self.assertIn("models[0] ('c1').command[2]:", problem)
        self.assertIn("{host}:{port}", problem)

    def test_programNotFound(self) -> None:
        """
        A command whose program is not found is refused, naming
        C{command[0]}.
        """
        [problem] = self.problems(self.command(), which=notFound)
        self.assertIn("models[0] ('c1').command[0]: the command program 'server' was not found", problem)

    def test_portPlaceholderRequired(self) -> None:
        """
        A command model whose command, C{extra_args} and C{env} never use
        C{{port}} is refused: its server would listen where dynllm does not
        look, and never be found ready. C{{port}} in C{env} alone is
        enough.
        """
        [problem] = self.problems(self.command(command=["server", "--host", "{host}"]))
        self.assertIn("models[0] ('c1').command:", problem)
        self.assertIn("{port}", problem)
        self.parseCommand(self.command(command=["server"], env={"PORT": "{port}"}))

    def test_stopProgramNotFound(self) -> None:
        """
        A stop command whose program is not found is refused, naming
        C{stop.command[0]}, as the server's own program is; one given by a
        placeholder is not looked up.
        """
        def which(name: str) -> str | None:
            return None if name == "ctl" else found(name)

        [problem] = self.problems(self.command(stop={"command": ["ctl", "stop", "{name}"]}), which=which)
        self.assertIn("models[0] ('c1').stop.command[0]: the program 'ctl' was not found", problem)
        self.parseCommand(self.command(path="/bin/ctl", stop={"command": ["{path}", "stop"]}), which=which)

    def test_sharedFixedStopCommandRefused(self) -> None:
        """
        Two models with the same stop command that names neither C{{name}}
        nor C{{port}} are refused at the second (unloading one would stop
        the other's server); the same command with C{{name}} is fine.
        """
        stop = {"command": ["docker", "stop", "vllm"]}
        [problem] = self.problems(self.command(stop=stop), self.command(name="c2", stop=stop))
        self.assertIn("models[1] ('c2').stop.command: models[0] ('c1') has the same one", problem)
        named = {"command": ["docker", "stop", "dynllm-{name}"]}
        self.parseCommand(self.command(stop=named), self.command(name="c2", stop=named))

    def test_endpointPathPlaceholderRefused(self) -> None:
        """
        An upstream path of C{endpoints} takes no placeholders (they would
        be sent as they are): a brace in one is refused, naming the route.
        """
        [problem] = self.problems(self.command(endpoints={"/v1/chat/completions": "/{name}/chat"}))
        self.assertIn("models[0] ('c1').endpoints./v1/chat/completions", problem)
        self.assertIn("placeholders", problem)

    def test_literalAddressInEnvRefused(self) -> None:
        """
        A value of C{env} that names every interface (C{0.0.0.0:8000},
        C{[::]}, as C{OLLAMA_HOST} would take) or a C{PORT} or C{HOST}
        variable without its placeholder is refused, naming the variable.
        Other addresses are what a server connects to (C{HTTP_PROXY}, a
        tracing endpoint), and are accepted.
        """
        problems = self.problems(
            self.command(env={
                "ADDR": "0.0.0.0:8000", "V6": "[::]", "PORT": "8080", "HOST": "{host}",
                "HTTP_PROXY": "http://10.0.0.1:3128", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317",
            })
        )
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("models[0] ('c1').env.ADDR:", problems[0])
        self.assertIn("models[0] ('c1').env.V6:", problems[1])
        self.assertIn("models[0] ('c1').env.PORT:", problems[2])

    def test_readyForms(self) -> None:
        """
        C{ready} takes C{http: {path, status}}, C{log} alone (no HTTP probe)
        or both.
        """
        models = self.parseCommand(
            self.command(name="a", ready={"http": {"path": "/v1/models", "status": 204}}),
            self.command(name="b", ready={"log": "listening on"}),
            self.command(name="c", ready={"http": True, "log": "up"}),
        ).models
        self.assertEqual((models[0].ready.http_path, models[0].ready.http_status), ("/v1/models", 204))
        self.assertEqual((models[1].ready.http_path, models[1].ready.log), (None, "listening on"))
        self.assertEqual((models[2].ready.http_path, models[2].ready.log), ("/health", "up"))

    def test_readyProblems(self) -> None:
        """
        Every problem of C{ready} is reported at once: an unknown key, a
        path without C{/}, a status that is not one, a bad regular
        expression.
        """
        problems = self.problems(
            self.command(ready={"http": {"path": "health", "status": 999}, "log": "(", "probe": 1})
        )
        self.assertIn("unknown key \"models[0] ('c1').ready.probe\"", problems[0])
        problems = self.problems(self.command(ready={"http": {"path": "health", "status": 999}, "log": "("}))
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("models[0] ('c1').ready.http.path must be a path", problems[0])
        self.assertIn("models[0] ('c1').ready.http.status must be an HTTP status", problems[1])
        self.assertIn("models[0] ('c1').ready.log is not a valid regular expression", problems[2])

    def test_readyNeedsSomething(self) -> None:
        """
        C{ready} with C{http: false} and no C{log} is refused.
        """
        [problem] = self.problems(self.command(ready={"http": False}))
        self.assertIn("models[0] ('c1').ready must give http, log or both", problem)

    def test_endpoints(self) -> None:
        """
        C{endpoints} maps routes (any spelling) to upstream paths; a list
        keeps each route at its own path.
        """
        models = self.parseCommand(
            self.command(name="a", model_type="transcription", endpoints={"/audio/transcriptions": "/inference"}),
            self.command(name="b", endpoints=["/v1/chat/completions", "/completion"]),
        ).models
        self.assertEqual(dict(models[0].endpoints or {}), {"/v1/audio/transcriptions": "/inference"})
        self.assertEqual(
            dict(models[1].endpoints or {}), {"/v1/chat/completions": "/v1/chat/completions", "/completion": "/completion"}
        )

    def test_endpointsProblems(self) -> None:
        """
        An unknown route, an upstream path without C{/}, and a route that
        does not serve the model's type are each refused, naming the model
        and the key.
        """
        problems = self.problems(
            self.command(endpoints={"/v1/nothing": "/x", "/v1/chat/completions": "chat"}),
            self.command(name="c2", endpoints={"/v1/embeddings": "/embed"}),
        )
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("models[0] ('c1').endpoints: '/v1/nothing' is not a route", problems[0])
        self.assertIn("models[0] ('c1').endpoints./v1/chat/completions must be an upstream path", problems[1])
        self.assertIn("models[1] ('c2').endpoints: /v1/embeddings serves model types embedding, not 'llm'", problems[2])

    def test_endpointGivenTwice(self) -> None:
        """
        A route given twice under two of its spellings
        (C{/v1/chat/completions} and C{/chat/completions}) is refused
        rather than one of them silently dropped; an empty list is refused
        as it was written.
        """
        [problem] = self.problems(self.command(endpoints={"/v1/chat/completions": "/a", "/chat/completions": "/b"}))
        self.assertIn("models[0] ('c1').endpoints: '/chat/completions' is /v1/chat/completions again", problem)
        [problem] = self.problems(self.command(endpoints=[]))
        self.assertIn("not []", problem)

    def test_stopForms(self) -> None:
        """
        C{stop} takes a signal (with or without C{SIG}) and a timeout, or a
        command and a timeout.
        """
        models = self.parseCommand(
            self.command(name="a", stop={"signal": "SIGINT", "timeout": 10}),
            self.command(name="b", stop={"command": ["docker", "stop", "{name}"], "timeout": 30}),
        ).models
        self.assertEqual((models[0].stop.signal, models[0].stop.timeout), ("INT", 10.0))
        self.assertEqual((models[1].stop.command, models[1].stop.timeout), (("docker", "stop", "{name}"), 30.0))

    def test_stopProblems(self) -> None:
        """
        Every problem of C{stop} is reported at once: an unknown signal, a
        timeout that is not positive, both a signal and a command.
        """
        problems = self.problems(self.command(stop={"signal": "STOP", "timeout": 0}))
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("models[0] ('c1').stop.signal must be one of", problems[0])
        self.assertIn("models[0] ('c1').stop.timeout must be a number greater than 0", problems[1])
        [problem] = self.problems(self.command(stop={"signal": "TERM", "command": ["x"]}))
        self.assertIn("models[0] ('c1').stop: give signal or command, not both", problem)

    def test_stopTimeoutFinite(self) -> None:
        """
        An infinite C{stop.timeout} is refused: the KILL after it is what
        makes a stop certain.
        """
        [problem] = self.problems(self.command(stop={"timeout": float("inf")}))
        self.assertIn("models[0] ('c1').stop.timeout must be a finite number of seconds", problem)

    def test_literalAddressInAnyStopCommand(self) -> None:
        """
        A stop command that names an address literally is refused for
        every backend kind.
        """
        raw = {"models": [self.model(stop={"command": ["curl", "http://localhost:9100/quit"]})]}
        self.assertConfigError(raw, "models[0] ('m1').stop.command[1]:", "'localhost:9100'")

    def test_stopForEveryBackend(self) -> None:
        """
        C{stop} applies to every backend kind: a llama.cpp model may take
        another signal and timeout.
        """
        [model] = self.parse({"models": [self.model(stop={"signal": "INT", "timeout": 2})]}).models
        self.assertEqual((model.stop.signal, model.stop.timeout), ("INT", 2.0))

    def test_commandKeysOnlyForCommand(self) -> None:
        """
        C{command}, C{ready}, C{endpoints} and C{upstream_model} on another
        backend are refused, each naming the model and the key.
        """
        raw = {"models": [self.model(command=["x"], ready={"log": "x"}, endpoints=["/v1/completions"], upstream_model="path")]}
        problems = self.assertRaises(ConfigError, self.parse, raw).problems
        self.assertEqual(len(problems), 4, problems)
        for key, problem in zip(["command", "endpoints", "ready", "upstream_model"], problems):
            self.assertIn(f"models[0] ('m1').{key} applies only to backend 'command'", problem)

    def test_allProblemsAtOnce(self) -> None:
        """
        Problems of several command models and keys come in one error, in
        the file's order.
        """
        problems = self.problems(
            self.command(command=["s", "--port", "80"]),
            self.command(name="c2", ready={"log": "["}, stop={"signal": "NOPE"}),
        )
        self.assertEqual(len(problems), 3, problems)
        self.assertTrue(problems[0].startswith("models[0] ('c1')"))
        self.assertTrue(all(p.startswith("models[1] ('c2')") for p in problems[1:]), problems)
