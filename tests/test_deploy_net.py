"""Deploys across real nodes on loopback: signed commands offered to one node, artifacts uploaded once
and fetched block by block from peers, HTTP services started and health-checked on every target, and
the record read from a node that was not a target.

Each node has its own loopback address (127.0.0.N) as `deploy.host` and its root under
`apps/${host}`, so all nodes' services listen on one port and one command serves them all."""

from __future__ import annotations

import trio
from deploykit import SCRIPTS, Mesh, mesh_fixture, free_port, get_at, http_health, http_release, http_tar


mesh3 = mesh_fixture(3)


async def test_tar_deploy_to_two_nodes_health_checked_and_read_from_a_third(mesh3):
    mesh, port = mesh3, free_port()
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        ref = await mesh.publish(http_release("1.0"), at=0)  # one upload, to n0
        cmd = mesh.command(http_tar(ref, port), deploy_id="web-1", version="1.0", targets=[0, 1], health=http_health(port),
                           service=SCRIPTS, rollout=__import__("p2pnode.deploy.spec", fromlist=["Rollout"]).Rollout(max_parallel=2))
        verdict = await mesh.offer(mesh.sign(cmd), at=2)  # handed to a node that is not a target
        assert verdict.result == "accepted", verdict
        rec = await mesh.settled("web-1", at=2)
        assert rec["state"] == "success" and rec["type"] == "deploy.tar" and rec["app"] == "shop/api/prod", rec
        for i in (0, 1):
            row = mesh.node_row(rec, i)
            assert row["status"] == "success" and row["progress"] == 100 and row["final"] and row["success"], row
            assert "release 1.0 is current" in row["message"] and row["wave"] == 0
            assert get_at(mesh.host(i), port, "/health") == (200, "version 1.0\n")
            assert mesh.current(i) == "1.0"
        assert mesh.current(2) is None and get_at(mesh.host(2), port) is None  # not a target: nothing ran there
        # the artifact went into the mesh once and n1 fetched its blocks from n0
        assert mesh.service(0).store.uploaded_bytes == ref.size and mesh.service(0).store.fetched_bytes == 0
        assert mesh.service(1).store.fetched_bytes == ref.size and mesh.service(2).store.fetched_bytes == 0
        # every node tells the same story, and the full log of n1 can be read from n2
        assert mesh.record("web-1", at=0)["nodes"] == rec["nodes"]
        log = await mesh.service(2).remote_log("web-1", mesh.peer(1))
        assert log["source"] == "node" and "== start.sh (1.0)" in log["log"] and "health check attempt" in log["log"]
        listed = mesh.service(2).list(app="shop/api/prod")
        assert [d["deploy_id"] for d in listed] == ["web-1"] and listed[0]["state"] == "success"
        nursery.cancel_scope.cancel()


async def test_failing_health_check_rolls_back_and_the_previous_release_answers(mesh3):
    mesh, port = mesh3, free_port()
    from p2pnode.deploy.spec import Rollout

    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        for version, healthy in (("1.0", True), ("2.0", False)):
            ref = await mesh.publish(http_release(version, healthy), at=1)
            cmd = mesh.command(http_tar(ref, port), deploy_id=f"web-{version}", version=version, targets=[0, 1, 2],
                               health=http_health(port, retries=3), service=SCRIPTS, rollout=Rollout(max_parallel=3))
            assert (await mesh.offer(mesh.sign(cmd), at=0)).result == "accepted"
            rec = await mesh.settled(f"web-{version}", at=2)
        assert rec["state"] == "failed", rec
        for i in range(3):
            row = mesh.node_row(rec, i)
            assert row["status"] == "rolled_back" and row["final"] and row["success"] is False, row
            assert "health check failed" in row["message"] and "rolled back to 1.0" in row["message"]
            assert mesh.current(i) == "1.0" and not mesh.release(i, "2.0").exists()
            assert get_at(mesh.host(i), port, "/health") == (200, "version 1.0\n")  # the previous release answers
        nursery.cancel_scope.cancel()


async def test_reports_reach_a_node_that_was_down_when_it_returns(mesh3):
    from p2pnode.deploy.spec import ShellAction

    mesh = mesh3
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        await mesh.nodes[2].stop()
        cmd = mesh.command(ShellAction("echo hi"), deploy_id="while-away", version="1", targets=[0, 1])
        await mesh.offer(mesh.sign(cmd), at=0)
        done = await mesh.settled("while-away", at=1)
        assert done["state"] == "success"
        await mesh.nodes[2].start(nursery)  # it pulls the command and every report on connecting
        rec = await mesh.settled("while-away", at=2)
        assert rec["nodes"] == done["nodes"] and rec["state"] == "success"
        nursery.cancel_scope.cancel()


async def test_progress_within_a_status_is_coalesced_status_changes_are_not(tmp_path):
    from p2pnode.deploy.spec import HealthCheck, ShellAction

    mesh = Mesh(tmp_path, 2, report_interval=1.0)
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        # healthy 1.5 s after the script ran: ~30 failed attempts, each a report by the executor
        script = 'echo $(( $(date +%s%N) + 1500000000 )) > ready-at'
        health = HealthCheck("script", script='[ "$(date +%s%N)" -gt "$(cat ready-at)" ]', timeout=20, retries=100, interval=0.05)
        cmd = mesh.command(ShellAction(script), deploy_id="chatty", version="1", targets=[0], health=health)
        before = mesh.service(0).reports_sent
        assert (await mesh.offer(mesh.sign(cmd), at=1)).result == "accepted"
        assert (await mesh.settled("chatty", at=1))["state"] == "success"
        executed = await mesh.service(0).journal.reports("chatty")
        sent = mesh.service(0).reports_sent - before
        statuses = [r.status for r in executed]
        changes = 1 + sum(1 for a, b in zip(statuses, statuses[1:]) if a != b)
        checking = [r.at_ns for r in executed if r.status == "health_check"]
        assert len(checking) >= 8, statuses
        span = (checking[-1] - checking[0]) / 1e9
        # every status change, and beyond them at most one progress report per second spent in one status
        assert changes <= sent <= changes + int(span) + 1, (sent, changes, span, len(executed))
        assert sent < len(executed)
        nursery.cancel_scope.cancel()


async def test_artifacts_are_collected_once_no_kept_release_or_valid_command_needs_them(tmp_path):
    from p2pnode.deploy.spec import TarAction

    from p2pnode import timefmt

    mesh = Mesh(tmp_path, 2)
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        refs = []
        for v in ("1", "2", "3"):
            ref = await mesh.publish(__import__("deploykit").make_tar([("v", v.encode())]), at=1)
            refs.append(ref)
            cmd = mesh.command(TarAction(ref), deploy_id=f"gc-{v}", version=v, targets=[0], keep_releases=1)
            cmd = __import__("attrs").evolve(cmd, valid_until_ns=cmd.issued_at_ns + 4 * timefmt.NS)
            await mesh.offer(mesh.sign(cmd), at=1)
            assert (await mesh.settled(f"gc-{v}"))["state"] == "success"
        held = [[mesh.service(i).store.holds(r.sha256) for r in refs] for i in (0, 1)]
        assert held == [[True, True, True], [True, True, True]]
        assert await mesh.service(0).collect() == []  # every command is still valid: peers may still fetch
        with trio.fail_after(10):
            while any(mesh.record(f"gc-{v}")["valid_until"] > timefmt.now() for v in "123"):
                await trio.sleep(0.1)
        removed = sorted(await mesh.service(0).collect())
        assert removed == sorted([refs[0].sha256, refs[1].sha256])  # 3 is kept: its release is kept (keep_releases 1)
        assert sorted(await mesh.service(1).collect()) == sorted(r.sha256 for r in refs)  # the origin ran none of them
        assert [mesh.service(0).store.holds(r.sha256) for r in refs] == [False, False, True]
        nursery.cancel_scope.cancel()


async def test_an_artifact_is_fetched_from_a_node_that_holds_it_when_its_origin_is_gone(tmp_path):
    from p2pnode.deploy.spec import TarAction

    from deploykit import make_tar

    mesh = Mesh(tmp_path, 3)
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        data = make_tar([("big.bin", bytes(range(256)) * 12288)])  # 3 MiB: several blocks
        ref = await mesh.publish(data, at=0)
        await mesh.offer(mesh.sign(mesh.command(TarAction(ref), deploy_id="a", version="1", targets=[1])), at=0)
        assert (await mesh.settled("a", at=2))["state"] == "success"
        await mesh.nodes[0].stop()  # the node it was uploaded to is gone
        await mesh.offer(mesh.sign(mesh.command(TarAction(ref), deploy_id="b", version="1", targets=[2])), at=1)
        assert (await mesh.settled("b", at=1))["state"] == "success"
        blocks = mesh.service(2).ctx.blocks.peers
        assert blocks[mesh.nodes[1].peer_id].bytes_in == ref.size and mesh.service(2).store.fetched_bytes == ref.size
        nursery.cancel_scope.cancel()
