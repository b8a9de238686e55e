"""Deploy benchmark: 8 nodes on loopback, each a real `p2pnode run` process, driven as an operator would.

1. A trivial deploy.shell to all 8 with max_parallel 8: time from handing the signed command to one
   node until that node's record shows every target `success` (target < 1 s), median of 5.
2. A 100 MiB deploy.tar through the mesh: the artifact uploaded once to one node, the command to
   all 8 (max_parallel 8); the uploader's bytes (every TCP byte this process sends: upload, commands,
   status polls)
   ÷ the artifact size (target ≤ 1.2), and the time — beside the same to 1 node.
3. The per-host way of the agent seed (003: "to deploy to 4 machines, upload 4 times"): upload the
   artifact to each of the 8 nodes separately and deploy each on its own, all in parallel, measured
   in the same run with the same nodes.

    python benchmarks/deploy.py            # ~ 2-3 minutes; needs ~5 GB of disk in $TMPDIR
    python benchmarks/deploy.py --size-mib 20 --runs 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from clusterkit import ClusterKit, free_tcp_port

from p2pnode import timefmt
from p2pnode.cluster.documents import Member
from p2pnode.deploy import client
from p2pnode.deploy.documents import sign_command
from p2pnode.deploy.spec import Application, ArtifactRef, DeployCommand, Rollout, ShellAction, TarAction, Targets
from p2pnode.host import open_host
from p2pnode.identity import KeyPair, save_key
from p2pnode.multiaddr import Multiaddr
from p2pnode.platform import bus

N = 8
APP = Application("bench", "app", "prod")


_SENT = [0]
_send_all = trio.SocketStream.send_all


async def _counting_send_all(self: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
    _SENT[0] += len(data)
    await _send_all(self, data)


trio.SocketStream.send_all = _counting_send_all  # type: ignore[method-assign]  # every TCP byte this process sends


def written_bytes() -> int:
    """Bytes this process has sent on TCP so far: Noise and yamux framing included (TCP/IP headers not)."""
    return _SENT[0]


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.kit = ClusterKit("bench")
        self.deployer = KeyPair.generate()
        self.proof = self.kit.proof(self.deployer, role="deploy")
        self.keys = [KeyPair.generate() for _ in range(N)]
        self.ports = [free_tcp_port() for _ in range(N)]
        self.procs: list[subprocess.Popen] = []
        self.members = [Member(k.peer_id, f"n{i}", (Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{p}"),), ())
                        for i, (k, p) in enumerate(zip(self.keys, self.ports))]

    def addr(self, i: int) -> Multiaddr:
        return Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{self.ports[i]}").with_peer_id(self.keys[i].peer_id)

    def start(self) -> None:
        for i in range(N):
            data = self.tmp / f"n{i}"
            data.mkdir()
            save_key(data / "node.key", self.keys[i])
            host = f"127.0.0.{i + 1}"
            (self.tmp / "apps" / host).mkdir(parents=True)
            config = {"listen": [f"/ip4/127.0.0.1/tcp/{self.ports[i]}"], "cluster_id": self.kit.cluster_id,
                      "system_pubkey": self.kit.system_pubkey, "heartbeat_interval": 5.0, "log_level": "warning",
                      "init_connections": [{"type": "multiaddr", "value": str(self.addr(0))}] if i else [],
                      "deploy": {"allowed_roots": [str(self.tmp / "apps" / host)], "host": host, "min_free_bytes": 0}}
            (data / "config.json").write_text(json.dumps(config))
            log = open(self.tmp / f"n{i}.log", "wb")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "p2pnode", "run", "--data-dir", str(data)],
                                               stdout=subprocess.DEVNULL, stderr=log, start_new_session=True))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()

    def command(self, action, deploy_id: str, version: str, targets: list[int], parallel: int) -> DeployCommand:
        now = timefmt.now_ns()
        return DeployCommand(deploy_id, APP, version, str(self.tmp / "apps" / "${host}"), action, now, now + 3600 * timefmt.NS,
                             targets=Targets(peers=tuple(str(self.keys[i].peer_id) for i in targets)),
                             rollout=Rollout(max_parallel=parallel))


def make_archive(path: Path, size: int, seed: int) -> None:
    """A tar.gz holding `size` bytes of incompressible data (so the archive is ~size too)."""
    buf = io.BytesIO()
    payload = hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("payload.bin")
        info.size, info.mode, info.mtime = size, 0o644, 0
        tf.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())


async def settle(host, conn, deploy_id: str, proof, timeout: float = 600.0) -> dict:
    record = await client.follow(host, conn, deploy_id, auth=proof, timeout=timeout, interval=0.01)
    if record is None or not record.get("settled") or record["state"] != "success":
        raise RuntimeError(f"deploy {deploy_id} did not succeed: {json.dumps(record)[:2000]}")
    return record


def last_success_s(record: dict, issued_ns: int) -> float:
    return max(timefmt.parse_ns(n["updated_at"]) for n in record["nodes"]) / 1e9 - issued_ns / 1e9


async def run(args: argparse.Namespace, tmp: Path) -> dict:
    c = Cluster(tmp)
    c.start()
    out: dict = {}
    try:
        async with open_host(c.deployer) as host:
            conns = []
            with trio.fail_after(60):
                for i in range(N):
                    while True:
                        try:
                            conns.append(await host.connect(c.addr(i)))
                            break
                        except Exception:
                            await trio.sleep(0.1)
            snapshot = c.kit.snapshot(c.members)
            for conn in conns:
                await bus.push(host, conn, snapshot)
            # warm-up (not measured): the mesh forms and every node runs a deploy once
            for w in range(2):
                cmd = c.command(ShellAction("true"), f"warm-{w}", f"w{w}", list(range(N)), N)
                await bus.push(host, conns[0], sign_command(cmd, c.deployer, c.proof, c.kit.cluster_id))
                await settle(host, conns[0], cmd.deploy_id, c.proof, timeout=120)

            # 1. trivial shell deploy to 8, max_parallel 8
            seen, signed = [], []
            for r in range(args.runs):
                cmd = c.command(ShellAction("echo deployed"), f"shell-{r}", f"s{r}", list(range(N)), N)
                t0 = time.perf_counter()
                env = sign_command(cmd, c.deployer, c.proof, c.kit.cluster_id)
                await bus.push(host, conns[r % N], env)
                record = await settle(host, conns[r % N], cmd.deploy_id, c.proof)
                seen.append(time.perf_counter() - t0)
                signed.append(last_success_s(record, cmd.issued_at_ns))
            out["shell8"] = {"median_s": statistics.median(seen), "max_s": max(seen), "last_signed_median_s": statistics.median(signed)}
            print(f"shell to 8: {out['shell8']}", file=sys.stderr, flush=True)

            # 2. tar through the mesh: to 8, and to 1
            size = args.size_mib << 20

            async def mesh_tar(name: str, targets: list[int], seed: int) -> dict:
                path = tmp / f"{name}.tar.gz"
                make_archive(path, size, seed)
                w0, t0 = written_bytes(), time.perf_counter()
                manifest, menv = await client.manifest_for(path, c.deployer, c.proof, c.kit.cluster_id, origin=conns[0].peer_id)
                await client.upload(host, conns[0], path, manifest, menv)
                ref = ArtifactRef(manifest.sha256, manifest.size)
                cmd = c.command(TarAction(ref), name, name, targets, N)
                await bus.push(host, conns[0], sign_command(cmd, c.deployer, c.proof, c.kit.cluster_id))
                await settle(host, conns[0], name, c.proof)
                result = {"seconds": time.perf_counter() - t0, "uploader_bytes": written_bytes() - w0, "artifact_bytes": manifest.size}
                print(f"{name}: {result}", file=sys.stderr, flush=True)
                return result

            out["mesh8"] = await mesh_tar("mesh8", list(range(N)), 1)
            out["mesh1"] = await mesh_tar("mesh1", [1], 2)

            # 3. the per-host way: upload to each node, deploy each on its own, all at once
            path = tmp / "perhost.tar.gz"
            make_archive(path, size, 3)
            w0, t0 = written_bytes(), time.perf_counter()

            async def one_host(i: int) -> None:
                manifest, menv = await client.manifest_for(path, c.deployer, c.proof, c.kit.cluster_id, origin=conns[i].peer_id)
                await client.upload(host, conns[i], path, manifest, menv)
                cmd = c.command(TarAction(ArtifactRef(manifest.sha256, manifest.size)), f"perhost-{i}", "perhost", [i], 1)
                await bus.push(host, conns[i], sign_command(cmd, c.deployer, c.proof, c.kit.cluster_id))
                await settle(host, conns[i], cmd.deploy_id, c.proof)

            async with trio.open_nursery() as nursery:
                for i in range(N):
                    nursery.start_soon(one_host, i)
            out["perhost8"] = {"seconds": time.perf_counter() - t0, "uploader_bytes": written_bytes() - w0,
                               "artifact_bytes": path.stat().st_size}
            print(f"perhost8: {out['perhost8']}", file=sys.stderr, flush=True)
    finally:
        c.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5, help="shell deploys measured (median)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="p2pnode-deploy-bench-"))
    try:
        r = trio.run(run, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(r))
    s = r["shell8"]
    print()
    print(f"deploy.shell to {N} nodes, max_parallel {N}: command → all success {s['median_s'] * 1000:.0f} ms median, "
          f"{s['max_s'] * 1000:.0f} ms worst of {args.runs} (last success signed {s['last_signed_median_s'] * 1000:.0f} ms after "
          f"issued_at); target < 1000 ms")
    print()
    print(f"{'deploy.tar of ' + str(args.size_mib) + ' MiB':<34}{'time':>9}{'uploader bytes':>17}{'÷ artifact':>12}{'time ÷ 1 node':>15}")
    base = r["mesh1"]["seconds"]
    for key, label in (("mesh1", "through the mesh, to 1 node"), ("mesh8", f"through the mesh, to {N} nodes"),
                       ("perhost8", f"per host (seed 003), to {N} nodes")):
        x = r[key]
        print(f"{label:<34}{x['seconds']:>8.1f}s{x['uploader_bytes'] / 2**20:>13.1f} MiB{x['uploader_bytes'] / x['artifact_bytes']:>12.2f}"
              f"{x['seconds'] / base:>15.2f}")
    print(f"\n(target: uploader bytes ÷ artifact ≤ 1.2 through the mesh. Uploader bytes: every TCP byte the uploading process sent —\n"
          f" upload, commands, status polls, Noise and yamux framing included. {os.cpu_count()} cores shared by all {N} nodes and the uploader.)")


if __name__ == "__main__":
    main()
