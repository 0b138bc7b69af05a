"""
Tests for L{dynllm.tap} and the C{twistd dynllm} plugin: command-line
options, the service they make, and the plugin's discovery.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import sys

import attrs
import yaml
from twisted.application.service import IServiceMaker, MultiService
from twisted.scripts.twistd import ServerOptions
from twisted.application.twist._options import TwistOptions
from twisted.internet import utils
from twisted.internet.error import CannotListenError
from twisted.logger import LogLevel
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import TestCase

from dynllm import logs, tap
from dynllm.config import Config, ConfigError
from dynllm.service import makeService as _makeService
from dynllm.startup import StartupError, configurationFailed, listenFailed
from dynllm.tap import Options, makeService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TapTestMixin:
    """
    Writes configuration files into a temporary directory.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "tiny.gguf"), "wb") as f:
            f.write(b"GGUF")

    def writeConfig(self, raw: dict, name: str = "dynllm.yaml") -> str:
        """
        Write C{raw} as YAML.

        @return: the file's path.
        """
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            yaml.safe_dump(raw, f)
        return path

    def goodConfig(self) -> str:
        """
        @return: the path of a valid configuration with one llama.cpp model,
            whose program is C{/bin/true} so that it is found.
        """
        return self.writeConfig(
            {
                "server": {"host": "127.0.0.1", "port": 18765},
                "backend": {"llamacpp_binary": "/bin/true"},
                "enabled_backends": ["llamacpp"],
                "models": [
                    {"name": "tiny", "path": "tiny.gguf", "backend": "llamacpp", "vram_mb": 10}
                ],
            }
        )


class OptionsTests(TapTestMixin, TestCase):
    """
    L{Options} loads and validates the configuration file.
    """

    def test_config(self) -> None:
        """
        C{--config PATH} loads the file into C{loadedConfig}.
        """
        path = self.goodConfig()
        options = Options()
        options.parseOptions(["--config", path])
        config = options["loadedConfig"]
        self.assertIsInstance(config, Config)
        self.assertEqual(config.source, path)
        self.assertEqual([m.name for m in config.models], ["tiny"])
        self.assertEqual(config.server.port, 18765)

    def test_shortOption(self) -> None:
        """
        C{-c PATH} is the same as C{--config PATH}.
        """
        path = self.goodConfig()
        options = Options()
        options.parseOptions(["-c", path])
        self.assertEqual(options["config"], path)
        self.assertEqual(options["loadedConfig"].models[0].name, "tiny")

    def test_badConfigIsStartupError(self) -> None:
        """
        An invalid configuration is a L{StartupError} (not a
        L{usage.UsageError}, after which twistd prints its usage text) whose
        first line names the file and counts the problems, and whose cause
        is the L{ConfigError} with those problems.
        """
        path = self.writeConfig({"total_vram": 1000})
        e = self.assertRaises(StartupError, Options().parseOptions, ["-c", path])
        self.assertNotIsInstance(e, usage.UsageError)
        lines = str(e).splitlines()
        self.assertEqual(lines[0], f"dynllm: the configuration {path} has 1 problem:")
        self.assertIn("total_vram", lines[1])
        self.assertIsInstance(e.__cause__, ConfigError)
        self.assertEqual(len(e.__cause__.problems), 1)

    def test_everyProblemListed(self) -> None:
        """
        Every problem of the file is listed, one indented line each, after
        the line that counts them.
        """
        path = self.writeConfig({"totl_vram_mb": 1, "server": {"prot": 1}, "log_level": "loud"})
        e = self.assertRaises(StartupError, Options().parseOptions, ["-c", path])
        lines = str(e).splitlines()
        self.assertEqual(lines[0], f"dynllm: the configuration {path} has 3 problems:")
        self.assertEqual(len(lines), 4, lines)
        for line, key in zip(lines[1:], ["log_level", "server.prot", "totl_vram_mb"]):
            self.assertTrue(line.startswith("  "), line)
            self.assertIn(key, line)

    def test_stateDirectoryChecked(self) -> None:
        """
        The daemon's configuration is checked for a C{db_path} whose
        directory does not exist, with its other problems.
        """
        with open(self.goodConfig()) as f:
            raw = yaml.safe_load(f)
        raw["db_path"] = "missing/state.db"
        raw["log_level"] = "loud"
        path = self.writeConfig(raw)
        e = self.assertRaises(StartupError, Options().parseOptions, ["-c", path])
        lines = str(e).splitlines()
        self.assertEqual(lines[0], f"dynllm: the configuration {path} has 2 problems:")
        self.assertIn("log_level", lines[1])
        self.assertIn(f"db_path: the directory '{self.dir}/missing'", lines[2])

    def test_ownedExtraArgsStopStartUp(self) -> None:
        """
        C{extra_args} that set what dynllm owns (here the listen port, as
        C{--port=N}) stop start-up with a message naming the file, the
        model, C{extra_args} and the option.
        """
        with open(self.goodConfig()) as f:
            raw = yaml.safe_load(f)
        raw["models"][0]["extra_args"] = ["--threads", 2, "--port=9999"]
        path = self.writeConfig(raw)
        e = self.assertRaises(StartupError, Options().parseOptions, ["-c", path])
        self.assertIn(path, str(e).splitlines()[0])
        self.assertIn("models[0] ('tiny').extra_args: '--port' (in '--port=9999') is set by dynllm", str(e))

    def test_missingConfigIsStartupError(self) -> None:
        """
        A configuration file that does not exist is a L{StartupError}
        naming it and why it cannot be read.
        """
        path = os.path.join(self.dir, "absent.yaml")
        e = self.assertRaises(StartupError, Options().parseOptions, ["--config", path])
        self.assertIn(path, str(e))
        self.assertIn("cannot read the configuration: No such file or directory", str(e))

    def test_badOptionIsUsageError(self) -> None:
        """
        An unknown command-line option is still a L{usage.UsageError}: the
        usage text is what helps there.
        """
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--confg", self.goodConfig()])


class LogOptionsTests(TapTestMixin, TestCase):
    """
    The plugin's options give twistd and twist dynllm's log observer
    factory, at the configured level and format.
    """

    def setUp(self) -> None:
        super().setUp()
        self.patch(tap, "_twistdFactory", None)
        self.patch(logs, "installed", [])
        self.patch(logs, "install", lambda daemonLog: daemonLog)

    def configWith(self, **settings: object) -> str:
        """
        @return: the path of L{goodConfig} with C{settings} added.
        """
        with open(self.goodConfig()) as f:
            raw = yaml.safe_load(f)
        raw.update(settings)
        return self.writeConfig(raw)

    def test_badLogFormat(self) -> None:
        """
        C{--log-format} other than C{text} or C{json} is a usage error.
        """
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["-c", self.goodConfig(), "--log-format", "xml"])
        self.assertIn("--log-format must be text or json", str(e))

    def test_twistdLogger(self) -> None:
        """
        Under twistd, the plugin names its own observer factory as twistd's
        C{logger}; the factory makes a L{logs.DaemonLog} at the configured
        level, writing the command line's format to standard output with
        C{--nodaemon}.
        """
        config = ServerOptions()
        config.parseOptions(["-n", "dynllm", "-c", self.configWith(log_level="warning"), "--log-format", "json"])
        self.assertIs(config["logger"], tap.twistdLogObserver)
        daemonLog = config["logger"]()
        self.assertIsInstance(daemonLog, logs.DaemonLog)
        self.assertEqual((daemonLog.format, daemonLog.level), ("json", "warning"))
        self.assertTrue(daemonLog.formatFixed)
        self.assertIs(daemonLog.output, sys.stdout)

    def test_twistdLogFile(self) -> None:
        """
        With twistd's C{--logfile}, the log is a L{logs.ReopenableFile} at
        that path, in the configured format.
        """
        path = os.path.join(self.dir, "d.log")
        config = ServerOptions()
        config.parseOptions(["-n", f"--logfile={path}", "dynllm", "-c", self.configWith(log_format="json")])
        daemonLog = config["logger"]()
        self.addCleanup(daemonLog.output.close)
        self.assertIsInstance(daemonLog.output, logs.ReopenableFile)
        self.assertEqual((daemonLog.output.path, daemonLog.format), (path, "json"))

    def test_twistdUserLogger(self) -> None:
        """
        A C{--logger} given to twistd still receives the events, through the
        level filter.
        """
        config = ServerOptions()
        config.parseOptions(
            ["-n", "--logger=benchmarks._jsonlog.observer", "dynllm", "-c", self.configWith(log_level="error")]
        )
        daemonLog = config["logger"]()
        self.assertEqual(daemonLog.level, "error")
        self.assertEqual(type(daemonLog.output).__name__, "FileLogObserver")

    def test_twist(self) -> None:
        """
        Under twist, the plugin sets its C{fileLogObserverFactory} (over
        twist's choice of JSON with record separators on a pipe) and lets
        the configured level decide rather than twist's default floor.
        """
        options = TwistOptions()
        options.parseOptions(["dynllm", "-c", self.configWith(log_level="debug")])
        self.assertEqual(options["logLevel"], LogLevel.debug)
        daemonLog = options["fileLogObserverFactory"](io.StringIO())
        self.assertEqual((daemonLog.format, daemonLog.level), ("text", "debug"))
        self.assertFalse(daemonLog.formatFixed)

    def test_twistLogFile(self) -> None:
        """
        A regular file twist opened (its C{--log-file}) is reopenable; the
        format is dynllm's C{--log-format}, whatever twist's says.
        """
        path = os.path.join(self.dir, "t.log")
        options = TwistOptions()
        options.parseOptions(
            ["--log-format", "text", f"--log-file={path}", "dynllm", "-c", self.goodConfig(), "--log-format", "json"]
        )
        daemonLog = options["fileLogObserverFactory"](options["logFile"])
        self.addCleanup(daemonLog.output.close)
        self.assertEqual(daemonLog.format, "json")
        self.assertIsInstance(daemonLog.output, logs.ReopenableFile)
        self.assertEqual(daemonLog.output.path, path)


class MakeServiceTests(TapTestMixin, TestCase):
    """
    L{makeService} builds the daemon from the parsed options.
    """

    def test_services(self) -> None:
        """
        The daemon is a L{MultiService} of the model manager, the idle
        reaper, the HTTP server and the signal handlers, named C{models},
        C{idle-reaper}, C{http} and C{signals}; nothing runs until it is
        started.
        """
        options = Options()
        options.parseOptions(["-c", self.goodConfig()])
        service = makeService(options)
        self.assertIsInstance(service, MultiService)
        self.assertEqual(
            sorted(child.name for child in service), ["http", "idle-reaper", "models", "signals"]
        )
        for name in ("models", "idle-reaper", "http", "signals"):
            self.assertFalse(service.getServiceNamed(name).running)
        self.assertIs(service.config, options["loadedConfig"])
        self.assertEqual(service.getServiceNamed("idle-reaper").step, 1)


class PluginTests(TestCase):
    """
    The C{dynllm} plugin is found by twistd.
    """

    def test_discoverable(self) -> None:
        """
        L{getPlugins} finds an L{IServiceMaker} with tapname C{dynllm} whose
        options and service come from L{dynllm.tap}.
        """
        import twisted.plugins

        makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("dynllm", makers)
        maker = makers["dynllm"]
        self.assertIs(maker.options, Options)
        self.assertIs(maker.makeService, makeService)
        self.assertTrue(maker.description)


class StartupErrorTests(TapTestMixin, TestCase):
    """
    L{dynllm.startup}: start-up failures as a few plain lines.
    """

    def test_exceptionAndExit(self) -> None:
        """
        A L{StartupError} is caught by C{except Exception} (so clean-up code
        runs) and, uncaught, ends the process with its message: it is a
        C{SystemExit} whose code is the message.
        """
        e = StartupError("dynllm: no")
        self.assertIsInstance(e, Exception)
        self.assertIsInstance(e, SystemExit)
        self.assertEqual(e.code, "dynllm: no")
        self.assertEqual(str(e), "dynllm: no")

    def test_configurationFailed(self) -> None:
        """
        L{configurationFailed} counts the problems in its first line, in
        the singular for one, and indents one line per problem.
        """
        one = configurationFailed(ConfigError("a is wrong", source="f.yaml"))
        self.assertEqual(str(one), "dynllm: the configuration f.yaml has 1 problem:\n  a is wrong")
        two = configurationFailed(ConfigError("a is wrong", "b is wrong"))
        self.assertEqual(str(two), "dynllm: the configuration has 2 problems:\n  a is wrong\n  b is wrong")

    def test_listenAdvice(self) -> None:
        """
        L{listenFailed} names C{server.host} and C{server.port}, the cause
        as the system says it, and what to do about the usual ones.
        """
        cases = [
            (errno.EADDRINUSE, "another program holds that port"),
            (errno.EACCES, "ports below 1024 need privileges"),
            (errno.EADDRNOTAVAIL, "server.host is not an address of this machine"),
        ]
        for number, advice in cases:
            error = CannotListenError("10.0.0.1", 80, OSError(number, os.strerror(number)))
            message = str(listenFailed("10.0.0.1", 80, error))
            self.assertTrue(message.startswith("dynllm: cannot listen on server.host 10.0.0.1, server.port 80: "), message)
            self.assertIn(os.strerror(number).lower(), message)
            self.assertIn(advice, message)
            self.assertNotIn("\n", message)
        odd = listenFailed("h", 1, CannotListenError("h", 1, OSError(errno.ENOBUFS, "No buffer space available")))
        self.assertTrue(str(odd).endswith("server.port 1: no buffer space available"), str(odd))

    def test_serviceRaisesOnTakenPort(self) -> None:
        """
        A L{DynLLMService} whose port is taken raises L{StartupError} from
        C{privilegedStartService} (twistd) and from C{startService} (twist,
        or a program embedding it), with C{CannotListenError} as its cause,
        before anything has started.
        """
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        options = Options()
        options.parseOptions(["-c", self.goodConfig()])
        config = attrs.evolve(
            options["loadedConfig"], server=attrs.evolve(options["loadedConfig"].server, port=port)
        )
        for start in ("privilegedStartService", "startService"):
            service = _makeService(config, persist=False)
            e = self.assertRaises(StartupError, getattr(service, start))
            self.assertIn(f"server.port {port}: address already in use", str(e))
            self.assertIsInstance(e.__cause__, CannotListenError)
            self.assertFalse(any(child.running for child in service), start)


#: Runs twistd as its console script does.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class CommandLineTests(TapTestMixin, TestCase):
    """
    What an operator sees when C{twistd -n dynllm} or C{twist dynllm} (the
    real commands, in a child process) cannot start: a few plain lines, no
    usage text, no traceback, and a failure status.
    """

    async def command(self, command: str, *args: str) -> tuple[list[str], int]:
        """
        Run C{command} (C{twistd} in the foreground, or C{twist}) with the
        C{dynllm} plugin and C{args}, in the temporary directory.

        @return: the lines of its output (stdout then stderr) and its exit
            status.
        """
        if command == "twistd":
            argv = ["-c", TWISTD, "-n", "dynllm", *args]
        else:
            argv = ["-m", "twisted", "dynllm", *args]
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = await utils.getProcessOutputAndValue(sys.executable, argv, env=env, path=self.dir)
        return (out + err).decode("utf-8", "replace").splitlines(), code

    def badConfig(self) -> str:
        """
        @return: the path of a configuration with three problems: a model
            without C{vram_mb} whose path does not exist, and a misspelt
            top-level key.
        """
        with open(self.goodConfig()) as f:
            raw = yaml.safe_load(f)
        raw["models"][0]["path"] = "absent.gguf"
        del raw["models"][0]["vram_mb"]
        raw["totl_vram_mb"] = 100
        return self.writeConfig(raw, "bad.yaml")

    def assertConfigProblems(self, lines: list[str], code: int, path: str) -> None:
        """
        Assert that C{lines} are the three problems of L{badConfig} after a
        line naming the file and counting them, alone, and C{code} a
        failure.
        """
        self.assertNotEqual(code, 0)
        self.assertEqual(lines[0], f"dynllm: the configuration {path} has 3 problems:", lines)
        self.assertEqual(len(lines), 4, lines)
        self.assertIn("totl_vram_mb", lines[1])
        self.assertIn("models[0] ('tiny').vram_mb is required", lines[2])
        self.assertIn("models[0] ('tiny').path", lines[3])

    async def test_twistdBadConfig(self) -> None:
        """
        C{twistd -n dynllm -c BAD.yaml} prints every problem under a line
        naming the file, without twistd's usage text, and fails.
        """
        path = self.badConfig()
        lines, code = await self.command("twistd", "-c", path)
        self.assertConfigProblems(lines, code, path)

    async def test_twistBadConfig(self) -> None:
        """
        C{twist dynllm -c BAD.yaml} does the same.
        """
        path = self.badConfig()
        lines, code = await self.command("twist", "-c", path)
        self.assertConfigProblems(lines, code, path)

    async def test_missingConfig(self) -> None:
        """
        A configuration file that does not exist is one problem, naming it.
        """
        path = os.path.join(self.dir, "absent.yaml")
        lines, code = await self.command("twistd", "-c", path)
        self.assertNotEqual(code, 0)
        self.assertEqual(
            lines,
            [f"dynllm: the configuration {path} has 1 problem:", "  cannot read the configuration: No such file or directory"],
        )

    def holdPort(self) -> int:
        """
        Hold a port on 127.0.0.1 with a listening socket until the test ends.

        @return: the port.
        """
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port: int = holder.getsockname()[1]
        return port

    def configOnPort(self, port: int) -> str:
        """
        @return: the path of L{goodConfig} with C{server.port} set to C{port}.
        """
        with open(self.goodConfig()) as f:
            raw = yaml.safe_load(f)
        raw["server"]["port"] = port
        return self.writeConfig(raw)

    def assertPortTaken(self, lines: list[str], code: int, port: int) -> None:
        """
        Assert that C{lines} say in one line, and no traceback, that
        C{server.port} C{port} is taken, and C{code} is a failure.
        """
        self.assertNotEqual(code, 0)
        said = [line for line in lines if "dynllm:" in line]
        self.assertEqual(len(said), 1, lines)
        self.assertIn(f"dynllm: cannot listen on server.host 127.0.0.1, server.port {port}: address already in use", said[0])
        self.assertIn("another program holds that port", said[0])
        self.assertFalse([line for line in lines if "Traceback" in line], lines)

    async def test_twistdPortTaken(self) -> None:
        """
        C{twistd -n dynllm} whose C{server.port} another socket holds says
        so in one line naming C{server.host}, C{server.port} and the cause,
        fails, and leaves no pid file.
        """
        port = self.holdPort()
        lines, code = await self.command("twistd", "-c", self.configOnPort(port))
        self.assertPortTaken(lines, code, port)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "twistd.pid")))

    async def test_twistPortTaken(self) -> None:
        """
        C{twist dynllm} does the same.
        """
        port = self.holdPort()
        lines, code = await self.command("twist", "-c", self.configOnPort(port))
        self.assertPortTaken(lines, code, port)

    for _test in (test_twistdBadConfig, test_twistBadConfig, test_missingConfig, test_twistdPortTaken, test_twistPortTaken):
        _test.timeout = 60  # type: ignore[attr-defined]
    del _test
