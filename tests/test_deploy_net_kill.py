"""kill -9 of a node mid-deploy: the node runs as a real `p2pnode run` process; killed while its install
script runs, restarted on the same data dir, it finds the deploy in its journal, kills the leftover
process group, starts the deploy over (nothing running was touched) and reports — and the report
reaches the other nodes, which never stopped waiting for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import attrs
import trio
from deploykit import Mesh, alive, make_tar

from p2pnode.config import InitConnection
from p2pnode.deploy.spec import TarAction

INSTALL = """
mark="$MARKS/install-$HOST"
if [ ! -f "$mark" ]; then
  touch "$mark"
  sleep 120 &
  echo $! > "$mark.pid"
  wait
fi
echo "installed on $HOST"
"""


def spawn(node, log) -> subprocess.Popen:
    config = node.config.to_json()
    (node.data_dir / "config.json").write_text(json.dumps(config, indent=2))
    return subprocess.Popen([sys.executable, "-m", "p2pnode", "run", "--data-dir", str(node.data_dir), "--log-level", "debug"],
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


async def test_node_killed_mid_deploy_recovers_and_reports_after_restart(tmp_path):
    mesh = Mesh(tmp_path, 3)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = None
    victim = mesh.nodes[2]
    victim.config = attrs.evolve(victim.config, init_connections=(InitConnection("multiaddr", str(mesh.nodes[0].full_addr)),))
    log = open(tmp_path / "n2.log", "ab")
    try:
        async with trio.open_nursery() as nursery:
            await mesh.start(nursery, only=[0, 1])
            proc = spawn(victim, log)
            with trio.fail_after(30):  # it dials n0, pulls the snapshot, and is a member
                while mesh.nodes[0].node.host.connection_to(victim.peer_id) is None:
                    await trio.sleep(0.05)
            ref = await mesh.publish(make_tar([("app.txt", b"hello")]), at=0)
            action = TarAction(ref, install_script=INSTALL, env=(("MARKS", str(marks)), ("HOST", "${host}")))
            cmd = mesh.command(action, deploy_id="k1", version="1.0", targets=[2])
            assert (await mesh.offer(mesh.sign(cmd), at=1)).result == "accepted"

            def victim_status() -> str | None:
                rec = mesh.record("k1", at=0)
                return mesh.node_row(rec, 2)["status"] if rec else None

            with trio.fail_after(30):
                while victim_status() != "installing" or not (marks / "install-127.0.0.3.pid").exists():
                    await trio.sleep(0.05)
            sleeper = int((marks / "install-127.0.0.3.pid").read_text())
            assert alive(sleeper)
            os.kill(proc.pid, signal.SIGKILL)  # the node only: its install script's group lives on
            proc.wait(10)
            assert alive(sleeper) and victim_status() == "installing"

            proc = spawn(victim, log)
            with trio.fail_after(60):  # the final report reaches n0, and n1 (it spreads: not both at once)
                while victim_status() != "success" or (mesh.record("k1", at=1) or {}).get("state") != "success":
                    await trio.sleep(0.05)
            rec = mesh.record("k1", at=1)
            row = mesh.node_row(rec, 2)
            assert rec["state"] == "success" and row["final"] and "release 1.0 is current" in row["message"], row
            assert not alive(sleeper)  # the leftover process group was killed on restart
            assert (tmp_path / "apps" / "127.0.0.3" / "releases/shop/api/prod/1.0/app.txt").read_bytes() == b"hello"
            text = (await mesh.service(0).remote_log("k1", mesh.peer(2)))["log"]
            assert "node restarted during installing" in text and "leftover process(es) of the interrupted step" in text, text
            assert "installed on 127.0.0.3" in text
            nursery.cancel_scope.cancel()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
