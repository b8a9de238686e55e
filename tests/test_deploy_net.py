"""Deploys across real nodes on loopback: signed commands offered to one node, artifacts uploaded once
and fetched block by block from peers, HTTP services started and health-checked on every target, and
the record read from a node that was not a target.

Each node has its own loopback address (127.0.0.N) as `deploy.host` and its root under
`apps/${host}`, so all nodes' services listen on one port and one command serves them all."""

from __future__ import annotations

import pytest
import trio
from deploykit import SCRIPTS, Mesh, free_port, get_at, http_health, http_release, http_tar


@pytest.fixture
def mesh3(tmp_path):
    mesh = Mesh(tmp_path, 3)
    yield mesh
    mesh.kill_servers()


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
