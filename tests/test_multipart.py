"""
Tests for L{dynllm.multipart}: finding a field of a multipart upload without
reading the upload into memory, and splicing a new value in.
"""

from __future__ import annotations

import io
import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from dynllm import multipart
from dynllm.multipart import MultipartError, SplicedFile, boundary, findField

CT = b"multipart/form-data; boundary=XyZ"


def encode(parts: list[tuple[str, bytes, str | None]], sep: bytes = b"XyZ") -> bytes:
    """
    @param parts: C{(name, value, filename)} triples.
    @return: a multipart/form-data body.
    """
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += b"--" + sep + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n"
        if filename is not None:
            out += b"Content-Type: audio/wav\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + b"--" + sep + b"--\r\n"


class BoundaryTests(SynchronousTestCase):
    """
    L{boundary} reads the boundary of a multipart Content-Type.
    """

    def test_plainAndQuoted(self) -> None:
        """
        The boundary may be quoted or not, and follow other parameters.
        """
        self.assertEqual(boundary(b"multipart/form-data; boundary=abc"), b"abc")
        self.assertEqual(boundary(b'multipart/form-data; charset=x; boundary="a b"'), b"a b")

    def test_notMultipart(self) -> None:
        """
        Another content type, or none, or no boundary, is refused.
        """
        for value in (None, b"application/json", b"multipart/form-data"):
            self.assertRaises(MultipartError, boundary, value)


class FindFieldTests(SynchronousTestCase):
    """
    L{findField} finds a field's value and its place in the body.
    """

    def test_fieldBeforeFile(self) -> None:
        """
        A field that comes before the file is found with its offsets.
        """
        body = encode([("model", b"whisper", None), ("file", b"RIFF" + bytes(1000), "a.wav")])
        found = findField(io.BytesIO(body), CT, "model")
        assert found is not None
        self.assertEqual(found.value, "whisper")
        self.assertEqual(body[found.start : found.end], b"whisper")

    def test_twice(self) -> None:
        """
        A field given twice is refused, however far apart the two are
        (servers differ on which of the two counts).
        """
        for parts in (
            [("model", b"a", None), ("model", b"b", None)],
            [("model", b"a", None), ("file", os.urandom(3 * multipart.BLOCK), "a.wav"), ("model", b"b", None)],
        ):
            with self.assertRaises(MultipartError) as raised:
                findField(io.BytesIO(encode(parts)), CT, "model")
            self.assertIn("more than once", str(raised.exception))

    def test_ambiguousPart(self) -> None:
        """
        A part with two C{Content-Disposition} headers, or two C{name}
        parameters, is refused: python-multipart takes the last of each,
        dynllm would have taken the first.
        """
        for headers in (
            b'Content-Disposition: form-data; name="x"\r\nContent-Disposition: form-data; name="model"',
            b'Content-Disposition: form-data; name="x"; name="model"',
        ):
            body = b"--XyZ\r\n" + headers + b"\r\n\r\n/elsewhere\r\n--XyZ--\r\n"
            self.assertRaises(MultipartError, findField, io.BytesIO(body), CT, "model")

    def test_fieldAfterLargeFile(self) -> None:
        """
        A field after a file larger than the read block is found, and the
        file's bytes (which may look like part headers) are skipped.
        """
        blob = (b"\r\n--XY name=\"model\"\r\n\r\n" + os.urandom(4093)) * 100
        body = encode([("file", blob, "a.wav"), ("language", b"en", None), ("model", b"m-1", None)])
        self.assertGreater(len(body), multipart.BLOCK * 4)
        found = findField(io.BytesIO(body), CT, "model")
        assert found is not None
        self.assertEqual(found.value, "m-1")
        self.assertEqual(body[found.start : found.end], b"m-1")

    def test_valueAcrossBlocks(self) -> None:
        """
        A value that straddles two read blocks is read whole.
        """
        padding = b"p" * (multipart.BLOCK - 150)
        body = encode([("pad", padding, None), ("model", b"straddling-model-name" * 10, None)])
        found = findField(io.BytesIO(body), CT, "model")
        assert found is not None
        self.assertEqual(found.value, "straddling-model-name" * 10)

    def test_missing(self) -> None:
        """
        C{None} when no part has that name (a C{filename} parameter does not
        count as a name).
        """
        body = encode([("file", b"abc", "model"), ("prompt", b"hi", None)])
        self.assertIsNone(findField(io.BytesIO(body), CT, "model"))

    def test_malformed(self) -> None:
        """
        A body without the boundary, or that stops inside a part, is refused.
        """
        self.assertRaises(MultipartError, findField, io.BytesIO(b"hello"), CT, "model")
        body = encode([("model", b"m", None)])
        self.assertRaises(MultipartError, findField, io.BytesIO(body[:50]), CT, "model")

    def test_valueTooLong(self) -> None:
        """
        A C{model} value longer than L{multipart.MAX_VALUE} is refused
        rather than read into memory.
        """
        body = encode([("model", b"m" * (multipart.MAX_VALUE + 10), None)])
        self.assertRaises(MultipartError, findField, io.BytesIO(body), CT, "model")

    def test_spooledFile(self) -> None:
        """
        A body spooled to a real file (as twisted.web does with large ones)
        is read from its start, whatever its position.
        """
        body = encode([("file", os.urandom(300000), "a.wav"), ("model", b"m", None)])
        with tempfile.TemporaryFile() as f:
            f.write(body)
            found = findField(f, CT, "model")
        assert found is not None
        self.assertEqual(found.value, "m")


class SplicedFileTests(SynchronousTestCase):
    """
    L{SplicedFile} is a file with one range replaced.
    """

    def test_readAll(self) -> None:
        """
        Reading it all gives the original with the range replaced.
        """
        original = b"0123456789"
        spliced = SplicedFile(io.BytesIO(original), 3, 5, b"abcdef")
        self.assertEqual(spliced.read(), b"012abcdef56789")

    def test_smallReadsAndLength(self) -> None:
        """
        Small reads give the same bytes, and seeking to the end tells the
        length (which is how C{FileBodyProducer} measures it).
        """
        original = os.urandom(1000)
        spliced = SplicedFile(io.BytesIO(original), 500, 510, b"X")
        expected = original[:500] + b"X" + original[510:]
        self.assertEqual(spliced.seek(0, io.SEEK_END), len(expected))
        spliced.seek(0)
        chunks = []
        while True:
            chunk = spliced.read(7)
            if not chunk:
                break
            chunks.append(chunk)
        self.assertEqual(b"".join(chunks), expected)
