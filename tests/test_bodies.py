"""
Tests for L{dynllm.bodies} and L{dynllm._jsonscan}: what the routes learn
from a JSON body, the limits it must keep, and large bodies examined in a
child process (on the real reactor) so that the daemon neither blocks nor
builds the body's object tree.
"""

from __future__ import annotations

import io
import json
import tempfile
import tracemalloc
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dynllm import errors
from dynllm._jsonscan import MAX_NAME
from dynllm.bodies import (
    EXAMINERS,
    INLINE_BYTES,
    INLINE_CONTAINERS,
    MAX_DEPTH,
    BodyExaminer,
    Examined,
    examineInline,
    isCheap,
)


def nested(depth: int, inner: bytes = b"1", objects: bool = False) -> bytes:
    """
    @return: a body whose C{x} holds arrays (or objects) C{depth - 1}
        levels deep, so that the body is C{depth} levels deep.
    """
    levels = depth - 1
    if objects:
        return b'{"x": ' + b'{"a": ' * levels + inner + b"}" * levels + b"}"
    return b'{"x": ' + b"[" * levels + inner + b"]" * levels + b"}"


class InlineTests(SynchronousTestCase):
    """
    L{examineInline}: the same rules as the child applies.
    """

    def refused(self, body: bytes) -> errors.APIError:
        """
        @return: the 400 that C{body} gets.
        """
        e = self.assertRaises(errors.APIError, examineInline, body)
        self.assertEqual(e.status, 400)
        return e

    def test_fields(self) -> None:
        """
        The top-level C{model} and C{stream} are found, nested ones are not,
        and C{modelSpan} is the byte range of the model's JSON text.
        """
        body = b'{"messages": [{"model": "no", "stream": false}], "stream": true, "model" : "m1"}'
        examined = examineInline(body)
        self.assertEqual(examined, Examined({"model": "m1", "stream": True}, (body.index(b'"m1"'), body.index(b'"m1"') + 4)))

    def test_spanInBytes(self) -> None:
        """
        The span counts bytes of the UTF-8 body, after text that is not
        ASCII and after a byte order mark.
        """
        body = '\ufeff{"content": "h\u00e9llo \u4e16\u754c", "model": "q\u00e9"}'.encode("utf-8")
        start, end = examineInline(body).modelSpan or (0, 0)
        self.assertEqual(json.loads(body[start:end]), "q\u00e9")

    def test_nonScalarModel(self) -> None:
        """
        A C{model} that is an object or array is reported as C{None}.
        """
        self.assertEqual(examineInline(b'{"model": {"a": [1]}}').fields, {"model": None})

    def test_depthLimit(self) -> None:
        """
        Arrays and objects nested L{MAX_DEPTH} levels deep are accepted;
        one more level is 400 C{invalid_json}.
        """
        for objects in (False, True):
            examineInline(nested(MAX_DEPTH, objects=objects))
            e = self.refused(nested(MAX_DEPTH + 1, objects=objects))
            self.assertEqual(e.code, "invalid_json")
            self.assertIn("nested too deeply", e.message)
        examineInline(b'{"x": [1, {"a": ' + b"[" * (MAX_DEPTH - 3) + b"]" * (MAX_DEPTH - 3) + b"}]}")
        self.refused(b'{"x": [1, {"a": ' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}]}")

    def test_duplicateKeys(self) -> None:
        """
        An object with a key twice, at the top or nested, is 400
        C{duplicate_key}.
        """
        for body in (b'{"model": "a", "model": "b"}', b'{"x": [{"a": 1, "a": 2}]}'):
            self.assertEqual(self.refused(body).code, "duplicate_key")

    def test_invalid(self) -> None:
        """
        What is not one JSON object in UTF-8 is 400 C{invalid_json}.
        """
        for body in (b"", b"[]", b'"x"', b"{", b'{"a": 1,}', b'{"a": 1} {}', b"\xff{}", b"{'a': 1}", b'{"a" 1}'):
            self.assertEqual(self.refused(body).code, "invalid_json", body)

    def test_longModel(self) -> None:
        """
        A C{model} longer than any name is refused.
        """
        self.refused(json.dumps({"model": "m" * (MAX_NAME + 1)}).encode())

    def test_noTree(self) -> None:
        """
        What is kept of a body is its depth markers, not its objects: a
        body of 200,000 empty objects is examined in well under its own
        size of memory on top of the text.
        """
        body = b'{"model": "m", "x": [' + b",".join([b"{}"] * 200_000) + b"]}"
        tracemalloc.start()
        try:
            examineInline(body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The text (1 byte a character) and one pointer per element.
        self.assertLess(peak, len(body) * 1 + 200_000 * 8 * 1.3 + 100_000)

    def test_cheap(self) -> None:
        """
        Only bodies small in bytes and in objects and arrays are examined
        in the daemon.
        """
        self.assertTrue(isCheap(100, b'{"a": [1]}'))
        self.assertFalse(isCheap(INLINE_BYTES + 1, b""))
        many = b"[" * (INLINE_CONTAINERS + 1)
        self.assertFalse(isCheap(len(many), many))


class ChildTests(TestCase):
    """
    Bodies that are not cheap are examined in child processes, on the real
    reactor.
    """

    def setUp(self) -> None:
        self.examiner = BodyExaminer(reactor)
        self.spawned = 0
        self.mostAtOnce = 0
        spawn = reactor.spawnProcess

        def counting(*args: Any, **kw: Any) -> Any:
            self.spawned += 1
            self.mostAtOnce = max(self.mostAtOnce, self.examiner.children)
            return spawn(*args, **kw)

        self.patch(reactor, "spawnProcess", counting)

    def spooled(self, body: bytes) -> Any:
        """
        @return: C{body} in a temporary file, as twisted.web spools it,
            left at its end.
        """
        content = tempfile.TemporaryFile()
        self.addCleanup(content.close)
        content.write(body)
        return content

    def large(self, model: str = "m", filler: int = INLINE_BYTES) -> bytes:
        """
        @return: a body too large to examine in the daemon.
        """
        return json.dumps({"messages": [{"role": "user", "content": "x" * filler}], "model": model, "stream": True}).encode()

    @defer.inlineCallbacks
    def test_large(self) -> Any:
        """
        A large body is examined in a child, which finds the same fields
        and span as the daemon would, and leaves the file at its start; the
        Deferred is not fired before the child has answered (the reactor
        is free meanwhile).
        """
        body = self.large("m\u00e9")
        content = self.spooled(body)
        d = self.examiner.examine(content)
        self.assertNoResult(d)
        examined = yield d
        self.assertEqual(self.spawned, 1)
        self.assertFalse(examined.inline)
        expected = examineInline(body)
        self.assertEqual((examined.fields, examined.modelSpan), (expected.fields, expected.modelSpan))
        self.assertEqual(content.tell(), 0)

    @defer.inlineCallbacks
    def test_manyContainers(self) -> Any:
        """
        A small body with more objects and arrays than L{INLINE_CONTAINERS}
        goes to a child too, held in memory as it may be.
        """
        body = b'{"model": "m", "x": [' + b",".join([b"{}"] * (INLINE_CONTAINERS + 1)) + b"]}"
        examined = yield self.examiner.examine(io.BytesIO(body))
        self.assertEqual((examined.inline, examined.fields), (False, {"model": "m"}))

    @defer.inlineCallbacks
    def test_refusals(self) -> Any:
        """
        A child's refusals are the same 400s: nested too deeply (even far
        beyond Python's recursion limit), a key twice, not JSON.
        """
        deep = nested(100_000)
        twice = self.large()[:-1] + b', "model": "n"}'
        broken = self.large()[:-1]
        for body, code in ((deep, "invalid_json"), (twice, "duplicate_key"), (broken, "invalid_json")):
            e = yield self.assertFailure(self.examiner.examine(self.spooled(body)), errors.APIError)
            self.assertEqual((e.status, e.code), (400, code))

    @defer.inlineCallbacks
    def test_bounded(self) -> Any:
        """
        At most L{EXAMINERS} children run at once; the other bodies wait
        their turn and are all examined.
        """
        bodies = [self.large(f"m{i}") for i in range(EXAMINERS * 2 + 1)]
        results = yield defer.gatherResults([self.examiner.examine(self.spooled(b)) for b in bodies])
        self.assertEqual([r.fields["model"] for r in results], [f"m{i}" for i in range(len(bodies))])
        self.assertEqual(self.spawned, len(bodies))
        self.assertLessEqual(self.mostAtOnce, EXAMINERS)

    @defer.inlineCallbacks
    def test_daemonMemory(self) -> Any:
        """
        Examining a large body of empty objects (whose object tree would
        take about 25 times its size) takes next to no memory in the
        daemon.
        """
        body = b'{"model": "m", "x": [' + b",".join([b"{}"] * 2_000_000) + b"]}"
        content = self.spooled(body)
        tracemalloc.start()
        try:
            examined = yield self.examiner.examine(content)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(examined.fields, {"model": "m"})
        self.assertLess(peak, 1024 * 1024)

    @defer.inlineCallbacks
    def test_cancelKills(self) -> Any:
        """
        Cancelling an examination (the client left) kills its child.
        """
        ended: list[Any] = []
        spawn = reactor.spawnProcess

        def watching(protocol: Any, *args: Any, **kw: Any) -> Any:
            processEnded = protocol.processEnded

            def noting(reason: Any) -> None:
                ended.append(reason)
                processEnded(reason)

            protocol.processEnded = noting
            return spawn(protocol, *args, **kw)

        self.patch(reactor, "spawnProcess", watching)
        d = self.examiner.examine(self.spooled(self.large(filler=20 * INLINE_BYTES)))
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        while not ended:
            yield deferLater(0.01)
        self.assertIn("signal 9", str(ended[0].value))


def deferLater(seconds: float) -> defer.Deferred[None]:
    """
    @return: a Deferred that fires after C{seconds} on the real reactor.
    """
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
