"""DNS TXT bootstrap against a real DNS server (dnsmasq on loopback), and the dial backoff."""

import logging
import random

import pytest
import trio

from clusterkit import ClusterKit, ClusterNode, wait_for
from dnsserver import dnsmasq
from p2pnode import bootstrap
from p2pnode.cluster.connectivity import BACKOFF_CAP, backoff_delay
from p2pnode.config import InitConnection
from p2pnode.host import HostConfig, open_host
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr
from p2pnode.stdproto import ping

A = KeyPair.generate().peer_id
B = KeyPair.generate().peer_id


async def test_dnsaddr_records_nested_and_merged(caplog):
    caplog.set_level(logging.WARNING)
    records = [
        ("_dnsaddr.cluster.test", f"dnsaddr=/ip4/10.0.0.1/tcp/4100/p2p/{A}"),
        ("_dnsaddr.cluster.test", f"dnsaddr=/ip4/10.0.0.1/tcp/4101/ws/p2p/{A}"),
        ("_dnsaddr.cluster.test", f"/ip6/fd00::2/tcp/4100/p2p/{B}"),  # a bare multiaddr
        ("_dnsaddr.cluster.test", "dnsaddr=/dnsaddr/more.test"),  # nested
        ("_dnsaddr.cluster.test", "v=spf1 -all"),  # unrelated TXT sharing the name
        ("_dnsaddr.cluster.test", "dnsaddr=/ip4/10.0.0.9/udp/1"),  # unsupported: skipped, logged
        ("_dnsaddr.more.test", f"dnsaddr=/dns4/b.cluster.test/tcp/4100/p2p/{B}"),
        ("plain.test", f"/ip4/10.0.0.3/tcp/1/p2p/{A}"),  # no _dnsaddr: falls back to the domain itself
        ("_dnsaddr.loop.test", "dnsaddr=/dnsaddr/loop.test"),
    ]
    with dnsmasq(records) as ns:
        resolver = bootstrap.Resolver([ns])
        merged = await bootstrap.resolve_init_connections(resolver, [InitConnection("dns", "cluster.test")])
        # DNS answers in no particular order: compare as sets
        assert {k: set(v) for k, v in merged.items()} == {
            A: {Multiaddr.parse("/ip4/10.0.0.1/tcp/4100"), Multiaddr.parse("/ip4/10.0.0.1/tcp/4101/ws")},
            B: {Multiaddr.parse("/ip6/fd00::2/tcp/4100"), Multiaddr.parse("/dns4/b.cluster.test/tcp/4100")},
        }
        assert "bootstrap_bad_record" in caplog.text and "unknown protocol 'udp'" in caplog.text
        assert await bootstrap.resolve_dnsaddr(resolver, "plain.test") == [Multiaddr.parse(f"/ip4/10.0.0.3/tcp/1/p2p/{A}")]
        with pytest.raises(bootstrap.BootstrapError, match="nested deeper than 4"):
            await bootstrap.resolve_dnsaddr(resolver, "loop.test")
        # a /dnsaddr multiaddr in init_connections resolves the same way; failures are skipped, not fatal
        merged = await bootstrap.resolve_init_connections(
            resolver, [InitConnection("multiaddr", "/dnsaddr/more.test"), InitConnection("dns", "loop.test")]
        )
        assert list(merged) == [B]
        assert await bootstrap.resolve_dnsaddr(resolver, "absent.test") == []


async def test_dns4_is_resolved_at_dial_time_through_the_configured_server():
    async with open_host(KeyPair.generate(), HostConfig(listen=(Multiaddr.parse("/ip4/127.0.0.1/tcp/0"),))) as target:
        port = target.listen_addrs[0].value_for("tcp")
        with dnsmasq([], a=[("node1.cluster.test", "127.0.0.1")]) as ns:
            resolver = bootstrap.Resolver([ns])
            async with open_host(KeyPair.generate()) as client:
                client.name_resolver = resolver.ips
                conn = await client.connect(f"/dns4/node1.cluster.test/tcp/{port}/p2p/{target.peer_id}")
                assert conn.peer_id == target.peer_id
                assert await ping.ping(client, conn)
                from p2pnode.errors import DialError

                with pytest.raises(DialError, match="missing.cluster.test"):
                    await client.connect(f"/dns4/missing.cluster.test/tcp/{port}")


async def test_dns_server_down_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(bootstrap, "LIFETIME", 0.5)  # the error is the point, not the 5 s it takes by default
    resolver = bootstrap.Resolver(["127.0.0.1:9"])  # nothing answers there
    with trio.fail_after(20):
        with pytest.raises(bootstrap.BootstrapError, match="DNS lookup of _dnsaddr.cluster.test TXT failed"):
            await bootstrap.resolve_dnsaddr(resolver, "cluster.test")


def test_backoff_is_exponential_jittered_and_capped():
    rng = random.Random(1)
    for attempt in range(1, 12):
        delays = [backoff_delay(attempt, rng) for _ in range(200)]
        nominal = min(BACKOFF_CAP, 0.5 * 2 ** (attempt - 1))
        assert all(nominal * 0.5 <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > nominal * 0.3  # jitter spreads retries
    assert backoff_delay(50, rng) <= 30.0


async def test_a_bootstrap_peer_that_hangs_up_at_once_is_redialed_ever_more_slowly(tmp_path, nursery):
    """A connection that ends right away counts as a failed attempt: no redial loop (issue 8)."""
    accepted: list[float] = []

    def hang_up(conn) -> None:
        accepted.append(trio.current_time())
        conn.nursery.start_soon(conn.muxer.aclose)

    node = ClusterNode(ClusterKit(), tmp_path, "a")
    key = KeyPair.generate()
    while key.peer_id < node.peer_id:  # a smaller peer ID would be redialed only after DEFER_LARGER anyway
        key = KeyPair.generate()
    async with open_host(key, HostConfig(listen=(Multiaddr.parse("/ip4/127.0.0.1/tcp/0"),))) as peer:
        peer.on_connected(hang_up)
        node.set_bootstrap([("multiaddr", str(peer.full_addrs()[0]))])
        await node.start(nursery)
        await wait_for(lambda: len(accepted) >= 2, what="a redial")
        await trio.sleep(5)  # a window to count redials in: 0.5 s doubling gives 3 or 4 more
        await node.stop()
    gaps = [b - a for a, b in zip(accepted, accepted[1:])]
    assert len(accepted) <= 7, f"redialed {len(accepted)} times, gaps {gaps}"
    assert gaps[-1] > gaps[0], f"the delay does not grow: {gaps}"
