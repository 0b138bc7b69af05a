"""
A faithful stand-in for OpenVINO Model Server (``ovms``) v2026.3, for tests.

OVMS cannot be installed here, so this Twisted program takes OVMS's command
line and answers its REST API the way OVMS does (see the project's
``backends.md`` section 3; status codes and messages come from OVMS's
``src/cli_parser.cpp``, ``src/config.cpp``, ``src/http_rest_api_handler.cpp``,
``src/http_server.cpp``, ``src/status.cpp`` and ``src/config_status_utils.cpp``).
It rejects what OVMS rejects: usage errors exit with 64 (``EX_USAGE``, which
is OVMS's ``OVMS_EX_USAGE`` on Linux), start-up failures with 1.

Run it as ``python tests/fakeovms.py <ovms arguments>`` with an interpreter
that has Twisted, or through the wrapper that ``launcher(directory)`` writes.

Environment knobs (all optional):

  FAKE_OVMS_LOAD_DELAY=S     seconds from start until a servable is AVAILABLE
                             (default 0.05); or ``name=S,other=S`` per servable
                             (``*=S`` sets the default)
  FAKE_OVMS_FAIL_LOAD=1      no servable ever loads; or a comma list of names
                             (a graph served alone, without --config_path,
                             then makes the server exit 1, as OVMS does)
  FAKE_OVMS_BAD_PATH=stay    a missing model directory leaves the server up
                             with the model never available (default: log an
                             error and exit 1 just after the REST bind)
  FAKE_OVMS_TASK_KSERVE=0    graphs created by --task are not KServe models
                             (404 "Model with requested name is not found")
  FAKE_OVMS_FRAME_DELAY=S    seconds between streamed frames (default 0.005)
  FAKE_OVMS_DEVICES=CPU,GPU  devices that exist (default CPU); a servable
                             whose --target_device names another fails to load
  FAKE_OVMS_ARGV_FILE=PATH   write {"argv": [...], "pid": N} to PATH at start
  API_KEY=K                  like OVMS (unless --api_key_file gives a key):
                             POSTs under /v3 and /v1 need
                             ``Authorization: Bearer K`` (else 500)

What a model directory must hold, as for OVMS: a classic (KServe-only) model
needs a numeric version directory with a model file (``DIR/1/model.xml``);
without one it never turns ready ("No version found for model in path").  A
graph is made by ``--task``, by ``DIR/graph.pbtxt`` (task from its
calculator) or by a Hugging Face ``DIR/config.json`` (task from its
``architectures``).  ``--model_name`` is required with ``--model_path``.

Generated content is deterministic: completions repeat the words of the
prompt (the last user message for chat), embeddings and scores are derived
from SHA-256 of the text, transcriptions state the upload's size and SHA-256,
speech is a WAV whose length is proportional to the input, images are PNGs
of the requested size coloured from the prompt.
"""

import base64
import hashlib
import json
import math
import os
import re
import shlex
import signal
import socket
import stat
import struct
import sys
import time
import zlib
from array import array

VERSION = "2026.3.0"
OPENVINO_VERSION = "2026.3.0-fake"
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
MAX_PORT = 65535
MAX_UINT32 = 2**32 - 1
MAX_REST_WORKERS = 10000
TASKS = (
    "text_generation",
    "embeddings",
    "rerank",
    "image_generation",
    "text2speech",
    "speech2text",
)

# Server options, as in cli_parser.cpp: name -> value kind.  "bool" options
# take no separate value (cxxopts: ``--flag`` or ``--flag=true|false``).
SERVER_OPTIONS = {
    "help": "bool",
    "version": "bool",
    "port": "uint",
    "grpc_bind_address": "str",
    "rest_port": "uint",
    "rest_bind_address": "str",
    "grpc_workers": "uint",
    "grpc_max_threads": "uint",
    "grpc_memory_quota": "uint",
    "rest_workers": "uint",
    "log_level": "str",
    "log_path": "str",
    "verbose_response": "bool",
    "grpc_channel_arguments": "str",
    "file_system_poll_wait_seconds": "uint",
    "custom_node_resources_cleaner_interval_seconds": "uint",
    "cache_dir": "str",
    "metrics_enable": "bool",
    "metrics_list": "str",
    "cpu_extension": "str",
    "allowed_media_domains": "str",
    "allowed_local_media_path": "str",
    "allow_credentials": "bool",
    "allowed_origins": "str",
    "allowed_methods": "str",
    "allowed_headers": "str",
    "api_key_file": "str",
    "config_path": "str",
    "list_models": "bool",
    "add_to_config": "bool",
    "remove_from_config": "bool",
    "pull": "bool",
    "source_model": "str",
    "source_loras": "str",
    "gguf_filename": "str",
    "overwrite_models": "bool",
    "model_repository_path": "str",
    "weight-format": "str",
    "extra_quantization_params": "str",
    "vocoder": "str",
    "model_name": "str",
    "model_path": "str",
    "batch_size": "str",
    "shape": "str",
    "layout": "str",
    "mean": "str",
    "scale": "str",
    "color_format": "str",
    "precision": "str",
    "model_version_policy": "str",
    "nireq": "uint",
    "target_device": "str",
    "plugin_config": "str",
    "task": "str",
}

# Task options: parsed (by a second cxxopts parser) only in the task/pull
# modes, and only the chosen task's options are accepted.
TASK_OPTIONS = {
    "text_generation": {
        "max_num_seqs": "uint",
        "pipeline_type": "str",
        "graph_target_device": "str",
        "enable_prefix_caching": "str",
        "max_num_batched_tokens": "uint",
        "cache_size": "uint",
        "draft_source_model": "str",
        "dynamic_split_fuse": "str",
        "max_prompt_len": "uint",
        "kv_cache_precision": "str",
        "model_distribution_policy": "str",
        "reasoning_parser": "str",
        "tool_parser": "str",
        "enable_tool_guided_generation": "bool",
    },
    "embeddings": {
        "graph_target_device": "str",
        "num_streams": "uint",
        "normalize": "str",
        "truncate": "str",
        "pooling": "str",
        "model_version": "uint",
    },
    "rerank": {
        "graph_target_device": "str",
        "num_streams": "uint",
        "max_allowed_chunks": "uint",
        "max_doc_length": "uint",
        "model_version": "uint",
    },
    "image_generation": {
        "resolution": "str",
        "max_resolution": "str",
        "default_resolution": "str",
        "num_images_per_prompt": "uint",
        "guidance_scale": "float",
        "max_num_images_per_prompt": "uint",
        "default_num_inference_steps": "uint",
        "max_num_inference_steps": "uint",
        "num_streams": "uint",
    },
    "text2speech": {"num_streams": "uint", "model_type": "str"},
    "speech2text": {"num_streams": "uint"},
}

# cli_parser.cpp architectureToTask, for the task inferred from config.json.
ARCHITECTURE_TASKS = {
    "BertForSequenceClassification": "rerank",
    "BertModel": "embeddings",
    "CLIPTextModel": "image_generation",
    "InternVLChatModel": "text_generation",
    "JinaBertModel": "embeddings",
    "MPNetModel": "embeddings",
    "ParlerTTSForConditionalGeneration": "text2speech",
    "Qwen2VLForConditionalGeneration": "text_generation",
    "SeamlessM4TModel": "speech2text",
    "SeamlessM4Tv2Model": "speech2text",
    "SpeechT5ForTextToSpeech": "text2speech",
    "T5EncoderModel": "embeddings",
    "UNet2DConditionModel": "image_generation",
    "WhisperForConditionalGeneration": "speech2text",
}

# graph.pbtxt calculator -> task (checked in this order).
CALCULATOR_TASKS = (
    ("EmbeddingsCalculatorOV", "embeddings"),
    ("RerankCalculatorOV", "rerank"),
    ("ImageGenCalculator", "image_generation"),
    ("S2tCalculator", "speech2text"),
    ("T2sCalculator", "text2speech"),
    ("HttpLLMCalculator", "text_generation"),
    ("LLMCalculator", "text_generation"),
)

# The endpoints (the part of the URI after /v3/ or /v1/) each task serves.
TASK_ENDPOINTS = {
    "text_generation": ("chat/completions", "completions", "responses", "tokenize"),
    "embeddings": ("embeddings",),
    "rerank": ("rerank",),
    "image_generation": ("images/generations", "images/edits"),
    "speech2text": ("audio/transcriptions", "audio/translations"),
    "text2speech": ("audio/speech",),
}
TASK_NODES = {
    "text_generation": "LLMExecutor",
    "embeddings": "EmbeddingsExecutor",
    "rerank": "RerankExecutor",
    "image_generation": "ImageGenExecutor",
    "speech2text": "S2tExecutor",
    "text2speech": "T2sExecutor",
}
MODEL_FILE_SUFFIXES = (".xml", ".onnx", ".tflite", ".pdmodel", "saved_model.pb")
LOG_LEVELS = {"TRACE": 0, "DEBUG": 1, "INFO": 2, "WARNING": 3, "ERROR": 4}
SPDLOG_NAMES = {
    "TRACE": "trace",
    "DEBUG": "debug",
    "INFO": "info",
    "WARNING": "warning",
    "ERROR": "error",
}

# modelmanager.cpp: single-model settings refused when a graph is served.
GRAPH_REFUSED_SETTINGS = (
    "shape",
    "batch_size",
    "layout",
    "nireq",
    "model_version_policy",
)

# imagegenutils.cpp: the form fields /v3/images/edits handles.
IMAGE_EDIT_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "image",
        "mask",
        "size",
        "height",
        "width",
        "n",
        "num_images_per_prompt",
        "response_format",
        "prompt_2",
        "prompt_3",
        "negative_prompt",
        "negative_prompt_2",
        "negative_prompt_3",
        "num_inference_steps",
        "rng_seed",
        "strength",
        "guidance_scale",
        "max_sequence_length",
        "lora_alphas",
    }
)

MSG_NOT_LOADED_YET = "Model with requested version is not loaded yet"
MSG_NAME_MISSING = "Model with requested name is not found"
MSG_VERSION_MISSING = "Model with requested version is not found"
MSG_MP_NOT_LOADED = "Mediapipe is not loaded yet"
MSG_MP_MISSING = "Mediapipe graph definition with requested name is not found"
MSG_INVALID_URL = "Invalid request URL"
MSG_UNAUTHORIZED = "Unauthorized request due to invalid or missing api-key"


def launcher(directory: str) -> str:
    """
    Write an executable ``directory/ovms`` that runs this fake with the
    current interpreter, and return its path.
    """
    path = os.path.join(directory, "ovms")
    script = os.path.abspath(__file__)
    with open(path, "w") as f:
        f.write(
            f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(script)} "$@"\n'
        )
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    """A command line OVMS refuses; the message goes to stderr, exit 64."""


class Exit(Exception):
    """Leave with this code after printing this text (to stdout)."""

    def __init__(self, code: int, text: str = "") -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text


def _parseValue(name: str, kind: str, value: str):
    if kind == "uint":
        if not re.fullmatch(r"\+?[0-9]+", value) or int(value) > MAX_UINT32:
            raise UsageError(
                f"error parsing options: Argument '{value}' failed to parse"
            )
        return int(value)
    if kind == "float":
        try:
            return float(value)
        except ValueError:
            raise UsageError(
                f"error parsing options: Argument '{value}' failed to parse"
            ) from None
    if kind == "bool":
        low = value.lower()
        if low in ("true", "1", "yes", "on", ""):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"error parsing options: Argument '{value}' failed to parse")
    return value


def _scan(argv: list, known: dict, lenientBools: bool = False):
    """
    One cxxopts pass: return (options, unmatched tokens).  An unknown
    ``--option`` and every positional token end up unmatched, as with
    ``allow_unrecognised_options``.
    """
    options: dict = {}
    unmatched: list = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        name = value = None
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            if not eq:
                value = None
        elif token in ("-h",):
            name = "help"
        if name is None or name not in known:
            unmatched.append(token)
            continue
        kind = known[name]
        if kind == "bool":
            if (
                value is None
                and lenientBools
                and i < len(argv)
                and argv[i].lower() in ("true", "false")
            ):
                value = argv[i]
                i += 1
            options[name] = True if value is None else _parseValue(name, kind, value)
            continue
        if value is None:
            if i >= len(argv):
                raise UsageError(
                    f"error parsing options: Option '{name}' is missing an argument"
                )
            value = argv[i]
            i += 1
        options[name] = _parseValue(name, kind, value)
    return options, unmatched


def _architecturesTask(configJson: str) -> str:
    try:
        with open(configJson, "rb") as f:
            config = json.loads(f.read())
    except OSError:
        raise UsageError(
            f"error parsing options: failed to open model config file: {configJson}"
        ) from None
    except ValueError as e:
        raise UsageError(
            f"error parsing options: failed to parse {configJson}: {e}"
        ) from None
    if not isinstance(config, dict) or "architectures" not in config:
        raise UsageError(
            f"error parsing options: {configJson} does not contain architectures field"
        )
    architectures = config["architectures"]
    if not isinstance(architectures, list) or not architectures:
        raise UsageError(
            "error parsing options: config.json does not contain a non-empty architectures array"
        )
    found = None
    for arch in architectures:
        if not isinstance(arch, str):
            continue
        task = ARCHITECTURE_TASKS.get(arch)
        if task is None:
            if arch.endswith("ForTextToSpeech"):
                task = "text2speech"
            elif arch.endswith("ForSequenceClassification"):
                task = "rerank"
            elif arch.endswith("Transformer2DModel") or arch == "AutoencoderKL":
                task = "image_generation"
            elif arch.endswith(("ForCausalLM", "ForConditionalGeneration")):
                task = "text_generation"
            elif arch.endswith("Model"):
                task = "embeddings"
        if task is None:
            continue
        if found is not None and found != task:
            raise UsageError(
                "error parsing options: config.json architectures map to multiple default tasks"
            )
        found = task
    if found is None:
        raise UsageError(
            "error parsing options: config.json architectures do not map to a supported default task"
        )
    return found


def _validHost(address: str) -> bool:
    if len(address) > 255:
        return False
    if ":" in address:
        try:
            socket.inet_pton(socket.AF_INET6, address)
            return True
        except OSError:
            return False
    if all(c.isdigit() or c == "." for c in address):
        octet = r"([0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5])"
        return re.fullmatch(rf"({octet}\.){{3}}{octet}", address) is not None
    label = r"([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])"
    return re.fullmatch(rf"({label}\.)*{label}", address) is not None


def parseCommandLine(argv: list) -> dict:
    """
    Parse and validate OVMS's command line the way cli_parser.cpp and
    config.cpp do.  Return the settings; raise UsageError or Exit.
    """
    if not argv:
        raise Exit(EX_OK, usage())
    options, unmatched = _scan(argv, SERVER_OPTIONS)

    task = options.get("task")
    pull = options.get("pull", False)
    source = options.get("source_model")
    modelPath = options.get("model_path")
    repository = options.get(
        "model_repository_path", os.environ.get("OVMS_MODEL_REPOSITORY_PATH", "")
    )
    configManagement = (
        options.get("add_to_config")
        or options.get("remove_from_config")
        or options.get("list_models")
    )
    pullMode = bool(pull or source)
    inferred = None
    if task is None and not pullMode and modelPath and not configManagement:
        configJson = os.path.join(modelPath, "config.json")
        if os.path.exists(configJson):
            inferred = _architecturesTask(configJson)
    taskMode = pullMode or task is not None or inferred is not None
    if taskMode:
        if task is None and inferred is None:
            local = None
            if modelPath:
                local = modelPath
            elif (
                source
                and repository
                and os.path.exists(os.path.join(repository, source))
            ):
                local = os.path.join(repository, source)
            elif source:
                raise UsageError(
                    "error parsing options: failed to download model config file from: "
                    f"https://huggingface.co/{source}/resolve/main/config.json"
                )
            else:
                raise UsageError(
                    "error parsing options: cannot determine default --task without model_path or source_model"
                )
            inferred = _architecturesTask(os.path.join(local, "config.json"))
        effective = task if task is not None else inferred
        if effective not in TASKS:
            raise UsageError(
                f"error parsing options - --task parameter unsupported value: {effective}"
            )
        taskOptions, stillUnmatched = _scan(
            unmatched, TASK_OPTIONS[effective], lenientBools=True
        )
        if stillUnmatched:
            raise UsageError(
                f"task: {effective} - error parsing options - unmatched arguments : "
                + "".join(a + ", " for a in stillUnmatched)
            )
        task = effective
    else:
        taskOptions = {}
        if unmatched:
            raise UsageError(
                "error parsing options - unmatched arguments: "
                + "".join(a + ", " for a in unmatched)
            )
    if taskMode and options.get("list_models"):
        raise UsageError(
            "error parsing options - --list_models cannot be used with --pull or --task"
        )
    if taskMode and options.get("remove_from_config"):
        raise UsageError(
            "error parsing options - --remove_from_config cannot be used with --pull or --task"
        )
    if taskMode and options.get("add_to_config"):
        raise UsageError(
            "error parsing options - --add_to_config cannot be used with --pull or --task"
        )
    if options.get("version"):
        raise Exit(
            EX_OK,
            f"OpenVINO Model Server {VERSION}-fake\nOpenVINO backend {OPENVINO_VERSION}\nBazel build flags: fake\n",
        )
    if options.get("help"):
        raise Exit(EX_OK, usage())
    for needsLayout in ("mean", "scale", "color_format", "precision"):
        if needsLayout in options and "layout" not in options:
            raise UsageError(
                f"error parsing options - --{needsLayout} parameter requires --layout to be set"
            )

    settings = dict(options)
    settings["task"] = task
    settings["task_options"] = taskOptions
    settings["model_repository_path"] = repository
    settings.setdefault("port", 0)
    settings.setdefault("rest_port", 0)
    settings.setdefault("rest_bind_address", "0.0.0.0")
    settings.setdefault("grpc_bind_address", "0.0.0.0")
    settings.setdefault("grpc_workers", 1)
    settings.setdefault("log_level", "INFO")
    settings.setdefault("metrics_list", "")
    settings.setdefault("target_device", None)

    if options.get("list_models"):
        mode = "list"
    elif pull:
        mode = "pull"
    elif source:
        mode = "pull_and_start"
    elif task is not None:
        mode = "in_memory_graph"
    else:
        mode = "serve"
    settings["mode"] = mode
    if options.get("add_to_config") or options.get("remove_from_config"):
        raise UsageError(
            "config management (--add_to_config/--remove_from_config) is not emulated by the fake"
        )

    if mode == "pull_and_start":
        settings.setdefault("model_name", source)
        if not modelPath:
            settings["model_path"] = os.path.join(repository, source)
    _validate(settings, options)
    return settings


def _validate(settings: dict, given: dict) -> None:
    mode = settings["mode"]
    task = settings["task"]
    taskOptions = settings["task_options"]
    if mode in ("pull", "pull_and_start"):
        if not settings.get("source_model"):
            raise UsageError("source_model parameter is required for pull mode")
        if not settings.get("model_repository_path"):
            raise UsageError(
                "model_repository_path parameter is required for pull mode"
            )
    if task is not None:
        bools = ("false", "true")
        if task == "text_generation":
            pipeline = taskOptions.get("pipeline_type")
            if pipeline is not None and pipeline not in (
                "LM",
                "LM_CB",
                "VLM",
                "VLM_CB",
                "AUTO",
            ):
                raise UsageError(
                    f"pipeline_type: {pipeline} is not allowed. Supported types: LM, LM_CB, VLM, VLM_CB, AUTO"
                )
            device = settings.get("target_device") or "CPU"
            if not (
                device in ("CPU", "GPU", "NPU", "AUTO")
                or device.startswith("HETERO")
                or re.fullmatch(r"GPU\.[0-9]+", device)
            ):
                raise UsageError(
                    f"target_device: {device} is not allowed. Supported devices: CPU, GPU, NPU, HETERO, AUTO"
                )
            for name in ("enable_prefix_caching", "dynamic_split_fuse"):
                if taskOptions.get(name, "true") not in bools:
                    raise UsageError(
                        f"{name}: {taskOptions[name]} is not allowed. Supported values: true, false"
                    )
        if task == "embeddings":
            for name in ("normalize", "truncate"):
                if taskOptions.get(name, "false") not in bools:
                    raise UsageError(
                        f"{name}: {taskOptions[name]} is not allowed. Supported values: true, false"
                    )
        if task == "image_generation":
            for name in ("max_resolution", "default_resolution"):
                if name in taskOptions and not re.fullmatch(
                    r"\d+x\d+", taskOptions[name]
                ):
                    raise UsageError(
                        f"error parsing options: Invalid {name} format. Expected WxH, e.g., 1024x1024"
                    )
    if mode == "pull":
        return
    if mode == "list":
        if not settings.get("model_repository_path"):
            raise UsageError("Use --list_models with --model_repository_path")
        return

    configPath = given.get("config_path", "")
    modelName = settings.get("model_name", "")
    modelPath = settings.get("model_path", "")
    if configPath and (given.get("model_name") or given.get("model_path")):
        raise UsageError("Use either config_path or model_path with model_name")
    if not configPath and not (modelName and modelPath):
        raise UsageError("Use config_path or model_path with model_name")
    if configPath and any(
        k in given
        for k in (
            "batch_size",
            "shape",
            "nireq",
            "model_version_policy",
            "target_device",
            "plugin_config",
        )
    ):
        raise UsageError("Model parameters in CLI are exclusive with the config file")
    cores = os.cpu_count() or 1
    if settings["grpc_workers"] > cores or settings["grpc_workers"] < 1:
        raise UsageError(
            f"grpc_workers count should be from 1 to CPU core count : {cores}"
        )
    if settings.get("metrics_enable") and settings["rest_port"] == 0:
        raise UsageError(
            "rest_port setting is missing, metrics are enabled on rest port"
        )
    if not settings.get("metrics_enable") and settings["metrics_list"]:
        raise UsageError(
            "metrics_enable setting is missing, required when metrics_list is provided"
        )
    if settings["rest_port"] == 0 and settings["port"] == 0:
        raise UsageError("port and rest_port cannot both be unset")
    restWorkers = settings.get("rest_workers")
    if restWorkers is not None:
        if restWorkers > MAX_REST_WORKERS or restWorkers < 2:
            raise UsageError(
                f"rest_workers count should be from 2 to {MAX_REST_WORKERS}"
            )
        if settings["rest_port"] == 0:
            raise UsageError(
                "rest_workers is set but rest_port is not set. rest_port is required to start rest servers"
            )
    if settings["port"] > MAX_PORT:
        raise UsageError(f"port number out of range from 0 to {MAX_PORT}")
    if settings["rest_port"] > MAX_PORT:
        raise UsageError(f"rest_port number out of range from 0 to {MAX_PORT}")
    if settings["rest_bind_address"] and not _validHost(settings["rest_bind_address"]):
        raise UsageError(
            "rest_bind_address has invalid format: proper hostname or IP address expected."
        )
    if settings["grpc_bind_address"] and not _validHost(settings["grpc_bind_address"]):
        raise UsageError(
            "grpc_bind_address has invalid format: proper hostname or IP address expected."
        )
    if settings["port"] == settings["rest_port"] and settings["port"] != 0:
        raise UsageError("port and rest_port cannot have the same values")
    if settings.get("cpu_extension") and not os.path.exists(settings["cpu_extension"]):
        raise UsageError(
            "File path provided as an --cpu_extension parameter does not exist in the filesystem: "
            + settings["cpu_extension"]
        )
    if settings["log_level"] not in LOG_LEVELS:
        raise UsageError(
            "log_level should be one of: TRACE, DEBUG, INFO, WARNING, ERROR"
        )


def usage() -> str:
    lines = ["OpenVINO Model Server (fake)", "Usage:", "  ovms [OPTION...]", ""]
    for name, kind in SERVER_OPTIONS.items():
        lines.append(f"      --{name}" + ("" if kind == "bool" else f" {name.upper()}"))
    for task, opts in TASK_OPTIONS.items():
        lines.append(f" {task} options:")
        for name in opts:
            lines.append(f"      --{name}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Logging


class Log:
    """spdlog's ``[%Y-%m-%d %T.%e][pid][logger][level][file:line] msg`` on stderr."""

    def __init__(self, level: str = "INFO", path: str | None = None) -> None:
        self.minimum = LOG_LEVELS.get(level, 2)
        # The log file stays open for the life of the process.
        self.file = open(path, "a") if path else None  # noqa: SIM115

    def __call__(
        self, level: str, where: str, message: str, logger: str = "serving"
    ) -> None:
        if LOG_LEVELS[level] < self.minimum:
            return
        now = time.time()
        stamp = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            + f".{int(now * 1000) % 1000:03d}"
        )
        line = f"[{stamp}][{os.getpid()}][{logger}][{SPDLOG_NAMES[level]}][{where}] {message}\n"
        sys.stderr.write(line)
        sys.stderr.flush()
        if self.file is not None:
            self.file.write(line)
            self.file.flush()


# ---------------------------------------------------------------------------
# Servables


def _envTable(name: str, default):
    """Parse ``VALUE`` or ``name=VALUE,other=VALUE`` (``*`` = default)."""
    raw = os.environ.get(name, "")
    table: dict = {}
    if not raw:
        return default, table
    if "=" not in raw:
        return raw, table
    for item in raw.split(","):
        key, _, value = item.partition("=")
        if key.strip() == "*":
            default = value.strip()
        elif key.strip():
            table[key.strip()] = value.strip()
    return default, table


def _taskFromGraph(graphFile: str) -> str:
    try:
        with open(graphFile, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "text_generation"
    for calculator, task in CALCULATOR_TASKS:
        if calculator in text:
            return task
    return "text_generation"


def _parseShape(text: str | None, batch: str | None):
    """--shape "(1,3,224,224)", "[1,3]", "auto" or JSON {"input": "(1,3)"}; -1 = dynamic."""
    shape = [1, 3, 224, 224]
    if text and text.strip() != "auto":
        spec = text.strip()
        if spec.startswith("{"):
            try:
                spec = json.loads(spec)
            except ValueError:
                return None
            if not isinstance(spec, dict) or not spec:
                return None
            spec = spec.get("input", next(iter(spec.values())))
            if not isinstance(spec, str):
                return None
            spec = spec.strip()
        m = re.fullmatch(r"[\(\[]\s*([^\)\]]*)[\)\]]", spec)
        if not m:
            return None
        dims = []
        for dim in m.group(1).split(","):
            dim = dim.strip()
            if re.fullmatch(r"-?[0-9]+", dim):
                dims.append(int(dim))
            elif re.fullmatch(r"[0-9]+:[0-9]+", dim):
                dims.append(-1)
            else:
                return None
        return dims
    if batch and batch != "auto":
        if not re.fullmatch(r"[0-9]+", batch):
            return None
        shape[0] = int(batch)
    return shape


class Servable:
    """One model (classic) or MediaPipe graph and its load state."""

    def __init__(
        self,
        name: str,
        kind: str,
        path: str,
        task: str | None = None,
        origin: str = "cli",
    ) -> None:
        self.name = name
        self.kind = kind  # "classic" or "graph"
        self.path = path
        self.task = task
        self.origin = origin  # "task" for graphs made by --task/--source_model
        self.state = "START"
        self.errorCode = "OK"
        self.version = 1
        self.versions: list = [1]
        self.created = int(time.time())
        self.inputShape = [1, 3, 224, 224]
        self.targetDevice = None
        self.failure = None  # why the load will fail, if it will
        self.loadFinished = False

    @property
    def available(self) -> bool:
        return self.state == "AVAILABLE"

    @property
    def registered(self) -> bool:
        """
        mediapipefactory.cpp validates a graph (which loads its pipelines)
        before it inserts it: until its first load ends, OVMS does not know
        the name at all.  Classic models are registered at once.
        """
        return self.kind != "graph" or self.loadFinished


# ---------------------------------------------------------------------------
# Deterministic "inference"


def _words(text: str) -> list:
    return re.findall(r"\S+", text)


def _contentText(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def generateTokens(prompt: str, count: int) -> list:
    source = _words(prompt) or ["fake"]
    return [source[i % len(source)] for i in range(count)]


def embed(text: str) -> list:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(digest[2 * i] | digest[2 * i + 1] << 8) / 32767.5 - 1.0 for i in range(8)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


def relevance(query: str, document: str) -> float:
    q = {w.lower() for w in _words(query)}
    d = {w.lower() for w in _words(document)}
    overlap = len(q & d) / len(q) if q else 0.0
    jitter = (
        int.from_bytes(
            hashlib.sha256((query + "\0" + document).encode("utf-8")).digest()[:2],
            "big",
        )
        / 65535
    )
    return round(0.9 * overlap + 0.1 * jitter, 6)


def makeWav(text: str, rate: int = 16000) -> bytes:
    """16-bit mono PCM; 50 ms of tone per input character, pitch from the character."""
    perChar = rate // 20
    chars = text or " "
    samples = array("h")
    for index, ch in enumerate(chars):
        freq = 200 + (ord(ch) % 64) * 20
        base = index * perChar
        samples.extend(
            int(8000 * math.sin(2 * math.pi * freq * (base + i) / rate))
            for i in range(perChar)
        )
    if sys.byteorder != "little":
        samples.byteswap()
    data = samples.tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return header + b"data" + struct.pack("<I", len(data)) + data


def makePng(seed: str, width: int, height: int) -> bytes:
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    rows = []
    for y in range(height):
        shade = digest[y % 32]
        pixel = bytes((digest[0] ^ shade, digest[1], digest[2] ^ (y & 0xFF)))
        rows.append(b"\x00" + pixel * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


class Part:
    def __init__(self, name, filename, contentType, data: bytes) -> None:
        self.name = name
        self.filename = filename
        self.contentType = contentType
        self.data = data


def formFields(parts: list) -> dict:
    """The text fields of a multipart body (its parts that are not files)."""
    return {p.name: p.data.decode("utf-8", "replace") for p in parts if p.filename is None}


def _dispositionParam(header: str, key: str):
    m = re.search(
        r"(?:^|;)\s*" + key + r'\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))',
        header,
        re.IGNORECASE,
    )
    if not m:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def parseMultipart(body: bytes, contentType: str):
    """Parse multipart/form-data byte for byte; None if it is malformed."""
    m = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', contentType, re.IGNORECASE)
    if not m:
        return None
    boundary = (m.group(1) or m.group(2)).encode("latin-1")
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary)
    if len(pieces) < 2:
        return None
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            return parts
        lineEnd = piece.find(b"\r\n")
        if lineEnd < 0 or piece[:lineEnd].strip(b" \t"):
            return None
        piece = piece[lineEnd + 2 :]
        if piece.startswith(b"\r\n"):
            rawHeaders, data = b"", piece[2:]
        else:
            split = piece.find(b"\r\n\r\n")
            if split < 0:
                return None
            rawHeaders, data = piece[:split], piece[split + 4 :]
        headers = {}
        for line in rawHeaders.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        parts.append(
            Part(
                _dispositionParam(disposition, "name"),
                _dispositionParam(disposition, "filename"),
                headers.get("content-type"),
                data,
            )
        )
    return None


class MediapipeError(Exception):
    """A calculator rejected the request: 400 "Mediapipe execution failed"."""


def _noNaN(value):
    raise ValueError(f"invalid constant {value}")


def parseJson(body: bytes):
    """rapidjson-like: strict UTF-8, no NaN/Infinity."""
    return json.loads(body.decode("utf-8"), parse_constant=_noNaN)


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------
# The server


class FakeOVMS:
    def __init__(self, settings: dict, argv: list, log: Log) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.settings = settings
        self.argv = argv
        self.log = log
        self.servables: dict = {}
        self.startupDone = False
        self.startedAt = time.time()
        self.frameDelay = float(os.environ.get("FAKE_OVMS_FRAME_DELAY", "0.005"))
        self.taskKServe = os.environ.get("FAKE_OVMS_TASK_KSERVE", "1") != "0"
        self.badPathStays = os.environ.get("FAKE_OVMS_BAD_PATH", "") == "stay"
        self.devices = [
            d.strip()
            for d in os.environ.get("FAKE_OVMS_DEVICES", "CPU").split(",")
            if d.strip()
        ]
        self.loadDelay, self.loadDelays = _envTable("FAKE_OVMS_LOAD_DELAY", "0.05")
        failLoad = os.environ.get("FAKE_OVMS_FAIL_LOAD", "")
        self.failAll = failLoad in ("1", "true", "yes", "*")
        self.failNames = (
            set()
            if self.failAll
            else {n.strip() for n in failLoad.split(",") if n.strip()}
        )
        self.apiKey = settings.get("api_key", "")
        self.counters: dict = {}
        self.completionCounter = 0

    # -- start-up ---------------------------------------------------------

    def start(self, sockets: dict) -> None:
        """Serve on the sockets bindEarly() bound, then load the servables."""
        from twisted.internet import protocol
        from twisted.web import server

        if "rest" in sockets:
            site = server.Site(_makeResource(self))
            site.noisy = False
            site.log = lambda request: None
            self._adopt(sockets["rest"], site)
        if "grpc" in sockets:
            factory = protocol.Factory.forProtocol(protocol.Protocol)
            factory.noisy = False
            self._adopt(sockets["grpc"], factory)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shuttingDown)
        self.reactor.callLater(0, self._startServableManager)

    def _adopt(self, sock: socket.socket, factory) -> None:
        self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        sock.close()  # the reactor holds its own duplicate

    def _shuttingDown(self) -> None:
        self.log("INFO", "server.cpp:541", "Shutting down")
        self.log("INFO", "server.cpp:546", "Shutdown")

    def _fatal(self, *messages: tuple) -> None:
        for where, message in messages:
            self.log("ERROR", where, message)
        self.exitCode = EX_FAILURE
        if self.reactor.running:
            self.reactor.callLater(0.01, self.reactor.stop)

    def _usageFatal(self, where: str, message: str) -> None:
        """A usage error found at model start, after REST is bound: exit 64."""
        self.log("ERROR", where, message)
        self.exitCode = EX_USAGE
        if self.reactor.running:
            self.reactor.callLater(0.01, self.reactor.stop)

    def _startServableManager(self) -> None:
        s = self.settings
        mode = s["mode"]
        if s.get("config_path"):
            servables = self._readConfig(s["config_path"])
            if servables is None:
                self._fatal(
                    ("servablemanagermodule.cpp:49", "Couldn't start model manager")
                )
                return
        else:
            name = s["model_name"]
            path = s["model_path"]
            if mode in ("pull_and_start",) and not os.path.isdir(path):
                self.log(
                    "INFO",
                    "hf_pull_model_module.cpp:160",
                    f"Downloading model: {s['source_model']} to: {path}",
                )
                self._fatal(
                    (
                        "libgit2.cpp:412",
                        "Libgit2 clone error: 6 message: could not resolve host: huggingface.co (fake OVMS is offline)",
                    ),
                    (
                        "hf_pull_model_module.cpp:181",
                        f"Error during model download: {s['source_model']}",
                    ),
                )
                return
            if not os.path.isdir(path) and not self.badPathStays:
                self._fatal(
                    (
                        "modelmanager.cpp:1250",
                        f"Error: The provided base path is invalid or doesn't exists: {path}",
                    ),
                    ("servablemanagermodule.cpp:49", "Couldn't start model manager"),
                )
                return
            ownGraph = s["task"] is None and os.path.exists(
                os.path.join(path, "graph.pbtxt")
            )
            if s["task"] is not None or ownGraph:
                refused = [k for k in GRAPH_REFUSED_SETTINGS if s.get(k) is not None]
                if ownGraph and s.get("target_device") is not None:
                    refused.append("target_device")
                if refused:
                    self._usageFatal(
                        "modelmanager.cpp:245",
                        "Starting mediapipe graph with unsupported model settings: "
                        + "".join(k + ", " for k in refused)
                        + "The settings should be set in subconfig.json file.",
                    )
                    return
            if s["task"] is not None:
                servable = Servable(name, "graph", path, s["task"], origin="task")
            elif os.path.exists(os.path.join(path, "graph.pbtxt")):
                servable = Servable(
                    name,
                    "graph",
                    path,
                    _taskFromGraph(os.path.join(path, "graph.pbtxt")),
                )
            else:
                servable = Servable(name, "classic", path)
                shape = _parseShape(s.get("shape"), s.get("batch_size"))
                if shape is None:
                    servable.failure = (
                        "SHAPE_WRONG_FORMAT",
                        "The provided shape is in wrong format",
                    )
                else:
                    servable.inputShape = shape
            if not os.path.isdir(path):
                servable.failure = (
                    "PATH_INVALID",
                    f"The provided base path is invalid or doesn't exists: {path}",
                )
            servable.targetDevice = s.get("target_device")
            servables = [servable]
        for servable in servables:
            self._addServable(servable)
        self._checkStartup()

    def _readConfig(self, configPath: str):
        self.log(
            "INFO",
            "modelmanager.cpp:156",
            f"Loading configuration from {configPath} for: 1 time",
        )
        if os.path.isdir(configPath):
            configPath = os.path.join(configPath, "config.json")
        try:
            with open(configPath, "rb") as f:
                config = parseJson(f.read())
        except OSError:
            self.log(
                "ERROR",
                "modelmanager.cpp:721",
                f"Configuration file is invalid {configPath}",
            )
            return None
        except ValueError:
            self.log(
                "ERROR",
                "schema.cpp:552",
                "Configuration file is not a valid JSON file.",
            )
            return None
        if (
            not isinstance(config, dict)
            or not isinstance(config.get("model_config_list", []), list)
            or not isinstance(config.get("mediapipe_config_list", []), list)
        ):
            self.log(
                "ERROR",
                "schema.cpp:560",
                "Configuration file is not in valid configuration format",
            )
            return None
        base = os.path.dirname(os.path.abspath(configPath))
        servables = []
        for entry in config.get("model_config_list", []):
            model = entry.get("config") if isinstance(entry, dict) else None
            if (
                not isinstance(model, dict)
                or not isinstance(model.get("name"), str)
                or not isinstance(model.get("base_path"), str)
            ):
                self.log(
                    "ERROR",
                    "schema.cpp:560",
                    "Configuration file is not in valid configuration format",
                )
                return None
            path = os.path.join(base, model["base_path"])
            if os.path.exists(os.path.join(path, "graph.pbtxt")):
                servable = Servable(
                    model["name"],
                    "graph",
                    path,
                    _taskFromGraph(os.path.join(path, "graph.pbtxt")),
                )
            else:
                servable = Servable(model["name"], "classic", path)
                shape = model.get("shape")
                shape = _parseShape(
                    shape
                    if isinstance(shape, str)
                    else json.dumps(shape)
                    if shape
                    else None,
                    str(model.get("batch_size") or "") or None,
                )
                if shape is None:
                    servable.failure = (
                        "SHAPE_WRONG_FORMAT",
                        "The provided shape is in wrong format",
                    )
                else:
                    servable.inputShape = shape
            servable.targetDevice = model.get("target_device")
            if not os.path.isdir(path):
                servable.failure = (
                    "PATH_INVALID",
                    f"The provided base path is invalid or doesn't exists: {path}",
                )
            servables.append(servable)
        for graph in config.get("mediapipe_config_list", []):
            if not isinstance(graph, dict) or not isinstance(graph.get("name"), str):
                self.log(
                    "ERROR",
                    "schema.cpp:560",
                    "Configuration file is not in valid configuration format",
                )
                return None
            path = os.path.join(base, graph.get("base_path") or graph["name"])
            graphFile = os.path.join(path, graph.get("graph_path") or "graph.pbtxt")
            servable = Servable(graph["name"], "graph", path, _taskFromGraph(graphFile))
            if not os.path.exists(graphFile):
                servable.failure = (
                    "FILE_INVALID",
                    f"Failed to open graph file: {graphFile}",
                )
            servables.append(servable)
        return servables

    def _addServable(self, servable: Servable) -> None:
        self.servables[servable.name] = servable
        servable.state = "LOADING"
        if servable.kind == "classic":
            self._checkClassicFiles(servable)
            self.log(
                "INFO", "modelmanager.cpp:680", f"Configuring model: {servable.name}"
            )
        else:
            self.log(
                "INFO",
                "mediapipegraphdefinition.cpp:421",
                f"MediapipeGraphDefinition initializing graph nodes: {servable.name}",
            )
        device = servable.targetDevice
        if device and servable.failure is None and not self._deviceExists(device):
            servable.failure = (
                "CANNOT_COMPILE_MODEL_INTO_TARGET_DEVICE",
                f"Cannot compile model into target device; device: {device}",
            )
        if self.failAll or servable.name in self.failNames:
            servable.failure = servable.failure or (
                "FAKE_OVMS_FAIL_LOAD",
                "Error while loading a model",
            )
        delay = float(self.loadDelays.get(servable.name, self.loadDelay))
        self.reactor.callLater(delay, self._finishLoad, servable)

    def _deviceExists(self, device: str) -> bool:
        if device.startswith(("AUTO", "HETERO", "MULTI")):
            listed = [d for d in re.split(r"[:,]", device)[1:] if d]
            return (
                any(d.split(".")[0] in self.devices for d in listed) if listed else True
            )
        return device.split(".")[0] in self.devices

    def _checkClassicFiles(self, servable: Servable) -> None:
        if servable.failure is not None or not os.path.isdir(servable.path):
            return
        versions = sorted(
            int(d)
            for d in os.listdir(servable.path)
            if d.isdigit() and os.path.isdir(os.path.join(servable.path, d))
        )
        if not versions:
            self.log(
                "WARNING",
                "model.cpp:112",
                f"No version found for model in path: {servable.path}",
            )
            servable.versions = []
            return
        servable.versions = [versions[-1]]
        servable.version = versions[-1]
        versionDir = os.path.join(servable.path, str(servable.version))
        if not any(f.endswith(MODEL_FILE_SUFFIXES) for f in os.listdir(versionDir)):
            servable.failure = (
                "FILE_INVALID",
                f"Could not find file for model: {servable.name} version: {servable.version} in path: {versionDir}",
            )

    def _finishLoad(self, servable: Servable) -> None:
        if self.servables.get(servable.name) is not servable:
            return
        servable.loadFinished = True
        if servable.kind == "classic" and not servable.versions:
            servable.failure = servable.failure or ("NO_VERSION", "No version found")
        if servable.failure is not None:
            _code, message = servable.failure
            if servable.kind == "graph":
                servable.errorCode = "FAILED_PRECONDITION"
                self.log(
                    "ERROR",
                    "mediapipegraphdefinition.cpp:144",
                    f"Failed to validate graph {servable.name}: {message}",
                )
                self.log(
                    "INFO",
                    "pipelinedefinitionstatus.hpp:60",
                    f"Mediapipe: {servable.name} state changed to: LOADING_PRECONDITION_FAILED after handling: ValidationFailedEvent:",
                    logger="modelmanager",
                )
                if not self.settings.get("config_path") and not self.badPathStays:
                    # Single-model graph mode (--task, pull-and-start, or a
                    # graph.pbtxt): the load error comes back out of
                    # ServableManager start and the server exits 1
                    # (modelmanager.cpp); only --config_path mode stays up.
                    servable.state = "LOADING"
                    self._fatal(
                        ("servablemanagermodule.cpp:49", "Couldn't start model manager")
                    )
                    return
            elif servable.versions:
                servable.errorCode = "UNKNOWN"
                self.log("ERROR", "modelinstance.cpp:1181", message)
                self.log(
                    "INFO",
                    "modelversionstatus.cpp:155",
                    f"STATUS CHANGE: Version {servable.version} of model {servable.name} status change. "
                    'New status: ( "state": "LOADING", "error_code": "UNKNOWN" )',
                    logger="modelmanager",
                )
                self.log(
                    "ERROR",
                    "model.cpp:172",
                    f"Error occurred while loading model: {servable.name}; version: {servable.version}; error: {message}",
                )
            servable.state = "LOADING"
        else:
            servable.state = "AVAILABLE"
            servable.created = int(time.time())
            if servable.kind == "graph":
                self.log(
                    "INFO",
                    "pipelinedefinitionstatus.hpp:60",
                    f"Mediapipe: {servable.name} state changed to: AVAILABLE after handling: ValidationPassedEvent:",
                    logger="modelmanager",
                )
            else:
                self.log(
                    "INFO",
                    "modelversionstatus.cpp:155",
                    f"STATUS CHANGE: Version {servable.version} of model {servable.name} status change. "
                    'New status: ( "state": "AVAILABLE", "error_code": "OK" )',
                    logger="modelmanager",
                )
        self._checkStartup()

    def _checkStartup(self) -> None:
        """/v2/health/ready turns 200 once every start-up servable was processed."""
        if self.startupDone or not all(s.loadFinished for s in self.servables.values()):
            return
        self.startupDone = True
        self.log(
            "INFO", "servablemanagermodule.cpp:55", "ServableManagerModule started"
        )

    # -- lookups ------------------------------------------------------------

    def kserveServable(self, name: str):
        servable = self.servables.get(name)
        if (
            servable is None
            or not servable.registered
            or servable.kind == "graph"
            and servable.origin == "task"
            and not self.taskKServe
        ):
            return None
        return servable

    def graph(self, name: str):
        servable = self.servables.get(name)
        if servable is None or servable.kind != "graph" or not servable.registered:
            return None
        return servable

    def configStatus(self) -> str:
        names = sorted(n for n, s in self.servables.items() if s.registered)
        if not names:
            return "{}"
        out = "{\n"
        first = True
        for name in names:
            servable = self.servables[name]
            if not first:
                out += ",\n"
            first = False
            out += (
                json.dumps(name, ensure_ascii=False)
                + ' : \n{\n "model_version_status": ['
            )
            if not servable.versions:
                out += "]\n}"
                continue
            message = servable.errorCode
            out += "\n  {\n"
            out += f'   "version": "{servable.version}",\n'
            out += f'   "state": "{servable.state}",\n'
            out += '   "status": {\n'
            out += f'    "error_code": "{servable.errorCode}",\n'
            out += f'    "error_message": "{message}"\n'
            out += "   }\n"
            out += "  }"
            out += "\n ]\n}"
        return out + "\n}"

    def count(self, name: str, servable: str, api: str, method: str) -> None:
        key = (name, servable, api, method)
        self.counters[key] = self.counters.get(key, 0) + 1

    def metrics(self) -> str:
        lines = [
            "# HELP ovms_requests_success Number of successful requests to a model or a DAG.",
            "# TYPE ovms_requests_success counter",
        ]
        for (name, servable, api, method), value in sorted(self.counters.items()):
            if name == "ovms_requests_success":
                lines.append(
                    f'ovms_requests_success{{api="{api}",interface="REST",method="{method}",name="{servable}"}} {value}'
                )
        lines += [
            "# HELP ovms_requests_fail Number of failed requests to a model or a DAG.",
            "# TYPE ovms_requests_fail counter",
        ]
        for (name, servable, api, method), value in sorted(self.counters.items()):
            if name == "ovms_requests_fail":
                lines.append(
                    f'ovms_requests_fail{{api="{api}",interface="REST",method="{method}",name="{servable}"}} {value}'
                )
        lines += [
            "# HELP ovms_streams Number of OpenVINO execution streams.",
            "# TYPE ovms_streams gauge",
        ]
        for name in sorted(self.servables):
            if self.servables[name].available:
                lines.append(
                    f'ovms_streams{{name="{name}",version="{self.servables[name].version}"}} 1'
                )
        return "\n".join(lines) + "\n"


def _listen(address: str, port: int) -> socket.socket:
    if ":" not in address and not all(c.isdigit() or c == "." for c in address):
        address = socket.gethostbyname(address)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bindEarly(settings: dict, argv: list, log: Log, devices: list) -> dict:
    """
    Log OVMS's start-up lines and bind gRPC and REST like OVMS does before it
    loads any model.  This happens before Twisted is imported, so that the
    port answers within a few tens of milliseconds; the reactor adopts the
    sockets later.  Exits 1 if a port cannot be bound.
    """
    s = settings
    log("INFO", "server.cpp:91", f"OpenVINO Model Server {VERSION}-fake")
    log("INFO", "server.cpp:92", f"OpenVINO backend {OPENVINO_VERSION}")
    log("INFO", "server.cpp:93", "Fake OVMS argv: " + json.dumps(argv))
    log(
        "DEBUG",
        "server.cpp:94",
        "CLI parameters passed to ovms server: " + " ".join(argv),
    )
    log("INFO", "pythoninterpretermodule.cpp:37", "PythonInterpreterModule starting")
    log(
        "INFO",
        "systeminfo.cpp:38",
        "Available devices for Open VINO: " + ", ".join(devices),
    )
    metrics = (
        "Started metrics module"
        if s.get("metrics_enable")
        else "Metrics module disabled"
    )
    log("INFO", "server.cpp:354", metrics)
    sockets = {}
    try:
        if s["port"]:
            try:
                sockets["grpc"] = _listen(s["grpc_bind_address"], s["port"])
            except OSError as e:
                log(
                    "ERROR",
                    "grpcservermodule.cpp:226",
                    f"Failed to start gRPC server on port {s['port']}: {e}",
                )
                raise SystemExit(EX_FAILURE) from None
            log(
                "INFO",
                "grpcservermodule.cpp:231",
                f"Started gRPC server on port {s['port']}",
            )
        else:
            log(
                "INFO",
                "grpcservermodule.cpp:209",
                "Port was not set. GRPC server will not be started.",
            )
        log("INFO", "grpcservermodule.cpp:235", "GRPCServerModule started")
        if s["rest_port"]:
            address, port = s["rest_bind_address"], s["rest_port"]
            workers = s.get("rest_workers") or os.cpu_count() or 1
            log(
                "INFO",
                "httpservermodule.cpp:47",
                f"Binding REST server to address: {address}:{port}",
            )
            try:
                sockets["rest"] = _listen(address, port)
            except OSError as e:
                log(
                    "ERROR",
                    "http_server.cpp:370",
                    f"Failed to start REST server at {address}:{port}: {e}",
                )
                log("ERROR", "server.cpp:404", "Failed to start HTTP server")
                raise SystemExit(EX_FAILURE) from None
            log(
                "INFO",
                "drogon_http_server.cpp:145",
                f"REST server listening on port {port} with {workers} unary threads and {workers} streaming threads",
            )
            log(
                "INFO",
                "httpservermodule.cpp:62",
                f"Started REST server at {address}:{port}",
            )
    except SystemExit:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


# ---------------------------------------------------------------------------
# HTTP


def _makeResource(ovms: FakeOVMS):
    from twisted.web import resource
    from twisted.web.server import NOT_DONE_YET

    class Handler(resource.Resource):
        isLeaf = True

        def render(self, request):
            try:
                return Request(ovms, request, NOT_DONE_YET).dispatch()
            except Exception:  # noqa: BLE001 - answer 500 like OVMS, keep serving
                import traceback

                ovms.log(
                    "ERROR",
                    "http_server.cpp:240",
                    "Exception caught in REST request handler: "
                    + traceback.format_exc().replace("\n", " | "),
                )
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"application/json")
                return dumps({"error": "Internal server error"})

    return Handler()


V1_ALIASES = re.compile(r"/v1/(?!config(?:/reload)?$)(.+)")


class Request:
    """One REST request: route it and answer like OVMS's http_rest_api_handler."""

    def __init__(self, ovms: FakeOVMS, request, notDoneYet) -> None:
        self.ovms = ovms
        self.request = request
        self.NOT_DONE_YET = notDoneYet
        self.gone = False
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, _):
        self.gone = True

    # -- replies ------------------------------------------------------------

    def reply(
        self, code: int, body: bytes = b"", contentType: str = "application/json"
    ) -> bytes:
        self.request.setResponseCode(code)
        self.request.setHeader(b"content-type", contentType.encode("latin-1"))
        return body

    def error(self, code: int, message: str) -> bytes:
        if code >= 300:
            self.ovms.log(
                "DEBUG",
                "http_server.cpp:298",
                f"Processing HTTP/REST request failed: {self.method} {self.path}. Reason: {message}",
            )
        return self.reply(code, dumps({"error": message}))

    def later(
        self, code: int, body: bytes, contentType: str = "application/json"
    ) -> None:
        if self.gone:
            return
        self.request.setResponseCode(code)
        self.request.setHeader(b"content-type", contentType.encode("latin-1"))
        self.request.setHeader(b"content-length", str(len(body)).encode())
        self.request.write(body)
        self.request.finish()

    def laterError(self, code: int, message: str) -> None:
        self.later(code, dumps({"error": message}))

    # -- routing ------------------------------------------------------------

    def dispatch(self):
        request = self.request
        self.method = request.method.decode("latin-1")
        self.path = request.path.decode("latin-1")
        self.body = request.content.read() if request.content is not None else b""
        ovms = self.ovms
        ovms.log(
            "DEBUG",
            "http_server.cpp:212",
            f"Processing HTTP request: {self.method} {self.path} body: {len(self.body)} bytes",
        )
        path = self.path
        if ".." in path.split("/"):
            return self.error(
                400, "The provided base path is invalid or doesn't exists"
            )
        if self.method not in ("GET", "POST"):
            return self.error(406, "Unsupported method")
        v3 = self.v3Endpoint(path)
        if (
            v3 is not None
            and self.method == "POST"
            and ovms.apiKey
            and request.getHeader("authorization") != "Bearer " + ovms.apiKey
        ):
            # Checked in the OpenAI POST handler only, before the body is
            # parsed; UNAUTHORIZED is unmapped, hence 500.
            return self.error(500, MSG_UNAUTHORIZED)
        m = re.fullmatch(
            r"/v2/models/([^/]+)(?:/versions/([0-9]+))?/(ready|infer)", path
        )
        if m:
            name, version, action = _unquote(m.group(1)), m.group(2), m.group(3)
            if action == "ready":
                return (
                    self.modelReady(name, version)
                    if self.method == "GET"
                    else self.error(406, "Unsupported method")
                )
            return (
                self.infer(name, version)
                if self.method == "POST"
                else self.error(406, "Unsupported method")
            )
        m = re.fullmatch(r"/v2/models/([^/]+)(?:/versions/([0-9]+))?/?", path)
        if m:
            if self.method != "GET":
                return self.error(406, "Unsupported method")
            return self.modelMetadata(_unquote(m.group(1)), m.group(2))
        simpleGets = {
            "/v2/health/live": self.live,
            "/v2/health/ready": self.ready,
            "/v2": self.serverMetadata,
            "/v1/config": self.config,
            "/metrics": self.metrics,
        }
        if path in simpleGets:
            return (
                simpleGets[path]()
                if self.method == "GET"
                else self.error(406, "Unsupported method")
            )
        if path == "/v1/config/reload":
            return (
                self.reload()
                if self.method == "POST"
                else self.error(406, "Unsupported method")
            )
        if v3 is not None:
            if self.method == "GET":
                if v3 in ("models", "v1/models"):
                    return self.listModels()
                m = re.fullmatch(r"(?:v1/)?models/(.+)", v3)
                if m:
                    return self.retrieveModel(_unquote(m.group(1)))
                return self.error(400, MSG_INVALID_URL)
            return self.v3(v3)
        return self.error(400, MSG_INVALID_URL)

    @staticmethod
    def v3Endpoint(path: str):
        if path.startswith("/v3/"):
            return path[4:]
        m = V1_ALIASES.fullmatch(path)
        return m.group(1) if m else None

    # -- KServe -----------------------------------------------------------------

    def live(self):
        return self.reply(200)

    def ready(self):
        if self.ovms.startupDone:
            return self.reply(200)
        return self.error(503, "Server is not ready")

    def serverMetadata(self):
        return self.reply(
            200, dumps({"name": "OpenVINO Model Server", "version": VERSION})
        )

    def _versionCheck(self, servable: Servable, version):
        if (
            version is not None
            and servable.kind == "classic"
            and int(version) not in servable.versions
        ):
            return MSG_VERSION_MISSING
        if servable.kind == "classic" and not servable.versions:
            return MSG_VERSION_MISSING
        return None

    def modelReady(self, name: str, version):
        servable = self.ovms.kserveServable(name)
        if servable is None:
            return self.error(404, MSG_NAME_MISSING)
        problem = self._versionCheck(servable, version)
        if problem:
            return self.error(404, problem)
        if not servable.available:
            return self.error(404, MSG_NOT_LOADED_YET)
        self.ovms.count("ovms_requests_success", name, "KServe", "ModelReady")
        return self.reply(200)

    def modelMetadata(self, name: str, version):
        servable = self.ovms.kserveServable(name)
        if servable is None:
            return self.error(404, MSG_NAME_MISSING)
        problem = self._versionCheck(servable, version)
        if problem:
            return self.error(404, problem)
        if not servable.available:
            return self.error(
                500 if servable.kind == "graph" else 404,
                MSG_MP_NOT_LOADED if servable.kind == "graph" else MSG_NOT_LOADED_YET,
            )
        if servable.kind == "graph":
            inputs = [{"name": "input", "datatype": "INVALID", "shape": []}]
            outputs = [{"name": "output", "datatype": "INVALID", "shape": []}]
        else:
            inputs = [
                {"name": "input", "datatype": "FP32", "shape": servable.inputShape}
            ]
            outputs = [
                {
                    "name": "output",
                    "datatype": "FP32",
                    "shape": [servable.inputShape[0], 10],
                }
            ]
        self.ovms.count("ovms_requests_success", name, "KServe", "ModelMetadata")
        body = {
            "name": name,
            "versions": [str(servable.version)],
            "platform": "OpenVINO",
            "inputs": inputs,
            "outputs": outputs,
        }
        return self.reply(200, dumps(body))

    def infer(self, name: str, version):
        servable = self.ovms.kserveServable(name)
        if servable is None:
            return self.error(404, MSG_NAME_MISSING)
        problem = self._versionCheck(servable, version)
        if problem:
            return self.error(404, problem)
        if servable.kind == "graph":
            return self.whenLoaded(
                servable,
                lambda: self.laterError(
                    400,
                    self.mpMessage(
                        servable, "KServe inference is not supported by this graph"
                    ),
                ),
            )
        if not servable.available:
            return self.error(404, MSG_NOT_LOADED_YET)
        try:
            doc = parseJson(self.body)
        except ValueError:
            return self.error(412, "The file is not valid json")
        if not isinstance(doc, dict):
            return self.error(400, "Request body should be JSON object")
        if "id" in doc and not isinstance(doc["id"], str):
            return self.error(400, "Could not parse request parameters")
        inputs = doc.get("inputs")
        if inputs is None:
            return self.error(400, "Invalid JSON structure, missing inputs")
        if not isinstance(inputs, list):
            return self.error(
                400, "Could not parse input content. Not valid ndarray detected"
            )
        if not inputs:
            return self.error(400, "Invalid JSON structure, missing inputs")
        for item in inputs:
            if not isinstance(item, dict):
                return self.error(
                    400, "Invalid JSON structure. One of inputs is not a JSON object."
                )
            if not isinstance(item.get("name"), str) or not isinstance(
                item.get("datatype"), str
            ):
                return self.error(
                    400, "Could not parse input content. Not valid ndarray detected"
                )
            shape = item.get("shape")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in shape
            ):
                return self.error(
                    400, "Could not parse input content. Not valid ndarray detected"
                )
            if "data" in item and not isinstance(item["data"], list):
                return self.error(
                    400, "Could not parse input content. Not valid ndarray detected"
                )
        if len(inputs) != 1:
            self.ovms.count("ovms_requests_fail", name, "KServe", "ModelInfer")
            return self.error(
                400, f"Invalid number of inputs - Expected: 1; Actual: {len(inputs)}"
            )
        tensor = inputs[0]
        if tensor["name"] != "input":
            return self.error(
                400, "Missing input with specific name - Required input: input"
            )
        if tensor["datatype"] != "FP32":
            return self.error(
                400,
                f"Invalid input precision - Expected: FP32; Actual: {tensor['datatype']}",
            )
        expected = servable.inputShape
        actual = tensor["shape"]
        if len(actual) != len(expected) or any(
            e != -1 and e != a for e, a in zip(expected, actual)
        ):
            return self.error(
                400,
                f"Invalid input shape - Expected: {_shapeText(expected)}; Actual: {_shapeText(actual)}",
            )
        data = _flatten(tensor.get("data", []))
        if data is None:
            return self.error(
                400, "Could not parse input content. Not valid ndarray detected"
            )
        total = 1
        for d in actual:
            total *= d
        if len(data) != total:
            return self.error(
                400,
                f"Invalid number of values in tensor proto container - Expected: {total}; Actual: {len(data)}",
            )
        batch = actual[0] if actual else 1
        perRow = total // batch if batch else 0
        out = []
        for row in range(batch):
            values = data[row * perRow : (row + 1) * perRow]
            out += [
                round(
                    sum(values[j] for j in range(k, len(values), 10)) * 0.5 + k * 0.001,
                    6,
                )
                for k in range(10)
            ]
        body = {"model_name": name, "model_version": str(servable.version)}
        if "id" in doc:
            body["id"] = doc["id"]
        body["outputs"] = [
            {"name": "output", "shape": [batch, 10], "datatype": "FP32", "data": out}
        ]
        self.ovms.count("ovms_requests_success", name, "KServe", "ModelInfer")
        return self.reply(200, dumps(body))

    # -- config, metrics ---------------------------------------------------

    def config(self):
        return self.reply(200, self.ovms.configStatus().encode("utf-8"))

    def reload(self):
        ovms = self.ovms
        configPath = ovms.settings.get("config_path")
        if configPath:
            servables = ovms._readConfig(configPath)
            if servables is None:
                return self.reply(
                    500,
                    b'{\n\t"error": "Reloading config file failed. Check server logs for more info."\n}',
                )
            for servable in servables:
                if servable.name not in ovms.servables:
                    ovms._addServable(servable)
        return self.reply(200, ovms.configStatus().encode("utf-8"))

    def metrics(self):
        if not self.ovms.settings.get("metrics_enable"):
            return self.error(400, MSG_INVALID_URL)
        return self.reply(
            200, self.ovms.metrics().encode("utf-8"), "text/plain; version=0.0.4"
        )

    # -- OpenAI-style /v3 ---------------------------------------------------

    def listModels(self):
        data = [
            {"id": s.name, "object": "model", "created": s.created, "owned_by": "OVMS"}
            for s in self.ovms.servables.values()
            if s.kind == "graph" and s.available
        ]
        return self.reply(200, dumps({"data": data, "object": "list"}))

    def retrieveModel(self, name: str):
        servable = self.ovms.graph(name)
        if servable is None or not servable.available:
            return self.error(500, "Model not found")
        return self.reply(
            200,
            dumps(
                {
                    "id": servable.name,
                    "object": "model",
                    "created": servable.created,
                    "owned_by": "OVMS",
                }
            ),
        )

    def whenLoaded(self, servable: Servable, proceed):
        """OVMS waits up to 0.5 s for a graph being loaded, then gives up."""
        if servable.available:
            proceed()
            return self.NOT_DONE_YET
        deadline = time.monotonic() + 0.5

        def poll():
            if self.gone:
                return
            if servable.available:
                proceed()
            elif time.monotonic() >= deadline:
                self.laterError(500, MSG_MP_NOT_LOADED)
            else:
                self.ovms.reactor.callLater(0.02, poll)

        self.ovms.reactor.callLater(0.02, poll)
        return self.NOT_DONE_YET

    def mpMessage(self, servable: Servable, message: str) -> str:
        node = TASK_NODES.get(servable.task, "Executor")
        return (
            "Mediapipe execution failed. MP status - INVALID_ARGUMENT: CalculatorGraph::Run() failed: \n"
            f'Calculator::Process() for node "{node}" failed: {message}'
        )

    def v3(self, endpoint: str):
        contentType = self.request.getHeader("content-type") or ""
        uri = "/v3/" + endpoint
        doc = None
        parts = None
        stream = False
        model = ""
        if "multipart/form-data" in contentType:
            parts = parseMultipart(self.body, contentType)
            if parts is None:
                return self.error(500, "Failed to parse multipart content type request")
            fields = [p for p in parts if p.name == "model" and p.filename is None]
            model = fields[0].data.decode("utf-8", "replace") if fields else ""
        elif "application/json" in contentType:
            try:
                doc = parseJson(self.body)
            except ValueError:
                return self.error(412, "Cannot parse JSON body")
            if not isinstance(doc, dict):
                return self.error(412, "JSON body must be an object")
            if "model" not in doc:
                return self.error(412, "model field is missing in JSON body")
            if not isinstance(doc["model"], str):
                return self.error(412, "model field is not a string")
            if (
                "completions" in endpoint or "responses" in endpoint
            ) and "stream" in doc:
                if not isinstance(doc["stream"], bool):
                    return self.error(412, "stream field is not a boolean")
                stream = doc["stream"]
            model = doc["model"]
        if not model:
            model = endpoint  # OVMS falls back to routing by the URI: uri.substr(4)
        servable = self.ovms.graph(model)
        if servable is None:
            return self.error(404, MSG_MP_MISSING)

        def proceed():
            try:
                self.serveV3(servable, endpoint, uri, doc, parts, stream)
            except MediapipeError as e:
                self.ovms.count("ovms_requests_fail", servable.name, "V3", "Unary")
                self.laterError(400, self.mpMessage(servable, str(e)))

        return self.whenLoaded(servable, proceed)

    def serveV3(
        self, servable: Servable, endpoint: str, uri: str, doc, parts, stream: bool
    ) -> None:
        task = servable.task
        endpoint = _taskEndpoint(task, endpoint, uri)
        if endpoint in ("audio/transcriptions", "audio/translations", "images/edits"):
            if parts is None:
                raise MediapipeError("Failed to parse multipart data")
        elif doc is None:
            raise MediapipeError("Failed to parse JSON request")
        handler = {
            "chat/completions": self.chat,
            "completions": self.chat,
            "responses": self.responses,
            "tokenize": self.tokenize,
            "embeddings": self.embeddings,
            "rerank": self.rerank,
            "images/generations": self.images,
            "images/edits": self.imageEdits,
            "audio/transcriptions": self.transcribe,
            "audio/translations": self.transcribe,
            "audio/speech": self.speech,
        }[endpoint]
        handler(servable, endpoint, doc if doc is not None else parts, stream)
        self.ovms.count(
            "ovms_requests_success",
            servable.name,
            "V3",
            "Stream" if stream else "Unary",
        )

    # -- text generation ------------------------------------------------------

    def _generationParams(self, doc: dict, endpoint: str, stream: bool):
        maxTokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
        if maxTokens is not None:
            if (
                not isinstance(maxTokens, int)
                or isinstance(maxTokens, bool)
                or maxTokens < 0
            ):
                raise MediapipeError("max_tokens is not an unsigned integer")
            if maxTokens == 0:
                raise MediapipeError("max_tokens value should be greater than 0")
        options = doc.get("stream_options")
        includeUsage = False
        if options is not None:
            if not stream:
                raise MediapipeError(
                    "stream_options provided, but stream not set to true"
                )
            if not isinstance(options, dict):
                raise MediapipeError("stream_options is not an object")
            includeUsage = options.get("include_usage", False)
            if not isinstance(includeUsage, bool):
                raise MediapipeError("stream_options.include_usage is not a boolean")
        for name in ("temperature", "top_p"):
            if name in doc and (
                not isinstance(doc[name], (int, float)) or isinstance(doc[name], bool)
            ):
                raise MediapipeError(f"{name} is not a valid number")
        if endpoint == "chat/completions":
            messages = doc.get("messages")
            if messages is None:
                raise MediapipeError("Messages missing")
            if not isinstance(messages, list) or not messages:
                raise MediapipeError(
                    "Messages array cannot be empty"
                    if isinstance(messages, list)
                    else "Messages are not an array"
                )
            for message in messages:
                if not isinstance(message, dict) or not isinstance(
                    message.get("role"), str
                ):
                    raise MediapipeError("Every message must be an object with a role")
            prompt = " ".join(_contentText(m.get("content")) for m in messages)
            users = [m for m in messages if m.get("role") == "user"]
            source = _contentText(users[-1].get("content")) if users else prompt
        else:
            prompt = doc.get("prompt")
            if (
                isinstance(prompt, list)
                and len(prompt) == 1
                and isinstance(prompt[0], str)
            ):
                prompt = prompt[0]
            if prompt is None:
                raise MediapipeError("Prompt is missing")
            if not isinstance(prompt, str):
                raise MediapipeError("prompt is not a string")
            source = prompt
        count = maxTokens if maxTokens is not None else 5
        finish = "length" if maxTokens is not None else "stop"
        promptTokens = max(1, len(_words(prompt)))
        return generateTokens(source, count), finish, promptTokens, includeUsage

    def _completionId(self, prefix: str) -> str:
        self.ovms.completionCounter += 1
        return f"{prefix}-{self.ovms.completionCounter}"

    def chat(self, servable: Servable, endpoint: str, doc: dict, stream: bool) -> None:
        tokens, finish, promptTokens, includeUsage = self._generationParams(
            doc, endpoint, stream
        )
        isChat = endpoint == "chat/completions"
        created = int(time.time())
        model = doc["model"]
        usage = {
            "prompt_tokens": promptTokens,
            "completion_tokens": len(tokens),
            "total_tokens": promptTokens + len(tokens),
        }
        ident = self._completionId("chatcmpl" if isChat else "cmpl")
        if not stream:
            text = " ".join(tokens)
            if isChat:
                choice = {
                    "finish_reason": finish,
                    "index": 0,
                    "logprobs": None,
                    "message": {"content": text, "role": "assistant"},
                }
            else:
                choice = {
                    "finish_reason": finish,
                    "index": 0,
                    "logprobs": None,
                    "text": text,
                }
            body = {
                "choices": [choice],
                "created": created,
                "id": ident,
                "model": model,
                "object": "chat.completion" if isChat else "text_completion",
                "usage": usage,
            }
            self.later(200, dumps(body))
            return
        objectName = "chat.completion.chunk" if isChat else "text_completion"
        frames = []
        for i, token in enumerate(tokens):
            piece = token if i == 0 else " " + token
            last = i == len(tokens) - 1
            if isChat:
                delta = {"content": piece}
                if i == 0:
                    delta = {"role": "assistant", "content": piece}
                choice = {
                    "delta": delta,
                    "finish_reason": finish if last else None,
                    "index": 0,
                    "logprobs": None,
                }
            else:
                choice = {
                    "finish_reason": finish if last else None,
                    "index": 0,
                    "logprobs": None,
                    "text": piece,
                }
            frames.append(
                {
                    "choices": [choice],
                    "created": created,
                    "id": ident,
                    "model": model,
                    "object": objectName,
                }
            )
        if includeUsage:
            frames.append(
                {
                    "choices": [],
                    "created": created,
                    "id": ident,
                    "model": model,
                    "object": objectName,
                    "usage": usage,
                }
            )
        self.streamEvents(
            [b"data: " + dumps(f) + b"\n\n" for f in frames] + [b"data: [DONE]\n\n"]
        )

    def responses(
        self, servable: Servable, endpoint: str, doc: dict, stream: bool
    ) -> None:
        """
        openai_responses.cpp: one response object, or (only with a JSON
        ``"stream": true``) ``data:`` frames without ``event:`` lines, each
        event with ``type`` and ``sequence_number``, in OVMS's order, then
        ``data: [DONE]``.
        """
        given = doc.get("input")
        if given is None:
            raise MediapipeError("input field is missing")
        if isinstance(given, str):
            source = given
        elif isinstance(given, list):
            source = " ".join(
                _contentText(item.get("content"))
                for item in given
                if isinstance(item, dict)
            )
        else:
            raise MediapipeError("input is not a string or an array")
        if "stream_options" in doc:
            raise MediapipeError("stream_options is not supported in Responses API.")
        if stream and doc.get("logprobs"):
            raise MediapipeError("logprobs are not supported in streaming mode.")
        maxTokens = doc.get("max_output_tokens")
        if maxTokens is not None and (
            not isinstance(maxTokens, int)
            or isinstance(maxTokens, bool)
            or maxTokens <= 0
        ):
            raise MediapipeError("max_output_tokens is not a positive integer")
        tokens = generateTokens(source, maxTokens or 5)
        # Like chat: a length limit given is a length limit reached.
        incomplete = maxTokens is not None
        inputTokens = max(1, len(_words(source)))
        created = int(time.time())
        ident = f"resp-{created}"
        text = " ".join(tokens)
        part = {"type": "output_text", "text": text, "annotations": []}
        message = {
            "id": "msg-0",
            "type": "message",
            "status": "incomplete" if incomplete else "completed",
            "role": "assistant",
            "content": [part],
        }
        usage = {
            "input_tokens": inputTokens,
            "output_tokens": len(tokens),
            "total_tokens": inputTokens + len(tokens),
        }
        response = {
            "id": ident,
            "object": "response",
            "created_at": created,
            "model": doc["model"],
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_tokens"} if incomplete else None,
            "output": [message],
            "usage": usage,
        }
        if not stream:
            self.later(200, dumps(response))
            return
        pending = dict(response, status="in_progress", output=[], usage=None)
        pending["incomplete_details"] = None
        item = {"item_id": "msg-0", "output_index": 0}
        events = [
            {"type": "response.created", "response": pending},
            {"type": "response.in_progress", "response": pending},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": dict(message, status="in_progress", content=[]),
            },
            {
                "type": "response.content_part.added",
                **item,
                "content_index": 0,
                "part": dict(part, text=""),
            },
        ]
        for i, token in enumerate(tokens):
            events.append(
                {
                    "type": "response.output_text.delta",
                    **item,
                    "content_index": 0,
                    "delta": token if i == 0 else " " + token,
                }
            )
        events += [
            {"type": "response.output_text.done", **item, "content_index": 0, "text": text},
            {"type": "response.content_part.done", **item, "content_index": 0, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": message},
            {
                "type": "response.incomplete" if incomplete else "response.completed",
                "response": response,
            },
        ]
        for number, event in enumerate(events):
            event["sequence_number"] = number
        self.streamEvents(
            [b"data: " + dumps(event) + b"\n\n" for event in events]
            + [b"data: [DONE]\n\n"]
        )

    def tokenize(
        self, servable: Servable, endpoint: str, doc: dict, stream: bool
    ) -> None:
        """
        tokenize_parser.cpp: ``text`` (a string or an array of strings) and
        optional ``max_length`` (implies truncation), ``pad_to_max_length``,
        ``add_special_tokens`` and ``padding_side``.  One text gives a flat
        list of ids, several a list of lists.  The fake's tokens are one per
        word (with no special tokens).
        """
        if "text" not in doc:
            raise MediapipeError("text field is required")
        text = doc["text"]
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts or not all(
            isinstance(t, str) for t in texts
        ):
            raise MediapipeError("Input should be string or array of strings")
        maxLength = doc.get("max_length")
        if maxLength is not None and (
            not isinstance(maxLength, int) or isinstance(maxLength, bool) or maxLength <= 0
        ):
            raise MediapipeError("max_length should be unsigned integer greater than 0")
        for name in ("pad_to_max_length", "add_special_tokens"):
            if name in doc and not isinstance(doc[name], bool):
                raise MediapipeError(f"{name} should be boolean")
        side = doc.get("padding_side", "right")
        if side not in ("left", "right"):
            raise MediapipeError("padding_side should be either left or right")
        result = []
        for one in texts:
            ids = [
                int.from_bytes(hashlib.sha256(w.encode()).digest()[:2], "big") or 1
                for w in _words(one)
            ]
            if maxLength is not None:
                ids = ids[:maxLength]
                if doc.get("pad_to_max_length"):
                    padding = [0] * (maxLength - len(ids))
                    ids = padding + ids if side == "left" else ids + padding
            result.append(ids)
        self.later(200, dumps({"tokens": result[0] if len(result) == 1 else result}))

    def streamEvents(self, events: list) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        pending = list(events)

        def step():
            if self.gone:
                return
            request.write(pending.pop(0))
            if pending:
                self.ovms.reactor.callLater(self.ovms.frameDelay, step)
            else:
                request.finish()

        step()

    # -- embeddings, rerank ---------------------------------------------------

    def embeddings(
        self, servable: Servable, endpoint: str, doc: dict, stream: bool
    ) -> None:
        given = doc.get("input")
        if given is None:
            raise MediapipeError("input field is required")
        if isinstance(given, str):
            texts = [given]
        elif (
            isinstance(given, list) and given and all(isinstance(t, str) for t in given)
        ):
            texts = given
        elif (
            isinstance(given, list)
            and given
            and all(isinstance(t, int) and not isinstance(t, bool) for t in given)
        ):
            texts = [json.dumps(given)]
        elif (
            isinstance(given, list)
            and given
            and all(isinstance(t, list) for t in given)
        ):
            texts = [json.dumps(t) for t in given]
        else:
            raise MediapipeError(
                "input should be string, array of strings or array of integers"
            )
        encoding = doc.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise MediapipeError("encoding_format should either base64 or float")
        data = []
        tokens = 0
        for index, text in enumerate(texts):
            vector = embed(text)
            tokens += max(1, len(_words(text)))
            value = (
                base64.b64encode(struct.pack("<8f", *vector)).decode()
                if encoding == "base64"
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": value})
        body = {
            "object": "list",
            "data": data,
            "model": doc["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        self.later(200, dumps(body))

    def rerank(
        self, servable: Servable, endpoint: str, doc: dict, stream: bool
    ) -> None:
        query = doc.get("query")
        documents = doc.get("documents")
        if not isinstance(query, str):
            raise MediapipeError(
                "query is not a string"
                if query is not None
                else "query field is missing"
            )
        if not isinstance(documents, list) or not all(
            isinstance(d, str) for d in documents
        ):
            raise MediapipeError(
                "documents is not an array of strings"
                if documents is not None
                else "documents field is missing"
            )
        topN = doc.get("top_n", len(documents))
        if not isinstance(topN, int) or isinstance(topN, bool) or topN < 0:
            raise MediapipeError("top_n accepts integer values")
        returnDocuments = doc.get("return_documents", False)
        if not isinstance(returnDocuments, bool):
            raise MediapipeError("return_documents accepts boolean values")
        results = [
            {"index": i, "relevance_score": relevance(query, d)}
            for i, d in enumerate(documents)
        ]
        results.sort(key=lambda r: (-r["relevance_score"], r["index"]))
        results = results[:topN]
        if returnDocuments:
            for r in results:
                r["document"] = {"text": documents[r["index"]]}
        self.later(200, dumps({"results": results}))

    # -- images ---------------------------------------------------------------

    def _imageCommon(self, fields: dict):
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise MediapipeError(
                "prompt field is missing"
                if prompt is None
                else "prompt is not a string"
            )
        n = fields.get("n", 1)
        if isinstance(n, str) and n.isdigit():
            n = int(n)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > 8:
            raise MediapipeError("n field must be an integer between 1 and 8")
        size = fields.get("size", "64x64")
        if not isinstance(size, str) or not re.fullmatch(r"\d+x\d+", size):
            raise MediapipeError("size field is not in the WxH format")
        width, height = (int(v) for v in size.split("x"))
        if not (0 < width <= 4096 and 0 < height <= 4096):
            raise MediapipeError("size exceeds max_resolution")
        fmt = fields.get("response_format", "b64_json")
        if fmt != "b64_json":
            raise MediapipeError("Only b64_json response_format is supported")
        return prompt, n, width, height

    def images(
        self, servable: Servable, endpoint: str, doc: dict, stream: bool
    ) -> None:
        prompt, n, width, height = self._imageCommon(doc)
        self._images(prompt, n, width, height)

    def _images(self, seed: str, n: int, width: int, height: int) -> None:
        """
        Answer C{n} PNG images derived from C{seed}, as OVMS does.
        """
        data = [
            {"b64_json": base64.b64encode(makePng(f"{seed}\0{i}", width, height)).decode()}
            for i in range(n)
        ]
        self.later(200, dumps({"created": int(time.time()), "data": data}))

    def imageEdits(
        self, servable: Servable, endpoint: str, parts: list, stream: bool
    ) -> None:
        """
        imagegenutils.cpp: multipart only; ``prompt`` and one file in a field
        named exactly ``image`` are required, ``mask`` selects inpainting,
        and a field it does not handle is a 400 "Unhandled parameter".
        """
        for part in parts:
            if part.name not in IMAGE_EDIT_FIELDS:
                raise MediapipeError(f"Unhandled parameter: {part.name}")
        fields = formFields(parts)
        images = [p for p in parts if p.name == "image" and p.filename is not None]
        if len(images) != 1 or not images[0].data:
            raise MediapipeError(
                "Image field is missing in multipart body"
                if not images
                else "Expected exactly one image file in the image field"
            )
        masks = [p for p in parts if p.name == "mask" and p.filename is not None]
        if "n" not in fields and "num_images_per_prompt" in fields:
            fields["n"] = fields["num_images_per_prompt"]
        size = fields.get("size")
        if size == "auto" or size is None:
            width = fields.get("width", "64")
            height = fields.get("height", "64")
            if not (str(width).isdigit() and str(height).isdigit()):
                raise MediapipeError("width and height must be positive integers")
            fields["size"] = f"{width}x{height}"
        prompt, n, width, height = self._imageCommon(fields)
        seed = prompt + hashlib.sha256(images[0].data).hexdigest()
        if masks:
            seed += "\0mask" + hashlib.sha256(masks[0].data).hexdigest()
        self._images(seed, n, width, height)

    # -- audio ---------------------------------------------------------------

    def transcribe(
        self, servable: Servable, endpoint: str, parts: list, stream: bool
    ) -> None:
        files = [p for p in parts if p.name == "file"]
        if not files or not files[0].data:
            raise MediapipeError("File parsing fails")
        fields = formFields(parts)
        fmt = fields.get("response_format", "json")
        if fmt not in ("json", "text", "verbose_json"):
            raise MediapipeError(f"response_format {fmt} is not supported")
        data = files[0].data
        kind = "translation" if endpoint.endswith("translations") else "transcription"
        text = f"fake {kind} of {len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}"
        if fmt == "text":
            self.later(200, text.encode("utf-8"), "text/plain")
            return
        body = {"text": text}
        if fmt == "verbose_json":
            body.update(
                {
                    "task": kind,
                    "language": fields.get("language", "en"),
                    "duration": 0.0,
                    "segments": [],
                }
            )
        self.later(200, dumps(body))

    def speech(
        self, servable: Servable, endpoint: str, doc: dict, stream: bool
    ) -> None:
        text = doc.get("input")
        if text is None:
            raise MediapipeError("input field is missing")
        if not isinstance(text, str) or not text:
            raise MediapipeError("input is not a non-empty string")
        fmt = doc.get("response_format", "wav")
        if fmt != "wav":
            raise MediapipeError(f"response_format {fmt} is not supported, only wav")
        voice = doc.get("voice")
        if voice is not None and not isinstance(voice, str):
            raise MediapipeError("voice is not a string")
        self.later(200, makeWav(text), "audio/wav")


def _taskEndpoint(task: str, endpoint: str, uri: str) -> str:
    """
    What a graph's calculator makes of a path (backends.md 3.9): any path
    ending in ``tokenize`` tokenizes on text, embeddings and rerank graphs;
    embeddings and rerank graphs take every other path as their own;
    the others serve their exact paths only.  Raises MediapipeError.
    """
    if endpoint.startswith("v1/"):
        endpoint = endpoint[3:]  # the deprecated /v3/v1/ prefix
    if task in ("text_generation", "embeddings", "rerank") and endpoint.endswith(
        "tokenize"
    ):
        return "tokenize"
    if task in ("embeddings", "rerank"):
        return task
    if endpoint in TASK_ENDPOINTS.get(task, ()):
        return endpoint
    if task == "text_generation":
        raise MediapipeError(
            "Wrong endpoint. Allowed endpoints: /v[13]/chat/completions, /v[13]/completions, "
            "/v[13]/responses, /v[13]/tokenize"
        )
    if task == "image_generation":
        raise MediapipeError(f"Unsupported URI: {uri}")
    raise MediapipeError(f"Unsupported endpoint: {uri}")


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


def _shapeText(shape: list) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _flatten(data):
    out = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(float(item))
        else:
            return None
    return out


# ---------------------------------------------------------------------------


def _pullOrList(settings: dict) -> int:
    if settings["mode"] == "list":
        repository = settings["model_repository_path"]
        print("Listing models in repository...")
        print("Model repository path: " + repository)
        for root, dirs, files in sorted(os.walk(repository)):
            if "graph.pbtxt" in files:
                print(os.path.relpath(root, repository))
        return EX_OK
    target = os.path.join(settings["model_repository_path"], settings["source_model"])
    if os.path.isdir(target) and not settings.get("overwrite_models"):
        sys.stderr.write(
            f"Path already exists on local filesystem. Skipping download to path: {target}\n"
        )
        return EX_OK
    sys.stderr.write(
        f"Error during model download: {settings['source_model']}: could not resolve host: huggingface.co (fake OVMS is offline)\n"
    )
    return EX_FAILURE


def main(argv: list) -> int:
    try:
        settings = parseCommandLine(argv)
    except UsageError as e:
        sys.stderr.write(str(e) + "\n")
        return EX_USAGE
    except Exit as e:
        sys.stdout.write(e.text)
        return e.code
    argvFile = os.environ.get("FAKE_OVMS_ARGV_FILE")
    if argvFile:
        with open(argvFile, "w") as f:
            json.dump({"argv": argv, "pid": os.getpid()}, f)
    if settings["mode"] in ("pull", "list"):
        return _pullOrList(settings)
    # cli_parser.cpp: the first line of --api_key_file, trailing whitespace
    # trimmed; without the flag (or with an empty one), $API_KEY.  An
    # unreadable file is a usage error (server.cpp).
    apiKeyFile = settings.get("api_key_file", "")
    if apiKeyFile:
        try:
            with open(apiKeyFile) as f:
                settings["api_key"] = f.readline().rstrip()
        except OSError:
            sys.stderr.write(
                f'Error reading API key file: Unable to open file : "{apiKeyFile}"\n'
            )
            return EX_USAGE
    else:
        settings["api_key"] = os.environ.get("API_KEY", "")

    log = Log(settings["log_level"], settings.get("log_path"))
    if not settings["api_key"]:
        log(
            "INFO",
            "http_server.cpp:238",
            "API key not provided via --api_key_file or API_KEY environment variable. "
            "Authentication will be disabled.",
        )

    def earlyStop(signum, frame):
        # Twisted replaces the SIGTERM handler once the reactor runs, but
        # keeps a SIGINT handler it did not install itself: stop it here.
        running = sys.modules.get("twisted.internet.reactor")
        if running is not None and running.running:
            running.callFromThread(running.stop)
            return
        log("INFO", "server.cpp:541", "Shutting down")
        os._exit(EX_OK)

    signal.signal(signal.SIGTERM, earlyStop)
    signal.signal(signal.SIGINT, earlyStop)
    devices = [
        d.strip()
        for d in os.environ.get("FAKE_OVMS_DEVICES", "CPU").split(",")
        if d.strip()
    ]
    try:
        sockets = bindEarly(settings, argv, log, devices)
    except SystemExit as e:
        return int(e.code or 0)

    sys.modules.setdefault("OpenSSL", None)  # no TLS here; skips a slow import
    from twisted.internet import reactor

    ovms = FakeOVMS(settings, argv, log)
    ovms.exitCode = EX_OK
    ovms.start(sockets)
    reactor.run()
    return ovms.exitCode


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: exit promptly once stopped
