# -*- test-case-name: tests.test_proxy -*-
"""
Relaying one request to a backend and its response back, unbuffered.

The status line and headers reach the client when the backend's arrive (or
earlier, for a stream that waited for its model: see L{dynllm.feedback}), and
bytes reach the client as the backend sends them (SSE frames included), the
backend is paused while the client is slow (the upstream transport is
registered as the request's producer), and the upstream request is aborted
when the client goes away (cancelling L{forward} aborts it).

The relay talks to the backend through the C{IAgent} that treq wraps, not
through treq itself: on this hot path treq's URL handling (hyperlink parsing
and IDNA encoding of C{127.0.0.1} on every request), its gzip decoding and
its cooperative body producer (one more reactor turn per request) cost more
than the rest of the relay; see C{benchmarks/latency.py}. The body passes
through byte for byte.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Iterator, Mapping, cast

from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import CooperativeTask, Cooperator, NotPaused, TaskFinished, TaskStopped
from twisted.python.failure import Failure
from twisted.web.client import PartialDownloadError, ResponseDone, ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest
from twisted.web.server import Request
from zope.interface import implementer

from dynllm import controls, errors
from dynllm.logs import logger
from dynllm.pool import IRewindableBodyProducer
from dynllm.rewrite import NameRewriter

log = logger(__name__)

#: Headers that describe one connection, not the message (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Client credentials, never passed to a backend: the key a client gives
#: dynllm is dynllm's business (OpenAI and llama-server read
#: C{Authorization}, Anthropic clients and llama-server C{X-Api-Key}, Azure
#: OpenAI clients C{api-key}; browsers send cookies), and a backend gets
#: dynllm's own key for it instead (see L{forward}).
CREDENTIALS = frozenset(
    {b"authorization", b"proxy-authorization", b"x-api-key", b"api-key", b"cookie"}
)

#: Request headers not passed to a backend: the body is re-framed, the
#: client's credentials and dynllm's own controls (L{controls.HEADERS}) are
#: not the backend's business, and compression would delay SSE.
DROP_REQUEST = (
    HOP_BY_HOP | CREDENTIALS | controls.HEADERS | {b"host", b"content-length", b"expect", b"accept-encoding"}
)

#: Response headers not passed back: twisted.web sets its own C{Date} and
#: C{Server}. (C{Content-Length} is kept: the body is relayed unchanged.)
DROP_RESPONSE = HOP_BY_HOP | {b"date", b"server"}


#: Response content types in which a model's name is renamed.
TEXT_TYPES = (b"application/json", b"text/")

#: Bytes of relayed body gathered before they are written (see L{_Relay}).
MAX_BATCH = 16384


class BackendStatus(Exception):
    """
    A backend answered a request whose client's status line and headers
    were sent already (see L{forward}'s C{started}) with a status that is
    not 2xx: the caller tells the client in the body.

    @ivar status: The backend's status code.
    @ivar body: The backend's body, the model renamed in it as the client
        named it.
    """

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


def _connectionTokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def endToEnd(headers: Headers, drop: frozenset[bytes]) -> Headers:
    """
    @return: a copy of C{headers} without those in C{drop}, those named by
        C{Connection}, and empty ones (treq leaves an empty
        C{Content-Encoding} behind).
    """
    skip = drop | _connectionTokens(headers)
    kept = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.lower() in skip:
            continue
        values = [v for v in values if v.strip()]
        if values:
            kept.setRawHeaders(name, values)
    return kept


class RelayGuard:
    """
    Ends one relay early: when its backend has sent nothing for
    C{idleTimeout} seconds (a backend that stalls before its headers or
    mid-body, or is frozen), or when told to (L{end}: a lease revoked by a
    forced unload). Time while the client holds the backend back (the relay
    paused for backpressure) does not count.

    L{forward} points it at what it awaits (L{watch}) and reports bytes
    (L{touch}); when it ends, what is awaited is cancelled and L{reason}
    says why.

    @ivar reason: Why the relay was ended, or C{None}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idleTimeout: float = math.inf,
        stalled: Callable[[], Exception] | None = None,
    ) -> None:
        """
        @param clock: Times the backend's silence.
        @param idleTimeout: Seconds of silence allowed; C{math.inf}: any.
        @param stalled: Makes the reason for a stall (and may count it);
            by default a 504 L{errors.APIError}.
        """
        self.reason: Exception | None = None
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._stalled = stalled
        self._target: defer.Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._last = 0.0
        self._paused = False
        self._done = False

    def watch(self, target: defer.Deferred[Any]) -> None:
        """
        Cancel C{target} when the relay ends early (at once if it has).
        """
        self._target = target
        if self.reason is not None:
            target.cancel()

    def touch(self) -> None:
        """
        The backend sent something: its silence starts again. (Called for
        every piece of a body: it only notes the time; the one timer is
        moved on when it fires.)
        """
        self._last = self._clock.seconds()
        if self._timer is None and not (self._paused or self._done or math.isinf(self._idleTimeout)):
            self._timer = self._clock.callLater(self._idleTimeout, self._check)

    def pause(self) -> None:
        """
        The client is slow and the backend is held back: not its silence.
        """
        self._paused = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def resume(self) -> None:
        self._paused = False
        self.touch()

    def finish(self) -> None:
        """
        The relay is over: stop timing.
        """
        self._done = True
        self.pause()

    def end(self, reason: Exception) -> None:
        """
        End the relay now because of C{reason} (ignored once ended or
        finished).
        """
        if self.reason is not None or self._done:
            return
        self.reason = reason
        self.finish()
        if self._target is not None:
            self._target.cancel()

    def _check(self) -> None:
        self._timer = None
        silent = self._clock.seconds() - self._last
        if silent < self._idleTimeout:
            # Something came since the timer was set: wait for the rest.
            self._timer = self._clock.callLater(self._idleTimeout - silent, self._check)
            return
        self._timedOut()

    def _timedOut(self) -> None:
        if self._stalled is not None:
            reason = self._stalled()
        else:
            reason = errors.APIError(
                504, f"the backend sent nothing for {self._idleTimeout:g}s", "server_error", "upstream_timeout"
            )
        self.end(reason)


@implementer(IPushProducer)
class _GuardedProducer:
    """
    The backend's body transport as the client's request sees it: pausing
    it (backpressure) also pauses the guard's clock.
    """

    def __init__(self, transport: Any, guard: RelayGuard) -> None:
        self._transport = transport
        self._guard = guard

    def pauseProducing(self) -> None:
        self._guard.pause()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._guard.resume()
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()


class _Relay(Protocol):
    """
    Writes a response body to a request as it arrives, with backpressure.

    The body arrives one HTTP chunk at a time (one SSE frame, for a token
    stream). The chunks that one read of the socket delivered are gathered
    and written to the client together at the end of that reactor turn:
    one write instead of one per frame, with no added wait. A batch is
    written early once it holds L{MAX_BATCH} bytes, so that a burst's first
    frames are not held back while the rest of it is decoded.
    """

    def __init__(
        self,
        request: Request,
        done: defer.Deferred[None],
        clock: IReactorTime,
        rewriter: NameRewriter | None = None,
        guard: RelayGuard | None = None,
    ) -> None:
        self._request = request
        self._done = done
        self._clock = clock
        self._rewriter = rewriter
        self._guard = guard
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._flushCall: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # The body transport is an IPushProducer: pause it while the client
        # does not keep up.
        producer: Any = self.transport
        if self._guard is not None:
            producer = _GuardedProducer(producer, self._guard)
        self._request.registerProducer(producer, True)

    def dataReceived(self, data: bytes) -> None:
        if self._guard is not None:
            self._guard.touch()
        if self._rewriter is not None:
            data = self._rewriter.feed(data)
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize >= MAX_BATCH:
            # A burst: write what we have rather than decode it all first.
            if self._flushCall is not None:
                self._flushCall.cancel()
            self._flush()
        elif self._flushCall is None:
            self._flushCall = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        pending, self._pending = self._pending, []
        self._pendingSize = 0
        if pending and self._request.channel is not None:
            self._request.write(b"".join(pending))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._rewriter is not None:
            self._pending.append(self._rewriter.flush())
        if self._flushCall is not None:
            self._flushCall.cancel()
        self._flush()
        if self._request.channel is not None:
            self._request.unregisterProducer()
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(None)
        else:
            self._done.errback(reason)


def relayBody(
    response: Any,
    request: Request,
    clock: IReactorTime,
    rewriter: NameRewriter | None = None,
    guard: RelayGuard | None = None,
) -> defer.Deferred[None]:
    """
    Write the body of C{response} (a C{twisted.web.iweb.IResponse}) to
    C{request} as it arrives.

    @param clock: Schedules the writes (see L{_Relay}).
    @param rewriter: Renames the model in the body, if it must be.
    @param guard: Told of each piece of the body, and of backpressure.
    @return: a Deferred that fires when the body has been relayed; cancelling
        it aborts the upstream connection.
    """
    relays: list[_Relay] = []
    done: defer.Deferred[None] = defer.Deferred(
        lambda d: cast(IPushProducer, relays[0].transport).stopProducing()
    )
    relays.append(_Relay(request, done, clock, rewriter, guard))
    response.deliverBody(relays[0])
    return done


@implementer(IRewindableBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one go (Twisted's
    C{FileBodyProducer} would take a reactor turn per chunk). It can be
    sent again (see L{dynllm.pool}).
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IRewindableBodyProducer)
class FileProducer:
    """
    A request body in a seekable file, streamed from its start one block per
    turn of a clock. Unlike Twisted's C{FileBodyProducer} it never closes
    the file, which belongs to the request (twisted.web spooled the body to
    it), and it can start again from the beginning, for a request that
    L{dynllm.pool} sends a second time.

    @ivar length: The size of the body in bytes (from C{seek}/C{tell}).
    """

    #: Bytes read and written per block.
    blockSize = 65536

    def __init__(self, file: Any, clock: IReactorTime) -> None:
        self._file = file
        file.seek(0, io.SEEK_END)
        self.length = file.tell()
        file.seek(0)
        # One block per turn: other connections get their turns between.
        self._cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: True,
            scheduler=lambda work: clock.callLater(0, work),
        )
        self._task: CooperativeTask[Any] | None = None

    def _blocks(self, consumer: Any) -> Iterator[None]:
        sent = 0
        while sent < self.length:
            # Seek each time: nothing else then depends on the position.
            self._file.seek(sent)
            block = self._file.read(min(self.blockSize, self.length - sent))
            if not block:
                break
            sent += len(block)
            consumer.write(block)
            yield None

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        """
        Write the body to C{consumer} from its first byte, stopping an
        earlier run that is still going.

        @return: a Deferred that fires when the whole body is written; it
            never fires if L{stopProducing} stops this run.
        """
        self.stopProducing()
        self._task = self._cooperator.cooperate(self._blocks(consumer))
        done: defer.Deferred[None] = defer.Deferred()

        def ended(result: Any) -> None:
            if isinstance(result, Failure):
                if not result.check(TaskStopped):
                    done.errback(result)
            else:
                done.callback(None)

        self._task.whenDone().addBoth(ended)
        return done

    def pauseProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.pause()
            except TaskFinished:
                pass  # the body is all written

    def resumeProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.resume()
            except (NotPaused, TaskFinished):
                pass  # the body is all written, or the pause was for an earlier run

    def stopProducing(self) -> None:
        """
        Stop the current run, if any; the file stays open.
        """
        task, self._task = self._task, None
        if task is not None:
            try:
                task.stop()
            except TaskFinished:
                pass  # it had ended already


def fileProducer(file: Any, clock: IReactorTime) -> FileProducer:
    """
    @return: a body producer that streams C{file} from its start, one block
        per turn of C{clock} (so that tests can drive it with a fake clock),
        and can start again.
    """
    return FileProducer(file, clock)


def requestBody(request: IRequest, clock: IReactorTime) -> Any:
    """
    @return: the body of C{request} to send upstream: its bytes when
        twisted.web kept them in memory, else a producer that streams the
        temporary file it spooled them to.
    """
    content = request.content
    content.seek(0)
    getvalue = getattr(content, "getvalue", None)
    if getvalue is not None:
        return getvalue()
    return fileProducer(content, clock)


async def forward(
    agent: IAgent,
    request: Request,
    url: bytes,
    body: Any,
    headers: Headers | None = None,
    clock: IReactorTime | None = None,
    rewriter: NameRewriter | None = None,
    *,
    upstreamHeaders: Mapping[str, str] | None = None,
    started: bool = False,
    onResponse: Callable[[], object] | None = None,
    guard: RelayGuard | None = None,
) -> None:
    """
    Send C{request} to C{url} and relay the response to the client.

    @param agent: Reaches the backend (C{twisted.web.client.Agent}).
    @param body: The body to send: bytes, or an C{IBodyProducer}.
    @param headers: The headers to send, by default the client's own
        less those in L{DROP_REQUEST}.
    @param clock: Schedules writes to the client; the global reactor by
        default.
    @param rewriter: Renames the model in the response body, for a backend
        that knows it by another name (the length then changes, so
        C{Content-Length} is dropped).
    @param upstreamHeaders: Headers the backend requires, set in place of
        any the headers hold: a lease's C{upstreamHeaders}, which carry the
        backend's own key (L{dynllm.lease.Lease.upstreamHeaders}).
    @param started: Whether the client's status line and headers were sent
        already (a stream that waited for its model, see
        L{dynllm.feedback}): then a 2xx answer's body is relayed into the
        response as it is, without its status and headers, and any other
        answer raises L{BackendStatus} instead of being relayed.
    @param onResponse: Called when the backend's status and headers have
        arrived, before anything of the answer is written.
    @param guard: Ends the relay early (a stalled backend, a revoked
        lease): before the client's status line is sent, its C{reason} is
        raised; after, the client's connection is closed where the body
        stood (a cut stream) and C{CancelledError} is raised.
    @raise errors.APIError: 502 when the backend could not be reached or
        sent no response.
    @raise BackendStatus: with C{started}, for an answer that is not 2xx,
        once its whole body has arrived.
    """
    if headers is None:
        headers = endToEnd(request.requestHeaders, DROP_REQUEST)
    if upstreamHeaders:
        headers = headers.copy()
        for required, value in upstreamHeaders.items():
            headers.setRawHeaders(required, [value])
    if clock is None:
        from twisted.internet import reactor

        clock = cast(IReactorTime, reactor)
    if isinstance(body, bytes):
        body = BytesProducer(body) if body else None
    if guard is None:
        guard = RelayGuard(clock)
    try:
        try:
            requesting = agent.request(request.method, url, headers, body)
            guard.watch(requesting)
            guard.touch()
            response = await requesting
        except ResponseNeverReceived as e:
            if any(f.check(defer.CancelledError) for f in e.reasons):
                raise defer.CancelledError() from None
            raise errors.backendFailed(f"the backend sent no response: {e.reasons[0].getErrorMessage()}")
        except (defer.CancelledError, errors.APIError):
            raise
        except ConnectingCancelledError:
            # The client left while we connected: not the backend's fault.
            raise defer.CancelledError() from None
        except Exception as e:
            raise errors.backendFailed(f"could not reach the backend: {errors.describeError(e)}") from None
    except defer.CancelledError:
        guard.finish()
        if guard.reason is not None:
            raise guard.reason from None
        raise
    except BaseException:
        guard.finish()
        raise
    # The head counts as something sent; the timer set for it goes on
    # timing the body.
    guard.touch()
    if onResponse is not None:
        onResponse()

    out = endToEnd(response.headers, DROP_RESPONSE)
    contentType = out.getRawHeaders(b"content-type", [b""])[0]
    if rewriter is not None:
        if contentType.startswith(TEXT_TYPES):
            out.removeHeader(b"content-length")
        else:
            rewriter = None  # audio, images: nothing to rename
    if started:
        if not 200 <= response.code < 300:
            reading = defer.ensureDeferred(_errorBody(response, rewriter))
            guard.watch(reading)
            try:
                errorBody = await reading
            except defer.CancelledError:
                if guard.reason is not None:
                    raise guard.reason from None
                raise
            finally:
                guard.finish()
            raise BackendStatus(response.code, errorBody)
    else:
        _sendHead(request, response, out, contentType)
    relaying = relayBody(response, request, clock, rewriter, guard)
    guard.watch(relaying)
    try:
        await relaying
    except defer.CancelledError:
        if guard.reason is None:
            raise
        # Ended early (a stall, a revoked lease): cut the response as for a
        # backend that went away.
        log.warn("ended the relay of {url}: {reason}", url=url.decode("ascii", "replace"), reason=str(guard.reason))
        await _cut(request)
        raise defer.CancelledError() from None
    except Exception:
        # The backend went away mid-body. The status line is gone already,
        # so the only honest signal left is an incomplete response: close
        # the connection after what was relayed, without the final chunk.
        log.warn("the backend closed {url} before the end of its response", url=url)
        await _cut(request)
        raise defer.CancelledError() from None
    finally:
        guard.finish()


async def _cut(request: Request) -> None:
    """
    Close the client's connection after what was relayed, without the final
    chunk, and wait for the close, so that nothing (such as an error page
    and the last chunk) is written after it.
    """
    transport = getattr(request.channel, "transport", None)
    if transport is not None:
        transport.loseConnection()
        try:
            await request.notifyFinish()
        except Exception:
            pass


def _sendHead(request: Request, response: Any, out: Headers, contentType: bytes) -> None:
    """
    Send the backend's status and the headers C{out} to the client now, as
    the backend did, not with the first body byte: a client then sees a
    slow stream start (e.g. llama-server's SSE pings, every
    C{--sse-ping-interval} seconds) as soon as it would directly, and its
    header timeout does not fire. For HEAD, 204 and 304, twisted.web writes
    no body after them.
    """
    request.setResponseCode(response.code, response.phrase)
    for name, values in out.getAllRawHeaders():
        request.responseHeaders.setRawHeaders(name, values)
    if contentType.startswith(b"text/event-stream"):
        # Ask reverse proxies in front of us not to buffer the stream.
        request.responseHeaders.setRawHeaders(b"x-accel-buffering", [b"no"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])
    request.write(b"")


async def _errorBody(response: Any, rewriter: NameRewriter | None) -> bytes:
    """
    @return: the whole body of C{response}, an error answer (small), with
        the model renamed by C{rewriter}; what arrived of it if the backend
        closed early (nothing if the connection failed). Cancelling the
        wait aborts the backend's connection (C{readBody}).
    """
    try:
        body: bytes = await readBody(response)
    except PartialDownloadError as e:
        body = e.response or b""
    except ResponseFailed:
        body = b""
    if rewriter is not None:
        body = rewriter.feed(body) + rewriter.flush()
    return body
