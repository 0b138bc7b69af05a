# -*- test-case-name: tests.test_rewrite -*-
"""
Renaming the model on its way to a backend and back.

A client only ever sees a model's public name (its alias). Most backends are
started under that name, but some know a model only by another one:
C{transformers serve} knows it by its local path. For those, the request's
C{model} field is rewritten to the backend's name, and the backend's name is
rewritten back to the alias in the response, as it streams, without holding
back any frame.
"""

from __future__ import annotations

import json
import re


def jsonString(value: str) -> bytes:
    """
    @return: C{value} as a JSON string literal, as Python writes it (ASCII,
        with C{\\u} escapes).
    """
    return json.dumps(value).encode("utf-8")


def jsonSpellings(value: str) -> set[bytes]:
    """
    @return: every JSON string literal that a JSON encoder may write for
        C{value}: raw UTF-8 (llama.cpp's nlohmann::json, JavaScript,
        orjson) or C{\\u} escapes in lower or upper case hexadecimal
        (Python's C{json}, Jackson), each with C{/} as it is or escaped as
        C{\\/} (PHP, some C libraries). RFC 8259 section 7 allows them all.
    """
    raw = json.dumps(value, ensure_ascii=False)
    escaped = json.dumps(value)
    upper = re.sub(r"\\u[0-9a-f]{4}", lambda m: m.group(0)[:2] + m.group(0)[2:].upper(), escaped)
    spellings = {raw, escaped, upper}
    spellings |= {s.replace("/", "\\/") for s in spellings}
    return {s.encode("utf-8") for s in spellings}


class NameRewriter:
    """
    Replaces every JSON string literal of the backend's name for the model
    with the alias, in a body that arrives in pieces.

    A piece is passed on at once except for a tail that could be the start
    of a split name; an SSE frame ends in a blank line, which no name starts
    with, so whole frames are never delayed.

    @ivar replacements: C{(old, new)} byte strings, longest C{old} first.
    """

    def __init__(self, upstreamName: str, alias: str, variants: tuple[str, ...] = ()) -> None:
        """
        @param upstreamName: The name the backend uses.
        @param alias: The name the client uses.
        @param variants: Other spellings of the backend's name that it may
            echo (such as the name with a revision appended).
        """
        spellings = {s for n in (upstreamName, *variants) for s in jsonSpellings(n)}
        self.replacements = [(s, jsonString(alias)) for s in sorted(spellings, key=len, reverse=True)]
        self._longest = len(self.replacements[0][0])
        self._tail = b""

    def _holdBack(self, data: bytes) -> int:
        """
        @return: how many bytes at the end of C{data} could begin a name.
        """
        for size in range(min(self._longest - 1, len(data)), 0, -1):
            suffix = data[-size:]
            if any(old.startswith(suffix) for old, _ in self.replacements):
                return size
        return 0

    def _replaceAll(self, data: bytes) -> tuple[list[bytes], int]:
        """
        @return: C{data} up to the end of its last whole name, renamed, as
            pieces, and where that end is.
        """
        out: list[bytes] = []
        position = 0
        while True:
            found: tuple[int, bytes, bytes] | None = None
            for old, new in self.replacements:
                index = data.find(old, position)
                if index >= 0 and (found is None or index < found[0]):
                    found = (index, old, new)
            if found is None:
                return out, position
            index, old, new = found
            out += [data[position:index], new]
            position = index + len(old)

    def feed(self, data: bytes) -> bytes:
        """
        @return: what can be passed on now of C{data}, renamed.
        """
        data = self._tail + data
        out, end = self._replaceAll(data)
        rest = data[end:]
        keep = self._holdBack(rest)
        if keep:
            rest, self._tail = rest[:-keep], rest[-keep:]
        else:
            self._tail = b""
        out.append(rest)
        return b"".join(out)

    def flush(self) -> bytes:
        """
        @return: what was held back, at the end of the body.
        """
        tail, self._tail = self._tail, b""
        return tail
