"""deploy.docker through the mesh, for real with podman: no registry, so the image travels as an
artifact (`podman save`, published once, fetched by every target from its peers and `load`ed into
that node's own container storage); containers run with --init --network host on each node's own
loopback address; a release whose image fails its health check is rolled back on every node."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
from deploykit import Mesh, free_port, get_at
from test_deploy_docker import BUSYBOX, CONF, _rootfs

from p2pnode.deploy.spec import DockerAction, HealthCheck, Rollout


def podman_for(base, env):
    cmd = ["podman", "--root", str(base / "storage"), "--runroot", str(base / "run"), "--tmpdir", str(base / "tmp")]

    def pod(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120, check=check)
    return cmd, pod


@pytest.fixture
def images(tmp_path):
    """Image archives (podman save) of test images 1 (healthy) and 3 (no /health), and the env podman needs."""
    if shutil.which("podman") is None or shutil.which("runc") is None or not BUSYBOX.exists():
        pytest.skip("podman, runc and busybox-static are needed (test.sh installs them)")
    base = Path(tempfile.mkdtemp(prefix="p2pn-"))  # podman wants a runroot of at most 50 characters
    (base / "containers.conf").write_text(CONF)
    env = {"CONTAINERS_CONF": str(base / "containers.conf"), "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    _, pod = podman_for(base, env)
    archives = {}
    try:
        for tag, health in (("1", b"version 1\n"), ("3", None)):
            (base / f"rootfs-{tag}.tar.gz").write_bytes(_rootfs(health))
            imported = pod("import", str(base / f"rootfs-{tag}.tar.gz"), f"localhost/p2pnode-mesh:{tag}", check=False)
            if imported.returncode != 0:
                pytest.skip(f"podman cannot import an image here: {imported.stderr.strip()[-300:]}")
            archives[tag] = tmp_path / f"image-{tag}.tar"
            pod("save", "-o", str(archives[tag]), f"localhost/p2pnode-mesh:{tag}")
    finally:
        pod("system", "reset", "-f", check=False)
    yield archives, env
    shutil.rmtree(base, ignore_errors=True)


def web(tag: str, port: int, archive) -> DockerAction:
    return DockerAction(f"localhost/p2pnode-mesh:{tag}", name="web", run_args=("--init", "--network", "host"),
                        command=("/bin/httpd", "-f", "-p", f"${{host}}:{port}", "-h", "/www"), archive=archive, timeout=60)


def health(port: int, retries: int = 30) -> HealthCheck:
    return HealthCheck("http", url=f"http://${{host}}:{port}/health", retries=retries, interval=0.2, timeout=20, attempt_timeout=2)


async def test_docker_image_through_the_mesh_to_two_nodes_then_a_bad_one_rolls_back(tmp_path, images):
    archives, env = images
    mesh = Mesh(tmp_path, 3)
    pods = []
    bases = []
    for node in mesh.nodes:  # each node its own container storage, as on separate hosts
        base = Path(tempfile.mkdtemp(prefix="p2pn-"))
        bases.append(base)
        cmd, pod = podman_for(base, env)
        pods.append(pod)
        mesh.configure(node, docker_command=tuple(cmd), docker_env=tuple(env.items()))
    port = free_port()
    try:
        async with trio.open_nursery() as nursery:
            await mesh.start(nursery)
            good = await mesh.publish(archives["1"].read_bytes(), at=2, name="image-1.tar")
            cmd = mesh.command(web("1", port, good), deploy_id="dock-1", version="1", targets=[0, 1], health=health(port),
                               rollout=Rollout(max_parallel=2))
            await mesh.offer(mesh.sign(cmd), at=2)
            rec = await mesh.settled("dock-1", at=2, timeout=120)
            assert rec["state"] == "success", [(r["status"], r["message"], r["log_tail"][-800:]) for r in rec["nodes"]]
            for i in (0, 1):
                assert get_at(mesh.host(i), port, "/health") == (200, "version 1\n")
                assert "loaded localhost/p2pnode-mesh:1 from the image archive" in (await mesh.service(2).remote_log("dock-1", mesh.peer(i)))["log"]
            assert mesh.service(0).store.fetched_bytes + mesh.service(1).store.fetched_bytes == 2 * good.size

            bad = await mesh.publish(archives["3"].read_bytes(), at=0, name="image-3.tar")
            cmd = mesh.command(web("3", port, bad), deploy_id="dock-3", version="3", targets=[0, 1], health=health(port, retries=3),
                               rollout=Rollout(max_parallel=2))
            await mesh.offer(mesh.sign(cmd), at=1)
            rec = await mesh.settled("dock-3", at=2, timeout=120)
            assert rec["state"] == "failed"
            for i in (0, 1):
                row = mesh.node_row(rec, i)
                assert row["status"] == "rolled_back" and "status 404, expected 200" in row["message"], row
                assert "rolled back to 1" in row["message"]
                assert get_at(mesh.host(i), port, "/health") == (200, "version 1\n")
                running = pods[i]("ps", "--format", "{{.Names}} {{.Image}}").stdout.strip()
                assert running == "web localhost/p2pnode-mesh:1", running
            nursery.cancel_scope.cancel()
    finally:
        for pod in pods:
            pod("rm", "-af", "-t", "0", check=False)
            pod("system", "reset", "-f", check=False)
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)
