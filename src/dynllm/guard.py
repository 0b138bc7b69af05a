# -*- test-case-name: tests.test_guard -*-
"""
Safe without keys: what a daemon whose API needs no key (C{server.api_keys}
empty, the default) refuses, so that web pages the user visits cannot drive
it, and the warning for a configuration file that gives its keys away.

A daemon without keys trusts whoever can connect to it. A browser can
connect to it on behalf of any web page, in two ways this module closes:

  - B{DNS rebinding}: a page at C{http://evil.example:8000} makes its own
    name resolve to 127.0.0.1, and its scripts then talk to dynllm as if it
    were their own origin, reading every answer. Their requests carry
    C{Host: evil.example:8000}. So only C{Host} names that no stranger can
    point at this machine are served (L{Guard.checkHost}): C{localhost},
    names under C{.localhost} (RFC 6761 section 6.3; browsers resolve them
    to loopback themselves), any IP address (an address cannot be rebound:
    a page whose origin is an address was served from that address), and
    the names of C{server.allowed_hosts}. Vite's dev server accepts the same
    by default (its C{server.allowedHosts}).
  - B{Cross-site requests} (CSRF): a page on another origin can send a
    C{POST} to any address without asking first when its body is
    C{text/plain}, a form (C{application/x-www-form-urlencoded},
    C{multipart/form-data}) or has no type (the Fetch standard's
    "CORS-safelisted" request headers,
    U{https://fetch.spec.whatwg.org/#cors-safelisted-request-header}); it
    cannot read the answer, but the request has done its work (loaded or
    unloaded a model, run a chat). Any other body type makes the browser
    ask first (a preflight), which L{dynllm.cors} refuses for origins not
    in C{server.cors_origins}. So such bodies are refused
    (L{Guard.checkBody}; C{multipart/form-data} is accepted on the upload
    routes, which need it), and so is every request whose C{Origin} is
    neither the daemon's own, as its C{Host} names it, nor allowed by
    C{server.cors_origins} (L{Guard.checkOrigin}). Programs (the SDKs,
    curl) send no C{Origin} and a JSON body: they are served.

A daemon with keys needs none of this: a page cannot know the key, and
browsers send no C{Authorization} of their own to another origin.
C{/health}, and C{/metrics} when C{server.metrics_public} is set, are
served whatever the C{Host} or C{Origin}: they change nothing and are meant
for monitors.

L{dynllm.site} applies the L{Guard} to every request but CORS preflights
(L{dynllm.cors} answers those).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from typing import IO, Sequence

from attrs import field, frozen
from twisted.web.http_headers import Headers

from dynllm import endpoints, errors, logs
from dynllm.config import Config, ServerConfig
from dynllm.cors import CORSPolicy

log = logs.logger("dynllm.guard")

#: Methods that change nothing (RFC 9110 section 9.2.1), whose bodies are
#: not checked.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

#: Body types a page on any origin may send without a preflight (Fetch,
#: "CORS-safelisted request-header", C{Content-Type}).
FORM_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})

#: The upload routes, which take C{multipart/form-data}.
UPLOAD_PATHS = frozenset(
    path.encode("ascii") for e in endpoints.ENDPOINTS if e.modelIn == endpoints.MULTIPART for path in e.paths
)

#: Paths served whatever the C{Host} and C{Origin}.
HEALTH_PATH, METRICS_PATH = b"/health", b"/metrics"

#: Default ports of an origin's schemes.
_DEFAULT_PORTS = {"http": 80, "https": 443}

#: C{host[:port]}, the host a name or an IPv6 address in brackets.
_HOST = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]/@]+)(?::([0-9]{1,5}))?\Z")

#: Runs of C{/} in a path.
_SLASHES = re.compile(rb"/+")

#: An origin as browsers send it (RFC 6454 section 6.1).
_ORIGIN = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://(\[[0-9a-fA-F:.]+\]|[^\s/?#@:\[\]]+)(?::([0-9]{1,5}))?\Z")


def parseHost(value: str) -> tuple[str, int | None] | None:
    """
    @param value: A C{Host} header (RFC 9110 section 7.2), or an entry of
        C{server.allowed_hosts}.
    @return: its host, lower-cased, without brackets around an IPv6 address
        and without a final C{.}, and its port or C{None}; C{None} if it is
        not C{host[:port]}.
    """
    match = _HOST.match(value.strip())
    if match is None:
        return None
    host, port = match.group(1).lower(), match.group(2)
    if host.startswith("["):
        host = host[1:-1]
    elif host.endswith(".") and host != ".":
        host = host[:-1]
    return host, None if port is None else int(port)


def isAddress(host: str) -> bool:
    """
    @return: whether C{host} (as L{parseHost} gives it) is an IPv4 or IPv6
        address.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def isLocalName(host: str) -> bool:
    """
    @return: whether C{host} is C{localhost} or a name under it.
    """
    return host == "localhost" or host.endswith(".localhost")


def normalPath(path: bytes) -> bytes:
    """
    @return: C{path} with runs of C{/} made one and without a final C{/}, as
        the routes match it.
    """
    if b"//" in path:
        path = _SLASHES.sub(b"/", path)
    return path[:-1] if len(path) > 1 and path.endswith(b"/") else path


def mediaType(value: bytes) -> str:
    """
    @return: the type and subtype of a C{Content-Type} value, lower-cased,
        without parameters (its "essence" in the Fetch standard).
    """
    return value.split(b";", 1)[0].strip().decode("latin-1").lower()


#: How many allowed C{Host} values a L{Guard} remembers.
SEEN_HOSTS = 64


@frozen
class Guard:
    """
    What a daemon without keys refuses (see the module's docstring).

    @ivar active: Whether the API needs no key (C{server.api_keys} is
        empty); when C{False}, L{check} lets everything pass.
    @ivar hosts: C{server.allowed_hosts}, each as L{parseHost} gives it
        (a C{None} port: any port); a host beginning with C{.} stands for
        that name and every name under it.
    @ivar anyHost: Whether C{server.allowed_hosts} holds C{*}.
    @ivar cors: The origins allowed besides the daemon's own.
    @ivar open: Paths served whatever the C{Host} and C{Origin}.
    """

    active: bool = False
    hosts: frozenset[tuple[str, int | None]] = frozenset()
    anyHost: bool = False
    cors: CORSPolicy = CORSPolicy()
    open: frozenset[bytes] = frozenset({HEALTH_PATH})
    #: C{Host} header values found allowed, so that a client's every request
    #: is not parsed again (at most L{SEEN_HOSTS} of them).
    _seen: set[bytes] = field(factory=set, eq=False, repr=False)

    @classmethod
    def fromConfig(cls, server: ServerConfig) -> Guard:
        """
        @return: the guard of a daemon with the settings C{server}.
        """
        hosts = set()
        for entry in server.allowed_hosts:
            parsed = parseHost(entry)
            if parsed is not None:
                hosts.add(parsed)
        return cls(
            active=not server.api_keys,
            hosts=frozenset(hosts),
            anyHost="*" in server.allowed_hosts,
            cors=CORSPolicy(frozenset(server.cors_origins)),
            open=frozenset({HEALTH_PATH, METRICS_PATH} if server.metrics_public else {HEALTH_PATH}),
        )

    def check(self, method: bytes, path: bytes, headers: Headers, content: IO[bytes] | None) -> errors.APIError | None:
        """
        Decide whether to serve a request (all of it has arrived).

        @param method: The request's method.
        @param path: Its path, without the query.
        @param headers: Its headers.
        @param content: Its body; read to its end and put back at its start.
        @return: the refusal to answer with, or C{None} to serve it.
        """
        if not self.active or normalPath(path) in self.open:
            return None
        hosts = headers.getRawHeaders(b"host")
        origins = headers.getRawHeaders(b"origin")
        refusal = (
            self.checkHost(hosts)
            or self.checkOrigin(origins, hosts)
            or self.checkFetchSite(origins, headers.getRawHeaders(b"sec-fetch-site"))
        )
        if refusal is None and method not in SAFE_METHODS:
            size = 0
            if content is not None:
                content.seek(0, os.SEEK_END)
                size = content.tell()
                content.seek(0)
            refusal = self.checkBody(path, headers.getRawHeaders(b"content-type"), size)
        return refusal

    def hostAllowed(self, host: str, port: int | None) -> bool:
        """
        @param host: A C{Host} header's host, as L{parseHost} gives it.
        @param port: Its port, if any.
        @return: whether a request naming it is served.
        """
        if self.anyHost or isLocalName(host):
            return True
        for name, only in self.hosts:
            if only is not None and only != port:
                continue
            if host == name or (name.startswith(".") and (host == name[1:] or host.endswith(name))):
                return True
        return isAddress(host)

    def checkHost(self, values: Sequence[bytes] | None) -> errors.APIError | None:
        """
        @param values: The request's C{Host} headers.
        @return: a 421 C{host_not_allowed} (RFC 9110 section 15.5.20: this
            server will not answer for that name) unless the request names
            an allowed host (see L{hostAllowed}) or, as an HTTP/1.0 request
            may, none.
        """
        if not values:
            return None
        if len(values) == 1 and values[0] in self._seen:
            return None
        value = b", ".join(values).decode("latin-1")
        parsed = parseHost(value) if len(values) == 1 else None
        if parsed is not None and self.hostAllowed(*parsed):
            if len(self._seen) < SEEN_HOSTS:
                self._seen.add(values[0])
            return None
        name = parsed[0] if parsed is not None else value
        return errors.APIError(
            421,
            f"this server does not answer for the host {value!r}: without API keys it serves only"
            f" localhost and IP addresses, so that web pages cannot reach it through a name of their own"
            f" (DNS rebinding). Add {name!r} to server.allowed_hosts, or set server.api_keys",
            "invalid_request_error",
            "host_not_allowed",
        )

    def checkOrigin(self, origins: Sequence[bytes] | None, hosts: Sequence[bytes] | None) -> errors.APIError | None:
        """
        @param origins: The request's C{Origin} headers (browsers send one,
            programs none).
        @param hosts: Its C{Host} headers.
        @return: a 403 C{cors_origin_not_allowed} unless there is no
            C{Origin}, or it is the daemon's own (its host and port those of
            the C{Host} header, ports by default those of its scheme) or one
            C{server.cors_origins} allows.
        """
        if not origins:
            return None
        if self.cors.allowOrigin(origins) is not None:
            return None
        if len(origins) == 1 and hosts is not None and len(hosts) == 1 and sameOrigin(origins[0], hosts[0]):
            return None
        origin = b", ".join(origins).decode("latin-1")
        return errors.APIError(
            403,
            f"web pages of the origin {origin!r} may not call this server: without API keys it serves only"
            f" its own pages and the origins of server.cors_origins, so that other web pages cannot drive it"
            f" (cross-site request forgery). Add the origin to server.cors_origins, or set server.api_keys",
            "invalid_request_error",
            "cors_origin_not_allowed",
        )

    def checkFetchSite(
        self, origins: Sequence[bytes] | None, sites: Sequence[bytes] | None
    ) -> errors.APIError | None:
        """
        @param origins: The request's C{Origin} headers.
        @param sites: Its C{Sec-Fetch-Site} headers (Fetch Metadata, sent
            by browsers: C{same-origin}, C{same-site}, C{cross-site} or
            C{none} for a request the user made by hand).
        @return: a 403 C{cross_site_request} for a request another site's
            page made without an C{Origin} (an image, a script, a link: what
            L{checkOrigin} cannot see), since even a C{GET} can load a model
            and evict others; C{None} otherwise (a request with an
            C{Origin} is L{checkOrigin}'s to judge).
        """
        if origins or not sites:
            return None
        site = sites[-1].strip().lower()
        if site not in (b"cross-site", b"same-site"):
            return None
        return errors.APIError(
            403,
            f"a {site.decode('latin-1')} request from a web page (Sec-Fetch-Site) may not use this server: without"
            f" API keys it serves only its own pages and programs, so that other web pages cannot drive it."
            f" Set server.api_keys to serve such pages",
            "invalid_request_error",
            "cross_site_request",
        )

    def checkBody(self, path: bytes, types: Sequence[bytes] | None, size: int) -> errors.APIError | None:
        """
        @param path: The request's path.
        @param types: Its C{Content-Type} headers.
        @param size: The length of its body, in bytes.
        @return: a 415 C{unsupported_content_type} for a body a web page
            could send to any server without a preflight: C{text/plain}, a
            form, or a body without C{Content-Type}. C{multipart/form-data}
            is accepted on the upload routes (L{UPLOAD_PATHS}); an empty body
            needs no type.
        """
        upload = normalPath(path) in UPLOAD_PATHS
        if not types:
            if size == 0:
                return None
            sent = "a body without Content-Type"
        else:
            found = [mediaType(value) for value in types]
            refused = [t for t in found if t in FORM_TYPES and not (upload and t == "multipart/form-data")]
            if not refused:
                return None
            sent = f"{errors.article(refused[0])} body"
        wanted = "multipart/form-data" if upload else "application/json"
        return errors.APIError(
            415,
            f"{sent} is refused while server.api_keys is empty: any web page can send one to any server"
            f" (cross-site request forgery). Send Content-Type: {wanted} (curl: -H 'Content-Type: {wanted}'),"
            f" or set server.api_keys",
            "invalid_request_error",
            "unsupported_content_type",
        )

    def describe(self) -> str:
        """
        @return: a sentence for the log at start, saying what is served.
        """
        if not self.active:
            return "server.api_keys is set: requests without a valid key are refused (401)"
        if self.anyHost:
            hosts = "any Host (server.allowed_hosts: '*')"
        else:
            names = sorted(f"{h}:{p}" if p is not None else h for h, p in self.hosts)
            hosts = "the Hosts localhost, *.localhost and IP addresses" + (
                f", and {', '.join(names)} (server.allowed_hosts)" if names else ""
            )
        origins = sorted(self.cors.origins)
        pages = "the daemon's own pages" + (f" and {', '.join(origins)} (server.cors_origins)" if origins else "")
        return (
            f"server.api_keys is empty: serving {hosts}; web pages other than {pages} are refused,"
            " and so are text/plain, form and untyped bodies (multipart only on the upload routes)"
        )


def sameOrigin(origin: bytes, host: bytes) -> bool:
    """
    @param origin: An C{Origin} header.
    @param host: The C{Host} header of the same request.
    @return: whether the origin is the server the request was sent to: the
        same host and port, a missing port being the default of the
        origin's scheme (so that C{https://name} matches C{Host: name}
        behind a TLS proxy).
    """
    match = _ORIGIN.match(origin.decode("latin-1"))
    parsed = parseHost(host.decode("latin-1"))
    if match is None or parsed is None:
        return False
    scheme, name = match.group(1).lower(), match.group(2).lower()
    if name.startswith("["):
        name = name[1:-1]
    default = _DEFAULT_PORTS.get(scheme)
    originPort = int(match.group(3)) if match.group(3) else default
    hostPort = parsed[1] if parsed[1] is not None else default
    return name == parsed[0] and originPort is not None and originPort == hostPort


def unusableHosts(server: ServerConfig) -> list[str]:
    """
    @return: the entries of C{server.allowed_hosts} that are neither C{*}
        nor C{host[:port]} (L{parseHost}), such as C{http://name}: they
        match no request.
    """
    return [entry for entry in server.allowed_hosts if entry != "*" and parseHost(entry) is None]


def holdsKeys(server: ServerConfig) -> bool:
    """
    @return: whether C{server} holds any key.
    """
    return bool(server.api_keys or server.admin_api_keys or server.metrics_api_keys)


def configFileWarning(config: Config) -> str | None:
    """
    @return: a warning if C{config} holds keys and was read from a file
        that its group or other users can read, naming the file, its mode
        and the fix; C{None} otherwise.
    """
    if config.source is None or not holdsKeys(config.server):
        return None
    try:
        mode = stat.S_IMODE(os.stat(config.source).st_mode)
    except OSError:
        return None
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    who = " and ".join(w for w, bit in (("its group", stat.S_IRGRP), ("other users", stat.S_IROTH)) if mode & bit)
    return (
        f"{config.source} holds API keys and {who} can read it (mode {mode:04o}):"
        f" run chmod 600 {config.source}"
    )


def announce(config: Config) -> Guard:
    """
    Log, as a daemon starts, what its guard serves, and warn of a
    configuration file that others can read.

    @return: the guard of C{config}.
    """
    guard = Guard.fromConfig(config.server)
    log.info("{policy}", policy=guard.describe())
    for entry in unusableHosts(config.server):
        log.warn(
            "server.allowed_hosts: {entry!r} is not a host name and matches nothing;"
            " write name, name:port or .domain (no scheme, no path)",
            entry=entry,
        )
    warning = configFileWarning(config)
    if warning is not None:
        log.warn("{problem}", problem=warning)
    return guard
