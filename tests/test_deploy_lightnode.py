"""Acceptance: the lightnode recipe of seed 000 (examples/lightnode) through the executor, locally.

build_chain.sh and the binaries are stand-ins (examples/lightnode/fake); everything else is what the
recipe does for real: artifacts verified by SHA-256, the build run with the seed's arguments,
nodes/lightnode moved up and nodes/ removed, the node's certificates overlaid as ssl.key/ssl.crt/
ca.crt, config.genesis and nodes.json written, started with start.sh, health-checked, and a later
deploy.rollback that stops it with stop.sh and restores the previous release."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from deploykit import Kit, alive, trio_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "lightnode"))
import recipe

CERT = "-----BEGIN CERTIFICATE-----\nMIIB{name}\n-----END CERTIFICATE-----\n"


@pytest.fixture
def kit(tmp_path):
    k = Kit(tmp_path)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "node.key").write_text("-----BEGIN PRIVATE KEY-----\nnode key\n-----END PRIVATE KEY-----\n")
    (certs / "node.crt").write_text(CERT.format(name="node"))
    (certs / "ca.crt").write_text(CERT.format(name="ca"))
    k.certs = certs
    yield k
    for pidfile in k.root.rglob("lightnode.pid"):
        subprocess.run(["bash", str(pidfile.parent / "stop.sh")], capture_output=True, timeout=30)


def lightnode(kit: Kit, version: str) -> Path:
    return kit.release_dir(version, recipe.APP) / "lightnode"


def pid_of(kit: Kit, version: str) -> int:
    return int((lightnode(kit, version) / "lightnode.pid").read_text())


FAST = dict(timeout=20.0, retries=100, interval=0.1)


async def test_lightnode_recipe_deploy_upgrade_and_rollback(kit):
    root = str(kit.root)
    async with kit.executor(env=(("NODE_CERT_DIR", str(kit.certs)),)) as ex:
        for version in ("3.2.0", "3.3.0"):
            cmd = recipe.deploy_command(recipe.publish(kit.artifacts, version), version=version, root=root,
                                        health_check=recipe.health(**FAST))
            await ex.submit(cmd)
            done = await ex.wait(cmd.deploy_id)
            assert done.status == "success", (done, (await ex.log_of(cmd.deploy_id) or b"").decode()[-3000:])

        release = kit.release_dir("3.3.0", recipe.APP)
        ln = release / "lightnode"
        assert sorted(p.name for p in release.iterdir()) == sorted(
            ["build_chain.sh", "bin", "fisco-bcos-lightnode", "config.genesis", "nodes.json", "lightnode"])  # nodes/ removed
        assert {"start.sh", "stop.sh", "conf", "config.ini", "fisco-bcos-lightnode"} <= {p.name for p in ln.iterdir()}
        assert (ln / "conf/ssl.key").read_text() == (kit.certs / "node.key").read_text()
        assert stat.S_IMODE((ln / "conf/ssl.key").stat().st_mode) == 0o600
        assert (ln / "conf/ssl.crt").read_text() == CERT.format(name="node")
        assert (ln / "conf/ca.crt").read_text() == CERT.format(name="ca")
        assert (ln / "config.genesis").read_text() == (Path(recipe.HERE) / "fake/config.genesis").read_text()
        assert '"127.0.0.1:30303"' in (ln / "nodes.json").read_text()
        assert "listen_port=30304" in (ln / "config.ini").read_text()  # the build saw -p 30300,20200 -l 127.0.0.1:4
        log = (await ex.log_of("lightnode-3.3.0") or b"").decode()
        assert "FISCO BCOS Version : 3.3.0 (stand-in)" in log and "All completed. Files in nodes" in log
        assert "== lightnode/stop.sh (3.2.0)" in log and "lightnode stopped" in log

        old, new = pid_of(kit, "3.3.0"), None
        assert alive(old) and "lightnode 3.3.0 running" in (ln / "lightnode.log").read_text()
        assert not (lightnode(kit, "3.2.0") / "lightnode.pid").exists()  # 3.2.0 was stopped by its stop.sh
        assert "lightnode 3.2.0 stopping" in (lightnode(kit, "3.2.0") / "lightnode.log").read_text()

        rollback = recipe.rollback_command(root=root, deploy_id="lightnode-back")
        await ex.submit(rollback)
        done = await ex.wait("lightnode-back")
        assert done.status == "rolled_back" and done.success and "rolled back to 3.2.0" in done.message, done
        assert kit.current(recipe.APP) == "3.2.0"
        await trio_wait(lambda: not alive(old), 10, "3.3.0's lightnode to stop")
        assert "lightnode 3.3.0 stopping" in (ln / "lightnode.log").read_text()
        new = pid_of(kit, "3.2.0")
        assert alive(new) and (lightnode(kit, "3.2.0") / "lightnode.log").read_text().count("lightnode 3.2.0 running") == 1
    assert kit.statuses("lightnode-back") == ["pending", "rolling_back", "health_check", "rolled_back"]


async def test_lightnode_without_certificates_fails_before_touching_anything(kit):
    async with kit.executor(env=(("NODE_CERT_DIR", str(kit.tmp / "no-certs")),)) as ex:
        cmd = recipe.deploy_command(recipe.publish(kit.artifacts, "3.2.0"), version="3.2.0", root=str(kit.root),
                                    health_check=recipe.health(**FAST))
        await ex.submit(cmd)
        done = await ex.wait(cmd.deploy_id)
    assert done.status == "failed" and "install script exit 1" in done.message
    assert "the node's certificate file" in done.log_tail and "node.key is missing" in done.log_tail
    assert kit.current(recipe.APP) is None and not kit.release_dir("3.2.0", recipe.APP).exists()
