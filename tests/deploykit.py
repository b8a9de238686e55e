"""Helpers for the deploy tests: commands with defaults, artifacts, tarballs, a small HTTP service
release (server.py + start.sh + stop.sh), an executor over a real journal, process checks."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from clusterkit import ClusterKit, ClusterNode, wait_for

from p2pnode import timefmt
from p2pnode.deploy import client
from p2pnode.deploy.documents import sign_command
from p2pnode.deploy.service import DeployService
from p2pnode.host import open_host
from p2pnode.identity import KeyPair
from p2pnode.deploy.config import DeployConfig
from p2pnode.deploy.executor import Executor
from p2pnode.deploy.journal import Journal
from p2pnode.deploy.report import DeployReport
from p2pnode.deploy.spec import Application, ArtifactRef, DeployCommand, HealthCheck, Service, Targets

APP = Application("shop", "api", "prod")
FAST_HEALTH = dict(timeout=10.0, retries=40, interval=0.1, attempt_timeout=2.0)


def command(action: Any, *, deploy_id: str, version: str | None, root: Path, app: Application = APP, **kw: Any) -> DeployCommand:
    now = timefmt.now_ns()
    return DeployCommand(deploy_id, app, version, str(root), action, now, now + 3600 * timefmt.NS, **kw)


def put_artifact(directory: Path, data: bytes) -> ArtifactRef:
    digest = hashlib.sha256(data).hexdigest()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / digest).write_bytes(data)
    return ArtifactRef(digest, len(data))


def make_tar(entries: list[tuple[str, Any]]) -> bytes:
    """A tar.gz from (name, spec): bytes → a 0644 file, ("exec", bytes) → 0755, ("dir",), ("sym", target),
    ("hard", target), ("chr",), ("fifo",), ("mode", bytes, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, spec in entries:
            info = tarfile.TarInfo(name)
            data = b""
            if isinstance(spec, bytes):
                data, info.mode = spec, 0o644
            elif spec[0] == "exec":
                data, info.mode = spec[1], 0o755
            elif spec[0] == "mode":
                data, info.mode = spec[1], spec[2]
            elif spec[0] == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif spec[0] == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, spec[1]
            elif spec[0] == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, spec[1]
            elif spec[0] == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif spec[0] == "fifo":
                info.type = tarfile.FIFOTYPE
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


SERVER_PY = b'''
import http.server, os, sys
here = os.path.dirname(os.path.abspath(__file__))
version = open(os.path.join(here, "VERSION")).read().strip()
healthy = open(os.path.join(here, "HEALTHY")).read().strip() == "yes"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if self.path == "/health" and not healthy else 200
        body = ("version %s\\n" % version).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((os.environ.get("HOST") or "127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

START_SH = b'''#!/bin/bash
cd "$(dirname "$0")"
nohup "$PYTHON" server.py "$PORT" > server.log 2>&1 &
echo $! > server.pid
'''

# Orphans are not reaped on every machine (PID 1 may not be init), so "gone" means absent or a zombie.
STOP_SH = b'''#!/bin/bash
cd "$(dirname "$0")"
[ -f server.pid ] || exit 0
pid=$(cat server.pid)
alive() { s=$(sed 's/.*) //' /proc/$1/stat 2>/dev/null | cut -c1); [ -n "$s" ] && [ "$s" != Z ]; }
kill "$pid" 2>/dev/null
for i in $(seq 200); do alive "$pid" || { rm -f server.pid; exit 0; }; sleep 0.05; done
kill -9 "$pid"
'''


def http_release(version: str, healthy: bool = True) -> bytes:
    return make_tar([("VERSION", version.encode()), ("HEALTHY", b"yes" if healthy else b"no"), ("server.py", SERVER_PY),
                     ("start.sh", ("exec", START_SH)), ("stop.sh", ("exec", STOP_SH))])


def http_health(port: int, **kw: Any) -> HealthCheck:
    return HealthCheck("http", url=f"http://${{host}}:{port}/health", body_contains="version", **{**FAST_HEALTH, **kw})


SCRIPTS = Service("scripts", timeout=20.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/") -> tuple[int, str] | None:
    """One HTTP GET on loopback; None if nothing answers."""
    import http.client
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def kill_servers(root: Path) -> None:
    """Stop every service a test's deploys left running (their pid files)."""
    for pidfile in root.rglob("*.pid"):
        try:
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        except (ValueError, ProcessLookupError, IndexError):
            pass


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Kit:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.root = tmp / "apps"
        self.artifacts = tmp / "artifacts"
        self.state = tmp / "state"
        self.root.mkdir()
        self.state.mkdir()
        self.python = sys.executable
        self.reports: list[DeployReport] = []

    def config(self, **kw: Any) -> DeployConfig:
        base: dict[str, Any] = dict(allowed_roots=(self.root,), host="127.0.0.1", artifact_dir=self.artifacts, kill_grace=0.5)
        return DeployConfig(**{**base, **kw})

    @asynccontextmanager
    async def executor(self, **kw: Any) -> AsyncIterator[Executor]:
        journal = await Journal.open(self.state / "deploy.db")

        async def collect(report: DeployReport) -> None:
            self.reports.append(report)

        try:
            async with Executor.open(self.config(**kw), journal, on_report=collect) as ex:
                yield ex
        finally:
            await journal.close()

    def statuses(self, deploy_id: str) -> list[str]:
        """The deploy's statuses in order, repeats (progress within one status) collapsed."""
        out: list[str] = []
        for r in self.reports:
            if r.deploy_id == deploy_id and (not out or out[-1] != r.status):
                out.append(r.status)
        return out

    def release_dir(self, version: str, app: Application = APP) -> Path:
        return self.root / "releases" / app.project / app.name / app.env / version

    def current(self, app: Application = APP) -> str | None:
        link = self.root / "releases" / app.project / app.name / app.env / "current"
        return os.readlink(link) if link.is_symlink() else None


async def trio_wait(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    with trio.fail_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(0.02)


# ---- the mesh: real nodes on loopback with deploys enabled ---------------------------------------------

def mesh_fixture(n: int, **deploy: Any) -> Any:
    """A pytest fixture: a Mesh of n nodes whose deployed services are killed after the test."""
    import pytest

    @pytest.fixture
    def fixture(tmp_path: Path) -> Any:
        mesh = Mesh(tmp_path, n, **deploy)
        yield mesh
        mesh.kill_servers()
    return fixture


class Mesh:
    """A cluster of in-process nodes (tests/clusterkit.py), each with deploys allowed under its own
    `<data dir>/apps`, a deployer key with a `deploy`-role proof, and helpers to sign and offer
    commands and read records."""

    def __init__(self, tmp: Path, n: int = 3, *, labels: dict[str, tuple[str, ...]] | None = None, **deploy: Any):
        self.tmp = tmp
        self.kit = ClusterKit()
        self.deployer = KeyPair.generate()
        self.deploy_proof = self.kit.proof(self.deployer, role="deploy")
        self.nodes = [ClusterNode(self.kit, tmp, f"n{i}") for i in range(n)]
        self.labels = labels or {}
        self.python = sys.executable
        for node in self.nodes:
            self.configure(node, **deploy)

    def configure(self, node: Any, **deploy: Any) -> None:
        host = f"127.0.0.{self.nodes.index(node) + 1}"  # a loopback address of its own: services of all nodes on one port
        root = self.tmp / "apps" / host
        root.mkdir(parents=True, exist_ok=True)
        base: dict[str, Any] = dict(allowed_roots=(root,), host=host, artifact_dir=node.data_dir / "artifacts", kill_grace=0.5,
                                    min_free_bytes=0, artifact_min_age=0.0, report_interval=0.2)
        node.config = attrs.evolve(node.config, deploy=DeployConfig(**{**base, **deploy}))

    def root(self, i: int) -> Path:
        return self.tmp / "apps" / self.host(i)

    def host(self, i: int) -> str:
        return f"127.0.0.{i + 1}"

    @property
    def shared_root(self) -> str:
        """The root commands name: `${host}` becomes each node's own directory."""
        return str(self.tmp / "apps" / "${host}")

    def peer(self, i: int) -> str:
        return str(self.nodes[i].peer_id)

    def index(self, peer: str) -> int:
        return [self.peer(i) for i in range(len(self.nodes))].index(peer)

    def service(self, i: int) -> Any:
        return self.nodes[i].node.service(DeployService)

    async def start(self, nursery: trio.Nursery, only: list[int] | None = None) -> None:
        which = list(range(len(self.nodes))) if only is None else only
        for i in which:
            await self.nodes[i].start(nursery)
        snapshot = self.kit.snapshot([n.member(self.labels.get(n.name, ())) for n in self.nodes])
        for i in which:
            await self.nodes[i].node.membership.offer(snapshot)

        def connected() -> bool:
            return all(len([c for c in self.nodes[i].node.host.connections()]) >= len(which) - 1 for i in which)
        await wait_for(connected, timeout=30, what="the mesh to connect")

    def command(self, action: Any, *, deploy_id: str, version: str | None, targets: list[int] | None = None, root: str = "",
                app: Application = APP, **kw: Any) -> DeployCommand:
        peers = [self.peer(i) for i in (targets if targets is not None else range(len(self.nodes)))]
        return command(action, deploy_id=deploy_id, version=version, root=Path(root or self.shared_root), app=app,
                       targets=Targets(peers=tuple(peers)), **kw)

    def sign(self, cmd: DeployCommand, key: Any = None, proof: Any = None) -> Any:
        return sign_command(cmd, key or self.deployer, proof or self.deploy_proof, self.kit.cluster_id)

    async def offer(self, env: Any, at: int = 0) -> Any:
        return await self.nodes[at].node.bus.offer(env)

    def record(self, deploy_id: str, at: int = 0) -> dict[str, Any] | None:
        return self.service(at).record(deploy_id)

    async def settled(self, deploy_id: str, at: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                rec = self.record(deploy_id, at)
                if rec is not None and rec["settled"]:
                    return rec
                await trio.sleep(0.05)

    def node_row(self, rec: dict[str, Any], i: int) -> dict[str, Any]:
        return next(row for row in rec["nodes"] if row["peer_id"] == self.peer(i))

    async def publish(self, data: bytes, at: int = 0, name: str = "artifact.tar.gz") -> ArtifactRef:
        """Upload `data` as an artifact to node `at` over the network, as the admin tool does."""
        path = self.tmp / f"upload-{hashlib.sha256(data).hexdigest()[:12]}"
        path.write_bytes(data)
        manifest, env = await client.manifest_for(path, self.deployer, self.deploy_proof, self.kit.cluster_id,
                                                  origin=self.nodes[at].peer_id, name=name)
        async with open_host(self.deployer) as host:
            conn = await host.connect(self.nodes[at].full_addr)
            await client.upload(host, conn, path, manifest, env)
        return ArtifactRef(manifest.sha256, manifest.size)

    def release(self, i: int, version: str, app: Application = APP) -> Path:
        return self.root(i) / "releases" / app.project / app.name / app.env / version

    def current(self, i: int, app: Application = APP) -> str | None:
        link = self.root(i) / "releases" / app.project / app.name / app.env / "current"
        return os.readlink(link) if link.is_symlink() else None

    def kill_servers(self) -> None:
        for i in range(len(self.nodes)):
            kill_servers(self.root(i))


def get_at(host: str, port: int, path: str = "/") -> tuple[int, str] | None:
    """One HTTP GET to host:port; None if nothing answers."""
    import http.client
    try:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except OSError:
        return None


def http_tar(ref: ArtifactRef, port: int, python: str = sys.executable, install: str | None = None) -> Any:
    """deploy.tar params for http_release(): the service listens on ${host}:port."""
    from p2pnode.deploy.spec import TarAction

    return TarAction(ref, install_script=install, env=(("PORT", str(port)), ("PYTHON", python), ("HOST", "${host}")))
