# -*- test-case-name: tests.test_tap -*-
"""
Start-up failures that the operator must mend (a configuration with
problems, a port that is taken), told in a few plain lines instead of a
traceback or twistd's usage text.
"""

from __future__ import annotations

import errno

from twisted.internet.error import CannotListenError

from dynllm.config import ConfigError


class StartupError(SystemExit, Exception):
    """
    dynllm cannot start, for a reason that its message says and the operator
    must mend.

    It is an C{Exception}, so that code that cleans up after a failed start
    does so (twistd removes its pid file and tells a waiting parent, an
    embedding program's C{except Exception} catches it); and a
    C{SystemExit}, so that when nothing catches it (C{twistd}, C{twist}) the
    process ends with status 1 and the message on stderr, without a
    traceback. Option parsers raise C{SystemExit} the same way for
    C{--help} (L{twisted.python.usage.Options.opt_help}).

    @ivar message: What went wrong and what to mend: its first line starts
        with C{"dynllm: "}.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def configurationFailed(error: ConfigError) -> StartupError:
    """
    @param error: What L{dynllm.config.loadConfig} raised.
    @return: a L{StartupError} whose first line names the file and counts
        its problems (C{"dynllm: the configuration FILE has 2 problems:"}),
        followed by one indented line per problem.
    """
    count = len(error.problems)
    where = f"the configuration {error.source}" if error.source else "the configuration"
    lines = [f"dynllm: {where} has {count} problem{'' if count == 1 else 's'}:"]
    lines.extend(f"  {problem}" for problem in error.problems)
    return StartupError("\n".join(lines))


#: What to do about the usual reasons a port cannot be bound (C{bind(2)}).
_LISTEN_ADVICE = {
    errno.EADDRINUSE: "another program holds that port: stop it, or set server.port to a free one",
    errno.EACCES: "ports below 1024 need privileges: set server.port to 1024 or above",
    errno.EADDRNOTAVAIL: "server.host is not an address of this machine",
}


def listenFailed(host: str, port: int, error: CannotListenError) -> StartupError:
    """
    @param host: C{server.host}.
    @param port: C{server.port}.
    @param error: Why the API's port could not be bound.
    @return: a L{StartupError} of one line naming C{server.host},
        C{server.port}, the cause and what to do about it.
    """
    cause = error.socketError
    if isinstance(cause, OSError) and cause.strerror:
        why = cause.strerror[0].lower() + cause.strerror[1:]
        advice = _LISTEN_ADVICE.get(cause.errno or 0)
        if advice is not None:
            why = f"{why}; {advice}"
    else:
        why = str(cause)
    return StartupError(f"dynllm: cannot listen on server.host {host}, server.port {port}: {why}")
