"""
Tests for L{dynllm.site} and L{dynllm.codings}: CORS and compressed request
bodies, on the real C{Site} in memory (its channel fed raw HTTP through a
C{StringTransport}, so that everything twisted.web does between the socket
and a resource takes part), plus a few against a real daemon.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
import zlib
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

from dynllm import codings, errors, multipart
from dynllm.config import ConfigError, parseConfig
from dynllm.cors import DEFAULT_ALLOW_HEADERS, CORSPolicy
from dynllm.connections import (
    HANDLING,
    IDLE,
    LINGER_SECONDS,
    MAX_CONNECTIONS_CEILING,
    RECEIVING,
    autoMaxConnections,
)
from dynllm.site import SPOOL_THRESHOLD, DynLLMSite, makeSite
from tests import fakeovms
from tests.support import FAKE_BACKEND, Daemon, checkEnvelope, llamaServer, pidAlive, request, tinyModels, waitFor

ORIGIN = "http://localhost:3000"
MB = 1024 * 1024


def zeroBomb(size: int, coding: str = "gzip") -> bytes:
    """
    C{size} bytes of zeros, compressed: about a thousandth of C{size}.

    The deflate stream is one block of 1 MiB of zeros, ended by a full
    flush (so that it stands alone), repeated, then an empty final block:
    quick to make at any size.

    @param size: A multiple of 1 MiB.
    @param coding: C{gzip} (RFC 1952) or C{deflate} (zlib, RFC 1950).
    """
    zeros = bytes(MB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = size // MB
    stream = block * count + b"\x03\x00"
    if coding == "deflate":
        adler = 1
        for _ in range(count):
            adler = zlib.adler32(zeros, adler)
        return b"\x78\xda" + stream + struct.pack(">I", adler)
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + stream + struct.pack("<II", crc, size & 0xFFFFFFFF)


def deflate(data: bytes, raw: bool = False) -> bytes:
    """
    @return: C{data} in the zlib format, or as a raw deflate stream.
    """
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


class Echo(resource.Resource):
    """
    A leaf that records each request it renders (method, headers, the body
    as the routes would read it, the kind of file holding it, and an
    upload's C{model} field as the upload routes find it) and
    answers 200 with the headers in C{headers}.
    """

    isLeaf = True

    def __init__(self, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.headers = headers or {}

    def render(self, request: Any) -> bytes:
        request.content.seek(0)
        contentType = request.getHeader(b"content-type") or b""
        found = None
        if contentType.startswith(b"multipart/"):
            found = multipart.findField(request.content, contentType, "model")
            request.content.seek(0)
        self.seen.append(
            {
                "method": request.method,
                "headers": request.requestHeaders,
                "body": request.content.read(),
                "content": request.content,
                "model": found and found.value,
            }
        )
        for name, value in self.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"ok": true}'


class Locked(resource.Resource):
    """
    A leaf that answers 401 in the envelope, as the routes do for a wrong key.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        error = errors.APIError(401, "Invalid API key", "authentication_error", "invalid_api_key")
        request.setResponseCode(401)
        for name, value in error.headers().items():
            request.setHeader(name, value)
        return error.body()


class Hang(resource.Resource):
    """
    A leaf that never finishes its answer (as a long generation).
    """

    isLeaf = True

    def render(self, request: Any) -> Any:
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.write(b"data: 1\n\n")
        return server.NOT_DONE_YET


class Response:
    """
    A response parsed from the bytes written on a connection.

    @ivar status: The status code.
    @ivar headers: Lower-cased header name to its values.
    @ivar body: The body, de-chunked.
    @ivar raw: The bytes as written.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ")[1])
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.setdefault(name.decode().lower(), []).append(value.strip().decode("latin-1"))
        if self.header("transfer-encoding") == "chunked":
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                if n == 0:
                    break
                body, rest = body + rest[:n], rest[n + 2 :]
            self.body = body
        else:
            self.body = rest

    def header(self, name: str) -> str | None:
        """
        @return: the header's values joined, or C{None}.
        """
        values = self.headers.get(name)
        return None if values is None else ", ".join(values)

    def cors(self) -> dict[str, str]:
        """
        @return: the C{Access-Control-*} headers.
        """
        return {k: ", ".join(v) for k, v in self.headers.items() if k.startswith("access-control-")}


class SiteTestCase(SynchronousTestCase):
    """
    Serves a resource tree (C{/echo}: L{Echo}, C{/locked}: L{Locked},
    anything else: twisted.web's 404) through a L{DynLLMSite} in memory.
    """

    def serve(
        self, origins: tuple[str, ...] = (), maxBodyBytes: int = MB, echoHeaders: Any = None, **options: Any
    ) -> None:
        """
        Make the site; L{send} then talks to it.

        @param options: More keyword arguments for L{DynLLMSite}.
        """
        self.echo = Echo(echoHeaders)
        root = resource.Resource()
        root.putChild(b"echo", self.echo)
        root.putChild(b"locked", Locked())
        root.putChild(b"hang", Hang())
        self.clock = Clock()
        self.site = DynLLMSite(root, maxBodyBytes, CORSPolicy(frozenset(origins)), reactor=self.clock, **options)

    def connect(self) -> tuple[Any, StringTransport]:
        """
        @return: a new connection to the site, and its transport.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def send(
        self,
        method: str = "POST",
        path: str = "/echo",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        chunked: bool = False,
        pieces: int = 1,
    ) -> Response:
        """
        Send one request on a new connection.

        @param chunked: Send the body chunked, without C{Content-Length}.
        @param pieces: Deliver the request in this many pieces.
        @return: what the site answered.
        """
        self.channel, self.transport = self.connect()
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            framed = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096]) for i in range(0, len(body), 4096)
            )
            framed += b"0\r\n\r\n"
        else:
            if body or method == "POST":
                lines.append(f"Content-Length: {len(body)}")
            framed = body
        data = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + framed
        step = max(1, -(-len(data) // pieces))
        for i in range(0, len(data), step):
            if self.transport.disconnecting:
                break
            self.channel.dataReceived(data[i : i + step])
        return Response(self.transport.value())


# Configuration.


class CORSConfigTests(SynchronousTestCase):
    """
    C{server.cors_origins} in the configuration.
    """

    def origins(self, value: Any) -> tuple[str, ...]:
        """
        @return: C{server.cors_origins} as parsed from C{value}.
        """
        origins: tuple[str, ...] = parseConfig({"server": {"cors_origins": value}}).server.cors_origins
        return origins

    def test_defaultEmpty(self) -> None:
        """
        By default no origin is allowed.
        """
        self.assertEqual(parseConfig({}).server.cors_origins, ())

    def test_normalized(self) -> None:
        """
        Origins are kept as browsers send them: lower-cased, without a
        default port; C{*}, IPv6 addresses and other schemes are accepted.
        """
        self.assertEqual(
            self.origins(
                ["HTTP://LocalHost:3000", "https://example.com:443", "http://[::1]:8080", "*", "chrome-extension://abc"]
            ),
            ("http://localhost:3000", "https://example.com", "http://[::1]:8080", "*", "chrome-extension://abc"),
        )

    def test_notAnOrigin(self) -> None:
        """
        An entry that is not C{scheme://host[:port]} nor C{*} stops start-up
        with a message naming the key and the entry.
        """
        for bad in (
            "localhost:3000",
            "http://localhost:3000/",
            "http://example.com/path",
            "http://localhost:99999",
            "http://localhost:0",
            "http://*.example.com",
            "http://user@example.com",
            "null",
            "",
        ):
            e = self.assertRaises(ConfigError, self.origins, [bad])
            self.assertIn("server.cors_origins", str(e))
            self.assertIn(repr(bad), str(e))

    def test_notAList(self) -> None:
        """
        A single string instead of a list is refused.
        """
        e = self.assertRaises(ConfigError, self.origins, "*")
        self.assertIn("server.cors_origins must be a list of strings", str(e))


# CORS.


class PreflightTests(SiteTestCase):
    """
    CORS preflights are answered by the site, for any path, without a key.
    """

    def preflight(self, origin: str = ORIGIN, path: str = "/v1/chat/completions", **headers: str) -> Response:
        """
        @return: the answer to a preflight from C{origin}.
        """
        sent = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        sent.update({k.replace("_", "-"): v for k, v in headers.items()})
        return self.send("OPTIONS", path, sent)

    def test_allowedOrigin(self) -> None:
        """
        A preflight from an allowed origin gets 204 with the origin itself
        allowed, the methods, the requested headers echoed, a max age and
        C{Vary: Origin}; the resources never see it.
        """
        self.serve(origins=(ORIGIN,))
        response = self.preflight(Access_Control_Request_Headers="authorization, content-type, x-stainless-os")
        self.assertEqual(response.status, 204)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.header("access-control-allow-origin"), ORIGIN)
        self.assertIn("POST", response.header("access-control-allow-methods") or "")
        self.assertEqual(response.header("access-control-allow-headers"), "authorization, content-type, x-stainless-os")
        self.assertEqual(response.header("access-control-max-age"), "7200")
        self.assertIn("Origin", response.header("vary") or "")
        self.assertEqual(self.echo.seen, [])

    def test_anyPath(self) -> None:
        """
        A preflight is answered for a path no resource serves, and for one
        whose resource would want a key.
        """
        self.serve(origins=(ORIGIN,))
        self.assertEqual(self.preflight(path="/no/such/thing").status, 204)
        self.assertEqual(self.preflight(path="/locked").status, 204)

    def test_star(self) -> None:
        """
        With C{*} configured, any origin is answered C{*}.
        """
        self.serve(origins=("*",))
        response = self.preflight(origin="https://anything.example")
        self.assertEqual(response.status, 204)
        self.assertEqual(response.header("access-control-allow-origin"), "*")

    def test_originCaseInsensitive(self) -> None:
        """
        Origins are compared without regard to case, and the origin is
        answered as the browser sent it.
        """
        self.serve(origins=(ORIGIN,))
        response = self.preflight(origin="http://LOCALHOST:3000")
        self.assertEqual(response.header("access-control-allow-origin"), "http://LOCALHOST:3000")

    def test_otherOrigin(self) -> None:
        """
        A preflight from an origin not allowed gets 403 in the envelope and
        no CORS header, so that the browser blocks the request.
        """
        self.serve(origins=(ORIGIN,))
        response = self.preflight(origin="https://evil.example")
        error = checkEnvelope(self, response.status, response.body, 403, "cors_origin_not_allowed")
        self.assertIn("server.cors_origins", error["message"])
        self.assertEqual(response.cors(), {})
        self.assertEqual(self.echo.seen, [])

    def test_noneConfigured(self) -> None:
        """
        With no origin configured (the default), every preflight gets 403
        without CORS headers.
        """
        self.serve()
        response = self.preflight()
        checkEnvelope(self, response.status, response.body, 403, "cors_origin_not_allowed")
        self.assertEqual(response.cors(), {})

    def test_defaultAllowedHeaders(self) -> None:
        """
        A preflight that asks for no header is told the headers the OpenAI
        and Anthropic SDKs send.
        """
        self.serve(origins=(ORIGIN,))
        allowed = self.preflight().header("access-control-allow-headers") or ""
        self.assertEqual(allowed, DEFAULT_ALLOW_HEADERS.decode())
        for name in ("authorization", "content-type", "x-api-key", "anthropic-version", "x-stainless-os"):
            self.assertIn(name, allowed.split(", "))

    def test_privateNetwork(self) -> None:
        """
        A preflight asking for Private Network Access (Chromium, for a page
        calling a server on this machine) is granted it.
        """
        self.serve(origins=(ORIGIN,))
        response = self.preflight(Access_Control_Request_Private_Network="true")
        self.assertEqual(response.header("access-control-allow-private-network"), "true")

    def test_plainOptions(self) -> None:
        """
        An C{OPTIONS} request that is not a preflight (no
        C{Access-Control-Request-Method}) goes to the resources.
        """
        self.serve(origins=(ORIGIN,))
        response = self.send("OPTIONS", "/echo", {"Origin": ORIGIN})
        self.assertEqual(response.status, 200)
        self.assertEqual(len(self.echo.seen), 1)


class CORSResponseHeaderTests(SiteTestCase):
    """
    Every answer to an allowed origin carries C{Access-Control-Allow-Origin},
    whoever wrote it; other answers carry none.
    """

    def test_ok(self) -> None:
        """
        A 200 carries the origin, C{Vary: Origin}, and exposes the headers
        scripts could not read otherwise.
        """
        self.serve(origins=(ORIGIN,), echoHeaders={b"Retry-After": b"3", b"X-DynLLM-Model-State": b"loaded"})
        response = self.send("POST", "/echo", {"Origin": ORIGIN}, b"{}")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("access-control-allow-origin"), ORIGIN)
        self.assertEqual(response.header("vary"), "Origin")
        exposed = (response.header("access-control-expose-headers") or "").split(", ")
        self.assertIn("Retry-After", exposed)
        self.assertIn("X-Dynllm-Model-State", exposed)
        self.assertNotIn("Content-Type", exposed)

    def test_notFound(self) -> None:
        """
        A 404 for an unknown path carries the CORS headers.
        """
        self.serve(origins=(ORIGIN,))
        response = self.send("GET", "/nowhere", {"Origin": ORIGIN})
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("access-control-allow-origin"), ORIGIN)

    def test_unauthorized(self) -> None:
        """
        A 401 carries the CORS headers, so that a page can read why.
        """
        self.serve(origins=(ORIGIN,))
        response = self.send("POST", "/locked", {"Origin": ORIGIN}, b"{}")
        checkEnvelope(self, response.status, response.body, 401, "invalid_api_key")
        self.assertEqual(response.header("access-control-allow-origin"), ORIGIN)

    def test_tooLarge(self) -> None:
        """
        The 413 that the site writes itself carries the CORS headers.
        """
        self.serve(origins=(ORIGIN,), maxBodyBytes=1000)
        response = self.send("POST", "/echo", {"Origin": ORIGIN}, b"x" * 2000)
        checkEnvelope(self, response.status, response.body, 413, "request_too_large")
        self.assertEqual(response.header("access-control-allow-origin"), ORIGIN)
        self.assertEqual(response.header("vary"), "Origin")

    def test_backendHeadersReplaced(self) -> None:
        """
        CORS headers set by what answered (a relayed backend: llama-server
        echoes any C{Origin}) are replaced by the site's own.
        """
        relayed = {b"Access-Control-Allow-Origin": b"*", b"Access-Control-Allow-Credentials": b"true"}
        self.serve(origins=(ORIGIN,), echoHeaders=relayed)
        response = self.send("POST", "/echo", {"Origin": ORIGIN}, b"{}")
        self.assertEqual(response.header("access-control-allow-origin"), ORIGIN)
        self.assertIsNone(response.header("access-control-allow-credentials"))

    def test_backendHeadersRemovedForOthers(self) -> None:
        """
        An origin that is not allowed gets no CORS header, even one that
        what answered set.
        """
        relayed = {b"Access-Control-Allow-Origin": b"https://evil.example"}
        self.serve(echoHeaders=relayed)
        response = self.send("POST", "/echo", {"Origin": "https://evil.example"}, b"{}")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.cors(), {})

    def test_otherOrigin(self) -> None:
        """
        An origin that is not allowed gets no CORS header, only
        C{Vary: Origin} (the answer depends on it).
        """
        self.serve(origins=(ORIGIN,))
        response = self.send("POST", "/echo", {"Origin": "https://evil.example"}, b"{}")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.cors(), {})
        self.assertEqual(response.header("vary"), "Origin")

    def test_noOrigin(self) -> None:
        """
        A request without C{Origin} (not from a browser page) gets no CORS
        header.
        """
        self.serve(origins=("*",))
        response = self.send("POST", "/echo", {}, b"{}")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.cors(), {})

    def test_varyMerged(self) -> None:
        """
        C{Origin} is added to a C{Vary} header that is already there.
        """
        self.serve(origins=(ORIGIN,), echoHeaders={b"Vary": b"Accept-Encoding"})
        response = self.send("POST", "/echo", {"Origin": ORIGIN}, b"{}")
        self.assertEqual(response.header("vary"), "Accept-Encoding, Origin")


# Compressed bodies.


class CodingsTests(SynchronousTestCase):
    """
    L{codings.parseCodings} and L{codings.BodyDecoder}, alone.
    """

    def test_parseOrder(self) -> None:
        """
        Codings are read in the order they were applied, across header
        lines, lower-cased, with C{identity} left out.
        """
        self.assertEqual(
            codings.parseCodings([b"GZIP, identity", b"deflate"]), ["gzip", "deflate"]
        )
        self.assertEqual(codings.parseCodings([b"identity"]), [])

    def test_parseUnsupported(self) -> None:
        """
        An unknown coding, or one zlib cannot undo, is refused, naming it.
        """
        for name in ("br", "zstd", "compress", "x-compress", "snappy"):
            e = self.assertRaises(codings.UnsupportedCoding, codings.parseCodings, [b"gzip, " + name.encode()])
            self.assertEqual(e.coding, name)

    def test_parseTooMany(self) -> None:
        """
        More than L{codings.MAX_CODINGS} codings are refused.
        """
        self.assertRaises(codings.UnsupportedCoding, codings.parseCodings, [b"gzip, " * 5 + b"gzip"])

    def test_piecesBounded(self) -> None:
        """
        However much one piece of input inflates to, the decoder gives it
        out in pieces of at most C{chunkSize} bytes.
        """
        decoder = codings.BodyDecoder(["gzip"], limit=64 * MB, chunkSize=1000)
        sizes = [len(p) for p in decoder.feed(gzip.compress(bytes(100000)))]
        self.assertEqual(sum(sizes), 100000)
        self.assertEqual(max(sizes), 1000)
        decoder.finish()

    def test_limitEveryStage(self) -> None:
        """
        For a body coded twice, the inner stage's output counts against the
        limit too.
        """
        inner = gzip.compress(bytes(10000))
        decoder = codings.BodyDecoder(["gzip", "gzip"], limit=5000)
        self.assertRaises(codings.BodyTooLarge, list, decoder.feed(gzip.compress(inner)))


class DecodedBodyTests(SiteTestCase):
    """
    Bodies with a content coding reach the resources decoded, with no
    C{Content-Encoding} and a C{Content-Length} that fits.
    """

    BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 50}]}).encode()

    def assertDecoded(self, response: Response, expected: bytes, length: bool = True) -> dict[str, Any]:
        """
        Assert that the resource saw C{expected} as the body, with no
        C{Content-Encoding} and (if C{length}) a matching C{Content-Length}.

        @return: what the resource saw.
        """
        self.assertEqual(response.status, 200, response.raw)
        [seen] = self.echo.seen
        self.assertEqual(seen["body"], expected)
        self.assertIsNone(seen["headers"].getRawHeaders(b"content-encoding"))
        if length:
            self.assertEqual(seen["headers"].getRawHeaders(b"content-length"), [str(len(expected)).encode()])
        return seen

    def test_gzip(self) -> None:
        """
        A gzip body is decoded.
        """
        self.serve()
        body = gzip.compress(self.BODY)
        self.assertDecoded(self.send(headers={"Content-Encoding": "gzip"}, body=body, pieces=7), self.BODY)

    def test_xGzip(self) -> None:
        """
        C{x-gzip} is C{gzip}.
        """
        self.serve()
        body = gzip.compress(self.BODY)
        self.assertDecoded(self.send(headers={"Content-Encoding": "x-gzip"}, body=body), self.BODY)

    def test_deflate(self) -> None:
        """
        A C{deflate} body in the zlib format (RFC 9110's C{deflate}) is
        decoded, even delivered a byte at a time.
        """
        self.serve()
        body = deflate(self.BODY)
        self.assertDecoded(self.send(headers={"Content-Encoding": "deflate"}, body=body, pieces=10000), self.BODY)

    def test_rawDeflate(self) -> None:
        """
        A raw deflate stream sent as C{deflate} (as some clients do) is
        decoded too.
        """
        self.serve()
        body = deflate(self.BODY, raw=True)
        self.assertDecoded(self.send(headers={"Content-Encoding": "deflate"}, body=body), self.BODY)

    def test_identity(self) -> None:
        """
        C{identity} changes nothing, and is removed.
        """
        self.serve()
        self.assertDecoded(self.send(headers={"Content-Encoding": "identity"}, body=self.BODY), self.BODY)

    def test_twoCodings(self) -> None:
        """
        Codings listed together are undone last first (RFC 9110 8.4).
        """
        self.serve()
        body = gzip.compress(deflate(self.BODY))
        self.assertDecoded(self.send(headers={"Content-Encoding": "deflate, gzip"}, body=body), self.BODY)

    def test_gzipMembers(self) -> None:
        """
        A gzip body of several members (RFC 1952 2.2) is decoded whole.
        """
        self.serve()
        half = len(self.BODY) // 2
        body = gzip.compress(self.BODY[:half]) + gzip.compress(self.BODY[half:])
        self.assertDecoded(self.send(headers={"Content-Encoding": "gzip"}, body=body, pieces=3), self.BODY)

    def test_chunked(self) -> None:
        """
        A gzip body sent chunked is decoded; it gets no C{Content-Length}.
        """
        self.serve()
        body = gzip.compress(self.BODY)
        response = self.send(headers={"Content-Encoding": "gzip"}, body=body, chunked=True)
        seen = self.assertDecoded(response, self.BODY, length=False)
        self.assertIsNone(seen["headers"].getRawHeaders(b"content-length"))

    def test_emptyBody(self) -> None:
        """
        A request with a coding but no body has an empty body.
        """
        self.serve()
        self.assertDecoded(self.send("GET", headers={"Content-Encoding": "gzip"}), b"", length=False)

    def test_smallInMemory(self) -> None:
        """
        A small decoded body is kept in memory, which the relay sends in one
        write.
        """
        self.serve()
        seen = self.assertDecoded(self.send(headers={"Content-Encoding": "gzip"}, body=gzip.compress(self.BODY)), self.BODY)
        self.assertIsInstance(seen["content"], io.BytesIO)

    def test_largeSpooled(self) -> None:
        """
        A decoded body larger than L{SPOOL_THRESHOLD} goes to a temporary
        file, whole.
        """
        self.serve()
        body = bytes(range(256)) * (3 * SPOOL_THRESHOLD // 256)
        seen = self.assertDecoded(self.send(headers={"Content-Encoding": "gzip"}, body=gzip.compress(body)), body)
        self.assertNotIsInstance(seen["content"], io.BytesIO)

    def test_gzipMultipart(self) -> None:
        """
        A gzipped multipart upload is decoded, and its C{model} field is
        found in it as the upload routes find it.
        """
        self.serve()
        boundary = "b0undary"
        upload = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n"
        ).encode() + bytes(200000) + f"\r\n--{boundary}--\r\n".encode()
        contentType = f"multipart/form-data; boundary={boundary}"
        response = self.send(
            headers={"Content-Encoding": "gzip", "Content-Type": contentType}, body=gzip.compress(upload)
        )
        seen = self.assertDecoded(response, upload)
        self.assertEqual(seen["model"], "whisper")


class RefusedBodyTests(SiteTestCase):
    """
    Bodies that cannot be decoded, or decode to too much, are refused in the
    envelope before the resources see them, and the connection is closed.
    """

    def assertRefused(self, response: Response, status: int, code: str) -> dict[str, Any]:
        """
        Assert a refusal with C{status} and C{code} that closed the
        connection and reached no resource.

        @return: the error object.
        """
        error = checkEnvelope(self, response.status, response.body, status, code)
        self.assertEqual(response.header("connection"), "close")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.echo.seen, [])
        return error

    def test_bomb(self) -> None:
        """
        10 MB of zeros gzipped to about 10 KB, against a 1 MB limit: 413.
        """
        self.serve(maxBodyBytes=MB)
        body = zeroBomb(10 * MB)
        self.assertLess(len(body), 20000)
        error = self.assertRefused(self.send(headers={"Content-Encoding": "gzip"}, body=body), 413, "request_too_large")
        self.assertIn("decoded", error["message"])

    def test_deflateBomb(self) -> None:
        """
        The same bomb as C{deflate}: 413.
        """
        self.serve(maxBodyBytes=MB)
        response = self.send(headers={"Content-Encoding": "deflate"}, body=zeroBomb(10 * MB, "deflate"))
        self.assertRefused(response, 413, "request_too_large")

    def test_bombMemory(self) -> None:
        """
        A 1 GB bomb against the default 64 MB limit is refused while the
        memory allocated stays far below the limit: the decoded body is
        never held, only one piece of it at a time.
        """
        self.serve(maxBodyBytes=64 * MB)
        body = zeroBomb(1024 * MB)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        response = self.send(headers={"Content-Encoding": "gzip"}, body=body, pieces=len(body) // 65536)
        peak = tracemalloc.get_traced_memory()[1] - before
        self.assertRefused(response, 413, "request_too_large")
        self.assertLess(peak, 4 * MB)

    def test_declaredTooLarge(self) -> None:
        """
        A coded body whose declared size is already above the limit is
        refused before it is read.
        """
        self.serve(maxBodyBytes=1000)
        self.channel, self.transport = self.connect()
        self.channel.dataReceived(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 5000\r\n\r\n"
        )
        self.assertRefused(Response(self.transport.value()), 413, "request_too_large")

    def test_wholeBodyAtOnce(self) -> None:
        """
        A body refused while it arrives is not rendered even when the rest
        of it arrives before the connection is closed.
        """
        self.serve(maxBodyBytes=MB)
        self.channel, self.transport = self.connect()
        body = zeroBomb(10 * MB)
        self.channel.dataReceived(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        self.assertRefused(Response(self.transport.value()), 413, "request_too_large")

    def test_corrupt(self) -> None:
        """
        Data that is not gzip gets 400.
        """
        self.serve()
        response = self.send(headers={"Content-Encoding": "gzip"}, body=b'{"model": "m"}')
        error = self.assertRefused(response, 400, "invalid_content_encoding")
        self.assertEqual(error["param"], "Content-Encoding")

    def test_truncated(self) -> None:
        """
        A gzip body cut short gets 400 once it has all arrived.
        """
        self.serve()
        body = gzip.compress(DecodedBodyTests.BODY)[:-12]
        self.assertRefused(self.send(headers={"Content-Encoding": "gzip"}, body=body), 400, "invalid_content_encoding")

    def test_trailingData(self) -> None:
        """
        Bytes after the end of a deflate stream get 400.
        """
        self.serve()
        body = deflate(DecodedBodyTests.BODY) + b"junk"
        self.assertRefused(self.send(headers={"Content-Encoding": "deflate"}, body=body), 400, "invalid_content_encoding")

    def test_unsupported(self) -> None:
        """
        C{br}, C{zstd}, C{compress} and unknown codings get 415 in the
        envelope, naming the coding.
        """
        for name in ("br", "zstd", "compress", "frobnicate"):
            self.serve()
            response = self.send(headers={"Content-Encoding": name}, body=b"\x00" * 100)
            error = self.assertRefused(response, 415, "unsupported_content_encoding")
            self.assertEqual(error["type"], "invalid_request_error")
            self.assertIn(repr(name), error["message"])

    def test_unsupportedNotInvited(self) -> None:
        """
        A client that waits for C{100 Continue} before sending a body that
        would be refused is not invited to send it.
        """
        self.serve()
        self.channel, self.transport = self.connect()
        self.channel.dataReceived(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\n"
        )
        self.assertNotIn(b"100 Continue", self.transport.value())
        self.assertRefused(Response(self.transport.value()), 415, "unsupported_content_encoding")

    def test_anthropicShape(self) -> None:
        """
        An Anthropic client (it sends C{anthropic-version}) is refused in
        Anthropic's error shape, which it parses.
        """
        self.serve(maxBodyBytes=MB)
        response = self.send(
            path="/v1/messages", headers={"Content-Encoding": "gzip", "anthropic-version": "2023-06-01"}, body=zeroBomb(10 * MB)
        )
        self.assertEqual(response.status, 413)
        answer = json.loads(response.body)
        self.assertEqual(answer["type"], "error")
        self.assertEqual(answer["error"]["type"], "request_too_large")
        self.assertIn("max_request_body_mb", answer["error"]["message"])

    def test_corsOnRefusal(self) -> None:
        """
        The refusals the site writes itself carry the CORS headers of an
        allowed origin.
        """
        self.serve(origins=(ORIGIN,))
        response = self.send(headers={"Content-Encoding": "br", "Origin": ORIGIN}, body=b"x")
        self.assertRefused(response, 415, "unsupported_content_encoding")
        self.assertEqual(response.header("access-control-allow-origin"), ORIGIN)


class HalfClosingTransport(StringTransport):
    """
    A transport that can stop writing and go on reading, as TCP can.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class LingerTests(SiteTestCase):
    """
    A refusal written while the client is still sending its body does not
    close the connection under the client's feet: a TCP reset could lose
    the answer (the client saw C{EPIPE} instead of the 413).
    """

    def start(self) -> tuple[Any, HalfClosingTransport]:
        """
        Send the head of a 2 MB request to a site with a 1 MB limit.
        """
        self.serve(maxBodyBytes=MB)
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = HalfClosingTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * MB,))
        return channel, transport

    def test_readsOnUntilBodyEnds(self) -> None:
        """
        The 413 is written and the writing side closed, the rest of the
        body is read and discarded, and the connection is closed once it
        has all arrived.
        """
        channel, transport = self.start()
        self.assertEqual(Response(transport.value()).status, 413)
        self.assertTrue(transport.writeClosed)
        self.assertFalse(transport.disconnecting)
        for _ in range(31):
            channel.dataReceived(b"x" * 65536)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x" * 65536)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.echo.seen, [])

    def test_closesAfterLingering(self) -> None:
        """
        A client that stops sending is disconnected after
        L{dynllm.connections.LINGER_SECONDS}.
        """
        channel, transport = self.start()
        channel.dataReceived(b"x" * 1000)
        self.site.lingerClock.advance(LINGER_SECONDS - 0.1)
        self.assertFalse(transport.disconnecting)
        self.site.lingerClock.advance(0.1)
        self.assertTrue(transport.disconnecting)


class URLTests(SiteTestCase):
    """
    A URL the routes cannot read is refused in the envelope.
    """

    def test_notUTF8(self) -> None:
        """
        A path that is not UTF-8 once percent-decoded (C{%C3} alone) is a
        400 C{invalid_url} in OpenAI's envelope, or Anthropic's shape with
        C{anthropic-version}; the resources never see it.
        """
        self.serve(("http://page",))
        for path in ("/echo/%C3", "/v1/models/%C3%28", "/%FF"):
            answer = self.send("GET", path, {"Origin": "http://page"})
            self.assertEqual(answer.status, 400)
            self.assertEqual(json.loads(answer.body)["error"]["code"], "invalid_url")
            self.assertEqual(answer.header("access-control-allow-origin"), "http://page")
        answer = self.send("GET", "/echo/%C3", {"anthropic-version": "2023-06-01"})
        self.assertEqual((answer.status, json.loads(answer.body)["type"]), (400, "error"))
        self.assertEqual(self.send("GET", "/echo/%C3%A9").status, 200)


class MakeSiteTests(SynchronousTestCase):
    """
    L{makeSite}.
    """

    def test_settings(self) -> None:
        """
        The site has the given limit and origins, and parses no forms.
        """
        site = makeSite(resource.Resource(), 1234, ("http://a.example",))
        self.assertEqual(site.maxBodyBytes, 1234)
        self.assertEqual(site.cors, CORSPolicy(frozenset({"http://a.example"})))
        self.assertFalse(site._parsePOSTFormSubmission)


def peakRSS(pid: int) -> int:
    """
    @return: the peak resident memory of process C{pid} so far, in bytes
        (C{VmHWM}).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """
    POST C{body} as is on a new connection, and read the answer even if the
    server closed the connection before the whole body was sent.

    @return: C{(status, headers, body)}.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        try:
            connection.request("POST", path, body, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


class DaemonCase(SynchronousTestCase):
    """
    Runs a real daemon for each test, and checks that stopping it left no
    backend running.
    """

    def startDaemon(self, config: dict[str, Any], directory: str | None = None) -> None:
        """
        Start a daemon of C{config} as C{self.daemon}.
        """
        self.daemon = Daemon(config, directory=directory).start()
        self.addCleanup(self.stopDaemon)

    def stopDaemon(self) -> None:
        """
        Stop the daemon and wait for its backends to be gone.
        """
        pids = [m["pid"] for m in self.daemon.models().values() if m["pid"]]
        self.daemon.stop()
        self.assertTrue(waitFor(lambda: not any(pidAlive(p) for p in pids), timeout=10))


class DaemonTests(DaemonCase):
    """
    CORS and compressed bodies through a real daemon (C{twistd -n dynllm})
    over real sockets, in front of the fake backend of
    C{tests/fakebackend.py}, with an API key and one allowed origin.
    """

    KEY = "sesame"

    def setUp(self) -> None:
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "server": {"api_keys": [self.KEY], "cors_origins": [ORIGIN]},
            "models": [
                {"name": "m", "path": tinyModels()["tiny-llama.gguf"], "backend": "llamacpp", "vram_mb": 100}
            ],
        }
        self.startDaemon(config)

    def headers(self, **extra: str) -> dict[str, str]:
        """
        @return: the key, the allowed origin, and C{extra}.
        """
        headers = {"Authorization": f"Bearer {self.KEY}", "Origin": ORIGIN, "Content-Type": "application/json"}
        headers.update({k.replace("_", "-"): v for k, v in extra.items()})
        return headers

    def chatBody(self) -> bytes:
        """
        @return: a chat request for model C{m}, as JSON.
        """
        return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 100}]}).encode()

    def test_preflightWithoutKey(self) -> None:
        """
        A preflight needs no key, on an API route whose requests do.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=30)
        self.addCleanup(connection.close)
        connection.request(
            "OPTIONS",
            "/v1/chat/completions",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"},
        )
        response = connection.getresponse()
        response.read()
        self.assertEqual(response.status, 204)
        self.assertEqual(response.headers["Access-Control-Allow-Origin"], ORIGIN)
        self.assertEqual(response.headers["Access-Control-Allow-Headers"], "authorization, content-type")

    def test_errorsCarryCORS(self) -> None:
        """
        The routes' own 401 and 404, in the envelope, carry the CORS headers.
        """
        status, headers, body = post(self.daemon.port, "/v1/chat/completions", self.chatBody(),
                                     {"Origin": ORIGIN, "Content-Type": "application/json"})
        checkEnvelope(self, status, body, 401, "invalid_api_key")
        self.assertEqual(headers["Access-Control-Allow-Origin"], ORIGIN)
        status, headers, body = post(self.daemon.port, "/v1/no/such/route", b"{}", self.headers())
        self.assertEqual(status, 404)
        self.assertEqual(headers["Access-Control-Allow-Origin"], ORIGIN)

    def test_gzipChat(self) -> None:
        """
        A gzipped chat is relayed decoded: the backend sees no
        C{Content-Encoding} and the decoded length; the relayed answer
        carries the CORS headers.
        """
        body = self.chatBody()
        status, headers, answer = post(
            self.daemon.port, "/v1/chat/completions", gzip.compress(body), self.headers(Content_Encoding="gzip")
        )
        self.assertEqual(status, 200, answer)
        seen = json.loads(answer)["echo_headers"]
        self.assertNotIn("content-encoding", seen)
        self.assertEqual(seen["content-length"], str(len(body)))
        self.assertEqual(headers["Access-Control-Allow-Origin"], ORIGIN)

    def test_bomb(self) -> None:
        """
        1 GB of zeros gzipped (about 1 MB) against the default 64 MB limit
        gets 413 with the CORS headers, the daemon's peak memory grows by
        far less than the limit, and it serves the next request.
        """
        before = peakRSS(self.daemon.process.pid)
        status, headers, body = post(
            self.daemon.port, "/v1/chat/completions", zeroBomb(1024 * MB), self.headers(Content_Encoding="gzip")
        )
        growth = peakRSS(self.daemon.process.pid) - before
        checkEnvelope(self, status, body, 413, "request_too_large")
        self.assertEqual(headers["Access-Control-Allow-Origin"], ORIGIN)
        self.assertLess(growth, 16 * MB)
        status, _, answer = post(self.daemon.port, "/v1/chat/completions", self.chatBody(), self.headers())
        self.assertEqual(status, 200, answer)

    def test_unsupported(self) -> None:
        """
        A C{br} body gets 415 in the envelope.
        """
        status, _, body = post(
            self.daemon.port, "/v1/chat/completions", b"\x1b\x00" * 50, self.headers(Content_Encoding="br")
        )
        checkEnvelope(self, status, body, 415, "unsupported_content_encoding")


class LlamaServerTests(DaemonCase):
    """
    CORS and a compressed body through a daemon in front of the real
    llama-server, which answers CORS itself: it echoes any C{Origin}. The
    daemon has a key, so that it serves requests from any origin
    (L{dynllm.guard}).
    """

    KEY = "sesame"

    def setUp(self) -> None:
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": llamaServer()},
            "server": {"cors_origins": [ORIGIN], "api_keys": [self.KEY]},
            "models": [
                {"name": "m", "path": tinyModels()["tiny-llama.gguf"], "backend": "llamacpp", "vram_mb": 400,
                 "context_size": 512}
            ],
        }
        self.startDaemon(config)

    def chat(self, origin: str, coding: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """
        @return: a short chat sent from C{origin}, its body coded with
            C{coding} if given.
        """
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        headers = {"Origin": origin, "Content-Type": "application/json", "Authorization": f"Bearer {self.KEY}"}
        if coding == "gzip":
            body, headers["Content-Encoding"] = gzip.compress(body), coding
        elif coding == "deflate":
            body, headers["Content-Encoding"] = deflate(body), coding
        return post(self.daemon.port, "/v1/chat/completions", body, headers)

    def test_backendCORSNotRelayed(self) -> None:
        """
        llama-server allows any origin, but through dynllm an origin that
        is not configured gets no CORS header, and a configured one gets
        dynllm's.
        """
        status, headers, body = self.chat("https://evil.example")
        self.assertEqual(status, 200, body)
        self.assertEqual([h for h in headers if h.lower().startswith("access-control-")], [])
        port = self.daemon.models()["m"]["port"]
        _, direct, _ = request("GET", f"http://127.0.0.1:{port}/health", headers={"Origin": "https://evil.example"})
        self.assertEqual(direct.get("Access-Control-Allow-Origin"), "https://evil.example")
        status, headers, body = self.chat(ORIGIN)
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["Access-Control-Allow-Origin"], ORIGIN)

    def test_compressedChat(self) -> None:
        """
        llama-server answers a gzipped and a deflated chat: it gets them
        decoded.
        """
        for coding in ("gzip", "deflate"):
            status, _, body = self.chat(ORIGIN, coding)
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["object"], "chat.completion")


class UploadTests(DaemonCase):
    """
    A compressed upload through a daemon in front of the OVMS fake, whose
    transcription answers with the SHA-256 of the file it received.
    """

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="dynllm-site-")
        path = os.path.join(directory, "models", "whisper")
        os.makedirs(path)
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["openvino"],
            "backend": {"ovms_binary": fakeovms.launcher(directory)},
            "models": [
                {"name": "whisper", "path": path, "backend": "openvino", "model_type": "transcription", "vram_mb": 100}
            ],
        }
        self.startDaemon(config, directory)

    def test_gzipUpload(self) -> None:
        """
        A gzipped multipart transcription upload is routed by its C{model}
        field and reaches the backend decoded, byte for byte.
        """
        audio = os.urandom(MB) + bytes(MB)
        boundary = "dynllm-boundary"
        upload = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n"
        ).encode() + audio + f"\r\n--{boundary}--\r\n".encode()
        status, _, body = post(
            self.daemon.port,
            "/v1/audio/transcriptions",
            gzip.compress(upload),
            {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Encoding": "gzip"},
        )
        self.assertEqual(status, 200, body)
        self.assertIn(f"{len(audio)} bytes sha256={hashlib.sha256(audio).hexdigest()}", json.loads(body)["text"])


# Deadlines, malformed requests and the connection limit.


class DeadlineTests(SiteTestCase):
    """
    A request's head and body must arrive within C{requestTimeout} of its
    first byte; connections without a request under way are closed after
    C{idleTimeout}.
    """

    HEAD = b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n"

    def test_slowHead(self) -> None:
        """
        A head sent a byte at a time, each byte well within the deadline,
        gets 408 in the envelope once C{requestTimeout} has passed since
        its first byte, and the connection is closed.
        """
        self.serve(requestTimeout=30)
        channel, transport = self.connect()
        for byte in self.HEAD[:29]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        response = Response(transport.value())
        checkEnvelope(self, response.status, response.body, 408, "request_timeout")
        self.assertEqual(response.header("connection"), "close")
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.echo.seen, [])

    def test_slowBody(self) -> None:
        """
        A body that has not arrived whole by the deadline gets 408 too, in
        Anthropic's shape for an Anthropic client.
        """
        self.serve(requestTimeout=5)
        channel, transport = self.connect()
        channel.dataReceived(self.HEAD + b"anthropic-version: 2023-06-01\r\n\r\n12345")
        self.clock.advance(5)
        response = Response(transport.value())
        self.assertEqual(response.status, 408)
        self.assertEqual(json.loads(response.body)["type"], "error")
        self.assertEqual(self.echo.seen, [])

    def test_answerNotBounded(self) -> None:
        """
        Once the request has arrived, its answer may take as long as it
        takes: the deadline and the idle timeout do not cut it.
        """
        self.serve(requestTimeout=5)
        channel, transport = self.connect()
        channel.dataReceived(b"GET /hang HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertEqual(channel.state, HANDLING)
        self.clock.advance(3600)
        self.assertFalse(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_inTime(self) -> None:
        """
        A request that arrives within the deadline is answered, and the
        deadline is gone with it.
        """
        self.serve(requestTimeout=5)
        channel, transport = self.connect()
        channel.dataReceived(self.HEAD)
        self.clock.advance(4)
        channel.dataReceived(b"\r\n0123456789")
        self.assertEqual(Response(transport.value()).status, 200)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds(), 5)  # the idle timeout
        self.assertEqual(channel.state, IDLE)

    def test_idleNew(self) -> None:
        """
        A connection that sends nothing is closed after C{idleTimeout}.
        """
        self.serve(requestTimeout=30, idleTimeout=7)
        channel, transport = self.connect()
        self.clock.advance(6.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_idleBetweenRequests(self) -> None:
        """
        A kept-alive connection is closed C{idleTimeout} after its last
        answer, and the next request's first byte stops that timeout.
        """
        self.serve(requestTimeout=30, idleTimeout=7)
        channel, transport = self.connect()
        channel.dataReceived(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.clock.advance(6)
        channel.dataReceived(b"G")
        self.assertEqual(channel.state, RECEIVING)
        self.clock.advance(6)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"ET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertEqual(len(self.echo.seen), 2)
        self.clock.advance(7)
        self.assertTrue(transport.disconnecting)

    def test_default(self) -> None:
        """
        The idle timeout is the request timeout unless given.
        """
        self.serve(requestTimeout=12)
        self.assertEqual(self.site.idleTimeout, 12)


class MalformedTests(SiteTestCase):
    """
    What twisted.web refuses to parse gets an answer in the envelope.
    """

    def answer(self, data: bytes) -> Response:
        """
        @return: the answer to C{data}, sent on a new connection, which
            must be closing.
        """
        self.serve()
        channel, transport = self.connect()
        channel.dataReceived(data)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.echo.seen, [])
        return Response(transport.value())

    def test_requestLine(self) -> None:
        """
        A request line that is not C{METHOD TARGET VERSION} gets 400
        C{malformed_request}.
        """
        for line in (b"GARBAGE", b"GET /echo", b"GET /echo HTTP/1.1 extra"):
            response = self.answer(line + b"\r\nHost: x\r\n\r\n")
            checkEnvelope(self, response.status, response.body, 400, "malformed_request")
            self.assertEqual(response.header("connection"), "close")

    def test_requestLineHalfClose(self) -> None:
        """
        On a transport that half-closes (as TCP does, so that it is not
        C{disconnecting} while the answer lingers), a malformed request
        line followed by headers in the same read still gets 400
        C{malformed_request}: the lines after it are not parsed.
        """

        class HalfClosing(StringTransport):
            halfClosed = False

            def loseWriteConnection(self) -> None:
                self.halfClosed = True

        self.serve()
        for line in (b"GARBAGE", b"GET /echo", b"GET /echo HTTP/2.0", b"GET  HTTP/1.1"):
            channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            transport = HalfClosing()
            channel.makeConnection(transport)
            self.addCleanup(channel.connectionLost, None)
            channel.dataReceived(line + b"\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            self.assertTrue(transport.halfClosed)
            response = Response(transport.value())
            checkEnvelope(self, response.status, response.body, 400, "malformed_request")
        self.assertEqual(self.echo.seen, [])

    def test_header(self) -> None:
        """
        A header line without a colon, or with a bad name, gets 400
        C{malformed_request}.
        """
        for header in (b"no colon here", b"bad name: x", b"Content-Length: twelve"):
            response = self.answer(b"GET /echo HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
            checkEnvelope(self, response.status, response.body, 400, "malformed_request")

    def test_chunked(self) -> None:
        """
        A chunked body with a bad chunk size gets 400 C{malformed_request}.
        """
        response = self.answer(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        checkEnvelope(self, response.status, response.body, 400, "malformed_request")

    def test_headTooLarge(self) -> None:
        """
        A head larger than twisted.web accepts, in one line or in many,
        gets 431 C{headers_too_large}.
        """
        for head in (b"X-Big: " + b"a" * 20000 + b"\r\n", b"X-Many: aaaaaaaaaaaaaaaaaaaa\r\n" * 1000):
            response = self.answer(b"GET /echo HTTP/1.1\r\n" + head + b"\r\n")
            checkEnvelope(self, response.status, response.body, 431, "headers_too_large")


class ConnectionLimitTests(SiteTestCase):
    """
    At most C{maxConnections} client connections are open; connections
    that hold a place without a whole request give it up to newcomers.
    """

    def test_auto(self) -> None:
        """
        By default the limit is half the soft file-descriptor limit, at
        most L{MAX_CONNECTIONS_CEILING}.
        """
        import resource as rlimit

        soft, _ = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
        self.assertEqual(autoMaxConnections(), min(MAX_CONNECTIONS_CEILING, soft // 2))
        self.serve()
        self.assertEqual(self.site.maxConnections, autoMaxConnections())

    def test_idleMakesRoom(self) -> None:
        """
        At the limit, the connection idle longest between requests is
        closed first (without an answer: it asked nothing), before one
        that is receiving a request or has sent nothing yet.
        """
        self.serve(maxConnections=3)
        kept = []
        for _ in range(2):
            connection = self.connect()
            connection[0].dataReceived(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            kept.append((connection, len(connection[1].value())))
            self.clock.advance(1)
        fresh = self.connect()
        third = self.connect()
        (first, sent), _ = kept
        self.assertTrue(first[1].disconnecting)
        self.assertEqual(len(first[1].value()), sent)
        self.assertFalse(kept[1][0][1].disconnecting)
        self.assertFalse(fresh[1].disconnecting)
        third[0].dataReceived(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(Response(third[1].value()).status, 200)

    def test_slowMakesRoom(self) -> None:
        """
        At the limit with no idle connection, the one whose request began
        earliest gets 503 in the envelope and is closed; a connection busy
        with a whole request is left alone.
        """
        self.serve(maxConnections=3)
        busy = self.connect()
        busy[0].dataReceived(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        slow = []
        for _ in range(2):
            connection = self.connect()
            connection[0].dataReceived(b"GET /echo HTTP/1.1\r\nX: ")
            slow.append(connection)
            self.clock.advance(1)
        newcomer = self.connect()
        response = Response(slow[0][1].value())
        checkEnvelope(self, response.status, response.body, 503, "too_many_connections")
        self.assertEqual(response.header("retry-after"), "1")
        self.assertEqual(slow[1][1].value(), b"")
        self.assertFalse(busy[1].disconnecting)
        newcomer[0].dataReceived(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(Response(newcomer[1].value()).status, 200)
        self.assertEqual(len(self.site.channels), 3)

    def test_freshLast(self) -> None:
        """
        A new connection that has sent nothing yet is pushed out only when
        no other waits, and is told 503 (its request may be on its way).
        """
        self.serve(maxConnections=1)
        fresh = self.connect()
        self.connect()
        response = Response(fresh[1].value())
        checkEnvelope(self, response.status, response.body, 503, "too_many_connections")

    def test_allBusy(self) -> None:
        """
        When every connection is busy with a whole request, a new one is
        answered 503 in the envelope and closed, and the others go on.
        """
        self.serve(maxConnections=2)
        busy = [self.connect() for _ in range(2)]
        for channel, _ in busy:
            channel.dataReceived(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        transport = StringTransport()
        protocol.makeConnection(transport)
        response = Response(transport.value())
        checkEnvelope(self, response.status, response.body, 503, "too_many_connections")
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(any(t.disconnecting for _, t in busy))

    def test_closedLeaveCount(self) -> None:
        """
        A closed connection no longer counts.
        """
        self.serve(maxConnections=2)
        channel, _ = self.connect()
        self.assertEqual(len(self.site.channels), 1)
        channel.connectionLost(None)
        self.assertEqual(len(self.site.channels), 0)


class HostileClientTests(DaemonCase):
    """
    Slow and crowding clients against a real daemon, over real sockets,
    with a low C{server.max_connections} and a short
    C{server.request_timeout_seconds}.
    """

    LIMIT = 16
    TIMEOUT = 2

    def setUp(self) -> None:
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "server": {"max_connections": self.LIMIT, "request_timeout_seconds": self.TIMEOUT},
            "models": [
                {"name": "m", "path": tinyModels()["tiny-llama.gguf"], "backend": "llamacpp", "vram_mb": 100}
            ],
        }
        self.startDaemon(config)

    def slowConnection(self) -> socket.socket:
        """
        @return: a connection that has sent the start of a head, and no
            more.
        """
        connection = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10)
        self.addCleanup(connection.close)
        connection.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        return connection

    def test_slowlorisCannotKeepOthersOut(self) -> None:
        """
        Far more slow-head connections than the limit do not keep a normal
        client out: it is answered at once. Every slow connection is closed
        in bounded time: those pushed out to make room told 503, the rest
        408 once their deadline has passed.
        """
        slow = [self.slowConnection() for _ in range(self.LIMIT * 3)]
        started = time.monotonic()
        status, _, body = request("GET", self.daemon.url + "/health", timeout=5)
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        self.assertLess(time.monotonic() - started, 2)
        answers: dict[str, int] = {}
        for connection in slow:
            connection.settimeout(self.TIMEOUT + 5)
            try:
                answer = connection.recv(4096)
            except ConnectionResetError:
                answer = b""
            kind = answer[:12].decode() or "closed"
            answers[kind] = answers.get(kind, 0) + 1
        self.assertLessEqual(set(answers), {"HTTP/1.1 503", "HTTP/1.1 408"})
        self.assertLessEqual(answers.get("HTTP/1.1 408", 0), self.LIMIT)
        self.assertGreater(answers.get("HTTP/1.1 503", 0), 0)

    def test_slowHeadTimesOut(self) -> None:
        """
        A head that keeps trickling in gets 408 in the envelope after the
        request timeout, and the connection is closed.
        """
        connection = self.slowConnection()
        started = time.monotonic()
        answer = b""
        connection.settimeout(0.3)
        while time.monotonic() - started < self.TIMEOUT + 5:
            try:
                connection.sendall(b"a")
                chunk = connection.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - started
        response = Response(answer)
        checkEnvelope(self, response.status, response.body, 408, "request_timeout")
        self.assertGreaterEqual(elapsed, self.TIMEOUT - 0.5)
        self.assertLess(elapsed, self.TIMEOUT + 4)


class BigBodyDaemonTests(DaemonCase):
    """
    Large and hostile JSON bodies against a real daemon.
    """

    def setUp(self) -> None:
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "models": [
                {"name": "m", "path": tinyModels()["tiny-llama.gguf"], "backend": "llamacpp", "vram_mb": 100}
            ],
        }
        self.startDaemon(config)

    def peakMemory(self) -> int:
        """
        @return: the daemon's peak resident memory so far, in bytes
            (C{VmHWM}, proc(5)).
        """
        assert self.daemon.process is not None
        with open(f"/proc/{self.daemon.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def test_emptyObjectsMemory(self) -> None:
        """
        Four bodies of 16 MB of empty objects at once (whose object trees
        would take about 25 times their size) raise the daemon's peak
        memory by less than one body's size, and each gets its answer (404
        here: the model they name does not exist) in bounded time.
        """
        body = b'{"model": "nope", "x": [' + b",".join([b"{}"] * (16 * MB // 3)) + b"]}"
        self.daemon.get("/v1/models")
        before = self.peakMemory()
        started = time.monotonic()
        statuses: list[int] = []

        def post() -> None:
            statuses.append(
                request("POST", self.daemon.url + "/v1/chat/completions", body,
                        {"Content-Type": "application/json"}, timeout=120)[0]
            )

        threads = [threading.Thread(target=post) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
        self.assertEqual(statuses, [404] * 4)
        self.assertLess(time.monotonic() - started, 120)
        self.assertLess(self.peakMemory() - before, len(body))

    def test_deeplyNested(self) -> None:
        """
        JSON nested 1,000 (and 100,000) levels deep gets 400 C{invalid_json}
        in the envelope, small or large.
        """
        for depth in (1000, 100_000):
            body = b'{"model": "m", "x": ' + b"[" * depth + b"]" * depth + b"}"
            status, _, answer = request(
                "POST", self.daemon.url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
            )
            checkEnvelope(self, status, answer, 400, "invalid_json")
