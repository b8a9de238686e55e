"""The block exchange between real hosts on loopback: by hash, verified, members only, wrong
blocks counted and their sender avoided, requests spread over peers, bytes in flight bounded."""

import hashlib
import os

import pytest
import trio

from conftest import LOOPBACK_TCP
from p2pnode.identity import KeyPair
from p2pnode.platform.blocks import AVOID_AFTER, BlockExchange, BlockUnavailable, ByteBudget, VerifiedBlock
from p2pnode.platform.roster import Roster


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Store(dict):
    async def get_async(self, digest):
        return self.get(digest)


class Node:
    def __init__(self, host, members, **exchange):
        self.host = host
        self.roster = Roster(host.peer_id)
        self.roster.update(members)
        self.blocks = BlockExchange(host, self.roster, **exchange)
        self.store = Store()

        async def provider(digest):
            return self.store.get(digest)

        self.blocks.add_provider(provider)

    def hold(self, data: bytes) -> bytes:
        self.store[h(data)] = data
        return h(data)


@pytest.fixture
async def trio_hosts(make_host):
    keys = [KeyPair.generate() for _ in range(3)]
    members = [k.peer_id for k in keys]
    async with make_host(LOOPBACK_TCP, identity=keys[0]) as a, make_host(LOOPBACK_TCP, identity=keys[1]) as b, \
            make_host(LOOPBACK_TCP, identity=keys[2]) as c:
        nodes = [Node(x, members) for x in (a, b, c)]
        for x in nodes[1:]:
            await nodes[0].host.connect(x.host.full_addrs()[0])
        yield nodes


async def test_fetch_by_hash_from_whoever_has_it(trio_hosts):
    a, b, c = trio_hosts
    block = os.urandom(1 << 20)
    digest = c.hold(block)
    data, source = await a.blocks.fetch(digest, [b.host.peer_id, c.host.peer_id])
    assert data == block and source == c.host.peer_id
    assert a.blocks.counters(b.host.peer_id).missing == 1
    assert a.blocks.counters(c.host.peer_id).bytes_in == len(block) and c.blocks.blocks_served == 1
    with pytest.raises(BlockUnavailable, match="missing"):
        await a.blocks.fetch(h(b"nobody has this"), [b.host.peer_id, c.host.peer_id])


async def test_a_wrong_block_is_refused_counted_and_its_sender_avoided(trio_hosts):
    a, b, c = trio_hosts
    good = b"the real block" * 1000
    digest = h(good)
    b.store[digest] = b"a forgery" * 1000  # b answers with the wrong bytes for that hash
    c.store[digest] = good
    b.blocks.read_local = b.store.get_async  # a lying node skips its own check
    for _ in range(AVOID_AFTER):
        with pytest.raises(BlockUnavailable, match="wrong data"):
            await a.blocks.fetch(digest, [b.host.peer_id])
    assert a.blocks.counters(b.host.peer_id).hash_failures == AVOID_AFTER and a.blocks.hash_failures == AVOID_AFTER
    assert a.blocks.avoided(b.host.peer_id)
    data, source = await a.blocks.fetch(digest, [b.host.peer_id, c.host.peer_id])
    assert (data, source) == (good, c.host.peer_id)  # the avoided peer is asked last


async def test_non_members_are_refused(trio_hosts, make_host):
    a, b, c = trio_hosts
    digest = a.hold(b"members only")
    async with make_host(LOOPBACK_TCP) as stranger_host:
        stranger = Node(stranger_host, [stranger_host.peer_id, a.host.peer_id])
        await stranger_host.connect(a.host.full_addrs()[0])
        with pytest.raises(BlockUnavailable, match="forbidden"):
            await stranger.blocks.fetch(digest, [a.host.peer_id])
    assert a.blocks.blocks_served == 0


async def test_requests_spread_over_peers_and_the_budget_bounds_bytes_in_flight(trio_hosts):
    a, b, c = trio_hosts
    blocks = [os.urandom(256 << 10) for _ in range(16)]
    for block in blocks:
        b.hold(block)
        c.hold(block)
    budget = ByteBudget(1 << 20)
    peak = 0

    async def get(block):
        nonlocal peak
        await budget.acquire(len(block))
        peak = max(peak, budget.used)
        try:
            data, _ = await a.blocks.fetch(h(block), [b.host.peer_id, c.host.peer_id])
            assert data == block
        finally:
            budget.release(len(block))

    async with trio.open_nursery() as n:
        for block in blocks:
            n.start_soon(get, block)
    assert peak <= 1 << 20
    served = (b.blocks.blocks_served, c.blocks.blocks_served)
    assert sum(served) == 16 and min(served) >= 4, served


async def _pair(make_host, server_limits=None, client_limits=None, **exchange):
    """A client exchange and a server node on loopback, with the resource limits given."""
    from p2pnode.host import HostConfig
    from p2pnode.host.resources import Limits

    keys = [KeyPair.generate() for _ in range(2)]
    members = [k.peer_id for k in keys]
    client = make_host(config=HostConfig(listen=(LOOPBACK_TCP,), limits=client_limits or Limits()), identity=keys[0])
    server = make_host(config=HostConfig(listen=(LOOPBACK_TCP,), limits=server_limits or Limits()), identity=keys[1])
    return client, server, members, exchange


async def test_requests_to_one_peer_stay_under_its_stream_limit(make_host):
    """The peer refuses inbound streams beyond its per-connection limit: the exchange keeps fewer
    requests than that in flight to it, and every block arrives."""
    from p2pnode.host.resources import Limits

    client, server, members, _ = await _pair(make_host, server_limits=Limits(max_streams_per_connection=12))
    async with client as a_host, server as b_host:
        a, b = Node(a_host, members, max_requests_per_peer=8), Node(b_host, members)
        blocks = [os.urandom(200 << 10) for _ in range(64)]  # above the batch size: a stream each
        for block in blocks:
            b.hold(block)
        serving = peak = 0
        held = b.store.get

        async def slow_provider(digest):
            nonlocal serving, peak
            serving += 1
            peak = max(peak, serving)
            await trio.sleep(0.01)
            serving -= 1
            return held(digest)

        b.blocks.providers = [(slow_provider, None)]
        await a_host.connect(b_host.full_addrs()[0])
        got = {}

        async def get(block):
            got[h(block)], _ = await a.blocks.fetch(h(block), [b_host.peer_id])

        async with trio.open_nursery() as n:
            for block in blocks:
                n.start_soon(get, block)
        assert all(got[h(block)] == block for block in blocks)
        assert peak <= 8 and not a.blocks.inflight


async def test_replies_that_do_not_fit_this_nodes_memory_wait_and_are_asked_again(make_host):
    """A connection whose memory is smaller than the replies in flight: requests refused by this
    node's own limit are not the peer's fault; they wait for others and are asked again."""
    from p2pnode.host.resources import Limits

    small = Limits(connection_memory=3 << 20, peer_memory=4 << 20)
    client, server, members, _ = await _pair(make_host, client_limits=small)
    async with client as a_host, server as b_host:
        a, b = Node(a_host, members), Node(b_host, members)
        blocks = [os.urandom(1 << 20) for _ in range(12)]
        for block in blocks:
            b.hold(block)
        await a_host.connect(b_host.full_addrs()[0])

        async def get(block):
            data, _ = await a.blocks.fetch(h(block), [b_host.peer_id], size=len(block))
            assert data == block and isinstance(data, VerifiedBlock) and data.digest == h(block)

        async with trio.open_nursery() as n:
            for block in blocks:
                n.start_soon(get, block)
        assert not a.blocks.inflight and not a.blocks.sending
        assert a.blocks.counters(b_host.peer_id).blocks_in == 12 and a.blocks.counters(b_host.peer_id).missing == 0


async def test_small_blocks_travel_in_batches_and_missing_ones_fall_back(trio_hosts):
    """64 small blocks to one peer cost one or two requests, not 64; a block the first peer
    lacks in a batch is asked of the next candidate."""
    a, b, c = trio_hosts
    blocks = [os.urandom(1000 + i) for i in range(64)]
    for block in blocks[:-1]:
        b.hold(block)
    c.hold(blocks[-1])
    requests = []
    from p2pnode.platform import rpc as rpc_module

    original = rpc_module.request

    async def counting(host, peer, protocol, message, limits):
        requests.append(len(message.get("hashes", [message.get("hash")])))
        return await original(host, peer, protocol, message, limits)

    rpc_module.request = counting
    try:
        got = {}

        async def get(block):
            got[h(block)], _ = await a.blocks.fetch(h(block), [b.host.peer_id], [c.host.peer_id], size=len(block))

        async with trio.open_nursery() as n:
            for block in blocks:
                n.start_soon(get, block)
    finally:
        rpc_module.request = original
    assert all(got[h(block)] == block for block in blocks)
    assert len(requests) <= 4 and sum(requests) == 65, requests  # 64 in batch(es) to b, then the missing one to c
    assert b.blocks.blocks_served == 63 and c.blocks.blocks_served == 1
