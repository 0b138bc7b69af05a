# -*- test-case-name: tests.test_multipart -*-
"""
Finding one field of a C{multipart/form-data} upload without reading the
upload into memory.

The audio endpoints take a multipart body whose C{model} field names the
model, next to a file that may be large. twisted.web has already spooled
the body (to memory when small, to a temporary file otherwise); this module
reads it in blocks, once, stops as soon as the field is found, and records
where the field's value lies so that it can be replaced on the way out (see
L{SplicedFile}) while every other byte passes through unchanged.
"""

from __future__ import annotations

import io
import re
from typing import IO

from attrs import frozen

#: Bytes read from the spooled body at a time.
BLOCK = 65536

#: Longest part header block we accept (the headers, not the content).
MAX_HEADERS = 16384

#: Longest field value we accept for the field we look for.
MAX_VALUE = 4096


class MultipartError(ValueError):
    """
    The body is not the C{multipart/form-data} its C{Content-Type} says.
    """


@frozen
class FieldValue:
    """
    A field found in a multipart body.

    @ivar value: The field's value, decoded from UTF-8.
    @ivar start: The offset in the body of the value's first byte.
    @ivar end: The offset just past the value's last byte.
    """

    value: str
    start: int
    end: int


_BOUNDARY = re.compile(rb'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"|(?:^|;)\s*name=([^;\s]+)', re.IGNORECASE)


def boundary(contentType: bytes | None) -> bytes:
    """
    @param contentType: The request's C{Content-Type} header.
    @return: the multipart boundary it declares.
    @raise MultipartError: if it is not C{multipart/form-data} with a boundary.
    """
    if not contentType or not contentType.lower().startswith(b"multipart/form-data"):
        raise MultipartError("the request body must be multipart/form-data")
    match = _BOUNDARY.search(contentType)
    if match is None:
        raise MultipartError("the multipart/form-data Content-Type has no boundary")
    found: bytes = match.group(1) or match.group(2)
    if not 0 < len(found) <= 200:
        raise MultipartError("the multipart boundary is empty or too long")
    return found


class _Reader:
    """
    Reads a file forward in blocks, keeping only what is not yet consumed.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._buffer = b""
        self._offset = 0  # the body offset of _buffer[0]
        self._eof = False

    def _more(self) -> bool:
        if self._eof:
            return False
        data = self._file.read(BLOCK)
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    def find(self, needle: bytes, limit: int | None = None) -> int | None:
        """
        @param limit: With a limit, every byte up to C{needle} is kept for
            L{take}, and the search gives up after C{limit} bytes. Without
            one, bytes that cannot be part of C{needle} are dropped as the
            search goes, so that memory stays bounded.
        @return: the body offset of the next C{needle}, or C{None} at the
            end of the body or past the limit.
        """
        while True:
            index = self._buffer.find(needle)
            if index >= 0:
                if limit is not None and index > limit:
                    return None
                return self._offset + index
            if limit is not None:
                if len(self._buffer) > limit + len(needle):
                    return None
            else:
                drop = max(len(self._buffer) - (len(needle) - 1), 0)
                self._buffer = self._buffer[drop:]
                self._offset += drop
            if not self._more():
                return None

    def take(self, upTo: int) -> bytes:
        """
        @return: the bytes from the current position to body offset C{upTo},
            which L{find} has seen.
        """
        count = upTo - self._offset
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        self._offset = upTo
        return data

    def skip(self, count: int) -> None:
        while len(self._buffer) < count and self._more():
            pass
        self.take(self._offset + min(count, len(self._buffer)))

    def peek(self, count: int) -> bytes:
        while len(self._buffer) < count and self._more():
            pass
        return self._buffer[:count]


def findField(body: IO[bytes], contentType: bytes | None, name: str) -> FieldValue | None:
    """
    Find field C{name} in a multipart body, and make sure that it is there
    only once: servers disagree on which of two fields of one name counts
    (C{transformers serve} takes the last), so a body that names its model
    twice could be routed by one and served by the other.

    @param body: The body, positioned anywhere; it is read from the start,
        to the end (in blocks of L{BLOCK} bytes, never whole).
    @param contentType: The request's C{Content-Type}.
    @return: the field, or C{None} if the body has no such field.
    @raise MultipartError: if the body is not well-formed multipart, has
        the field twice, or the field's value is too long or not UTF-8.
    """
    delimiter = b"--" + boundary(contentType)
    wanted = name.encode("utf-8")
    body.seek(0)
    reader = _Reader(body)
    first = reader.find(delimiter)
    if first is None:
        raise MultipartError("the multipart body has no part")
    reader.take(first)
    found: FieldValue | None = None
    while True:
        reader.skip(len(delimiter))
        if reader.peek(2) == b"--":
            return found  # the close delimiter: no more parts
        end = reader.find(b"\r\n\r\n", MAX_HEADERS)
        if end is None:
            raise MultipartError("a multipart part has no end of headers")
        headers = reader.take(end)
        reader.skip(4)
        valueStart = end + 4
        isWanted = _partName(headers) == wanted
        if isWanted and found is not None:
            raise MultipartError(f"the {name!r} field is given more than once")
        next = reader.find(b"\r\n" + delimiter, MAX_VALUE if isWanted else None)
        if next is None:
            if isWanted:
                raise MultipartError(f"the {name!r} field is too long or not terminated")
            raise MultipartError("the multipart body ends inside a part")
        raw = reader.take(next)
        if isWanted:
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MultipartError(f"the {name!r} field is not UTF-8") from None
            found = FieldValue(value, valueStart, next)
        reader.skip(2)


def _partName(headers: bytes) -> bytes | None:
    """
    @return: the C{name} of a part, from its C{Content-Disposition}.
    @raise MultipartError: for a part with two C{Content-Disposition}
        headers or two C{name} parameters: parsers differ on which one
        counts (python-multipart, which C{transformers serve} uses, takes
        the last of each), so the part could be one field here and another
        there.
    """
    dispositions = [
        line.partition(b":")[2]
        for line in headers.split(b"\r\n")
        if line.partition(b":")[0].strip().lower() == b"content-disposition"
    ]
    if len(dispositions) > 1:
        raise MultipartError("a multipart part has more than one Content-Disposition header")
    if not dispositions:
        return None
    names: list[tuple[bytes, bytes]] = _NAME.findall(dispositions[0].strip().partition(b";")[2])
    if len(names) > 1:
        raise MultipartError("a multipart part has more than one name")
    if not names:
        return None
    quoted, plain = names[0]
    return quoted or plain


class SplicedFile(io.RawIOBase):
    """
    A read-only view of a file with one byte range replaced: what is sent
    upstream when a multipart field's value must change (the C{model} field,
    for a backend that knows the model by another name).

    The file is read in place, never copied; C{seek} and C{tell} let
    C{FileBodyProducer} find the length.
    """

    def __init__(self, file: IO[bytes], start: int, end: int, replacement: bytes) -> None:
        super().__init__()
        self._file = file
        file.seek(0, io.SEEK_END)
        self._fileSize = file.tell()
        self._start = start
        self._end = end
        self._replacement = replacement
        self._size = self._fileSize - (end - start) + len(replacement)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._position
        out = []
        while size > 0 and self._position < self._size:
            chunk = self._readAt(self._position, size)
            if not chunk:
                break
            out.append(chunk)
            self._position += len(chunk)
            size -= len(chunk)
        return b"".join(out)

    def _readAt(self, position: int, size: int) -> bytes:
        if position < self._start:
            self._file.seek(position)
            return self._file.read(min(size, self._start - position))
        replacementEnd = self._start + len(self._replacement)
        if position < replacementEnd:
            offset = position - self._start
            return self._replacement[offset : offset + size]
        self._file.seek(position - replacementEnd + self._end)
        return self._file.read(size)
