"""
Tests for L{dynllm.store}: the SQLite state store on a real file with the
real reactor, and L{reconcile} with a fake clock and fake processes, and
once with a real leftover process.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from dynllm.interfaces import IStateStore
from dynllm.process import processStartTime
from dynllm.store import (
    COLUMNS,
    MemoryStateStore,
    SQLiteStateStore,
    StateInUse,
    reconcile,
)


def makeRow(name: str, **values: Any) -> dict[str, Any]:
    """
    @return: a complete model row for C{name} describing a loaded model,
        with C{values} applied.
    """
    row = {
        "name": name,
        "status": "loaded",
        "backend": "llamacpp",
        "pid": 4242,
        "pgid": 4242,
        "start_time": 1000,
        "port": 9100,
        "vram_mb": 512,
        "loaded_at": 10.5,
        "last_used_at": 20.25,
        "load_seq": 3,
        "last_error": None,
        "updated_at": 30.0,
        "stop_command": None,
    }
    row.update(values)
    return row


class SQLiteStateStoreTests(TestCase):
    """
    L{SQLiteStateStore} keeps rows in a real SQLite file.
    """

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.store = self.openStore()

    def openStore(self) -> SQLiteStateStore:
        """
        @return: an open store on C{self.path}, closed when the test ends.
        """
        store = SQLiteStateStore(self.path, reactor)
        store.open()
        self.addCleanup(store.close)
        return store

    def test_providesIStateStore(self) -> None:
        """
        L{SQLiteStateStore} provides L{IStateStore}, so the scheduler and
        L{reconcile} take it or the memory store alike.
        """
        self.assertTrue(verifyObject(IStateStore, self.store))

    def test_inUse(self) -> None:
        """
        A second store on the same database cannot open it while the first
        holds it; the error names the holder's pid and C{db_path}. Once the
        first is closed, the database can be opened again.
        """
        second = SQLiteStateStore(self.path, reactor)
        with self.assertRaises(StateInUse) as caught:
            second.open()
        self.assertIn(f"pid {os.getpid()}", str(caught.exception))
        self.assertIn("db_path", str(caught.exception))
        self.store.close()
        self.openStore()

    def test_inUseThroughSymlink(self) -> None:
        """
        A second store whose path is a symbolic link to the database (or
        lies in a linked directory) cannot open it either: the lock is
        taken on the real path.
        """
        link = os.path.abspath(self.mktemp())
        os.symlink(self.path, link)
        directory = os.path.abspath(self.mktemp())
        os.symlink(os.path.dirname(self.path), directory)
        for path in (link, os.path.join(directory, os.path.basename(self.path))):
            with self.assertRaises(StateInUse):
                SQLiteStateStore(path, reactor).open()
        self.assertFalse(os.path.exists(link + ".lock"))

    async def test_roundTrip(self) -> None:
        """
        A saved row is read back with every column, and rows come sorted by
        name.
        """
        await self.store.save(makeRow("b"))
        await self.store.save(makeRow("a", last_error="boom", status="failed"))
        rows = await self.store.rows()
        self.assertEqual([r["name"] for r in rows], ["a", "b"])
        self.assertEqual(rows[1], makeRow("b"))
        self.assertEqual(rows[0]["last_error"], "boom")
        self.assertEqual(set(rows[0]), set(COLUMNS))

    async def test_missingColumnsAreNull(self) -> None:
        """
        Columns a saved mapping leaves out are stored as NULL.
        """
        await self.store.save({"name": "a", "status": "unloaded"})
        [row] = await self.store.rows()
        self.assertEqual(row, dict.fromkeys(COLUMNS) | {"name": "a", "status": "unloaded"})

    async def test_olderDatabaseGainsStopCommand(self) -> None:
        """
        A database written before rows had C{stop_command} is opened, its
        rows read with C{stop_command} C{None}, and new rows keep theirs.
        """
        self.store.close()
        os.unlink(self.path)
        conn = sqlite3.connect(self.path)
        columns = ", ".join(c for c in COLUMNS if c != "stop_command")
        conn.execute(f"CREATE TABLE models ({columns}, PRIMARY KEY (name))")
        conn.execute("INSERT INTO models (name, status) VALUES ('old', 'loaded')")
        conn.commit()
        conn.close()
        store = self.openStore()
        await store.save(makeRow("new", stop_command='["ctl", "stop"]'))
        rows = {r["name"]: r for r in await store.rows()}
        self.assertIsNone(rows["old"]["stop_command"])
        self.assertEqual(rows["new"]["stop_command"], '["ctl", "stop"]')

    async def test_upsertOverwrites(self) -> None:
        """
        Saving a row for a name already stored replaces it, every column.
        """
        await self.store.save(makeRow("a"))
        await self.store.save(makeRow("a", status="unloaded", pid=None, port=None, load_seq=4))
        self.assertEqual(
            await self.store.rows(),
            [makeRow("a", status="unloaded", pid=None, port=None, load_seq=4)],
        )

    async def test_reset(self) -> None:
        """
        L{SQLiteStateStore.reset} marks the configured models' rows unloaded,
        clears their process and port, keeps their history, and deletes the
        rows of models no longer configured.
        """
        await self.store.save(makeRow("a"))
        await self.store.save(makeRow("gone"))
        await self.store.reset(["a", "b"])
        self.assertEqual(
            await self.store.rows(),
            [makeRow("a", status="unloaded", pid=None, pgid=None, start_time=None, port=None)],
        )

    async def test_resetNothingConfigured(self) -> None:
        """
        Resetting with no configured models deletes every row.
        """
        await self.store.save(makeRow("a"))
        await self.store.reset([])
        self.assertEqual(await self.store.rows(), [])

    async def test_survivesReopen(self) -> None:
        """
        Rows are in the file: a store opened on it after the first is closed
        reads them back.
        """
        await self.store.save(makeRow("a"))
        await self.store.save(makeRow("b", port=9101))
        self.store.close()
        again = self.openStore()
        self.assertEqual(await again.rows(), [makeRow("a"), makeRow("b", port=9101)])

    async def test_saveWhenClosedIsIgnored(self) -> None:
        """
        Saving into a store that is not open does nothing and does not fail.
        """
        self.store.close()
        self.assertIsNone(await self.store.save(makeRow("a")))

    async def test_reconcileResetsFile(self) -> None:
        """
        L{reconcile} over a SQLite store stops the recorded process and leaves
        the file's rows reset.
        """
        await self.store.save(makeRow("a"))
        table = FakeProcesses({4242: (4242, 1000)})
        stopped = await reconcile(
            self.store, ["a"], task.Clock(), table.startTimeOf, table.obeyTerm
        )
        self.assertEqual(stopped, ["a"])
        self.assertEqual(table.sent, [(4242, "TERM"), (4242, "KILL")])
        [row] = await self.store.rows()
        self.assertEqual((row["status"], row["pid"], row["port"]), ("unloaded", None, None))


class MemoryStateStoreTests(TestCase):
    """
    L{MemoryStateStore} behaves as the SQLite one does.
    """

    def test_providesIStateStore(self) -> None:
        """
        L{MemoryStateStore} provides L{IStateStore}, so it can stand in for
        the SQLite store.
        """
        self.assertTrue(verifyObject(IStateStore, MemoryStateStore()))

    def test_roundTripAndReset(self) -> None:
        """
        Saved rows come back sorted and complete; reset marks configured ones
        unloaded and deletes the rest.
        """
        store = MemoryStateStore()
        store.save(makeRow("b"))
        store.save({"name": "a", "status": "loading"})
        rows = self.successResultOf(store.rows())
        self.assertEqual(rows, [dict.fromkeys(COLUMNS) | {"name": "a", "status": "loading"}, makeRow("b")])
        store.reset(["b"])
        self.assertEqual(
            self.successResultOf(store.rows()),
            [makeRow("b", status="unloaded", pid=None, pgid=None, start_time=None, port=None)],
        )


class FakeProcesses:
    """
    A fake process table for L{reconcile}: pid -> (pgid, start time).

    @ivar sent: the (group, signal name) pairs sent, in order.
    @ivar dieOn: the signal names on which a group's processes exit.
    """

    def __init__(self, processes: dict[int, tuple[int, int]], dieOn: tuple[str, ...] = ("KILL",)):
        self.processes = dict(processes)
        self.dieOn = dieOn
        self.sent: list[tuple[int, str]] = []

    def startTimeOf(self, pid: int) -> int | None:
        entry = self.processes.get(pid)
        return None if entry is None else entry[1]

    def signal(self, group: int, name: str) -> bool:
        self.sent.append((group, name))
        members = [pid for pid, (pgid, _) in self.processes.items() if pgid == group]
        if name in self.dieOn:
            for pid in members:
                del self.processes[pid]
        return bool(members)

    def obeyTerm(self, group: int, name: str) -> bool:
        self.dieOn = ("TERM", "KILL")
        return self.signal(group, name)


class ReconcileTests(TestCase):
    """
    L{reconcile} stops the backends a previous run left running, and only
    those, then resets every row.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.store = MemoryStateStore()

    def reconcile(self, table: FakeProcesses, names: list[str], killTime: float = 1.0):
        """
        Start L{reconcile} on the memory store with the fake clock and
        C{table}.

        @return: its Deferred.
        """
        return defer.ensureDeferred(
            reconcile(self.store, names, self.clock, table.startTimeOf, table.signal, killTime)
        )

    def assertReset(self, *names: str) -> None:
        """
        Assert that the store holds exactly C{names}, all unloaded without a
        process or port.
        """
        rows = self.successResultOf(self.store.rows())
        self.assertEqual([r["name"] for r in rows], list(names))
        for row in rows:
            self.assertEqual(
                (row["status"], row["pid"], row["pgid"], row["start_time"], row["port"]),
                ("unloaded", None, None, None, None),
            )

    def test_termThenKill(self) -> None:
        """
        A recorded process still running with its recorded start time gets
        TERM to its process group, then KILL once C{killTime} has passed;
        reconcile waits until it is gone, then resets the rows.
        """
        self.store.save(makeRow("a", pid=500, pgid=400, start_time=77))
        table = FakeProcesses({500: (400, 77), 501: (400, 90)})
        d = self.reconcile(table, ["a"], killTime=1.0)
        self.assertEqual(table.sent, [(400, "TERM")])
        self.clock.pump([0.05] * 19)
        self.assertNoResult(d)
        self.assertEqual(table.sent, [(400, "TERM")])
        self.assertEqual(self.store.saved["a"]["status"], "loaded")
        self.clock.pump([0.05] * 3)
        self.assertEqual(self.successResultOf(d), ["a"])
        self.assertEqual(table.sent[0], (400, "TERM"))
        self.assertEqual(set(table.sent[1:]), {(400, "KILL")})
        self.assertEqual(table.processes, {})
        self.assertReset("a")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_termObeyed(self) -> None:
        """
        A process that exits on TERM is not waited for further: the group
        still gets a KILL for any stragglers, and no timer is left.
        """
        self.store.save(makeRow("a"))
        table = FakeProcesses({4242: (4242, 1000)}, dieOn=("TERM", "KILL"))
        d = self.reconcile(table, ["a"])
        self.assertEqual(self.successResultOf(d), ["a"])
        self.assertEqual(table.sent, [(4242, "TERM"), (4242, "KILL")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waitsForExit(self) -> None:
        """
        Reconcile does not finish while the process is alive after TERM, and
        finishes once it exits by itself before C{killTime}.
        """
        self.store.save(makeRow("a"))
        table = FakeProcesses({4242: (4242, 1000)})
        d = self.reconcile(table, ["a"], killTime=5.0)
        self.clock.advance(0.05)
        self.clock.advance(0.05)
        self.assertNoResult(d)
        del table.processes[4242]
        self.clock.advance(0.05)
        self.assertEqual(self.successResultOf(d), ["a"])
        self.assertEqual(table.sent, [(4242, "TERM"), (4242, "KILL")])

    def test_noPgidUsesPid(self) -> None:
        """
        A row without a process group is signalled through its pid.
        """
        self.store.save(makeRow("a", pid=300, pgid=None, start_time=5))
        table = FakeProcesses({300: (300, 5)}, dieOn=("TERM",))
        self.successResultOf(self.reconcile(table, ["a"]))
        self.assertEqual(table.sent[0], (300, "TERM"))

    def test_reusedPidLeftAlone(self) -> None:
        """
        A recorded pid now running a process that started at another time
        (the pid was reused) is not signalled; the row is still reset.
        """
        self.store.save(makeRow("a", pid=600, pgid=600, start_time=111))
        table = FakeProcesses({600: (600, 222)})
        d = self.reconcile(table, ["a"])
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(table.sent, [])
        self.assertIn(600, table.processes)
        self.assertReset("a")

    def test_deadPidLeftAlone(self) -> None:
        """
        A recorded pid that is not running is not signalled.
        """
        self.store.save(makeRow("a"))
        table = FakeProcesses({})
        self.assertEqual(self.successResultOf(self.reconcile(table, ["a"])), [])
        self.assertEqual(table.sent, [])
        self.assertReset("a")

    def test_rowsWithoutProcess(self) -> None:
        """
        Rows without a pid or start time are only reset; rows of models no
        longer configured are deleted.
        """
        self.store.save(makeRow("a", pid=None))
        self.store.save(makeRow("b", start_time=None))
        self.store.save(makeRow("old", pid=None))
        table = FakeProcesses({4242: (4242, 1000)})
        self.assertEqual(self.successResultOf(self.reconcile(table, ["a", "b"])), [])
        self.assertEqual(table.sent, [])
        self.assertReset("a", "b")

    def test_survivesKill(self) -> None:
        """
        A process that survives KILL (stuck in the kernel) is given up on
        after twice C{killTime}, and the rows are still reset.
        """
        self.store.save(makeRow("a"))
        table = FakeProcesses({4242: (4242, 1000)}, dieOn=())
        d = self.reconcile(table, ["a"], killTime=0.5)
        self.clock.pump([0.05] * 30)
        self.assertEqual(self.successResultOf(d), ["a"])
        self.assertIn((4242, "KILL"), table.sent)
        self.assertReset("a")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_severalModels(self) -> None:
        """
        Every leftover process is stopped, one after the other.
        """
        self.store.save(makeRow("a", pid=1, pgid=1, start_time=1))
        self.store.save(makeRow("b", pid=2, pgid=2, start_time=2))
        table = FakeProcesses({1: (1, 1), 2: (2, 2)}, dieOn=("TERM",))
        self.assertEqual(self.successResultOf(self.reconcile(table, ["a", "b"])), ["a", "b"])
        self.assertEqual([s for s in table.sent if s[1] == "TERM"], [(1, "TERM"), (2, "TERM")])
        self.assertReset("a", "b")


class RealReconcileTests(TestCase):
    """
    L{reconcile} with a real leftover process, the real reactor and the real
    C{/proc} and signals.
    """

    timeout = 20

    async def test_stopsLeftoverProcess(self) -> None:
        """
        A process recorded with its pid, process group and start time is
        stopped, and its row reset.
        """
        child = subprocess.Popen(["sleep", "300"], start_new_session=True)

        def cleanup() -> None:
            if child.poll() is None:
                child.kill()
                child.wait()

        self.addCleanup(cleanup)
        started = processStartTime(child.pid)
        self.assertIsInstance(started, int)
        self.assertEqual(os.getpgid(child.pid), child.pid)
        store = MemoryStateStore()
        store.save(makeRow("a", pid=child.pid, pgid=child.pid, start_time=started))
        store.save(makeRow("b", pid=child.pid, pgid=child.pid, start_time=started - 1))

        stopped = await reconcile(store, ["a", "b"], reactor, killTime=5.0)

        self.assertEqual(stopped, ["a"])
        deadline = time.monotonic() + 5
        while child.poll() is None and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(child.poll(), -signal.SIGTERM)
        self.assertEqual(
            [(r["name"], r["status"], r["pid"]) for r in self.successResultOf(store.rows())],
            [("a", "unloaded", None), ("b", "unloaded", None)],
        )
