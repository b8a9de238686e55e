"""Rolling deploys across real nodes without a coordinator: waves from the signed command, a failed
wave halting the rest, auto_revert, and a dead node that cannot stall the rollout."""

from __future__ import annotations

import trio
from deploykit import SCRIPTS, Mesh, mesh_fixture, free_port, get_at, http_health, http_release, http_tar

from p2pnode.deploy.spec import Rollout

FAIL_ON_HOST3 = 'if [ "$HOST" = 127.0.0.3 ]; then echo "install refused on $HOST" >&2; exit 3; fi\n'


mesh5 = mesh_fixture(5)


async def test_five_nodes_two_at_a_time_wave_two_fails_wave_three_never_starts_and_wave_one_reverts(mesh5):
    mesh, port = mesh5, free_port()
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        v1 = await mesh.publish(http_release("1.0"), at=0)
        cmd = mesh.command(http_tar(v1, port), deploy_id="v1", version="1.0", health=http_health(port), service=SCRIPTS,
                           rollout=Rollout(max_parallel=5))
        await mesh.offer(mesh.sign(cmd), at=4)
        assert (await mesh.settled("v1", at=4))["state"] == "success"

        # v2 in waves [n0 n1] [n2 n3] [n4]: n2 (127.0.0.3) refuses its install script
        v2 = await mesh.publish(http_release("2.0"), at=4)
        cmd = mesh.command(http_tar(v2, port, install=FAIL_ON_HOST3), deploy_id="v2", version="2.0", health=http_health(port),
                           service=SCRIPTS, rollout=Rollout(max_parallel=2, auto_revert=True))
        await mesh.offer(mesh.sign(cmd), at=0)
        rec = await mesh.settled("v2", at=3, timeout=90)
        assert rec["state"] == "failed" and rec["waves"] == [[mesh.peer(0), mesh.peer(1)], [mesh.peer(2), mesh.peer(3)], [mesh.peer(4)]]
        assert rec["reason"].startswith("the rollout halted after wave 2 of 3: 1 node(s) failed (max_failures 0)"), rec["reason"]
        rows = {i: mesh.node_row(rec, i) for i in range(5)}
        # wave 1 succeeded, then reverted itself when wave 2 failed
        for i in (0, 1, 3):
            assert rows[i]["verdict"] == "success" and rows[i]["outcome"]["success"] is True, rows[i]
            assert rows[i]["status"] == "rolled_back" and rows[i]["stage"].startswith("revert:") and rows[i]["final"], rows[i]
            assert mesh.current(i) == "1.0" and get_at(mesh.host(i), port, "/health") == (200, "version 1.0\n")
        assert rows[2]["verdict"] == "failed" and rows[2]["status"] == "failed" and "install script exit 3" in rows[2]["message"]
        assert "install refused on 127.0.0.3" in rows[2]["log_tail"]
        assert mesh.current(2) == "1.0" and get_at(mesh.host(2), port, "/health") == (200, "version 1.0\n")  # never touched
        # wave 3 never started: n4 says so itself, and never created a 2.0 release
        assert rows[4]["verdict"] == "halted" and rows[4]["stage"] == "halted" and rows[4]["message"].startswith("not started:")
        assert not mesh.release(4, "2.0").exists() and get_at(mesh.host(4), port, "/health") == (200, "version 1.0\n")
        assert await mesh.service(4).journal.get("v2") is None
        nursery.cancel_scope.cancel()


async def test_a_dead_wave_member_counts_as_failed_after_the_deadline_and_cannot_stall_the_rollout(tmp_path):
    from p2pnode.deploy.spec import ShellAction

    mesh = Mesh(tmp_path, 3)
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        await mesh.nodes[1].stop()  # n1 is dead when the command arrives
        cmd = mesh.command(ShellAction("echo deployed on $P2PNODE_APP"), deploy_id="s1", version="1", targets=[0, 1, 2],
                           rollout=Rollout(max_parallel=1, max_failures=1, progress_deadline=2.0))
        started = trio.current_time()
        await mesh.offer(mesh.sign(cmd), at=0)
        rec = await mesh.settled("s1", at=2, timeout=30)
        assert trio.current_time() - started > 2.0
        assert [mesh.node_row(rec, i)["verdict"] for i in range(3)] == ["success", "missed", "success"], rec
        assert rec["state"] == "partial" and mesh.node_row(rec, 1)["status"] is None
        assert mesh.node_row(rec, 1)["message"] == "no final report within the rollout's progress_deadline"

        # n1 comes back: it learns the command, runs its part late, and the rollout's verdict on it stays
        await mesh.nodes[1].start(nursery)
        with trio.fail_after(30):
            while (mesh.record("s1", at=2) or {}).get("nodes", [{}] * 3)[1].get("status") != "success":
                await trio.sleep(0.05)
        rec = mesh.record("s1", at=2)
        assert mesh.node_row(rec, 1)["verdict"] == "late" and rec["state"] == "partial"
        nursery.cancel_scope.cancel()
