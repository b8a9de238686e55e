"""SQLite databases: WAL, batched writes, migrations (from a file written by p2pnode 0.1), failures
told apart at open, and a database that keeps the node up when the disk refuses writes."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from clusterkit import ClusterKit, ClusterNode
from p2pnode.config import NodeConfig
from p2pnode.identity import PeerId
from p2pnode.platform import nodedb
from p2pnode.platform.db import Database, Migration, StoreError

FIXTURE = Path(__file__).parent / "fixtures" / "node-db-v0"
SCHEMA = [Migration(1, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);\nCREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT);")]


async def test_wal_batching_and_retention(tmp_path):
    db = await Database.open(tmp_path / "x.db", SCHEMA)
    db.after_flush(lambda conn: conn.execute("DELETE FROM t WHERE id <= (SELECT MAX(id) FROM t) - 100"))
    try:
        assert (await db.fetchone("PRAGMA journal_mode"))[0] == "wal"
        assert (await db.fetchone("PRAGMA user_version"))[0] == 1
        for i in range(1000):
            db.queue("INSERT INTO t (v) VALUES (?)", (f"p{i}",))
        assert (await db.fetchone("SELECT COUNT(*) FROM t"))[0] == 0  # queued, not yet written
        await db.flush()  # one transaction; housekeeping runs on the first flush
        assert db.flushes == 1
        assert (await db.fetchone("SELECT COUNT(*) FROM t"))[0] == 100
        await db.execute("INSERT INTO meta VALUES ('k', 'v')")
        assert (await db.fetchone("SELECT v FROM meta WHERE k = 'k'")) == ("v",)
    finally:
        await db.close()
    with sqlite3.connect(tmp_path / "x.db") as raw:  # survives reopening; a raw reader sees the committed rows
        assert raw.execute("SELECT v FROM meta WHERE k='k'").fetchone() == ("v",)


async def test_queued_writes_are_flushed_on_close(tmp_path):
    db = await Database.open(tmp_path / "x.db", SCHEMA)
    db.queue("INSERT INTO meta VALUES ('heartbeat_seq', '42')")
    await db.close()
    again = await Database.open(tmp_path / "x.db", SCHEMA)
    assert await again.fetchone("SELECT v FROM meta") == ("42",)
    await again.close()


async def test_migrations_run_once_in_order_and_a_newer_file_is_refused(tmp_path):
    path = tmp_path / "x.db"
    await (await Database.open(path, SCHEMA)).close()
    more = [*SCHEMA, Migration(2, "ALTER TABLE t ADD COLUMN w TEXT"), Migration(3, lambda c: c.execute("INSERT INTO meta VALUES ('m', '3')"))]
    db = await Database.open(path, more)
    assert (await db.fetchone("PRAGMA user_version"))[0] == 3
    await db.close()
    db = await Database.open(path, more)  # nothing left to apply: the insert of v3 ran once
    assert await db.fetchall("SELECT v FROM meta") == [("3",)]
    await db.close()
    with pytest.raises(StoreError, match=r"schema version 3, newer than this p2pnode knows \(1\)"):
        await Database.open(path, SCHEMA)
    # a migration that fails leaves the file at the last good version
    bad = [*more, Migration(4, "CREATE TABLE u (x);\nINSERT INTO nowhere VALUES (1);")]
    with pytest.raises(StoreError):
        await Database.open(path, bad)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (3,)
        assert raw.execute("SELECT name FROM sqlite_master WHERE name = 'u'").fetchone() is None


async def test_a_database_written_by_p2pnode_0_1_is_migrated_and_its_snapshot_stays_in_force(tmp_path, nursery):
    about = json.loads((FIXTURE / "about.json").read_text())
    data = tmp_path / "a"
    data.mkdir()
    shutil.copy(FIXTURE / "node.db", data / "node.db")
    db = await Database.open(data / "node.db", nodedb.MIGRATIONS)
    assert (await db.fetchone("PRAGMA user_version"))[0] == len(nodedb.MIGRATIONS)
    tables = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"documents", "meta", "peers", "heartbeats", "state_transitions"} <= tables
    assert not tables & {"snapshots", "revocations", "connections"}
    assert sorted(r[0] for r in await db.fetchall("SELECT type FROM documents")) == ["membership-snapshot", "revocation"]
    await db.close()

    # a node started on it (with that cluster's trust) has the old snapshot, revocation and heartbeat seqs
    kit = ClusterKit(about["cluster_id"])
    node = ClusterNode(kit, tmp_path, "a", system_pubkey=about["system_pubkey"])
    node.config = NodeConfig(data_dir=data, listen=node.config.listen, cluster_id=about["cluster_id"],
                             system_pubkey=about["system_pubkey"], heartbeat_interval=0.3)
    await node.start(nursery)
    membership = node.node.membership
    assert {str(m.peer_id) for m in membership.members()} == set(about["member_peer_ids"])
    assert [str(a) for rev, _ in membership.revocations.values() for a in rev.admins] == [about["revoked_admin"]]
    other = PeerId.from_string(about["member_peer_ids"][1])
    assert node.node.heartbeat.core.last_seq[other] > 0
    await node.stop()


async def test_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        db = await Database.open(tmp_path / "x.db", SCHEMA)
        await db.execute("INSERT INTO t (v) VALUES ('x')")
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        await db.close()
    finally:
        os.umask(old)
    assert modes == {"x.db": 0o600, "x.db-wal": 0o600, "x.db-shm": 0o600}


async def test_corrupt_database_is_a_clear_error(tmp_path):
    path = tmp_path / "node.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"corrupt or not a SQLite file.*mv .*node.db .*node.db.broken"):
        await Database.open(path, nodedb.MIGRATIONS)


async def test_a_database_the_user_cannot_open_is_a_permission_error(tmp_path):
    """Opened as an unprivileged user (root ignores file modes): the message says whose and how to fix."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    tmp_path.chmod(0o777)
    path = tmp_path / "node.db"
    await (await Database.open(path, SCHEMA)).close()  # owned by root, 0600
    code = (
        "import trio, sys; from p2pnode.platform.db import Database, StoreError\n"
        "from p2pnode.platform import nodedb\n"
        "try: trio.run(Database.open, sys.argv[1], nodedb.MIGRATIONS)\n"
        "except StoreError as e: print(e); sys.exit(3)\n"
    )
    result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", code, str(path)],
                            capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert result.returncode == 3, result.stderr
    assert "uid 65534" in result.stdout and "cannot read and write" in result.stdout and "chown" in result.stdout


def test_node_with_corrupt_database_exits_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.json").write_text('{"listen": ["/ip4/127.0.0.1/tcp/0"]}')
    (data / "node.db").write_bytes(b"\x00garbage" * 1000)
    result = subprocess.run([sys.executable, "-m", "p2pnode", "run", "--data-dir", str(data)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "corrupt or not a SQLite file" in result.stderr and "Traceback" not in result.stderr


async def test_disk_full_keeps_writes_queued_reports_a_problem_and_recovers(tmpfs, tmp_path):
    small_tmpfs = tmp_path / "small"
    tmpfs(small_tmpfs, "1m")
    db = await Database.open(small_tmpfs / "x.db", SCHEMA, flush_interval=0.05)
    filler = small_tmpfs / "filler"
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        with open(filler, "wb") as f:  # fill the filesystem to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        for i in range(200):
            db.queue("INSERT INTO t (v) VALUES (?)", ("x" * 1000 + str(i),))
        with pytest.raises(StoreError, match="full"):
            await db.execute("INSERT INTO t (v) VALUES (?)", ("durable" * 2000,))  # a durable write says so at once
        with trio.fail_after(5):
            while db.problem is None:
                await trio.sleep(0.05)
        assert db.problem.startswith("full:") and db.status()["queued"] >= 200
        filler.unlink()  # space again: the queued writes land, the problem clears
        with trio.fail_after(40):
            while db.problem is not None or db.status()["queued"]:
                await trio.sleep(0.05)
        assert (await db.fetchone("SELECT COUNT(*) FROM t"))[0] == 200
        nursery.cancel_scope.cancel()
