"""The SQLite store: WAL, batched writes, retention, and a clear error for a broken file."""

import sqlite3
import subprocess
import sys

import pytest

from p2pnode.store import Retention, Store, StoreError


async def test_wal_batching_and_retention(tmp_path):
    store = await Store.open(tmp_path / "node.db", retention=Retention(connections=100))
    try:
        assert (await store.fetchone("PRAGMA journal_mode"))[0] == "wal"
        for i in range(1000):
            store.queue("INSERT INTO connections (peer_id, event, at) VALUES (?, 'connected', 'now')", (f"p{i}",))
        assert (await store.fetchone("SELECT COUNT(*) FROM connections"))[0] == 0  # queued, not yet written
        await store.flush()  # one transaction; retention runs on the first flush
        assert store.flushes == 1
        count, first = await store.fetchone("SELECT COUNT(*), MIN(peer_id) FROM connections")
        assert count == 100
        await store.write("INSERT INTO meta (key, value) VALUES ('k', 'v')")
        assert await store.get_meta("k") == "v"
    finally:
        await store.close()
    # survives reopening; a raw reader sees the committed rows
    with sqlite3.connect(tmp_path / "node.db") as raw:
        assert raw.execute("SELECT value FROM meta WHERE key='k'").fetchone() == ("v",)


async def test_queued_writes_are_flushed_on_close(tmp_path):
    store = await Store.open(tmp_path / "node.db")
    store.queue_meta("heartbeat_seq", "42")
    await store.close()
    again = await Store.open(tmp_path / "node.db")
    assert await again.get_meta("heartbeat_seq") == "42"
    await again.close()


async def test_corrupt_database_is_a_clear_error(tmp_path):
    path = tmp_path / "node.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"corrupt or not a SQLite file.*mv .*node.db .*node.db.broken"):
        await Store.open(path)


def test_node_with_corrupt_database_exits_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.json").write_text('{"listen": ["/ip4/127.0.0.1/tcp/0"]}')
    (data / "node.db").write_bytes(b"\x00garbage" * 1000)
    result = subprocess.run([sys.executable, "-m", "p2pnode", "run", "--data-dir", str(data)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "corrupt or not a SQLite file" in result.stderr and "Traceback" not in result.stderr
