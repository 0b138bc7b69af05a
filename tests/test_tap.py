"""
Tests for L{dynllm.tap} and the C{twistd dynllm} plugin: command-line
options, the service they make, and the plugin's discovery.
"""

from __future__ import annotations

import io
import os
import sys

import yaml
from twisted.application.service import IServiceMaker, MultiService
from twisted.scripts.twistd import ServerOptions
from twisted.application.twist._options import TwistOptions
from twisted.internet import utils
from twisted.logger import LogLevel
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import TestCase

from dynllm import logs, tap
from dynllm.config import Config
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

    def test_badConfigIsUsageError(self) -> None:
        """
        An invalid configuration is reported as a L{usage.UsageError} whose
        message names the file and the bad key.
        """
        path = self.writeConfig({"total_vram": 1000})
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["-c", path])
        self.assertIn("total_vram", str(e))
        self.assertIn(path, str(e))

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
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["-c", path])
        self.assertIn(f"{path}: models[0] ('tiny').extra_args: '--port' (in '--port=9999') is set by dynllm", str(e))

    def test_missingConfigIsUsageError(self) -> None:
        """
        A configuration file that does not exist is a L{usage.UsageError}
        naming it.
        """
        path = os.path.join(self.dir, "absent.yaml")
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn(path, str(e))


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

    async def test_badConfigExitsWithMessage(self) -> None:
        """
        C{python -m twisted dynllm -c BAD.yaml} exits with a failure status
        and prints the message naming the bad key.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        bad = os.path.join(directory, "bad.yaml")
        with open(bad, "w") as f:
            f.write("totl_vram_mb: 100\n")
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "twisted", "dynllm", "-c", bad], env=env, path=ROOT
        )
        self.assertNotEqual(code, 0)
        output = (out + err).decode("utf-8", "replace")
        self.assertIn("totl_vram_mb", output)
        self.assertIn(bad, output)

    test_badConfigExitsWithMessage.timeout = 60  # type: ignore[attr-defined]
