"""
Tests for L{dynllm.controls}: the per-request control headers.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from dynllm.controls import MAX_SECONDS, requestOptions
from dynllm.errors import APIError
from dynllm.lease import RequestOptions


def options(**headers: str | list[str]) -> RequestOptions:
    raw = Headers()
    for name, value in headers.items():
        raw.setRawHeaders(name.replace("_", "-"), value if isinstance(value, list) else [value])
    return requestOptions(raw)


class RequestOptionsTests(SynchronousTestCase):
    """
    Tests for L{requestOptions}.
    """

    def test_none(self) -> None:
        """
        Without control headers, every option is left to the configuration.
        """
        self.assertEqual(options(), RequestOptions())

    def test_values(self) -> None:
        """
        Each header sets its option: seconds as decimals, the priority as
        an integer (negative too), surrounding blanks ignored.
        """
        self.assertEqual(
            options(x_dynllm_queue_timeout=" 2.5 ", x_dynllm_priority="-7", x_dynllm_keep_alive="600"),
            RequestOptions(queueTimeout=2.5, priority=-7, keepAlive=600.0),
        )

    def test_keepAliveNever(self) -> None:
        """
        A keep-alive of -1 (never unloaded for idleness) and of 0 (unloaded
        as soon as idle) are accepted.
        """
        self.assertEqual(options(x_dynllm_keep_alive="-1").keepAlive, -1.0)
        self.assertEqual(options(x_dynllm_keep_alive="0").keepAlive, 0.0)

    def test_refused(self) -> None:
        """
        A bad value is a 400 C{invalid_header} naming the header: words,
        C{inf} and C{nan}, negative times (but the keep-alive's -1), times
        above L{MAX_SECONDS}, a fractional priority, a header given twice.
        """
        cases = [
            ("X-DynLLM-Queue-Timeout", "later"),
            ("X-DynLLM-Queue-Timeout", "nan"),
            ("X-DynLLM-Queue-Timeout", "-1"),
            ("X-DynLLM-Queue-Timeout", str(MAX_SECONDS * 2)),
            ("X-DynLLM-Keep-Alive", "inf"),
            ("X-DynLLM-Keep-Alive", "-5"),
            ("X-DynLLM-Priority", "2.0"),
            ("X-DynLLM-Priority", "high"),
            ("X-DynLLM-Priority", ["1", "2"]),
        ]
        for name, value in cases:
            raw = Headers()
            raw.setRawHeaders(name, value if isinstance(value, list) else [value])
            error = self.assertRaises(APIError, requestOptions, raw)
            self.assertEqual((error.status, error.code, error.param), (400, "invalid_header", name), value)
            self.assertIn(name, error.message)
