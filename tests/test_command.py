"""
Tests for L{dynllm.backends.command} (any server, C{backend: command}) and
the parts of the runner and the reconciliation that its keys drive: the
readiness line, the stop signal, timeout and command.

Unit tests on a fake reactor; the real servers run through it in
L{tests.test_commandservers}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dynllm.backends import backendFor
from dynllm.backends.command import CommandBackend
from dynllm.config import ModelConfig, ReadyConfig, StopConfig
from dynllm.interfaces import IBackend
from dynllm.runner import FIRST_PROBE_DELAY, BackendRun
from dynllm.store import MemoryStateStore, reconcile
from dynllm.testing import FakeProcessReactor
from tests.test_backends import FakeHTTP


def commandModel(**kw: Any) -> ModelConfig:
    """
    @return: a command model C{c} built directly (no file checks), plus
        C{kw}.
    """
    settings: dict[str, Any] = {
        "name": "c",
        "path": "/models/c",
        "backend": "command",
        "vram_mb": 1,
        "command": ("server", "--host", "{host}", "--port", "{port}"),
    }
    settings.update(kw)
    return ModelConfig(**settings)


class CommandBackendTests(SynchronousTestCase):
    """
    Tests for L{CommandBackend}.
    """

    def setUp(self) -> None:
        self.backend = CommandBackend()

    def test_interface(self) -> None:
        """
        L{CommandBackend} provides L{IBackend} and is the backend of kind
        C{command}.
        """
        self.assertTrue(verifyObject(IBackend, self.backend))
        self.assertIsInstance(backendFor("command"), CommandBackend)

    def test_argvExpands(self) -> None:
        """
        The command line is C{command} then C{extra_args}, each with its
        placeholders filled in; C{{host}} is 127.0.0.1.
        """
        model = commandModel(
            command=("srv", "{path}", "--listen", "{host}:{port}", "--name={name}", "{{x}}"),
            extra_args=("--key", "{api_key}"),
        )
        self.assertEqual(
            self.backend.argv(model, "", 9123, "K"),
            ["srv", "/models/c", "--listen", "127.0.0.1:9123", "--name=c", "{x}", "--key", "K"],
        )

    def test_wantsKeyOnlyWhenUsed(self) -> None:
        """
        A run gets a key only if its command or C{extra_args} uses
        C{{api_key}}; the command backend reads none from a variable.
        """
        self.assertFalse(self.backend.wantsKey(commandModel()))
        self.assertTrue(self.backend.wantsKey(commandModel(extra_args=("--api-key", "{api_key}"))))
        self.assertTrue(self.backend.wantsKey(commandModel(command=("s", "--api-key={api_key}"))))
        self.assertIsNone(self.backend.keyVariable)

    def test_probeDefault(self) -> None:
        """
        By default the probe is C{GET /health} == 200.
        """
        http = FakeHTTP({"http://h/health": 200})
        self.assertTrue(self.successResultOf(self.backend.probe(http, "http://h", commandModel())))
        self.assertEqual(http.asked, ["http://h/health"])
        http = FakeHTTP({"http://h/health": 503})
        self.assertFalse(self.successResultOf(self.backend.probe(http, "http://h", commandModel())))

    def test_probeConfigured(self) -> None:
        """
        C{ready.http} sets the path and the status that means ready.
        """
        model = commandModel(ready=ReadyConfig(http_path="/v1/models", http_status=204))
        self.assertTrue(self.successResultOf(self.backend.probe(FakeHTTP({"http://h/v1/models": 204}), "http://h", model)))
        self.assertFalse(self.successResultOf(self.backend.probe(FakeHTTP({"http://h/v1/models": 200}), "http://h", model)))

    def test_probePathPlaceholders(self) -> None:
        """
        The probe's path has its placeholders filled in.
        """
        http = FakeHTTP({"http://127.0.0.1:9/v2/models/c/ready": 200})
        model = commandModel(ready=ReadyConfig(http_path="/v2/models/{name}/ready"))
        self.assertTrue(self.successResultOf(self.backend.probe(http, "http://127.0.0.1:9", model)))

    def test_probePathPlaceholdersQuoted(self) -> None:
        """
        A name with spaces or non-ASCII letters is percent-encoded (as
        UTF-8) where it fills the probe's path, which is a URL.
        """
        http = FakeHTTP({"http://127.0.0.1:9/v2/models/my%20mod%C3%A8le%3F/ready": 200})
        model = commandModel(name="my modèle?", ready=ReadyConfig(http_path="/v2/models/{name}/ready"))
        self.assertTrue(self.successResultOf(self.backend.probe(http, "http://127.0.0.1:9", model)))

    def test_probeLogOnly(self) -> None:
        """
        With readiness by log line only, the probe asks nothing and says
        ready (the run has seen the line before it probes).
        """
        http = FakeHTTP({})
        model = commandModel(ready=ReadyConfig(http_path=None, log="up"))
        self.assertTrue(self.successResultOf(self.backend.probe(http, "http://h", model)))
        self.assertEqual(http.asked, [])

    def test_defaultEndpoints(self) -> None:
        """
        Without C{endpoints}, a model serves the OpenAI routes of its type
        at their own paths, and no other route.
        """
        llm = commandModel()
        self.assertEqual(self.backend.upstreamPath("/v1/chat/completions", llm), "/v1/chat/completions")
        self.assertEqual(self.backend.upstreamPath("/chat/completions", llm), "/v1/chat/completions")
        self.assertIsNone(self.backend.upstreamPath("/completion", llm))
        self.assertIsNone(self.backend.upstreamPath("/v1/messages", llm))
        asr = commandModel(model_type="transcription")
        self.assertEqual(self.backend.upstreamPath("/v1/audio/transcriptions", asr), "/v1/audio/transcriptions")

    def test_configuredEndpoints(self) -> None:
        """
        C{endpoints} decides the routes and their upstream paths, under any
        spelling of a route.
        """
        model = commandModel(model_type="transcription", endpoints={"/v1/audio/transcriptions": "/inference"})
        self.assertEqual(self.backend.upstreamPath("/audio/transcriptions", model), "/inference")
        self.assertIsNone(self.backend.upstreamPath("/v1/audio/translations", model))
        self.assertIsNone(self.backend.upstreamPath("/nothing", model))

    def test_upstreamModel(self) -> None:
        """
        C{upstream_model}: C{name}, C{path}, C{keep} (the name the request
        gave) or a fixed string.
        """
        self.assertEqual(self.backend.upstreamModel(commandModel(), "alias"), "c")
        self.assertEqual(self.backend.upstreamModel(commandModel(upstream_model="path"), "alias"), "/models/c")
        self.assertEqual(self.backend.upstreamModel(commandModel(upstream_model="keep"), "alias"), "alias")
        self.assertEqual(self.backend.upstreamModel(commandModel(upstream_model="keep")), "c")
        self.assertEqual(self.backend.upstreamModel(commandModel(upstream_model="gpt-x"), "alias"), "gpt-x")

    def test_readyHint(self) -> None:
        """
        Lines that servers print once they listen prompt a probe.
        """
        self.assertTrue(self.backend.readyHint("INFO:     Uvicorn running on http://127.0.0.1:9100"))
        self.assertTrue(self.backend.readyHint("main: server is listening on http://127.0.0.1:9100"))
        self.assertFalse(self.backend.readyHint("loading weights"))


class CommandRunTests(SynchronousTestCase):
    """
    Tests for L{BackendRun} with a command model: its key, its readiness
    line, its stop signal, timeout and command.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.http = FakeHTTP({"http://127.0.0.1:40123/health": 200})

    def makeRun(self, model: ModelConfig, killTime: float = 5.0) -> BackendRun:
        return BackendRun(
            model=model,
            backend=CommandBackend(),
            port=40123,
            reactor=self.reactor,
            http=self.http,
            binary="",
            killTime=killTime,
            newSession=False,
        )

    def test_keyOnCommandLine(self) -> None:
        """
        A command that uses C{{api_key}} gets the run's fresh key there, and
        the run sends it (L{BackendRun.apiKey}); one that does not gets
        none.
        """
        run = self.makeRun(commandModel(extra_args=("--api-key", "{api_key}")))
        run.start()
        [transport] = self.reactor.spawned
        self.assertIsNotNone(run.apiKey)
        self.assertEqual(transport.args[-2:], ["--api-key", run.apiKey])
        other = self.makeRun(commandModel())
        self.assertIsNone(other.apiKey)

    def test_keyNotInDaemonLog(self) -> None:
        """
        The run's key is not in the daemon's log: the line that tells of the
        start shows C{<api_key>} where the command line has it.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        run = self.makeRun(commandModel(extra_args=("--api-key", "{api_key}")))
        run.start()
        assert run.apiKey is not None
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("--api-key <api_key>", text)
        self.assertNotIn(run.apiKey, text)

    def test_keyNotInOutput(self) -> None:
        """
        A server that prints its own key (vLLM logs its arguments) has it
        replaced by C{<api_key>} in the daemon's log and in the model's
        last lines.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        run = self.makeRun(commandModel(env={"KEY": "{api_key}"}))
        run.start()
        assert run.apiKey is not None
        self.reactor.spawned[0].output(f"args: api_key={run.apiKey!r}\n".encode())
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("args: api_key='<api_key>'", text)
        self.assertNotIn(run.apiKey, text)
        self.assertEqual(run.logTail(), ["args: api_key='<api_key>'"])

    def test_probeSendsKey(self) -> None:
        """
        A run with a key sends it as Bearer on its readiness probes too (a
        C{ready.http.path} such as C{/v1/models} is behind the key on vLLM);
        a run without one sends no header.
        """
        run = self.makeRun(commandModel(env={"KEY": "{api_key}"}))
        run.start()
        self.reactor.advance(FIRST_PROBE_DELAY)
        self.assertEqual(self.http.headers, [{b"Authorization": [b"Bearer " + (run.apiKey or "").encode()]}])
        self.http.headers.clear()
        self.makeRun(commandModel()).start()
        self.reactor.advance(FIRST_PROBE_DELAY)
        self.assertEqual(self.http.headers, [None])

    def test_keyInEnvironment(self) -> None:
        """
        A key in a variable (C{env: {VLLM_API_KEY: "{api_key}"}}) is the
        run's key, there and not on the command line; the other variables'
        placeholders are filled in too.
        """
        run = self.makeRun(commandModel(env={"VLLM_API_KEY": "{api_key}", "WHERE": "{host}:{port}"}))
        run.start()
        [transport] = self.reactor.spawned
        self.assertIsNotNone(run.apiKey)
        self.assertEqual(transport.env["VLLM_API_KEY"], run.apiKey)
        self.assertEqual(transport.env["WHERE"], "127.0.0.1:40123")
        self.assertNotIn(run.apiKey, transport.args)

    def test_spawnsExpandedCommand(self) -> None:
        """
        The run spawns the model's command with its port.
        """
        self.makeRun(commandModel()).start()
        self.assertEqual(self.reactor.spawned[0].args, ["server", "--host", "127.0.0.1", "--port", "40123"])

    def test_readyByLogLineOnly(self) -> None:
        """
        With C{ready: {log: REGEX}} alone, nothing is probed, and the run is
        ready once a line matches.
        """
        run = self.makeRun(commandModel(ready=ReadyConfig(http_path=None, log=r"model \w+ ready")))
        run.start()
        ready = run.whenReady()
        self.reactor.advance(10)
        self.assertEqual(self.http.asked, [])
        self.reactor.spawned[0].output(b"loading\n")
        self.assertNoResult(ready)
        self.reactor.spawned[0].output(b"model c ready\n")
        self.successResultOf(ready)
        self.assertEqual(self.http.asked, [])

    def test_readyByLogThenHTTP(self) -> None:
        """
        With both a log line and an HTTP probe, probing starts once the line
        is seen, and the run is ready when the probe answers.
        """
        self.http.codes = {}
        run = self.makeRun(commandModel(ready=ReadyConfig(log="up")))
        run.start()
        ready = run.whenReady()
        self.reactor.advance(10)
        self.assertEqual(self.http.asked, [])
        self.reactor.spawned[0].output(b"up\n")
        self.assertEqual(self.http.asked, ["http://127.0.0.1:40123/health"])
        self.assertNoResult(ready)
        self.http.codes = {"http://127.0.0.1:40123/health": 200}
        self.reactor.advance(FIRST_PROBE_DELAY * 2)
        self.successResultOf(ready)

    def test_stopSignal(self) -> None:
        """
        C{stop.signal} is the signal sent, and C{stop.timeout} the seconds
        before KILL.
        """
        run = self.makeRun(commandModel(stop=StopConfig(signal="INT", timeout=2)))
        run.start()
        [transport] = self.reactor.spawned
        stopped = run.stop()
        self.assertEqual(transport.signals, ["INT"])
        self.reactor.advance(2)
        self.assertEqual(transport.signals, ["INT", "KILL"])
        transport.exit()
        self.successResultOf(stopped)

    def test_stopCommandInsteadOfSignal(self) -> None:
        """
        A C{stop.command} is run, with placeholders filled in, instead of
        signalling the server; the stop fires when the server exits.
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop", "{name}", "{port}"), timeout=3)))
        run.start()
        stopped = run.stop()
        server, stopper = self.reactor.spawned
        self.assertEqual(stopper.args, ["ctl", "stop", "c", "40123"])
        self.assertEqual(server.signals, [])
        stopper.exit()
        self.assertNoResult(stopped)
        server.exit()
        self.assertIsInstance(self.successResultOf(stopped), ProcessDone)
        self.reactor.advance(10)
        self.assertEqual(server.signals, [])

    def test_exitToldAfterStopCommand(self) -> None:
        """
        When the process dynllm started exits before the stop command has
        ended (a C{docker run} client that goes while C{docker stop} waits
        for the container), the exit is told only once the stop command
        has ended: until then the server may still hold its memory and
        port.
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop"), timeout=3)))
        run.start()
        exited = run.whenExited()
        run.stop()
        server, stopper = self.reactor.spawned
        server.exit()
        self.assertNoResult(exited)
        stopper.exit()
        self.assertIsInstance(self.successResultOf(exited), ProcessDone)

    def test_stopCommandThenKill(self) -> None:
        """
        A server still there C{stop.timeout} seconds after its stop command
        gets KILL, and so does a stop command that hangs.
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop"), timeout=3)))
        run.start()
        stopped = run.stop()
        server, stopper = self.reactor.spawned
        self.reactor.advance(3)
        self.assertEqual(server.signals, ["KILL"])
        self.assertEqual(stopper.signals, ["TERM"])
        self.reactor.advance(3)
        self.assertEqual(stopper.signals, ["TERM", "KILL"])
        server.exit()
        self.assertNoResult(stopped)
        stopper.exit()
        self.successResultOf(stopped)

    def test_stopCommandFailsThenSignal(self) -> None:
        """
        A stop command that fails (exits non-zero: a program not found, a
        container already gone) leaves the server to the signal at once,
        rather than to KILL after C{stop.timeout}.
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop"), timeout=30)))
        run.start()
        stopped = run.stop()
        server, stopper = self.reactor.spawned
        stopper.exit(ProcessTerminated(exitCode=127))
        self.assertEqual(server.signals, ["TERM"])
        server.exit()
        self.successResultOf(stopped)
        self.flushLoggedErrors()

    def test_stopCommandSucceedsNoSignal(self) -> None:
        """
        A stop command that succeeds is trusted: the server gets no signal
        before C{stop.timeout}.
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop"), timeout=30)))
        run.start()
        run.stop()
        server, stopper = self.reactor.spawned
        stopper.exit()
        self.reactor.advance(29)
        self.assertEqual(server.signals, [])

    def test_exitOnItsOwnRunsStopCommand(self) -> None:
        """
        A server process that exits without being stopped (a C{docker run}
        client that died, whose container may live on) has its stop command
        run, and its exit is told only once that command has ended: its
        memory and port are not free before.
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop", "{port}"), timeout=3)))
        run.start()
        exited = run.whenExited()
        [server] = self.reactor.spawned
        server.exit(ProcessTerminated(exitCode=125))
        self.assertNoResult(exited)
        [_, stopper] = self.reactor.spawned
        self.assertEqual(stopper.args, ["ctl", "stop", "40123"])
        stopper.exit()
        self.assertEqual(self.successResultOf(exited).exitCode, 125)
        self.assertEqual(self.successResultOf(run.whenExited()).exitCode, 125)
        run.stop()
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_exitOnItsOwnWithoutStopCommand(self) -> None:
        """
        Without a stop command, a server's exit is told at once.
        """
        run = self.makeRun(commandModel())
        run.start()
        exited = run.whenExited()
        self.reactor.spawned[0].exit(ProcessTerminated(exitCode=1))
        self.assertEqual(self.successResultOf(exited).exitCode, 1)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_stopWaitsForStopCommand(self) -> None:
        """
        A stop is done once the stop command has ended too, not only the
        server's process: a C{docker stop X && docker rm X} still cleaning
        up is waited for (so that the model's memory counts until then, and
        the daemon does not exit before it).
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop"), timeout=3)))
        run.start()
        stopped = run.stop()
        server, stopper = self.reactor.spawned
        server.exit()
        self.assertNoResult(stopped)
        stopper.exit()
        self.assertIsInstance(self.successResultOf(stopped), ProcessDone)

    def test_exitOnItsOwnKeepsItsOwnLines(self) -> None:
        """
        The last lines of a run that exited on its own are its own, not its
        stop command's (which the model's log has after them).
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop"), timeout=3)))
        run.start()
        [server] = self.reactor.spawned
        server.output(b"server: detached, bye\n")
        server.exit()
        stopper = self.reactor.spawned[1]
        stopper.output(b"ctl: stopped c\n")
        stopper.exit()
        self.assertEqual(run.logTail(), ["server: detached, bye"])
        self.assertEqual(run.ring.tail(2), ["server: detached, bye", "ctl: stopped c"])

    def test_secondStopRunsNoSecondCommand(self) -> None:
        """
        A second stop while the first is pending runs no second stop
        command.
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop"))))
        run.start()
        run.stop()
        run.stop()
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stopCommandUnspawnable(self) -> None:
        """
        A stop command that cannot be spawned falls back to the signal.
        """
        run = self.makeRun(commandModel(stop=StopConfig(command=("ctl", "stop"))))
        run.start()
        self.reactor.spawnError = OSError("no such program")
        run.stop()
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])
        self.flushLoggedErrors()

    def test_stopCommandGetsNoKey(self) -> None:
        """
        The stop command runs in the server's environment, without the run's
        key.
        """
        run = self.makeRun(
            commandModel(env={"A": "1"}, extra_args=("--k", "{api_key}"), stop=StopConfig(command=("ctl",)))
        )
        run.start()
        run.stop()
        stopper = self.reactor.spawned[1]
        self.assertEqual(stopper.env["A"], "1")
        self.assertNotIn(run.apiKey, stopper.env.values())


class ReconcileStopCommandTests(SynchronousTestCase):
    """
    L{reconcile} runs what stops a leftover server (a model's stop command)
    for each row recorded with a process, whether or not that process is
    still there.
    """

    def setUp(self) -> None:
        self.store = MemoryStateStore()
        self.store.saved = {
            "gone": {"name": "gone", "status": "loaded", "pid": 10, "pgid": 10, "start_time": 5, "port": 9101},
            "idle": {"name": "idle", "status": "unloaded", "pid": None, "pgid": None, "start_time": None, "port": None},
        }
        self.asked: list[dict[str, Any]] = []
        self.signals: list[tuple[int, str]] = []

    def stopCommand(self, row: Any) -> defer.Deferred[None]:
        self.asked.append(dict(row))
        return defer.succeed(None)

    def test_runsForRecordedRunOnly(self) -> None:
        """
        The stop command is run for a row recorded with a process (with
        its port) even when that process is gone, and not for a row
        without one; every row ends unloaded.
        """
        stopped = self.successResultOf(
            defer.ensureDeferred(
                reconcile(
                    self.store, ["gone", "idle"], None,
                    startTimeOf=lambda pid: None,
                    signal=lambda pgid, name: self.signals.append((pgid, name)) or True,
                    stopCommand=self.stopCommand,
                )
            )
        )
        self.assertEqual([(r["name"], r["port"]) for r in self.asked], [("gone", 9101)])
        self.assertEqual(stopped, ["gone"])
        self.assertEqual(self.signals, [])
        self.assertEqual({r["status"] for r in self.store.saved.values()}, {"unloaded"})

    def test_runsThenSignals(self) -> None:
        """
        A process still there after the stop command gets its group
        signalled as before, and is named once.
        """
        alive = {10: 5}

        def signal(pgid: int, name: str) -> bool:
            self.signals.append((pgid, name))
            alive.pop(10, None)
            return True

        stopped = self.successResultOf(
            defer.ensureDeferred(
                reconcile(
                    self.store, ["gone", "idle"], None,
                    startTimeOf=alive.get, signal=signal, stopCommand=self.stopCommand,
                )
            )
        )
        self.assertEqual(len(self.asked), 1)
        self.assertEqual(self.signals, [(10, "TERM"), (10, "KILL")])
        self.assertEqual(stopped, ["gone"])
