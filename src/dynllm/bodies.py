# -*- test-case-name: tests.test_bodies -*-
"""
Examining JSON request bodies without stalling the reactor.

The routes need three things from a JSON body: that it is a JSON object
they accept (L{dynllm._jsonscan}: valid, no key twice, nested at most
L{MAX_DEPTH} levels), its top-level C{model} (and C{stream}), and where the
C{model} value is, to replace it for a backend that knows the model by
another name. The body itself is relayed as it was received (held once, in
memory or in twisted.web's temporary file), never rebuilt from a parsed
tree.

Parsing is CPU work that grows with the body, and Python's C{json} holds
the GIL: a 55 MB body takes about half a second, during which no other
stream is relayed. So a body is examined in the daemon only when that is
cheap: at most L{INLINE_BYTES} and at most L{INLINE_CONTAINERS} objects and
arrays (counted by C{bytes.count}, an upper bound; each costs a Python
call, about 2-3 us). Any other is examined by a child process (C{python -I
-S _jsonscan.py}) that reads the body's temporary file through its
standard input (the file descriptor is passed; no byte goes through the
reactor) and writes back one short line. At most L{EXAMINERS} children run
at once; more bodies wait for a turn. A child's address space is limited
(see L{dynllm._jsonscan.main}).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from typing import IO, Any

from attrs import frozen
from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from dynllm import _jsonscan, errors
from dynllm._jsonscan import MAX_DEPTH, BodyError

__all__ = ["MAX_DEPTH", "INLINE_BYTES", "INLINE_CONTAINERS", "EXAMINERS", "Examined", "BodyExaminer", "examineInline"]

#: The largest body examined in the daemon.
INLINE_BYTES = 256 * 1024

#: The most C{{} and C{[} bytes a body examined in the daemon may hold.
INLINE_CONTAINERS = 1000

#: How many child examiners run at once.
EXAMINERS = 2

#: The largest answer a child may write (its answer is a few hundred bytes).
MAX_ANSWER = 64 * 1024


@frozen
class Examined:
    """
    What the routes need from a JSON body.

    @ivar fields: The top-level C{model} and C{stream} values that are
        present: strings, numbers, booleans or C{None} (also for an array or
        object).
    @ivar modelSpan: The byte range of the C{model} value's JSON text in
        the body, or C{None} if there is no C{model}.
    @ivar inline: Whether it was examined in the daemon.
    """

    fields: dict[str, Any]
    modelSpan: tuple[int, int] | None
    inline: bool = True


def _toAPIError(e: BodyError) -> errors.APIError:
    return errors.badRequest(e.message, code=e.code)


def _examined(result: dict[str, Any], inline: bool) -> Examined:
    span = result["span"]
    return Examined(result["fields"], None if span is None else (span[0], span[1]), inline)


def examineInline(body: bytes) -> Examined:
    """
    Examine C{body} here and now.

    @raise errors.APIError: 400 C{invalid_json} or C{duplicate_key}.
    """
    try:
        return _examined(_jsonscan.scan(body), True)
    except BodyError as e:
        raise _toAPIError(e) from None


def isCheap(size: int, body: bytes) -> bool:
    """
    @param size: The body's length.
    @param body: The body, if C{size} is at most L{INLINE_BYTES}.
    @return: whether the body may be examined in the daemon.
    """
    return size <= INLINE_BYTES and body.count(b"{") + body.count(b"[") <= INLINE_CONTAINERS


class _Examiner(ProcessProtocol):
    """
    Collects a child examiner's answer.
    """

    def __init__(self, done: defer.Deferred[Examined]) -> None:
        self.done = done
        self.out: list[bytes] = []
        self.size = 0
        self.errors: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= MAX_ANSWER:
            self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        if sum(map(len, self.errors)) < MAX_ANSWER:
            self.errors.append(data)

    def processEnded(self, reason: Failure) -> None:
        if self.done.called:
            return
        try:
            answer = json.loads(b"".join(self.out))
        except ValueError:
            stderr = b"".join(self.errors).decode("utf-8", "replace").strip().splitlines()
            problem = stderr[-1] if stderr else str(reason.value)
            self.done.errback(
                errors.APIError(500, f"the request body could not be examined: {problem}", "server_error")
            )
            return
        if "error" in answer:
            code, message = answer["error"]
            self.done.errback(errors.badRequest(message, code=code))
            return
        self.done.callback(_examined(answer, False))


class BodyExaminer:
    """
    Examines JSON bodies: cheap ones here, the rest in child processes, at
    most C{concurrency} at once.
    """

    def __init__(self, reactor: Any, concurrency: int = EXAMINERS) -> None:
        """
        @param reactor: Spawns the children (C{IReactorProcess}).
        """
        self.reactor = reactor
        self.semaphore = defer.DeferredSemaphore(concurrency)
        self.children = 0

    def examine(self, content: IO[bytes]) -> defer.Deferred[Examined]:
        """
        Examine the body in C{content} (which is left at its start).

        @return: a Deferred of the L{Examined} body; it fails with an
            L{errors.APIError} (400) for a body the routes do not accept.
            Cancelling it kills the child examining the body, if any.
        """
        size = content.seek(0, io.SEEK_END)
        content.seek(0)
        if size <= INLINE_BYTES:
            body = content.read()
            content.seek(0)
            if isCheap(size, body):
                try:
                    return defer.succeed(examineInline(body))
                except errors.APIError as e:
                    return defer.fail(e)
        return self.semaphore.run(self._inChild, content)

    def _inChild(self, content: IO[bytes]) -> defer.Deferred[Examined]:
        """
        Examine C{content} in a child process that reads it from its
        standard input.
        """
        try:
            fileno = content.fileno()
        except (AttributeError, io.UnsupportedOperation):
            # In memory: the child needs a file.
            spooled = tempfile.TemporaryFile()
            spooled.write(content.read())
            content.seek(0)
            content = spooled
            fileno = content.fileno()
        content.seek(0)
        process: list[Any] = []

        def cancel(d: defer.Deferred[Examined]) -> None:
            if process:
                try:
                    process[0].signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass

        done: defer.Deferred[Examined] = defer.Deferred(cancel)
        protocol = _Examiner(done)
        script = _jsonscan.__file__
        self.children += 1
        process.append(
            self.reactor.spawnProcess(
                protocol,
                sys.executable,
                [sys.executable, "-I", "-S", script],
                env={"PATH": os.environ.get("PATH", "")},
                childFDs={0: fileno, 1: "r", 2: "r"},
            )
        )

        def rewind(result: Any) -> Any:
            self.children -= 1
            content.seek(0)
            return result

        return done.addBoth(rewind)
