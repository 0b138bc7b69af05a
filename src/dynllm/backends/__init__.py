# -*- test-case-name: tests.test_backends -*-
"""
The backend kinds, one module each, all providing L{dynllm.interfaces.IBackend}.
"""

from __future__ import annotations

from dynllm.backends.command import CommandBackend
from dynllm.backends.llamacpp import LlamaCppBackend
from dynllm.backends.openvino import OpenVINOBackend
from dynllm.backends.transformers import TransformersBackend
from dynllm.interfaces import IBackend


def backendFor(kind: str) -> IBackend:
    """
    @return: the backend for C{kind}, a C{backend} value of the configuration.
    @raise KeyError: for a kind this version cannot run.
    """
    return _BACKENDS[kind]


_BACKENDS: dict[str, IBackend] = {
    "llamacpp": LlamaCppBackend(),
    "openvino": OpenVINOBackend(),
    "transformers": TransformersBackend(),
    "command": CommandBackend(),
}

__all__ = ["backendFor", "CommandBackend", "LlamaCppBackend", "OpenVINOBackend", "TransformersBackend"]
