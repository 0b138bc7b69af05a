# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin: C{twistd -n dynllm --config PATH}, or C{twist dynllm
--config PATH}.

The configuration is read while the options are parsed, before twistd or
twist start logging, so the plugin gives them its own log observer factory
(twistd's C{logger} option, twist's C{fileLogObserverFactory}): the
daemon's log is then a L{dynllm.logs.DaemonLog} at the configured level and
format, and C{SIGUSR1} reopens its file.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable

from twisted.logger import ILogObserver, LegacyLogObserverWrapper, LogLevel
from twisted.python import usage
from twisted.python.reflect import namedAny

from dynllm import logs
from dynllm.config import Config, ConfigError, loadConfig
from dynllm.service import DynLLMService
from dynllm.service import makeService as _makeService
from dynllm.signals import SignalHandlers
from dynllm.startup import configurationFailed


class Options(usage.Options):
    """
    Command-line options of C{twistd dynllm}.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve an OpenAI-compatible API that starts local inference servers "
        "(llama.cpp, OpenVINO Model Server, transformers serve) on demand."
    )
    optParameters = [
        ["config", "c", "config.yaml", "Path to the YAML configuration file."],
        [
            "log-format",
            None,
            None,
            "text or json (one JSON object per line); overrides log_format in the configuration.",
        ],
    ]

    def postOptions(self) -> None:
        """
        Load the configuration into C{loadedConfig}, and have twistd or
        twist log through dynllm (L{hookLogging}).

        @raise usage.UsageError: for a C{--log-format} other than text or
            json.
        @raise dynllm.startup.StartupError: listing every problem of the
            file; under twistd or twist it ends the process with status 1
            and those lines, without the usage text or a traceback.
        """
        # A reload asked for before the daemon runs (systemd may send one
        # as soon as the process exists) must not end it: SIGHUP is ignored
        # until the daemon's handlers take over (L{dynllm.signals}).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        logFormat = self["log-format"]
        if logFormat is not None and logFormat not in logs.FORMATS:
            raise usage.UsageError(f"--log-format must be text or json, not {logFormat!r}")
        try:
            config = loadConfig(self["config"], checkState=True)
        except ConfigError as e:
            # Not a UsageError: twistd would print its usage text first.
            raise configurationFailed(e) from e
        self["loadedConfig"] = config
        parent = getattr(self, "parent", None)
        if parent is not None:
            hookLogging(parent, config, logFormat)


def hookLogging(runnerOptions: Any, config: Config, logFormat: str | None = None) -> None:
    """
    Have twistd or twist start the daemon's log as a
    L{dynllm.logs.DaemonLog}: at C{config.log_level}, in the format given
    on the command line (dynllm's C{--log-format}), else
    C{config.log_format}.

    Both read their options only when they start logging, after the
    plugin's options are parsed: twistd calls C{options["logger"]} (its
    C{--logger}) with no argument, twist calls
    C{options["fileLogObserverFactory"]} with the file of its
    C{--log-file} (L{twisted.application.twist._options.TwistOptions}).

    @param runnerOptions: twistd's C{ServerOptions} or twist's
        C{TwistOptions}, the parent of the plugin's L{Options}.
    """
    if "logfile" in runnerOptions:
        userFactory = runnerOptions.get("logger")
        if isinstance(userFactory, str):
            try:
                userFactory = namedAny(userFactory)
            except Exception as e:
                raise usage.UsageError(f"Logger {userFactory!r} could not be imported: {e}") from None
        global _twistdFactory
        _twistdFactory = twistdObserverFactory(
            runnerOptions, logFormat or config.log_format, config.log_level, userFactory, logFormat is not None
        )
        # twistd resolves its logger option by name after this, so name ours.
        runnerOptions["logger"] = f"{__name__}.{twistdLogObserver.__name__}"
    elif "logFile" in runnerOptions:
        # twist's own --log-format cannot be told from its default (JSON
        # with record separators when the output is not a terminal, chosen
        # before its options are parsed): dynllm's option decides.
        runnerOptions["fileLogObserverFactory"] = twistObserverFactory(
            logFormat or config.log_format, config.log_level, logFormat is not None
        )
        # twist filters at its --log-level too; unless another level than
        # its default was asked for there, let log_level alone decide.
        if runnerOptions.get("logLevel") == LogLevel.info:
            runnerOptions["logLevel"] = LogLevel.debug


#: The factory L{twistdLogObserver} calls, made by L{hookLogging}.
_twistdFactory: Callable[[], logs.DaemonLog] | None = None


def twistdLogObserver() -> logs.DaemonLog:
    """
    The observer factory that twistd's C{logger} option names once
    L{hookLogging} has run (twistd takes only a name there).

    @raise RuntimeError: if L{hookLogging} has not run.
    """
    if _twistdFactory is None:
        raise RuntimeError("twistdLogObserver is set up by the dynllm plugin's options; use it only through them")
    return _twistdFactory()


def twistdObserverFactory(
    serverOptions: Any,
    logFormat: str,
    level: str,
    userFactory: Callable[[], Any] | None = None,
    formatFixed: bool = False,
) -> Callable[[], logs.DaemonLog]:
    """
    @return: an observer factory for twistd's C{logger} option that writes
        where twistd's own would (C{--logfile}, C{twistd.log} for a daemon,
        standard output with C{--nodaemon}; C{--syslog}; or the observer of
        C{userFactory}, the C{--logger} given on the command line), through
        a L{dynllm.logs.DaemonLog}. Unlike twistd's, the file is not rotated
        by size or renamed on C{SIGUSR1}: it is reopened (logrotate moves
        it).
    """
    def factory() -> logs.DaemonLog:
        output: Any
        if userFactory is not None:
            output = userFactory()
            if not ILogObserver.providedBy(output):
                output = LegacyLogObserverWrapper(output)
        elif serverOptions.get("syslog"):
            from twisted.python import syslog

            emit = syslog.SyslogObserver(serverOptions.get("prefix", "")).emit
            output = LegacyLogObserverWrapper(emit)  # type: ignore[arg-type]
        else:
            logfile = serverOptions.get("logfile")
            nodaemon = serverOptions.get("nodaemon", False)
            if logfile == "-":
                if not nodaemon:
                    sys.exit("Daemons cannot log to stdout, exiting!")
                output = sys.stdout
            elif nodaemon and not logfile:
                output = sys.stdout
            else:
                output = logs.ReopenableFile(logfile or "twistd.log")
        return logs.install(logs.makeDaemonLog(output, logFormat, level, formatFixed))

    return factory


def twistObserverFactory(logFormat: str, level: str, formatFixed: bool = False) -> Callable[[Any], logs.DaemonLog]:
    """
    @return: a C{fileLogObserverFactory} for twist: it writes to the file
        twist opened (its C{--log-file}; standard output by default)
        through a L{dynllm.logs.DaemonLog}, reopening a regular file by
        its name on C{SIGUSR1}.
    """

    def factory(logFile: Any) -> logs.DaemonLog:
        output = logFile
        name = getattr(logFile, "name", None)
        if logFile not in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) and isinstance(name, str):
            isatty = getattr(logFile, "isatty", lambda: False)
            if not isatty():
                output = logs.ReopenableFile(name, logFile)
        return logs.install(logs.makeDaemonLog(output, logFormat, level, formatFixed))

    return factory


def makeService(options: Options) -> DynLLMService:
    """
    @return: the daemon for the parsed C{options}, with its signal handlers
        (L{dynllm.signals}); one that exits with a line naming C{db_path}
        when its state database cannot be used.
    """
    from twisted.internet import reactor

    service = _makeService(options["loadedConfig"])
    service.exitOnStartError = True
    SignalHandlers(reactor, service.reload).setServiceParent(service)
    return service
