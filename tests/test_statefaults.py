"""
Tests for L{dynllm.store.SQLiteStateStore} on a faulty disk, with real
faults (L{tests.faultfs}): a full tmpfs, a read-only tmpfs, immutable files,
files deleted while the store runs; the real reactor and its thread pool;
then the same faults under a real daemon (C{twistd -n dynllm}).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from typing import Any

import yaml
from twisted.internet import defer, reactor, task, utils
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dynllm.config import parseConfig
from dynllm.service import makeService
from dynllm.store import SQLiteStateStore, StateInUse, StateUnavailable
from tests.faultfs import SmallDisk, immutable, mutable
from tests.support import FAKE_BACKEND, ROOT, TWISTD, Daemon, fakeModel, freePort, waitFor
from tests.test_process import groupMembers
from tests.test_store import makeRow


def fileRows(path: str) -> list[dict[str, Any]]:
    """
    @return: the rows in the database file at C{path}, read by a connection
        of their own, as C{(name, status, last_error)} mappings.
    """
    conn = sqlite3.connect(path)
    try:
        return [
            {"name": n, "status": s, "last_error": e}
            for n, s, e in conn.execute("SELECT name, status, last_error FROM models ORDER BY name")
        ]
    finally:
        conn.close()


async def within(d: defer.Deferred[Any], seconds: float) -> Any:
    """
    @return: what C{d} fires with, failing if that takes over C{seconds}.
    """
    d.addTimeout(seconds, reactor)
    return await d


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class StoreFaultsMixin:
    """
    Opens stores that retry and check quickly, and records what the store
    logs.
    """

    def openStore(self, path: str, **kw: Any) -> SQLiteStateStore:
        """
        @return: an open store on C{path} retrying from 50 ms, checking
            every 100 ms, closed when the test ends.
        """
        kw.setdefault("firstRetryDelay", 0.05)
        kw.setdefault("maxRetryDelay", 0.2)
        kw.setdefault("checkInterval", 0.1)
        store = SQLiteStateStore(path, reactor, **kw)
        store.open()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store

    def captureLog(self) -> list[dict[str, Any]]:
        """
        @return: a list that receives every event of C{dynllm.store} from
            now until the test ends.
        """
        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "dynllm.store":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[attr-defined]
        return events


class WriteFaultTests(StoreFaultsMixin, TestCase):
    """
    A write that fails is retried until it lands; the newest row of each
    model is what lands; the episode is logged once, and its end once.
    """

    timeout = 30

    async def test_fullDisk(self) -> None:
        """
        On a full disk, rows saved (several for one model) do not land;
        once space is back, the newest row of each model is in the file,
        the failure was logged once however many retries there were, and
        the recovery once.
        """
        disk = SmallDisk(self)
        path = os.path.join(disk.path, "state.db")
        store = self.openStore(path)
        await within(store.save(makeRow("a", status="loading")), 5)
        events = self.captureLog()
        disk.fill()
        # Rows big enough that the file must grow.
        big = "x" * 200_000
        saves = [
            store.save(makeRow("a", status="loaded", last_error=big)),
            store.save(makeRow("b", status="loading", last_error=big)),
            store.save(makeRow("a", status="unloaded", last_error="newest")),
        ]
        await sleep(1.0)
        self.assertFalse(any(d.called for d in saves))
        self.assertEqual(fileRows(path), [{"name": "a", "status": "loading", "last_error": None}])
        disk.free()
        for d in saves:
            await within(d, 5)
        self.assertEqual(
            fileRows(path),
            [
                {"name": "a", "status": "unloaded", "last_error": "newest"},
                {"name": "b", "status": "loading", "last_error": big},
            ],
        )
        errors = [e for e in events if e["log_level"].name == "error"]
        recoveries = [e for e in events if "takes writes again" in e["log_format"]]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("full", errors[0]["why"])
        self.assertEqual(len(recoveries), 1)
        self.assertGreater(recoveries[0]["count"], 2)

    async def test_readOnlyFile(self) -> None:
        """
        When the database's files refuse writes (made immutable), a row saved
        meanwhile lands once they take writes again.
        """
        path = os.path.abspath(self.mktemp())
        store = self.openStore(path)
        await within(store.save(makeRow("a", status="loading")), 5)
        files = [p for p in (path, path + "-wal") if os.path.exists(p)]
        immutable(self, *files)
        saved = store.save(makeRow("a", status="loaded"))
        await sleep(0.5)
        self.assertFalse(saved.called)
        mutable(*files)
        await within(saved, 5)
        self.assertEqual(fileRows(path), [{"name": "a", "status": "loaded", "last_error": None}])

    async def test_closeDuringFailure(self) -> None:
        """
        Closing the store while writes fail does not hang: the waiting saves
        fire, and what was not written is logged.
        """
        path = os.path.abspath(self.mktemp())
        store = self.openStore(path)
        await within(store.save(makeRow("a", status="loading")), 5)
        events = self.captureLog()
        files = [p for p in (path, path + "-wal") if os.path.exists(p)]
        immutable(self, *files)
        saved = store.save(makeRow("a", status="loaded"))
        await sleep(0.3)
        store.close()
        self.assertIsNone(await within(saved, 5))
        self.assertTrue(any("could not be recorded" in e["log_format"] for e in events))


class DeletedFileTests(StoreFaultsMixin, TestCase):
    """
    The store keeps its database and its lock while it runs, even when
    their files are deleted.
    """

    timeout = 30

    async def test_databaseDeleted(self) -> None:
        """
        A database deleted while the store runs is made again, with every
        model's newest row, without any new save.
        """
        path = os.path.abspath(self.mktemp())
        store = self.openStore(path)
        await within(store.save(makeRow("a")), 5)
        await within(store.save(makeRow("b", status="unloaded")), 5)
        for suffix in ("", "-wal", "-shm"):
            os.remove(path + suffix)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            await sleep(0.05)
            try:
                if len(fileRows(path)) == 2:
                    break
            except sqlite3.Error:
                pass
        self.assertEqual([(r["name"], r["status"]) for r in fileRows(path)], [("a", "loaded"), ("b", "unloaded")])

    async def test_directoryDeleted(self) -> None:
        """
        While the database's directory is gone, writes fail quietly (one
        line, no traceback); once it is back, the lock and the database are
        made again, with every row, including one saved meanwhile.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "state.db")
        store = self.openStore(path)
        await within(store.save(makeRow("a")), 5)
        events = self.captureLog()
        shutil.rmtree(directory)
        saved = store.save(makeRow("b", status="unloaded"))
        await sleep(0.5)
        self.assertFalse(saved.called)
        os.makedirs(directory)
        await within(saved, 5)
        self.assertEqual([(r["name"], r["status"]) for r in fileRows(path)], [("a", "loaded"), ("b", "unloaded")])
        deadline = time.monotonic() + 5
        while not os.path.exists(path + ".lock") and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertRaises(StateInUse, SQLiteStateStore(path, reactor).open)
        self.assertEqual(len([e for e in events if e["log_level"].name == "error"]), 2, events)
        self.assertFalse([e for e in events if "log_failure" in e])

    async def test_lockDeleted(self) -> None:
        """
        A lock file deleted while the store runs is made and locked again:
        a second store on the same database is refused afterwards.
        """
        path = os.path.abspath(self.mktemp())
        store = self.openStore(path)
        os.remove(path + ".lock")
        deadline = time.monotonic() + 5
        while not os.path.exists(path + ".lock") and time.monotonic() < deadline:
            await sleep(0.05)
        with open(path + ".lock") as f:
            self.assertEqual(f.read(), str(os.getpid()))
        second = SQLiteStateStore(path, reactor)
        self.assertRaises(StateInUse, second.open)
        self.assertIsNotNone(store._lock)

    async def test_lockTakenMeanwhile(self) -> None:
        """
        If another process locks a new lock file before the store sees that
        its own was deleted, the store says so, calls C{onLost}, and writes
        nothing more.
        """
        path = os.path.abspath(self.mktemp())
        lost: list[str] = []
        store = self.openStore(path, onLost=lost.append, checkInterval=3600)
        await within(store.save(makeRow("a")), 5)
        os.remove(path + ".lock")
        other = SQLiteStateStore(path, reactor)
        other.open()
        self.addCleanup(other.close)
        store.check()
        self.assertEqual(len(lost), 1)
        self.assertIn("in use by another dynllm", lost[0])
        self.assertIn(path, lost[0])
        store.save(makeRow("a", status="unloaded"))
        await sleep(0.3)
        self.assertEqual([r["status"] for r in fileRows(path)], ["loaded"])


class StartUpTests(TestCase):
    """
    A database that cannot be used stops L{SQLiteStateStore.open} with one
    line naming C{db_path} and the cause.
    """

    def assertOneLine(self, path: str, cause: str) -> None:
        store = SQLiteStateStore(path, reactor)
        e = self.assertRaises(StateUnavailable, store.open)
        message = str(e)
        self.assertEqual(message.splitlines(), [message])
        self.assertIn(f"db_path {path}", message)
        self.assertIn(cause, message)
        self.assertIsNone(store._lock)

    def test_missingDirectory(self) -> None:
        """
        A directory that does not exist.
        """
        self.assertOneLine(os.path.join(os.path.abspath(self.mktemp()), "state.db"), "does not exist")

    def test_readOnly(self) -> None:
        """
        A directory on a read-only file system.
        """
        disk = SmallDisk(self, readOnly=True)
        self.assertOneLine(os.path.join(disk.path, "state.db"), "read-only file system")

    def test_full(self) -> None:
        """
        A directory on a full disk.
        """
        disk = SmallDisk(self)
        disk.fill()
        self.assertOneLine(os.path.join(disk.path, "state.db"), "no space left on device")

    def test_fullWithLockFile(self) -> None:
        """
        A full disk where the lock file already exists: the database itself
        cannot be made.
        """
        disk = SmallDisk(self)
        path = os.path.join(disk.path, "state.db")
        with open(path + ".lock", "w") as f:
            f.write("1")
        disk.fill()
        store = SQLiteStateStore(path, reactor)
        e = self.assertRaises(StateUnavailable, store.open)
        self.assertIn(f"db_path {path}", str(e))


def fakeConfig(**overrides: Any) -> dict[str, Any]:
    """
    @return: a daemon configuration with one model on the fake backend.
    """
    config: dict[str, Any] = {
        "total_vram_mb": 1000,
        "enabled_backends": ["llamacpp"],
        "backend": {"llamacpp_binary": FAKE_BACKEND},
        "models": [fakeModel("m")],
    }
    config.update(overrides)
    return config


class DaemonTests(SynchronousTestCase):
    """
    The real daemon (C{twistd -n dynllm}) on a state database that fails.
    """

    def failedStart(self, daemon: Daemon) -> list[str]:
        """
        Start C{daemon}, which must exit with status 1 within 20 s.

        @return: the lines it printed that name C{db_path}.
        """
        daemon.start(wait=False)
        assert daemon.process is not None
        self.assertEqual(daemon.process.wait(20), 1, daemon.log())
        log = daemon.log()
        self.assertNotIn("Traceback", log)
        return [line for line in log.splitlines() if "db_path" in line]

    def assertStartFails(self, dbPath: str, cause: str) -> None:
        """
        A daemon on C{dbPath} stops at start with exactly one line naming
        C{db_path}, the path and C{cause}.
        """
        lines = self.failedStart(Daemon(fakeConfig(db_path=dbPath)))
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("db_path", lines[0])
        self.assertIn(dbPath, lines[0])
        self.assertIn(cause, lines[0])

    def test_missingDirectory(self) -> None:
        """
        A C{db_path} in a directory that does not exist: one line, status 1
        (found with the configuration's other problems, before start-up).
        """
        self.assertStartFails(os.path.join(os.path.abspath(self.mktemp()), "state.db"), "does not exist")

    def test_readOnly(self) -> None:
        """
        A C{db_path} on a read-only file system: one line, status 1 (found
        with the configuration's other problems, before start-up).
        """
        disk = SmallDisk(self, readOnly=True)
        self.assertStartFails(os.path.join(disk.path, "state.db"), "cannot be written")

    def test_full(self) -> None:
        """
        A C{db_path} on a full disk: one line, status 1.
        """
        disk = SmallDisk(self)
        disk.fill()
        self.assertStartFails(os.path.join(disk.path, "state.db"), "no space left on device")

    def test_deletedThenSecondDaemon(self) -> None:
        """
        When the database and its lock file are deleted under a running
        daemon, it makes them again and locks them: a second daemon on the
        same C{db_path} is refused, with one line.
        """
        first = Daemon(fakeConfig()).start()
        self.addCleanup(first.stop)
        dbPath = first.config["db_path"]
        for suffix in ("", "-wal", "-shm", ".lock"):
            if os.path.exists(dbPath + suffix):
                os.remove(dbPath + suffix)
        self.assertTrue(waitFor(lambda: os.path.exists(dbPath + ".lock"), timeout=5))
        self.assertTrue(waitFor(lambda: os.path.exists(dbPath), timeout=5))
        second = Daemon(dict(first.config, server={"host": "127.0.0.1", "port": freePort()}))
        lines = self.failedStart(second)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("in use by another dynllm", lines[0])
        self.assertEqual(first.get("/health")[0], 200)

    def test_rowsHeal(self) -> None:
        """
        A model loaded while the database refuses writes is recorded once it
        takes them again: the row names the backend's pid.
        """
        daemon = Daemon(fakeConfig()).start()
        self.addCleanup(daemon.stop)
        dbPath = daemon.config["db_path"]
        files = [p for p in (dbPath, dbPath + "-wal") if os.path.exists(p)]
        immutable(self, *files)
        self.assertEqual(daemon.post("/admin/models/load", {"model": "m"})[0], 200)
        pid = daemon.models()["m"]["pid"]
        self.assertTrue(waitFor(lambda: "could not record the state of m" in daemon.log(), timeout=5))
        time.sleep(1)
        self.assertEqual(fileRows(dbPath)[0]["status"], "unloaded")
        mutable(*files)
        self.assertTrue(waitFor(lambda: fileRows(dbPath)[0]["status"] == "loaded", timeout=10))
        conn = sqlite3.connect(dbPath)
        try:
            self.assertEqual(conn.execute("SELECT pid FROM models WHERE name = 'm'").fetchall(), [(pid,)])
        finally:
            conn.close()
        self.assertEqual(daemon.log().count("could not record the state"), 1)
        self.assertEqual(daemon.log().count("takes writes again"), 1)

    def test_backendStartedWhileWritesFail(self) -> None:
        """
        A backend started while the database refuses writes (so never
        recorded) is gone after C{kill -9} of the daemon, before any
        restart; the restarted daemon finds nothing to stop, stops nothing
        else, and serves.
        """
        first = Daemon(fakeConfig(models=[fakeModel("m", fake_child=1)])).start()
        self.addCleanup(first.stop)
        dbPath = first.config["db_path"]
        files = [p for p in (dbPath, dbPath + "-wal") if os.path.exists(p)]
        immutable(self, *files)
        self.assertEqual(first.post("/admin/models/load", {"model": "m"})[0], 200)
        pid = first.models()["m"]["pid"]
        first.kill9()
        self.assertTrue(waitFor(lambda: not groupMembers(pid), timeout=3), groupMembers(pid))
        mutable(*files)
        second = Daemon(first.config, directory=first.directory)
        second.port, second.url = first.port, first.url
        second.start()
        self.addCleanup(second.stop)
        self.assertNotIn("left by a previous run", second.log())
        self.assertEqual(second.models()["m"]["status"], "unloaded")
        self.assertEqual(second.post("/admin/models/load", {"model": "m"})[0], 200)

    def test_daemonized(self) -> None:
        """
        A daemonizing twistd (without C{-n}) whose C{db_path} is on a full
        disk exits with status 1 at once, instead of waiting for ever for
        its daemon to report; its log holds the one line.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        disk = SmallDisk(self)
        disk.fill()
        dbPath = os.path.join(disk.path, "state.db")
        daemon = Daemon(fakeConfig(db_path=dbPath), directory=directory)
        logPath = os.path.join(directory, "twistd.log")
        result = subprocess.run(
            [TWISTD, f"--pidfile={directory}/twistd.pid", f"--logfile={logPath}", "dynllm", "--config", daemon.configPath],
            cwd=directory,
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"db_path", result.stderr)

        def lines() -> list[str]:
            with open(logPath) as f:
                return [line.split("] ", 1)[1] for line in f.read().splitlines() if "db_path" in line]

        # The parent exits once the daemon has reported, which may be before
        # the daemon's own log line is written.
        waitFor(lambda: bool(lines()), timeout=10)
        with open(logPath) as f:
            self.assertNotIn("Traceback", f.read())
        self.assertEqual(lines(), [f"dynllm: cannot use db_path {dbPath}: no space left on device"])


class EmbeddedStartTests(TestCase):
    """
    Programs that embed dynllm get the exception; the C{twist} command line
    gets one line.
    """

    def config(self) -> Any:
        return parseConfig(
            {
                "total_vram_mb": 100,
                "db_path": os.path.join(os.path.abspath(self.mktemp()), "state.db"),
                "models": [],
            }
        )

    def test_embeddedRaises(self) -> None:
        """
        L{dynllm.service.makeService}'s service raises L{StateUnavailable}
        from C{startService} for a database that cannot be used.
        """
        service = makeService(self.config(), reactor, listen=False)
        self.assertRaises(StateUnavailable, service.startService)

    async def test_twistOneLine(self) -> None:
        """
        C{python -m twisted dynllm} (C{twist}) on a C{db_path} in a missing
        directory exits with status 1 and one line naming it, no traceback
        (the configuration's check finds it).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "dynllm.yaml")
        dbPath = os.path.join(directory, "missing", "state.db")
        with open(path, "w") as f:
            yaml.safe_dump({"total_vram_mb": 100, "db_path": dbPath, "models": []}, f)
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "twisted", "dynllm", "-c", path], env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT
        )
        self.assertEqual(code, 1)
        output = (out + err).decode()
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "db_path" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("does not exist", lines[0])
        self.assertIn(os.path.dirname(dbPath), lines[0])

    test_twistOneLine.timeout = 60  # type: ignore[attr-defined]
