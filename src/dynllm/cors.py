# -*- test-case-name: tests.test_site -*-
"""
CORS, as the Fetch standard has it
(U{https://fetch.spec.whatwg.org/#http-cors-protocol}): which origins may
call the API from a browser (C{server.cors_origins}), the answer to a
preflight, and the headers every answer to an allowed origin carries.
L{dynllm.site} applies it to every request.
"""

from __future__ import annotations

from typing import Sequence

from attrs import frozen
from twisted.web.http_headers import Headers

#: The methods a preflight is told the API accepts.
ALLOW_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

#: The request headers a preflight allows when it does not ask for any: what
#: the OpenAI and Anthropic SDKs send from a browser.
DEFAULT_ALLOW_HEADERS = (
    b"authorization, content-type, x-api-key, api-key, anthropic-version, anthropic-beta,"
    b" anthropic-dangerous-direct-browser-access, openai-organization, openai-project, openai-beta,"
    b" x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version,"
    b" x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version,"
    b" x-stainless-timeout, x-stainless-helper-method, x-stainless-async,"
    b" x-dynllm-queue-timeout, x-dynllm-priority, x-dynllm-keep-alive"
)

#: Seconds a browser may cache a preflight's answer (Chromium caps it at
#: 7200, Firefox at 86400).
MAX_AGE = b"7200"

#: Response headers scripts may read without being told (Fetch's
#: CORS-safelisted response-header names), and others not worth exposing.
_NOT_EXPOSED = frozenset(
    {
        b"cache-control",
        b"content-language",
        b"content-length",
        b"content-type",
        b"expires",
        b"last-modified",
        b"pragma",
        b"set-cookie",
        b"vary",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
    }
)

#: The characters of an HTTP token (RFC 9110 5.6.2), for header names.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@frozen
class CORSPolicy:
    """
    Which web origins may call the API from a browser.

    @ivar origins: Allowed origins, lower-cased, as C{scheme://host[:port]}
        without a default port (as L{dynllm.config} normalizes
        C{server.cors_origins}); C{*} allows every origin. Empty allows
        none.
    """

    origins: frozenset[str] = frozenset()

    def allowOrigin(self, origin: Sequence[bytes] | None) -> bytes | None:
        """
        @param origin: The request's C{Origin} header values, if any.
        @return: the C{Access-Control-Allow-Origin} value to answer with
            (C{*}, or the origin itself), or C{None} when the request has no
            single C{Origin} or it is not allowed.
        """
        if not origin or len(origin) != 1 or not self.origins:
            return None
        if "*" in self.origins:
            return b"*"
        if origin[0].decode("latin-1").lower() in self.origins:
            return origin[0]
        return None

    def apply(self, requestHeaders: Headers, responseHeaders: Headers, expose: bool = True) -> bool:
        """
        Make the CORS headers of a response: remove any a backend sent
        (dynllm alone decides who may read its answers: llama-server, for
        one, echoes any C{Origin}), then add C{Vary: Origin} when any origin
        is allowed, and for an allowed origin C{Access-Control-Allow-Origin}
        and C{Access-Control-Expose-Headers} naming the response's headers
        that scripts could not read otherwise (C{Retry-After},
        C{X-DynLLM-Model-State}, ...).

        @param expose: Whether to add C{Access-Control-Expose-Headers}.
        @return: whether the request's origin is allowed.
        """
        for name, _ in list(responseHeaders.getAllRawHeaders()):
            if name.lower().startswith(b"access-control-"):
                responseHeaders.removeHeader(name)
        if not self.origins:
            return False
        addVary(responseHeaders, b"Origin")
        allowed = self.allowOrigin(requestHeaders.getRawHeaders(b"origin"))
        if allowed is None:
            return False
        responseHeaders.setRawHeaders(b"Access-Control-Allow-Origin", [allowed])
        if expose:
            names = sorted(
                {name for name, _ in responseHeaders.getAllRawHeaders() if name.lower() not in _NOT_EXPOSED}
                - {b"Access-Control-Allow-Origin"}
            )
            if names:
                responseHeaders.setRawHeaders(b"Access-Control-Expose-Headers", [b", ".join(names)])
        return True


def addVary(headers: Headers, name: bytes) -> None:
    """
    Add C{name} to the C{Vary} header of a response, unless it is there.
    """
    values = headers.getRawHeaders(b"vary", [])
    present = {v.strip().lower() for value in values for v in value.split(b",")}
    if name.lower() in present or b"*" in present:
        return
    headers.setRawHeaders(b"Vary", [b", ".join([v for v in values if v.strip()] + [name])])


def isPreflight(method: bytes, requestHeaders: Headers) -> bool:
    """
    @return: whether a request is a CORS preflight: C{OPTIONS} with
        C{Origin} and C{Access-Control-Request-Method}.
    """
    return (
        method == b"OPTIONS"
        and requestHeaders.hasHeader(b"origin")
        and requestHeaders.hasHeader(b"access-control-request-method")
    )


def _headerList(values: Sequence[bytes] | None) -> bytes | None:
    """
    @return: the header names of C{Access-Control-Request-Headers} joined
        again, or C{None} if there are none or one is not a token.
    """
    names = [n.strip() for value in values or [] for n in value.split(b",") if n.strip()]
    if not names or not all(set(n) <= _TOKEN for n in names):
        return None
    return b", ".join(names)


def preflightHeaders(requestHeaders: Headers, responseHeaders: Headers) -> dict[bytes, bytes]:
    """
    The answer to a preflight from an allowed origin (whose
    C{Access-Control-Allow-Origin} L{CORSPolicy.apply} has set).

    @param requestHeaders: The preflight's headers.
    @param responseHeaders: The answer's headers, to which C{Vary} is added.
    @return: the other headers of the answer: the methods, the headers
        asked for (or L{DEFAULT_ALLOW_HEADERS}), L{MAX_AGE}, and Chromium's
        Private Network Access grant when it asks
        (U{https://wicg.github.io/private-network-access/}).
    """
    headers = {
        b"Access-Control-Allow-Methods": ALLOW_METHODS,
        b"Access-Control-Allow-Headers": _headerList(requestHeaders.getRawHeaders(b"access-control-request-headers"))
        or DEFAULT_ALLOW_HEADERS,
        b"Access-Control-Max-Age": MAX_AGE,
    }
    # A public page calling a server on this machine or network asks for
    # this, and the origin has been allowed by whoever runs the server.
    private = requestHeaders.getRawHeaders(b"access-control-request-private-network") or [b""]
    if private[0].lower() == b"true":
        headers[b"Access-Control-Allow-Private-Network"] = b"true"
    addVary(responseHeaders, b"Access-Control-Request-Method")
    addVary(responseHeaders, b"Access-Control-Request-Headers")
    return headers
