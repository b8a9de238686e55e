"""Acceptance: the lightnode recipe of seed 000 (examples/lightnode) deployed THROUGH THE MESH with
p2pnode-admin — artifacts exported by the recipe, uploaded once, fetched by both targets, built with
the seed's arguments, certificates overlaid from each node's own NODE_CERT_DIR, started with
start.sh; an upgrade, then `deploy rollback` that stops it with stop.sh and restores the previous
release on both nodes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import trio
from deploykit import Mesh, alive
from p2pnode_admin import cli

from p2pnode.identity import save_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "lightnode"))
import recipe

CERT = "-----BEGIN CERTIFICATE-----\nMIIB{name}\n-----END CERTIFICATE-----\n"


async def admin(*args: str) -> tuple[int, dict, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await cli.run(list(args), stdout=out, stderr=err)
    return code, (json.loads(out.getvalue()) if out.getvalue().strip().startswith("{") else {}), err.getvalue()


async def test_lightnode_recipe_through_the_mesh_upgrade_and_rollback(tmp_path, monkeypatch):
    monkeypatch.delenv("P2PNODE_ADMIN_PASSPHRASE", raising=False)
    mesh = Mesh(tmp_path, 3)
    for i, node in enumerate(mesh.nodes):  # each node keeps its own certificate
        certs = tmp_path / f"certs-{i}"
        certs.mkdir()
        (certs / "node.key").write_text(f"-----BEGIN PRIVATE KEY-----\nkey of n{i}\n-----END PRIVATE KEY-----\n")
        (certs / "node.crt").write_text(CERT.format(name=f"n{i}"))
        (certs / "ca.crt").write_text(CERT.format(name="ca"))
        mesh.configure(node, env=(("NODE_CERT_DIR", str(certs)),))
    keys = tmp_path / "keys"
    keys.mkdir()
    save_key(keys / "deployer.key", mesh.deployer)
    (keys / "deployer.proof").write_bytes(mesh.deploy_proof.to_bytes())
    who = ["--to", str(mesh.nodes[2].full_addr), "--key", str(keys / "deployer.key"), "--proof", str(keys / "deployer.proof")]
    fast = ["--health-interval", "0.1", "--health-retries", "100", "--health-timeout", "30", "--max-parallel", "2",
            "--node", "n0", "--node", "n1", "--root", mesh.shared_root, "--wait", "--json"]

    def lightnode(i: int, version: str) -> Path:
        return mesh.release(i, version, recipe.APP) / "lightnode"

    try:
        async with trio.open_nursery() as nursery:
            await mesh.start(nursery)
            for version in ("3.2.0", "3.3.0"):
                args = recipe.export(tmp_path / f"export-{version}", version)
                code, rec, err = await admin("deploy", "tar", *args, *who, *fast, "--deploy-id", f"ln-{version}")
                assert code == 0 and rec["state"] == "success", (rec, err)
            for i in (0, 1):
                ln = lightnode(i, "3.3.0")
                assert (ln / "conf/ssl.key").read_text() == (tmp_path / f"certs-{i}" / "node.key").read_text()
                assert (ln / "conf/ssl.crt").read_text() == CERT.format(name=f"n{i}")
                assert '"127.0.0.1:30303"' in (ln / "nodes.json").read_text() and (ln / "config.genesis").exists()
                assert "listen_port=30304" in (ln / "config.ini").read_text()  # built with -p 30300,20200 -l 127.0.0.1:4
                assert not (mesh.release(i, "3.3.0", recipe.APP) / "nodes").exists()
                assert alive(int((ln / "lightnode.pid").read_text()))
                assert not (lightnode(i, "3.2.0") / "lightnode.pid").exists()  # 3.2.0 stopped by its stop.sh
            assert mesh.current(2, recipe.APP) is None  # n2 only relayed and served the artifacts

            code, rec, err = await admin("deploy", "rollback", *who, "--app", recipe.APP.key, *fast, "--deploy-id", "ln-back")
            assert code == 0 and rec["state"] == "success", (rec, err)
            for i in (0, 1):
                row = mesh.node_row(rec, i)
                assert row["status"] == "rolled_back" and "rolled back to 3.2.0" in row["message"], row
                assert mesh.current(i, recipe.APP) == "3.2.0"
                assert "lightnode 3.3.0 stopping" in (lightnode(i, "3.3.0") / "lightnode.log").read_text()
                assert alive(int((lightnode(i, "3.2.0") / "lightnode.pid").read_text()))
            nursery.cancel_scope.cancel()
    finally:
        for pidfile in (tmp_path / "apps").rglob("lightnode.pid"):
            subprocess.run(["bash", str(pidfile.parent / "stop.sh")], capture_output=True, timeout=30)
