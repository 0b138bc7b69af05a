# -*- test-case-name: tests.test_controls -*-
"""
Per-request controls of the scheduler, read from headers that any OpenAI or
Anthropic SDK can send (C{extra_headers}, C{default_headers})::

    X-DynLLM-Queue-Timeout: SECONDS   how long to wait for memory; 0 answers
                                      503 at once when the model cannot be
                                      loaded now (for gateways that fail
                                      over to another host)
    X-DynLLM-Priority: N              the request's place in the queue
                                      (an integer; higher is served first)
    X-DynLLM-Keep-Alive: SECONDS|-1   the model's idle timeout from this
                                      request on (-1: never idle-unloaded;
                                      0: unloaded as soon as it is idle),
                                      like Ollama's keep_alive

They are dynllm's own: never passed to a backend.
"""

from __future__ import annotations

import math
import re

from twisted.web.http_headers import Headers

from dynllm import errors
from dynllm.lease import RequestOptions

QUEUE_TIMEOUT = b"x-dynllm-queue-timeout"
PRIORITY = b"x-dynllm-priority"
KEEP_ALIVE = b"x-dynllm-keep-alive"

#: The control headers, lower-case.
HEADERS = frozenset({QUEUE_TIMEOUT, PRIORITY, KEEP_ALIVE})

#: Seconds as the headers take them: a plain decimal number.
_SECONDS = re.compile(rb"\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*\Z")
_INTEGER = re.compile(rb"\s*[+-]?\d{1,18}\s*\Z")

#: The longest queue timeout or keep-alive accepted, in seconds (a year).
MAX_SECONDS = 365 * 24 * 3600.0


def _one(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    if values is None:
        return None
    if len(values) > 1:
        raise _bad(name, "is given more than once")
    return values[0]


def _bad(name: bytes, problem: str) -> errors.APIError:
    spelled = "-".join(part.capitalize() for part in name.decode("ascii").split("-")).replace("Dynllm", "DynLLM")
    return errors.badRequest(f"header {spelled} {problem}", param=spelled, code="invalid_header")


def _seconds(headers: Headers, name: bytes, allowNever: bool) -> float | None:
    raw = _one(headers, name)
    if raw is None:
        return None
    expected = "a number of seconds" + (", or -1 for never" if allowNever else "")
    if not _SECONDS.match(raw):
        raise _bad(name, f"must be {expected}, not {raw.decode('latin-1')!r}")
    value = float(raw)
    if allowNever and value == -1:
        return -1.0
    if value < 0 or not math.isfinite(value) or value > MAX_SECONDS:
        raise _bad(name, f"must be {expected} (at most {MAX_SECONDS:.0f}), not {raw.decode('latin-1')!r}")
    return value


def requestOptions(headers: Headers) -> RequestOptions:
    """
    Read a request's controls.

    @param headers: The request's headers.
    @return: the L{RequestOptions} they ask for; C{None} fields for headers
        not given.
    @raise errors.APIError: 400 C{invalid_header}, naming the header, for a
        value that is not a number (an integer for the priority), a negative
        time (but C{-1} for the keep-alive), one above L{MAX_SECONDS}, or a
        header given twice.
    """
    priority: int | None = None
    raw = _one(headers, PRIORITY)
    if raw is not None:
        if not _INTEGER.match(raw):
            raise _bad(PRIORITY, f"must be an integer, not {raw.decode('latin-1')!r}")
        priority = int(raw)
    return RequestOptions(
        queueTimeout=_seconds(headers, QUEUE_TIMEOUT, allowNever=False),
        priority=priority,
        keepAlive=_seconds(headers, KEEP_ALIVE, allowNever=True),
    )
