"""
A twistd log observer factory (C{--logger=benchmarks._jsonlog.observer})
that writes the daemon's log as JSON with sub-millisecond C{log_time}s, so
that the benchmarks can tell where a cold start spends its time.
"""

import sys

from twisted.logger import jsonFileLogObserver


def observer():
    return jsonFileLogObserver(sys.stdout)
