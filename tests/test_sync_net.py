"""Folder sync between real nodes on loopback: a source, receivers, signed folder configs, blocks
from any peer, tasks, rolling turns, refusals."""


import attrs
import pytest

from clusterkit import ClusterKit, ClusterNode, wait_for
from synckit import MiB, make_tree, write_at
from treecmp import assert_same_tree
from p2pnode import timefmt
from p2pnode.config import SyncConfig
from p2pnode.sync.documents import FolderDoc
from p2pnode.platform.blocks import BlockService
from p2pnode.sync.model import FolderConfig, NodeTarget
from p2pnode.sync.service import SyncService


def folder(kit, fid, source, source_path, receivers, **kw):
    config = FolderConfig(id=fid, source=source.peer_id, source_path=str(source_path),
                          nodes=tuple(NodeTarget(r.peer_id, str(p), **o) for r, p, o in receivers), issued_at_ns=timefmt.now_ns(), **kw)
    return FolderDoc(fid, config.issued_at_ns, config).sign(kit.admin, kit.proof(), kit.cluster_id)


class Mesh:
    def __init__(self, kit, nodes, root):
        self.kit, self.nodes, self.root = kit, nodes, root

    def sync(self, n):
        return n.node.service(SyncService)

    def state(self, fid, n):
        return self.sync(self.nodes[0]).state_of(fid, n.peer_id)


@pytest.fixture
async def mesh(tmp_path, nursery):
    kit = ClusterKit()
    nodes = [ClusterNode(kit, tmp_path / "nodes", name) for name in ("src", "r1", "r2")]
    for n in nodes:
        n.config = attrs.evolve(n.config, sync=SyncConfig(allowed_roots=(tmp_path / "data",)))
        await n.start(nursery)
    await nodes[0].node.membership.offer(kit.snapshot([n.member() for n in nodes]))
    await wait_for(lambda: all(n.node.health.state == "healthy" for n in nodes), what="healthy")
    return Mesh(kit, nodes, tmp_path / "data")


def in_sync(mesh, fid, receivers, at_least=1):
    """Every receiver has applied the source's newest version (>= at_least), as the source sees it."""
    def ok():
        src = mesh.state(fid, mesh.nodes[0])
        if src is None or src.seq < at_least:
            return False
        for r in receivers:
            st = mesh.state(fid, r)
            if st is None or st.status != "SUCCESS" or (st.index_id, st.seq) != (src.index_id, src.seq):
                return False
        return True
    return ok


async def test_a_folder_reaches_every_receiver_and_follows_changes(mesh):
    src, r1, r2 = mesh.nodes
    tree = mesh.root / "src-tree"
    make_tree(tree, large=8 * MiB)
    doc = folder(mesh.kit, "web", src, tree, [(r1, mesh.root / "r1", {}), (r2, mesh.root / "r2", {})], max_parallel_nodes=2)
    assert (await src.node.membership.offer(doc)).result == "accepted"
    await wait_for(in_sync(mesh, "web", [r1, r2]), timeout=60, what="both receivers in sync")
    assert_same_tree(tree, mesh.root / "r1")
    assert_same_tree(tree, mesh.root / "r2")

    # change 1 MiB inside the large file: a new version, and only the changed blocks travel
    before = sum(c.bytes_in for c in r1.node.service(BlockService).exchange.peers.values())
    version = mesh.state("web", src).seq
    write_at(tree / "big.bin", 3 * MiB, b"\x01" * MiB)
    await wait_for(in_sync(mesh, "web", [r1, r2], at_least=version + 1), timeout=60, what="change synced")
    assert_same_tree(tree, mesh.root / "r1")
    moved = sum(c.bytes_in for c in r1.node.service(BlockService).exchange.peers.values()) - before
    assert 0 < moved <= 2 * MiB, moved
