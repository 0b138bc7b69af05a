# -*- test-case-name: tests.test_service -*-
"""
dynllm's log messages, filtered by the configured C{log_level} before they
reach the global log (and so twistd's log file).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from zope.interface import implementer

_ORDER = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}

#: Configuration names of the levels.
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warning": LogLevel.warn, "error": LogLevel.error}


@implementer(ILogObserver)
class LevelFilter:
    """
    A log observer that passes on events at or above L{level}.
    """

    def __init__(self, level: LogLevel = LogLevel.info) -> None:
        self.level = level

    def __call__(self, event: dict[str, Any]) -> None:
        if _ORDER.get(event.get("log_level"), 1) >= _ORDER[self.level]:
            globalLogPublisher(event)


#: The observer of every dynllm logger.
observer = LevelFilter()


def setLevel(name: str) -> None:
    """
    Show dynllm's messages at level C{name} (C{debug}, C{info}, C{warning},
    C{error}) and above.
    """
    observer.level = LEVELS[name]


def logger(namespace: str) -> Logger:
    """
    @return: a logger for module C{namespace} whose events pass L{observer}.
    """
    return Logger(namespace=namespace, observer=observer)
