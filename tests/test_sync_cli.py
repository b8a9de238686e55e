"""`p2pnode sync …` against real nodes on loopback, through their control sockets: status, tasks,
log, and trigger --wait (live bars; non-zero when a receiver refuses the folder or time runs out).
Commands run in the test's own trio loop (`sync_cli.run`, what `p2pnode sync` runs under trio.run)."""

import io
import json
import os
import subprocess
import sys

import attrs
import pytest

from clusterkit import ClusterKit, ClusterNode, wait_for
from p2pnode import timefmt
from p2pnode.config import SyncConfig
from p2pnode.identity import KeyPair
from p2pnode.sync import cli as sync_cli
from p2pnode.sync.documents import FolderDoc
from p2pnode.sync.model import FolderConfig, NodeTarget
from p2pnode.sync.service import SyncService


class TTY(io.StringIO):
    def isatty(self):
        return True


async def sync(*args, out=None):
    """Run `p2pnode sync ARGS` in this process: (exit code, stdout, stderr)."""
    out = out or io.StringIO()
    err = io.StringIO()
    code = await sync_cli.run(list(args), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def declare(kit, fid, source, source_path, receivers, **kw):
    config = FolderConfig(id=fid, source=source, source_path=str(source_path),
                          nodes=tuple(NodeTarget(peer, str(path)) for peer, path in receivers), issued_at_ns=timefmt.now_ns(), **kw)
    return FolderDoc(fid, config.issued_at_ns, config).sign(kit.admin, kit.proof(), kit.cluster_id)


@pytest.fixture
async def mesh(tmp_path, nursery):
    kit = ClusterKit()
    data = tmp_path / "data"
    nodes = [ClusterNode(kit, tmp_path / "n", name) for name in ("src", "r1", "r2")]
    for n in nodes:
        n.config = attrs.evolve(n.config, sync=SyncConfig(allowed_roots=(data,)))
        await n.start(nursery)
    await nodes[0].node.membership.offer(kit.snapshot([n.member() for n in nodes]))
    await wait_for(lambda: all(n.node.health.state == "healthy" for n in nodes), what="healthy")
    tree = data / "site"
    (tree / "css").mkdir(parents=True)
    (tree / "index.html").write_text("<h1>v1</h1>\n")
    (tree / "css/site.css").write_text("body{}\n" * 100)
    (tree / "big.bin").write_bytes(os.urandom(3 << 20))
    return kit, nodes, data, tree


def held_by_all(nodes, fid):
    return lambda: all(fid in n.node.service(SyncService).folders for n in nodes)


async def test_trigger_wait_status_tasks_log(mesh):
    kit, (src, r1, r2), data, tree = mesh
    doc = declare(kit, "site", src.peer_id, tree, [(r1.peer_id, data / "r1"), (r2.peer_id, data / "r2")], max_parallel_nodes=2)
    assert (await src.node.membership.offer(doc)).result == "accepted"
    await wait_for(held_by_all([src, r1, r2], "site"), what="folder everywhere")

    # a git hook on the source: change the tree, trigger, wait; not a terminal, so one line per change
    (tree / "index.html").write_text("<h1>v2</h1>\n")
    code, out, err = await sync("trigger", "site", "--wait", "--timeout", "30", "--interval", "0.2", "--data-dir", str(src.data_dir))
    assert code == 0, out + err
    assert (data / "r1/index.html").read_text() == "<h1>v2</h1>\n" and (data / "r2/big.bin").stat().st_size == 3 << 20
    lines = out.splitlines()
    assert lines[0].startswith("site: rescanned,") and "waiting for every receiver to hold version" in lines[0]
    assert any(line.startswith("r1  [####################] 100%  in sync at version") for line in lines)
    assert any(line.startswith("r2  [####################] 100%") for line in lines)
    assert "\x1b[" not in out
    assert lines[-1].startswith("site: all 2 receivers hold version")

    # status, from a receiver: any node answers for every receiver
    code, out, _ = await sync("status", "--data-dir", str(r2.data_dir))
    assert code == 0
    assert out.startswith("folder site  version ") and "source src " in out and "(SOURCE)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  r")}
    assert rows["r1"][2:6][0] == "yes" and rows["r1"][4] == "in-sync" and rows["r1"][5] == "SUCCESS"
    assert rows["r2"][4] == "in-sync"
    assert "2 of 2 receivers in sync, at most 2 applying at once" in out
    code, out, _ = await sync("status", "site", "--json", "--data-dir", str(r1.data_dir))
    view = json.loads(out)
    (folder,) = view["folders"]
    assert folder["id"] == "site" and [n["state"] for n in folder["nodes"]] == ["in-sync", "in-sync"]

    # tasks: by node name; the receiver's own history holds its finished tasks
    code, out, _ = await sync("tasks", "--node", "r1", "--json", "--data-dir", str(r1.data_dir))
    tasks = json.loads(out)["tasks"]
    assert tasks and {t["node"] for t in tasks} == {str(r1.peer_id)} and all(t["status"] == "SUCCESS" for t in tasks)
    task_id = tasks[0]["id"]
    code, out, _ = await sync("tasks", "--folder", "site", "--data-dir", str(src.data_dir))
    assert code == 0 and out.splitlines()[0].split()[:4] == ["TASK", "FOLDER", "NODE", "STATUS"]
    assert sum(1 for line in out.splitlines() if line.startswith("site@")) >= 2

    # the log of that task
    code, out, _ = await sync("log", task_id, "--data-dir", str(r1.data_dir))
    assert code == 0, out
    assert f"task      {task_id}" in out and "status    SUCCESS  attempt 1" in out and f"node      r1 {r1.peer_id}" in out
    assert "applying version" in out and "done" in out.splitlines()[-1]

    # a trigger when nothing changed: the same version, every receiver already holds it
    code, out, _ = await sync("trigger", "site", "--wait", "--timeout", "10", "--json", "--data-dir", str(src.data_dir))
    result = json.loads(out)
    assert code == 0 and result["changed"] == 0 and result["result"] == "in-sync"


async def test_wait_fails_when_a_receiver_refuses_the_folder(mesh, tmp_path):
    kit, (src, r1, r2), data, tree = mesh
    outside = tmp_path / "elsewhere"  # not under r2's sync.allowed_roots
    doc = declare(kit, "site", src.peer_id, tree, [(r1.peer_id, data / "r1"), (r2.peer_id, outside)])
    assert (await src.node.membership.offer(doc)).result == "accepted"
    await wait_for(held_by_all([src, r1, r2], "site"), what="folder everywhere")

    term = TTY()
    code, out, err = await sync("trigger", "site", "--wait", "--timeout", "30", "--interval", "0.2", "--data-dir", str(src.data_dir),
                                out=term)
    assert code == 1, out + err
    assert "\x1b[2K" in out  # a terminal: the bars are redrawn in place
    assert "version" in out and "failed on r2" in out
    assert f"r2: REFUSED, at version 0: folder site: target_path {outside} is not under any of this node's sync.allowed_roots" in out
    assert not outside.exists()

    code, out, _ = await sync("status", "site", "--data-dir", str(r1.data_dir))
    assert "refused" in out and "REFUSED" in out and "last errors:" in out and f"r2: folder site: target_path {outside}" in out


async def test_wait_times_out_on_a_receiver_that_never_answers(mesh):
    kit, (src, r1, _), data, tree = mesh
    ghost = KeyPair.generate().peer_id  # listed as a receiver, never runs
    doc = declare(kit, "site", src.peer_id, tree, [(r1.peer_id, data / "r1"), (ghost, data / "ghost")], max_parallel_nodes=2)
    assert (await src.node.membership.offer(doc)).result == "accepted"
    await wait_for(held_by_all([src, r1], "site"), what="folder held")
    code, out, _ = await sync("trigger", "site", "--wait", "--timeout", "2", "--interval", "0.2", "--data-dir", str(src.data_dir))
    assert code == 3, out
    assert "timed out after 2s; 1 of 2 receivers hold version" in out
    assert f"  {ghost.to_base58()[:8]}…{ghost.to_base58()[-6:]}: no state yet, at version 0, offline" in out


async def test_clear_errors(mesh, tmp_path):
    kit, (src, r1, r2), data, tree = mesh
    code, _, err = await sync("status", "--data-dir", str(tmp_path / "nothing"))
    assert code == 2 and "cannot reach the node's control socket" in err and "is `p2pnode run` running" in err
    code, out, _ = await sync("status", "--data-dir", str(src.data_dir))
    assert code == 0 and out.startswith("no folders")
    code, _, err = await sync("status", "nope", "--data-dir", str(src.data_dir))
    assert code == 2 and "no folder 'nope'" in err
    doc = declare(kit, "site", src.peer_id, tree, [(r1.peer_id, data / "r1")])
    assert (await src.node.membership.offer(doc)).result == "accepted"
    await wait_for(held_by_all([src, r1], "site"), what="folder held")
    code, _, err = await sync("trigger", "site", "--data-dir", str(r1.data_dir))
    assert code == 2 and "not the source of site" in err and "run the trigger there" in err
    code, _, err = await sync("log", "site@nothing:1", "--data-dir", str(r1.data_dir))
    assert code == 2 and "no task 'site@nothing:1'" in err
    code, out, _ = await sync("trigger", "site", "--data-dir", str(src.data_dir))
    assert code == 0 and out.startswith("site: rescanned, ")


async def test_trigger_on_a_source_that_refuses_its_folder(mesh, tmp_path):
    kit, (src, r1, _), data, _ = mesh
    outside = tmp_path / "outside"
    outside.mkdir()
    doc = declare(kit, "site", src.peer_id, outside, [(r1.peer_id, data / "r1")])
    assert (await src.node.membership.offer(doc)).result == "accepted"
    await wait_for(lambda: (st := src.node.service(SyncService).state_of("site", src.peer_id)) is not None and st.status == "REFUSED",
                   what="the source refuses")
    code, _, err = await sync("trigger", "site", "--wait", "--data-dir", str(src.data_dir))
    assert code == 1 and f"the source refuses folder site: folder site: source_path {outside} is not under" in err
    code, out, _ = await sync("status", "--data-dir", str(src.data_dir))
    assert code == 0 and "(REFUSED)" in out and "source error: folder site:" in out


def test_help_explains_the_commands():
    run = subprocess.run([sys.executable, "-m", "p2pnode", "sync", "trigger", "--help"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0
    assert "exit codes: 0 every receiver holds the version" in run.stdout and "post-receive" in run.stdout
    run = subprocess.run([sys.executable, "-m", "p2pnode", "sync", "--help"], capture_output=True, text=True, timeout=30)
    assert all(word in run.stdout for word in ("status", "tasks", "log", "trigger", "in-sync", "refused"))


def test_bars_and_verdicts_from_views():
    target = sync_cli.Target("site", 7, 12)
    base = {"node": "12D3KooWAbcdefghijklmnop", "name": "w1", "online": True}
    running = {**base, "status": "RUNNING", "index_id": 7, "seq": 10, "eta_s": 4.2,
               "task": {"index_id": 7, "seq": 12, "files_done": 1, "files_total": 4, "bytes_done": 1 << 20, "bytes_total": 4 << 20,
                        "rate": 2 << 20, "last_error": ""}}
    assert sync_cli.judge(running, target) == "waiting"
    line = sync_cli.progress_line(running, target)
    assert line.startswith("w1  [#####---------------]  25%  1/4 files  1.0 MiB/4.0 MiB  2.0 MiB/s  ETA 4s  RUNNING")
    planning = {**running, "task": {**running["task"], "files_total": 0, "bytes_total": 0, "rate": 0.0}}
    assert sync_cli.progress_line(planning, target).endswith("  0%  planning  RUNNING")
    assert sync_cli.judge({**running, "seq": 12}, target) == "done"
    assert sync_cli.judge({**running, "index_id": 8, "seq": 99}, target) == "waiting"  # another index: not this version
    degraded_old = {**running, "status": "SYNC_DEGRADED", "task": {**running["task"], "seq": 11}}
    assert sync_cli.judge(degraded_old, target) == "waiting"  # failed on an older version: a new task comes
    assert sync_cli.judge({**running, "status": "SYNC_DEGRADED"}, target) == "failed"
    assert sync_cli.judge({**base, "status": "REFUSED", "seq": 0}, target) == "failed"
    assert sync_cli.fmt_eta(3725) == "1h02m" and sync_cli.fmt_bytes(1536) == "1.5 KiB" and sync_cli.fmt_bytes(0) == "0 B"


def test_painter_redraws_in_place_on_a_terminal():
    term = TTY()
    painter = sync_cli.Painter(term)
    painter.paint(["a 1", "b 1"])
    painter.paint(["a 2", "b 2"])
    assert term.getvalue() == "\x1b[2Ka 1\n\x1b[2Kb 1\n\x1b[2F\x1b[2Ka 2\n\x1b[2Kb 2\n"
    plain = io.StringIO()
    painter = sync_cli.Painter(plain)
    painter.paint(["a 1", "b 1"])
    painter.paint(["a 1", "b 2"])
    assert plain.getvalue() == "a 1\nb 1\nb 2\n"
