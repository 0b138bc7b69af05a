# -*- test-case-name: tests.test_signals -*-
"""
What the daemon does on each signal a service manager or an operator may
send, so that none kills it without stopping its backends.

    SIGHUP                      read the configuration again (L{DynLLMService.reload})
    SIGUSR1                     reopen the log file (logrotate; L{dynllm.logs})
    SIGTERM, SIGINT             stop in order (Twisted's own handlers)
    SIGQUIT, SIGABRT, SIGPWR,   stop in order, as for SIGTERM
    SIGXCPU, SIGXFSZ
    SIGUSR2, SIGALRM, SIGIO,    logged and otherwise ignored (their default
    SIGVTALRM, SIGPROF          action would end the process on the spot)

systemd sends SIGTERM to stop and SIGHUP for C{systemctl reload} (with
C{ExecReload=kill -HUP $MAINPID}, as C{etc/dynllm.service} has), SIGABRT
when a watchdog expires; runit's C{sv} and s6 send any of HUP, INT, QUIT,
USR1, USR2, ALRM, TERM. SIGKILL cannot be caught: the backends then die by
their parent-death signal (L{dynllm.process}), and the next start reconciles
what is left.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Callable

from twisted.application.service import Service

from dynllm.config import ConfigError
from dynllm.logs import logger
from dynllm.reload import RestartRequired, refusalLines

log = logger(__name__)


def _signals(*names: str) -> tuple[signal.Signals, ...]:
    # Not every platform has every signal (SIGPWR is Linux's).
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


#: Signals that stop the daemon in order, as SIGTERM does.
STOP = _signals("SIGQUIT", "SIGABRT", "SIGPWR", "SIGXCPU", "SIGXFSZ")

#: Signals that are logged and otherwise ignored.
IGNORE = _signals("SIGUSR2", "SIGALRM", "SIGIO", "SIGVTALRM", "SIGPROF")


class SignalHandlers(Service):
    """
    Installs the daemon's signal handlers while it runs (for C{twistd
    dynllm}; a program that embeds dynllm keeps its own).

    @ivar reactor: Stops the daemon; handlers hand their work to it.
    @ivar reload: Reads the configuration again (L{DynLLMService.reload}).
    @ivar reopenLogs: Reopens the log file, if there is one to reopen.
    """

    name = "signals"

    def __init__(
        self,
        reactor: Any,
        reload: Callable[[], Any],
        reopenLogs: Callable[[], object] | None = None,
    ) -> None:
        self.reactor = reactor
        self.reload = reload
        self.reopenLogs = reopenLogs
        self._stopping = False
        self._installing: Any = None

    def startService(self) -> None:
        super().startService()
        # The signals the reactor leaves alone at once, so that a SIGHUP
        # right after start-up (a reload that follows a start) does not end
        # the daemon by its default action; their work waits for the
        # reactor (callFromThread). SIGTERM and SIGINT after the reactor's
        # own handlers, which it installs as it starts running (after
        # twistd has started the services).
        handlers: dict[int, Callable[[int, FrameType | None], None]] = {signal.SIGHUP: self._hup}
        if self.reopenLogs is not None:
            handlers[signal.SIGUSR1] = self._usr1
        handlers.update({number: self._stop for number in STOP})
        handlers.update({number: self._ignore for number in IGNORE})
        self._installAll(handlers)
        self._installing = self.reactor.callLater(0, self._install)

    def _install(self) -> None:
        self._installing = None
        self._installAll({number: self._stop for number in (signal.SIGTERM, signal.SIGINT)})

    def _installAll(self, handlers: dict[int, Callable[[int, FrameType | None], None]]) -> None:
        for number, handler in handlers.items():
            signal.signal(number, handler)

    def stopService(self) -> Any:
        # The handlers stay: a signal while the daemon stops is logged, not
        # deadly (and not a second stop).
        self._stopping = True
        if self._installing is not None and self._installing.active():
            self._installing.cancel()
            self._installing = None
        return super().stopService()

    def _hup(self, number: int, frame: FrameType | None) -> None:
        if self._stopping:
            log.info("SIGHUP ignored: stopping")
            return
        self.reactor.callFromThread(self.reloadNow)

    def _usr1(self, number: int, frame: FrameType | None) -> None:
        assert self.reopenLogs is not None
        self.reactor.callFromThread(self.reopenLogs)

    def _stop(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self._stopping:
            log.info("{signal}: already stopping", signal=name)
            return
        self._stopping = True
        twisted = {signal.SIGTERM: "sigTerm", signal.SIGINT: "sigInt"}.get(signal.Signals(number))
        if twisted is not None and hasattr(self.reactor, twisted):
            # Twisted's own handler: it also makes twistd exit by the signal.
            getattr(self.reactor, twisted)(number, frame)
            return
        log.info("{signal}: stopping, as for SIGTERM", signal=name)
        self.reactor.callFromThread(self.reactor.stop)

    def _ignore(self, number: int, frame: FrameType | None) -> None:
        log.info("{signal} ignored (SIGHUP reloads; SIGTERM stops)", signal=signal.Signals(number).name)

    def reloadNow(self) -> None:
        """
        Reload, and log the outcome: the changes, or why nothing changed.
        """
        try:
            changes = self.reload()
        except (ConfigError, RestartRequired) as e:
            for line in refusalLines(e):
                log.error("SIGHUP: {line}", line=line)
        except Exception:
            log.failure("SIGHUP: the configuration was not reloaded")
        else:
            log.info("SIGHUP: configuration reloaded ({changes})", changes=changes.describe())
