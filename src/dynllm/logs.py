# -*- test-case-name: tests.test_logs -*-
"""
The daemon's log: loggers for dynllm's modules, and the observer that
writes every message of the process (dynllm's, Twisted's, backends') to the
log file, filtered by the configured C{log_level}, as text or as one JSON
object per line.

Filtering is the observer's job (L{twisted.logger.FilteringLogObserver} with
a L{twisted.logger.LogLevelFilterPredicate}, as C{twist} does): a program
that embeds dynllm and observes the global log itself sees every message of
dynllm's loggers and filters them as it likes. Under C{twistd} or C{twist},
L{dynllm.tap} installs a L{DaemonLog} before logging begins; L{setLevel}
changes its level at once (on a configuration reload) and L{reopen}, also
run on C{SIGUSR1}, reopens its file after logrotate has moved it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import deque
from datetime import datetime, timezone
from typing import IO, Any, Callable, Iterable

from attrs import define, field
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer

#: Configuration names of the levels, as C{log_level} spells them.
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warning": LogLevel.warn, "error": LogLevel.error}

#: How a level is spelt in a JSON line.
LEVEL_NAMES = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}

#: The values of C{log_format} and C{--log-format}.
FORMATS = ("text", "json")

log = Logger(namespace=__name__)


def logger(namespace: str) -> Logger:
    """
    @return: a logger for module C{namespace}. Its events go to the global
        log publisher, so to the daemon's log (through L{DaemonLog}'s
        filter) and to any observer an embedding program adds.
    """
    return Logger(namespace=namespace)


def modelOf(event: dict[str, Any]) -> str | None:
    """
    @return: the model an event concerns: its C{model} field, or in
        dynllm's own namespaces its C{name} field (the scheduler's messages
        name the model so); C{None} if it concerns none.
    """
    model = event.get("model")
    if model is None and str(event.get("log_namespace", "")).startswith("dynllm."):
        model = event.get("name")
    return model if isinstance(model, str) else None


def formatEventAsJSONLine(event: dict[str, Any]) -> str:
    """
    Format an event as one JSON object on one line, for log shippers.

    @return: C{{"time": ..., "level": ..., "logger": ..., "message": ...}}
        and a newline, where C{time} is ISO 8601 in UTC with microseconds
        (C{2026-11-30T13:54:37.123456Z}), C{level} one of C{debug},
        C{info}, C{warning}, C{error}, C{critical}, C{logger} the event's
        namespace and C{message} the rendered message; with C{model} when
        the event concerns a model (L{modelOf}) and C{traceback} when it
        carries a failure. Newlines inside values are escaped, so every
        event is one line.
    """
    when = datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "level": LEVEL_NAMES.get(level, "info") if level is not None else "info",
        "logger": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    model = modelOf(event)
    if model is not None:
        record["model"] = model
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = f"(unable to format the traceback of {type(failure.value).__name__})"
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


class _SecondTimes:
    """
    Twisted's C{formatTime}, remembered for the last second asked: a busy
    daemon logs several events a second (a backend's lines for each
    request), and C{strftime} with a time zone is most of what a line
    costs.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second)
        return self._text


def formatEventAsText(event: dict[str, Any], _times: _SecondTimes = _SecondTimes()) -> str | None:
    """
    Twisted's classic text line (C{formatEventAsClassicLogText}), with the
    time formatted once a second.
    """
    return formatEventAsClassicLogText(event, formatTime=_times)


FORMATTERS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "text": formatEventAsText,
    "json": formatEventAsJSONLine,
}


class ReopenableFile:
    """
    A log file opened by its path for appending, which L{reopen} opens
    again at the same path: after logrotate has renamed it, the next lines
    go to a new file there (logrotate's C{postrotate} sends C{SIGUSR1}).

    @ivar path: The file's path.
    @ivar encoding: Always C{utf-8} (it is written as text).
    """

    encoding = "utf-8"

    def __init__(self, path: str, file: IO[str] | None = None) -> None:
        """
        @param path: The file's path (made absolute now: a daemon changes
            its directory later).
        @param file: The file, already open at C{path} (C{twist} opens it
            itself); else it is opened here.
        @raise OSError: if it cannot be opened.
        """
        self.path = os.path.abspath(path)
        self._file = file if file is not None else self._open()

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8", errors="replace")

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """
        Open the file at L{path} again (creating it), and close the old one
        once the new one is open: if the new one cannot be opened, the old
        one is kept.

        @raise OSError: if the file cannot be opened.
        """
        new = self._open()
        old, self._file = self._file, new
        try:
            old.close()
        except OSError:
            pass

    def close(self) -> None:
        """
        Close the file.
        """
        self._file.close()


@define
class LogRing:
    """
    The last lines a backend printed, and who follows new ones. Lines may
    be kept as bytes, as read, and are decoded (UTF-8, bad bytes replaced)
    only when read back or followed: most lines of a chatty backend are
    pushed out unread.

    @ivar size: How many lines are kept.
    """

    size: int = 200
    _lines: deque[str | bytes] = field(init=False)
    _followers: list[Callable[[list[str]], object]] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self._lines = deque(maxlen=self.size)

    def append(self, line: str | bytes) -> None:
        """
        Keep C{line}, dropping the oldest one when full.
        """
        self.extend((line,))

    def extend(self, lines: Iterable[str | bytes]) -> None:
        """
        Keep C{lines}, in order, dropping the oldest ones when full, and
        pass them on to the followers.
        """
        if not self._followers:
            self._lines.extend(lines)
            return
        batch = list(lines)
        self._lines.extend(batch)
        decoded = [_decode(line) for line in batch]
        for follower in list(self._followers):
            try:
                follower(decoded)
            except Exception:
                # A follower's fault must not stop the program's output
                # being read: it is told no more.
                self._followers.remove(follower)
                log.failure("a follower of a log failed; it is told no more")

    def follow(self, onLines: Callable[[list[str]], object]) -> Callable[[], None]:
        """
        Call C{onLines(lines)} with every batch of lines kept from now on,
        decoded, oldest first, as they come.

        @return: a function that stops the calls.
        """
        self._followers.append(onLines)

        def stop() -> None:
            if onLines in self._followers:
                self._followers.remove(onLines)

        return stop

    def tail(self, count: int) -> list[str]:
        """
        @return: the last C{count} lines, oldest first.
        """
        if count <= 0:
            return []
        return [_decode(line) for line in list(self._lines)[-count:]]


def _decode(line: str | bytes) -> str:
    return line.decode("utf-8", "replace") if isinstance(line, bytes) else line


#: How many of its last events L{RecentLog} knows again when they are
#: replayed.
REPLAYED = 256


@implementer(ILogObserver)
@define(eq=False)
class RecentLog:
    """
    The daemon's own last messages, as the text log writes them, for
    C{GET /admin/logs}; its followers get new lines as they come (see
    L{LogRing.follow}). Add it to the global log publisher
    (L{dynllm.service.DynLLMService} does from its making, so that the
    start-up lines are kept too, until it stops).

    A message logged in another thread than the main one, where the reactor
    runs (the database's threads), is kept in the reactor's thread, so that
    followers write to their clients there.

    @ivar ring: The last lines (a message with a traceback is several).
    @ivar predicate: The least level kept; L{setLevel} changes it.
    """

    ring: LogRing = field(factory=lambda: LogRing(size=1000))
    predicate: LogLevelFilterPredicate = field(factory=lambda: LogLevelFilterPredicate(LogLevel.info))
    reactor: Any = None
    #: The last events kept, by identity: Twisted's log beginner replays the
    #: events logged before logging began to every observer, this one
    #: included, which saw them as they were logged.
    _kept: dict[int, dict[str, Any]] = field(factory=dict, init=False)

    def setLevel(self, name: str) -> None:
        """
        Keep messages at level C{name} (as C{log_level} spells it) and above.

        @raise KeyError: for another name.
        """
        self.predicate.setLogLevelForNamespace("", LEVELS[name])

    def __call__(self, event: dict[str, Any]) -> None:
        if self.predicate(event) == PredicateResult.no:
            return
        if threading.current_thread() is not threading.main_thread():
            reactor = self.reactor
            if reactor is None:
                from twisted.internet import reactor
            reactor.callFromThread(self._keep, event)
            return
        self._keep(event)

    def _keep(self, event: dict[str, Any]) -> None:
        if self._kept.get(id(event)) is event:
            return
        self._kept[id(event)] = event
        if len(self._kept) > REPLAYED:
            del self._kept[next(iter(self._kept))]
        text = formatEventAsText(event)
        if text:
            self.ring.extend(text.rstrip("\n").split("\n"))


@implementer(ILogObserver)
@define
class DaemonLog:
    """
    The daemon's log observer: every event at or above the level, formatted
    as text or JSON, written to a file or stream.

    @ivar output: Where the events go: a L{ReopenableFile}, a stream, or
        an observer of someone else's (twistd's C{--logger}).
    @ivar format: C{text} or C{json}.
    @ivar predicate: The level filter; L{setLevel} changes its level.
    @ivar observer: The filtering observer that does the work.
    @ivar writer: The observer that formats and writes the events, or
        C{None} when L{output} is an observer.
    @ivar formatFixed: Whether the format was given on the command line,
        so that L{setFormat} leaves it.
    """

    observer: FilteringLogObserver
    predicate: LogLevelFilterPredicate
    output: Any = None
    format: str = "text"
    writer: FileLogObserver | None = None
    formatFixed: bool = False

    def __call__(self, event: dict[str, Any]) -> None:
        self.observer(event)

    def setLevel(self, name: str) -> None:
        """
        Let through messages at level C{name} (C{debug}, C{info},
        C{warning}, C{error}) and above, from now on, whatever their
        namespace.

        @raise KeyError: for another name.
        """
        self.predicate.setLogLevelForNamespace("", LEVELS[name])

    def setFormat(self, name: str) -> bool:
        """
        Write the next events as C{name} (C{text} or C{json}), unless the
        command line chose the format or the events go to another
        observer.

        @return: whether the format is now C{name}.
        @raise KeyError: for another name.
        """
        formatter = FORMATTERS[name]
        if self.writer is None or self.formatFixed:
            return self.writer is not None and name == self.format
        self.writer.formatEvent = formatter
        self.format = name
        return True

    @property
    def level(self) -> str:
        """
        The name of the level let through (see L{setLevel}).
        """
        current = self.predicate.logLevelForNamespace("")
        return next(name for name, level in LEVELS.items() if level == current)

    def reopen(self) -> bool:
        """
        Reopen the log file at its path, if the log goes to a file.

        @return: whether there was a file to reopen (and it was reopened).
        """
        if not isinstance(self.output, ReopenableFile):
            log.info("received SIGUSR1, but the log is not written to a file: nothing to reopen")
            return False
        try:
            self.output.reopen()
        except OSError as e:
            log.error("could not reopen the log file {path}: {error}; still writing to the old one",
                      path=self.output.path, error=e)
            return False
        log.info("reopened the log file {path}", path=self.output.path)
        return True


def makeDaemonLog(output: Any, format: str = "text", level: str = "info", formatFixed: bool = False) -> DaemonLog:
    """
    Make the daemon's log observer.

    @param output: A L{ReopenableFile} or a text stream the events are
        written to, or an L{ILogObserver} that receives them (then
        C{format} is unused).
    @param format: C{text} (Twisted's classic lines) or C{json} (one
        object per line, L{formatEventAsJSONLine}).
    @param level: The least level written, as L{setLevel} takes it.
    @param formatFixed: Whether C{format} comes from the command line (a
        reload then keeps it, see L{DaemonLog.setFormat}).
    @raise KeyError: for an unknown format or level.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    writer = None
    if ILogObserver.providedBy(output):
        sink = output
    else:
        sink = writer = FileLogObserver(output, FORMATTERS[format])
    return DaemonLog(FilteringLogObserver(sink, [predicate]), predicate, output, format, writer, formatFixed)


#: The daemon logs installed in this process (by L{install}): one, under
#: twistd or twist.
installed: list[DaemonLog] = []


def install(daemonLog: DaemonLog) -> DaemonLog:
    """
    Make C{daemonLog} the one L{setLevel} and L{reopen} act on, and have
    C{SIGUSR1} reopen its file (logrotate). C{SIGUSR1}'s default action
    would end the daemon without stopping its backends; twistd's own
    handler rotates the file (renames it), which fights logrotate.

    @return: C{daemonLog}.
    """
    installed[:] = [daemonLog]
    signal.signal(signal.SIGUSR1, _onSIGUSR1)
    return daemonLog


def _onSIGUSR1(signum: int, frame: object) -> None:
    # Not between two writes of the log: in the reactor's thread, next.
    from twisted.internet import reactor

    reactor.callFromThread(reopen)  # type: ignore[attr-defined]


def setLevel(name: str) -> None:
    """
    Let through the daemon's messages at level C{name} (C{debug},
    C{info}, C{warning}, C{error}) and above, from now on: dynllm's,
    Twisted's and the backends'. Call it on a configuration reload with the
    new C{log_level}. Outside twistd or twist (no L{DaemonLog} installed)
    it does nothing: the embedding program filters its own log.

    @raise KeyError: for another name.
    """
    LEVELS[name]
    for daemonLog in installed:
        daemonLog.setLevel(name)


def setFormat(name: str) -> None:
    """
    Write the daemon's next messages as C{name} (C{text} or C{json}),
    unless C{--log-format} chose the format: call it on a configuration
    reload with the new C{log_format}. Outside twistd or twist it does
    nothing.

    @raise KeyError: for another name.
    """
    FORMATTERS[name]
    for daemonLog in installed:
        daemonLog.setFormat(name)


def reopen() -> None:
    """
    Reopen the daemon's log file at its path (what C{SIGUSR1} does).
    """
    for daemonLog in installed:
        daemonLog.reopen()
