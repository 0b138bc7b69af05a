"""
The web console: its files as the routes serve them (in memory), what the
guard lets the page do without keys, and the page itself in a real browser
(headless Chromium driven by C{tests/browser/console.mjs}) against a real
daemon with real llama-server models.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from typing import Any, Callable

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from dynllm import console
from dynllm.config import parseConfig
from dynllm.guard import Guard
from dynllm.routes import DynLLMRoutes
from dynllm.testing import StubManager
from tests.support import FAKE_BACKEND, ROOT, Daemon, checkEnvelope, fakeModel, llamaServer, tinyModels

#: The console's files in the checkout.
FOLDER = os.path.join(ROOT, "src", "dynllm", "static", "console")

#: The browser test script, and what it needs.
SCRIPT = os.path.join(ROOT, "tests", "browser", "console.mjs")
CHROMIUM = "/usr/bin/chromium"
PLAYWRIGHT = os.path.join(ROOT, "node_modules", "playwright-core", "package.json")

#: Where the browser tests leave their screenshots (not committed).
SCREENSHOTS = os.path.join(ROOT, "build", "screenshots")


class ConsoleFilesTests(SynchronousTestCase):
    """
    The console's files as C{DynLLMRoutes} serves them.
    """

    def setUp(self) -> None:
        self.serve()

    def serve(self, **server: Any) -> None:
        """
        Serve the routes of a configuration with one model and the server
        settings C{server}.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        open(os.path.join(directory, "chat.gguf"), "w").close()
        raw = {
            "enabled_backends": ["llamacpp"],
            "server": server,
            "models": [{"name": "chat", "path": "chat.gguf", "backend": "llamacpp", "vram_mb": 1}],
        }
        config = parseConfig(raw, directory, which=lambda name: "/bin/true")
        routes = DynLLMRoutes(config=config, manager=StubManager(config), agent=None, clock=Clock())
        self.client = StubTreq(routes.resource())

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Headers, bytes]:
        """
        @return: C{(status, headers, body)} of C{GET path}.
        """
        response = self.successResultOf(
            self.client.get("http://dynllm" + path, headers=headers, allow_redirects=False)
        )
        body = self.successResultOf(self.client.content(response))
        return response.code, response.headers, body

    def test_index(self) -> None:
        """
        C{GET /ui/} answers the page, as HTML in UTF-8.
        """
        status, headers, body = self.get("/ui/")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        with open(os.path.join(FOLDER, "index.html"), "rb") as f:
            self.assertEqual(body, f.read())

    def test_noKey(self) -> None:
        """
        The console's files need no key when keys are set (the page asks
        for them); the routes it reads still do.
        """
        self.serve(api_keys=["client"], admin_api_keys=["admin"])
        for path in ("/ui/", "/ui/app.js", "/ui/console.css"):
            self.assertEqual(self.get(path)[0], 200, path)
        status, _, body = self.get("/admin/models")
        checkEnvelope(self, status, body, 401, "invalid_api_key")

    def test_contentTypes(self) -> None:
        """
        Each file is sent with the type of its extension: scripts as
        C{text/javascript} (which a browser needs to run an ES module),
        styles as C{text/css}, the icon as C{image/svg+xml}.
        """
        expected = {
            "app.js": b"text/javascript; charset=utf-8",
            "console.css": b"text/css; charset=utf-8",
            "icon.svg": b"image/svg+xml",
            "index.html": b"text/html; charset=utf-8",
        }
        for name, contentType in expected.items():
            status, headers, _ = self.get("/ui/" + name)
            self.assertEqual(status, 200, name)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [contentType], name)

    def test_everyFileServed(self) -> None:
        """
        Every file of the folder is served, and each one that the page names
        exists: a file added to the folder needs no code.
        """
        names = sorted(os.listdir(FOLDER))
        self.assertEqual(sorted(console.packaged().files), names)
        for name in names:
            self.assertEqual(self.get("/ui/" + name)[0], 200, name)

    def test_securityHeaders(self) -> None:
        """
        Every file is sent with a C{Content-Security-Policy} that allows the
        daemon's own scripts, styles and connections only (no inline
        script) and no framing, C{X-Frame-Options: DENY} and
        C{X-Content-Type-Options: nosniff}.
        """
        for name in ("", "app.js", "console.css"):
            _, headers, _ = self.get("/ui/" + name)
            [policy] = headers.getRawHeaders(b"content-security-policy")
            directives = dict(d.strip().split(b" ", 1) for d in policy.split(b";"))
            self.assertEqual(directives[b"default-src"], b"'self'")
            self.assertEqual(directives[b"script-src"], b"'self'")
            self.assertEqual(directives[b"connect-src"], b"'self'")
            self.assertEqual(directives[b"frame-ancestors"], b"'none'")
            self.assertNotIn(b"unsafe-inline", policy)
            self.assertEqual(headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
            self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])

    def test_noInlineScript(self) -> None:
        """
        The page has no inline script or event handler attribute (the
        policy would block them): its scripts are files.
        """
        with open(os.path.join(FOLDER, "index.html")) as f:
            page = f.read()
        self.assertNotIn("<script>", page)
        self.assertNotIn(" onclick=", page)
        self.assertIn('<script type="module" src="app.js"></script>', page)

    def test_cacheValidation(self) -> None:
        """
        Files are sent with C{Cache-Control: no-cache} and an C{ETag}; a
        request with that tag in C{If-None-Match} gets a C{304} without a
        body.
        """
        status, headers, body = self.get("/ui/app.js")
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        [etag] = headers.getRawHeaders(b"etag")
        status, headers, body = self.get("/ui/app.js", headers={"If-None-Match": etag.decode()})
        self.assertEqual((status, body), (304, b""))
        self.assertEqual(headers.getRawHeaders(b"etag"), [etag])

    def test_unknownFile(self) -> None:
        """
        A file the console does not have is a 404 in the error envelope.
        """
        status, _, body = self.get("/ui/missing.js")
        error = checkEnvelope(self, status, body, 404)
        self.assertIn("/ui/missing.js", error["message"])

    def test_traversal(self) -> None:
        """
        Paths that climb out of the folder, plain or encoded, reach nothing:
        they are 404s.
        """
        for path in (
            "/ui/../console.py",
            "/ui/%2e%2e/console.py",
            "/ui/..%2fconsole.py",
            "/ui/..%2F..%2Fsetup.cfg",
            "/ui//etc/passwd",
            "/ui/./index.html/..",
        ):
            status, _, body = self.get(path)
            self.assertIn(status, (404, 308), path)
            self.assertNotIn(b"import", body, path)
            if status == 404:
                checkEnvelope(self, status, body, 404)

    def test_slashless(self) -> None:
        """
        C{/ui} is sent to C{/ui/}.
        """
        status, headers, _ = self.get("/ui")
        self.assertIn(status, (301, 308))
        self.assertEqual(headers.getRawHeaders(b"location"), [b"/ui/"])

    def test_rootRedirectsBrowsers(self) -> None:
        """
        C{GET /} from a browser (whose C{Accept} names C{text/html}) is sent
        to C{/ui/}.
        """
        accept = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
        status, headers, _ = self.get("/", headers={"Accept": accept})
        self.assertEqual(status, 302)
        self.assertEqual(headers.getRawHeaders(b"location"), [b"/ui/"])

    def test_rootForPrograms(self) -> None:
        """
        C{GET /} from a program (no C{Accept}, C{*/*} or JSON) is the 404
        envelope any unknown path gets.
        """
        for accept in (None, "*/*", "application/json", "text/html;q=0"):
            status, _, body = self.get("/", headers={"Accept": accept} if accept else None)
            error = checkEnvelope(self, status, body, 404)
            self.assertEqual(error["message"], "GET /: Not Found")


class WantsHTMLTests(SynchronousTestCase):
    """
    L{console.wantsHTML} reads an C{Accept} header.
    """

    def test_browsers(self) -> None:
        """
        C{text/html} by name, with a weight above 0, is a browser.
        """
        self.assertTrue(console.wantsHTML(b"text/html"))
        self.assertTrue(console.wantsHTML(b"application/json, TEXT/HTML;q=0.5"))

    def test_others(self) -> None:
        """
        No header, C{*/*}, other types, and C{text/html} of weight 0 (or an
        unreadable weight) are not.
        """
        for value in (None, b"*/*", b"application/json", b"text/html;q=0", b"text/html;q=x", b"text/htmlx"):
            self.assertFalse(console.wantsHTML(value), value)


class ConsolePackageTests(SynchronousTestCase):
    """
    The console's files are installed with the package.
    """

    def test_packageData(self) -> None:
        """
        C{setup.cfg}'s package data names the console's folder, so that a
        non-editable install has its files.
        """
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        data = [entry.strip() for entry in parser["options.package_data"]["dynllm"].split(",")]
        self.assertIn("static/console/*", data)
        self.assertEqual([n for n in os.listdir(FOLDER) if os.path.isdir(os.path.join(FOLDER, n))], [])


class ConsoleGuardTests(SynchronousTestCase):
    """
    Without keys, the guard serves the page and its own requests from
    C{http://127.0.0.1:PORT} and C{http://localhost:PORT}, and keeps
    refusing other pages.
    """

    guard = Guard(active=True)

    def check(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes = b"") -> Any:
        """
        @return: the guard's verdict on a request.
        """
        return self.guard.check(method, path, Headers({k: [v] for k, v in headers.items()}), io.BytesIO(body))

    def test_pageAndItsRequests(self) -> None:
        """
        The page opened by hand (C{Sec-Fetch-Site: none}), its files and
        event stream (same-origin C{GET}s) and its JSON C{POST}s (with its
        own C{Origin}) are served, at both names of the machine.
        """
        for host in (b"127.0.0.1:8000", b"localhost:8000"):
            origin = b"http://" + host
            self.assertIsNone(self.check(b"GET", b"/ui/", {b"host": host, b"sec-fetch-site": b"none"}))
            self.assertIsNone(self.check(b"GET", b"/ui/app.js", {b"host": host, b"sec-fetch-site": b"same-origin"}))
            self.assertIsNone(self.check(b"GET", b"/admin/events", {b"host": host, b"sec-fetch-site": b"same-origin"}))
            post = {b"host": host, b"origin": origin, b"sec-fetch-site": b"same-origin",
                    b"content-type": b"application/json"}
            self.assertIsNone(self.check(b"POST", b"/admin/models/load", post, b'{"model": "chat"}'))

    def test_otherPages(self) -> None:
        """
        Another site's page can neither post to the daemon nor load the
        console's files or events into itself.
        """
        post = {b"host": b"127.0.0.1:8000", b"origin": b"http://evil.example", b"sec-fetch-site": b"cross-site",
                b"content-type": b"application/json"}
        self.assertEqual(self.check(b"POST", b"/admin/models/load", post, b"{}").status, 403)
        for path in (b"/ui/app.js", b"/admin/events"):
            refusal = self.check(b"GET", path, {b"host": b"127.0.0.1:8000", b"sec-fetch-site": b"cross-site"})
            self.assertEqual(refusal.status, 403, path)
        self.assertEqual(self.check(b"GET", b"/ui/", {b"host": b"evil.example:8000"}).status, 421)


def browserTools(chromium: str = CHROMIUM, playwright: str = PLAYWRIGHT, node: str = "node") -> str | None:
    """
    @param chromium: Where Chromium must be.
    @param playwright: A file that playwright-core's installation holds.
    @param node: The name of Node.js's program.
    @return: what is missing to run the browser tests and how to install
        it, or C{None}.
    """
    missing = []
    if not os.access(chromium, os.X_OK):
        missing.append(f"{chromium} (Debian's Chromium): apt-get install -y chromium")
    if shutil.which(node) is None:
        missing.append(f"{node} (Node.js): apt-get install -y nodejs npm")
    if not os.path.exists(playwright):
        missing.append(f"playwright-core (package-lock.json): run npm ci in {ROOT}")
    return "; ".join(missing) or None


class BrowserToolsTests(SynchronousTestCase):
    """
    What the browser tests say when they cannot run.
    """

    def test_missing(self) -> None:
        """
        Each missing tool is named with the command that installs it (the
        browser tests then fail with that message: they never skip).
        """
        missing = browserTools(chromium="/nonexistent/chromium", playwright="/nonexistent/package.json",
                               node="no-such-node-program")
        assert missing is not None
        self.assertIn("apt-get install -y chromium", missing)
        self.assertIn("apt-get install -y nodejs npm", missing)
        self.assertIn("npm ci", missing)

    def test_present(self) -> None:
        """
        Nothing is missing on a machine set up as C{.ci/run} does.
        """
        self.assertIsNone(browserTools())


class ScriptUnitTests(SynchronousTestCase):
    """
    The unit tests of the page's own modules, run by Node.js's test runner.
    """

    def test_api(self) -> None:
        """
        C{tests/browser/api.test.mjs} passes: the page's event-stream reader
        (events split across reads, CRLF, comments, multi-line data) and its
        error messages.
        """
        missing = browserTools()
        if missing:
            self.fail(f"the script tests need {missing} (.ci/run installs them)")
        result = subprocess.run(
            ["node", "--test", os.path.join(ROOT, "tests", "browser", "api.test.mjs")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("# fail 0", result.stdout)
        self.assertNotIn("# pass 0", result.stdout)


class BrowserTests(SynchronousTestCase):
    """
    The console in headless Chromium, against a real daemon serving tiny
    llama-server models (chat, embeddings, rerank) and one whose file is
    not a model, so that its load fails. Screenshots are left in
    C{build/screenshots/}.
    """

    def setUp(self) -> None:
        missing = browserTools()
        if missing:
            self.fail(f"the browser tests need {missing} (.ci/run installs them)")

    def startDaemon(self, **server: Any) -> Daemon:
        """
        @return: a started daemon with the tiny models, C{server} its
            server settings.
        """
        models = tinyModels()
        broken = os.path.abspath(self.mktemp() + "-broken.gguf")
        with open(broken, "wb") as f:
            f.write(b"GGUF" + os.urandom(4092))
        common = {"backend": "llamacpp", "context_size": 512}
        config = {
            "total_vram_mb": 1200,
            "enabled_backends": ["llamacpp"],
            "idle_timeout_seconds": 300,
            "backend": {"llamacpp_binary": llamaServer()},
            "server": server,
            "models": [
                {"name": "tiny-chat", "path": models["tiny-llama.gguf"], "vram_mb": 400, **common},
                {"name": "tiny-embed", "path": models["tiny-embed.gguf"], "model_type": "embedding", "vram_mb": 300,
                 **common},
                {"name": "tiny-rerank", "path": models["tiny-rerank.gguf"], "model_type": "rerank", "vram_mb": 300,
                 **common},
                {"name": "broken", "path": broken, "vram_mb": 100, **common},
            ],
        }
        daemon = Daemon(config).start()
        self.addCleanup(lambda: daemon.stop())
        return daemon

    def runBrowser(
        self, daemon: Daemon, prefix: str, *options: str, waits: dict[str, Callable[[], object]] | None = None
    ) -> dict[str, Any]:
        """
        Run the browser script against C{daemon}, stopping and starting the
        daemon again when the script asks (C{--restart}). The screenshots of
        an earlier run of the same C{prefix} are removed first.

        @param options: The script's options besides C{--url} and where the
            screenshots go.
        @param waits: What to do, by name, when the script prints
            C{WAIT NAME} (besides C{stop} and C{start}).
        @return: the script's report.
        """
        if os.path.isdir(SCREENSHOTS):
            for name in os.listdir(SCREENSHOTS):
                if name.startswith(prefix + "-"):
                    os.remove(os.path.join(SCREENSHOTS, name))
        command = ["node", SCRIPT, "--url", daemon.url, "--screenshots", SCREENSHOTS, "--prefix", prefix, *options]
        process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        assert process.stdin is not None and process.stdout is not None
        report = None
        output = []
        for line in process.stdout:
            output.append(line)
            if line.startswith("REPORT "):
                report = json.loads(line[len("REPORT "):])
                continue
            sys.stdout.write(f"  browser: {line}")
            if line.strip() == "WAIT stop":
                daemon.stop()
            elif line.strip() == "WAIT start":
                daemon.start()
            elif line.startswith("WAIT ") and line.split()[1] in (waits or {}):
                (waits or {})[line.split()[1]]()
            else:
                continue
            process.stdin.write("go\n")
            process.stdin.flush()
        process.wait(60)
        if report is None:
            self.fail(f"the browser script reported nothing (exit {process.returncode}):\n{''.join(output)}")
        print(f"  screenshots: {', '.join(report['screenshots'])}")
        print(f"  figures: {json.dumps(report['figures'])}")
        return report

    def assertChecked(self, report: dict[str, Any], expected: list[str], daemon: Daemon) -> None:
        """
        Assert that every check of C{report} passed, that it holds one of
        each name in C{expected}, and that nothing the page did made
        C{daemon} log a critical error (an unhandled failure).
        """
        critical = [line for line in daemon.log().splitlines() if "#critical]" in line]
        self.assertEqual(critical, [], "the daemon logged critical errors")
        failed = [f"{c['name']}: {c['detail']}" for c in report["checks"] if not c["ok"]]
        self.assertEqual(failed, [], "checks failed in the browser")
        names = [c["name"] for c in report["checks"]]
        self.assertEqual([e for e in expected if e not in names], [], names)

    #: The options of the script's tour of the page.
    TOUR = ("--llm", "tiny-chat", "--embedding", "tiny-embed", "--rerank", "tiny-rerank", "--failing", "broken",
            "--restart")

    #: The checks every tour makes.
    CHECKS = [
        "a browser at / is sent to /ui/",
        "the page lists the models",
        "the event stream is live",
        "the memory budget is shown",
        "load makes tiny-chat go loading then loaded without a reload",
        "the memory bar holds the loaded model",
        "the live log of tiny-chat shows lines",
        "a playground chat with tiny-chat streams text",
        "the live log of tiny-chat grows as it serves",
        "the playground embeds a text with tiny-embed",
        "the playground ranks documents with tiny-rerank",
        "the daemon's live log shows lines",
        "unload makes tiny-chat unloaded",
        "a failed load of broken shows as a message",
        'the page shows "disconnected" while the daemon is down, then reconnects',
        "no script error and no blocked resource",
    ]

    def test_keysOff(self) -> None:
        """
        Without keys, the page opened at C{/} lists the models, follows
        their states live (a load goes C{loading} then C{loaded} on the page
        without a reload), chats streamed with tokens per second, embeds,
        ranks, shows the live logs, unloads, shows a failed load as a
        message, and shows "disconnected" while the daemon is down; it works
        at C{http://localhost:PORT} as at C{http://127.0.0.1:PORT}.
        """
        daemon = self.startDaemon()
        report = self.runBrowser(daemon, "keys-off", *self.TOUR, "--localhost")
        self.assertChecked(report, self.CHECKS + ["the page works at http://localhost:PORT too"], daemon)

    def test_keysOn(self) -> None:
        """
        With keys, the page asks for them, a key that no HTTP header can
        carry is refused by the dialog (not sent, which would fail as if
        dynllm were down), a wrong key gives a message, the right ones are
        used for everything the page does, and can be forgotten.
        """
        daemon = self.startDaemon(api_keys=["client-key"], admin_api_keys=["admin-key"])
        report = self.runBrowser(
            daemon, "keys-on", *self.TOUR, "--api-key", "client-key", "--admin-key", "admin-key",
            "--wrong-key", "not-a-key",
        )
        self.assertChecked(
            report,
            self.CHECKS
            + ["the page asks for the keys", "a key that cannot be sent in a header is refused by the dialog",
               "a wrong key gives a message", "the keys given are used",
               "the dialog's Cancel is a secondary button, unlike Save",
               "a chat refused for its key says why in its bubble",
               "forgetting the keys closes every stream and asks for keys"],
            daemon,
        )

    def test_busyUnload(self) -> None:
        """
        Unloading a model while the playground streams from it is refused
        (409): the page says why and offers to force it, and forcing it
        unloads the model and ends the chat with a message. (The model is
        the fake backend's, whose streams are as slow as the test needs.)
        """
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "models": [fakeModel("slow-chat", fake_frames=600, fake_frame_delay=0.05)],
        }
        daemon = Daemon(config).start()
        self.addCleanup(daemon.stop)
        report = self.runBrowser(daemon, "busy", "--llm", "slow-chat", "--busy")
        self.assertChecked(
            report,
            ["the page lists the models", "unloading slow-chat while it streams is refused, then forced",
             "no script error and no blocked resource"],
            daemon,
        )

    def test_crashMidStream(self) -> None:
        """
        A chat whose backend dies in the middle of its stream says, in its
        bubble and its message, what the stream ended with (its error
        event's message, or that it ended before its end), not a guess
        that the model was unloaded.
        """
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "models": [fakeModel("crashy", fake_mode="die-mid-stream", fake_frames=20, fake_frame_delay=0.05)],
        }
        daemon = Daemon(config).start()
        self.addCleanup(daemon.stop)
        report = self.runBrowser(daemon, "crash", "--llm", "crashy", "--crash")
        self.assertChecked(
            report,
            ["the page lists the models", "a chat whose backend dies mid-stream says what its stream ended with",
             "no script error and no blocked resource"],
            daemon,
        )

    def test_floodedLog(self) -> None:
        """
        The page goes on answering while the log it shows floods (a backend
        printing half a million lines at once, each its own event): it draws
        them in batches, not line by line (which froze the page).
        """
        config = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "models": [fakeModel("loud", fake_chatty=500_000)],
        }
        daemon = Daemon(config).start()
        self.addCleanup(daemon.stop)

        def flood() -> None:
            chat = {"model": "loud", "messages": [{"role": "user", "content": "hi"}]}
            thread = threading.Thread(target=lambda: daemon.post("/v1/chat/completions", chat, timeout=120))
            thread.start()
            self.addCleanup(thread.join)

        report = self.runBrowser(daemon, "flood", "--llm", "loud", "--chatty", "loud", waits={"chatty": flood})
        self.assertChecked(
            report,
            ["the page lists the models", "the page goes on answering while the log of loud floods",
             "no script error and no blocked resource"],
            daemon,
        )
