"""The deploy journal: every accepted deploy, its latest state, its report history and log tail.

A repository in the project's persistence convention: `MIGRATIONS` for its own database file
(`deploy.db`, opened with `p2pnode.platform.db.Database`, e.g. through the service context's
`databases.open("deploy.db", MIGRATIONS)`) and `Journal(db)`, whose methods run their SQL on the
database's worker. Every change is a durable `write()` (committed before it returns): a status
change is on disk before it is reported. `Journal.open` sets `synchronous=FULL` on top of WAL, so
a commit also survives a power cut, not only a killed process.

Besides what operators read (status, progress, stage, message, reports, log), each row keeps the
executor's recovery checkpoint: `phase` (queued, prepare, live, health, rolling_back, done), the
release that was current when the deploy started, the release it installs or returns to, and the
process group of the step running now, so a node killed mid-deploy can finish or roll back on restart.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import attrs

from .. import codec
from ..platform.db import Database, Migration
from .errors import DeployError, QueueFull
from .report import DeployReport
from .spec import DeployCommand

# phases (recovery checkpoints)
QUEUED = "queued"  # accepted, not started
PREPARE = "prepare"  # working on the new release only: nothing running was touched
LIVE = "live"  # a script, stop, switch or start may have changed what runs
HEALTH = "health"  # the new release is current and started; checking it
ROLLING_BACK = "rolling_back"
DONE = "done"


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
""", "deploy journal"), Migration(2, """
CREATE TABLE seen (
    deploy_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    valid_until_ns INTEGER NOT NULL);
""", "deploy IDs of accepted signed commands (replay protection)")]


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


def _get(conn: sqlite3.Connection, deploy_id: str) -> Entry | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM deploys WHERE deploy_id = ?", (deploy_id,)).fetchone()
    return None if row is None else _entry(row)


def _reports(rows: Any) -> list[DeployReport]:
    return [DeployReport.from_dict(codec.decode_map(r[0], "deploy report")) for r in rows]


def read_entry(path: str | Path, deploy_id: str) -> Entry | None:
    """One deploy's journal entry straight from the file (for tools and tests; read-only)."""
    if not Path(path).exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return _get(conn, deploy_id)
    finally:
        conn.close()


class Journal:
    """The deploy journal repository over its database."""

    def __init__(self, db: Database, keep_finished: int = 1000):
        self.db = db
        self.keep_finished = keep_finished
        db.after_flush(self._prune)

    @classmethod
    async def open(cls, path: str | Path, keep_finished: int = 1000) -> Journal:
        db = await Database.open(path, MIGRATIONS)
        await db.read(lambda conn: conn.execute("PRAGMA synchronous=FULL"))
        return cls(db, keep_finished)

    async def close(self) -> None:
        await self.db.close()

    # ---- replay protection: deploy IDs of signed commands this node accepted ----------------------

    async def seen(self, now_ns: int) -> dict[str, tuple[str, int]]:
        """deploy_id -> (command digest, valid_until) of every remembered command; expired ones
        (refused by their validity window anyway) are forgotten."""
        def load(conn: sqlite3.Connection) -> dict[str, tuple[str, int]]:
            conn.execute("DELETE FROM seen WHERE valid_until_ns < ?", (now_ns,))
            return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT deploy_id, digest, valid_until_ns FROM seen")}
        return await self.db.write(load)

    def remember(self, deploy_id: str, digest: str, valid_until_ns: int) -> None:
        """Queued (batched) write: the bus has stored the command durably already."""
        self.db.queue("INSERT OR IGNORE INTO seen (deploy_id, digest, valid_until_ns) VALUES (?, ?, ?)",
                      (deploy_id, digest, valid_until_ns))

    async def accept(self, command: DeployCommand, report: DeployReport, max_pending: int) -> None:
        """Journal a new deploy as `pending`; refuses a deploy ID seen before and a full queue."""
        def accept(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM deploys WHERE deploy_id = ?", (command.deploy_id,)).fetchone():
                raise DeployError(f"deploy {command.deploy_id} was already accepted on this node")
            pending = conn.execute("SELECT COUNT(*) FROM deploys WHERE app = ? AND final = 0", (command.app.key,)).fetchone()[0]
            if pending >= max_pending:
                raise QueueFull(f"{pending} deploys of {command.app.key} are already queued or running on this node "
                                f"(limit {max_pending}); wait for them to finish")
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM deploys").fetchone()[0]
            encoded = codec.encode(report.to_dict())
            conn.execute(f"INSERT INTO deploys (deploy_id, app, seq, {_COLUMNS}, final, accepted_at_ns, updated_at_ns) "
                         "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, NULL, x'', 0, ?, ?)",
                         (command.deploy_id, command.app.key, seq, command.to_bytes(), encoded, QUEUED, command.version,
                          report.at_ns, report.at_ns))
            conn.execute("INSERT INTO reports (deploy_id, seq, report) VALUES (?, ?, ?)", (command.deploy_id, report.seq, encoded))

        await self.db.write(accept)

    async def record(self, report: DeployReport, phase: str, log: bytes, prev_version: str | None, target_version: str | None) -> None:
        encoded = codec.encode(report.to_dict())

        def record(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE deploys SET report = ?, phase = ?, log = ?, final = ?, prev_version = ?, target_version = ?, "
                         "updated_at_ns = ? WHERE deploy_id = ?",
                         (encoded, phase, log, int(report.final), prev_version, target_version, report.at_ns, report.deploy_id))
            conn.execute("INSERT OR REPLACE INTO reports (deploy_id, seq, report) VALUES (?, ?, ?)",
                         (report.deploy_id, report.seq, encoded))

        await self.db.write(record)

    async def set_pgid(self, deploy_id: str, pgid: int | None) -> None:
        await self.db.write(lambda conn: conn.execute("UPDATE deploys SET pgid = ? WHERE deploy_id = ?", (pgid, deploy_id)))

    async def get(self, deploy_id: str) -> Entry | None:
        return await self.db.read(lambda conn: _get(conn, deploy_id))

    async def next_for(self, app: str) -> Entry | None:
        """The application's oldest unfinished deploy: the one its worker runs (or recovers) next."""
        def first(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM deploys WHERE app = ? AND final = 0 ORDER BY seq LIMIT 1", (app,)).fetchone()
            return None if row is None else _entry(row)
        return await self.db.read(first)

    async def unfinished_apps(self) -> list[str]:
        return await self.db.read(lambda conn: [r[0] for r in conn.execute(
            "SELECT app FROM deploys WHERE final = 0 GROUP BY app ORDER BY MIN(seq)")])

    async def unfinished(self) -> list[DeployReport]:
        return await self.db.read(lambda conn: _reports(conn.execute("SELECT report FROM deploys WHERE final = 0 ORDER BY seq")))

    async def latest(self, app: str | None = None, limit: int = 100) -> list[DeployReport]:
        """Newest first: each deploy's latest report, optionally of one application."""
        return await self.db.read(lambda conn: _reports(conn.execute(
            "SELECT report FROM deploys WHERE (? IS NULL OR app = ?) ORDER BY seq DESC LIMIT ?", (app, app, limit))))

    async def reports(self, deploy_id: str) -> list[DeployReport]:
        """Every status report of one deploy, in order."""
        return await self.db.read(lambda conn: _reports(conn.execute(
            "SELECT report FROM reports WHERE deploy_id = ? ORDER BY seq", (deploy_id,))))

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Keep the newest `keep_finished` finished deploys (runs in every 50th commit)."""
        old = [r[0] for r in conn.execute("SELECT deploy_id FROM deploys WHERE final = 1 ORDER BY seq DESC LIMIT -1 OFFSET ?",
                                          (self.keep_finished,))]
        for deploy_id in old:
            conn.execute("DELETE FROM reports WHERE deploy_id = ?", (deploy_id,))
            conn.execute("DELETE FROM deploys WHERE deploy_id = ?", (deploy_id,))
