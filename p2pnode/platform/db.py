"""One SQLite database file on its own worker: migrations, batched writes, and failures that never
take the node down.

stdlib `sqlite3` (aiosqlite does not run under trio): every call runs through
`trio.to_thread.run_sync` with this database's own CapacityLimiter(1), so each database has one
worker at a time and a write-heavy database (the sync index) never queues behind node.db.

Writes come in two kinds. `queue()` batches frequent small writes (heartbeats, state history) into
one transaction per flush. `write()` commits before it returns, for state the node must not act on
before it is durable (an accepted document): the caller updates memory only after it returns.

Schema versions: `PRAGMA user_version` is the number of migrations applied; each migration runs in
its own transaction together with the version bump. A file from a newer p2pnode is refused.

When the disk fills or turns read-only while running, a flush keeps its batch, the database reports a
`problem` (shown in status), logs once per kind of failure, and retries with a backoff; the queue is
bounded (oldest queued writes are dropped and counted). At open, corrupt, full, read-only and
permission failures are told apart, each with the advice that fits. Files are 0600 whatever the umask.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from ..errors import P2PNodeError
from ..logfmt import fmt

log = logging.getLogger("p2pnode.store")

T = TypeVar("T")
MAX_QUEUED = 20_000  # queued (non-durable) writes held while the disk refuses them
RETRY_BASE = 1.0
RETRY_CAP = 30.0


class StoreError(P2PNodeError):
    """The database cannot be used; the message says why and what to do."""


@attrs.frozen
class Migration:
    version: int
    sql: str | Callable[[sqlite3.Connection], None]
    description: str = ""


def classify(exc: BaseException, path: Path) -> tuple[str, str]:
    """(kind, advice) for an sqlite3/OS error on `path`: corrupt, full, readonly, permission or other."""
    text = str(exc).lower()
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "disk is full" in text or code == 13:
        return "full", f"the filesystem holding {path.parent} is full; free space (df -h {path.parent}) and the node retries"
    if "readonly" in text or "read-only" in text or isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return "readonly", f"{path} cannot be written (read-only file or filesystem); remount read-write or fix the file mode"
    if isinstance(exc, PermissionError) or "unable to open" in text or "permission" in text:
        return "permission", (
            f"the node's user (uid {os.getuid()}) cannot read and write {path} and its directory; "
            f"fix ownership (chown) or mode (chmod 700 {path.parent})"
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return "corrupt", (
            f"database {path} is corrupt or not a SQLite file ({exc}); move it aside "
            f"(mv {path} {path}.broken) and start again: the node refetches membership from its peers"
        )
    return "other", f"database {path}: {exc}"


def _create_private(path: Path) -> None:
    """Create the file 0600 before SQLite does, so no umask can widen it; SQLite gives its -wal and
    -shm files the main file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> int:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    newest = migrations[-1].version if migrations else 0
    if current > newest:
        raise StoreError(
            f"database {path} has schema version {current}, newer than this p2pnode knows ({newest}); "
            "run the newer p2pnode, or move the file aside to start fresh"
        )
    for m in migrations:
        if m.version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if isinstance(m.sql, str):
                for statement in _statements(m.sql):
                    conn.execute(statement)
            else:
                m.sql(conn)
            conn.execute(f"PRAGMA user_version = {int(m.version)}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info(fmt("schema_migrated", db=path.name, version=m.version, what=m.description or None))
    return newest


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (executescript would commit our transaction)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


class Database:
    def __init__(self, conn: sqlite3.Connection, path: Path, flush_interval: float):
        self._conn = conn
        self.path = path
        self.flush_interval = flush_interval
        self._limiter = trio.CapacityLimiter(1)
        self._pending: list[Callable[[sqlite3.Connection], object]] = []
        self._wakeup = trio.Event()
        self._closed = False
        self._closing = False
        self.flushes = 0
        self.dropped = 0
        self.problem: str | None = None  # what is wrong right now, for status; None when healthy
        self._problem_kind: str | None = None
        self._retry_delay = 0.0
        self._after_flush: list[Callable[[sqlite3.Connection], None]] = []

    @classmethod
    async def open(cls, path: str | Path, migrations: Sequence[Migration], *, flush_interval: float = 1.0) -> Database:
        path = Path(path)

        def connect() -> sqlite3.Connection:
            _create_private(path)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed: {result}")
                _migrate(conn, path, migrations)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await trio.to_thread.run_sync(connect)
        except StoreError:
            raise
        except (sqlite3.Error, OSError) as exc:
            kind, advice = classify(exc, path)
            raise StoreError(advice if kind != "other" else f"cannot open database {path}: {exc}") from None
        return cls(conn, path, flush_interval)

    @property
    def closed(self) -> bool:
        return self._closed

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreError(f"database {self.path.name} is closed")
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    # -- reads -------------------------------------------------------------------------------
    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) on this database's worker and return its result."""
        conn = self._conn
        return await self._call(lambda: fn(conn))

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return await self.read(lambda c: c.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self.read(lambda c: c.execute(sql, params).fetchone())
        return row

    # -- writes ------------------------------------------------------------------------------
    def queue(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """A write committed with the next batch (within flush_interval). While the disk refuses
        writes the queue is bounded: the oldest queued writes are dropped and counted."""
        self.queue_fn(lambda conn: conn.execute(sql, params))

    def queue_fn(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """Like queue, for a write that is more than one statement."""
        self._pending.append(fn)
        if len(self._pending) > MAX_QUEUED:
            excess = len(self._pending) - MAX_QUEUED
            del self._pending[:excess]
            self.dropped += excess
        if len(self._pending) >= 500:
            self._wakeup.set()

    def after_flush(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        """Housekeeping (retention) run in the transaction of every 50th flush."""
        self._after_flush.append(fn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) in one transaction with everything queued before it; committed when this
        returns. Raises StoreError (the caller must not act as if it were stored)."""
        batch, self._pending = self._pending, []
        try:
            return await self._commit(batch, fn)
        except StoreError:
            self._pending[:0] = batch  # the queued writes wait for the next flush
            raise

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """One durable statement (see write)."""
        await self.write(lambda c: c.execute(sql, params))

    async def flush(self) -> None:
        """Commit queued writes now. Raises StoreError and keeps the batch when the disk refuses."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await self._commit(batch, None)
        except StoreError:
            self._pending[:0] = batch
            raise

    async def _commit(self, batch: list[Callable[[sqlite3.Connection], object]], fn: Callable[[sqlite3.Connection], T] | None) -> T:
        housekeeping = self._after_flush if (self.flushes % 50 == 0) else []

        def commit() -> Any:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                for job in batch:
                    job(conn)
                result = fn(conn) if fn is not None else None
                for chore in housekeeping:
                    chore(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                    conn.execute("ROLLBACK")
                raise

        try:
            result: T = await self._call(commit)
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
                raise  # a bug in our SQL, not the disk: fail loudly
            self._set_problem(exc)
            raise StoreError(self.problem or str(exc)) from None
        self.flushes += 1
        self._clear_problem()
        return result

    def _set_problem(self, exc: BaseException) -> None:
        kind, advice = classify(exc, self.path)
        if kind != self._problem_kind:
            log.error(fmt("store_write_failed", db=self.path.name, kind=kind, error=str(exc), advice=advice))
        self._problem_kind = kind
        self.problem = f"{kind}: {advice}"
        self._retry_delay = min(RETRY_CAP, max(RETRY_BASE, self._retry_delay * 2))

    def _clear_problem(self) -> None:
        if self._problem_kind is not None:
            log.warning(fmt("store_recovered", db=self.path.name, was=self._problem_kind, dropped=self.dropped or None))
        self._problem_kind = None
        self.problem = None
        self._retry_delay = 0.0

    def status(self) -> dict[str, Any]:
        return {"problem": self.problem, "queued": len(self._pending), "dropped": self.dropped}

    # -- lifetime ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush queued writes every flush_interval (backing off while the disk refuses) until
        cancelled; then flush once more and close."""
        task_status.started()
        try:
            while True:
                with trio.move_on_after(max(self.flush_interval, self._retry_delay)):
                    if self._retry_delay:
                        await trio.sleep_forever()
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                try:
                    await self.flush()
                except StoreError:
                    pass  # recorded in self.problem, logged once per kind; retried after the backoff
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    async def close(self) -> None:
        if self._closed or self._closing:
            return
        self._closing = True
        try:
            await self.flush()
        except StoreError as exc:
            log.error(fmt("store_flush_failed", db=self.path.name, lost=len(self._pending), error=str(exc)))
        self._closed = True
        await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)
