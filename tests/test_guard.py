"""
Tests for L{dynllm.guard} (what a daemon without keys refuses, and the
warning for a configuration file others can read), for the routes' key
checks (C{WWW-Authenticate}, the keys of C{/metrics}), and the same against
a real daemon over real sockets: DNS-rebinding and cross-site requests
refused, programs served.
"""

from __future__ import annotations

import http.client
import io
import json
import os
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource
from twisted.web.http_headers import Headers

from dynllm.config import parseConfig
from dynllm.cors import CORSPolicy
from dynllm.guard import Guard, announce, configFileWarning, mediaType, normalPath, parseHost, sameOrigin, unusableHosts
from dynllm.routes import DynLLMRoutes
from dynllm.site import DynLLMSite
from dynllm.testing import StubManager
from tests.support import FAKE_BACKEND, Daemon, checkEnvelope, fakeModel, waitFor

PAGE = "http://localhost:3000"


def headers(**values: str | list[str]) -> Headers:
    """
    @return: C{Headers} of C{values}, C{_} in names standing for C{-}.
    """
    h = Headers()
    for name, value in values.items():
        listed = [value] if isinstance(value, str) else value
        h.setRawHeaders(name.replace("_", "-"), [v.encode("latin-1") for v in listed])
    return h


def serverConfig(**server: Any) -> Any:
    """
    @return: the C{server} settings of a configuration with C{server}.
    """
    return parseConfig({"server": server}, "/").server


class ParsingTests(SynchronousTestCase):
    """
    The helpers that read C{Host}, C{Origin}, C{Content-Type} and paths.
    """

    def test_parseHost(self) -> None:
        """
        A C{Host} is split into its host, lower-cased, without the brackets
        of an IPv6 address or a final C{.}, and its port; anything else is
        C{None}.
        """
        self.assertEqual(parseHost("LocalHost:8000"), ("localhost", 8000))
        self.assertEqual(parseHost("localhost."), ("localhost", None))
        self.assertEqual(parseHost("[::1]:80"), ("::1", 80))
        self.assertEqual(parseHost("192.168.1.5"), ("192.168.1.5", None))
        for bad in ("", "a b", "user@host", "host:port", "host:1:2", "http://host", "[::1"):
            self.assertIsNone(parseHost(bad), bad)

    def test_sameOrigin(self) -> None:
        """
        An origin is the server's own when its host and port are the
        C{Host}'s, a missing port being its scheme's default on both sides.
        """
        self.assertTrue(sameOrigin(b"http://localhost:8000", b"localhost:8000"))
        self.assertTrue(sameOrigin(b"http://LOCALHOST:8000", b"localhost:8000"))
        self.assertTrue(sameOrigin(b"https://llm.example.org", b"llm.example.org"))
        self.assertTrue(sameOrigin(b"http://llm.example.org", b"llm.example.org:80"))
        self.assertTrue(sameOrigin(b"http://[::1]:8000", b"[::1]:8000"))
        self.assertFalse(sameOrigin(b"http://localhost:3000", b"localhost:8000"))
        self.assertFalse(sameOrigin(b"https://llm.example.org", b"llm.example.org:80"))
        self.assertFalse(sameOrigin(b"http://evil.example:8000", b"localhost:8000"))
        self.assertFalse(sameOrigin(b"null", b"localhost:8000"))

    def test_mediaType(self) -> None:
        """
        A C{Content-Type}'s type is lower-cased, without parameters.
        """
        self.assertEqual(mediaType(b"Text/Plain ; charset=UTF-8"), "text/plain")
        self.assertEqual(mediaType(b"application/json"), "application/json")

    def test_normalPath(self) -> None:
        """
        Runs of C{/} and a final C{/} do not make another path.
        """
        self.assertEqual(normalPath(b"//v1//audio/transcriptions/"), b"/v1/audio/transcriptions")
        self.assertEqual(normalPath(b"/"), b"/")


class GuardTestCase(SynchronousTestCase):
    """
    Checks requests against a L{Guard}.
    """

    def check(
        self,
        g: Guard,
        method: str = "GET",
        path: str = "/v1/models",
        body: bytes = b"",
        **values: str | list[str],
    ) -> Any:
        """
        @return: what C{g} answers a request.
        """
        values.setdefault("host", "localhost:8000")
        return g.check(method.encode(), path.encode(), headers(**values), io.BytesIO(body))

    def assertRefused(self, refusal: Any, status: int, code: str) -> None:
        """
        Assert that C{refusal} is an error with C{status} and C{code}.
        """
        self.assertIsNotNone(refusal)
        self.assertEqual((refusal.status, refusal.code), (status, code))


class HostTests(GuardTestCase):
    """
    L{Guard.check}'s C{Host} rule (against DNS rebinding).
    """

    guard = Guard.fromConfig(serverConfig())

    def test_loopback(self) -> None:
        """
        C{localhost}, names under C{.localhost} and loopback addresses are
        served, with or without a port.
        """
        for host in ("localhost", "localhost:8000", "LOCALHOST.", "app.localhost:8000", "127.0.0.1", "127.1.2.3:9",
                     "[::1]:8000"):
            self.assertIsNone(self.check(self.guard, host=host), host)

    def test_addresses(self) -> None:
        """
        Any IP address is served: no web page can make an address name this
        machine, as it can a name.
        """
        for host in ("192.168.1.5:8000", "10.0.0.1", "[fe80::1]:8000", "[2001:db8::1]"):
            self.assertIsNone(self.check(self.guard, host=host), host)

    def test_name(self) -> None:
        """
        Another name gets 421 C{host_not_allowed}, whose message names the
        setting that allows it.
        """
        refusal = self.check(self.guard, host="evil.example:8000")
        self.assertRefused(refusal, 421, "host_not_allowed")
        self.assertIn("Add 'evil.example' to server.allowed_hosts", refusal.message)

    def test_everyMethod(self) -> None:
        """
        The rule holds for requests that change something too.
        """
        refusal = self.check(self.guard, "POST", "/admin/models/load", b"{}", host="evil.example",
                             content_type="application/json")
        self.assertRefused(refusal, 421, "host_not_allowed")

    def test_twoHosts(self) -> None:
        """
        A request with two C{Host} headers is refused.
        """
        self.assertRefused(self.check(self.guard, host=["localhost", "evil.example"]), 421, "host_not_allowed")

    def test_noHost(self) -> None:
        """
        A request without C{Host} (HTTP/1.0) is served: browsers always
        send one.
        """
        self.assertIsNone(self.guard.check(b"GET", b"/v1/models", Headers(), None))

    def test_allowedHosts(self) -> None:
        """
        A name of C{server.allowed_hosts} is served on any port; one given
        with a port, on that port only; one beginning with C{.}, with every
        name under it.
        """
        g = Guard.fromConfig(serverConfig(allowed_hosts=["GPU-Box.lan", "proxy.example:443", ".internal"]))
        for host in ("gpu-box.lan", "gpu-box.lan:8000", "proxy.example:443", "internal", "a.b.internal:1"):
            self.assertIsNone(self.check(g, host=host), host)
        for host in ("proxy.example", "proxy.example:8000", "other.lan", "xinternal"):
            self.assertRefused(self.check(g, host=host), 421, "host_not_allowed")

    def test_unusable(self) -> None:
        """
        An entry of C{server.allowed_hosts} that is not a host is found (to
        be warned of at start), and matches nothing.
        """
        server = serverConfig(allowed_hosts=["http://gpu.lan", "gpu.lan/", "*", "gpu.lan"])
        self.assertEqual(unusableHosts(server), ["http://gpu.lan", "gpu.lan/"])
        g = Guard.fromConfig(serverConfig(allowed_hosts=["http://gpu.lan"]))
        self.assertRefused(self.check(g, host="gpu.lan"), 421, "host_not_allowed")

    def test_anyHost(self) -> None:
        """
        C{*} in C{server.allowed_hosts} serves any C{Host}.
        """
        g = Guard.fromConfig(serverConfig(allowed_hosts=["*"]))
        self.assertIsNone(self.check(g, host="evil.example"))

    def test_withKeys(self) -> None:
        """
        With C{server.api_keys} nothing is refused: a page cannot know the
        key.
        """
        g = Guard.fromConfig(serverConfig(api_keys=["k"]))
        self.assertIsNone(self.check(g, "POST", "/admin/models/load", b"x", host="evil.example", origin="http://evil",
                                     content_type="text/plain"))

    def test_adminKeysOnly(self) -> None:
        """
        Admin keys alone leave the API open: the rules hold.
        """
        g = Guard.fromConfig(serverConfig(admin_api_keys=["k"]))
        self.assertRefused(self.check(g, host="evil.example"), 421, "host_not_allowed")

    def test_health(self) -> None:
        """
        C{/health} is served whatever the C{Host} and C{Origin}.
        """
        self.assertIsNone(self.check(self.guard, path="/health", host="evil.example", origin="http://evil.example"))

    def test_metrics(self) -> None:
        """
        C{/metrics} is served to any C{Host} with C{server.metrics_public},
        and only then.
        """
        self.assertRefused(self.check(self.guard, path="/metrics", host="prometheus.target"), 421, "host_not_allowed")
        g = Guard.fromConfig(serverConfig(metrics_public=True))
        self.assertIsNone(self.check(g, path="/metrics", host="prometheus.target"))
        self.assertRefused(self.check(g, path="/v1/models", host="prometheus.target"), 421, "host_not_allowed")


class OriginTests(GuardTestCase):
    """
    L{Guard.check}'s C{Origin} rule (against cross-site requests).
    """

    guard = Guard.fromConfig(serverConfig(cors_origins=[PAGE], allowed_hosts=["gpu.example"]))

    def test_none(self) -> None:
        """
        A request without C{Origin}, as programs send, is served.
        """
        self.assertIsNone(
            self.check(self.guard, "POST", "/v1/chat/completions", b"{}", content_type="application/json")
        )

    def test_own(self) -> None:
        """
        The daemon's own origin, as its C{Host} names it, is served (a page
        it serves, such as llama-server's through C{/upstream}).
        """
        self.assertIsNone(self.check(self.guard, origin="http://localhost:8000"))
        self.assertIsNone(self.check(self.guard, origin="https://gpu.example", host="gpu.example"))

    def test_configured(self) -> None:
        """
        An origin of C{server.cors_origins} is served.
        """
        self.assertIsNone(self.check(self.guard, "POST", "/v1/chat/completions", b"{}", origin=PAGE,
                                     content_type="application/json"))

    def test_star(self) -> None:
        """
        C{*} in C{server.cors_origins} serves every origin.
        """
        g = Guard.fromConfig(serverConfig(cors_origins=["*"]))
        self.assertIsNone(self.check(g, origin="http://evil.example"))

    def test_foreign(self) -> None:
        """
        Another origin gets 403 C{cors_origin_not_allowed}, on any method,
        whose message names the setting that allows it.
        """
        for method in ("GET", "POST"):
            refusal = self.check(self.guard, method, "/admin/models/load", b"{}", origin="http://evil.example",
                                 content_type="application/json")
            self.assertRefused(refusal, 403, "cors_origin_not_allowed")
            self.assertIn("server.cors_origins", refusal.message)

    def test_otherPort(self) -> None:
        """
        A page of this host on another port is another origin.
        """
        self.assertRefused(self.check(self.guard, origin="http://localhost:8080"), 403, "cors_origin_not_allowed")

    def test_null(self) -> None:
        """
        C{Origin: null} (a sandboxed page, a redirect) is refused.
        """
        self.assertRefused(self.check(self.guard, origin="null"), 403, "cors_origin_not_allowed")


class FetchSiteTests(GuardTestCase):
    """
    L{Guard.check}'s C{Sec-Fetch-Site} rule: what another site's page
    sends without an C{Origin} (an image, a script, a link).
    """

    guard = Guard.fromConfig(serverConfig(cors_origins=[PAGE]))

    def test_crossSite(self) -> None:
        """
        A C{cross-site} or C{same-site} request without C{Origin}, even a
        C{GET} (C{<img src=/upstream/m/>} loads a model), is refused with
        403 C{cross_site_request}.
        """
        for site in ("cross-site", "same-site"):
            self.assertRefused(
                self.check(self.guard, "GET", "/upstream/m/health", sec_fetch_site=site), 403, "cross_site_request"
            )

    def test_ownAndTyped(self) -> None:
        """
        The daemon's own pages (C{same-origin}), what a user types or
        bookmarks (C{none}) and programs (no header) are served.
        """
        for site in ("same-origin", "none"):
            self.assertIsNone(self.check(self.guard, "GET", "/upstream/m/", sec_fetch_site=site))
        self.assertIsNone(self.check(self.guard, "GET", "/upstream/m/"))

    def test_originDecides(self) -> None:
        """
        With an C{Origin}, the origin rule decides: a configured origin's
        cross-site request is served.
        """
        self.assertIsNone(
            self.check(self.guard, "POST", "/v1/chat/completions", b"{}", origin=PAGE,
                       content_type="application/json", sec_fetch_site="cross-site")
        )

    def test_keysOff(self) -> None:
        """
        With API keys the rule is off (a page cannot send the key).
        """
        keyed = Guard.fromConfig(serverConfig(api_keys=["k"]))
        self.assertIsNone(self.check(keyed, "GET", "/upstream/m/health", sec_fetch_site="cross-site"))


class BodyTests(GuardTestCase):
    """
    L{Guard.check}'s rule for bodies (against cross-site requests).
    """

    guard = Guard.fromConfig(serverConfig())

    def post(self, path: str, body: bytes = b"{}", **values: str | list[str]) -> Any:
        """
        @return: what the guard answers a POST.
        """
        return self.check(self.guard, "POST", path, body, **values)

    def test_json(self) -> None:
        """
        A JSON body is served, with parameters or not.
        """
        for value in ("application/json", "application/json; charset=utf-8"):
            self.assertIsNone(self.post("/admin/models/load", content_type=value))

    def test_otherTypes(self) -> None:
        """
        A body of a type a page cannot send without a preflight is served:
        KServe's binary tensors, anything relayed by C{/upstream}.
        """
        self.assertIsNone(self.post("/v2/models/m/infer", b"\0", content_type="application/octet-stream"))

    def test_text(self) -> None:
        """
        A C{text/plain} body gets 415 C{unsupported_content_type} on the
        admin routes and the API alike, whose message says what to send.
        """
        for path in ("/admin/models/load", "/admin/models/unload", "/v1/chat/completions"):
            refusal = self.post(path, content_type="text/plain;charset=UTF-8")
            self.assertRefused(refusal, 415, "unsupported_content_type")
            self.assertIn("Content-Type: application/json", refusal.message)

    def test_form(self) -> None:
        """
        A form body gets 415, and so does a multipart one on a JSON route.
        """
        self.assertRefused(self.post("/admin/models/unload", content_type="application/x-www-form-urlencoded"),
                           415, "unsupported_content_type")
        self.assertRefused(self.post("/v1/chat/completions", content_type="multipart/form-data; boundary=x"),
                           415, "unsupported_content_type")

    def test_uploads(self) -> None:
        """
        A multipart body is served on the upload routes, however their path
        is spelled.
        """
        for path in ("/v1/audio/transcriptions", "/audio/transcriptions", "/v1/audio/translations",
                     "/v1/images/edits", "//v1/audio/transcriptions/"):
            self.assertIsNone(self.post(path, content_type="multipart/form-data; boundary=x"), path)
        refusal = self.post("/v1/audio/transcriptions", content_type="text/plain")
        self.assertIn("Content-Type: multipart/form-data", refusal.message)

    def test_untyped(self) -> None:
        """
        A body without C{Content-Type} gets 415; an empty one is served.
        """
        self.assertRefused(self.post("/admin/models/load"), 415, "unsupported_content_type")
        self.assertIsNone(self.post("/upstream/m/slots/0", b""))

    def test_twoTypes(self) -> None:
        """
        A request with two C{Content-Type} headers is refused if either is a
        form's.
        """
        self.assertRefused(self.post("/v1/chat/completions", content_type=["application/json", "text/plain"]),
                           415, "unsupported_content_type")

    def test_safeMethods(self) -> None:
        """
        The body of a C{GET} is not looked at.
        """
        self.assertIsNone(self.check(self.guard, "GET", "/v1/models", b"x", content_type="text/plain"))

    def test_bodyKept(self) -> None:
        """
        The body is at its start again once checked, for the routes.
        """
        content = io.BytesIO(b'{"model": "m"}')
        content.seek(3)
        self.guard.check(b"POST", b"/v1/chat/completions", headers(host="localhost", content_type="application/json"),
                         content)
        self.assertEqual(content.read(), b'{"model": "m"}')


class DescribeTests(SynchronousTestCase):
    """
    L{Guard.describe}, the line logged at start.
    """

    def test_open(self) -> None:
        """
        Without keys it names what is served: the hosts, the setting's
        names, and the origins.
        """
        text = Guard.fromConfig(serverConfig(allowed_hosts=["gpu.lan"], cors_origins=[PAGE])).describe()
        self.assertIn("localhost, *.localhost and IP addresses, and gpu.lan (server.allowed_hosts)", text)
        self.assertIn(f"{PAGE} (server.cors_origins)", text)

    def test_anyHost(self) -> None:
        """
        It says when any C{Host} is served.
        """
        self.assertIn("any Host", Guard.fromConfig(serverConfig(allowed_hosts=["*"])).describe())

    def test_keys(self) -> None:
        """
        With keys it says that keys are needed.
        """
        self.assertIn("server.api_keys is set", Guard.fromConfig(serverConfig(api_keys=["k"])).describe())


class ConfigFileTests(SynchronousTestCase):
    """
    L{configFileWarning}: a file holding keys that others can read.
    """

    def config(self, mode: int, **server: Any) -> Any:
        """
        @return: a configuration with C{server}, read from a file of C{mode}.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("{}\n")
        os.chmod(path, mode)
        return parseConfig({"server": server}, "/", source=path)

    def test_readable(self) -> None:
        """
        A file with keys that others can read is named, with its mode and
        the fix.
        """
        config = self.config(0o644, api_keys=["k"])
        self.assertEqual(
            configFileWarning(config),
            f"{config.source} holds API keys and its group and other users can read it (mode 0644):"
            f" run chmod 600 {config.source}",
        )

    def test_group(self) -> None:
        """
        A file its group can read is warned of, for every kind of key.
        """
        for key in ("api_keys", "admin_api_keys", "metrics_api_keys"):
            warning = configFileWarning(self.config(0o640, **{key: ["k"]}))
            self.assertIsNotNone(warning, key)
            self.assertIn("its group can read it (mode 0640)", warning)

    def test_private(self) -> None:
        """
        A file only its owner can read gets no warning.
        """
        self.assertIsNone(configFileWarning(self.config(0o600, api_keys=["k"])))

    def test_noKeys(self) -> None:
        """
        A file without keys gets no warning, whoever can read it.
        """
        self.assertIsNone(configFileWarning(self.config(0o644)))

    def test_noFile(self) -> None:
        """
        A configuration not read from a file gets no warning.
        """
        self.assertIsNone(configFileWarning(parseConfig({"server": {"api_keys": ["k"]}}, "/")))


class AnnounceTests(SynchronousTestCase):
    """
    L{announce}: what a daemon logs about its guard as it starts.
    """

    def test_logged(self) -> None:
        """
        The policy is logged at info, a key file others can read and an
        unusable C{server.allowed_hosts} entry as warnings; the guard of the
        configuration is returned.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("{}\n")
        os.chmod(path, 0o644)
        config = parseConfig({"server": {"admin_api_keys": ["k"], "allowed_hosts": ["http://gpu.lan"]}}, "/",
                             source=path)
        g = announce(config)
        self.assertEqual(g, Guard.fromConfig(config.server))
        logged = [(e["log_level"], formatEvent(e)) for e in events if e.get("log_namespace") == "dynllm.guard"]
        self.assertEqual([level for level, _ in logged], [LogLevel.info, LogLevel.warn, LogLevel.warn])
        self.assertEqual(logged[0][1], g.describe())
        self.assertIn("'http://gpu.lan' is not a host name", logged[1][1])
        self.assertIn("run chmod 600", logged[2][1])


class Echo(resource.Resource):
    """
    A leaf that counts the requests it serves.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.served = 0

    def render(self, request: Any) -> bytes:
        self.served += 1
        return b"{}"


class SiteTests(SynchronousTestCase):
    """
    The guard in the site: refusals answered before any resource sees the
    request.
    """

    def setUp(self) -> None:
        self.echo = Echo()
        self.site = DynLLMSite(self.echo, 1024 * 1024, CORSPolicy(frozenset({PAGE})), reactor=Clock(),
                               guard=Guard.fromConfig(serverConfig(cors_origins=[PAGE])))

    def send(self, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        """
        @return: the status, headers and body answered to C{head}.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        raw, _, answer = transport.value().partition(b"\r\n\r\n")
        lines = raw.decode().split("\r\n")
        found = dict(line.lower().split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), found, answer

    def test_refused(self) -> None:
        """
        A refused request is answered in the envelope, and the resource
        never sees it.
        """
        status, _, body = self.send("GET /v1/models HTTP/1.1\nHost: evil.example\nContent-Length: 0\n")
        checkEnvelope(self, status, body, 421, "host_not_allowed")
        self.assertEqual(self.echo.served, 0)

    def test_anthropic(self) -> None:
        """
        A refused Anthropic client gets Anthropic's error shape.
        """
        status, _, body = self.send(
            "POST /v1/messages HTTP/1.1\nHost: localhost\nanthropic-version: 2023-06-01\nContent-Type: text/plain\n"
            "Content-Length: 2\n", b"{}"
        )
        self.assertEqual((status, json.loads(body)["type"]), (415, "error"))

    def test_corsOnRefusal(self) -> None:
        """
        A refusal for a page of an allowed origin carries the CORS headers,
        so that the page can read why.
        """
        status, found, _ = self.send("GET /v1/models HTTP/1.1\nHost: evil.example\nOrigin: " + PAGE + "\n")
        self.assertEqual((status, found["access-control-allow-origin"]), (421, PAGE))

    def test_served(self) -> None:
        """
        A request the guard allows reaches the resource.
        """
        status, _, _ = self.send(
            "POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1:8000\nContent-Type: application/json\n"
            "Content-Length: 2\n", b"{}"
        )
        self.assertEqual((status, self.echo.served), (200, 1))

    def test_preflight(self) -> None:
        """
        A preflight is answered by the CORS rules alone.
        """
        status, _, _ = self.send(
            "OPTIONS /v1/chat/completions HTTP/1.1\nHost: localhost\nOrigin: " + PAGE
            + "\nAccess-Control-Request-Method: POST\n"
        )
        self.assertEqual(status, 204)

    def test_defaultGuard(self) -> None:
        """
        A site made without a guard refuses nothing.
        """
        site = DynLLMSite(self.echo, 1024, reactor=Clock())
        self.assertFalse(site.guard.active)


class KeyTests(SynchronousTestCase):
    """
    The routes' key checks, in memory (StubTreq).
    """

    def serve(self, **server: Any) -> None:
        """
        Serve the routes of a configuration with C{server} and no model.
        """
        config = parseConfig({"server": server}, "/")
        self.routes = DynLLMRoutes(config=config, manager=StubManager(config), agent=RequestTraversalAgent(
            resource.Resource()), clock=Clock())
        self.client = StubTreq(self.routes.resource())

    def get(self, path: str, key: str | None = None) -> Any:
        """
        @return: the response to C{GET path} with C{key}.
        """
        auth = {"Authorization": f"Bearer {key}"} if key is not None else {}
        d = self.client.get("http://localhost" + path, headers=auth)
        self.client.flush()
        return self.successResultOf(d)

    def test_challenge(self) -> None:
        """
        A 401 without a key carries C{WWW-Authenticate: Bearer} (RFC 6750
        section 3), on the API and the admin routes.
        """
        self.serve(api_keys=["k"])
        for path in ("/v1/models", "/admin/models"):
            response = self.get(path)
            self.assertEqual(response.code, 401)
            self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ["Bearer"])

    def test_invalidToken(self) -> None:
        """
        A 401 for a wrong key says C{error="invalid_token"} (RFC 6750
        section 3.1).
        """
        self.serve(api_keys=["k"])
        response = self.get("/v1/models", "wrong")
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer error="invalid_token"'])

    def test_metricsKey(self) -> None:
        """
        A key of C{server.metrics_api_keys} reads C{/metrics} and nothing
        else; the admin key reads it too.
        """
        self.serve(api_keys=["client"], admin_api_keys=["admin"], metrics_api_keys=["prom"])
        self.assertEqual(self.get("/metrics", "prom").code, 200)
        self.assertEqual(self.get("/metrics", "admin").code, 200)
        self.assertEqual(self.get("/metrics", "client").code, 401)
        self.assertEqual(self.get("/metrics").code, 401)
        self.assertEqual(self.get("/admin/models", "prom").code, 401)
        self.assertEqual(self.get("/v1/models", "prom").code, 401)

    def test_metricsKeyAlone(self) -> None:
        """
        C{server.metrics_api_keys} alone makes C{/metrics} need one of them.
        """
        self.serve(metrics_api_keys=["prom"])
        self.assertEqual(self.get("/metrics").code, 401)
        self.assertEqual(self.get("/metrics", "prom").code, 200)

    def test_metricsPublic(self) -> None:
        """
        With C{server.metrics_public}, C{/metrics} needs no key, and the
        admin routes still do.
        """
        self.serve(api_keys=["client"], admin_api_keys=["admin"], metrics_public=True)
        self.assertEqual(self.get("/metrics").code, 200)
        self.assertEqual(self.get("/admin/models").code, 401)


def send(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """
    Send one request, with the C{Host} given in C{headers} if any.

    @return: its status and body.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body if method != "GET" else None, headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class DaemonTests(SynchronousTestCase):
    """
    A real daemon without keys (C{twistd -n dynllm}, over real sockets, in
    front of C{tests/fakebackend.py}): what a web page could send is
    refused, what programs send is served.
    """

    def setUp(self) -> None:
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "server": {"cors_origins": [PAGE]},
            "models": [fakeModel("m", vram=100)],
        }
        self.daemon = Daemon(config).start()
        self.addCleanup(self.daemon.stop)
        self.json = {"Content-Type": "application/json"}

    def status(self) -> str:
        """
        @return: model C{m}'s state.
        """
        return self.daemon.models()["m"]["status"]

    def chat(self) -> bytes:
        """
        @return: a chat request for C{m}, as JSON.
        """
        return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()

    def test_rebinding(self) -> None:
        """
        A request naming a host of its own (a page whose name was rebound to
        this machine) is refused with 421, and loads nothing.
        """
        port = self.daemon.port
        evil = {"Host": f"evil.example:{port}"}
        status, body = send(port, "GET", "/v1/models", headers=evil)
        checkEnvelope(self, status, body, 421, "host_not_allowed")
        status, body = send(port, "POST", "/v1/chat/completions", self.chat(), {**evil, **self.json})
        checkEnvelope(self, status, body, 421, "host_not_allowed")
        status, body = send(port, "POST", "/admin/models/load", b'{"model": "m"}',
                            {**evil, **self.json, "Origin": f"http://evil.example:{port}"})
        checkEnvelope(self, status, body, 421, "host_not_allowed")
        self.assertEqual(self.status(), "unloaded")

    def test_localNames(self) -> None:
        """
        Requests naming the daemon C{localhost} or by address are served.
        """
        for host in (f"localhost:{self.daemon.port}", f"127.0.0.1:{self.daemon.port}", "localhost"):
            status, _ = send(self.daemon.port, "GET", "/v1/models", headers={"Host": host})
            self.assertEqual(status, 200, host)

    def test_textAndForms(self) -> None:
        """
        C{text/plain} and form bodies (what a page can send anywhere) are
        refused with 415 on admin load and unload and on chat, and change
        nothing.
        """
        port = self.daemon.port
        for path, body, kind in [
            ("/admin/models/load", b'{"model": "m"}', "text/plain"),
            ("/admin/models/load", b'{"model": "m"}', "application/x-www-form-urlencoded"),
            ("/v1/chat/completions", self.chat(), "text/plain;charset=UTF-8"),
        ]:
            status, answer = send(port, "POST", path, body, {"Content-Type": kind})
            checkEnvelope(self, status, answer, 415, "unsupported_content_type")
        self.assertEqual(self.status(), "unloaded")
        self.assertEqual(send(port, "POST", "/admin/models/load", b'{"model": "m"}', self.json)[0], 200)
        for kind in ("text/plain", "application/x-www-form-urlencoded"):
            status, answer = send(port, "POST", "/admin/models/unload", b'{"model": "m"}', {"Content-Type": kind})
            checkEnvelope(self, status, answer, 415, "unsupported_content_type")
        self.assertEqual(self.status(), "loaded")

    def test_foreignOrigin(self) -> None:
        """
        A page of another origin is refused with 403, with a JSON body or a
        multipart upload; nothing is loaded.
        """
        port = self.daemon.port
        foreign = {"Origin": "http://evil.example"}
        status, body = send(port, "POST", "/admin/models/load", b'{"model": "m"}', {**foreign, **self.json})
        checkEnvelope(self, status, body, 403, "cors_origin_not_allowed")
        status, body = send(port, "POST", "/v1/chat/completions", self.chat(), {**foreign, **self.json})
        checkEnvelope(self, status, body, 403, "cors_origin_not_allowed")
        upload = b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--x--\r\n'
        status, body = send(port, "POST", "/v1/audio/transcriptions", upload,
                            {**foreign, "Content-Type": "multipart/form-data; boundary=x"})
        checkEnvelope(self, status, body, 403, "cors_origin_not_allowed")
        self.assertEqual(self.status(), "unloaded")

    def test_programs(self) -> None:
        """
        What the SDKs send (no C{Origin}, JSON) is served: a chat, and
        admin load and unload; so is a page of the daemon's own origin and
        of C{server.cors_origins}.
        """
        port = self.daemon.port
        status, body = send(port, "POST", "/v1/chat/completions", self.chat(), self.json)
        self.assertEqual(status, 200, body)
        self.assertEqual(send(port, "POST", "/admin/models/unload", b'{"model": "m"}', self.json)[0], 200)
        self.assertEqual(send(port, "POST", "/admin/models/load", b'{"model": "m"}', self.json)[0], 200)
        for origin in (f"http://127.0.0.1:{port}", PAGE):
            status, body = send(port, "POST", "/v1/chat/completions", self.chat(), {**self.json, "Origin": origin})
            self.assertEqual(status, 200, (origin, body))

    def test_logged(self) -> None:
        """
        The log says at start what is served.
        """
        self.assertIn("server.api_keys is empty: serving the Hosts localhost, *.localhost and IP addresses",
                      self.daemon.log())


class KeyedDaemonTests(SynchronousTestCase):
    """
    A real daemon with keys, from a configuration file others can read.
    """

    def setUp(self) -> None:
        config = {
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "server": {"api_keys": ["sesame"]},
            "models": [fakeModel("m", vram=100)],
        }
        self.daemon = Daemon(config)
        os.chmod(self.daemon.configPath, 0o644)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def test_warning(self) -> None:
        """
        The log warns that the file holds keys others can read, naming it,
        its mode and the fix.
        """
        path = self.daemon.configPath
        self.assertTrue(waitFor(lambda: f"run chmod 600 {path}" in self.daemon.log()))
        self.assertIn(f"{path} holds API keys and its group and other users can read it (mode 0644)",
                      self.daemon.log())

    def test_anyHost(self) -> None:
        """
        With keys, a request with the key is served whatever its C{Host} and
        C{Origin}, and one without gets 401 with C{WWW-Authenticate}.
        """
        port = self.daemon.port
        keyed = {"Host": "gpu.example", "Origin": "http://evil.example", "Authorization": "Bearer sesame"}
        status, _ = send(port, "GET", "/v1/models", headers=keyed)
        self.assertEqual(status, 200)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.addCleanup(connection.close)
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        response.read()
        self.assertEqual((response.status, response.headers["WWW-Authenticate"]), (401, "Bearer"))
