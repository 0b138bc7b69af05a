# -*- test-case-name: tests.test_site -*-
"""
The twisted.web C{Site} that serves the API: multipart bodies are not parsed
into memory, and bodies above the configured size are refused with 413
before they are read.
"""

from __future__ import annotations

from typing import Any

from twisted.web import server

from dynllm import errors


class LimitedRequest(server.Request):
    """
    A request that refuses bodies larger than L{maxBodyBytes}, whether the
    size is declared by C{Content-Length} or found while a chunked upload
    arrives.
    """

    maxBodyBytes: int = 64 * 1024 * 1024
    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.maxBodyBytes:
            self._refuse()
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.maxBodyBytes:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        limit = self.maxBodyBytes / (1024 * 1024)
        error = errors.APIError(
            413,
            f"the request body is larger than the limit of {limit:g} MB (max_request_body_mb)",
            "invalid_request_error",
            "request_too_large",
        )
        body = error.body()
        head = (
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        transport = self.channel.transport
        assert transport is not None
        transport.write(head + body)
        transport.loseConnection()


def makeSite(resource: Any, maxBodyBytes: int) -> server.Site:
    """
    @return: a C{Site} serving C{resource} with a body limit of
        C{maxBodyBytes}.
    """
    request = type("LimitedRequest", (LimitedRequest,), {"maxBodyBytes": maxBodyBytes})
    site = server.Site(resource, requestFactory=request, parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    return site
