# -*- test-case-name: tests.test_console -*-
"""
The web console: the static files of the package's C{static/console/}
folder, served at C{/ui/}, and the redirect of C{/} there for browsers.

The page itself (plain HTML, CSS and ES modules, no build step and nothing
fetched from elsewhere) reads the admin and OpenAI routes of the same
daemon: C{/admin/events} for the models' states, C{/admin/models/load} and
C{unload}, the logs, and C{/v1/...} for its playground. It needs no key to
be served; its data routes need the keys they always need, which the page
asks for when one answers 401 (see README.rst, "The web console").

Every file is answered with:

  - its C{Content-Type} (L{CONTENT_TYPES});
  - C{Cache-Control: no-cache} and an C{ETag}: a browser keeps the file
    but asks again each time, and gets a C{304} while it has not changed
    (RFC 9111 section 5.2.2.4, RFC 9110 section 13.1.2), so that a new
    dynllm's page is never mixed with an old one's scripts;
  - L{SECURITY_HEADERS}: a C{Content-Security-Policy} that allows scripts,
    styles, images and connections from the daemon itself only (no inline
    script, no other site: a name or a message shown on the page cannot
    run as code), and that no other page may frame the console
    (C{frame-ancestors 'none'}, C{X-Frame-Options: DENY}: no
    click-jacking of its load and unload buttons); C{nosniff}, so that a
    file is never run as another type than the one it is sent with.

Only the files found in the folder are served, by name: a path that names
anything else (C{..} included) is a 404, so nothing outside the folder can
be reached.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import TYPE_CHECKING, Mapping

from attrs import frozen
from twisted.web.iweb import IRequest
from werkzeug.exceptions import NotFound

from dynllm import errors

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: The folder of the console's files, in the C{dynllm} package.
PACKAGE_FOLDER = ("static", "console")

#: Where the console is served.
PREFIX = "/ui/"

#: The file C{/ui/} serves.
INDEX = "index.html"

#: C{Content-Type} by file name extension. JavaScript's is C{text/javascript}
#: (RFC 9239 section 6); a browser runs an ES module only if it is sent
#: with a JavaScript type.
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".json": b"application/json",
    ".txt": b"text/plain; charset=utf-8",
}

#: The console's own C{Content-Security-Policy} (CSP level 3): everything
#: from the daemon itself, nothing inline, no plugins, and no framing.
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    b" object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

#: Headers sent with every file of the console.
SECURITY_HEADERS = {
    b"Content-Security-Policy": CONTENT_SECURITY_POLICY,
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
}

#: Keep, but ask again before each use (see the module's docstring).
CACHE_CONTROL = b"no-cache"


@frozen
class StaticFile:
    """
    One file of the console, held in memory.

    @ivar body: Its bytes.
    @ivar contentType: Its C{Content-Type}.
    @ivar etag: Its entity tag, quoted (RFC 9110 section 8.8.3): a digest
        of C{body}.
    """

    body: bytes
    contentType: bytes
    etag: bytes

    @classmethod
    def of(cls, name: str, body: bytes) -> StaticFile:
        """
        @param name: The file's name, whose extension gives its type
            (C{application/octet-stream} for an unknown one).
        @param body: Its bytes.
        """
        extension = name[name.rfind(".") :] if "." in name else ""
        contentType = CONTENT_TYPES.get(extension.lower(), b"application/octet-stream")
        digest = hashlib.sha256(body).hexdigest()[:20]
        return cls(body, contentType, b'"' + digest.encode("ascii") + b'"')


@frozen
class Console:
    """
    The console's files, by name.

    @ivar files: Name (a path under the folder, C{/}-separated, such as
        C{index.html} or C{js/app.js}) -> file.
    """

    files: Mapping[str, StaticFile]

    @classmethod
    def fromFolder(cls, folder: Traversable) -> Console:
        """
        @param folder: A folder (a C{pathlib.Path} or a package's resource
            folder); its files and those of its sub-folders are read, names
            beginning with C{.} left out.
        @return: a console of those files.
        """
        files: dict[str, StaticFile] = {}

        def walk(node: Traversable, prefix: str) -> None:
            for child in node.iterdir():
                if child.name.startswith("."):
                    continue
                if child.is_dir():
                    walk(child, prefix + child.name + "/")
                elif child.is_file():
                    files[prefix + child.name] = StaticFile.of(child.name, child.read_bytes())

        walk(folder, "")
        return cls(files)

    def serve(self, request: IRequest, name: str) -> bytes:
        """
        Answer C{GET /ui/NAME}.

        @param request: The request; its headers are set here.
        @param name: The path after C{/ui/} (C{""} for the index).
        @return: the file's body, or C{b""} for a C{304}.
        @raise errors.APIError: 404 if C{name} is none of L{files}.
        """
        found = self.files.get(name or INDEX)
        if found is None:
            raise errors.APIError(
                404,
                f"GET {request.path.decode('latin-1')}: the console has no such file",
                "not_found_error",
            )
        for header, value in SECURITY_HEADERS.items():
            request.setHeader(header, value)
        request.setHeader(b"Cache-Control", CACHE_CONTROL)
        request.setHeader(b"ETag", found.etag)
        if matches(request.getHeader(b"if-none-match"), found.etag):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Type", found.contentType)
        request.setHeader(b"Content-Length", b"%d" % len(found.body))
        return found.body


def matches(ifNoneMatch: bytes | None, etag: bytes) -> bool:
    """
    @param ifNoneMatch: A request's C{If-None-Match} (RFC 9110 section
        13.1.2), or C{None}.
    @param etag: The current file's entity tag.
    @return: whether the client's copy is current (weak comparison).
    """
    if ifNoneMatch is None:
        return False
    tags = [tag.strip() for tag in ifNoneMatch.split(b",")]
    return b"*" in tags or any(tag.removeprefix(b"W/") == etag for tag in tags)


def wantsHTML(accept: bytes | None) -> bool:
    """
    @param accept: A request's C{Accept} header (RFC 9110 section 12.5.1),
        or C{None}.
    @return: whether it asks for C{text/html} by name with a weight above
        0, as browsers do when they open a page (programs ask for JSON,
        C{*/*} or nothing).
    """
    if accept is None:
        return False
    for item in accept.decode("latin-1").split(","):
        kind, *parameters = (part.strip() for part in item.split(";"))
        if kind.lower() != "text/html":
            continue
        weight = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if weight > 0:
            return True
    return False


def home(request: IRequest) -> bytes:
    """
    Answer C{GET /}: a browser is sent to the console (C{302 Found} to
    L{PREFIX}); any other client gets the 404 it always got.

    @raise NotFound: for a client that does not ask for HTML, answered as
        any unknown path is (see L{dynllm.routes.DynLLMRoutes.httpError}).
    """
    if not wantsHTML(request.getHeader(b"accept")):
        raise NotFound()
    request.setResponseCode(302)
    request.setHeader(b"Location", PREFIX.encode("ascii"))
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"The console is at " + PREFIX.encode("ascii") + b"\n"


@functools.cache
def packaged() -> Console:
    """
    @return: the console of the installed package's files, read once.
    """
    folder = resources.files("dynllm")
    for part in PACKAGE_FOLDER:
        folder = folder / part
    return Console.fromFolder(folder)
