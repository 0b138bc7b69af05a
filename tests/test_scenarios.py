"""
The scheduler's fairness and abandon rules end to end: a real dynllm daemon
(C{twistd -n dynllm}) in front of real HTTP backends, the fake llama-server
of C{tests/fakebackend.py} told to take its time loading
(C{FAKE_LOAD_DELAY}) and answering (C{FAKE_RESPONSE_DELAY}).

Two scenarios of issue 8, with the times they take asserted with generous
margins (the machine running the tests may be loaded):

 - Starvation: three 600 MB models in 1000 MB; two clients keep model C{a}
   busy with back-to-back one-second requests; a request for C{b} must be
   served within about one C{a} request plus C{b}'s load, and C{a}'s
   clients must get their turn back after it.
 - Abandoned load: a load nobody waits for any more is stopped at once when
   another load needs its memory, and finishes (for the next request) when
   none does.

And the per-request control headers (C{X-DynLLM-Queue-Timeout},
C{X-DynLLM-Priority}, C{X-DynLLM-Keep-Alive}) as a client sends them.

L{starvation}, L{abandonedLoad} and L{abandonedLoadKept} run one scenario
each on a daemon they are given and return what they saw, so that the same
code can time several runs, on this code or an older one.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any, Callable

from attrs import define, field
from twisted.trial.unittest import SynchronousTestCase

from tests.support import FAKE_BACKEND, Daemon, checkEnvelope, pidAlive, tinyModels, waitFor

CHAT = {"messages": [{"role": "user", "content": "hi"}]}

#: Seconds each request to the busy model takes (its backend's answer).
REQUEST_SECONDS = 1.0

#: Seconds the busy model's request takes in the control header tests.
BUSY_SECONDS = 2.0

#: Seconds the busy model and the model that waits for its memory take to
#: load, in the starvation scenario (their fake backends' delay: a load
#: takes longer by the backend's start, which is why bounds count the loads
#: as the daemon measured them, L{loadSeconds}).
BUSY_LOAD_SECONDS = 0.3
WAITING_LOAD_SECONDS = 0.5

#: Seconds the abandoned model takes to load, and the model that needs its
#: memory.
ABANDONED_LOAD_SECONDS = 8.0
NEEDY_LOAD_SECONDS = 0.5

#: Seconds the abandoned model takes to load when nothing else needs its
#: memory (shorter, to keep the test quick: it is waited for).
KEPT_LOAD_SECONDS = 2.5

#: Seconds after which the client waiting for the abandoned load goes away.
ABANDON_AFTER = 1.0

#: The daemon's C{queue_timeout_seconds}: far above any wait the scenarios
#: expect, so that a request served only because its queue timeout passed
#: (as a 503) is told apart from one served in its turn.
QUEUE_TIMEOUT = 30.0

#: Slack allowed on every bound, for a loaded test machine.
SLACK = 2.0


def fakeModel(name: str, vram: int = 600, **env: float) -> dict[str, Any]:
    """
    @param env: C{FAKE_*} settings of the fake backend, lower case and
        without the prefix (C{load_delay=8}).
    @return: a model served by the fake backend.
    """
    return {
        "name": name,
        "path": tinyModels()["tiny-llama.gguf"],
        "backend": "llamacpp",
        "vram_mb": vram,
        "env": {f"FAKE_{k.upper()}": str(v) for k, v in env.items()},
    }


def config(*models: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """
    @param settings: More top-level settings.
    @return: a daemon's configuration: C{models} in 1000 MB, served by the
        fake backend, with a long queue timeout.
    """
    return {
        "total_vram_mb": 1000,
        "enabled_backends": ["llamacpp"],
        "backend": {"llamacpp_binary": FAKE_BACKEND},
        "queue_timeout_seconds": QUEUE_TIMEOUT,
        "models": list(models),
        **settings,
    }


@define
class Call:
    """
    One chat request, timed on the client.

    @ivar model: The model asked for.
    @ivar started: When it was sent (C{time.monotonic()}).
    @ivar ended: When its response had been read.
    @ivar status: The response's status.
    @ivar headers: The response's headers.
    @ivar body: The response's body.
    """

    model: str
    started: float
    ended: float
    status: int
    headers: dict[str, str] = field(factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def chat(daemon: Daemon, model: str, headers: dict[str, str] | None = None) -> Call:
    """
    Send one chat completion for C{model} and wait for its answer.

    @param headers: More request headers.
    """
    started = time.monotonic()
    status, answerHeaders, body = daemon.post(
        "/v1/chat/completions", dict(CHAT, model=model), headers=headers, timeout=QUEUE_TIMEOUT + 30
    )
    return Call(model, started, time.monotonic(), status, answerHeaders, body)


def inThread(function: Callable[[], Call]) -> Callable[[], Call]:
    """
    Run C{function} in a thread.

    @return: a callable that waits for the thread and returns C{function}'s
        result.
    """
    result: list[Call] = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()

    def join() -> Call:
        thread.join(QUEUE_TIMEOUT + 30)
        return result[0]

    return join


@define
class ClientLoop:
    """
    A client that sends requests for one model back to back, in a thread,
    until stopped.

    @ivar calls: Its requests so far, in order.
    """

    daemon: Daemon
    model: str
    calls: list[Call] = field(factory=list)
    _stopped: threading.Event = field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ClientLoop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.calls.append(chat(self.daemon, self.model))

    def stop(self) -> None:
        """
        Let the request in flight finish and send no more.
        """
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(QUEUE_TIMEOUT + 30)


def sendAndLeave(daemon: Daemon, model: str, after: float) -> None:
    """
    Send a chat request for C{model} and close the connection C{after}
    seconds later without reading the answer, as a client that gives up.
    """
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(dict(CHAT, model=model)),
            {"Content-Type": "application/json"},
        )
        time.sleep(after)
    finally:
        connection.close()


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    """
    @return: the value of the sample C{name} with C{labels} in the daemon's
        C{/metrics}.
    @raise LookupError: if there is none.
    """
    status, _, body = daemon.get("/metrics")
    assert status == 200, status
    for line in body.decode().splitlines():
        sample, _, value = line.rpartition(" ")
        metricName, _, rawLabels = sample.partition("{")
        if metricName != name:
            continue
        pairs = [pair.split("=", 1) for pair in rawLabels.rstrip("}").split(",") if pair]
        if {k: v.strip('"') for k, v in pairs} == labels:
            return float(value)
    raise LookupError(f"no {name} {labels} in /metrics")


def loadSeconds(daemon: Daemon, model: str) -> float:
    """
    @return: the seconds the daemon counted in C{model}'s loads that became
        ready (from its backend's spawn to its readiness), so that bounds
        on a request's wait count the load as it really went on a loaded
        machine.
    """
    return metric(daemon, "dynllm_model_load_seconds_total", model=model)


def startCount(daemon: Daemon, model: str) -> int:
    """
    @return: how many times the daemon has started C{model}'s backend.
    """
    return daemon.log().count(f"[{model}] started ")


@define
class Starvation:
    """
    What the starvation scenario saw.

    @ivar waiting: The request for the model that needed the busy one's
        memory.
    @ivar busy: The busy model's requests, from both clients.
    @ivar busyStarts: How many times the busy model was started.
    @ivar waitingLoad: Seconds the waiting model's load took.
    @ivar busyReload: Seconds the busy model's second load took, if any.
    """

    waiting: Call
    busy: list[Call]
    busyStarts: int
    waitingLoad: float
    busyReload: float


def starvation(daemon: Daemon, servedAfter: int = 2, phase: str = "after") -> Starvation:
    """
    Run the starvation scenario on C{daemon}, configured with
    L{starvationModels}: two clients send requests for C{a} back to back; two
    seconds in, a request for C{b} is sent; the clients go on until
    C{servedAfter} of their requests have been answered after C{b}'s.

    @param phase: When C{b}'s request goes, two seconds in: C{"after"} both
        clients have just sent their next request (so C{b} waits for about
        a whole C{a} request to drain, the case to bound), or C{"at"} two
        seconds whatever the clients are doing.
    """
    status = daemon.post("/admin/models/load", {"model": "a"})[0]
    assert status == 200, status
    firstLoad = loadSeconds(daemon, "a")
    loops = [ClientLoop(daemon, "a").start() for _ in range(2)]

    def answered() -> int:
        return sum(len(loop.calls) for loop in loops)

    try:
        time.sleep(2.0)
        if phase == "after":
            seen = answered()
            waitFor(lambda: answered() >= seen + 2, timeout=REQUEST_SECONDS + SLACK)
        waiting = chat(daemon, "b")
        waitFor(
            lambda: sum(c.ended > waiting.ended for loop in loops for c in loop.calls) >= servedAfter,
            timeout=QUEUE_TIMEOUT + 10,
        )
    finally:
        for loop in loops:
            loop.stop()
    busy = sorted((c for loop in loops for c in loop.calls), key=lambda c: c.started)
    return Starvation(
        waiting, busy, startCount(daemon, "a"), loadSeconds(daemon, "b"), loadSeconds(daemon, "a") - firstLoad
    )


def starvationModels() -> list[dict[str, Any]]:
    """
    @return: the starvation scenario's three 600 MB models: C{a} answers in
        L{REQUEST_SECONDS}, C{b} loads in L{WAITING_LOAD_SECONDS}.
    """
    return [
        fakeModel("a", load_delay=BUSY_LOAD_SECONDS, response_delay=REQUEST_SECONDS),
        fakeModel("b", load_delay=WAITING_LOAD_SECONDS),
        fakeModel("c"),
    ]


@define
class Abandoned:
    """
    What an abandoned-load scenario saw.

    @ivar pid: The abandoned model's backend process, while it loaded.
    @ivar call: The request that followed the abandon.
    @ivar loadSeconds: Seconds the loads of the model it asked for took.
    """

    pid: int
    call: Call
    loadSeconds: float


def _abandon(daemon: Daemon, model: str) -> int:
    """
    Send a request for C{model} and go away after L{ABANDON_AFTER} seconds,
    while it loads.

    @return: the pid of its backend.
    """
    sendAndLeave(daemon, model, ABANDON_AFTER)
    entry = daemon.models()[model]
    assert entry["status"] == "loading", entry
    return int(entry["pid"])


def abandonedLoad(daemon: Daemon) -> Abandoned:
    """
    Run the abandoned-load scenario on C{daemon}, configured with
    L{abandonedModels}: a request for C{x} (an 8 s load) goes away after a
    second, then C{y}, which needs C{x}'s memory, is asked for.
    """
    pid = _abandon(daemon, "x")
    call = chat(daemon, "y")
    return Abandoned(pid, call, loadSeconds(daemon, "y"))


def abandonedModels() -> list[dict[str, Any]]:
    """
    @return: the abandoned-load scenario's two 600 MB models: C{x} loads in
        L{ABANDONED_LOAD_SECONDS}, C{y} in L{NEEDY_LOAD_SECONDS}.
    """
    return [
        fakeModel("x", load_delay=ABANDONED_LOAD_SECONDS),
        fakeModel("y", load_delay=NEEDY_LOAD_SECONDS),
    ]


def abandonedLoadKept(daemon: Daemon) -> Abandoned:
    """
    Run the contrary scenario on C{daemon}, configured with L{keptModels}: a
    request for C{x} goes away while it loads, nothing else is asked for;
    once C{x} is loaded, it is asked for again.
    """
    pid = _abandon(daemon, "x")
    assert waitFor(lambda: daemon.models()["x"]["waiting_requests"] == 0, timeout=5)
    assert waitFor(lambda: daemon.models()["x"]["status"] != "loading", timeout=KEPT_LOAD_SECONDS + 10)
    call = chat(daemon, "x")
    return Abandoned(pid, call, loadSeconds(daemon, "x"))


def keptModels() -> list[dict[str, Any]]:
    """
    @return: the contrary scenario's models: C{x} loads in
        L{KEPT_LOAD_SECONDS}; C{y} is never asked for.
    """
    return [fakeModel("x", load_delay=KEPT_LOAD_SECONDS), fakeModel("y")]


class ScenarioTestCase(SynchronousTestCase):
    """
    Starts a daemon per test, and stops it and checks that it left no
    backend running.
    """

    def startDaemon(self, models: list[dict[str, Any]], **settings: Any) -> Daemon:
        daemon = Daemon(config(*models, **settings)).start()
        self.addCleanup(self._stop, daemon)
        return daemon

    def _stop(self, daemon: Daemon) -> None:
        pids: list[int] = []
        try:
            pids = [m["pid"] for m in daemon.models().values() if m["pid"]]
        finally:
            daemon.stop()
        self.assertTrue(waitFor(lambda: not any(pidAlive(p) for p in pids), timeout=10))


class StarvationTests(ScenarioTestCase):
    """
    A load that waits for memory held by a busy model gets its turn, and
    the busy model gets its turn back.

    The scenario takes about ten seconds, so its tests share one run: the
    first test to need it runs it (and stops its daemon), the others read
    what it saw.
    """

    #: What the shared run saw, once it has run.
    shared: Starvation | None = None

    def seen(self) -> Starvation:
        """
        @return: what the shared run of the scenario saw.
        """
        if StarvationTests.shared is None:
            daemon = Daemon(config(*starvationModels())).start()
            try:
                seen = starvation(daemon)
            finally:
                self._stop(daemon)
            StarvationTests.shared = seen
        return StarvationTests.shared

    def test_waitingLoadServed(self) -> None:
        """
        While two clients keep C{a} busy with back-to-back one-second
        requests, a request for C{b}, which needs C{a}'s memory, is served
        within about one C{a} request plus C{b}'s load: new requests for
        C{a} queue behind it, C{a} drains and is evicted. It is not refused
        (the queue timeout is far longer).
        """
        seen = self.seen()
        self.assertEqual(seen.waiting.status, 200)
        self.assertLess(seen.waiting.seconds, REQUEST_SECONDS + seen.waitingLoad + SLACK)

    def test_busyModelServedAgain(self) -> None:
        """
        After C{b}'s request, C{a} is loaded again and every request of
        C{a}'s clients is served, those that queued behind C{b}'s load
        within one C{a} request, C{b}'s load, C{a}'s load and their own
        request: the fairness that let C{b} in does not starve C{a}.
        """
        seen = self.seen()
        self.assertEqual(seen.waiting.status, 200)
        self.assertEqual([c.status for c in seen.busy], [200] * len(seen.busy))
        after = [c for c in seen.busy if c.ended > seen.waiting.ended]
        self.assertGreaterEqual(len(after), 2)
        self.assertEqual(seen.busyStarts, 2)
        longest = max(c.seconds for c in seen.busy)
        self.assertLess(longest, 2 * REQUEST_SECONDS + seen.waitingLoad + seen.busyReload + SLACK)


class AbandonedLoadTests(ScenarioTestCase):
    """
    A load whose every waiter has gone.
    """

    def test_stoppedForAnotherLoad(self) -> None:
        """
        When the only request for C{x} (an 8 s load) goes away after a
        second, a request for C{y}, which needs C{x}'s memory, stops C{x}'s
        load at once: it is answered in well under a second plus C{y}'s own
        load, and C{x}'s backend is gone.
        """
        daemon = self.startDaemon(abandonedModels())
        seen = abandonedLoad(daemon)
        self.assertEqual(seen.call.status, 200)
        self.assertLess(seen.call.seconds, seen.loadSeconds + 1.0)
        self.assertFalse(pidAlive(seen.pid))
        self.assertEqual(daemon.models()["x"]["status"], "unloaded")
        self.assertEqual(metric(daemon, "dynllm_model_unloads_total", model="x", cause="abandoned"), 1)

    def test_finishesWhenNotNeeded(self) -> None:
        """
        When the only request for C{x} goes away while it loads and no other
        load needs its memory, the load goes on and finishes: the next
        request for C{x} is served by the same backend, at once, without a
        new load.
        """
        daemon = self.startDaemon(keptModels())
        seen = abandonedLoadKept(daemon)
        self.assertEqual(seen.call.status, 200)
        self.assertLess(seen.call.seconds, 1.0)
        entry = daemon.models()["x"]
        self.assertEqual((entry["status"], entry["pid"]), ("loaded", seen.pid))
        self.assertEqual(startCount(daemon, "x"), 1)


class ControlHeaderTests(ScenarioTestCase):
    """
    The per-request controls (C{X-DynLLM-Queue-Timeout},
    C{X-DynLLM-Priority}, C{X-DynLLM-Keep-Alive}), sent by a client as
    plain headers, change what the daemon does for that request.
    """

    def busy(self, daemon: Daemon, model: str = "a") -> Callable[[], Call]:
        """
        Start a request for C{model} (which answers in L{BUSY_SECONDS}) and
        wait until it is in flight.

        @return: what waits for its answer.
        """
        join = inThread(lambda: chat(daemon, model))
        assert waitFor(lambda: daemon.models()[model]["active_requests"] == 1, timeout=10)
        return join

    def test_queueTimeout(self) -> None:
        """
        C{X-DynLLM-Queue-Timeout} replaces C{queue_timeout_seconds} for its
        request: with 0, a request for a model whose memory is held by a
        busy one gets a 503 C{model_capacity} with C{Retry-After} at once;
        with half a second, after about half a second.
        """
        daemon = self.startDaemon([fakeModel("a", response_delay=BUSY_SECONDS), fakeModel("b")])
        join = self.busy(daemon)
        now = chat(daemon, "b", {"X-DynLLM-Queue-Timeout": "0"})
        soon = chat(daemon, "b", {"X-DynLLM-Queue-Timeout": "0.5"})
        self.assertEqual(join().status, 200)
        for call in now, soon:
            checkEnvelope(self, call.status, call.body, 503, "model_capacity")
            self.assertGreaterEqual(int(call.headers["Retry-After"]), 1)
        self.assertLess(now.seconds, 0.5)
        self.assertGreater(soon.seconds, 0.45)
        self.assertLess(soon.seconds, 0.5 + SLACK)

    def test_priority(self) -> None:
        """
        Of two requests waiting for the memory of a busy model, the one with
        the higher C{X-DynLLM-Priority} is served first, though it came
        second.
        """
        daemon = self.startDaemon(
            [fakeModel("a", response_delay=BUSY_SECONDS), fakeModel("b", load_delay=0.3), fakeModel("c", load_delay=0.3)]
        )
        join = self.busy(daemon)
        low = inThread(lambda: chat(daemon, "b"))
        self.assertTrue(waitFor(lambda: daemon.models()["b"]["waiting_requests"] == 1))
        high = chat(daemon, "c", {"X-DynLLM-Priority": "5"})
        first = join()
        second = low()
        self.assertEqual((first.status, high.status, second.status), (200, 200, 200))
        self.assertLess(high.ended, second.ended)
        self.assertEqual(daemon.log().count("] started "), 3)

    def test_keepAliveZero(self) -> None:
        """
        C{X-DynLLM-Keep-Alive: 0} unloads the model as soon as its request
        is done, though C{idle_timeout_seconds} is long.
        """
        daemon = self.startDaemon([fakeModel("m")], idle_timeout_seconds=300)
        self.assertEqual(chat(daemon, "m", {"X-DynLLM-Keep-Alive": "0"}).status, 200)
        self.assertTrue(waitFor(lambda: daemon.models()["m"]["status"] == "unloaded", timeout=2))

    def test_keepAliveNever(self) -> None:
        """
        C{X-DynLLM-Keep-Alive: -1} keeps the model loaded past its
        C{unload_time}, which unloads the same model asked for without the
        header.
        """
        models = [dict(fakeModel(name, vram=400), unload_time=0.5) for name in ("kept", "reaped")]
        daemon = self.startDaemon(models, idle_check_interval_seconds=0.1)
        self.assertEqual(chat(daemon, "kept", {"X-DynLLM-Keep-Alive": "-1"}).status, 200)
        self.assertEqual(chat(daemon, "reaped").status, 200)
        pid = daemon.models()["kept"]["pid"]
        self.assertTrue(waitFor(lambda: daemon.models()["reaped"]["status"] == "unloaded", timeout=3))
        time.sleep(1.0)
        entry = daemon.models()["kept"]
        self.assertEqual((entry["status"], entry["pid"]), ("loaded", pid))

    def test_badValue(self) -> None:
        """
        A control header with a bad value is a 400 C{invalid_header} in the
        OpenAI envelope, naming the header; no model is loaded for it.
        """
        daemon = self.startDaemon([fakeModel("m")])
        call = chat(daemon, "m", {"X-DynLLM-Priority": "high"})
        error = checkEnvelope(self, call.status, call.body, 400, "invalid_header")
        self.assertEqual(error["param"], "X-DynLLM-Priority")
        self.assertEqual(daemon.models()["m"]["status"], "unloaded")

    def test_notForwarded(self) -> None:
        """
        The control headers are dynllm's own: the backend never sees them.
        """
        daemon = self.startDaemon([fakeModel("m")])
        controls = {"X-DynLLM-Priority": "1", "X-DynLLM-Queue-Timeout": "5", "X-DynLLM-Keep-Alive": "60"}
        call = chat(daemon, "m", dict(controls, **{"X-Custom": "kept"}))
        self.assertEqual(call.status, 200)
        seen = json.loads(call.body)["echo_headers"]
        self.assertEqual(seen.get("x-custom"), "kept")
        self.assertEqual([h for h in seen if h.startswith("x-dynllm-")], [])
