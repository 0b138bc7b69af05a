# -*- test-case-name: tests.test_owned -*-
"""
The launch settings dynllm owns, per backend kind, as data: every spelling
of them each backend accepts on its command line and in its environment.

dynllm sets a backend's listen address, model, served name and API key
itself. A model's C{extra_args} or C{env} that set one of them again would
make the backend listen where dynllm does not look (a 504 after the whole
load timeout), listen on the network without dynllm's key, serve another
model than the configured one, or refuse dynllm's own requests. So the
configuration refuses them (L{dynllm.config}), and the backends do not
inherit the variables from dynllm's environment
(L{dynllm.interfaces.IBackend.environment}).

This module imports nothing of dynllm's, so that the configuration and the
backends can both read it.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class OwnedSetting:
    """
    One setting dynllm owns, with every spelling a backend accepts.

    @ivar what: What it sets, for messages (C{'the listen port'}).
    @ivar flags: Its command-line options, long and short. Each is also
        refused in the C{--flag=value} form.
    @ivar variables: The environment variables that set it.
    """

    what: str
    flags: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()


@frozen
class OwnedSettings:
    """
    The settings dynllm owns for one backend kind.

    @ivar settings: The settings.
    @ivar dashUnderscore: Whether the backend reads C{_} as C{-} in long
        options (llama.cpp's C{common/arg.cpp} does, so C{--api_key} is
        C{--api-key}).
    """

    settings: tuple[OwnedSetting, ...]
    dashUnderscore: bool = False

    def flag(self, arg: str) -> tuple[str, OwnedSetting] | None:
        """
        @param arg: One command-line argument, as in C{extra_args}.
        @return: the option C{arg} gives (without any C{=value}) and the
            setting it sets, or C{None} if it sets none that dynllm owns.
        """
        name = arg.partition("=")[0] if arg.startswith("-") else arg
        if self.dashUnderscore and name.startswith("--"):
            name = name.replace("_", "-")
        for setting in self.settings:
            if name in setting.flags:
                return name, setting
        return None

    def variable(self, name: str) -> OwnedSetting | None:
        """
        @return: the setting environment variable C{name} sets, or C{None}.
        """
        for setting in self.settings:
            if name in setting.variables:
                return setting
        return None

    @property
    def variables(self) -> tuple[str, ...]:
        """
        Every environment variable of these settings.
        """
        return tuple(v for setting in self.settings for v in setting.variables)


#: llama.cpp's C{llama-server}, from C{common/arg.cpp} of b11434 (the
#: options and their C{set_env} names). The address includes C{--reuse-port}
#: (another process could bind the same port and take requests),
#: C{--api-prefix} (moves every route), and the TLS files (dynllm speaks
#: plain HTTP to its backends). The model includes every other source of
#: one (a URL, Hugging Face, Docker, and router mode's C{--models-dir} and
#: C{--models-preset}). llama-server reads no C{--flag=value}; such
#: arguments are refused all the same.
LLAMACPP = OwnedSettings(
    (
        OwnedSetting("the listen host", ("--host",), ("LLAMA_ARG_HOST",)),
        OwnedSetting("the listen port", ("--port",), ("LLAMA_ARG_PORT",)),
        OwnedSetting("the listen port", ("--reuse-port",), ("LLAMA_ARG_REUSE_PORT",)),
        OwnedSetting("the address of the routes", ("--api-prefix",), ("LLAMA_ARG_API_PREFIX",)),
        OwnedSetting(
            "the protocol (dynllm speaks plain HTTP to its backends)",
            ("--ssl-key-file", "--ssl-cert-file"),
            ("LLAMA_ARG_SSL_KEY_FILE", "LLAMA_ARG_SSL_CERT_FILE"),
        ),
        OwnedSetting("the model path", ("-m", "--model"), ("LLAMA_ARG_MODEL",)),
        OwnedSetting(
            "the model path (another source of the model)",
            (
                "-mu", "--model-url",
                "-hf", "-hfr", "--hf-repo",
                "-hff", "--hf-file",
                "-dr", "--docker-repo",
                "--models-dir", "--models-preset",
            ),
            (
                "LLAMA_ARG_MODEL_URL",
                "LLAMA_ARG_HF_REPO",
                "LLAMA_ARG_HF_FILE",
                "LLAMA_ARG_DOCKER_REPO",
                "LLAMA_ARG_MODELS_DIR",
                "LLAMA_ARG_MODELS_PRESET",
            ),
        ),
        OwnedSetting("the served name", ("-a", "--alias"), ("LLAMA_ARG_ALIAS",)),
        OwnedSetting(
            "the API key",
            ("--api-key", "--api-key-file"),
            ("LLAMA_API_KEY", "LLAMA_ARG_API_KEY_FILE"),
        ),
    ),
    dashUnderscore=True,
)

#: OpenVINO Model Server, from its C{src/cli_parser.cpp} (cxxopts: C{--flag
#: value} and C{--flag=value}; no short forms) and the variables its C{src/}
#: reads (C{API_KEY}, C{OVMS_MODEL_REPOSITORY_PATH}); see C{backends.md}
#: 3.9 "Flags a proxy must own". C{--port} is gRPC, which dynllm keeps off.
OPENVINO = OwnedSettings(
    (
        OwnedSetting("the listen port", ("--rest_port",)),
        OwnedSetting("the listen host", ("--rest_bind_address",)),
        OwnedSetting("the gRPC port (kept off)", ("--port",)),
        OwnedSetting("the gRPC host (kept off)", ("--grpc_bind_address",)),
        OwnedSetting("the served name", ("--model_name",)),
        OwnedSetting("the model path", ("--model_path",)),
        OwnedSetting(
            "the model path (another source of the model)",
            ("--config_path", "--source_model", "--model_repository_path"),
            ("OVMS_MODEL_REPOSITORY_PATH",),
        ),
        OwnedSetting("the API key", ("--api_key_file",), ("API_KEY",)),
    )
)

#: Hugging Face C{transformers serve} 5.x (typer: C{--flag value} and
#: C{--flag=value}; its options have no environment forms). Its model is
#: the positional argument, which dynllm gives first; a second one is a
#: usage error of the program. It has no API key.
TRANSFORMERS = OwnedSettings(
    (
        OwnedSetting("the listen host", ("--host",)),
        OwnedSetting("the listen port", ("--port",)),
    )
)

#: Any server (C{backend: command}): its options are not known, so none is
#: refused by name; its listen address is given by placeholders only
#: (L{dynllm.placeholders.addressProblems} refuses any other spelling).
COMMAND = OwnedSettings(())

#: The owned settings of each backend kind of the configuration.
OWNED = {
    "llamacpp": LLAMACPP,
    "openvino": OPENVINO,
    "transformers": TRANSFORMERS,
    "command": COMMAND,
}
