# -*- test-case-name: tests.test_store -*-
"""
Model state in SQLite, through adbapi: one row per model, written on state
transitions, read back at start-up to stop what a crashed run left behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
from typing import Any, Callable, Mapping

from attrs import define, field
from twisted.enterprise import adbapi
from twisted.internet import defer, task
from twisted.python.failure import Failure
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
    "stop_command",
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
    updated_at REAL,
    stop_command TEXT
)
"""

#: Columns added since the first schema, with their types: a database
#: written by an older dynllm gains them when opened (NULL in its rows).
_ADDED_COLUMNS = {"stop_command": "TEXT"}

_UPSERT = (
    f"INSERT INTO models ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
    f" ON CONFLICT(name) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
)

#: Seconds a leftover process group gets between TERM and KILL at start-up.
RECONCILE_KILL_TIME = 5.0


#: Seconds between the checks that the database file and its lock file are
#: still the ones this daemon opened and locked.
CHECK_INTERVAL = 1.0

#: Seconds before the first retry of a failed write; each further failure
#: doubles it, up to L{MAX_RETRY_DELAY}.
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0


#: The name of the row written and deleted at start-up to see that the
#: database takes writes (no model can have it: it is not printable).
_PROBE = "\x00probe"


def _setUp(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute(_SCHEMA)
    present = {row[1] for row in conn.execute("PRAGMA table_info(models)")}
    for column, kind in _ADDED_COLUMNS.items():
        if column not in present:
            conn.execute(f"ALTER TABLE models ADD COLUMN {column} {kind}")
    conn.commit()


class StateInUse(Exception):
    """
    Another process uses the state database.
    """


class StateUnavailable(Exception):
    """
    The state database cannot be opened or written at start-up: its
    directory is missing, read-only, full or not ours. The message is one
    line naming C{db_path} and the cause.
    """


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return (stat.st_dev, stat.st_ino)


def _fileIdentity(path: str) -> tuple[int, int] | None:
    """
    @return: the device and inode of C{path}, or C{None} if there is none.
    """
    try:
        return _identity(os.stat(path))
    except FileNotFoundError:
        return None


def _cause(e: BaseException) -> str:
    """
    @return: why an C{OSError} or C{sqlite3.Error} happened, in a few
        words, without the file name (the caller names C{db_path}).
    """
    if isinstance(e, OSError):
        if e.errno == errno.ENOENT:
            return "its directory does not exist"
        return (e.strerror or str(e)).lower()
    return str(e)


def lockPath(database: str) -> str:
    """
    @return: the lock file of C{database}: its real path (symbolic links
        resolved) plus C{.lock}, so that a second daemon whose C{db_path}
        is a symbolic link to the same file (or in a linked directory)
        meets the same lock, instead of taking a lock of its own and then
        stopping the first daemon's backends as left by a previous run.
    """
    return os.path.realpath(database) + ".lock"


def _lockDatabase(database: str) -> int:
    """
    Take an exclusive lock on L{lockPath} (created if needed) and write our
    pid into it.

    @return: the open file descriptor; closing it releases the lock.
    @raise StateInUse: naming the holder's pid, if it is locked.
    @raise OSError: if the lock file cannot be made or written.
    """
    fd = os.open(lockPath(database), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateInUse(
            f"the state database {database} is in use by another dynllm (pid {holder});"
            f" give each daemon its own db_path"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
    except OSError:
        os.close(fd)
        raise
    return fd


@implementer(IStateStore)
@define
class SQLiteStateStore:
    """
    Model rows in an SQLite file, kept right through disk faults.

    The rows in memory are the truth and the file catches up: a write that
    fails (disk full, file system read-only) is retried, with a delay
    doubling from L{FIRST_RETRY_DELAY} to L{MAX_RETRY_DELAY}, until it
    lands; rows saved meanwhile are coalesced, so the newest row of each
    model is what lands. A failure episode is logged once when it begins and
    once when it ends.

    The daemon holds a lock on C{DATABASE.lock} as long as it runs, so that
    no second daemon starts on the same file. Every L{CHECK_INTERVAL}
    seconds it checks that the lock file and the database are still the
    files it opened: a deleted (or replaced) lock file is re-created and
    locked again, and a deleted database is re-created with every row. If
    another process took the lock meanwhile, the daemon cannot keep it:
    C{onLost} is called (by default: log and stop the reactor, which stops
    the backends in order).

    @ivar path: The database file.
    @ivar reactor: Runs the pool, the retries, the checks and the waits of
        L{reconcile}.
    @ivar onLost: Called with a message when the lock is lost for good.
    @ivar checkInterval: Seconds between the checks of the files.
    @ivar firstRetryDelay: Seconds before the first retry of a failed write.
    @ivar maxRetryDelay: The longest wait between retries, in seconds.
    """

    path: str
    reactor: Any
    onLost: Callable[[str], object] | None = None
    checkInterval: float = CHECK_INTERVAL
    firstRetryDelay: float = FIRST_RETRY_DELAY
    maxRetryDelay: float = MAX_RETRY_DELAY
    _pool: adbapi.ConnectionPool | None = field(default=None, init=False)
    _lock: int | None = field(default=None, init=False)
    #: The newest row of each model, as values in L{COLUMNS} order.
    _rows: dict[str, tuple[Any, ...]] = field(factory=dict, init=False)
    #: Models whose newest row is not in the file yet.
    _dirty: set[str] = field(factory=set, init=False)
    #: Who waits for a model's newest row to land.
    _waiters: dict[str, list[defer.Deferred[None]]] = field(factory=dict, init=False)
    #: Models whose rows are being written.
    _inflight: set[str] = field(factory=set, init=False)
    _retry: Any = field(default=None, init=False)
    _delay: float = field(default=0.0, init=False)
    _failures: int = field(default=0, init=False)
    _checker: task.LoopingCall | None = field(default=None, init=False)
    #: The database file the pool's connection has open (set in its thread).
    _connected: tuple[int, int] | None = field(default=None, init=False)
    _lockTrouble: bool = field(default=False, init=False)

    def open(self) -> None:
        """
        Take the database for this process, check that it can be written,
        and open the connection pool: one thread, so writes keep their
        order.

        @raise StateInUse: if another process holds it. Two daemons on one
            database would each take the other's backends for leftovers of
            a crash, and stop them.
        @raise StateUnavailable: if the database or its lock file cannot be
            made or written, in one line naming C{db_path} and the cause.
        """
        if self._pool is not None:
            return
        try:
            self._lock = _lockDatabase(self.path)
        except OSError as e:
            raise StateUnavailable(f"cannot use db_path {self.path}: {_cause(e)}") from None
        try:
            self._probe()
        except (OSError, sqlite3.Error) as e:
            os.close(self._lock)
            self._lock = None
            raise StateUnavailable(f"cannot use db_path {self.path}: {_cause(e)}") from None
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=self._onConnect,
            cp_reconnect=False,
            cp_reactor=self.reactor,
        )
        self._checker = task.LoopingCall(self.check)
        self._checker.clock = self.reactor
        self._checker.start(self.checkInterval, now=False)

    def _probe(self) -> None:
        """
        Open the database (creating it and its table if needed) and write
        to it once, here and now, so that a start-up on a read-only or
        full disk stops at once.
        """
        conn = sqlite3.connect(self.path)
        try:
            _setUp(conn)
            conn.execute("INSERT INTO models (name, status) VALUES (?, 'probe')", (_PROBE,))
            conn.execute("DELETE FROM models WHERE name = ?", (_PROBE,))
            conn.commit()
        finally:
            conn.close()

    def _onConnect(self, conn: sqlite3.Connection) -> None:
        # In the pool's thread.
        _setUp(conn)
        self._connected = _fileIdentity(self.path)

    def close(self) -> None:
        """
        Close the pool once the writes queued so far are done; write the
        rows that have not landed once more, here and now (saying which, if
        that fails too); then let go of the lock.
        """
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        self._checker = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
            # The outcome of a write under way is not known yet: write it again.
            unwritten = sorted(self._dirty | self._inflight)
            if unwritten and self._lock is not None:
                try:
                    self._writeNow([self._rows[name] for name in unwritten])
                except (OSError, sqlite3.Error) as e:
                    log.warn(
                        "the state of {names} could not be recorded in {path} before stopping: {why}",
                        names=", ".join(unwritten),
                        path=self.path,
                        why=_cause(e),
                    )
            self._dirty.clear()
            self._inflight = set()
        for waiters in self._waiters.values():
            for d in waiters:
                d.callback(None)
        self._waiters.clear()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _writeNow(self, rows: list[tuple[Any, ...]]) -> None:
        """
        Write C{rows} in this thread, with a connection of its own.
        """
        conn = sqlite3.connect(self.path)
        try:
            _setUp(conn)
            conn.executemany(_UPSERT, rows)
            conn.commit()
        finally:
            conn.close()

    def rows(self) -> defer.Deferred[list[dict[str, Any]]]:
        """
        @return: every model row in the file, as dicts keyed by L{COLUMNS}.
        """
        assert self._pool is not None
        d: defer.Deferred[list[tuple[Any, ...]]] = self._pool.runQuery(f"SELECT {', '.join(COLUMNS)} FROM models ORDER BY name")
        return d.addCallback(lambda rows: [dict(zip(COLUMNS, row)) for row in rows])

    def save(self, row: Mapping[str, Any]) -> defer.Deferred[None]:
        """
        Record one model's row (insert or replace). It never fails: a write
        that fails is retried until it lands (see the class), and the daemon
        keeps serving meanwhile.

        @return: a Deferred that fires once this row, or a newer one of the
            same model, is in the file (or the store is closed first).
        """
        if self._pool is None:
            return defer.succeed(None)
        name = row["name"]
        self._rows[name] = tuple(row.get(c) for c in COLUMNS)
        self._dirty.add(name)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.setdefault(name, []).append(d)
        self._flush()
        return d

    def _flush(self) -> None:
        """
        Write every row not yet in the file, unless a write is under way or
        a retry is waiting for its time.
        """
        if self._inflight or self._pool is None or self._lock is None or not self._dirty:
            return
        if self._retry is not None and self._retry.active():
            return
        batch = {name: self._rows[name] for name in self._dirty}
        self._dirty.clear()
        everything = list(self._rows.values())
        self._inflight = set(batch)
        d: defer.Deferred[bool] = self._pool.runWithConnection(self._write, list(batch.values()), everything)
        d.addCallbacks(self._written, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _write(self, conn: Any, batch: list[tuple[Any, ...]], everything: list[tuple[Any, ...]]) -> bool:
        """
        In the pool's thread: write C{batch}, or C{everything} into a fresh
        file if the one the connection has open was deleted or replaced.

        @return: whether the file was re-created.
        """
        recreated = _fileIdentity(self.path) != self._connected
        if recreated:
            # Make the new file first: if that fails, the connection the
            # pool has stays usable (adbapi rolls it back).
            self._writeNow([])
            conn.reconnect()
            batch = everything
        conn.cursor().executemany(_UPSERT, batch)
        return recreated

    def _written(self, recreated: bool, batch: dict[str, tuple[Any, ...]]) -> None:
        self._inflight = set()
        if recreated:
            log.warn("the state database {path} was gone; made it again with every row", path=self.path)
        if self._failures:
            log.info(
                "the state database {path} takes writes again; {count} failed before",
                path=self.path,
                count=self._failures,
            )
        self._failures = 0
        self._delay = 0.0
        for name in batch:
            if name not in self._dirty:
                for d in self._waiters.pop(name, []):
                    d.callback(None)
        self._flush()

    def _failed(self, f: Failure, batch: dict[str, tuple[Any, ...]]) -> None:
        self._inflight = set()
        if self._pool is None:
            return
        self._dirty.update(batch)
        if not self._failures:
            log.error(
                "could not record the state of {names} in {path}: {why}; retrying until it lands",
                names=", ".join(sorted(batch)),
                path=self.path,
                why=f.getErrorMessage(),
            )
        self._failures += 1
        self._delay = min(self._delay * 2 or self.firstRetryDelay, self.maxRetryDelay)
        self._retry = self.reactor.callLater(self._delay, self._flush)

    def check(self) -> None:
        """
        Check that the lock file and the database are still the files this
        daemon opened: re-create and lock a missing lock file, re-create a
        missing database with every row (called every L{CHECK_INTERVAL}).
        """
        if self._lock is None:
            return
        if _fileIdentity(lockPath(self.path)) != _identity(os.fstat(self._lock)):
            self._relock()
        if self._lock is not None and self._connected is not None and _fileIdentity(self.path) != self._connected:
            self._dirty.update(self._rows)
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._flush()

    def _relock(self) -> None:
        assert self._lock is not None
        try:
            fd = _lockDatabase(self.path)
        except StateInUse as e:
            self._lost(f"lost the lock on the state database: {e}")
            return
        except OSError as e:
            if not self._lockTrouble:
                log.error(
                    "the lock file of the state database {path} is gone and cannot be made again: {why};"
                    " trying again every {interval}s",
                    path=self.path,
                    why=_cause(e),
                    interval=self.checkInterval,
                )
                self._lockTrouble = True
            return
        os.close(self._lock)
        self._lock = fd
        self._lockTrouble = False
        log.warn("the lock file of the state database {path} was gone; made and locked it again", path=self.path)

    def _lost(self, message: str) -> None:
        """
        Another process holds the lock now: stop writing, and stop.
        """
        log.critical("{message}; stopping", message=message)
        self._dirty.clear()
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self.onLost is not None:
            self.onLost(message)
        else:
            self.reactor.stop()

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
                " start_time = NULL, port = NULL, stop_command = NULL"
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
                self.saved[name].update(
                    status="unloaded", pid=None, pgid=None, start_time=None, port=None, stop_command=None
                )
        return defer.succeed(None)


def _noStopCommand(row: Mapping[str, Any]) -> defer.Deferred[Any] | None:
    return None


async def _stopLeftover(
    row: Mapping[str, Any],
    clock: Any,
    startTimeOf: Callable[[int], int | None],
    signal: Callable[[int, str], bool],
    killTime: float,
    stopCommand: Callable[[Mapping[str, Any]], defer.Deferred[Any] | None],
) -> bool:
    """
    Stop what one row of a previous run left (see L{reconcile}).

    @return: whether anything was stopped (its stop command run, or its
        process group signalled).
    """
    pid, pgid, started = row["pid"], row["pgid"], row["start_time"]
    stopped = False
    running = stopCommand(row)
    if running is not None:
        log.warn(
            "{name}: running its stop command for the server a previous run left on port {port}",
            name=row["name"],
            port=row["port"],
        )
        try:
            await running
        except Exception:
            log.failure("{name}: its stop command failed", name=row["name"])
        stopped = True
    if startTimeOf(pid) != started:
        log.info("{name}: recorded pid {pid} is not running any more", name=row["name"], pid=pid)
        return stopped
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
    return True


async def reconcile(
    store: IStateStore,
    names: list[str],
    clock: Any,
    startTimeOf: Callable[[int], int | None] = processStartTime,
    signal: Callable[[int, str], bool] = signalGroup,
    killTime: float = RECONCILE_KILL_TIME,
    stopCommand: Callable[[Mapping[str, Any]], defer.Deferred[Any] | None] = _noStopCommand,
) -> list[str]:
    """
    Stop every backend that a previous run recorded and that is still
    running, then mark every row unloaded.

    For a row recorded with a process, C{stopCommand} runs first what else
    stops its server: the model's C{stop.command} (a server in a container
    outlives the process dynllm started), whether or not that process is
    still there. Then a recorded pid counts as ours only if the process
    with that pid started at the recorded time: a pid the system has since
    given to another program is left alone. Ours get TERM to their process
    group, then KILL after C{killTime}, and this waits until they are gone.

    @param store: Where the previous run recorded its models.
    @param names: The models configured now.
    @param stopCommand: Given a row, runs the stop command recorded in
        it (C{stop_command}; for an older row, that of its model in the
        configuration now, with the row's port) and returns a Deferred
        that fires when it is done, or returns C{None} when there is none.
    @return: the names of the models whose leftover backends were stopped.
    """
    rows = [row for row in await store.rows() if row["pid"] is not None and row["start_time"] is not None]
    # Each leftover is stopped on its own, all at once: N containers whose
    # stop commands take 30 s each take 30 s, not N times that.
    done = await defer.gatherResults(
        [
            defer.ensureDeferred(_stopLeftover(row, clock, startTimeOf, signal, killTime, stopCommand))
            for row in rows
        ]
    )
    stopped = [row["name"] for row, didStop in zip(rows, done) if didStop]
    await store.reset(names)
    return stopped
