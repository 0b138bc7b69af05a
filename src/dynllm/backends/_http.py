# -*- test-case-name: tests.test_backends -*-
"""
Readiness probing shared by the backends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

#: Seconds a single readiness probe may take.
PROBE_TIMEOUT = 5.0


async def getIsOK(http: Any, url: str, method: str = "GET") -> bool:
    """
    @return: whether C{url} answers 200 within L{PROBE_TIMEOUT}; a refused
        connection, a timeout or another status is C{False}.
    """
    return await getIsStatus(http, url, 200, method)


async def getIsStatus(http: Any, url: str, status: int, method: str = "GET") -> bool:
    """
    @return: whether C{url} answers C{status} within L{PROBE_TIMEOUT}; a
        refused connection, a timeout or another status is C{False}.
    """
    try:
        response = await http.request(method, url, timeout=PROBE_TIMEOUT)
        await response.content()
    except defer.CancelledError:
        raise
    except Exception:
        return False
    code: int = response.code
    return code == status
