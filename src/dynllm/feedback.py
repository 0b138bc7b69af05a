# -*- test-case-name: tests.test_feedback -*-
"""
Loading feedback: what a streamed request sees while its model loads.

A request that asks for a stream (C{"stream": true}) and whose model is not
ready at once (loading, or queued for memory) gets its status line and SSE
headers at once, then one SSE comment a second::

    : dynllm: loading MODEL, 3 s

until its lease arrives; the stream then carries the backend's events. SSE
clients skip comments (the HTML standard's event-stream interpretation; the
C{openai} and C{anthropic} SDKs' C{SSEDecoder.decode} in C{_streaming.py}
return nothing for a line that starts with C{:}), so a client sees the
response begin at once and its read timeout does not fire during a long
load.

The status (200) is gone by then, so a failure that follows (the load
fails, the backend answers an error status or cannot be reached) ends the
stream with one error event in the API's own shape:

    - OpenAI (and every API but Anthropic's)::

        data: {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

      on which the C{openai} SDK raises C{openai.APIError} with the message
      (C{Stream.__stream__} in C{openai/_streaming.py}: a data object with
      an C{error} raises);

    - Anthropic (C{/v1/messages})::

        event: error
        data: {"type": "error", "error": {"type": ..., "message": ...}}

      on which the C{anthropic} SDK raises C{anthropic.APIStatusError}
      whose message holds the body (C{Stream.__stream__} in
      C{anthropic/_streaming.py}: an C{error} event raises).

This module knows nothing of the scheduler or the backends: the routes give
it the request, the Deferred of the lease, and the failures to report.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import evolve
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.server import Request

from dynllm import errors
from dynllm.exceptions import SchedulerError
from dynllm.logs import logger
from dynllm.proxy import BackendStatus

log = logger(__name__)


#: Seconds between two loading comments.
INTERVAL = 1.0

#: The response headers of a stream started before its model was ready:
#: those the relay sets for a backend's SSE answer (see
#: L{dynllm.proxy.forward}), with the content type.
HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache"),
    (b"X-Accel-Buffering", b"no"),
)

#: Characters of a backend's error body kept in a message made from it.
MAX_MESSAGE = 2000


def loadingComment(model: str, seconds: int) -> bytes:
    """
    @param model: The model's configured name.
    @param seconds: Whole seconds waited so far.
    @return: the SSE comment C{: dynllm: loading MODEL, N s} and the blank
        line that ends it. Line breaks in the name (a YAML name may hold
        any) become spaces, so that the comment stays one line.
    """
    oneLine = " ".join(model.splitlines())
    return f": dynllm: loading {oneLine}, {seconds} s\n\n".encode("utf-8")


def errorEvent(error: errors.APIError) -> bytes:
    """
    @return: C{error} as the one SSE event that ends a stream in its
        L{errors.APIError.shape} (see the module's docstring): its
        L{errors.APIError.body} on one C{data:} line (JSON escapes line
        breaks), after C{event: error} for Anthropic's.
    """
    if error.shape == errors.ANTHROPIC:
        return b"event: error\ndata: " + error.body() + b"\n\n"
    return b"data: " + error.body() + b"\n\n"


def backendErrorEvent(failure: BackendStatus, shape: str) -> bytes:
    """
    The event that tells a client of a backend's error answer, whose
    status could not be sent.

    @param shape: L{errors.OPENAI} or L{errors.ANTHROPIC}.
    @return: on OpenAI's shape, a backend's own C{{"error": {...}}} object
        as it is (llama-server, OVMS and C{transformers serve} answer in
        it); otherwise an error of the backend's status whose message is
        the backend's (its C{error.message}, or its body as text), in
        C{shape}.
    """
    try:
        parsed: Any = json.loads(failure.body)
    except ValueError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        error = {}
    message = error.get("message")
    if shape == errors.OPENAI and isinstance(message, str):
        return b"data: " + json.dumps({"error": error}).encode("utf-8") + b"\n\n"
    if not isinstance(message, str) or not message:
        text = failure.body.decode("utf-8", "replace").strip()[:MAX_MESSAGE]
        message = text or f"the backend answered {failure.status}"
    kind = error.get("type")
    apiError = errors.APIError(
        failure.status,
        message,
        kind if isinstance(kind, str) else "server_error",
        "backend_error",
        shape=shape,
    )
    return errorEvent(apiError)


class LoadingStream:
    """
    The response of a streamed request that waits for its model: its SSE
    headers at once, a loading comment every L{INTERVAL} seconds while it
    waits, and an error event if it fails.

    Use: L{begin}; await the lease (the comments go on meanwhile, and
    after it until L{stopComments}: the backend may still take a while to
    answer, a llama-server sends its headers with its first token); relay
    the backend's body into the request (L{dynllm.proxy.forward} with
    C{started=True} and C{onResponse=stream.stopComments}); on a failure,
    L{fail}; in any case L{stopComments} at the end. The request is
    finished by its caller (Klein, when the route returns).
    """

    def __init__(self, request: Request, model: str, clock: IReactorTime, shape: str) -> None:
        """
        @param model: The model's configured name, for the comments.
        @param clock: Times the comments.
        @param shape: The shape of the error event (L{errors.OPENAI} or
            L{errors.ANTHROPIC}).
        """
        self._request = request
        self._model = model
        self._clock = clock
        self._shape = shape
        self._began = 0.0
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock

    def begin(self) -> None:
        """
        Send the status line (200) and the SSE headers (L{HEADERS}) now, and
        start the comments.
        """
        self._request.setResponseCode(200)
        for name, value in HEADERS:
            self._request.responseHeaders.setRawHeaders(name, [value])
        self._request.write(b"")
        self._began = self._clock.seconds()
        self._ticker.start(INTERVAL, now=False)

    def _tick(self) -> None:
        if self._request.channel is not None:
            waited = int(self._clock.seconds() - self._began)
            self._request.write(loadingComment(self._model, waited))

    def stopComments(self) -> None:
        """
        Send no more comments: the backend's answer has begun (or the
        stream is over), and a comment must never fall between its frames.
        """
        if self._ticker.running:
            self._ticker.stop()

    def fail(self, reason: Exception) -> None:
        """
        End the stream with the error event that says what C{reason} was:
        a scheduler's failure (through L{errors.fromScheduler}), an
        L{errors.APIError} (the relay's 502), a backend's error answer
        (L{BackendStatus}), or anything else (logged; a 500).
        """
        self.stopComments()
        if isinstance(reason, BackendStatus):
            event = backendErrorEvent(reason, self._shape)
        else:
            if isinstance(reason, SchedulerError):
                error = errors.fromScheduler(reason)
            elif isinstance(reason, errors.APIError):
                error = reason
            else:
                log.failure("a stream that waited for {model} failed", Failure(reason), model=self._model)
                error = errors.APIError(500, f"internal error: {reason}", "server_error")
            event = errorEvent(evolve(error, shape=self._shape))
        if self._request.channel is not None:
            self._request.write(event)
