# -*- test-case-name: tests.test_routes -*-
"""
Errors that dynllm itself answers, in the OpenAI envelope::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

or, on the Anthropic routes, in Anthropic's, which is what its clients parse
(https://docs.anthropic.com/en/api/errors)::

    {"type": "error", "error": {"type": ..., "message": ...}}

Each failure that reaches a client is an L{APIError}; the routes turn it into
a response with L{APIError.body} and L{APIError.headers}.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from attrs import evolve, field, frozen

from dynllm.exceptions import (
    LAST_OUTPUT,
    LoadFailed,
    LoadTimedOut,
    ModelBusy,
    ModelUnloaded,
    NoCapacity,
    SchedulerError,
    ShuttingDown,
    UnknownModel,
    UpstreamTimeout,
)

#: The shapes of an error answer.
OPENAI, ANTHROPIC = "openai", "anthropic"

#: Anthropic's error type for each status dynllm answers
#: (https://docs.anthropic.com/en/api/errors); other statuses are C{api_error}.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


@frozen(auto_exc=True)
class APIError(Exception):
    """
    A request failed in a way the client should be told about.

    @ivar status: The HTTP status code.
    @ivar message: A sentence for people.
    @ivar type: The OpenAI error type (C{invalid_request_error}, ...).
    @ivar code: A short machine-readable code.
    @ivar param: The request field at fault, if any.
    @ivar retryAfter: Seconds for a C{Retry-After} header, if any.
    @ivar shape: L{OPENAI} or L{ANTHROPIC}: the envelope of L{body}.
    """

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retryAfter: int | None = field(default=None, kw_only=True)
    shape: str = field(default=OPENAI, kw_only=True)

    def body(self) -> bytes:
        """
        @return: the JSON envelope.
        """
        if self.shape == ANTHROPIC:
            kind = ANTHROPIC_TYPES.get(self.status, "api_error")
            return json.dumps({"type": "error", "error": {"type": kind, "message": self.message}}).encode("utf-8")
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        ).encode("utf-8")

    def headers(self) -> dict[bytes, bytes]:
        """
        @return: the response headers that go with L{body}.
        """
        h = {b"Content-Type": b"application/json"}
        if self.retryAfter is not None:
            h[b"Retry-After"] = str(self.retryAfter).encode("ascii")
        return h


def reasonPhrase(status: int) -> bytes:
    """
    @return: the reason phrase of C{status} (RFC 9110 section 15), from
        Python's C{http.HTTPStatus}, which knows codes twisted.web does not
        (421, 431): C{b"Misdirected Request"}; C{b"Error"} for an unknown
        one.
    """
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Error"


def article(word: str) -> str:
    """
    @return: C{word} after its indefinite article, as it is read:
        C{"an embedding"}, C{"an llm"} ("an L-L-M"), C{"a rerank"}.
    """
    return ("an " if word[:1].lower() in "aeiou" or word[:2].lower() in ("ll",) else "a ") + word


def inShapeOf(error: APIError, requestHeaders: Any) -> APIError:
    """
    @param requestHeaders: The C{Headers} of a request that no route of a
        known API has taken (a refused body, an unknown path).
    @return: C{error} in Anthropic's shape if the request carries
        C{anthropic-version}, which every Anthropic client sends, else as
        it is.
    """
    if requestHeaders.hasHeader(b"anthropic-version"):
        return evolve(error, shape=ANTHROPIC)
    return error


def badRequest(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """
    @return: a 400 for a request that cannot be served as sent.
    """
    return APIError(400, message, "invalid_request_error", code, param)


def modelNotFound(name: str) -> APIError:
    """
    @return: a 404 for a model the configuration does not declare.
    """
    return APIError(
        404, f"The model {name!r} does not exist", "invalid_request_error", "model_not_found", "model"
    )


#: An absolute path (POSIX), as an error from the system or a backend
#: names it: a slash that starts a word, then non-blank characters.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?:[^\s'\"`:;,()\[\]{}<>/]+/)*([^\s'\"`:;,()\[\]{}<>/]+)/?")


def withoutPaths(text: str) -> str:
    """
    @return: C{text} with each absolute path cut to its last part
        (C{/home/me/llama.cpp/llama-server} becomes C{llama-server}): a
        client learns what failed without learning the machine's layout.
        URL paths (after a host) are left as they are.
    """
    return _ABSOLUTE_PATH.sub(r"\1", text)


def logsHint(name: str) -> str:
    """
    @return: where an admin finds model C{name}'s backend output.
    """
    return f"its backend's output is at /admin/models/{name}/logs and in dynllm's log"


def loadFailed(error: LoadFailed) -> APIError:
    """
    @return: a 502 for a model that could not be loaded: the reason,
        without paths and without the backend's output (which may hold
        paths, keys' file names, or lines of an earlier run), and where
        the output is.
    """
    return backendFailed(f"{withoutPaths(error.reason)}; {logsHint(error.name)}")


def modelFailed(name: str, lastError: str | None) -> APIError:
    """
    @param lastError: The model's C{last_error} (L{LoadFailed}'s text, or
        another sentence), or C{None}.
    @return: a 503 C{model_failed} for a model whose last load failed, for
        a request that does not load it (KServe's readiness): the reason's
        first sentence, without paths or output, and where the output is.
    """
    reason = (lastError or "").split(LAST_OUTPUT)[0].strip()
    because = f": {withoutPaths(reason)}" if reason else ""
    return APIError(503, f"model {name!r} failed to load{because}; {logsHint(name)}", "server_error", "model_failed")


def describeError(error: BaseException) -> str:
    """
    @return: a sentence for C{error}, never a Python repr: the messages of
        the failures a Twisted web client error wraps (C{ResponseFailed},
        C{RequestTransmissionFailed}: their C{str} is a list of
        C{Failure} reprs), else C{str(error)}, else the exception's name.
    """
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(withoutPaths(getattr(r, "getErrorMessage", lambda: str(r))()) for r in reasons)
    return withoutPaths(str(error)) or type(error).__name__


def backendFailed(message: str) -> APIError:
    """
    @return: a 502 for a backend that died or answered nothing usable.
    """
    return APIError(502, message, "server_error", "backend_error")


def noCapacity(message: str, retryAfter: int) -> APIError:
    """
    @return: a 503 for memory that could not be freed in time.
    """
    return APIError(503, message, "server_error", "model_capacity", retryAfter=retryAfter)


def loadTimedOut(message: str) -> APIError:
    """
    @return: a 504 for a backend that did not become ready in time.
    """
    return APIError(504, message, "server_error", "load_timeout")


def fromScheduler(error: SchedulerError) -> APIError:
    """
    The one mapping of the scheduler's exceptions to HTTP.

    @return: the L{APIError} a client gets for C{error}: 404
        C{model_not_found} for L{UnknownModel}, 409 C{model_busy} or
        C{model_loading} for L{ModelBusy}, 502 C{backend_error} for
        L{LoadFailed} (L{loadFailed}: no output, no paths), 504 C{load_timeout} for L{LoadTimedOut}, 503
        C{model_capacity} with C{Retry-After} for L{NoCapacity}, 503
        C{shutting_down} for L{ShuttingDown}, 503 C{model_unloaded} for
        L{ModelUnloaded}, 504 C{upstream_timeout} for L{UpstreamTimeout},
        and 500 for any other.
    """
    message = str(error)
    if isinstance(error, UnknownModel):
        return modelNotFound(error.name)
    if isinstance(error, ModelBusy):
        code = "model_loading" if error.loading else "model_busy"
        # The admin unload's way round it.
        hint = '; send "force": true to stop it anyway (its requests then get 503)'
        return APIError(409, message + hint, "invalid_request_error", code)
    if isinstance(error, LoadFailed):
        return loadFailed(error)
    if isinstance(error, LoadTimedOut):
        return loadTimedOut(message)
    if isinstance(error, NoCapacity):
        return noCapacity(message, error.retryAfter)
    if isinstance(error, ShuttingDown):
        return APIError(503, message, "server_error", "shutting_down")
    if isinstance(error, ModelUnloaded):
        return APIError(503, message, "server_error", "model_unloaded")
    if isinstance(error, UpstreamTimeout):
        return APIError(504, message, "server_error", "upstream_timeout")
    return APIError(500, message, "server_error")
