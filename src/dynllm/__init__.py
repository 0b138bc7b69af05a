# -*- test-case-name: tests.test_service -*-
"""
dynllm: an OpenAI-compatible proxy that runs local inference servers on
demand within a memory budget.

Embedding it in a Twisted program::

    from dynllm import loadConfig, makeService

    service = makeService(loadConfig("dynllm.yaml"))
    service.startService()
    try:
        lease = await service.manager.acquire("my-model")
    except NoCapacity as e:
        ...  # memory is held by busy models; try again in e.retryAfter s
    try:
        ...  # send requests to lease.baseURL with lease.upstreamHeaders
    finally:
        lease.release()

Fakes for testing such a program without processes are in L{dynllm.testing}.
"""

from dynllm._version import __version__
from dynllm.config import Config, ConfigError, ModelConfig, loadConfig, parseConfig
from dynllm.errors import APIError
from dynllm.exceptions import (
    LoadFailed,
    LoadTimedOut,
    ModelBusy,
    NoCapacity,
    SchedulerError,
    ShuttingDown,
    UnknownModel,
)
from dynllm.interfaces import IBackend, IModelManager, IStateStore
from dynllm.lease import Lease, RequestOptions
from dynllm.scheduler import ModelManager
from dynllm.service import DynLLMService, makeService

__all__ = [
    "__version__",
    "APIError",
    "Config",
    "ConfigError",
    "DynLLMService",
    "IBackend",
    "IModelManager",
    "IStateStore",
    "Lease",
    "LoadFailed",
    "LoadTimedOut",
    "ModelBusy",
    "ModelConfig",
    "ModelManager",
    "NoCapacity",
    "RequestOptions",
    "SchedulerError",
    "ShuttingDown",
    "UnknownModel",
    "loadConfig",
    "makeService",
    "parseConfig",
]
