"""Control-plane benchmark: N nodes on loopback (N = 25, 50, 100), full mesh, as in production.

For each N it prints: the time for a new snapshot, pushed to one node, to be applied by every
node; heartbeat bytes and CPU per node per interval; memory per node. Nodes run in worker
processes (several nodes per trio loop), so the machine's two cores are shared the way a small
test rig would share them — real deployments have one node per host.

    python benchmarks/membership.py                # N = 25, 50, 100
    python benchmarks/membership.py --sizes 25     # one size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from procstat import rss_kib

INTERVAL = 10.0  # heartbeat interval; the production default is 30 s (--interval)
WORKERS = 4
STEADY_INTERVALS = 4
PUSHES = 5


def interval() -> float:
    return float(os.environ.get("P2PNODE_BENCH_INTERVAL", INTERVAL))


async def worker() -> None:
    """Child process: runs the nodes it is given; answers JSON-line commands on stdin."""
    from p2pnode.config import NodeConfig
    from p2pnode.envelope import Envelope
    from p2pnode.identity import KeyPair, save_key
    from p2pnode.multiaddr import Multiaddr
    from p2pnode.node import Node, NodeOptions
    from p2pnode.transport.upgrade import UpgradeLimits

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    nodes: list[Node] = []
    applied: dict[str, list[int]] = {}
    baseline = rss_kib()

    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async with trio.open_nursery() as nursery:
        while True:
            while b"\n" not in buf:
                chunk = await stdin.receive_some()
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            cmd = json.loads(line)
            if cmd["op"] == "start":
                for spec in cmd["nodes"]:
                    data = Path(spec["data_dir"])
                    data.mkdir(parents=True, exist_ok=True)
                    save_key(data / "node.key", KeyPair.from_seed(bytes.fromhex(spec["seed"])))
                    config = NodeConfig(data_dir=data, listen=(Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{spec['port']}"),),
                                        cluster_id=cmd["cluster_id"], system_pubkey=cmd["system_pubkey"], heartbeat_interval=interval(),
                                        log_level="warning")
                    node = Node(config, NodeOptions(upgrade=UpgradeLimits(keepalive_interval=30), control_socket=False))
                    await nursery.start(node.run)
                    node.membership.on_change(lambda snap: applied.setdefault(snap.issued_at, []).append(time.time_ns()))
                    nodes.append(node)
                reply({"ok": True})
            elif cmd["op"] == "offer":
                await nodes[0].membership.offer(Envelope.from_bytes(bytes.fromhex(cmd["envelope"])))
                reply({"ok": True})
            elif cmd["op"] == "stats":
                reply({
                    "healthy": sum(n.health.state == "healthy" for n in nodes),
                    "connections": sum(len(n.host.connections()) for n in nodes),
                    "applied": applied,
                    "cpu": time.process_time(),
                    "rss_kib": rss_kib() - baseline,
                    "hb_bytes": sum(n.heartbeat.bytes_sent for n in nodes),
                    "hb_sent": sum(n.heartbeat.sent for n in nodes),
                    "nodes": len(nodes),
                })


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_size(n: int, tmp: Path) -> dict:
    from clusterkit import ClusterKit, free_tcp_port

    from p2pnode.cluster.documents import Member
    from p2pnode.identity import KeyPair
    from p2pnode.multiaddr import Multiaddr

    kit = ClusterKit("bench")
    seeds = [os.urandom(32) for _ in range(n)]
    ports = [free_tcp_port() for _ in range(n)]
    members = [Member(KeyPair.from_seed(s).peer_id, f"n{i}", (Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{p}"),), ("bench",))
               for i, (s, p) in enumerate(zip(seeds, ports))]
    specs = [{"seed": s.hex(), "port": p, "data_dir": str(tmp / f"n{n}-{i}")} for i, (s, p) in enumerate(zip(seeds, ports))]
    workers = [Worker() for _ in range(WORKERS)]
    try:
        for w, chunk in zip(workers, [specs[i::WORKERS] for i in range(WORKERS)]):
            w.call(op="start", nodes=chunk, cluster_id=kit.cluster_id, system_pubkey=kit.system_pubkey)
        # first snapshot: nodes discover each other through it and connect (not measured)
        first = kit.snapshot(members)
        start = time.monotonic()
        workers[0].call(op="offer", envelope=first.to_bytes().hex())
        last_report = 0.0
        while True:
            stats = [w.call(op="stats") for w in workers]
            healthy, conns = sum(s["healthy"] for s in stats), sum(s["connections"] for s in stats)
            if healthy == n and conns >= n * (n - 1):
                break
            if time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                print(f"  n={n}: {time.monotonic() - start:5.1f}s healthy {healthy}/{n}, connection ends {conns}/{n * (n - 1)}",
                      file=sys.stderr, flush=True)
            if time.monotonic() - start > 300:
                raise RuntimeError(f"{n} nodes did not form a healthy full mesh in 300 s")
            time.sleep(0.5)
        mesh_s = time.monotonic() - start
        time.sleep(2 * interval())
        # measured: a new snapshot pushed to one node, until the last node applied it; PUSHES times
        from p2pnode.cluster.documents import Snapshot
        from p2pnode.envelope import Envelope

        alls, halves = [], []
        for round_ in range(PUSHES):
            env = kit.snapshot(members[::-1] if round_ % 2 == 0 else list(members))  # same members, new issued_at
            issued = env.to_bytes()
            issued_at = Snapshot.from_dict(Envelope.from_bytes(issued).verify()).issued_at
            t0 = time.time_ns()
            workers[round_ % WORKERS].call(op="offer", envelope=issued.hex())
            while True:
                stats = [w.call(op="stats") for w in workers]
                times = sorted(t for s in stats for t in s["applied"].get(issued_at, []))
                if len(times) == n:
                    break
                if time.time_ns() - t0 > 60e9:
                    raise RuntimeError(f"only {len(times)} of {n} nodes applied the snapshot in 60 s")
                time.sleep(0.02)
            alls.append((times[-1] - t0) / 1e9)
            halves.append((times[n // 2] - t0) / 1e9)
            time.sleep(1)
        converge_s, worst_s, median_s = statistics.median(alls), max(alls), statistics.median(halves)
        time.sleep(1)
        # steady state: heartbeats only, over STEADY_INTERVALS intervals
        before = [w.call(op="stats") for w in workers]
        time.sleep(STEADY_INTERVALS * interval())
        after = [w.call(op="stats") for w in workers]
        cpu = sum(a["cpu"] - b["cpu"] for a, b in zip(after, before))
        hb_bytes = sum(a["hb_bytes"] - b["hb_bytes"] for a, b in zip(after, before))
        hb_sent = sum(a["hb_sent"] - b["hb_sent"] for a, b in zip(after, before))
        rss = sum(a["rss_kib"] for a in after)
    finally:
        for w in workers:
            w.close()
    intervals = STEADY_INTERVALS
    return {
        "n": n, "mesh_s": mesh_s, "converge_s": converge_s, "converge_worst_s": worst_s, "median_s": median_s,
        "hb_msgs_per_node_interval": hb_sent / n / intervals,
        "hb_bytes_per_node_interval": hb_bytes / n / intervals,
        "cpu_ms_per_node_interval": cpu * 1000 / n / intervals,
        "mem_mib_per_node": rss / 1024 / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--interval", type=float, default=INTERVAL, help="heartbeat interval in seconds (default %(default)s)")
    args = parser.parse_args()
    os.environ["P2PNODE_BENCH_INTERVAL"] = str(args.interval)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rows.append(run_size(n, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'N':>4}  {'mesh up':>9}  {'snapshot to all':>15}  {'worst':>7}  {'to half':>8}  {'hb msgs':>8}  {'hb bytes':>9}  {'CPU':>9}  {'memory':>9}")
    print(f"{'':>4}  {'':>9}  {'median, <2 s':>15}  {'':>7}  {'':>8}  {'/node/int':>8}  {'/node/int':>9}  {'/node/int':>9}  {'/node':>9}")
    for r in rows:
        print(f"{r['n']:>4}  {r['mesh_s']:>8.1f}s  {r['converge_s']:>14.3f}s  {r['converge_worst_s']:>6.3f}s  {r['median_s']:>7.3f}s  {r['hb_msgs_per_node_interval']:>8.1f}"
              f"  {r['hb_bytes_per_node_interval']:>8.0f}B  {r['cpu_ms_per_node_interval']:>7.2f}ms  {r['mem_mib_per_node']:>7.2f}MiB")
    print(f"\n(snapshot times: median and worst of {PUSHES} pushes; heartbeat interval {interval():g} s; CPU is the whole node's in steady\n"
          " state, heartbeats being nearly all of it; bytes are envelope bytes, before 30 bytes of yamux/noise framing per message)")


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        trio.run(worker)
    else:
        main()
