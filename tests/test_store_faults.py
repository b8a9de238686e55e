"""A node whose disk fills or whose messages grow large keeps running: it reports the problem,
never claims state it has not stored, and recovers when space returns."""

import logging


from clusterkit import ClusterKit, ClusterNode, wait_for
from p2pnode.cluster.documents import Member
from p2pnode.host import open_host
from p2pnode.identity import KeyPair
from p2pnode.platform.bus import push


def fill(path):
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


async def test_a_full_disk_while_running_is_reported_and_survived(tmpfs, tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO)
    small_tmpfs = tmp_path / "small"
    tmpfs(small_tmpfs, "4m")
    kit = ClusterKit()
    a = ClusterNode(kit, small_tmpfs, "a")  # A's data dir is on the small filesystem
    b = ClusterNode(kit, tmp_path, "b")
    await a.start(nursery)
    await b.start(nursery)
    first = kit.snapshot([a.member(), b.member()])
    await a.node.membership.offer(first)
    await wait_for(lambda: a.node.health.state == b.node.health.state == "healthy", what="healthy")

    fill(small_tmpfs / "filler")
    newer = kit.snapshot([a.member(["x"]), b.member()])
    verdict = await a.node.membership.offer(newer)
    # not stored, so not in force and not forwarded: status never shows what the disk did not take
    assert (verdict.result, verdict.code) == ("failed", "store"), verdict
    assert a.node.membership.current_envelope == first
    await wait_for(lambda: a.node.status.view()["problems"], what="a store problem in status")
    assert "node.db: full:" in a.node.status.view()["problems"][0]
    # the node keeps serving: heartbeats flow both ways, and it still answers pings
    def heard_from_a():
        record = b.node.heartbeat.peers.get(a.peer_id)
        return record.received if record else 0

    received = heard_from_a()
    await wait_for(lambda: heard_from_a() > received + 2, what="heartbeats from a")
    await wait_for(lambda: a.node.health.state == "healthy", what="a healthy")  # 0.3 s heartbeats: a busy moment may blip

    (small_tmpfs / "filler").unlink()
    await wait_for(lambda: not a.node.status.view()["problems"], timeout=45, what="problem cleared")
    assert (await a.node.membership.offer(newer)).result == "accepted"
    await wait_for(lambda: b.node.membership.current_envelope == newer, what="forwarded once stored")
    assert caplog.text.count("action=store_write_failed") == 1  # one line per kind of failure, not per retry
    assert "action=store_recovered" in caplog.text


async def test_a_large_snapshot_with_a_long_forwarded_to_is_forwarded_without_crashing(tmp_path, nursery):
    kit = ClusterKit()
    a, b = ClusterNode(kit, tmp_path, "a"), ClusterNode(kit, tmp_path, "b")
    await a.start(nursery)
    await b.start(nursery)
    await a.node.membership.offer(kit.snapshot([a.member(), b.member()]))
    await wait_for(lambda: a.node.health.state == b.node.health.state == "healthy", what="healthy")
    filler = [Member(KeyPair.generate().peer_id, f"f{i}", (), tuple(f"{i}-{j}-" + "l" * 50 for j in range(62)))
              for i in range(1020)]
    big = kit.snapshot([a.member(), b.member(), *filler])
    assert len(big.payload) > 3.45 * (1 << 20)
    strangers = [str(KeyPair.generate().peer_id) for _ in range(10_000)]
    async with open_host(kit.admin) as admin:  # large documents come from an admin showing its proof
        verdict = await push(admin, await admin.connect(a.full_addr), big, forwarded_to=strangers, auth=kit.proof())
    assert verdict.result == "accepted"
    await wait_for(lambda: b.node.membership.current_envelope == big, what="b got the big snapshot")
    assert a.node.bus.forward_drops == 0


async def test_an_invalid_newest_snapshot_falls_back_to_the_previous_one_and_bad_rows_are_skipped(tmp_path, nursery, caplog):
    import sqlite3

    caplog.set_level(logging.INFO)
    kit = ClusterKit()
    a = ClusterNode(kit, tmp_path, "a")
    await a.start(nursery)
    first = kit.snapshot([a.member(["first"])])
    await a.node.membership.offer(first)
    second = kit.snapshot([a.member(["second"])])
    await a.node.membership.offer(second)
    await a.stop()
    with sqlite3.connect(a.data_dir / "node.db") as db:
        blob = db.execute("SELECT envelope FROM documents WHERE digest = ?", (second.digest(),)).fetchone()[0]
        broken = bytearray(blob)
        broken[broken.index(b"second")] ^= 0x01  # inside the signed payload: the signature no longer holds
        db.execute("UPDATE documents SET envelope = ? WHERE digest = ?", (bytes(broken), second.digest()))
        db.execute("INSERT INTO documents VALUES ('membership-snapshot', '', 'x', 'not a number', X'00', 'now', NULL)")
    await a.start(nursery)
    assert a.node.membership.current_envelope == first  # the newest valid one
    assert a.node.health.state == "healthy"
    assert "action=stored_document_invalid" in caplog.text
