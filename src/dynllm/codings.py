# -*- test-case-name: tests.test_site -*-
"""
Content codings of request bodies (RFC 9110 8.4), decoded as the body
arrives.

A L{BodyDecoder} takes the body in the pieces the connection delivers and
gives back the decoded body in pieces of at most C{chunkSize} bytes, so that
nothing is ever held whole in memory: a decompression bomb (a few kilobytes
that inflate to gigabytes) costs at most one piece before it is refused by
C{limit}. zlib's C{max_length} is what bounds each piece.

Nothing here knows about HTTP requests: L{dynllm.site} feeds the decoder
and turns its exceptions into responses.
"""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence

#: The codings that can be decoded, each with the zlib window bits that read
#: it. C{x-gzip} is C{gzip} (RFC 9110 8.4.1.3). C{deflate} is the zlib format
#: (RFC 1950, RFC 9110 8.4.1.2); a raw deflate stream, which some clients
#: send under that name, is told apart by its first two bytes.
DECODABLE = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}

#: Codings that are listed but mean no change.
IDENTITY = "identity"

#: The most codings one body may carry: each costs a zlib stream's memory.
MAX_CODINGS = 4

#: The largest piece of decoded body returned at once, in bytes.
CHUNK_SIZE = 65536


class UnsupportedCoding(Exception):
    """
    The body uses a content coding that cannot be decoded (C{br}, C{zstd},
    C{compress}, an unknown name), or too many of them.

    @ivar coding: The coding at fault, as the client spelled it.
    """

    def __init__(self, coding: str, message: str) -> None:
        super().__init__(message)
        self.coding = coding


class CorruptBody(Exception):
    """
    The body is not valid data of its coding, or it ends early.
    """


class BodyTooLarge(Exception):
    """
    The decoded body (or a stage of it, for a body coded twice) is larger
    than the limit.
    """


def parseCodings(values: Sequence[bytes]) -> list[str]:
    """
    Read the C{Content-Encoding} header of a request.

    @param values: The header's values (one per header line); each is a
        comma-separated list of codings, in the order they were applied
        (RFC 9110 8.4).
    @return: the codings to undo, lower-cased, in the order they were
        applied, C{identity} left out; empty when there is nothing to do.
    @raise UnsupportedCoding: for a coding not in L{DECODABLE}, or more than
        L{MAX_CODINGS}.
    """
    codings = []
    for value in values:
        for token in value.decode("latin-1").split(","):
            coding = token.strip().lower()
            if not coding or coding == IDENTITY:
                continue
            if coding not in DECODABLE:
                raise UnsupportedCoding(
                    token.strip(),
                    f"the request body's Content-Encoding {token.strip()!r} is not supported"
                    f" (supported: gzip, deflate, identity)",
                )
            codings.append(coding)
    if len(codings) > MAX_CODINGS:
        raise UnsupportedCoding(
            ", ".join(codings), f"the request body has {len(codings)} content codings; at most {MAX_CODINGS} are decoded"
        )
    return codings


def _isZlibHeader(head: bytes) -> bool:
    """
    @return: whether C{head} (two bytes) starts a zlib stream: method 8
        (deflate), a window of at most 32 KB, and a check value that makes
        the pair a multiple of 31 (RFC 1950 2.2).
    """
    cmf, flg = head[0], head[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0


class _Inflater:
    """
    Undoes one gzip or deflate coding, in bounded pieces.

    A gzip body may hold several members one after the other (RFC 1952
    2.2); each is decoded in turn. Bytes after the end of a deflate stream
    are an error.

    @ivar produced: Bytes decoded so far.
    """

    def __init__(self, coding: str, limit: int, chunkSize: int) -> None:
        self._gzip = coding != "deflate"
        self._limit = limit
        self._chunkSize = chunkSize
        self._head = b""
        self._started = False
        self._z = zlib.decompressobj(DECODABLE[coding]) if self._gzip else None
        self.produced = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """
        @return: the decoded pieces that C{data} completes.
        @raise CorruptBody: if C{data} is not valid.
        @raise BodyTooLarge: once more than the limit has been decoded.
        """
        if not data:
            return
        self._started = True
        if self._z is None:
            # deflate: the zlib format, or a raw deflate stream.
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, b""
            self._z = zlib.decompressobj(zlib.MAX_WBITS if _isZlibHeader(data) else -zlib.MAX_WBITS)
        z = self._z
        while True:
            if z.eof:
                data = z.unused_data + data
                if not data:
                    return
                if not self._gzip:
                    raise CorruptBody("the request body has data after the end of its deflate stream")
                z = self._z = zlib.decompressobj(DECODABLE["gzip"])
            try:
                out = z.decompress(data, self._chunkSize)
            except zlib.error as e:
                raise CorruptBody(f"the request body is not valid {self._name()} data ({e})") from None
            data = z.unconsumed_tail
            if out:
                self.produced += len(out)
                if self.produced > self._limit:
                    raise BodyTooLarge()
                yield out
            if not data and len(out) < self._chunkSize and not z.eof:
                # All input is consumed and zlib holds no more output.
                return

    def finish(self) -> None:
        """
        Check that the stream ended.

        @raise CorruptBody: if it was cut short. An empty body is accepted.
        """
        if not self._started:
            return
        if self._z is None or not self._z.eof:
            raise CorruptBody(f"the request body's {self._name()} data ends before the end of its stream")

    def _name(self) -> str:
        return "gzip" if self._gzip else "deflate"


class BodyDecoder:
    """
    Undoes the content codings of one request body as it arrives.

    Each piece of the body goes through the codings in the reverse of the
    order they were applied; every stage gives at most C{chunkSize} bytes at
    a time to the next, so memory stays bounded whatever the ratio. Every
    stage's output counts against C{limit}: a body coded twice cannot make
    its inner stage inflate without bound either.

    @ivar length: Bytes of decoded body given out so far.
    """

    def __init__(self, codings: Sequence[str], limit: int, chunkSize: int = CHUNK_SIZE) -> None:
        """
        @param codings: As L{parseCodings} returns them.
        @param limit: The most bytes of decoded body (and of each stage).
        @param chunkSize: The largest piece given out at once.
        """
        self._stages = [_Inflater(c, limit, chunkSize) for c in reversed(codings)]
        self.length = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """
        @param data: The next bytes of the body as sent.
        @return: the pieces of decoded body they complete, each at most
            C{chunkSize} bytes; consume them before feeding more.
        @raise CorruptBody: if the body is not valid.
        @raise BodyTooLarge: once the decoded body passes the limit.
        """
        for piece in self._through(0, data):
            self.length += len(piece)
            yield piece

    def finish(self) -> None:
        """
        Say that the body has ended.

        @raise CorruptBody: if a coded stream was cut short.
        """
        for stage in self._stages:
            stage.finish()

    def _through(self, index: int, data: bytes) -> Iterator[bytes]:
        if index == len(self._stages):
            yield data
            return
        for piece in self._stages[index].feed(data):
            yield from self._through(index + 1, piece)
