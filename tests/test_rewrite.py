"""
Tests for L{dynllm.rewrite}: renaming the model between its public name and
the name a backend knows it by.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from dynllm.rewrite import NameRewriter, jsonSpellings

PATH = "/models/tiny llm"


def frames(path: str) -> bytes:
    """
    @return: an SSE stream of three chunks naming C{path}, as C{transformers
        serve} writes it (C{json.dumps} spacing, no C{[DONE]}).
    """
    out = b""
    for i in range(3):
        out += b"data: " + json.dumps({"model": path, "choices": [{"delta": {"content": str(i)}}]}).encode()
        out += b"\n\n"
    return out


class NameRewriterTests(SynchronousTestCase):
    """
    L{NameRewriter} renames the backend's name back to the alias in a
    body that arrives in pieces.
    """

    def feedAll(self, rewriter: NameRewriter, pieces: list[bytes]) -> list[bytes]:
        out = [rewriter.feed(p) for p in pieces]
        out.append(rewriter.flush())
        return out

    def test_wholeBody(self) -> None:
        """
        A JSON body in one piece is renamed.
        """
        rewriter = NameRewriter(PATH, "tiny")
        body = json.dumps({"model": PATH, "object": "chat.completion"}).encode()
        self.assertEqual(
            json.loads(b"".join(self.feedAll(rewriter, [body]))), {"model": "tiny", "object": "chat.completion"}
        )

    def test_everySplit(self) -> None:
        """
        However the stream is cut into pieces, the result is the stream
        renamed.
        """
        stream = frames(PATH)
        expected = frames("tiny")
        for cut in range(1, len(stream)):
            rewriter = NameRewriter(PATH, "tiny")
            self.assertEqual(b"".join(self.feedAll(rewriter, [stream[:cut], stream[cut:]])), expected, cut)
        rewriter = NameRewriter(PATH, "tiny")
        self.assertEqual(b"".join(self.feedAll(rewriter, [bytes([b]) for b in stream])), expected)

    def test_framesNotDelayed(self) -> None:
        """
        A piece that ends a frame is passed on whole: nothing is held back
        for the next piece.
        """
        rewriter = NameRewriter(PATH, "tiny")
        stream = frames(PATH)
        first = stream[: stream.index(b"\n\n") + 2]
        self.assertEqual(rewriter.feed(first), frames("tiny")[: len(first) - len(PATH) + 4])

    def test_variants(self) -> None:
        """
        Other spellings of the name (with C{@main}) are renamed too, and a
        name that merely starts like the path is left alone.
        """
        rewriter = NameRewriter(PATH, "tiny", (PATH + "@main",))
        body = json.dumps([PATH + "@main", PATH, PATH + "2"]).encode()
        self.assertEqual(json.loads(b"".join(self.feedAll(rewriter, [body]))), ["tiny", "tiny", PATH + "2"])


class SpellingsTests(SynchronousTestCase):
    """
    A name that is not plain ASCII, or holds C{/}, has several JSON
    spellings, and the backend's name is renamed in all of them.
    """

    NAME = "/models/mod\u00e8le \u6a21\u578b"

    def test_spellings(self) -> None:
        """
        Raw UTF-8, lower and upper case C{\\u} escapes, and C{\\/}, are all
        spellings that decode to the name.
        """
        spellings = jsonSpellings(self.NAME)
        self.assertIn(json.dumps(self.NAME, ensure_ascii=False).encode(), spellings)
        self.assertIn(json.dumps(self.NAME).encode(), spellings)
        self.assertIn(b'"\\/models\\/mod\\u00E8le \\u6A21\\u578B"', spellings)
        for spelling in spellings:
            self.assertEqual(json.loads(spelling), self.NAME)

    def test_renamedInEverySpelling(self) -> None:
        """
        A body that gives the name raw (as llama.cpp and JavaScript write
        it) or escaped, split anywhere, names only the alias.
        """
        for spelling in jsonSpellings(self.NAME):
            body = b'data: {"model":' + spelling + b',"x":1}\n\n'
            for cut in range(1, len(body)):
                rewriter = NameRewriter(self.NAME, "alias")
                out = rewriter.feed(body[:cut]) + rewriter.feed(body[cut:]) + rewriter.flush()
                self.assertEqual(out, b'data: {"model":"alias","x":1}\n\n', (spelling, cut))
