"""deploy.docker for real, with podman (test.sh installs podman, runc and busybox-static).

No registry is reachable, so test images are made with `podman import` of a busybox-static rootfs
whose httpd serves /www; containers run with `--init --network host`. Each test module uses its own
podman storage (`--root/--runroot/--tmpdir` in a temp dir), removed with `system reset` at the end.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from deploykit import Kit, command, free_port, get, put_artifact

from p2pnode.deploy.spec import DockerAction, HealthCheck, RollbackAction

CONF = """[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
"""
BUSYBOX = Path("/bin/busybox")


def _rootfs(health: bytes | None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for d in ("bin", "www", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        tf.add(BUSYBOX, "bin/busybox")
        for applet in ("sh", "httpd", "sleep"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tf.addfile(info)
        if health is not None:
            info = tarfile.TarInfo("www/health")
            info.size, info.mode = len(health), 0o644
            tf.addfile(info, io.BytesIO(health))
    return buf.getvalue()


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """(command, env) of an isolated podman with three test images; skips if podman cannot run here."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman and runc are not installed (test.sh installs them with apt-get as root)")
    if not BUSYBOX.exists():
        pytest.skip("/bin/busybox is missing (apt: busybox-static)")
    base = tmp_path_factory.mktemp("podman")
    (base / "containers.conf").write_text(CONF)
    env = {"CONTAINERS_CONF": str(base / "containers.conf"), "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    cmd = ["podman", "--root", str(base / "storage"), "--runroot", str(base / "run"), "--tmpdir", str(base / "tmp")]

    def pod(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120, check=check)

    for tag, health in (("1", b"version 1\n"), ("2", b"version 2\n"), ("3", None), ("4", b"version 4\n")):
        rootfs = base / f"rootfs-{tag}.tar.gz"
        rootfs.write_bytes(_rootfs(health))
        imported = pod("import", str(rootfs), f"localhost/p2pnode-test:{tag}", check=False)
        if imported.returncode != 0:
            pytest.skip(f"podman cannot import an image here: {imported.stderr.strip()[-300:]}")
    probe = pod("run", "--rm", "--init", "--network", "host", "localhost/p2pnode-test:1", "/bin/sh", "-c", "echo ready", check=False)
    if probe.returncode != 0 or probe.stdout.strip() != "ready":
        pod("system", "reset", "-f", check=False)
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")
    try:
        yield cmd, env, pod
    finally:
        pod("rm", "-af", "-t", "0", check=False)
        pod("system", "reset", "-f", check=False)


@pytest.fixture
def kit(tmp_path):
    return Kit(tmp_path)


def web(tag: str, port: int, **kw) -> DockerAction:
    return DockerAction(f"localhost/p2pnode-test:{tag}", run_args=("--init", "--network", "host"),
                        command=("/bin/httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"), timeout=60, **kw)


def health(port: int, retries: int = 20) -> HealthCheck:
    return HealthCheck("http", url=f"http://${{host}}:{port}/health", retries=retries, interval=0.1, timeout=10, attempt_timeout=2)


async def test_docker_deploy_upgrade_and_rollback_on_failed_health(podman, kit):
    cmd, env, pod = podman
    port = free_port()
    async with kit.executor(docker_command=tuple(cmd), docker_env=tuple(env.items())) as ex:
        await ex.submit(command(web("1", port), deploy_id="d1", version="1", root=kit.root, health=health(port)))
        done = await ex.wait("d1")
        assert done.status == "success", (done, (await ex.log_of("d1") or b"").decode()[-2000:])
        assert kit.statuses("d1") == ["pending", "executing", "pulling", "stopping", "starting", "health_check", "success"]
        assert get(port, "/health") == (200, "version 1\n")
        log = (await ex.log_of("d1") or b"").decode()
        assert "localhost/p2pnode-test:1 is present; not pulled (policy if_not_present)" in log
        labels = pod("container", "inspect", "--format", "{{index .Config.Labels \"p2pnode.deploy_id\"}}", "shop-api-prod").stdout
        assert labels.strip() == "d1"

        await ex.submit(command(web("2", port), deploy_id="d2", version="2", root=kit.root, health=health(port)))
        assert (await ex.wait("d2")).status == "success"
        assert get(port, "/health") == (200, "version 2\n")

        # image 3 serves no /health: the check fails, release 2's container comes back
        await ex.submit(command(web("3", port), deploy_id="d3", version="3", root=kit.root, health=health(port, retries=3)))
        done = await ex.wait("d3")
        assert done.status == "rolled_back" and "status 404, expected 200" in done.message and "rolled back to 2" in done.message
        assert get(port, "/health") == (200, "version 2\n") and kit.current() == "2"
        running = pod("ps", "--format", "{{.Names}} {{.Image}}").stdout.split("\n")
        assert running[0] == "shop-api-prod localhost/p2pnode-test:2", running

        await ex.submit(command(RollbackAction(), deploy_id="r1", version=None, root=kit.root))
        done = await ex.wait("r1")
        assert done.status == "rolled_back" and done.success and get(port, "/health") == (200, "version 1\n")
    pod("rm", "-f", "-t", "0", "shop-api-prod")


async def test_image_archive_is_loaded_and_pull_policies(podman, kit):
    cmd, env, pod = podman
    port = free_port()
    archive = kit.tmp / "image.tar"
    pod("save", "-o", str(archive), "localhost/p2pnode-test:4")
    pod("rmi", "localhost/p2pnode-test:4")
    ref = put_artifact(kit.artifacts, archive.read_bytes())
    async with kit.executor(docker_command=tuple(cmd), docker_env=tuple(env.items())) as ex:
        action = web("4", port, name="archived", archive=ref)
        await ex.submit(command(action, deploy_id="a1", version="1", root=kit.root, health=health(port)))
        done = await ex.wait("a1")
        assert done.status == "success", (await ex.log_of("a1") or b"").decode()[-2000:]
        assert "loaded localhost/p2pnode-test:4 from the image archive" in (await ex.log_of("a1") or b"").decode()
        assert get(port, "/health") == (200, "version 4\n")

        missing = web("nope", port, name="never", pull="never")
        await ex.submit(command(missing, deploy_id="n1", version="2", root=kit.root))
        done = await ex.wait("n1")
        assert done.status == "failed" and "image localhost/p2pnode-test:nope is not on this node and the pull policy is 'never'" \
            in done.message

        unreachable = DockerAction("127.0.0.1:1/nothing:1", name="pulled", pull="always", timeout=60)
        await ex.submit(command(unreachable, deploy_id="p1", version="3", root=kit.root))
        done = await ex.wait("p1")
        assert done.status == "failed" and "pulling 127.0.0.1:1/nothing:1: podman pull exit" in done.message
        assert "the running release 1 was not touched" in done.message
        assert get(port, "/health") == (200, "version 4\n") and kit.current() == "1"
    pod("rm", "-f", "-t", "0", "archived")
