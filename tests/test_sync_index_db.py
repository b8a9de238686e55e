"""sync.db: migrations, index chunks on a receiver, stored chunks for relays, the block lookup, partials."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.sync.blocks import digest
from p2pnode.platform.db import Database, Migration, StoreError
from p2pnode.sync.index_db import MIGRATIONS, Applied, BlockLocation, IndexRepo, Partial
from p2pnode.sync.model import FILE, FileEntry, IndexChunk


def entry(name: str, seq: int, data: bytes = b"x", deleted: bool = False) -> FileEntry:
    if deleted:
        return FileEntry(name, FILE, seq, deleted=True)
    return FileEntry(name, FILE, seq, len(data), 0o644, 1, 0, 0, False, 131072, digest(data))


@pytest.fixture
async def db(tmp_path: Path):
    d = await Database.open(tmp_path / "sync.db", MIGRATIONS)
    try:
        yield d
    finally:
        await d.close()


async def test_migrations_are_applied_once_and_in_order(tmp_path: Path):
    newest = MIGRATIONS[-1].version
    extra = [*MIGRATIONS, Migration(newest + 1, "CREATE TABLE later (x INTEGER);")]
    db = await Database.open(tmp_path / "a.db", MIGRATIONS)
    assert await db.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == newest
    await db.close()
    db = await Database.open(tmp_path / "a.db", extra)
    assert await db.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == newest + 1
    assert await db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    await db.close()


async def test_receiver_accepts_chunks_in_order_and_resets_on_a_new_index(db: Database):
    repo = IndexRepo()

    async def accept(chunk: IndexChunk):  # type: ignore[no-untyped-def]
        return await db.write(lambda c: repo.accept_chunk(c, chunk))

    async def names() -> dict[str, int]:
        return await db.read(lambda c: {e.name: e.seq for e in repo.desired_entries(c, "app")})

    assert (await accept(IndexChunk("app", 7, 3, 5, (entry("a", 4),)))).status == "gap"  # must start at 0
    r = await accept(IndexChunk("app", 7, 0, 5, (entry("a", 2), entry("b", 5))))
    assert (r.status, r.seq, r.changed) == ("applied", 5, 2)
    assert (await accept(IndexChunk("app", 7, 0, 5, (entry("a", 2),)))).status == "stale"
    assert (await accept(IndexChunk("app", 7, 8, 9, (entry("c", 9),)))).status == "gap"  # 6..8 missing
    r = await accept(IndexChunk("app", 7, 4, 8, (entry("b", 5), entry("a", 8, b"new"))))  # overlaps what we hold: fine
    assert (r.status, r.seq) == ("applied", 8)
    assert await names() == {"a": 8, "b": 5}
    # an older state of a name never overwrites a newer one
    await accept(IndexChunk("app", 7, 8, 10, (entry("c", 10),)))
    await db.write(lambda c: repo.accept_chunk(c, IndexChunk("app", 7, 0, 10, (entry("a", 1),))))
    assert (await names())["a"] == 8
    # the source lost its database: new index id, start again from 0
    assert (await accept(IndexChunk("app", 99, 5, 6, (entry("z", 6),)))).status == "gap"
    r = await accept(IndexChunk("app", 99, 0, 1, (entry("z", 1, deleted=True),)))
    assert (r.status, r.index_id, r.seq) == ("reset", 99, 1)
    assert await names() == {"z": 1}
    assert await db.read(lambda c: repo.desired_index(c, "app")) == (99, 1)


async def test_chunks_are_stored_for_relaying(db: Database):
    repo = IndexRepo()
    await db.write(lambda c: [repo.put_chunk(c, "app", 7, p, s, f"chunk {s}".encode()) for p, s in ((0, 10), (10, 20), (20, 30))])
    await db.write(lambda c: repo.put_chunk(c, "app", 6, 0, 99, b"old index"))
    after = await db.read(lambda c: repo.chunks_after(c, "app", 7, 15))
    assert after == [(10, 20, b"chunk 20"), (20, 30, b"chunk 30")]
    assert await db.read(lambda c: repo.last_chunk_seq(c, "app", 7)) == 30
    assert await db.write(lambda c: repo.drop_chunks(c, "app", except_index_id=7)) == 1
    assert await db.read(lambda c: repo.chunks_after(c, "app", 6, 0)) == []


async def test_block_lookup_over_folders_and_artifacts(db: Database):
    repo = IndexRepo()
    a, b = digest(b"block a"), digest(b"block b")
    blocks = a + b + a
    await db.write(lambda c: repo.register_holding(c, "artifact:web-1.2", "web.tar.gz", 2 * 131072 + 10, 131072, blocks))
    locs = await db.read(lambda c: repo.locate(c, a))
    assert sorted(locs, key=lambda loc: loc.offset) == [
        BlockLocation("artifact:web-1.2", "web.tar.gz", 0, 131072),
        BlockLocation("artifact:web-1.2", "web.tar.gz", 2 * 131072, 10),
    ]
    e = FileEntry("f", FILE, 3, 131072, 0o644, 1, 0, 0, False, 131072, b)
    await db.write(lambda c: repo.record_applied(c, "app", [Applied("f", e, 131072, 1, 2, 3)]))
    assert {loc.folder for loc in await db.read(lambda c: repo.locate(c, b))} == {"artifact:web-1.2", "app"}
    assert (await db.read(lambda c: repo.applied_states(c, "app")))["f"].seq == 3
    await db.write(lambda c: repo.forget_applied(c, "app", ["f"]))
    await db.write(lambda c: repo.unregister_holding(c, "artifact:web-1.2", "web.tar.gz"))
    assert await db.read(lambda c: repo.locate_many(c, [a, b])) == {}
    assert await db.read(lambda c: c.execute("SELECT COUNT(*) FROM block_locs").fetchone()[0]) == 0


async def test_partials_roundtrip(db: Database):
    repo = IndexRepo()
    await db.write(lambda c: repo.accept_chunk(c, IndexChunk("app", 1, 0, 1, (entry("dir/big", 1),))))
    p = Partial("dir/.p2psync.big.tmp", 10 << 20, 131072, frozenset({0, 1, 7, 79}))
    await db.write(lambda c: repo.put_partial(c, "app", "dir/big", p))
    await db.write(lambda c: repo.put_partial(c, "app", "no/longer/wanted", p))
    assert await db.read(lambda c: repo.partial(c, "app", "dir/big")) == p
    assert await db.write(lambda c: repo.partial_temps(c, "app")) == {"dir/.p2psync.big.tmp"}
    assert await db.read(lambda c: repo.partial(c, "app", "no/longer/wanted")) is None
    await db.write(lambda c: repo.drop_partial(c, "app", "dir/big"))
    assert await db.read(lambda c: repo.partial(c, "app", "dir/big")) is None


async def test_a_corrupt_database_says_what_to_do(tmp_path: Path):
    (tmp_path / "sync.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="move it aside"):
        await Database.open(tmp_path / "sync.db", MIGRATIONS)
