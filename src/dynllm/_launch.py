"""
Start a backend so that it dies with the daemon, even one killed by SIGKILL.

Run by L{dynllm.process.ManagedProcess} as::

    python -I -S _launch.py DAEMON_PID PROGRAM [ARG...]

It is a script, not a module of the package: it imports nothing of dynllm
(nor Twisted), so it starts in a few milliseconds. It

 1. asks the kernel for SIGKILL when its parent, the daemon's thread that
    spawned it (the reactor thread), ends (C{prctl(PR_SET_PDEATHSIG)}, see
    prctl(2)), and exits at once if the daemon is already gone;
 2. makes a new session, so its pid is the id of the backend's process group;
 3. forks a guard (below), and
 4. execs the backend in its own place: the backend keeps the pid the
    daemon spawned (so the pid and start time recorded in the state
    database, and the process group, are the backend's), and the death
    signal, which survives C{execve} for programs that are not set-user-ID
    and have no file capabilities, applies to the backend.

The death signal reaches the backend only: its own children (a server that
forks workers) are not signalled by the kernel. The guard covers them: a
child of the backend, in the backend's process group, with a death signal
(SIGHUP) of its own, fired when the backend ends for whatever reason; then it
sends SIGKILL to the whole group, itself included. When the daemon is
killed, the kernel kills the backend, and the guard the rest of its group.
The daemon's orderly stop (SIGTERM to the group, then SIGKILL) reaches the
guard too: it ignores SIGTERM and SIGINT, which are the backend's to act on.

Why not util-linux C{setpriv --pdeathsig KILL}: it signals the backend only,
not the children it forks, and it would be one more program to require.
"""

import ctypes
import os
import signal
import sys

#: From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1

#: Exit status when the program cannot be run, as a shell gives.
CANNOT_RUN = 127


def setDeathSignal(signum: int) -> None:
    """
    Have the kernel send C{signum} to this process when the thread that
    created it ends.

    @raise OSError: if C{prctl} fails.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def guard(group: int) -> None:
    """
    Wait, in the backend's process group, for the backend (our parent) to
    end, then kill the group. Never returns.

    @param group: The backend's pid, which is its process group id.
    """

    def killGroup(signum: object = None, frame: object = None) -> None:
        os.killpg(group, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGHUP, killGroup)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    setDeathSignal(signal.SIGHUP)
    if os.getppid() != group:
        # The backend ended before the death signal was set.
        killGroup()
    # Hold none of the backend's pipes open: the daemon reads them to the end.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    while True:
        signal.pause()


def main(argv: list[str]) -> None:
    """
    Set the death signal, make a session, fork the guard, exec the program.
    """
    daemon, program = int(argv[1]), argv[2:]
    setDeathSignal(signal.SIGKILL)
    if os.getppid() != daemon:
        # The daemon ended before the death signal was set.
        os._exit(CANNOT_RUN)
    os.setsid()
    backend = os.getpid()
    if os.fork() == 0:
        try:
            guard(backend)
        finally:
            os._exit(0)
    # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored
    # across exec. Give the program the default dispositions, as the
    # daemon's spawn gave us.
    for signum in range(1, signal.NSIG):
        try:
            if signal.getsignal(signum) == signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    try:
        os.execvp(program[0], program)
    except OSError as e:
        os.write(2, f"cannot run {program[0]}: {e.strerror}\n".encode("utf-8", "replace"))
        os._exit(CANNOT_RUN)


if __name__ == "__main__":
    main(sys.argv)
