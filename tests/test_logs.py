"""
Tests for L{dynllm.logs} and the daemon's log as twistd and twist write it:
the JSON format, level filtering of every message (Twisted's too), and
reopening the log file on C{SIGUSR1}.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dynllm import logs
from tests.support import FAKE_BACKEND, ROOT, Daemon, fakeModel, waitFor

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def event(**fields: Any) -> dict[str, Any]:
    """
    @return: a log event as L{Logger} makes it, from C{fields} over
        defaults (info, namespace C{twisted.internet.base}).
    """
    base: dict[str, Any] = {
        "log_format": "hello {who}",
        "who": "world",
        "log_level": LogLevel.info,
        "log_namespace": "twisted.internet.base",
        "log_time": 1796046877.123456,
        "log_source": None,
    }
    base.update(fields)
    return base


class JSONFormatTests(SynchronousTestCase):
    """
    L{logs.formatEventAsJSONLine} writes one JSON object per line.
    """

    def parse(self, text: str) -> dict[str, Any]:
        """
        @return: C{text} parsed, after checking it is exactly one line.
        """
        self.assertTrue(text.endswith("\n"))
        self.assertNotIn("\n", text[:-1])
        self.assertFalse(text.startswith("\x1e"))
        parsed: dict[str, Any] = json.loads(text)
        return parsed

    def test_fields(self) -> None:
        """
        The object holds the time in ISO 8601 UTC with microseconds, the
        level, the logger (namespace) and the rendered message, and nothing
        else for an event that concerns no model.
        """
        record = self.parse(logs.formatEventAsJSONLine(event()))
        self.assertEqual(
            record,
            {
                "time": "2026-11-30T13:54:37.123456Z",
                "level": "info",
                "logger": "twisted.internet.base",
                "message": "hello world",
            },
        )

    def test_levels(self) -> None:
        """
        Levels are spelt as C{log_level} spells them (C{warning}, not
        Twisted's C{warn}).
        """
        names = [
            self.parse(logs.formatEventAsJSONLine(event(log_level=level)))["level"]
            for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)
        ]
        self.assertEqual(names, ["debug", "info", "warning", "error", "critical"])

    def test_model(self) -> None:
        """
        An event with a C{model} field names it; in dynllm's namespaces the
        C{name} field names the model too; elsewhere C{name} is not a
        model.
        """
        self.assertEqual(self.parse(logs.formatEventAsJSONLine(event(model="m1")))["model"], "m1")
        ours = event(log_namespace="dynllm.lifecycle", name="m2")
        self.assertEqual(self.parse(logs.formatEventAsJSONLine(ours))["model"], "m2")
        theirs = event(name="m3")
        self.assertNotIn("model", self.parse(logs.formatEventAsJSONLine(theirs)))

    def test_multiLineMessage(self) -> None:
        """
        A message with newlines is still one line of JSON, and the message
        reads back whole.
        """
        record = self.parse(logs.formatEventAsJSONLine(event(who="two\nlines")))
        self.assertEqual(record["message"], "hello two\nlines")

    def test_traceback(self) -> None:
        """
        An event with a failure carries its traceback text, on the same
        line.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = self.parse(logs.formatEventAsJSONLine(event(log_failure=failure, log_format="it broke")))
        self.assertEqual(record["message"], "it broke")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIn("Traceback", record["traceback"])


class TextFormatTests(SynchronousTestCase):
    """
    L{logs.formatEventAsText} is Twisted's classic line, its time formatted
    once a second.
    """

    def test_sameAsTwisted(self) -> None:
        """
        Events in one second and the next are written as Twisted writes
        them.
        """
        from twisted.logger import formatEventAsClassicLogText

        base = 1_700_000_000.25
        for when in (base, base + 0.5, base + 1.0, base - 3600.0):
            event = {"log_format": "hello {who}", "who": "you", "log_time": when,
                     "log_namespace": "dynllm.x", "log_level": LogLevel.info}
            self.assertEqual(logs.formatEventAsText(event), formatEventAsClassicLogText(event))


class DaemonLogTests(SynchronousTestCase):
    """
    L{logs.DaemonLog} filters every namespace at one level, which can change
    at once.
    """

    def setUp(self) -> None:
        self.output = io.StringIO()
        self.publisher = LogPublisher()

    def daemonLog(self, level: str, format: str = "json") -> logs.DaemonLog:
        """
        @return: a daemon log writing C{format} to L{output}, observing
            L{publisher}.
        """
        daemonLog = logs.makeDaemonLog(self.output, format, level)
        self.publisher.addObserver(daemonLog)
        return daemonLog

    def lines(self) -> list[dict[str, Any]]:
        """
        @return: the JSON lines written, parsed.
        """
        return [json.loads(line) for line in self.output.getvalue().splitlines()]

    def test_twistedMessageFiltered(self) -> None:
        """
        At level C{warning}, an info message of Twisted's own (not only of
        dynllm's) is not written; a warning is.
        """
        self.daemonLog("warning")
        twisted = Logger(namespace="twisted.internet.base", observer=self.publisher)
        twisted.info("Main loop terminated.")
        twisted.warn("something odd")
        self.assertEqual([r["message"] for r in self.lines()], ["something odd"])

    def test_setLevel(self) -> None:
        """
        L{DaemonLog.setLevel} changes the level from the next message on.
        """
        daemonLog = self.daemonLog("info")
        log = Logger(namespace="dynllm.scheduler", observer=self.publisher)
        log.debug("hidden")
        daemonLog.setLevel("debug")
        self.assertEqual(daemonLog.level, "debug")
        log.debug("shown")
        daemonLog.setLevel("error")
        log.warn("hidden too")
        log.error("shown too")
        self.assertEqual([r["message"] for r in self.lines()], ["shown", "shown too"])

    def test_moduleSetLevel(self) -> None:
        """
        L{logs.setLevel}, what a configuration reload calls, changes the
        level of the installed daemon log.
        """
        daemonLog = self.daemonLog("info")
        self.patch(logs, "installed", [daemonLog])
        logs.setLevel("error")
        self.assertEqual(daemonLog.level, "error")
        self.assertRaises(KeyError, logs.setLevel, "loud")

    def test_setFormat(self) -> None:
        """
        L{logs.setFormat}, for a reload, changes the format of the next
        lines; not one chosen on the command line.
        """
        daemonLog = self.daemonLog("info", "text")
        self.patch(logs, "installed", [daemonLog])
        log = Logger(namespace="dynllm.x", observer=self.publisher)
        log.info("as text")
        logs.setFormat("json")
        log.info("as json")
        first, second = self.output.getvalue().splitlines()
        self.assertTrue(first.endswith("[dynllm.x#info] as text"), first)
        self.assertEqual(json.loads(second)["message"], "as json")
        fixed = logs.makeDaemonLog(io.StringIO(), "text", "info", formatFixed=True)
        self.assertFalse(fixed.setFormat("json"))
        self.assertEqual(fixed.format, "text")

    def test_text(self) -> None:
        """
        The C{text} format is Twisted's classic one: time, namespace and
        level in brackets, message.
        """
        self.daemonLog("info", "text")
        Logger(namespace="dynllm.x", observer=self.publisher).info("plain {word}", word="words")
        (line,) = self.output.getvalue().splitlines()
        self.assertTrue(line.endswith(" [dynllm.x#info] plain words"), line)

    def test_observerOutput(self) -> None:
        """
        An observer given as the output (twistd's C{--logger}) gets the
        events that pass the level.
        """
        seen: list[dict[str, Any]] = []
        from twisted.logger import ILogObserver
        from zope.interface import provider

        @provider(ILogObserver)
        def observer(e: dict[str, Any]) -> None:
            seen.append(e)

        daemonLog = logs.makeDaemonLog(observer, level="warning")
        self.publisher.addObserver(daemonLog)
        log = Logger(namespace="twisted.web", observer=self.publisher)
        log.info("no")
        log.error("yes")
        self.assertEqual([e["log_format"] for e in seen], ["yes"])


class ReopenableFileTests(SynchronousTestCase):
    """
    L{logs.ReopenableFile} and L{logs.DaemonLog.reopen}.
    """

    def jsonLog(self) -> tuple[str, Any, Any, LogPublisher]:
        """
        A JSON daemon log in a file of a new directory, its own messages
        (C{dynllm.logs}) published with the rest.

        @return: the file's path, the L{logs.ReopenableFile}, the
            L{logs.DaemonLog} and the publisher.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "dynllm.log")
        publisher = LogPublisher()
        output = logs.ReopenableFile(path)
        daemonLog = logs.makeDaemonLog(output, "json", "info")
        publisher.addObserver(daemonLog)
        self.patch(logs, "log", Logger(namespace="dynllm.logs", observer=publisher))
        return path, output, daemonLog, publisher

    def test_reopenAfterMove(self) -> None:
        """
        After the file is moved, L{DaemonLog.reopen} makes a new file at the
        path; the lines before are in the moved file, the next ones and a
        line saying the file was reopened in the new one.
        """
        path, output, daemonLog, publisher = self.jsonLog()
        log = Logger(namespace="dynllm.x", observer=publisher)
        log.info("before")
        os.rename(path, path + ".1")
        log.info("lost? no: still in the moved file")
        self.assertTrue(daemonLog.reopen())
        log.info("after")
        output.close()
        with open(path + ".1") as f:
            old = [json.loads(line)["message"] for line in f]
        with open(path) as f:
            new = [json.loads(line)["message"] for line in f]
        self.assertEqual(old, ["before", "lost? no: still in the moved file"])
        self.assertEqual(new, [f"reopened the log file {path}", "after"])

    def test_reopenFailureKeepsOldFile(self) -> None:
        """
        If the file cannot be opened again, the old one stays in use and an
        error says so.
        """
        path, output, daemonLog, publisher = self.jsonLog()
        os.remove(path)
        os.rmdir(os.path.dirname(path))
        self.assertFalse(daemonLog.reopen())
        output.close()
        self.assertFalse(os.path.exists(path))

    def test_streamNotReopened(self) -> None:
        """
        A log on a stream (standard output) has nothing to reopen.
        """
        daemonLog = logs.makeDaemonLog(io.StringIO(), "json", "info")
        self.assertFalse(daemonLog.reopen())


def jsonLines(text: str) -> list[dict[str, Any]]:
    """
    @return: each line of C{text} parsed by a JSON parser (it fails on any
        line that is not one JSON object).
    """
    return [json.loads(line) for line in text.splitlines()]


class DaemonProcessTests(SynchronousTestCase):
    """
    A real C{twistd -n dynllm} (or C{twist dynllm}) writes its log as
    configured.
    """

    def daemon(self, *twistdOptions: str, **settings: Any) -> Daemon:
        """
        @return: a started daemon with the fake backend's model C{fake}, and
            C{settings} in its configuration; stopped after the test.
        """
        config: dict[str, Any] = {
            "total_vram_mb": 1000,
            "enabled_backends": ["llamacpp"],
            "backend": {"llamacpp_binary": FAKE_BACKEND},
            "models": [fakeModel("fake")],
        }
        config.update(settings)
        daemon = Daemon(config)
        self.addCleanup(daemon.stop)
        return daemon.start(twistdOptions=twistdOptions)

    def test_jsonLines(self) -> None:
        """
        With C{log_format: json}, every line the daemon writes is one JSON
        object (no record separator) with time, level, logger and message:
        twistd's own lines, dynllm's, and the backend's (which name the
        model).
        """
        daemon = self.daemon(log_format="json")
        status, _, _ = daemon.post("/v1/chat/completions", dict(CHAT, model="fake"))
        self.assertEqual(status, 200)
        daemon.stop()
        records = jsonLines(daemon.log())
        for record in records:
            self.assertLessEqual({"time", "level", "logger", "message"}, set(record))
            self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        messages = [r["message"] for r in records]
        self.assertTrue(any("starting up" in m for m in messages), messages)
        backend = [r for r in records if r["logger"] == "dynllm.process"]
        self.assertIn("[fake] fake: llama_server: model loaded", [r["message"] for r in backend])
        self.assertEqual({r.get("model") for r in backend}, {"fake"})

    def startCommand(self, logFormat: str, argv: Callable[[str], list[str]]) -> Daemon:
        """
        Start a daemon of no models with C{log_format: logFormat} by a
        command line of its own and wait until it is healthy.

        @param argv: Makes the command line from the configuration's path;
            its program is looked up beside this Python (C{twistd},
            C{twist}).
        @return: the daemon, stopped at the test's end.
        """
        config: dict[str, Any] = {"log_format": logFormat, "models": [], "enabled_backends": ["llamacpp"],
                                  "backend": {"llamacpp_binary": FAKE_BACKEND}}
        daemon = Daemon(config)
        self.addCleanup(daemon.stop)
        command = argv(daemon.configPath)
        command[0] = os.path.join(os.path.dirname(sys.executable), command[0])
        daemon.process = subprocess.Popen(
            command, cwd=daemon.directory, env=dict(os.environ, PYTHONPATH=ROOT),
            stdout=open(daemon.logPath, "ab"), stderr=subprocess.STDOUT,
        )
        self.assertTrue(waitFor(lambda: daemon._healthy(), timeout=30))
        return daemon

    def test_commandLineWins(self) -> None:
        """
        C{--log-format json} on the command line wins over C{log_format:
        text} in the file.
        """
        daemon = self.startCommand("text", lambda path: ["twistd", "-n", "--pidfile=", "dynllm", "-c", path,
                                                         "--log-format", "json"])
        daemon.stop()
        records = jsonLines(daemon.log())
        self.assertTrue(any("starting up" in r["message"] for r in records))

    def test_twist(self) -> None:
        """
        Under C{twist} (whose own default, on a pipe, is JSON with record
        separators and no message), C{log_format: json} gives the same
        lines as under twistd.
        """
        daemon = self.startCommand("json", lambda path: ["twist", "dynllm", "-c", path])
        daemon.stop()
        records = jsonLines(daemon.log())
        self.assertIn("Starting reactor...", [r["message"] for r in records])

    def test_levelAppliesToTwisted(self) -> None:
        """
        With C{log_level: warning}, Twisted's own info messages (twistd's
        "starting up", the site's "starting on") are not written.
        """
        daemon = self.daemon(log_format="json", log_level="warning")
        daemon.stop()
        records = jsonLines(daemon.log())
        self.assertEqual([r for r in records if r["level"] in ("debug", "info")], [])
        self.assertFalse(any("starting up" in r["message"] for r in records))

    def test_sigusr1Reopens(self) -> None:
        """
        With C{--logfile PATH}, C{SIGUSR1} reopens the file: after the file is
        moved away (as logrotate does), the next lines land in a new file at
        PATH, and the daemon goes on serving.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "dynllm.log")
        daemon = self.daemon(f"--logfile={path}", log_format="json")
        self.assertTrue(waitFor(lambda: os.path.exists(path)))
        os.rename(path, path + ".1")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGUSR1)
        self.assertTrue(waitFor(lambda: os.path.exists(path)))
        status, _, _ = daemon.post("/v1/chat/completions", dict(CHAT, model="fake"))
        self.assertEqual(status, 200)
        daemon.stop()
        with open(path + ".1") as f:
            old = [r["message"] for r in jsonLines(f.read())]
        with open(path) as f:
            new = [r["message"] for r in jsonLines(f.read())]
        self.assertTrue(any("starting up" in m for m in old), old)
        self.assertEqual(new[0], f"reopened the log file {path}")
        self.assertIn("[fake] fake: llama_server: model loaded", new)
        self.assertIn("Server Shut Down.", new)

    def test_sigusr1WithoutFile(self) -> None:
        """
        When the daemon logs to standard output, C{SIGUSR1} does not end it
        (its default action would, leaving backends behind): it says there
        is nothing to reopen.
        """
        daemon = self.daemon(log_format="json")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGUSR1)
        self.assertTrue(waitFor(lambda: "nothing to reopen" in daemon.log()))
        time.sleep(0.2)
        self.assertEqual(daemon.get("/health")[0], 200)


class RecentLogTests(SynchronousTestCase):
    """
    L{dynllm.logs.RecentLog} keeps the daemon's last messages as text lines.
    """

    def event(self, text: str, level: Any = None) -> dict[str, Any]:
        from twisted.logger import LogLevel

        return {"log_format": text, "log_level": level or LogLevel.info, "log_namespace": "t", "log_time": 0.0}

    def test_keepsLinesOnce(self) -> None:
        """
        Each message is kept as its text lines; the same event given again
        (Twisted's log beginner replays what was logged before logging
        began) is not kept twice, but an equal new event is.
        """
        from dynllm.logs import RecentLog

        recent = RecentLog()
        first = self.event("one\ntwo")
        recent(first)
        recent(first)
        recent(self.event("one\ntwo"))
        self.assertEqual([line.split("] ", 1)[1] for line in recent.ring.tail(10) if "] " in line], ["one", "one"])
        self.assertEqual(len(recent.ring.tail(10)), 4)

    def test_level(self) -> None:
        """
        Messages below the level set are not kept.
        """
        from twisted.logger import LogLevel

        from dynllm.logs import RecentLog

        recent = RecentLog()
        recent.setLevel("warning")
        recent(self.event("quiet"))
        recent(self.event("loud", LogLevel.error))
        self.assertEqual(len(recent.ring.tail(10)), 1)
        self.assertIn("loud", recent.ring.tail(1)[0])
