"""
Real disk faults for the tests of the state database: a small tmpfs that can
be filled (a full disk) or mounted read-only, and files made immutable with
C{chattr +i} (a write to them fails even through a descriptor opened before,
for root too). Both need root (C{CAP_SYS_ADMIN}, C{CAP_LINUX_IMMUTABLE}), as
the test machines and CI containers run; without it the test that uses them
fails saying so, rather than being skipped.
"""

from __future__ import annotations

import errno
import os
import subprocess
from typing import Any


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.stderr.strip()}): the disk-fault tests need root"
            " in a container or machine that allows mounting a tmpfs and chattr"
        )


class SmallDisk:
    """
    A tmpfs of C{size} bytes mounted on a fresh directory of the test,
    unmounted when the test ends.

    @ivar path: Where it is mounted.
    """

    def __init__(self, case: Any, size: int = 1 << 20, readOnly: bool = False) -> None:
        self.path = os.path.abspath(case.mktemp())
        os.makedirs(self.path)
        options = f"size={size}" + (",ro" if readOnly else "")
        _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", self.path)
        case.addCleanup(lambda: _run("umount", "-l", self.path))
        self._filler = os.path.join(self.path, "filler")

    def fill(self) -> None:
        """
        Take every free byte with a filler file.
        """
        with open(self._filler, "ab", buffering=0) as f:
            block = b"\0" * 4096
            while True:
                try:
                    f.write(block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    return

    def free(self) -> None:
        """
        Remove the filler file.
        """
        os.remove(self._filler)


def immutable(case: Any, *paths: str) -> None:
    """
    Make C{paths} immutable (C{chattr +i}) until L{mutable} is called or
    the test ends.
    """
    for path in paths:
        _run("chattr", "+i", path)
        case.addCleanup(lambda p=path: os.path.exists(p) and subprocess.run(["chattr", "-i", p]))


def mutable(*paths: str) -> None:
    """
    Undo L{immutable}.
    """
    for path in paths:
        _run("chattr", "-i", path)
