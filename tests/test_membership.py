"""Membership and heartbeats between real nodes: pushes, refusals, forwarding, revocation, replay."""

import logging

import pytest
import trio

from clusterkit import HOUR, ClusterKit, ClusterNode, wait_for
from p2pnode import codec, timefmt
from p2pnode.cluster.heartbeat import PROTOCOL as HEARTBEAT
from p2pnode.cluster.heartbeat import Heartbeat
from p2pnode.envelope import Envelope
from p2pnode.host import open_host
from p2pnode.identity import KeyPair
from p2pnode.platform.bus import push
from p2pnode.streamio import send_message


@pytest.fixture
async def pair(tmp_path, nursery):
    """Two nodes A and B, members of a snapshot, connected; plus the kit that signs for them."""
    kit = ClusterKit()
    a, b = ClusterNode(kit, tmp_path, "a"), ClusterNode(kit, tmp_path, "b")
    b.set_bootstrap([("multiaddr", str(a.full_addr))])
    await a.start(nursery)
    await b.start(nursery)
    await a.node.membership.offer(kit.snapshot([a.member(), b.member()]))
    await wait_for(lambda: b.node.membership.current is not None and b.node.health.state == "healthy", what="b joined")
    return kit, a, b


async def test_push_from_outside_reaches_both_and_refusals_stay_put(pair, caplog):
    caplog.set_level(logging.INFO)
    kit, a, b = pair
    before = b.node.membership.current.issued_at
    async with open_host(KeyPair.generate()) as admin:
        conn = await admin.connect(a.full_addr)

        async def offer(env):
            return await push(admin, conn, env)

        # every refusal is answered with a reason and forwarded nowhere
        payload = codec.decode(kit.snapshot([a.member()]).payload)
        forged = Envelope("membership-snapshot", codec.encode(payload), kit.admin.public_key, b"\0" * 64)
        cases = {
            "bad_signature": forged,
            "wrong_cluster": kit.snapshot([a.member()], cluster_id="other", proof=kit.proof(cluster_id="other")),
            "proof_expired": kit.snapshot([a.member()], proof=kit.proof(valid_from=timefmt.now_ns() - 48 * HOUR,
                                                                          valid_until=timefmt.now_ns() - 24 * HOUR)),
            "no_admin_proof": kit.snapshot([a.member()], proof=None),
        }
        for code, env in cases.items():
            verdict = await offer(env)
            assert (verdict.result, verdict.code) == ("rejected", code), verdict
        stale = await offer(kit.snapshot([a.member()], issued_at=timefmt.now_ns() - HOUR))
        assert (stale.result, stale.code) == ("ignored", "not_newer")
        assert a.node.membership.rejections == {code: 1 for code in cases}
        await trio.sleep(0.3)
        assert b.node.membership.rejections == {} and b.node.membership.current.issued_at == before

        # a valid newer snapshot is accepted and forwarded once
        newer = kit.snapshot([a.member(), b.member(["db"])])
        assert (await offer(newer)).result == "accepted"
        await wait_for(lambda: b.node.membership.current.member(b.peer_id).labels == ("db",), what="forwarded")
        assert (await offer(newer)).result == "ignored"  # the same one again: equal issued_at
    assert "action=apply_snapshot_push" in caplog.text and "action=snapshot_rejected code=bad_signature" in caplog.text


async def test_revocation_spreads_persists_and_blocks_the_admin(pair, nursery):
    kit, a, b = pair
    async with open_host(KeyPair.generate()) as admin:
        conn = await admin.connect(a.full_addr)
        verdict = await push(admin, conn, kit.revocation([kit.admin]))
        assert verdict.result == "accepted"
        await wait_for(lambda: b.node.membership.revocations, what="revocation forwarded")
        refused = await push(admin, conn, kit.snapshot([a.member(), b.member()]))
        assert (refused.result, refused.code) == ("rejected", "revoked_admin")
        # a new admin with a fresh proof still works ("rotate")
        new_admin = KeyPair.generate()
        ok = await push(admin, conn, kit.snapshot([a.member(), b.member()], admin=new_admin))
        assert ok.result == "accepted"
        await wait_for(lambda: b.node.membership.current.issuer_peer_id == new_admin.peer_id, what="b has the new snapshot")
    # after a restart the revocation and the newest snapshot are still in force
    issued = b.node.membership.current.issued_at
    await b.stop()
    await b.start(nursery)
    assert b.node.membership.current.issued_at == issued
    verdict = await b.node.membership.offer(kit.snapshot([a.member(), b.member()]))
    assert verdict.code == "revoked_admin"


async def test_heartbeat_replay_window_and_impostors(pair, caplog):
    caplog.set_level(logging.INFO)
    kit, a, b = pair
    # a third member M, whose heartbeats the test writes by hand
    m = KeyPair.generate()
    from p2pnode.cluster.documents import Member

    await a.node.membership.offer(kit.snapshot([a.member(), b.member(), Member(m.peer_id, "m")]))
    await wait_for(lambda: b.node.membership.is_member(m.peer_id), what="M is a member")
    hb = b.node.heartbeat

    def beat(seq, *, sent_at=None, peer_id=None, key=m):
        return Heartbeat(peer_id or m.peer_id, kit.cluster_id, "healthy", "", seq, sent_at or timefmt.now_ns()).sign(key).to_bytes()

    async with open_host(m) as mhost:
        stream = await mhost.new_stream(await mhost.connect(b.full_addr), HEARTBEAT)
        first_seq = timefmt.now_ns()
        first = beat(first_seq)
        for message in [
            first,
            first,  # replayed
            beat(first_seq - 10),  # a lower seq, freshly signed: also a replay
            beat(timefmt.now_ns() + 1, sent_at=timefmt.now_ns() - 10 * 60 * timefmt.NS),
            beat(timefmt.now_ns() + 2, peer_id=a.peer_id),  # claims to be A
            beat(timefmt.now_ns() + 3, key=KeyPair.generate()),  # signed by someone else
            b"\xa1\x01\x02",  # not an envelope
            beat(timefmt.now_ns() + 4),
        ]:
            await send_message(stream, message)
        await wait_for(lambda: hb.peers.get(m.peer_id) is not None and hb.peers[m.peer_id].received == 2, what="heartbeats")
        await stream.aclose()
    assert dict(hb.rejections) == {"replay": 2, "outside_window": 1, "wrong_sender": 2, "invalid": 1}
    assert "action=heartbeat_rejected" in caplog.text

    # the last accepted seq survives B's restart: the first heartbeat still counts as a replay
    assert hb.receive(first, m.peer_id) == "replay"


async def test_non_members_are_ignored_quietly(pair, caplog):
    kit, a, b = pair
    caplog.set_level(logging.INFO)
    outsider = KeyPair.generate()
    async with open_host(outsider) as h:
        stream = await h.new_stream(await h.connect(b.full_addr), HEARTBEAT)
        message = Heartbeat(outsider.peer_id, kit.cluster_id, "healthy", "", timefmt.now_ns(), timefmt.now_ns()).sign(outsider)
        await send_message(stream, message.to_bytes())
        with trio.fail_after(5):
            assert await stream.receive_some() == b""  # closed quietly (FIN, not reset)
    assert b.node.heartbeat.rejections == {}
    assert outsider.peer_id not in b.node.heartbeat.peers
    assert "heartbeat_rejected" not in caplog.text
    # and nobody sends heartbeats to it
    assert all(p in (a.peer_id, b.peer_id) for p in a.node.heartbeat._streams)


async def test_heartbeat_seq_grows_across_restart(pair, nursery):
    kit, a, b = pair
    await wait_for(lambda: a.node.heartbeat.sent > 0, what="a sent")
    last = a.node.heartbeat.core.seq
    await a.stop()
    await a.start(nursery)
    assert a.node.heartbeat.core.seq >= last  # restored from the store
    assert a.node.heartbeat.next_seq() > last


async def test_forwarded_to_limits_the_flood_but_not_the_reach(tmp_path, nursery):
    kit = ClusterKit()
    a, b, c = (ClusterNode(kit, tmp_path, n) for n in "abc")
    for n in (a, b, c):
        await n.start(nursery)
    await a.node.membership.offer(kit.snapshot([a.member(), b.member(), c.member()]))
    # a full mesh first: a connection made later would (rightly) pull the snapshot and blur the test
    await wait_for(lambda: all(len(n.node.host.connections()) == 2 and n.node.health.state == "healthy" for n in (a, b, c)),
                   what="full mesh")
    async with open_host(KeyPair.generate()) as admin:
        # B is told A and C are already being sent this one: B forwards to nobody
        covered = kit.snapshot([a.member(), b.member(), c.member(["x"])])
        covering = [str(a.peer_id), str(b.peer_id), str(c.peer_id)]
        assert (await push(admin, await admin.connect(b.full_addr), covered, forwarded_to=covering)).result == "accepted"
        await trio.sleep(0.5)
        assert c.node.membership.current.member(c.peer_id).labels == ()
        assert a.node.membership.current.member(c.peer_id).labels == ()
        # a plain push to B reaches A and C through B
        plain = kit.snapshot([a.member(), b.member(), c.member(["y"])])
        assert (await push(admin, await admin.connect(b.full_addr), plain)).result == "accepted"
        await wait_for(lambda: all(n.node.membership.current.member(c.peer_id).labels == ("y",) for n in (a, b, c)), what="reach")


@pytest.fixture
async def trio_of_nodes(tmp_path, nursery):
    """Three healthy member nodes A, B, C and their kit."""
    kit = ClusterKit()
    a, b, c = (ClusterNode(kit, tmp_path, n) for n in "abc")
    for n in (a, b, c):
        await n.start(nursery)
    await a.node.membership.offer(kit.snapshot([a.member(), b.member(), c.member()]))
    await wait_for(lambda: all(n.node.health.state == "healthy" for n in (a, b, c)), what="healthy")
    return kit, a, b, c


async def test_a_node_removed_by_a_snapshot_learns_it_and_becomes_unconfigured(trio_of_nodes):
    kit, a, b, c = trio_of_nodes
    # C is dropped: the push reaches C too (a previous member), so C knows it is out
    assert (await b.node.membership.offer(kit.snapshot([a.member(), b.member()]))).result == "accepted"
    await wait_for(lambda: c.node.health.state == "unconfigured", what="C unconfigured")
    assert c.node.membership.current.member(c.peer_id) is None
    assert {n.node.health.state for n in (a, b)} == {"healthy"}


async def test_equal_issued_at_converges_on_the_lower_digest_everywhere(trio_of_nodes):
    kit, a, b, c = trio_of_nodes
    at = timefmt.now_ns()
    x = kit.snapshot([a.member(["x"]), b.member(), c.member()], issued_at=at)
    y = kit.snapshot([a.member(["y"]), b.member(), c.member()], issued_at=at)
    winner, loser = sorted([x, y], key=lambda e: e.digest())
    # the loser first at one node, the winner at another, at the same moment
    async with trio.open_nursery() as n:
        n.start_soon(a.node.membership.offer, loser)
        n.start_soon(c.node.membership.offer, winner)
    await wait_for(lambda: all(n.node.membership.current_envelope == winner for n in (a, b, c)), what="converged")
    assert (await b.node.membership.offer(loser)).code == "not_newer"


async def test_a_pull_larger_than_one_reply_arrives_in_rounds(tmp_path, nursery, monkeypatch):
    from p2pnode.platform import bus, rpc

    monkeypatch.setattr(bus, "PULL_LIMITS", rpc.Limits(max_request=4 << 20, max_reply=(64 << 10) + 2000, timeout=10))
    kit = ClusterKit()
    a, b = ClusterNode(kit, tmp_path, "a"), ClusterNode(kit, tmp_path, "b")
    await a.start(nursery)
    revoked = [KeyPair.generate() for _ in range(40)]
    for key in revoked:
        rev = kit.revocation([key])
        assert (await a.node.membership.offer(rev)).result == "accepted"
    b.set_bootstrap([("multiaddr", str(a.full_addr))])
    await b.start(nursery)
    await wait_for(lambda: len(b.node.membership.revocations) == 40, what="all 40 revocations pulled")
