"""SQLite persistence on one worker thread (stdlib sqlite3; aiosqlite does not run under trio).

Every call runs through `trio.to_thread.run_sync` with a CapacityLimiter(1), so the connection is
used by one thread at a time. WAL mode. Frequent small writes (heartbeats, connection events)
are queued and committed in one transaction per flush; writes that must not be lost before we
act on them (an accepted snapshot) go through `write()`, which commits at once. Retention keeps
each history table bounded.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import trio

from .errors import P2PNodeError
from .logfmt import fmt

log = logging.getLogger("p2pnode.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY, issued_at_ns INTEGER NOT NULL, issued_at TEXT NOT NULL, issuer TEXT NOT NULL,
    members INTEGER NOT NULL, envelope BLOB NOT NULL, received_at TEXT NOT NULL, source TEXT);
CREATE INDEX IF NOT EXISTS snapshots_issued ON snapshots (issued_at_ns);
CREATE TABLE IF NOT EXISTS revocations (digest TEXT PRIMARY KEY, envelope BLOB NOT NULL, received_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (peer_id TEXT PRIMARY KEY, addrs TEXT NOT NULL, last_connected TEXT);
CREATE TABLE IF NOT EXISTS heartbeats (
    peer_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, last_at TEXT NOT NULL, state TEXT,
    received INTEGER NOT NULL DEFAULT 0, rejected INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS connections (
    id INTEGER PRIMARY KEY, peer_id TEXT NOT NULL, event TEXT NOT NULL, direction TEXT, remote_addr TEXT,
    at TEXT NOT NULL, reason TEXT);
CREATE TABLE IF NOT EXISTS state_transitions (
    id INTEGER PRIMARY KEY, at TEXT NOT NULL, from_state TEXT NOT NULL, to_state TEXT NOT NULL,
    online INTEGER NOT NULL, members INTEGER NOT NULL);
"""


class StoreError(P2PNodeError):
    pass


@attrs.frozen
class Retention:
    connections: int = 10_000
    state_transitions: int = 1_000
    snapshots: int = 100


class Store:
    def __init__(self, conn: sqlite3.Connection, path: Path, retention: Retention, flush_interval: float):
        self._conn = conn
        self.path = path
        self.retention = retention
        self.flush_interval = flush_interval
        self._limiter = trio.CapacityLimiter(1)
        self._pending: list[tuple[str, tuple]] = []
        self._wakeup = trio.Event()
        self._closed = False
        self._closing = False
        self.flushes = 0

    @classmethod
    async def open(cls, path: str | Path, *, retention: Retention = Retention(), flush_interval: float = 1.0) -> Store:
        path = Path(path)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=5000")
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise sqlite3.DatabaseError(result)
                conn.executescript(SCHEMA)
            except sqlite3.DatabaseError as exc:
                conn.close()
                raise StoreError(
                    f"database {path} is corrupt or not a SQLite file ({exc}); move it aside "
                    f"(mv {path} {path}.broken) and start again: the node refetches membership from its peers"
                ) from None
            return conn

        try:
            conn = await trio.to_thread.run_sync(connect)
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        return cls(conn, path, retention, flush_interval)

    async def _call(self, fn, *args):
        if self._closed:
            raise StoreError("store is closed")
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- writes ------------------------------------------------------------------------------------
    def queue(self, sql: str, params: tuple = ()) -> None:
        """A write committed with the next batch (within flush_interval)."""
        self._pending.append((sql, params))
        if len(self._pending) >= 500:
            self._wakeup.set()

    async def write(self, sql: str, params: tuple = ()) -> None:
        """A write committed before this returns (with everything queued before it)."""
        self._pending.append((sql, params))
        await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []

        def commit() -> None:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                for sql, params in batch:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._call(commit)
        self.flushes += 1
        if self.flushes % 50 == 1:
            await self._call(self._apply_retention)

    def _apply_retention(self) -> None:
        r = self.retention
        for table, keep in (("connections", r.connections), ("state_transitions", r.state_transitions), ("snapshots", r.snapshots)):
            self._conn.execute(f"DELETE FROM {table} WHERE id <= (SELECT MAX(id) FROM {table}) - ?", (keep,))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Flush queued writes every flush_interval until cancelled; then flush once more and close."""
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.flush_interval):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                await self.flush()
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    async def close(self) -> None:
        if self._closed or self._closing:
            return
        self._closing = True
        try:
            await self.flush()
        except sqlite3.Error as exc:
            log.error(fmt("store_flush_failed", error=str(exc)))
        self._closed = True
        await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)

    # -- reads -------------------------------------------------------------------------------------
    async def fetchall(self, sql: str, params: tuple = ()) -> list[tuple[Any, ...]]:
        return await self._call(lambda: self._conn.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: tuple = ()) -> tuple[Any, ...] | None:
        return await self._call(lambda: self._conn.execute(sql, params).fetchone())

    async def get_meta(self, key: str) -> str | None:
        row = await self.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return row[0] if row else None

    def queue_meta(self, key: str, value: str) -> None:
        self.queue("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
