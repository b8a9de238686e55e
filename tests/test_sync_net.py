"""Folder sync between real nodes on loopback: a source, receivers, signed folder configs, blocks
from any peer, tasks, rolling turns, refusals."""


import attrs
import pytest
import trio

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


async def test_renames_deletes_ignores_permissions_overlay_and_local_edits(mesh):
    src, r1, r2 = mesh.nodes
    tree = mesh.root / "src-tree"
    make_tree(tree, large=4 * MiB)
    (tree / "keep.log").write_text("ignored\n")
    receivers = [(r1, mesh.root / "r1", {}), (r2, mesh.root / "r2", {"strategy": "overlay"})]
    marker = mesh.root / "post-sync-ran"
    doc = folder(mesh.kit, "app", src, tree, receivers, max_parallel_nodes=2, ignore_patterns=("*.log",),
                 post_sync=("/bin/sh", "-c", f"echo ran >> {marker}"))
    await src.node.membership.offer(doc)
    await wait_for(in_sync(mesh, "app", [r1, r2]), timeout=60, what="first sync")
    assert not (mesh.root / "r1" / "keep.log").exists()  # ignored at the source: never indexed
    assert marker.read_text().count("ran") == 2  # post_sync on each receiver

    # rename a directory, delete files, make a local edit on r1, add an ignored file
    before = sum(c.bytes_in for c in r1.node.service(BlockService).exchange.peers.values())
    (tree / "a").rename(tree / "a-renamed")
    (tree / "zero").unlink()
    (tree / "medium.bin").unlink()
    (tree / "new.log").write_text("also ignored\n")
    (mesh.root / "r1" / "secret.key").write_bytes(b"tampered")
    version = mesh.state("app", src).seq
    changed = await src.node.service(SyncService).runs["app"].trigger()
    assert changed > 0
    await wait_for(in_sync(mesh, "app", [r1, r2], at_least=version + 1), timeout=60, what="changes synced")
    assert_same_tree(tree, mesh.root / "r1", skip=lambda name: name.endswith(".log"))  # mirror: deletes, edit reverted
    assert (mesh.root / "r2" / "zero").exists() and (mesh.root / "r2" / "a").is_dir()  # overlay keeps what it had
    moved = sum(c.bytes_in for c in r1.node.service(BlockService).exchange.peers.values()) - before
    # a rename and deletes need no blocks from the network; reverting the local edit fetches that file
    assert moved == (tree / "secret.key").stat().st_size, moved

    # ignore_permissions: a mode change at the source is not applied on the receivers
    no_perms = folder(mesh.kit, "app", src, tree, receivers, max_parallel_nodes=2, ignore_patterns=("*.log",),
                      ignore_permissions=True)
    await src.node.membership.offer(no_perms)
    (tree / "bin" / "run.sh").chmod(0o700)
    (tree / "touch").write_text("new version\n")
    version = mesh.state("app", src).seq
    await wait_for(lambda: src.node.service(SyncService).runs.get("app") is not None, what="source run restarted")
    await src.node.service(SyncService).runs["app"].trigger()
    await wait_for(in_sync(mesh, "app", [r1], at_least=version + 1), timeout=60, what="synced without permissions")
    assert (mesh.root / "r1" / "touch").read_text() == "new version\n"
    assert (mesh.root / "r1" / "bin" / "run.sh").stat().st_mode & 0o777 == 0o755


async def test_a_target_outside_the_allowed_roots_is_refused_with_the_reason(mesh, tmp_path):
    src, r1, r2 = mesh.nodes
    tree = mesh.root / "src-tree"
    tree.mkdir(parents=True)
    (tree / "f").write_text("x")
    outside = tmp_path / "elsewhere"
    await src.node.membership.offer(folder(mesh.kit, "bad", src, tree, [(r1, outside, {}), (r2, mesh.root / "ok", {})]))
    await wait_for(lambda: (st := mesh.state("bad", r1)) is not None and st.status == "REFUSED", what="r1 refuses")
    assert "allowed" in mesh.state("bad", r1).error and not outside.exists()
    await wait_for(in_sync(mesh, "bad", [r2]), what="r2 still syncs")


async def test_receivers_take_turns_and_finish_from_each_other_when_the_source_goes(mesh):
    src, r1, r2 = mesh.nodes
    tree = mesh.root / "src-tree"
    make_tree(tree, large=24 * MiB)
    doc = folder(mesh.kit, "turns", src, tree, [(r1, mesh.root / "r1", {}), (r2, mesh.root / "r2", {})], max_parallel_nodes=1)
    seen_running_together = False
    await src.node.membership.offer(doc)
    sync = r2.node.service(SyncService)
    with trio.fail_after(60):
        while True:  # watch the turns from r2's side; stop the source the moment r1 is done
            a, b = sync.state_of("turns", r1.peer_id), sync.state_of("turns", r2.peer_id)
            if a is not None and b is not None and a.status == b.status == "RUNNING":
                seen_running_together = True
            if a is not None and a.status == "SUCCESS" and a.seq > 0:
                break
            await trio.sleep(0.005)
    assert b is None or b.status != "SUCCESS", "r2 must wait for r1 (max_parallel_nodes 1)"
    await src.stop()
    # r2 gets the index and every block from r1 alone
    await wait_for(lambda: (st := sync.state_of("turns", r2.peer_id)) is not None and st.status == "SUCCESS" and st.seq == a.seq,
                   timeout=60, what="r2 finished without the source")
    assert not seen_running_together
    assert_same_tree(tree, mesh.root / "r2")
    served_by_r1 = r1.node.service(BlockService).exchange.counters(r2.peer_id).bytes_out
    assert served_by_r1 > 20 * MiB


async def test_index_chunks_not_signed_by_the_source_are_refused(mesh, make_host):
    """A member relays chunks it signed itself while the source is away: the receiver refuses them."""
    from p2pnode.identity import KeyPair
    from p2pnode.platform import bus, rpc
    from p2pnode.sync.documents import SyncState, sign_chunk
    from p2pnode.sync.model import FileEntry, IndexChunk
    from p2pnode.sync.service import LIMITS, PROTOCOL

    src, r1, r2 = mesh.nodes
    await r2.stop()
    liar = KeyPair.generate()
    await src.node.membership.offer(mesh.kit.snapshot([src.member(), r1.member(), liar_member(liar)]))
    tree = mesh.root / "src-tree"
    tree.mkdir(parents=True)
    (tree / "real").write_text("real\n")
    await src.node.membership.offer(folder(mesh.kit, "f", src, tree, [(r1, mesh.root / "r1", {}), (_Named(liar), mesh.root / "x", {})]))
    await wait_for(in_sync(mesh, "f", [r1]), what="first version synced")
    version = mesh.state("f", src)
    await src.stop()
    forged = IndexChunk("f", version.index_id, version.seq, version.seq + 1,
                        (FileEntry("evil", "file", version.seq + 1, 4, 0o644, 0, block_size=128 << 10, blocks=b"\0" * 32),))
    async with make_host(identity=liar) as h:
        async def serve(request, conn):
            return {"index_id": version.index_id, "chunks": [sign_chunk(forged, liar).to_bytes()], "more": False}
        rpc.serve(h, PROTOCOL, serve, LIMITS)
        conn = await h.connect(r1.full_addr)
        # the liar cannot announce a version in the source's name
        source_claim = SyncState("f", src.peer_id, timefmt.now_ns(), "source", "SOURCE", version.index_id, version.seq + 1, version.seq + 1)
        assert (await bus.push(h, conn, source_claim.sign(liar))).code == "bad_signature"
        # and the chunks it relays (signed by itself) are refused: r1's catch-up asks it as a relay
        run = r1.node.service(SyncService).runs["f"]
        assert await run.fetch_chunks(liar.peer_id, version.index_id, version.seq) is False
    sync = r1.node.service(SyncService)
    assert sync.counters["chunks_rejected"] == 1
    assert not (mesh.root / "r1" / "evil").exists()
    held = await sync.db.read(lambda c: sync.repo.desired_index(c, "f"))
    assert held == (version.index_id, version.seq)


class _Named:
    def __init__(self, key):
        self.peer_id = key.peer_id


def liar_member(key):
    from p2pnode.cluster.documents import Member

    return Member(key.peer_id, "liar")


async def test_strangers_get_no_index_and_no_blocks(mesh, make_host):
    from p2pnode.platform import rpc
    from p2pnode.sync.service import LIMITS, PROTOCOL

    src = mesh.nodes[0]
    async with make_host() as stranger:
        conn = await stranger.connect(src.full_addr)
        with pytest.raises(rpc.RequestRefused, match="forbidden"):
            await rpc.request(stranger, conn, PROTOCOL, {"op": "index", "folder": "web", "after": 0}, LIMITS)


async def test_a_full_disk_fails_the_task_with_the_reason_leaves_nothing_half_written_and_is_retried(mesh, tmpfs):
    from p2pnode.sync.model import RetryPolicy

    src, r1, r2 = mesh.nodes
    tree = mesh.root / "src-tree"
    make_tree(tree, large=8 * MiB)
    grow = tmpfs(mesh.root / "r1", "3m")
    retry = RetryPolicy(max_attempts=10, backoff_base_s=0.5, backoff_cap_s=1.0, jitter=0.0)
    await src.node.membership.offer(folder(mesh.kit, "big", src, tree, [(r1, mesh.root / "r1", {})], retry=retry))
    sync = src.node.service(SyncService)
    await wait_for(lambda: (st := sync.state_of("big", r1.peer_id)) is not None and st.task is not None
                   and st.task.status in ("RETRYING", "FAILED") and st.task.last_error, timeout=60, what="the task failed")
    task = sync.state_of("big", r1.peer_id).task
    assert "space" in task.last_error, task.last_error
    assert not (mesh.root / "r1" / "big.bin").exists()  # nothing under the final name
    grow("64m")
    await wait_for(in_sync(mesh, "big", [r1]), timeout=60, what="retried and synced once there is space")
    assert sync.state_of("big", r1.peer_id).task.attempt >= 2
    assert_same_tree(tree, mesh.root / "r1")


async def test_a_version_that_keeps_failing_leaves_the_folder_degraded(mesh, tmpfs):
    from p2pnode.sync.model import RetryPolicy

    src, r1, r2 = mesh.nodes
    tree = mesh.root / "src-tree"
    make_tree(tree, large=8 * MiB)
    tmpfs(mesh.root / "r1", "2m")
    retry = RetryPolicy(max_attempts=2, backoff_base_s=0.2, backoff_cap_s=0.2, jitter=0.0)
    await src.node.membership.offer(folder(mesh.kit, "doomed", src, tree, [(r1, mesh.root / "r1", {})], retry=retry))
    sync = src.node.service(SyncService)
    await wait_for(lambda: (st := sync.state_of("doomed", r1.peer_id)) is not None and st.status == "SYNC_DEGRADED",
                   timeout=60, what="degraded")
    st = sync.state_of("doomed", r1.peer_id)
    assert st.task.status == "FAILED" and st.task.attempt == 2 and "space" in st.task.last_error
    assert any("failed" in line for line in st.task.log)


async def test_a_receiver_killed_mid_file_resumes_with_the_blocks_it_had(tmp_path, nursery):
    """The receiver is a real `p2pnode run` process: kill -9 while it writes a 160 MiB file, start it
    again, and it fetches only what it had not written yet."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from clusterkit import free_tcp_port
    from p2pnode.cluster.documents import Member
    from p2pnode.identity import KeyPair, save_key
    from p2pnode.multiaddr import Multiaddr

    kit = ClusterKit()
    data = tmp_path / "data"
    src = ClusterNode(kit, tmp_path / "nodes", "src")
    src.config = attrs.evolve(src.config, sync=SyncConfig(allowed_roots=(data,)))
    await src.start(nursery)
    key = KeyPair.generate()
    rdir = tmp_path / "nodes" / "recv"
    rdir.mkdir(parents=True)
    save_key(rdir / "node.key", key)
    port = free_tcp_port()
    (rdir / "config.json").write_text(json.dumps({
        "listen": [f"/ip4/127.0.0.1/tcp/{port}"], "cluster_id": kit.cluster_id, "system_pubkey": kit.system_pubkey,
        "heartbeat_interval": 0.3, "init_connections": [{"type": "multiaddr", "value": str(src.full_addr)}],
        "sync": {"allowed_roots": [str(data)]}, "log_level": "info",
    }))
    receiver = Member(key.peer_id, "recv", (Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}"),))
    await src.node.membership.offer(kit.snapshot([src.member(), receiver]))

    def start():
        log = open(rdir / "log.txt", "ab")
        return subprocess.Popen([sys.executable, "-m", "p2pnode", "run", "--data-dir", str(rdir)], stdout=subprocess.DEVNULL, stderr=log)

    tree = data / "src-tree"
    tree.mkdir(parents=True)
    with open(tree / "large.bin", "wb") as f:
        for _ in range(40):
            f.write(os.urandom(4 * MiB))
    proc = start()
    try:
        sync = src.node.service(SyncService)
        await wait_for(lambda: src.node.health.state == "healthy", timeout=30, what="receiver connected")
        await src.node.membership.offer(folder(kit, "resume", src, tree, [(_Named(key), data / "out", {})]))
        tmp = data / "out" / ".p2psync.large.bin.tmp"
        with trio.fail_after(60):
            while not (tmp.exists() and tmp.stat().st_blocks * 512 > 48 * MiB):
                await trio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start()
        await wait_for(lambda: (st := sync.state_of("resume", key.peer_id)) is not None and st.status == "SUCCESS"
                       and st.seq == sync.state_of("resume", src.peer_id).seq, timeout=90, what="resumed and synced")
        assert_same_tree(tree, data / "out")
        line = next(line for line in sync.state_of("resume", key.peer_id).task.log if "resumed" in line)
        fetched = int(line.split("fetched ")[1].split(" B")[0])
        resumed = int(line.split("resumed ")[1].split(" B")[0])
        assert resumed >= 32 * MiB and fetched + resumed == 160 * MiB, line
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_source_outside_its_allowed_roots_is_refused_and_a_trigger_says_why(mesh, tmp_path):
    from p2pnode import control

    src, r1, r2 = mesh.nodes
    outside = tmp_path / "not-allowed"
    outside.mkdir()
    await src.node.membership.offer(folder(mesh.kit, "nope", src, outside, [(r1, mesh.root / "r1", {})]))
    await wait_for(lambda: (st := mesh.state("nope", src)) is not None and st.status == "REFUSED", what="source refuses")
    assert "source_path" in mesh.state("nope", src).error and "will not read" in mesh.state("nope", src).error
    code, reply = await control.request(src.node.control_path, "POST", "/sync/trigger", {"folder": "nope"})
    assert code == 409 and "source_path" in reply["error"]
    code, _ = await control.request(src.node.control_path, "GET", "/status")
    assert code == 200  # the node is still up


async def test_switching_a_receiver_from_overlay_to_mirror_deletes_what_the_source_no_longer_has(mesh):
    src, r1, r2 = mesh.nodes
    tree = mesh.root / "src-tree"
    tree.mkdir(parents=True)
    (tree / "stays").write_text("1")
    (tree / "goes").write_text("2")
    await src.node.membership.offer(folder(mesh.kit, "sw", src, tree, [(r1, mesh.root / "r1", {"strategy": "overlay"})]))
    await wait_for(in_sync(mesh, "sw", [r1]), what="first sync")
    (tree / "goes").unlink()
    version = mesh.state("sw", src).seq
    await src.node.service(SyncService).runs["sw"].trigger()
    await wait_for(in_sync(mesh, "sw", [r1], at_least=version + 1), what="overlay sync")
    assert (mesh.root / "r1" / "goes").exists()  # overlay never deletes
    await src.node.membership.offer(folder(mesh.kit, "sw", src, tree, [(r1, mesh.root / "r1", {"strategy": "mirror"})]))
    await wait_for(lambda: not (mesh.root / "r1" / "goes").exists(), what="mirror deletes it")
    assert (mesh.root / "r1" / "stays").read_text() == "1"
