# -*- test-case-name: tests.test_torchinfo -*-
"""
The start-up line that lists torch's execution backends (C{['cpu', 'cuda']},
C{['cpu', 'xpu']}, ...), so that a wrong torch build shows at once.

torch is not a dependency of dynllm and importing it takes seconds, so it
is never imported here: the Python that would run the models (the one of
the C{transformers} program, else dynllm's own, if it has torch) is asked
in a child process after start-up, and the answer is logged when it comes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from typing import Any

from twisted.internet import defer

from dynllm.config import Config
from dynllm.logs import logger
from dynllm.process import ManagedProcess
from dynllm.runner import describeExit

log = logger(__name__)

#: Run by the interpreter that is asked; prints one JSON object.
PROBE = """\
import json
try:
    import torch
except ImportError:
    print("DYNLLM-TORCH", json.dumps(None))
else:
    found = ["cpu"]
    for name in ("cuda", "xpu", "mps"):
        module = getattr(torch, name, None) or getattr(getattr(torch, "backends", None), name, None)
        try:
            if module is not None and module.is_available():
                found.append(name)
        except Exception:
            pass
    print("DYNLLM-TORCH", json.dumps({"version": torch.__version__, "backends": found}))
"""

#: Seconds the child may take (importing a CUDA torch is slow).
PROBE_TIMEOUT = 120.0


def scriptInterpreter(program: str) -> str | None:
    """
    @param program: A program name or path, such as a console script that
        pip installed.
    @return: the Python that runs it, read from its C{#!} line, or C{None}
        when it is not found or not a Python script.
    """
    path = shutil.which(program)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            first = f.readline(4096).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
    if not words or "python" not in os.path.basename(words[0]):
        return None
    return shutil.which(words[0])


def interpreters(config: Config, ownHasTorch: bool | None = None) -> list[str]:
    """
    @return: the Pythons to ask: that of the C{transformers} program when a
        model uses it, and dynllm's own when torch is installed beside it.
    """
    found = []
    if any(m.backend == "transformers" for m in config.models):
        python = scriptInterpreter(config.backend.transformers_binary)
        if python is not None:
            found.append(python)
    if ownHasTorch is None:
        ownHasTorch = importlib.util.find_spec("torch") is not None
    if ownHasTorch and sys.executable not in found:
        found.append(sys.executable)
    return found


#: Starts the line of the probe's answer.
MARKER = "DYNLLM-TORCH "


async def torchBackends(reactor: Any, python: str, timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
    """
    Ask C{python}, in a child process of its own process group (stopped if
    it takes longer than C{timeout}, or if this is cancelled).

    @return: C{{"version": ..., "backends": [...]}}, or C{None} if
        C{python} has no torch.
    @raise RuntimeError: if the probe failed.
    """
    lines: list[str] = []
    child = ManagedProcess(
        name="torch-probe", argv=[python, "-c", PROBE], reactor=reactor, env=dict(os.environ), onLine=lines.append
    )
    child.start()
    # Ended, not only exited: the error message quotes its last output.
    ended = child.whenEnded()
    timer = reactor.callLater(timeout, child.stop)
    try:
        reason = await ended
    except defer.CancelledError:
        await child.stop()
        raise
    finally:
        if timer.active():
            timer.cancel()
    for line in lines:
        if line.startswith(MARKER):
            result: dict[str, Any] | None = json.loads(line[len(MARKER) :])
            return result
    raise RuntimeError(f"{python} {describeExit(reason)}: {' / '.join(lines[-3:])}")


async def logTorchBackends(reactor: Any, config: Config) -> None:
    """
    Log the torch execution backends of each Python that would run models.
    A problem is logged as a warning; this fails only when cancelled.
    """
    for python in interpreters(config):
        try:
            info = await torchBackends(reactor, python)
        except defer.CancelledError:
            raise
        except Exception as e:
            log.warn("could not list torch's execution backends with {python}: {error}", python=python, error=e)
            continue
        if info is None:
            log.info("torch is not installed for {python}", python=python)
        else:
            log.info(
                "torch {version} execution backends: {backends} ({python})",
                version=info["version"],
                backends=info["backends"],
                python=python,
            )


def startLogging(reactor: Any, config: Config) -> defer.Deferred[None]:
    """
    Start L{logTorchBackends} in the background.

    @return: a Deferred that fires when it is done (nobody needs to wait).
    """
    return defer.ensureDeferred(logTorchBackends(reactor, config))
