"""Members-only protocols: what a stranger, an admin with its proof, and a member may read and
push (issue 8: answer non-members with as little as possible)."""

import logging
from contextlib import AsyncExitStack

import pytest
import trio

from clusterkit import ClusterKit, ClusterNode, wait_for
from p2pnode import timefmt
from p2pnode.cluster.documents import Member
from p2pnode.cluster.heartbeat import PROTOCOL as HEARTBEAT
from p2pnode.cluster.heartbeat import Heartbeat
from p2pnode.cluster.status import fetch_status
from p2pnode.host import HostConfig, open_host
from p2pnode.identity import KeyPair
from p2pnode.platform import bus, rpc
from p2pnode.platform.rpc import RequestRefused
from p2pnode.streamio import send_message


@pytest.fixture
async def member_pair(tmp_path, nursery):
    kit = ClusterKit()
    a, b = ClusterNode(kit, tmp_path, "a"), ClusterNode(kit, tmp_path, "b")
    b.set_bootstrap([("multiaddr", str(a.full_addr))])
    await a.start(nursery)
    await b.start(nursery)
    await a.node.membership.offer(kit.revocation([KeyPair.generate()]))
    await a.node.membership.offer(kit.snapshot([a.member(), b.member()]))
    await wait_for(lambda: b.node.health.state == "healthy", what="b joined")
    return kit, a, b


async def test_a_stranger_reads_nothing_but_revocations(member_pair):
    kit, a, b = member_pair
    async with open_host(KeyPair.generate(), HostConfig()) as stranger:
        conn = await stranger.connect(a.full_addr)
        with pytest.raises(RequestRefused, match="forbidden"):
            await fetch_status(stranger, conn)
        docs = await bus.pull(stranger, conn, ["membership-snapshot", "revocation"])
        assert [d.type for d in docs] == ["revocation"]
        # a proof is only good for the key it names: someone else's proof does not open the door
        docs = await bus.pull(stranger, conn, ["membership-snapshot"], auth=kit.proof())
        assert docs == []


async def test_an_admin_with_its_key_and_proof_reads_everything(member_pair):
    kit, a, b = member_pair
    async with open_host(kit.admin, HostConfig()) as admin:
        conn = await admin.connect(a.full_addr)
        docs = await bus.pull(admin, conn, ["membership-snapshot", "revocation"], auth=kit.proof())
        assert sorted(d.type for d in docs) == ["membership-snapshot", "revocation"]
        view = await fetch_status(admin, conn, members=True, auth=kit.proof())
        assert view["member_count"] == 2 and len(view["members"]) == 2
        # an expired proof does not
        expired = kit.proof(valid_from=timefmt.now_ns() - 7200 * 10**9, valid_until=timefmt.now_ns() - 3600 * 10**9)
        with pytest.raises(RequestRefused):
            await fetch_status(admin, conn, auth=expired)


async def test_members_ask_each_other(member_pair):
    kit, a, b = member_pair
    view = await fetch_status(a.node.host, b.peer_id, members=True)
    assert view["state"] == "healthy" and {m["name"] for m in view["members"]} == {"a", "b"}


async def test_strangers_push_only_small_documents_and_not_many(member_pair, monkeypatch):
    kit, a, b = member_pair
    big = kit.snapshot([a.member(), b.member(), *(Member(KeyPair.generate().peer_id, f"m{i}", (), ("x" * 60,) * 60)
                                                   for i in range(300))])
    assert len(big.payload) > 1 << 20
    async with open_host(KeyPair.generate(), HostConfig()) as stranger:
        conn = await stranger.connect(a.full_addr)
        verdict = await bus.push(stranger, conn, big)
        assert (verdict.result, verdict.code) == ("rejected", "too_large") and "admin" in verdict.reason
        small = kit.revocation([KeyPair.generate()])
        verdicts = [await bus.push(stranger, conn, small) for _ in range(bus.STRANGER_PUSHES[0] + 1)]
        assert [v.code for v in verdicts[:2]] == ["", "known"] and verdicts[-1].code == "rate_limited"
    async with open_host(kit.admin, HostConfig()) as admin:  # the admin, showing its proof, is not limited
        conn = await admin.connect(a.full_addr)
        assert (await bus.push(admin, conn, big, auth=kit.proof())).result == "accepted"


async def test_strangers_cost_few_pulls_and_hand_over_few_documents(member_pair, caplog):
    """A node pulls from a stranger's new connection only now and then, and what a stranger's
    pull reply brings counts against the same budget as strangers' pushes."""
    kit, a, b = member_pair
    caplog.set_level(logging.INFO, logger="p2pnode.bus")
    bogus = [kit.revocation([KeyPair.generate()], signer=KeyPair.generate()) for _ in range(50)]
    served = 0

    async def serve_pull(request, conn):
        nonlocal served
        served += 1
        return {"docs": [d.to_dict() for d in bogus], "need_have": [], "more": False}

    strangers = bus.STRANGER_PULLS[0] + 5
    skipped_before = a.node.bus.stranger_pulls_skipped  # (b may have used one pull as a stranger, before the snapshot)
    async with AsyncExitStack() as stack:
        for _ in range(strangers):
            stranger = await stack.enter_async_context(open_host(KeyPair.generate(), HostConfig()))
            rpc.serve(stranger, bus.PULL, serve_pull, bus.PULL_LIMITS)
            await stranger.connect(a.full_addr)

        def skipped() -> int:
            return a.node.bus.stranger_pulls_skipped - skipped_before

        def verified() -> int:
            return sum(a.node.bus.rejection_counts("revocation").values())

        await wait_for(lambda: served + skipped() == strangers, what="every stranger pulled from or skipped")
        assert served <= bus.STRANGER_PULLS[0] and skipped() >= 5
        await wait_for(lambda: verified() == bus.STRANGER_PUSHES[0], what="the documents within the budget verified")
        with trio.move_on_after(1):  # and not one more, while the other pulls' replies are refused
            while True:
                assert verified() == bus.STRANGER_PUSHES[0]
                await trio.sleep(0.05)
    assert "rate_limited=" in caplog.text


async def test_a_member_removed_while_its_heartbeat_stream_stays_open_is_cut_off(tmp_path, nursery):
    kit = ClusterKit()
    a = ClusterNode(kit, tmp_path, "a")
    await a.start(nursery)
    m = KeyPair.generate()
    await a.node.membership.offer(kit.snapshot([a.member(), Member(m.peer_id, "m")]))
    hb = a.node.heartbeat

    def beat():
        return Heartbeat(m.peer_id, kit.cluster_id, "healthy", "", timefmt.now_ns(), timefmt.now_ns()).sign(m).to_bytes()

    async with open_host(m, HostConfig()) as mhost:
        stream = await mhost.new_stream(await mhost.connect(a.full_addr), HEARTBEAT)
        await send_message(stream, beat())
        await wait_for(lambda: hb.peers.get(m.peer_id) is not None and hb.peers[m.peer_id].received == 1, what="first beat")
        await a.node.membership.offer(kit.snapshot([a.member()]))  # m is removed; its stream stays open
        with trio.move_on_after(1):
            await send_message(stream, beat())
            await send_message(stream, beat())
        await trio.sleep(0.2)
    assert m.peer_id not in hb.peers  # forgotten, and nothing more was accepted from it
