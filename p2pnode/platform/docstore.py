"""The `documents` table of node.db: every signed document the bus accepted, as received.

One row per envelope: its type, its ordering key (LWW key, or the digest for append-only types),
`issued_at`, the SHA-256 digest of its canonical bytes, the envelope itself, when and from whom it
arrived. The bus re-verifies every row at start, so a row is only ever a candidate.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import attrs

from .. import timefmt
from .db import Database


@attrs.frozen
class StoredDocument:
    type: str
    key: str
    digest: str
    issued_at_ns: int
    envelope: bytes
    source: str | None


class DocumentStore:
    def __init__(self, db: Database):
        self.db = db

    async def load(self, type_: str) -> list[StoredDocument]:
        """Every stored document of a type, per key newest first (ties: lower digest first).
        Rows whose columns have the wrong types are skipped (counted by the caller as invalid)."""

        def query(conn: sqlite3.Connection) -> list[StoredDocument]:
            rows = conn.execute(
                "SELECT key, digest, issued_at_ns, envelope, source FROM documents WHERE type = ? "
                "ORDER BY key, issued_at_ns DESC, digest",
                (type_,),
            ).fetchall()
            return list(_typed(type_, rows))

        return await self.db.read(query)

    async def envelopes(self, type_: str, digests: list[str]) -> dict[str, bytes]:
        def query(conn: sqlite3.Connection) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            for i in range(0, len(digests), 500):
                chunk = digests[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for digest, blob in conn.execute(
                    f"SELECT digest, envelope FROM documents WHERE type = ? AND digest IN ({marks})", (type_, *chunk)
                ):
                    if isinstance(blob, bytes):
                        out[digest] = blob
            return out

        return await self.db.read(query)

    async def put(self, doc: StoredDocument, keep: int | None) -> None:
        """Store durably; keep at most `keep` versions of this key (None: keep all)."""

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO documents (type, key, digest, issued_at_ns, envelope, received_at, source) "
                "VALUES (?,?,?,?,?,?,?)",
                (doc.type, doc.key, doc.digest, doc.issued_at_ns, doc.envelope, timefmt.now(), doc.source),
            )
            if keep is not None:
                conn.execute(
                    "DELETE FROM documents WHERE type = ? AND key = ? AND digest NOT IN "
                    "(SELECT digest FROM documents WHERE type = ? AND key = ? ORDER BY issued_at_ns DESC, digest LIMIT ?)",
                    (doc.type, doc.key, doc.type, doc.key, keep),
                )

        await self.db.write(insert)


def _typed(type_: str, rows: list[tuple[object, ...]]) -> Iterator[StoredDocument]:
    for key, digest, issued, blob, source in rows:
        if isinstance(key, str) and isinstance(digest, str) and isinstance(issued, int) and isinstance(blob, bytes):
            yield StoredDocument(type_, key, digest, issued, blob, source if isinstance(source, str) else None)
        else:
            yield StoredDocument(type_, str(key), str(digest), -1, b"", None)  # the bus counts it as invalid
