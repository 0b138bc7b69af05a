# -*- test-case-name: tests.test_bodies -*-
"""
What the routes need from a JSON request body, found without keeping its
object tree: the body is checked whole (valid JSON, RFC 8259; a top-level
object; no object with a key twice; nested at most L{MAX_DEPTH} levels), and
only the top-level C{model} and C{stream} values are kept, with the byte
range of C{model}'s value so that it can be replaced in the body as sent.

Nested objects are replaced as they are parsed by a shared marker of their
depth, so the memory used is the body's text plus one pointer per array
element, whatever the body holds (the whole tree of C{[{}, {}, ...]} takes
about 25 times the body's size).

This module uses only the standard library: L{dynllm.bodies} runs it as a
script in a child process for large bodies (C{python -I -S _jsonscan.py},
the body on its standard input, the result as one JSON line on its
standard output), and calls L{scan} in the daemon for small ones.
"""

from __future__ import annotations

import json
import re
import sys
from itertools import compress, repeat
from json.decoder import scanstring  # type: ignore[attr-defined]
from operator import is_, itemgetter
from typing import Any

#: The deepest nesting of arrays and objects accepted; the top-level object
#: is level 1.
MAX_DEPTH = 128

#: The top-level fields the routes read (C{force}: the admin unload's).
WANTED = ("model", "stream", "force")

#: The longest C{model} value kept: no configured name is this long.
MAX_NAME = 4096

_WHITESPACE = re.compile(r"[ \t\n\r]*")


class BodyError(ValueError):
    """
    The body is not what the routes accept.

    @ivar code: C{invalid_json} or C{duplicate_key}.
    @ivar message: A sentence for the client.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Nested:
    """
    What a nested object is parsed into: its depth, and nothing else.
    """

    __slots__ = ("depth",)

    def __init__(self, depth: int) -> None:
        self.depth = depth


_MARKERS = [_Nested(depth) for depth in range(MAX_DEPTH + 2)]


def _tooDeep() -> BodyError:
    return BodyError("invalid_json", f"the request body is nested too deeply (more than {MAX_DEPTH} levels)")


_DEPTH_BY_ID = {id(marker): marker.depth for marker in _MARKERS}
_MARKER_IDS = frozenset(_DEPTH_BY_ID)
_KEY, _VALUE = itemgetter(0), itemgetter(1)


def _deepestIn(items: list[Any]) -> int:
    """
    @return: how many levels of arrays and objects the deepest of C{items}
        is (0 if all are scalars), their objects being L{_Nested} already.
        The elements are looked at by C code (C{map}, C{set},
        C{compress}), not one by one in Python.
    @raise BodyError: beyond L{MAX_DEPTH}.
    """
    deepest = 0
    pending = [(items, 0)]
    while pending:
        values, level = pending.pop()
        if level > MAX_DEPTH:
            raise _tooDeep()
        markers = _MARKER_IDS.intersection(map(id, values))
        if markers:
            deepest = max(deepest, level + max(map(_DEPTH_BY_ID.__getitem__, markers)))
        if list in set(map(type, values)):
            deepest = max(deepest, level + 1)
            for inner in compress(values, map(is_, map(type, values), repeat(list))):
                pending.append((inner, level + 1))
    if deepest > MAX_DEPTH:
        raise _tooDeep()
    return deepest


def _depthOf(value: Any) -> int:
    """
    @return: how many levels of arrays and objects C{value} is (0 for a
        scalar), its objects being L{_Nested} already.
    @raise BodyError: beyond L{MAX_DEPTH}.
    """
    return _deepestIn([value])


def _nestedObject(pairs: list[tuple[str, Any]]) -> _Nested:
    """
    The C{object_pairs_hook}: check an object's keys and depth, and keep
    only its depth.
    """
    if not pairs:
        return _MARKERS[1]
    if len(set(map(_KEY, pairs))) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise BodyError("duplicate_key", f"the request body is ambiguous: the key {twice!r} is given more than once")
    depth = 1 + _deepestIn(list(map(_VALUE, pairs)))
    if depth > MAX_DEPTH:
        raise _tooDeep()
    return _MARKERS[depth]


_DECODER = json.JSONDecoder(object_pairs_hook=_nestedObject)


def _invalid(problem: str) -> BodyError:
    return BodyError("invalid_json", f"the request body is not valid JSON: {problem}")


def scan(body: bytes) -> dict[str, Any]:
    """
    Check C{body} and find what the routes need in it.

    @param body: A request body, UTF-8 (RFC 8259 section 8.1; a byte order
        mark is skipped).
    @return: C{{"fields": {...}, "span": [start, end] or None}}: the
        top-level L{WANTED} fields present, each as its value if it is a
        string, number, boolean or null and as C{None} if it is an array or
        object; and the byte offsets in C{body} of the C{model} value's
        JSON text.
    @raise BodyError: if the body is not a JSON object the routes accept.
    """
    offset = 3 if body.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = body[offset:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid(f"it is not UTF-8 ({e.reason} at byte {e.start + offset})") from None
    try:
        fields, span = _scanObject(text)
    except json.JSONDecodeError as e:
        raise _invalid(str(e)) from None
    except RecursionError:
        raise _tooDeep() from None
    if span is not None:
        start, end = span
        if not text.isascii():
            start, end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
        span = (start + offset, end + offset)
    return {"fields": fields, "span": None if span is None else list(span)}


def _scanObject(text: str) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """
    Parse C{text}, a JSON object, one top-level member at a time.

    @return: the L{WANTED} fields and the character range of C{model}'s
        value.
    """
    i = _WHITESPACE.match(text, 0).end()  # type: ignore[union-attr]
    if text[i : i + 1] != "{":
        if i == len(text):
            raise _invalid("it is empty")
        try:
            _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            raise
        raise BodyError("invalid_json", "the request body must be a JSON object")
    fields: dict[str, Any] = {}
    span = None
    seen: set[str] = set()
    i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
            key, i = scanstring(text, i + 1)
            if key in seen:
                raise BodyError(
                    "duplicate_key", f"the request body is ambiguous: the key {key!r} is given more than once"
                )
            seen.add(key)
            i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
            if text[i : i + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
            value, end = _DECODER.raw_decode(text, i)
            if 1 + _depthOf(value) > MAX_DEPTH:
                raise _tooDeep()
            if key in WANTED:
                scalar = isinstance(value, (str, int, float, bool)) or value is None
                fields[key] = value if scalar else None
                if key == "model":
                    if isinstance(value, str) and len(value) > MAX_NAME:
                        raise BodyError("invalid_json", f"the 'model' field is longer than {MAX_NAME} characters")
                    span = (i, end)
            del value
            i = _WHITESPACE.match(text, end).end()  # type: ignore[union-attr]
            following = text[i : i + 1]
            if following == ",":
                i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
                continue
            if following == "}":
                i += 1
                break
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
    if i != len(text):
        raise json.JSONDecodeError("Extra data", text, i)
    return fields, span


def main() -> None:
    """
    Scan the body on standard input; write C{{"fields": ..., "span": ...}}
    or C{{"error": [code, message]}} as one line on standard output.
    The address space is limited to a multiple of the body's size, so that
    no body can make this process take the machine's memory.
    """
    import os
    import resource

    size = os.fstat(0).st_size
    limit = 256 * 1024 * 1024 + 8 * size
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.setrecursionlimit(MAX_DEPTH * 4 + 200)
    try:
        result = scan(sys.stdin.buffer.read())
    except BodyError as e:
        result = {"error": [e.code, e.message]}
    except MemoryError:
        result = {"error": ["invalid_json", "the request body is too large to examine"]}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
