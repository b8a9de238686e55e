"""The pure control-plane cores: heartbeat checks, the health judgement, dial backoff — messages and
time in, decisions out, no sockets and no waiting. And the health service driven by trio's
autojump clock: heartbeat-interval time passes without real waiting."""

import random

import pytest
import trio
import trio.testing

from p2pnode import timefmt
from p2pnode.cluster.connectivity import BACKOFF_CAP, backoff_delay
from p2pnode.cluster.health import DEGRADED, HEALTHY, UNCONFIGURED, OnlineTracker, judge
from p2pnode.cluster.heartbeat import Heartbeat, HeartbeatCore
from p2pnode.identity import KeyPair

NOW = timefmt.parse_ns("2026-11-25T12:00:00Z")
MINUTE = 60 * timefmt.NS


@pytest.fixture
def sender():
    return KeyPair.generate()


def test_heartbeat_core_makes_what_it_accepts_and_refuses_each_fault(sender):
    me, other = HeartbeatCore(KeyPair.generate(), "c"), HeartbeatCore(sender, "c")
    first = other.make(NOW, "healthy", "").to_bytes()
    hb = me.check(first, sender.peer_id, NOW + 1)
    assert isinstance(hb, Heartbeat) and hb.seq == NOW and hb.state == "healthy"
    assert me.check(first, sender.peer_id, NOW + 2) == "replay"
    assert me.check(other.make(NOW - 6 * MINUTE, "healthy", "").to_bytes(), sender.peer_id, NOW) == "outside_window"
    assert me.check(other.make(NOW + 1, "healthy", "").to_bytes(), KeyPair.generate().peer_id, NOW) == "wrong_sender"
    assert me.check(HeartbeatCore(sender, "other").make(NOW + 9, "x", "").to_bytes(), sender.peer_id, NOW) == "wrong_cluster"
    assert me.check(b"\xa0", sender.peer_id, NOW) == "invalid"
    later = other.make(NOW + 4 * MINUTE, "degraded", "").to_bytes()
    assert isinstance(me.check(later, sender.peer_id, NOW), Heartbeat)  # inside ±5 min


def test_heartbeat_seq_is_never_below_the_clock_nor_repeats(sender):
    core = HeartbeatCore(sender, "c", seq=NOW + 10**9)  # restored from before a restart, clock behind it
    assert core.next_seq(NOW) == NOW + 10**9 + 1
    assert core.next_seq(NOW + 10**10) == NOW + 10**10


def test_judge_counts_this_node_and_needs_a_strict_majority():
    a, b, c, d = (KeyPair.generate().peer_id for _ in range(4))
    assert judge([a, b, c], d, lambda p: True) == (UNCONFIGURED, [])
    assert judge([a, b, c], a, lambda p: p == b) == (HEALTHY, [a, b])
    assert judge([a, b, c, d], a, lambda p: p == b)[0] == DEGRADED  # 2 of 4 is not a majority
    assert judge([a], a, lambda p: False) == (HEALTHY, [a])


def test_online_needs_a_connection_and_news_within_three_intervals():
    peer = KeyPair.generate().peer_id
    t = OnlineTracker(interval=10)
    assert not t.is_online(peer, True, 0)
    t.heard(peer, 100)
    assert t.is_online(peer, True, 130) and not t.is_online(peer, True, 130.1)
    assert not t.is_online(peer, False, 101)
    t.keep_only(frozenset())
    assert not t.is_online(peer, True, 101)


def test_backoff_doubles_with_jitter_up_to_the_cap():
    rng = random.Random(7)
    delays = [backoff_delay(n, rng) for n in range(1, 12)]
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0
    assert all(BACKOFF_CAP / 2 <= d <= BACKOFF_CAP for d in delays[8:])


async def test_health_goes_degraded_after_three_silent_intervals_on_virtual_time(autojump_clock, tmp_path):
    """The health service, with real membership and a fake connection, on trio's virtual clock:
    90 s of heartbeat time pass in milliseconds."""
    from clusterkit import ClusterKit
    from p2pnode.cluster.health import HealthService
    from p2pnode.config import NodeConfig
    from p2pnode.platform.clock import Clock
    from p2pnode.platform.db import Database
    from p2pnode.platform.nodedb import MIGRATIONS
    from p2pnode.platform.roster import Roster
    from p2pnode.platform.service import Databases, ServiceContext

    me, peer = KeyPair.generate(), KeyPair.generate()

    class FakeHost:
        connected = {peer.peer_id}

        def on_connected(self, listener):
            pass

        def on_disconnected(self, listener):
            pass

        def connection_to(self, p):
            return object() if p in self.connected else None

    db = await Database.open(tmp_path / "node.db", MIGRATIONS)
    roster = Roster(me.peer_id)
    config = NodeConfig(data_dir=tmp_path, cluster_id=ClusterKit().cluster_id, heartbeat_interval=30)
    ctx = ServiceContext(me, config, FakeHost(), db, Clock(), None, roster, Databases(tmp_path, 1.0), None)
    health = HealthService(ctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(health.run)
        roster.update([me.peer_id, peer.peer_id])
        assert health.state == HEALTHY  # connected: counted until its first heartbeat is due
        await trio.sleep(60)
        health.heard(peer.peer_id)  # a heartbeat
        await trio.sleep(89)
        assert health.state == HEALTHY
        await trio.sleep(35)  # past 3 intervals without news and the next tick (t=180)
        assert health.state == DEGRADED and health.online == [me.peer_id]
        assert await health.history.last(3) == []  # queued, not flushed: the history is written in batches
        await db.flush()
        assert await health.history.last(3) == [(UNCONFIGURED, HEALTHY), (HEALTHY, DEGRADED)]
        nursery.cancel_scope.cancel()
    await db.close()
