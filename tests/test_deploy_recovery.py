"""kill -9 of the executor mid-deploy, then a restart that finds the deploy in the journal and finishes it.

The executor runs in a subprocess (`python -m p2pnode.deploy.local`), as a node would."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from deploykit import Kit, alive, command, make_tar, put_artifact, wait_until

from p2pnode.deploy.journal import HEALTH, LIVE, PREPARE, read_entry
from p2pnode.deploy.spec import HealthCheck, ShellAction, TarAction


@pytest.fixture
def kit(tmp_path):
    k = Kit(tmp_path)
    (tmp_path / "deploy.json").write_text(json.dumps({
        "allowed_roots": [str(k.root)], "host": "127.0.0.1", "artifact_dir": str(k.artifacts), "kill_grace": 0.5}))
    yield k


def local(kit: Kit, *commands, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    files = []
    for cmd in commands:
        path = kit.tmp / f"{cmd.deploy_id}.json"
        path.write_text(json.dumps(cmd.to_dict()))
        files.append(str(path))
    argv = [sys.executable, "-m", "p2pnode.deploy.local", "--config", str(kit.tmp / "deploy.json"),
            "--journal", str(kit.state / "deploy.db"), *files]
    if wait:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def entry(kit: Kit, deploy_id: str):
    try:
        return read_entry(kit.state / "deploy.db", deploy_id)
    except sqlite3.OperationalError:  # the subprocess is still creating the database
        return None


def killed(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


def reports(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_killed_while_script_runs_then_rolled_back_on_restart(kit):
    first = local(kit, command(ShellAction("echo one > out"), deploy_id="v1", version="1", root=kit.root))
    assert first.returncode == 0, first.stderr
    marker, child, rolled = kit.tmp / "started", kit.tmp / "child.pid", kit.tmp / "rolled"
    script = f"sleep 300 & echo $! > {child}\necho started > {marker}\nwait\n"
    cmd = command(ShellAction(script, timeout=600, rollback_script=f"echo rolled > {rolled}"), deploy_id="v2", version="2",
                  root=kit.root)
    proc = local(kit, cmd, wait=False)
    try:
        wait_until(marker.exists, 20, "the deploy script to start")
        e = wait_until(lambda: (x := entry(kit, "v2")) is not None and x.pgid is not None and x, 10, "the pgid in the journal")
        assert e.report.status == "script_running" and e.phase == LIVE and e.prev_version == "1"
    finally:
        killed(proc)
    orphan = int(child.read_text())
    assert alive(orphan)  # the node died, its script's child lives on in its own session
    assert kit.current() == "1" and (kit.release_dir("2")).is_dir()

    again = local(kit)
    assert again.returncode == 1, again.stderr  # the deploy did not succeed: it was rolled back
    out = reports(again)
    assert [r["status"] for r in out] == ["rolling_back", "rolled_back"], out
    assert "node restarted during script_running" in out[-1]["message"] and out[-1]["final"] and not out[-1]["success"]
    assert rolled.read_text() == "rolled\n"
    wait_until(lambda: not alive(orphan), 5, "the interrupted script's leftover process to be killed")
    e = entry(kit, "v2")
    assert e.report.status == "rolled_back" and e.pgid is None
    assert b"killed 2 leftover process(es)" in e.log or b"killed 1 leftover process(es)" in e.log
    assert kit.current() == "1" and not kit.release_dir("2").exists()
    assert local(kit).returncode == 0  # nothing left to recover


def test_killed_during_health_check_then_completed_on_restart(kit):
    ok = kit.tmp / "ok"
    ref = put_artifact(kit.artifacts, make_tar([("app.txt", b"v2")]))
    health = HealthCheck("script", script=f"test -f {ok}", retries=100, interval=0.2, timeout=120, attempt_timeout=5)
    proc = local(kit, command(TarAction(ref), deploy_id="t2", version="2", root=kit.root, health=health), wait=False)
    try:
        wait_until(lambda: (x := entry(kit, "t2")) is not None and x.phase == HEALTH, 20, "the health check phase")
    finally:
        killed(proc)
    assert kit.current() == "2"
    ok.touch()
    again = local(kit)
    assert again.returncode == 0, again.stderr
    out = reports(again)
    assert out[-1]["status"] == "success" and out[-1]["final"] and out[-1]["success"]
    assert (kit.release_dir("2") / "app.txt").read_bytes() == b"v2"


def test_killed_while_preparing_then_started_over(kit):
    gate, runs, child = kit.tmp / "gate", kit.tmp / "runs", kit.tmp / "child.pid"
    ref = put_artifact(kit.artifacts, make_tar([("app.txt", b"v1")]))
    install = (f"echo run >> {runs}\n[ -f {gate} ] || {{ sleep 300 & echo $! > {child}; }}\n"
               f"for i in $(seq 1000); do [ -f {gate} ] && exit 0; sleep 0.02; done; exit 1\n")
    proc = local(kit, command(TarAction(ref, install_script=install), deploy_id="p1", version="1", root=kit.root), wait=False)
    try:
        wait_until(lambda: runs.exists() and (x := entry(kit, "p1")) is not None and x.pgid is not None, 20, "the install script")
        assert entry(kit, "p1").phase == PREPARE
    finally:
        killed(proc)
    gate.touch()
    again = local(kit)
    assert again.returncode == 0, again.stderr
    statuses = [r["status"] for r in reports(again)]
    assert statuses[0] == "executing" and statuses[-1] == "success", statuses
    assert "starting over" in reports(again)[0]["message"]
    assert runs.read_text() == "run\nrun\n" and kit.current() == "1"
    assert not alive(int(child.read_text()))  # the interrupted install's group was killed on restart
    assert os.listdir(kit.release_dir("1")) == ["app.txt"]
    assert isinstance(kit.root, Path)
