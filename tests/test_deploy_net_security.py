"""Who may deploy, and what a node refuses: forged, replayed and expired commands, a deployer key
used for membership, roots outside `deploy.allowed_roots`, unsafe archives, uploads without a valid
manifest or beyond a node's limits, forged reports — each with the reason a node gives."""

from __future__ import annotations

import sqlite3

import attrs
import pytest
import trio
from deploykit import Mesh, make_tar

from p2pnode import timefmt
from p2pnode.deploy import client
from p2pnode.deploy.documents import NodeReport, sign_command
from p2pnode.deploy.report import DeployReport
from p2pnode.deploy.spec import ShellAction, TarAction
from p2pnode.envelope import Envelope
from p2pnode.host import open_host
from p2pnode.identity import KeyPair


@pytest.fixture
def mesh(tmp_path):
    return Mesh(tmp_path, 2)


def marker_script(mesh: Mesh) -> ShellAction:
    return ShellAction(f'echo ran >> "{mesh.tmp}/ran-$HOSTNAME_MARK"', env=(("HOSTNAME_MARK", "${host}"),))


async def test_forged_commands_are_rejected_before_anything_runs(mesh):
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        cmd = mesh.command(marker_script(mesh), deploy_id="forged", version="1")
        stranger = KeyPair.generate()
        fake_system = KeyPair.generate()
        cases = [
            # a key with a "deploy" proof signed by some other system key
            ("proof_invalid", "not signed by this cluster's system key",
             sign_command(cmd, stranger, mesh.kit.proof(stranger, role="deploy", signer=fake_system), mesh.kit.cluster_id)),
            # the deployer's own proof, but another key signed
            ("proof_invalid", f"admin proof names {mesh.deployer.peer_id}, but {stranger.peer_id} signed",
             sign_command(cmd, stranger, mesh.deploy_proof, mesh.kit.cluster_id)),
            # a valid command with one byte of its payload changed
            ("bad_signature", "signature does not verify",
             attrs.evolve(mesh.sign(cmd), payload=mesh.sign(cmd).payload.replace(b"forged", b"fakeid"))),
            ("wrong_cluster", "is for cluster 'another-cluster'", sign_command(cmd, mesh.deployer, mesh.deploy_proof, "another-cluster")),
        ]
        for code, reason, env in cases:
            verdict = await mesh.offer(env, at=0)
            assert (verdict.result, verdict.code) == ("rejected", code) and reason in verdict.reason, verdict
        no_proof = Envelope.seal("deploy-command", {**cmd.to_dict(), "cluster_id": mesh.kit.cluster_id,
                                                    "issuer_peer_id": str(stranger.peer_id)}, stranger)
        verdict = await mesh.offer(no_proof, at=0)
        assert verdict.code == "no_admin_proof" and "carries no admin proof" in verdict.reason
        assert mesh.record("forged") is None and not list(mesh.tmp.glob("ran-*"))
        assert mesh.nodes[0].node.bus.rejection_counts("deploy-command")["proof_invalid"] == 2
        nursery.cancel_scope.cancel()


async def test_replayed_reused_and_expired_commands(mesh):
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        cmd = mesh.command(marker_script(mesh), deploy_id="once", version="1", targets=[0])
        env = mesh.sign(cmd)
        assert (await mesh.offer(env, at=1)).result == "accepted"
        assert (await mesh.settled("once"))["state"] == "success"
        # the same signed bytes again, to each node: nothing runs twice
        for at in (0, 1):
            verdict = await mesh.offer(env, at=at)
            assert (verdict.result, verdict.code) == ("ignored", "known"), verdict
        # the deploy ID reused by a new command: refused
        again = mesh.sign(attrs.evolve(cmd, issued_at_ns=cmd.issued_at_ns + 1, action=ShellAction("echo other")))
        verdict = await mesh.offer(again, at=0)
        assert (verdict.result, verdict.code) == ("rejected", "replayed") and "already used by another command" in verdict.reason
        # an expired command
        now = timefmt.now_ns()
        old = attrs.evolve(cmd, deploy_id="old", issued_at_ns=now - 7200 * timefmt.NS, valid_until_ns=now - 3600 * timefmt.NS)
        verdict = await mesh.offer(mesh.sign(old), at=0)
        assert (verdict.result, verdict.code) == ("rejected", "expired") and "expired at" in verdict.reason

        # the node forgets the stored document (say it was deleted): its own seen-set still refuses the replay
        await mesh.nodes[0].stop()
        with sqlite3.connect(mesh.nodes[0].data_dir / "node.db") as db:
            db.execute("DELETE FROM documents WHERE type = 'deploy-command'")
        await mesh.nodes[0].start(nursery)
        verdict = await mesh.nodes[0].node.bus.offer(env)  # before any peer could bring it back
        assert (verdict.result, verdict.code) == ("rejected", "replayed") and "a command runs once" in verdict.reason
        assert (mesh.tmp / "ran-127.0.0.1").read_text() == "ran\n"
        nursery.cancel_scope.cancel()


async def test_deployer_key_cannot_change_membership(mesh):
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        members = [n.member() for n in mesh.nodes]
        snapshot = mesh.kit.snapshot(members, admin=mesh.deployer, proof=mesh.deploy_proof)
        verdict = await mesh.nodes[0].node.membership.offer(snapshot)
        assert (verdict.result, verdict.code) == ("rejected", "proof_invalid")
        assert verdict.reason == "admin proof role is 'deploy', not 'admin'"
        # while a command it signs is accepted, as is one the admin signs
        assert (await mesh.offer(mesh.sign(mesh.command(ShellAction("true"), deploy_id="ok", version="1")))).result == "accepted"
        by_admin = mesh.sign(mesh.command(ShellAction("true"), deploy_id="ok2", version="2"), mesh.kit.admin, mesh.kit.proof())
        assert (await mesh.offer(by_admin)).result == "accepted"
        assert (await mesh.settled("ok2"))["issuer_role"] == "admin"
        nursery.cancel_scope.cancel()


async def test_root_outside_allowed_roots_and_a_node_without_deploys_refuse_with_a_reason(tmp_path):
    mesh = Mesh(tmp_path, 3)
    mesh.configure(mesh.nodes[2], allowed_roots=())  # n2 has deploys off
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        cmd = mesh.command(ShellAction("true"), deploy_id="etc", version="1", targets=[0], root="/etc")
        await mesh.offer(mesh.sign(cmd), at=1)
        row = mesh.node_row(await mesh.settled("etc", at=1), 0)
        assert row["status"] == "failed" and row["stage"] == "refused", row
        assert "application root /etc is outside this node's deploy.allowed_roots" in row["message"]
        cmd = mesh.command(ShellAction("true"), deploy_id="off", version="1", targets=[2])
        await mesh.offer(mesh.sign(cmd), at=0)
        row = mesh.node_row(await mesh.settled("off", at=0), 2)
        assert row["stage"] == "refused" and "deploys are not enabled on this node" in row["message"], row
        nursery.cancel_scope.cancel()


async def test_archives_with_dotdot_or_an_escaping_symlink_fail_with_the_entry_named(mesh):
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        for name, entries, reason in (
            ("dotdot", [("ok.txt", b"x"), ("../evil.txt", b"x")], "'..'"),
            ("symlink", [("link", ("sym", "../../..")), ("link/evil.txt", b"x")], "symbolic link"),
        ):
            ref = await mesh.publish(make_tar(entries), at=0)
            await mesh.offer(mesh.sign(mesh.command(TarAction(ref), deploy_id=name, version="1", targets=[1])), at=0)
            row = mesh.node_row(await mesh.settled(name), 1)
            assert row["status"] == "failed" and "archive entry" in row["message"] and reason in row["message"], row
            assert not mesh.release(1, "1").exists()
        assert not (mesh.tmp / "evil.txt").exists() and not list(mesh.tmp.rglob("evil.txt"))
        nursery.cancel_scope.cancel()


async def test_uploads_need_a_deploy_role_manifest_and_fit_the_node_limits(tmp_path):
    mesh = Mesh(tmp_path, 2)
    mesh.configure(mesh.nodes[0], max_artifact_bytes=4096)
    mesh.configure(mesh.nodes[1], min_free_bytes=1 << 60)  # no disk is that large: every upload would fill it
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3000)
    stranger = KeyPair.generate()
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        async with open_host(stranger) as host:
            conn = await host.connect(mesh.nodes[0].full_addr)
            manifest, env = await client.manifest_for(path, stranger, mesh.kit.proof(stranger, role="status"), mesh.kit.cluster_id)
            with pytest.raises(client.UploadRefused) as info:
                await client.upload(host, conn, path, manifest, env)
            assert info.value.code == "proof_invalid" and "role is 'status'" in info.value.reason
            path.write_bytes(b"x" * 5000)
            manifest, env = await client.manifest_for(path, mesh.deployer, mesh.deploy_proof, mesh.kit.cluster_id)
            with pytest.raises(client.UploadRefused) as info:
                await client.upload(host, conn, path, manifest, env)
            assert info.value.code == "no_space" and "deploy.max_artifact_bytes (4096)" in info.value.reason
            path.write_bytes(b"y" * 3000)
            manifest, env = await client.manifest_for(path, mesh.deployer, mesh.deploy_proof, mesh.kit.cluster_id)
            path.write_bytes(b"z" * 3000)  # the file changed after it was hashed
            with pytest.raises(client.UploadRefused) as info:
                await client.upload(host, conn, path, manifest, env)
            assert info.value.code == "bad_block"
            manifest, env = await client.manifest_for(path, mesh.deployer, mesh.deploy_proof, mesh.kit.cluster_id)
            with pytest.raises(client.UploadRefused) as info:
                await client.upload(host, await host.connect(mesh.nodes[1].full_addr), path, manifest, env)
            assert info.value.code == "no_space" and "less than this node's deploy.min_free_bytes" in info.value.reason
        assert not mesh.service(0).store.holds(manifest.sha256)
        nursery.cancel_scope.cancel()


async def test_a_node_cannot_sign_reports_for_another(mesh):
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        report = DeployReport("x", "deploy.shell", "a/b/c", "1", "success", 100, "done", "", 1, timefmt.now_ns(), True, True)
        forged = NodeReport(mesh.nodes[1].peer_id, mesh.kit.cluster_id, report, timefmt.now_ns())
        env = Envelope.seal("deploy-report", forged.to_dict(), mesh.nodes[0].key)
        verdict = await mesh.offer(env, at=0)
        assert verdict.code == "bad_signature" and "but was signed by" in verdict.reason
        outsider = KeyPair.generate()
        env = attrs.evolve(forged, peer_id=outsider.peer_id).sign(outsider)
        verdict = await mesh.offer(env, at=0)
        assert verdict.code == "not_member"
        nursery.cancel_scope.cancel()
