"""Folder sync across hosts in network namespaces: one source and three receivers of a tree with a
200 MiB file; the source's link goes down in the middle of the transfer. The receivers go on with
what they can get from each other, and finish once the source is back. Needs root (CI runs as root)."""

import json
import sys
import time
from pathlib import Path

import pytest
import trio

from clusterkit import ClusterKit
from netns import lab_or_fail
from synckit import MiB, make_tree
from treecmp import assert_same_tree
from p2pnode import control, timefmt
from p2pnode.cluster.documents import Member
from p2pnode.identity import KeyPair, save_key
from p2pnode.multiaddr import Multiaddr
from p2pnode.sync.documents import FolderDoc
from p2pnode.sync.model import FolderConfig, NodeTarget, RetryPolicy

pytestmark = pytest.mark.multihost
PORT = 4300


@pytest.fixture
def lab():
    with lab_or_fail(4) as lab:
        yield lab


async def push(data: Path, env) -> dict:
    code, verdict = await control.request(data / control.SOCKET_NAME, "POST", "/push", {"envelope": env.to_bytes().hex()})
    assert code == 200, verdict
    return verdict


async def sync_status(data: Path) -> dict:
    with trio.fail_after(10):
        code, view = await control.request(data / control.SOCKET_NAME, "GET", "/sync/status?folder=tree")
    return view if code == 200 else {}


async def test_source_link_down_mid_sync(lab, tmp_path):
    kit = ClusterKit()
    shared = tmp_path / "shared"
    hosts = []
    for i in range(1, 5):
        key = KeyPair.generate()
        data = tmp_path / f"h{i}"
        data.mkdir()
        save_key(data / "node.key", key)
        addr = f"/ip4/{lab.ip(i)}/tcp/{PORT}"
        hosts.append({"key": key, "data": data, "addr": addr, "ns": lab.hosts[i - 1]})
    for i, h in enumerate(hosts):
        config = {"listen": [h["addr"]], "cluster_id": kit.cluster_id, "system_pubkey": kit.system_pubkey,
                  "heartbeat_interval": 0.5, "sync": {"allowed_roots": [str(shared)]},
                  "init_connections": [{"type": "multiaddr", "value": f"{hosts[0]['addr']}/p2p/{hosts[0]['key'].peer_id}"}] if i else []}
        (h["data"] / "config.json").write_text(json.dumps(config))
        lab.spawn(h["ns"], [sys.executable, "-m", "p2pnode", "run", "--data-dir", str(h["data"])], tmp_path / f"h{i + 1}.log")
    tree = shared / "src"
    make_tree(tree, large=200 * MiB)
    with trio.fail_after(30):
        while not all((h["data"] / control.SOCKET_NAME).exists() for h in hosts):
            await trio.sleep(0.1)
    members = [Member(h["key"].peer_id, f"h{i + 1}", (Multiaddr.parse(h["addr"]),)) for i, h in enumerate(hosts)]
    await push(hosts[0]["data"], kit.snapshot(members))
    config = FolderConfig("tree", hosts[0]["key"].peer_id, str(tree),
                          tuple(NodeTarget(h["key"].peer_id, str(shared / f"out{i}")) for i, h in enumerate(hosts[1:], start=2)),
                          issued_at_ns=timefmt.now_ns(), max_parallel_nodes=3,
                          retry=RetryPolicy(max_attempts=20, backoff_base_s=1.0, backoff_cap_s=2.0))
    assert (await push(hosts[0]["data"], FolderDoc("tree", config.issued_at_ns, config).sign(kit.admin, kit.proof(), kit.cluster_id)))["result"] == "accepted"

    # mid-transfer (receivers hold a good part between them), the source's link goes down
    def moved(view: dict) -> int:
        nodes = view["folders"][0]["nodes"] if view.get("folders") else []
        return sum((n.get("task") or {}).get("bytes_done", 0) for n in nodes)

    with trio.fail_after(120):
        while moved(await sync_status(hosts[1]["data"])) < 150 * MiB:
            await trio.sleep(0.05)
    lab.link(1, False)
    down_at = time.monotonic()
    with trio.move_on_after(8):  # the receivers keep exchanging blocks among themselves
        while True:
            await trio.sleep(0.5)
    during = moved(await sync_status(hosts[1]["data"]))
    lab.link(1, True)
    with trio.fail_after(180):
        while True:
            view = await sync_status(hosts[1]["data"])
            if view and all(n.get("state") == "in-sync" for n in view["folders"][0]["nodes"]):
                break
            await trio.sleep(0.5)
    for i in (2, 3, 4):
        assert_same_tree(tree, shared / f"out{i}")
    # while the source was away, the receivers served each other blocks
    served = 0
    for h in hosts[1:]:
        code, st = await control.request(h["data"] / control.SOCKET_NAME, "GET", "/status")
        peers = st["blocks"]["peers"]
        served += sum(c["bytes_out"] for p, c in peers.items() if p != str(hosts[0]["key"].peer_id))
    assert served > 50 * MiB, served
    assert during > 150 * MiB and time.monotonic() - down_at >= 8
