# -*- test-case-name: tests.test_backends -*-
"""
The interfaces of dynllm's public surface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from dynllm.config import ModelConfig


class IBackend(Interface):
    """
    One kind of inference server: how to start it for a model, how to tell
    that it is ready, and where it serves each public endpoint.

    Implementations hold no per-process state; L{dynllm.runner.BackendRun}
    runs one process with the help of one of these.
    """

    kind = Attribute("C{str}: the C{backend} value in the configuration, e.g. C{'llamacpp'}.")
    modelTypes = Attribute("C{tuple} of the C{model_type} values this backend can serve.")
    owned = Attribute(
        "L{dynllm.owned.OwnedSettings}: the launch settings dynllm owns (listen"
        " address, model, served name, API key), in every spelling the backend"
        " accepts; the configuration refuses them in C{extra_args} and C{env}."
    )
    keyVariable = Attribute(
        "C{str} or C{None}: the environment variable the backend reads its API"
        " key from. Each run gets a fresh random key there (never on its command"
        " line, which every local user can read), and dynllm sends it as"
        " C{Authorization: Bearer KEY}. C{None} for a backend without keys."
    )

    def argv(model: ModelConfig, binary: str, port: int) -> list[str]:
        """
        The command line that serves C{model} on 127.0.0.1:C{port}.

        @param model: The L{dynllm.config.ModelConfig}.
        @param binary: The program to run, as configured.
        @param port: The TCP port it must listen on.
        @return: a C{list} of C{str}, program first, C{extra_args} last.
        """

    def environment(model: ModelConfig) -> dict[str, str | None]:
        """
        @return: a C{dict} of variables the backend needs beyond ours, and
            of ours it must not inherit (with the value C{None}: at least
            every variable of L{owned}); the model's C{env} overrides these.
        """

    def probe(http: Any, baseURL: str, model: ModelConfig) -> Deferred[bool]:
        """
        Ask a started backend once whether it is ready to serve C{model}.

        @param http: A C{treq.client.HTTPClient}.
        @param baseURL: C{http://127.0.0.1:PORT}.
        @return: a Deferred firing with C{True} when ready, else C{False}.
        """

    def readyHint(line: str) -> bool:
        """
        @param line: One line the backend printed.
        @return: C{True} if the line suggests it just became ready, so that
            a probe should be sent at once rather than at the next tick.
        """

    def upstreamPath(route: str, model: ModelConfig) -> str | None:
        """
        @param route: The public path, e.g. C{'/v1/chat/completions'}, or
            for the KServe routes the request's own path
            (C{'/v2/models/NAME/infer'}).
        @return: the path on the backend that serves C{route} for C{model},
            or C{None} if this backend does not serve it.
        """

    def upstreamModel(model: ModelConfig) -> str:
        """
        @return: the name the backend knows C{model} by, which requests must
            carry in their C{model} field; when it is not C{model.name},
            requests and responses are renamed on the way (see
            L{dynllm.rewrite}).
        """
