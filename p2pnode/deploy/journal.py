"""The deploy journal: every accepted deploy, its latest state, its report history and log tail.

A repository in the project's persistence convention: `MIGRATIONS` (applied in order, versioned by
`PRAGMA user_version`) and `JournalRepo`, whose methods are plain functions of a `sqlite3.Connection`
(testable directly, and ready to wrap in `p2pnode.platform.db` when that lands). `Journal` runs them
on one worker thread (`trio.to_thread.run_sync`, CapacityLimiter(1)) over a WAL database with
`synchronous=FULL`: a status change is on disk before it is reported.

Besides what operators read (status, progress, stage, message, reports, log), each row keeps the
executor's recovery checkpoint: `phase` (queued, prepare, live, health, rolling_back), the release
that was current when the deploy started, the release it installs or returns to, and the process
group of the step running now, so a node killed mid-deploy can finish or roll back on restart.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from .. import codec
from .errors import DeployError, QueueFull
from .report import DeployReport
from .spec import DeployCommand

T = TypeVar("T")

# phases (recovery checkpoints)
QUEUED = "queued"  # accepted, not started
PREPARE = "prepare"  # working on the new release only: nothing running was touched
LIVE = "live"  # a script, stop, switch or start may have changed what runs
HEALTH = "health"  # the new release is current and started; checking it
ROLLING_BACK = "rolling_back"
DONE = "done"


@attrs.frozen
class Migration:
    version: int
    sql: str


MIGRATIONS: list[Migration] = [Migration(1, """
CREATE TABLE deploys (
    deploy_id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    seq INTEGER NOT NULL,
    command BLOB NOT NULL,
    phase TEXT NOT NULL,
    prev_version TEXT,
    target_version TEXT,
    pgid INTEGER,
    report BLOB NOT NULL,
    final INTEGER NOT NULL DEFAULT 0,
    log BLOB NOT NULL DEFAULT x'',
    accepted_at_ns INTEGER NOT NULL,
    updated_at_ns INTEGER NOT NULL);
CREATE INDEX deploys_app ON deploys (app, final, seq);
CREATE INDEX deploys_final ON deploys (final, seq);
CREATE TABLE reports (
    deploy_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    report BLOB NOT NULL,
    PRIMARY KEY (deploy_id, seq));
""")]


def migrate(conn: sqlite3.Connection, migrations: list[Migration] = MIGRATIONS) -> None:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    for m in migrations:
        if m.version > current:
            with conn:
                conn.execute("BEGIN")
                for statement in m.sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {int(m.version)}")


@attrs.frozen
class Entry:
    command: DeployCommand
    report: DeployReport
    phase: str
    prev_version: str | None
    target_version: str | None
    pgid: int | None
    log: bytes

    @property
    def deploy_id(self) -> str:
        return self.command.deploy_id


_COLUMNS = "command, report, phase, prev_version, target_version, pgid, log"


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(DeployCommand.from_bytes(row[0]), DeployReport.from_dict(codec.decode_map(row[1], "deploy report")),
                 row[2], row[3], row[4], row[5], bytes(row[6]))


class JournalRepo:
    """The journal's SQL; every method takes the connection it runs on."""

    @staticmethod
    def accept(conn: sqlite3.Connection, command: DeployCommand, report: DeployReport, max_pending: int) -> None:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("SELECT 1 FROM deploys WHERE deploy_id = ?", (command.deploy_id,)).fetchone():
                raise DeployError(f"deploy {command.deploy_id} was already accepted on this node")
            pending = conn.execute("SELECT COUNT(*) FROM deploys WHERE app = ? AND final = 0", (command.app.key,)).fetchone()[0]
            if pending >= max_pending:
                raise QueueFull(f"{pending} deploys of {command.app.key} are already queued or running on this node "
                                f"(limit {max_pending}); wait for them to finish")
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM deploys").fetchone()[0]
            conn.execute(f"INSERT INTO deploys (deploy_id, app, seq, {_COLUMNS}, final, accepted_at_ns, updated_at_ns) "
                         "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, NULL, x'', 0, ?, ?)",
                         (command.deploy_id, command.app.key, seq, command.to_bytes(), codec.encode(report.to_dict()), QUEUED,
                          command.version, report.at_ns, report.at_ns))
            conn.execute("INSERT INTO reports (deploy_id, seq, report) VALUES (?, ?, ?)",
                         (command.deploy_id, report.seq, codec.encode(report.to_dict())))

    @staticmethod
    def record(conn: sqlite3.Connection, report: DeployReport, phase: str, log: bytes,
               prev_version: str | None, target_version: str | None) -> None:
        encoded = codec.encode(report.to_dict())
        with conn:
            conn.execute("BEGIN")
            conn.execute("UPDATE deploys SET report = ?, phase = ?, log = ?, final = ?, prev_version = ?, target_version = ?, "
                         "updated_at_ns = ? WHERE deploy_id = ?",
                         (encoded, phase, log, int(report.final), prev_version, target_version, report.at_ns, report.deploy_id))
            conn.execute("INSERT OR REPLACE INTO reports (deploy_id, seq, report) VALUES (?, ?, ?)", (report.deploy_id, report.seq, encoded))

    @staticmethod
    def set_pgid(conn: sqlite3.Connection, deploy_id: str, pgid: int | None) -> None:
        with conn:
            conn.execute("UPDATE deploys SET pgid = ? WHERE deploy_id = ?", (pgid, deploy_id))

    @staticmethod
    def get(conn: sqlite3.Connection, deploy_id: str) -> Entry | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM deploys WHERE deploy_id = ?", (deploy_id,)).fetchone()
        return None if row is None else _entry(row)

    @staticmethod
    def next_for(conn: sqlite3.Connection, app: str) -> Entry | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM deploys WHERE app = ? AND final = 0 ORDER BY seq LIMIT 1", (app,)).fetchone()
        return None if row is None else _entry(row)

    @staticmethod
    def unfinished_apps(conn: sqlite3.Connection) -> list[str]:
        return [r[0] for r in conn.execute("SELECT app FROM deploys WHERE final = 0 GROUP BY app ORDER BY MIN(seq)")]

    @staticmethod
    def unfinished(conn: sqlite3.Connection) -> list[DeployReport]:
        rows = conn.execute("SELECT report FROM deploys WHERE final = 0 ORDER BY seq")
        return [DeployReport.from_dict(codec.decode_map(r[0], "deploy report")) for r in rows]

    @staticmethod
    def latest(conn: sqlite3.Connection, app: str | None, limit: int) -> list[DeployReport]:
        rows = conn.execute("SELECT report FROM deploys WHERE (? IS NULL OR app = ?) ORDER BY seq DESC LIMIT ?", (app, app, limit))
        return [DeployReport.from_dict(codec.decode_map(r[0], "deploy report")) for r in rows]

    @staticmethod
    def reports(conn: sqlite3.Connection, deploy_id: str) -> list[DeployReport]:
        rows = conn.execute("SELECT report FROM reports WHERE deploy_id = ? ORDER BY seq", (deploy_id,))
        return [DeployReport.from_dict(codec.decode_map(r[0], "deploy report")) for r in rows]

    @staticmethod
    def prune(conn: sqlite3.Connection, keep_finished: int) -> int:
        with conn:
            conn.execute("BEGIN")
            old = [r[0] for r in conn.execute("SELECT deploy_id FROM deploys WHERE final = 1 ORDER BY seq DESC LIMIT -1 OFFSET ?",
                                              (keep_finished,))]
            for deploy_id in old:
                conn.execute("DELETE FROM reports WHERE deploy_id = ?", (deploy_id,))
                conn.execute("DELETE FROM deploys WHERE deploy_id = ?", (deploy_id,))
        return len(old)


def connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    migrate(conn)
    return conn


class Journal:
    """The repository on its own worker thread (until `p2pnode.platform.db` provides that)."""

    def __init__(self, conn: sqlite3.Connection, keep_finished: int = 1000):
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)
        self.keep_finished = keep_finished

    @classmethod
    async def open(cls, path: str | Path, keep_finished: int = 1000) -> Journal:
        conn = await trio.to_thread.run_sync(connect, path)
        return cls(conn, keep_finished)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, self._conn, *args, limiter=self._limiter)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)

    async def accept(self, command: DeployCommand, report: DeployReport, max_pending: int) -> None:
        await self._call(JournalRepo.accept, command, report, max_pending)

    async def record(self, report: DeployReport, phase: str, log: bytes, prev_version: str | None, target_version: str | None) -> None:
        await self._call(JournalRepo.record, report, phase, log, prev_version, target_version)
        if report.final:
            await self._call(JournalRepo.prune, self.keep_finished)

    async def set_pgid(self, deploy_id: str, pgid: int | None) -> None:
        await self._call(JournalRepo.set_pgid, deploy_id, pgid)

    async def get(self, deploy_id: str) -> Entry | None:
        return await self._call(JournalRepo.get, deploy_id)

    async def next_for(self, app: str) -> Entry | None:
        return await self._call(JournalRepo.next_for, app)

    async def unfinished_apps(self) -> list[str]:
        return await self._call(JournalRepo.unfinished_apps)

    async def unfinished(self) -> list[DeployReport]:
        return await self._call(JournalRepo.unfinished)

    async def latest(self, app: str | None = None, limit: int = 100) -> list[DeployReport]:
        return await self._call(JournalRepo.latest, app, limit)

    async def reports(self, deploy_id: str) -> list[DeployReport]:
        return await self._call(JournalRepo.reports, deploy_id)
