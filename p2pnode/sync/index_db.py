"""The sync database (`sync.db`): every table sync keeps, and the SQL over them.

Tables (folder ids are mapped to small integers in `folders`, which also records each folder's
root directory on this node):
- `source_index`, `files`: this node's own index of the folders it is the source of: the latest
  state of every name with its seq, blocks, and the stat signature (size, mtime, ctime, inode)
  a rescan compares to skip unchanged files. Deleted files stay as tombstones with their seq.
- `chunks`: signed index chunks per folder and index_id, opaque bytes with (prev_seq, seq], so
  any node can serve "the chunks after seq S" of a folder it relays.
- `desired_index`, `desired`: a receiver's copy of the source's entries, and the index_id/seq it
  holds (a new index_id wipes it).
- `applied`: what a receiver last wrote for each name (the version and the stat it had right
  after), so a local edit shows up as a stat that no longer matches.
- `holdings`, `block_locs`: the block lookup by hash over every complete file this node holds
  (source files, applied files, and later deploy artifacts under a pseudo-folder): hash ->
  (folder, name, offset, size). Used to serve blocks and to copy blocks locally instead of
  fetching them.
- `partials`: the temporary file of an interrupted download and which of its blocks are written.

The repository's methods take the `sqlite3.Connection` first and run on the database's worker
thread (`Database.read/write`); nothing here holds the index in Python objects.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import attrs

from .blocks import HASH_LEN, StatSig, block_span
from ..platform.db import Migration
from .model import DIR, FILE, SYMLINK, FileEntry, IndexChunk, build_chunks
from .names import parent

TYPES = (FILE, DIR, SYMLINK)
TYPE_CODE = {t: i for i, t in enumerate(TYPES)}

MIGRATIONS: list[Migration] = [
    Migration(
        1,
        """
CREATE TABLE folders (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, root TEXT);
CREATE TABLE source_index (folder INTEGER PRIMARY KEY, index_id INTEGER NOT NULL, max_seq INTEGER NOT NULL);
CREATE TABLE files (
    id INTEGER PRIMARY KEY, folder INTEGER NOT NULL, name TEXT NOT NULL, parent TEXT NOT NULL,
    type INTEGER NOT NULL, seq INTEGER NOT NULL, deleted INTEGER NOT NULL, size INTEGER NOT NULL,
    mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    block_size INTEGER NOT NULL, blocks BLOB NOT NULL, target TEXT NOT NULL, disk_name TEXT,
    ino INTEGER NOT NULL, ctime_ns INTEGER NOT NULL);
CREATE UNIQUE INDEX files_name ON files (folder, name);
CREATE INDEX files_parent ON files (folder, parent);
CREATE UNIQUE INDEX files_seq ON files (folder, seq);
CREATE TABLE chunks (
    folder INTEGER NOT NULL, index_id INTEGER NOT NULL, seq INTEGER NOT NULL, prev_seq INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (folder, index_id, seq));
CREATE TABLE desired_index (folder INTEGER PRIMARY KEY, index_id INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE desired (
    id INTEGER PRIMARY KEY, folder INTEGER NOT NULL, name TEXT NOT NULL,
    type INTEGER NOT NULL, seq INTEGER NOT NULL, deleted INTEGER NOT NULL, size INTEGER NOT NULL,
    mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    block_size INTEGER NOT NULL, blocks BLOB NOT NULL, target TEXT NOT NULL);
CREATE UNIQUE INDEX desired_name ON desired (folder, name);
CREATE TABLE applied (
    folder INTEGER NOT NULL, name TEXT NOT NULL, type INTEGER NOT NULL, seq INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, ino INTEGER NOT NULL,
    content BLOB NOT NULL, PRIMARY KEY (folder, name));
CREATE TABLE holdings (
    id INTEGER PRIMARY KEY, folder INTEGER NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,
    block_size INTEGER NOT NULL, blocks BLOB NOT NULL);
CREATE UNIQUE INDEX holdings_name ON holdings (folder, name);
CREATE TABLE block_locs (
    hash BLOB NOT NULL, holding INTEGER NOT NULL, idx INTEGER NOT NULL,
    PRIMARY KEY (hash, holding, idx)) WITHOUT ROWID;
CREATE TABLE partials (
    folder INTEGER NOT NULL, name TEXT NOT NULL, temp TEXT NOT NULL, size INTEGER NOT NULL,
    block_size INTEGER NOT NULL, done BLOB NOT NULL, PRIMARY KEY (folder, name));
""",
        "sync index: source files, chunks, desired and applied state, block lookup, partial downloads",
    ),
    Migration(
        2,
        """
CREATE TABLE tasks (folder TEXT PRIMARY KEY, applied_index_id INTEGER NOT NULL, applied_seq INTEGER NOT NULL, task BLOB);
CREATE TABLE task_history (id INTEGER PRIMARY KEY, folder TEXT NOT NULL, task_id TEXT NOT NULL, task BLOB NOT NULL);
CREATE INDEX task_history_folder ON task_history (folder, id);
""",
        "receiver tasks (sync/tasks.py): the current one per folder, the version applied, finished ones",
    ),
]

MAX_LOCATIONS = 8  # per hash: enough to fall back when a local copy changed under us


def content_id(entry: FileEntry) -> bytes:
    """What a file's content is, independent of its metadata: equal ids, equal bytes."""
    if entry.type == FILE:
        return hashlib.sha256(b"file:%d:" % entry.size + entry.blocks).digest()
    if entry.type == SYMLINK:
        return hashlib.sha256(b"symlink:" + entry.target.encode("utf-8", "surrogatepass")).digest()
    return b"dir"


class SourceRow(NamedTuple):
    """What a rescan compares for one name of the source's index (a tuple: one per name per rescan)."""

    type: str
    deleted: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    mode: int
    seq: int

    def unchanged(self, kind: str, sig: StatSig) -> bool:
        return not self.deleted and self.type == kind and self[2:7] == sig


@attrs.frozen(slots=True)
class SourceChange:
    """A scanned change, before the repository gives it a seq."""

    entry: FileEntry  # seq ignored
    sig: StatSig | None  # None for deletions
    disk_name: str | None = None  # the on-disk name when it is not the (NFC) entry name


@attrs.frozen(slots=True)
class BlockLocation:
    folder: str
    name: str
    offset: int
    size: int


@attrs.frozen(slots=True)
class AppliedState:
    type: str
    seq: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    content: bytes


@attrs.frozen(slots=True)
class Applied:
    """A name as a receiver just wrote it (after every metadata change)."""

    name: str
    entry: FileEntry
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int


@attrs.frozen(slots=True)
class Partial:
    temp: str
    size: int
    block_size: int
    done: frozenset[int]


@attrs.frozen(slots=True)
class ChunkAccept:
    """What a receiver did with an index chunk: `applied` (held seq advanced), `reset` (a new
    index_id: the old desired state was dropped, then the chunk applied), `stale` (nothing new),
    or `gap` (chunks between our seq and its prev_seq are missing: ask for those first)."""

    status: str
    index_id: int
    seq: int
    changed: int = 0


_ENTRY_COLS = "name, type, seq, deleted, size, mode, mtime_ns, uid, gid, block_size, blocks, target"


def _entry(row: Sequence[Any]) -> FileEntry:
    name, type_, seq, deleted, size, mode, mtime_ns, uid, gid, block_size, blocks, target = row
    return FileEntry(name, TYPES[type_], seq, size, mode, mtime_ns, uid, gid, bool(deleted), block_size, bytes(blocks), target)


def _entry_values(e: FileEntry) -> tuple[Any, ...]:
    return (e.name, TYPE_CODE[e.type], e.seq, int(e.deleted), e.size, e.mode, e.mtime_ns, e.uid, e.gid, e.block_size, e.blocks, e.target)


def _done_bits(done: Iterable[int]) -> bytes:
    bits = bytearray()
    for i in done:
        if i >= len(bits) * 8:
            bits.extend(bytes(i // 8 + 1 - len(bits)))
        bits[i // 8] |= 1 << (i % 8)
    return bytes(bits)


def _done_set(bits: bytes) -> frozenset[int]:
    return frozenset(i * 8 + b for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1)


class IndexRepo:
    """SQL over sync.db. Methods take the connection first (they run on the database thread)."""

    def __init__(self) -> None:
        self._keys: dict[str, int] = {}

    # -- folders ------------------------------------------------------------------------------------
    def folder_key(self, conn: sqlite3.Connection, folder: str) -> int:
        key = self._keys.get(folder)
        if key is None:
            row = conn.execute("SELECT id FROM folders WHERE name = ?", (folder,)).fetchone()
            if row is None:
                key = conn.execute("INSERT INTO folders (name) VALUES (?)", (folder,)).lastrowid
            else:
                key = row[0]
            assert key is not None
            self._keys[folder] = key
        return key

    def set_root(self, conn: sqlite3.Connection, folder: str, root: str) -> None:
        """Where this node keeps `folder` (source_path, target_path, or an artifact store)."""
        conn.execute("UPDATE folders SET root = ? WHERE id = ?", (root, self.folder_key(conn, folder)))

    def root(self, conn: sqlite3.Connection, folder: str) -> str | None:
        row = conn.execute("SELECT root FROM folders WHERE name = ?", (folder,)).fetchone()
        return row[0] if row else None

    # -- the source's own index ---------------------------------------------------------------------
    def source_index(self, conn: sqlite3.Connection, folder: str) -> tuple[int, int]:
        """(index_id, max_seq) of this node's index of `folder`, creating it (seq 0) if new."""
        key = self.folder_key(conn, folder)
        row = conn.execute("SELECT index_id, max_seq FROM source_index WHERE folder = ?", (key,)).fetchone()
        if row is None:
            index_id = secrets.randbits(63) or 1
            conn.execute("INSERT INTO source_index (folder, index_id, max_seq) VALUES (?, ?, 0)", (key, index_id))
            return index_id, 0
        return row[0], row[1]

    def source_rows(self, conn: sqlite3.Connection, folder: str, parent_dir: str) -> dict[str, SourceRow]:
        """Every indexed name directly inside `parent_dir` ("" for the root), tombstones included."""
        key = self.folder_key(conn, folder)
        rows = conn.execute(
            "SELECT name, type, deleted, size, mtime_ns, ctime_ns, ino, mode, seq FROM files WHERE folder = ? AND parent = ?",
            (key, parent_dir),
        )
        return {r[0]: SourceRow(TYPES[r[1]], *r[2:]) for r in rows}

    def source_row(self, conn: sqlite3.Connection, folder: str, name: str) -> SourceRow | None:
        key = self.folder_key(conn, folder)
        r = conn.execute(
            "SELECT name, type, deleted, size, mtime_ns, ctime_ns, ino, mode, seq FROM files WHERE folder = ? AND name = ?",
            (key, name),
        ).fetchone()
        return SourceRow(TYPES[r[1]], *r[2:]) if r else None

    def live_names_under(self, conn: sqlite3.Connection, folder: str, dir_name: str) -> list[str]:
        """Names below `dir_name` that are not tombstones (to delete a vanished directory's content)."""
        key = self.folder_key(conn, folder)
        lo = dir_name + "/"
        hi = dir_name + "0"  # "/" + 1: every name with the prefix sorts between lo and hi
        rows = conn.execute(
            "SELECT name FROM files WHERE folder = ? AND name >= ? AND name < ? AND deleted = 0", (key, lo, hi)
        )
        return [r[0] for r in rows]

    def source_entry(self, conn: sqlite3.Connection, folder: str, name: str) -> FileEntry | None:
        key = self.folder_key(conn, folder)
        row = conn.execute(f"SELECT {_ENTRY_COLS} FROM files WHERE folder = ? AND name = ?", (key, name)).fetchone()
        return _entry(row) if row else None

    def commit_source_changes(self, conn: sqlite3.Connection, folder: str, changes: Sequence[SourceChange]) -> list[FileEntry]:
        """Give each change the next seq and store it; keep the block lookup in step.

        A change equal to what is stored (same entry, only the stat signature moved) updates the
        signature without a new seq. Returns the entries that got a seq, in seq order."""
        key = self.folder_key(conn, folder)
        index_id, seq = self.source_index(conn, folder)
        out: list[FileEntry] = []
        for ch in changes:
            e = ch.entry
            old = conn.execute(
                f"SELECT {_ENTRY_COLS}, disk_name FROM files WHERE folder = ? AND name = ?", (key, e.name)
            ).fetchone()
            old_entry = _entry(old[:-1]) if old else None
            sig = ch.sig or StatSig(0, 0, 0, 0, 0)
            if old_entry is not None and attrs.evolve(old_entry, seq=0) == attrs.evolve(e, seq=0) and old[-1] == ch.disk_name:
                conn.execute(
                    "UPDATE files SET ino = ?, ctime_ns = ? WHERE folder = ? AND name = ?", (sig.ino, sig.ctime_ns, key, e.name)
                )
                continue
            if old_entry is None and e.deleted:
                continue  # never indexed, nothing to tell anyone
            seq += 1
            e = attrs.evolve(e, seq=seq)
            conn.execute(
                "INSERT INTO files (folder, parent, disk_name, ino, ctime_ns, " + _ENTRY_COLS + ") "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (folder, name) DO UPDATE SET type = excluded.type, seq = excluded.seq, deleted = excluded.deleted, "
                "size = excluded.size, mode = excluded.mode, mtime_ns = excluded.mtime_ns, uid = excluded.uid, gid = excluded.gid, "
                "block_size = excluded.block_size, blocks = excluded.blocks, target = excluded.target, "
                "disk_name = excluded.disk_name, ino = excluded.ino, ctime_ns = excluded.ctime_ns",
                (key, parent(e.name), ch.disk_name, sig.ino, sig.ctime_ns, *_entry_values(e)),
            )
            if old_entry is not None and old_entry.type == FILE and not old_entry.deleted and old_entry.blocks != e.blocks:
                self._unregister(conn, key, e.name)
            if e.type == FILE and not e.deleted and e.blocks and (old_entry is None or old_entry.blocks != e.blocks or old_entry.deleted):
                self._register(conn, key, ch.disk_name or e.name, e.size, e.block_size, e.blocks)
            out.append(e)
        if out:
            conn.execute("UPDATE source_index SET max_seq = ? WHERE folder = ?", (seq, key))
        return out

    def entries_since(self, conn: sqlite3.Connection, folder: str, after_seq: int, limit: int = 10_000) -> list[FileEntry]:
        """The source's entries with seq > after_seq, ascending: the content of the next index chunks."""
        key = self.folder_key(conn, folder)
        rows = conn.execute(
            f"SELECT {_ENTRY_COLS} FROM files WHERE folder = ? AND seq > ? ORDER BY seq LIMIT ?", (key, after_seq, limit)
        )
        return [_entry(r) for r in rows]

    def unsigned_chunks(self, conn: sqlite3.Connection, folder: str, after_seq: int, max_entries: int = 50_000) -> list[IndexChunk]:
        """The source's changes after `after_seq` as chunks ready to sign (at most `max_entries` entries)."""
        index_id, _ = self.source_index(conn, folder)
        return list(build_chunks(folder, index_id, after_seq, self.entries_since(conn, folder, after_seq, max_entries)))

    def count_source(self, conn: sqlite3.Connection, folder: str) -> tuple[int, int]:
        """(live names, tombstones) in the source's index."""
        key = self.folder_key(conn, folder)
        row = conn.execute("SELECT COUNT(*), COALESCE(SUM(deleted), 0) FROM files WHERE folder = ?", (key,)).fetchone()
        return row[0] - row[1], row[1]

    def source_disk_name(self, conn: sqlite3.Connection, folder: str, name: str) -> str:
        key = self.folder_key(conn, folder)
        row = conn.execute("SELECT disk_name FROM files WHERE folder = ? AND name = ?", (key, name)).fetchone()
        return row[0] if row and row[0] else name

    # -- signed chunks (source and relays) ----------------------------------------------------------
    def put_chunk(self, conn: sqlite3.Connection, folder: str, index_id: int, prev_seq: int, seq: int, data: bytes) -> None:
        key = self.folder_key(conn, folder)
        conn.execute(
            "INSERT OR REPLACE INTO chunks (folder, index_id, seq, prev_seq, data) VALUES (?, ?, ?, ?, ?)",
            (key, index_id, seq, prev_seq, data),
        )

    def chunks_after(
        self, conn: sqlite3.Connection, folder: str, index_id: int, after_seq: int, limit: int = 64
    ) -> list[tuple[int, int, bytes]]:
        """Stored chunks of (folder, index_id) that carry anything newer than `after_seq`: (prev_seq, seq, data)."""
        key = self.folder_key(conn, folder)
        rows = conn.execute(
            "SELECT prev_seq, seq, data FROM chunks WHERE folder = ? AND index_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (key, index_id, after_seq, limit),
        )
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def last_chunk_seq(self, conn: sqlite3.Connection, folder: str, index_id: int) -> int:
        key = self.folder_key(conn, folder)
        row = conn.execute("SELECT MAX(seq) FROM chunks WHERE folder = ? AND index_id = ?", (key, index_id)).fetchone()
        return row[0] or 0

    def drop_chunks(self, conn: sqlite3.Connection, folder: str, *, except_index_id: int | None = None) -> int:
        key = self.folder_key(conn, folder)
        cur = conn.execute("DELETE FROM chunks WHERE folder = ? AND index_id IS NOT ?", (key, except_index_id))
        return cur.rowcount

    # -- a receiver's desired state -----------------------------------------------------------------
    def desired_index(self, conn: sqlite3.Connection, folder: str) -> tuple[int, int] | None:
        """(index_id, seq) of the source's index as far as this receiver holds it."""
        key = self.folder_key(conn, folder)
        row = conn.execute("SELECT index_id, seq FROM desired_index WHERE folder = ?", (key,)).fetchone()
        return (row[0], row[1]) if row else None

    def accept_chunk(self, conn: sqlite3.Connection, chunk: IndexChunk) -> ChunkAccept:
        """Fold a verified chunk into the desired state (entries newer than what we hold win)."""
        key = self.folder_key(conn, chunk.folder)
        held = self.desired_index(conn, chunk.folder)
        status = "applied"
        if held is None or held[0] != chunk.index_id:
            if chunk.prev_seq != 0:
                return ChunkAccept("gap", chunk.index_id, 0)
            if held is not None:
                conn.execute("DELETE FROM desired WHERE folder = ?", (key,))
                status = "reset"
            held = (chunk.index_id, 0)
        index_id, seq = held
        if chunk.prev_seq > seq:
            return ChunkAccept("gap", index_id, seq)
        if chunk.seq <= seq and status == "applied":
            return ChunkAccept("stale", index_id, seq)
        changed = 0
        for e in chunk.entries:
            cur = conn.execute(
                "INSERT INTO desired (folder, " + _ENTRY_COLS + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (folder, name) DO UPDATE SET type = excluded.type, seq = excluded.seq, deleted = excluded.deleted, "
                "size = excluded.size, mode = excluded.mode, mtime_ns = excluded.mtime_ns, uid = excluded.uid, gid = excluded.gid, "
                "block_size = excluded.block_size, blocks = excluded.blocks, target = excluded.target WHERE excluded.seq > desired.seq",
                (key, *_entry_values(e)),
            )
            changed += cur.rowcount
        new_seq = max(seq, chunk.seq)
        conn.execute(
            "INSERT INTO desired_index (folder, index_id, seq) VALUES (?, ?, ?) "
            "ON CONFLICT (folder) DO UPDATE SET index_id = excluded.index_id, seq = excluded.seq",
            (key, index_id, new_seq),
        )
        return ChunkAccept(status, index_id, new_seq, changed)

    def desired_entries(self, conn: sqlite3.Connection, folder: str, after_name: str = "", limit: int = 5000) -> list[FileEntry]:
        """A page of the desired state in name order (tombstones included); pass the last name to continue."""
        key = self.folder_key(conn, folder)
        rows = conn.execute(
            f"SELECT {_ENTRY_COLS} FROM desired WHERE folder = ? AND name > ? ORDER BY name LIMIT ?", (key, after_name, limit)
        )
        return [_entry(r) for r in rows]

    def iter_desired(self, conn: sqlite3.Connection, folder: str, page: int = 5000) -> Iterator[FileEntry]:
        last = ""
        while True:
            batch = self.desired_entries(conn, folder, last, page)
            yield from batch
            if len(batch) < page:
                return
            last = batch[-1].name

    # -- a receiver's applied state -----------------------------------------------------------------
    def applied_states(self, conn: sqlite3.Connection, folder: str) -> dict[str, AppliedState]:
        key = self.folder_key(conn, folder)
        rows = conn.execute(
            "SELECT name, type, seq, size, mtime_ns, ctime_ns, ino, content FROM applied WHERE folder = ?", (key,)
        )
        return {r[0]: AppliedState(TYPES[r[1]], r[2], r[3], r[4], r[5], r[6], bytes(r[7])) for r in rows}

    def record_applied(self, conn: sqlite3.Connection, folder: str, done: Sequence[Applied]) -> None:
        """Remember what was written and register complete files in the block lookup."""
        key = self.folder_key(conn, folder)
        for a in done:
            e = a.entry
            conn.execute(
                "INSERT OR REPLACE INTO applied (folder, name, type, seq, size, mtime_ns, ctime_ns, ino, content) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, a.name, TYPE_CODE[e.type], e.seq, a.size, a.mtime_ns, a.ctime_ns, a.ino, content_id(e)),
            )
            self._unregister(conn, key, a.name)
            if e.type == FILE and e.blocks:
                self._register(conn, key, a.name, e.size, e.block_size, e.blocks)

    def forget_applied(self, conn: sqlite3.Connection, folder: str, gone: Iterable[str]) -> None:
        key = self.folder_key(conn, folder)
        for name in gone:
            conn.execute("DELETE FROM applied WHERE folder = ? AND name = ?", (key, name))
            self._unregister(conn, key, name)

    # -- partial downloads --------------------------------------------------------------------------
    def partial(self, conn: sqlite3.Connection, folder: str, name: str) -> Partial | None:
        key = self.folder_key(conn, folder)
        row = conn.execute("SELECT temp, size, block_size, done FROM partials WHERE folder = ? AND name = ?", (key, name)).fetchone()
        return Partial(row[0], row[1], row[2], _done_set(bytes(row[3]))) if row else None

    def put_partial(self, conn: sqlite3.Connection, folder: str, name: str, p: Partial) -> None:
        key = self.folder_key(conn, folder)
        conn.execute(
            "INSERT OR REPLACE INTO partials (folder, name, temp, size, block_size, done) VALUES (?, ?, ?, ?, ?, ?)",
            (key, name, p.temp, p.size, p.block_size, _done_bits(p.done)),
        )

    def drop_partial(self, conn: sqlite3.Connection, folder: str, name: str) -> None:
        key = self.folder_key(conn, folder)
        conn.execute("DELETE FROM partials WHERE folder = ? AND name = ?", (key, name))

    def partial_temps(self, conn: sqlite3.Connection, folder: str) -> set[str]:
        """Temp files (folder-relative) of resumable downloads, which cleanup keeps. Partials of names
        the desired state no longer has as a file are dropped here, so their temps go too."""
        key = self.folder_key(conn, folder)
        conn.execute(
            "DELETE FROM partials WHERE folder = ? AND name NOT IN "
            "(SELECT name FROM desired WHERE folder = ? AND deleted = 0 AND type = ?)",
            (key, key, TYPE_CODE[FILE]),
        )
        return {r[0] for r in conn.execute("SELECT temp FROM partials WHERE folder = ?", (key,))}

    # -- the block lookup ---------------------------------------------------------------------------
    def register_holding(
        self, conn: sqlite3.Connection, folder: str, name: str, size: int, block_size: int, blocks: bytes
    ) -> None:
        """A complete file this node holds (any folder, or a pseudo-folder such as an artifact store)."""
        key = self.folder_key(conn, folder)
        self._unregister(conn, key, name)
        self._register(conn, key, name, size, block_size, blocks)

    def unregister_holding(self, conn: sqlite3.Connection, folder: str, name: str) -> None:
        self._unregister(conn, self.folder_key(conn, folder), name)

    def _register(self, conn: sqlite3.Connection, key: int, name: str, size: int, block_size: int, blocks: bytes) -> None:
        hid = conn.execute(
            "INSERT OR REPLACE INTO holdings (folder, name, size, block_size, blocks) VALUES (?, ?, ?, ?, ?)",
            (key, name, size, block_size, blocks),
        ).lastrowid
        conn.executemany(
            "INSERT OR IGNORE INTO block_locs (hash, holding, idx) VALUES (?, ?, ?)",
            ((blocks[i : i + HASH_LEN], hid, i // HASH_LEN) for i in range(0, len(blocks), HASH_LEN)),
        )

    def _unregister(self, conn: sqlite3.Connection, key: int, name: str) -> None:
        row = conn.execute("SELECT id, blocks FROM holdings WHERE folder = ? AND name = ?", (key, name)).fetchone()
        if row is None:
            return
        hid, blocks = row[0], bytes(row[1])
        conn.executemany(
            "DELETE FROM block_locs WHERE hash = ? AND holding = ? AND idx = ?",
            ((blocks[i : i + HASH_LEN], hid, i // HASH_LEN) for i in range(0, len(blocks), HASH_LEN)),
        )
        conn.execute("DELETE FROM holdings WHERE id = ?", (hid,))

    def locate(self, conn: sqlite3.Connection, block_hash: bytes, limit: int = MAX_LOCATIONS) -> list[BlockLocation]:
        """Where this node holds a block with this hash (complete files only)."""
        rows = conn.execute(
            "SELECT f.name, h.name, h.size, h.block_size, l.idx FROM block_locs l "
            "JOIN holdings h ON h.id = l.holding JOIN folders f ON f.id = h.folder WHERE l.hash = ? LIMIT ?",
            (block_hash, limit),
        )
        out = []
        for folder, name, size, block_size, idx in rows:
            offset, length = block_span(idx, size, block_size)
            out.append(BlockLocation(folder, name, offset, length))
        return out

    def locate_many(self, conn: sqlite3.Connection, hashes: Iterable[bytes]) -> dict[bytes, list[BlockLocation]]:
        out: dict[bytes, list[BlockLocation]] = {}
        for h in set(hashes):
            locs = self.locate(conn, h)
            if locs:
                out[h] = locs
        return out
