# -*- test-case-name: tests.test_store -*-
"""
Model state in SQLite, through adbapi: one row per model, written on state
transitions, read back at start-up to stop what a crashed run left behind.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from typing import Any, Callable, Mapping

from attrs import define, field
from twisted.enterprise import adbapi
from twisted.internet import defer, task
from zope.interface import implementer

from dynllm.interfaces import IStateStore
from dynllm.logs import logger
from dynllm.process import processStartTime, signalGroup

log = logger(__name__)

#: The columns of a model row, in order.
COLUMNS = (
    "name",
    "status",
    "backend",
    "pid",
    "pgid",
    "start_time",
    "port",
    "vram_mb",
    "loaded_at",
    "last_used_at",
    "load_seq",
    "last_error",
    "updated_at",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    backend TEXT,
    pid INTEGER,
    pgid INTEGER,
    start_time INTEGER,
    port INTEGER,
    vram_mb INTEGER,
    loaded_at REAL,
    last_used_at REAL,
    load_seq INTEGER,
    last_error TEXT,
    updated_at REAL
)
"""

_UPSERT = (
    f"INSERT INTO models ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
    f" ON CONFLICT(name) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
)

#: Seconds a leftover process group gets between TERM and KILL at start-up.
RECONCILE_KILL_TIME = 5.0


def _onConnect(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute(_SCHEMA)
    conn.commit()


class StateInUse(Exception):
    """
    Another process uses the state database.
    """


def _lockDatabase(database: str) -> int:
    """
    Take an exclusive lock on C{DATABASE.lock} (created if needed) and
    write our pid into it.

    @return: the open file descriptor; closing it releases the lock.
    @raise StateInUse: naming the holder's pid, if it is locked.
    """
    fd = os.open(database + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateInUse(
            f"the state database {database} is in use by another dynllm (pid {holder});"
            f" give each daemon its own db_path"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode("ascii"))
    return fd


@implementer(IStateStore)
@define
class SQLiteStateStore:
    """
    Model rows in an SQLite file.

    @ivar path: The database file.
    @ivar reactor: Runs the pool and the waits of L{reconcile}.
    """

    path: str
    reactor: Any
    _pool: adbapi.ConnectionPool | None = field(default=None, init=False)
    _lock: int | None = field(default=None, init=False)

    def open(self) -> None:
        """
        Take the database for this process, and open the connection pool:
        one thread, so writes keep their order.

        @raise StateInUse: if another process holds it. Two daemons on one
            database would each take the other's backends for leftovers of
            a crash, and stop them.
        """
        if self._pool is not None:
            return
        self._lock = _lockDatabase(self.path)
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_onConnect,
            cp_reconnect=False,
            cp_reactor=self.reactor,
        )

    def close(self) -> None:
        """
        Close the pool once the writes queued so far are done.
        """
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def rows(self) -> defer.Deferred[list[dict[str, Any]]]:
        """
        @return: every model row, as dicts keyed by L{COLUMNS}.
        """
        assert self._pool is not None
        d: defer.Deferred[list[tuple[Any, ...]]] = self._pool.runQuery(f"SELECT {', '.join(COLUMNS)} FROM models ORDER BY name")
        return d.addCallback(lambda rows: [dict(zip(COLUMNS, row)) for row in rows])

    def save(self, row: Mapping[str, Any]) -> defer.Deferred[None]:
        """
        Write one model's row (insert or replace). Failures are logged, not
        raised: the daemon keeps serving if the disk fills.
        """
        if self._pool is None:
            return defer.succeed(None)
        values = tuple(row.get(c) for c in COLUMNS)
        d: defer.Deferred[None] = self._pool.runOperation(_UPSERT, values)
        d.addErrback(lambda f: log.failure("could not record the state of {name}", f, name=row["name"]))
        return d

    def reset(self, names: list[str]) -> defer.Deferred[None]:
        """
        Forget rows of models no longer configured and mark the rest unloaded.
        """
        assert self._pool is not None

        def interaction(txn: Any) -> None:
            marks = ", ".join("?" for _ in names)
            txn.execute(f"DELETE FROM models WHERE name NOT IN ({marks})", names)
            txn.execute(
                "UPDATE models SET status = 'unloaded', pid = NULL, pgid = NULL,"
                " start_time = NULL, port = NULL"
            )

        d: defer.Deferred[None] = self._pool.runInteraction(interaction)
        return d


@implementer(IStateStore)
@define
class MemoryStateStore:
    """
    Model rows kept in a dict: for programs that embed dynllm without a
    database, and for tests (also public as L{dynllm.testing.MemoryStateStore}).

    @ivar saved: Every row written, by model name, keyed by L{COLUMNS}.
    """

    saved: dict[str, dict[str, Any]] = field(factory=dict)

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def rows(self) -> defer.Deferred[list[dict[str, Any]]]:
        return defer.succeed([dict(r) for _, r in sorted(self.saved.items())])

    def save(self, row: Mapping[str, Any]) -> defer.Deferred[None]:
        self.saved[row["name"]] = {c: row.get(c) for c in COLUMNS}
        return defer.succeed(None)

    def reset(self, names: list[str]) -> defer.Deferred[None]:
        for name in list(self.saved):
            if name not in names:
                del self.saved[name]
            else:
                self.saved[name].update(status="unloaded", pid=None, pgid=None, start_time=None, port=None)
        return defer.succeed(None)


async def reconcile(
    store: IStateStore,
    names: list[str],
    clock: Any,
    startTimeOf: Callable[[int], int | None] = processStartTime,
    signal: Callable[[int, str], bool] = signalGroup,
    killTime: float = RECONCILE_KILL_TIME,
) -> list[str]:
    """
    Stop every backend that a previous run recorded and that is still
    running, then mark every row unloaded.

    A recorded pid counts as ours only if the process with that pid started
    at the recorded time: a pid the system has since given to another
    program is left alone. Ours get TERM to their process group, then KILL
    after C{killTime}, and this waits until they are gone.

    @param store: Where the previous run recorded its models.
    @param names: The models configured now.
    @return: the names of the models whose leftover backends were stopped.
    """
    stopped = []
    for row in await store.rows():
        pid, pgid, started = row["pid"], row["pgid"], row["start_time"]
        if pid is None or started is None:
            continue
        if startTimeOf(pid) != started:
            log.info("{name}: recorded pid {pid} is not running any more", name=row["name"], pid=pid)
            continue
        log.warn(
            "{name}: stopping pid {pid} (process group {pgid}) left by a previous run",
            name=row["name"],
            pid=pid,
            pgid=pgid,
        )
        group = pgid or pid
        signal(group, "TERM")
        waited = 0.0
        while startTimeOf(pid) == started:
            if waited >= 2 * killTime:
                log.error("{name}: pid {pid} survived SIGKILL; giving up on it", name=row["name"], pid=pid)
                break
            if waited >= killTime:
                signal(group, "KILL")
            await task.deferLater(clock, 0.05, lambda: None)
            waited += 0.05
        # The leader is gone; make sure the rest of its group is too.
        signal(group, "KILL")
        stopped.append(row["name"])
    await store.reset(names)
    return stopped
