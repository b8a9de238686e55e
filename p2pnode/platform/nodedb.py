"""node.db's schema history: the ordered migrations, applied by `Database.open`.

Tables and their owners (the repositories that hold their SQL):
    meta               key/value (MetaStore, below)
    documents          signed documents of every type (platform.docstore: DocumentStore)
    peers              addresses of members and bootstrap peers (cluster.connectivity: PeerAddressStore)
    heartbeats         last accepted heartbeat per member (cluster.heartbeat: HeartbeatStore)
    state_transitions  health state history (cluster.health: StateHistory)

A migration is never edited once released; a change is a new one at the end.
"""

from __future__ import annotations

import hashlib
import sqlite3

from .db import Database, Migration

# What p2pnode 0.1 created without a version (user_version 0). IF NOT EXISTS: on such a database
# this migration only stamps version 1.
V1_INITIAL = """
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


def _v2_documents(conn: sqlite3.Connection) -> None:
    """One table for every signed document type (the document bus); snapshots and revocations move
    into it. The `connections` table was never read: dropped."""
    conn.execute(
        "CREATE TABLE documents (type TEXT NOT NULL, key TEXT NOT NULL, digest TEXT NOT NULL, "
        "issued_at_ns INTEGER NOT NULL, envelope BLOB NOT NULL, received_at TEXT NOT NULL, source TEXT, "
        "PRIMARY KEY (type, digest))"
    )
    conn.execute("CREATE INDEX documents_key ON documents (type, key, issued_at_ns)")
    for issued, blob, received, source in conn.execute(
        "SELECT issued_at_ns, envelope, received_at, source FROM snapshots"
    ).fetchall():
        if isinstance(blob, bytes) and isinstance(issued, int):
            conn.execute(
                "INSERT OR IGNORE INTO documents VALUES ('membership-snapshot', '', ?, ?, ?, ?, ?)",
                (hashlib.sha256(blob).hexdigest(), issued, blob, str(received), source),
            )
    for blob, received in conn.execute("SELECT envelope, received_at FROM revocations").fetchall():
        if isinstance(blob, bytes):
            real = hashlib.sha256(blob).hexdigest()
            conn.execute(
                "INSERT OR IGNORE INTO documents VALUES ('revocation', ?, ?, 0, ?, ?, NULL)",
                (real, real, blob, str(received)),
            )
    conn.execute("DROP TABLE snapshots")
    conn.execute("DROP TABLE revocations")
    conn.execute("DROP TABLE connections")


MIGRATIONS = [
    Migration(1, V1_INITIAL, "p2pnode 0.1 tables"),
    Migration(2, _v2_documents, "signed documents in one table (the document bus); drop connections"),
]


class MetaStore:
    """Small named values of the node (e.g. the heartbeat sequence number)."""

    def __init__(self, db: Database):
        self.db = db

    async def get(self, key: str) -> str | None:
        row = await self.db.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return row[0] if row and isinstance(row[0], str) else None

    def queue_set(self, key: str, value: str) -> None:
        self.db.queue("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
