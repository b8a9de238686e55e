"""A SQLite database on its own worker thread, with migrations by `PRAGMA user_version`.

Interim: the brief's persistence convention (`Database`, `Migration`, `read(fn)`, `write(fn)`) is
being built in `p2pnode.platform.db`; this is the same surface, so sync's repositories move to
it by changing an import. Every call runs `fn(conn)` through `trio.to_thread.run_sync` with a
CapacityLimiter(1), so the connection is only ever used by one thread at a time. WAL mode;
`write` runs `fn` in a transaction committed before it returns.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from ..errors import P2PNodeError

T = TypeVar("T")


class DatabaseError(P2PNodeError):
    pass


@attrs.frozen
class Migration:
    version: int
    sql: str


def connect(path: str | Path, migrations: Sequence[Migration], *, cache_kib: int = 8192) -> sqlite3.Connection:
    """Open (creating if needed) and migrate; synchronous, for the worker thread or a subprocess."""
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for m in sorted(migrations, key=lambda m: m.version):
            if m.version <= version:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(m.sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={int(m.version)}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise DatabaseError(f"database {path}: {exc}; if it is corrupt, move it aside (mv {path} {path}.broken) and restart") from None
    return conn


def _statements(sql: str) -> list[str]:
    out, cur = [], ""
    for line in sql.splitlines(keepends=True):
        cur += line
        if sqlite3.complete_statement(cur):
            out.append(cur.strip())
            cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return result


class Database:
    def __init__(self, conn: sqlite3.Connection, path: Path):
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: str | Path, migrations: Sequence[Migration]) -> Database:
        path = Path(path)
        conn = await trio.to_thread.run_sync(lambda: connect(path, migrations))
        return cls(conn, path)

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DatabaseError(f"database {self.path} is closed")
        return self._conn

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._live()
        return await trio.to_thread.run_sync(lambda: fn(conn), limiter=self._limiter)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._live()
        return await trio.to_thread.run_sync(lambda: transaction(conn, fn), limiter=self._limiter)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
