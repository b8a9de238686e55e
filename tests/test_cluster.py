"""The control plane end to end: real nodes on loopback, a real DNS server, real SQLite files."""

import logging

import trio

from clusterkit import ClusterKit, ClusterNode, wait_for
from dnsserver import dnsmasq
from p2pnode.cluster.status import fetch_status


async def test_five_nodes_bootstrap_through_dns_and_survive_losing_three(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    kit = ClusterKit()
    nodes = [ClusterNode(kit, tmp_path, f"n{i}") for i in range(5)]  # identities and ports first, for the records
    records = [("_dnsaddr.cluster.test", f"dnsaddr={n.full_addr}") for n in nodes]
    with dnsmasq(records) as nameserver:
        for n in nodes:
            n.set_bootstrap([("dns", "cluster.test")], [nameserver])
        async with trio.open_nursery() as nursery:
            for n in nodes:
                await n.start(nursery)
            # before any snapshot: unconfigured, but the DNS records already connect everyone
            await wait_for(lambda: all(len(n.node.host.connections()) >= 4 for n in nodes), timeout=30, what="DNS bootstrap mesh")
            assert all(n.node.health.state == "unconfigured" for n in nodes)

            # one snapshot offered to one node reaches every node
            verdict = await nodes[0].node.membership.offer(kit.snapshot([n.member() for n in nodes]))
            assert verdict.result == "accepted"
            await wait_for(lambda: all(n.node.health.state == "healthy" for n in nodes), timeout=30, what="all healthy")
            issued = {n.node.membership.current.issued_at for n in nodes}
            assert len(issued) == 1
            assert "action=state_change from=unconfigured to=healthy" in caplog.text

            # lose three of five: the two left are a minority (2 * 2 <= 5) → degraded
            for n in nodes[2:]:
                await n.stop()
            await wait_for(lambda: all(n.node.health.state == "degraded" for n in nodes[:2]), timeout=20, what="degraded")
            await nodes[0].node.db.flush()
            assert await nodes[0].node.health.history.last(2) == [("unconfigured", "healthy"), ("healthy", "degraded")]

            # restart them on the same data dirs: keys and the stored snapshot come back → healthy
            for n in nodes[2:]:
                await n.start(nursery)
                assert n.node.membership.current.issued_at in issued
            await wait_for(lambda: all(n.node.health.state == "healthy" for n in nodes), timeout=30, what="healthy after restart")

            # status over the network, asked by a member (nodes answer members only): signed by the
            # node, with its view of every member
            asker = nodes[0].node.host
            with trio.fail_after(20):
                while True:  # heartbeats carry each member's state; the restarted ones catch up
                    view = await fetch_status(asker, nodes[1].peer_id, members=True)
                    others = [m for m in view["members"] if not m["self"]]
                    if all(m["last_heartbeat"] and m["online"] and m["state"] == "healthy" for m in others):
                        break
                    await trio.sleep(0.1)
            assert view["state"] == "healthy" and view["member_count"] == 5 and view["online_count"] == 5
            assert {m["name"] for m in view["members"]} == {f"n{i}" for i in range(5)}
            assert view["peer_id"] == str(nodes[1].peer_id)
            nursery.cancel_scope.cancel()
