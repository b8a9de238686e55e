"""The executor with real scripts, files and an HTTP service started by the deploy on loopback."""

from __future__ import annotations

import attrs
import pytest
import trio
from deploykit import APP, SCRIPTS, Kit, command, free_port, get, http_health, http_release, kill_servers, put_artifact, trio_wait

from p2pnode.deploy.errors import DeployError, QueueFull, RootNotAllowed
from p2pnode.deploy.spec import Application, RollbackAction, ShellAction, TarAction
from p2pnode.errors import DecodeError


@pytest.fixture
def kit(tmp_path):
    k = Kit(tmp_path)
    yield k
    kill_servers(k.root)


def tar_cmd(kit: Kit, version: str, port: int, healthy: bool = True, install: str | None = None, retries: int = 40):
    ref = put_artifact(kit.artifacts, http_release(version, healthy))
    action = TarAction(ref, install_script=install, env=(("PORT", str(port)), ("PYTHON", kit.python)))
    return command(action, deploy_id=f"tar-{version}", version=version, root=kit.root, health=http_health(port, retries=retries),
                   service=SCRIPTS)


def progress_ok(kit: Kit, deploy_id: str) -> bool:
    reports = [r for r in kit.reports if r.deploy_id == deploy_id]
    seqs = [r.seq for r in reports]
    return seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_tar_deploy_starts_service_health_checked_then_upgrade(kit):
    port = free_port()
    async with kit.executor() as ex:
        first = await ex.submit(tar_cmd(kit, "1.0", port))
        assert first.status == "pending" and first.progress == 0
        done = await ex.wait("tar-1.0")
        assert done.status == "success" and done.success and done.final and done.progress == 100, done
        assert get(port, "/health") == (200, "version 1.0\n")
        assert kit.current() == "1.0"
        statuses = kit.statuses("tar-1.0")
        assert statuses[:4] == ["pending", "executing", "uploading", "extracting"]
        assert statuses[-3:] == ["installing", "health_check", "success"], statuses
        progress = [r.progress for r in kit.reports if r.deploy_id == "tar-1.0"]
        assert progress == sorted(progress) and progress_ok(kit, "tar-1.0")
        old_pid = int((kit.release_dir("1.0") / "server.pid").read_text())

        await ex.submit(tar_cmd(kit, "2.0", port))
        done = await ex.wait("tar-2.0")
        assert done.status == "success", done
        assert get(port, "/health") == (200, "version 2.0\n")
        assert kit.current() == "2.0"
        assert not (kit.release_dir("1.0") / "server.pid").exists()  # stop.sh of 1.0 ran
        assert get(port, "/") == (200, "version 2.0\n") and old_pid
        log = await ex.log_of("tar-2.0")
        assert log is not None and b"== stop.sh (1.0)" in log and b"== start.sh (2.0)" in log


async def test_failing_health_check_rolls_back_and_previous_answers(kit):
    port = free_port()
    async with kit.executor() as ex:
        await ex.submit(tar_cmd(kit, "1.0", port))
        assert (await ex.wait("tar-1.0")).status == "success"
        await ex.submit(tar_cmd(kit, "2.0", port, healthy=False, retries=4))
        done = await ex.wait("tar-2.0")
    assert done.status == "rolled_back" and done.final and done.success is False, done
    assert "health check failed: unhealthy after 5 attempts" in done.message and "status 500, expected 200" in done.message
    assert "rolled back to 1.0" in done.message
    statuses = kit.statuses("tar-2.0")
    assert statuses[-3:] == ["failed", "rolling_back", "rolled_back"], statuses
    assert kit.current() == "1.0"
    assert not kit.release_dir("2.0").exists()  # the failed release is removed
    assert get(port, "/health") == (200, "version 1.0\n")  # the previous release answers again


async def test_install_failure_never_touches_the_running_release(kit):
    port = free_port()
    answers: list[object] = []
    async with kit.executor() as ex:
        await ex.submit(tar_cmd(kit, "1.0", port))
        assert (await ex.wait("tar-1.0")).status == "success"

        async def poll(task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            while True:
                answers.append(await trio.to_thread.run_sync(get, port, "/health"))
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            await nursery.start(poll)
            await ex.submit(tar_cmd(kit, "2.0", port, install="echo building; echo broken >&2; exit 3"))
            done = await ex.wait("tar-2.0")
            nursery.cancel_scope.cancel()
    assert done.status == "failed" and done.final and not done.success
    assert "install script exit 3" in done.message and "the running release 1.0 was not touched" in done.message
    assert "broken" in done.log_tail
    assert "rolling_back" not in kit.statuses("tar-2.0")
    assert answers and all(a == (200, "version 1.0\n") for a in answers), answers[:5]
    assert kit.current() == "1.0" and not kit.release_dir("2.0").exists()


async def test_script_timeout_kills_whole_group_and_runs_rollback_script(kit):
    pids = kit.tmp / "pids"
    marker = kit.tmp / "rolled-back"
    script = f"sleep 300 & echo $! >> {pids}\n(sleep 300 & echo $! >> {pids}; wait) &\necho $$ >> {pids}\nwait\n"
    action = ShellAction(script, timeout=1.0, rollback_script=f"echo rolled > {marker}")
    async with kit.executor() as ex:
        await ex.submit(command(action, deploy_id="slow", version="1", root=kit.root))
        done = await ex.wait("slow")
    assert done.status == "rolled_back" and "timed out after" in done.message and "rollback script ran" in done.message, done
    statuses = kit.statuses("slow")
    assert statuses == ["pending", "executing", "script_running", "timeout", "rolling_back", "rolled_back"], statuses
    assert marker.read_text() == "rolled\n"
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 3

    def gone():
        from deploykit import alive
        return not any(alive(p) for p in recorded)
    await trio_wait(gone, 5, "the script's whole process group to die")


async def test_shell_failure_without_previous_release_fails_cleanly(kit):
    async with kit.executor() as ex:
        await ex.submit(command(ShellAction("echo doing; exit 7"), deploy_id="s1", version="1", root=kit.root))
        done = await ex.wait("s1")
    assert done.status == "failed" and "deploy script exit 7" in done.message and "nothing to roll back to" in done.message
    assert kit.current() is None and not kit.release_dir("1").exists()


async def test_per_app_lock_queues_later_deploys_as_pending(kit):
    gate = kit.tmp / "gate"
    wait_gate = f"for i in $(seq 500); do [ -f {gate} ] && exit 0; sleep 0.02; done; exit 1"
    other = Application("shop", "web", "prod")
    async with kit.executor() as ex:
        await ex.submit(command(ShellAction(wait_gate), deploy_id="a", version="1", root=kit.root))
        await ex.submit(command(ShellAction("echo b"), deploy_id="b", version="2", root=kit.root))
        await ex.submit(command(ShellAction("echo c"), deploy_id="c", version="1", root=kit.root, app=other))
        done_c = await ex.wait("c")  # another application is not blocked
        assert done_c.status == "success"
        await trio_wait(lambda: "script_running" in kit.statuses("a"), what="a to run its script")
        assert kit.statuses("b") == ["pending"]
        status_b = await ex.status("b")
        assert status_b is not None and status_b.status == "pending" and "waiting" in status_b.message
        gate.touch()
        assert (await ex.wait("a")).status == "success"
        assert (await ex.wait("b")).status == "success"
    a_final = next(i for i, r in enumerate(kit.reports) if r.deploy_id == "a" and r.final)
    b_exec = next(i for i, r in enumerate(kit.reports) if r.deploy_id == "b" and r.status == "executing")
    assert b_exec > a_final
    assert kit.current() == "2"


async def test_refusals_name_the_reason(kit, tmp_path):
    async with kit.executor(max_pending_per_app=2) as ex:
        outside = command(ShellAction("true"), deploy_id="x", version="1", root=tmp_path / "elsewhere")
        with pytest.raises(RootNotAllowed, match="outside this node's deploy.allowed_roots"):
            await ex.submit(outside)
        gate = kit.tmp / "gate"
        wait_gate = f"for i in $(seq 500); do [ -f {gate} ] && exit 0; sleep 0.02; done; exit 1"
        await ex.submit(command(ShellAction(wait_gate), deploy_id="q1", version="1", root=kit.root))
        with pytest.raises(DeployError, match="already accepted"):
            await ex.submit(command(ShellAction("true"), deploy_id="q1", version="1", root=kit.root))
        await ex.submit(command(ShellAction("true"), deploy_id="q2", version="2", root=kit.root))
        with pytest.raises(QueueFull, match="limit 2"):
            await ex.submit(command(ShellAction("true"), deploy_id="q3", version="3", root=kit.root))
        expired = command(ShellAction("true"), deploy_id="old", version="9", root=kit.root)
        with pytest.raises(DecodeError, match="expired"):
            await ex.submit(attrs.evolve(expired, valid_until_ns=expired.issued_at_ns + 1))
        gate.touch()
        assert (await ex.wait("q2")).status == "success"
        # an existing version is refused (releases are immutable), and nothing running is touched
        await ex.submit(command(ShellAction("true"), deploy_id="again", version="2", root=kit.root))
        done = await ex.wait("again")
        assert done.status == "failed" and "release 2 of shop/api/prod already exists" in done.message
        assert kit.current() == "2"
    async with kit.executor(allowed_roots=()) as ex:
        with pytest.raises(RootNotAllowed, match="deploys are not enabled"):
            await ex.submit(command(ShellAction("true"), deploy_id="y", version="1", root=kit.root))


async def test_rollback_command_previous_then_named(kit):
    port = free_port()
    async with kit.executor() as ex:
        for v in ("1.0", "2.0"):
            await ex.submit(tar_cmd(kit, v, port))
            assert (await ex.wait(f"tar-{v}")).status == "success"
        await ex.submit(command(RollbackAction(), deploy_id="rb1", version=None, root=kit.root))
        done = await ex.wait("rb1")
        assert done.status == "rolled_back" and done.success and "rolled back to 1.0" in done.message, done
        assert kit.statuses("rb1") == ["pending", "rolling_back", "health_check", "rolled_back"]
        assert kit.current() == "1.0" and get(port, "/health") == (200, "version 1.0\n")
        # 2.0 is kept (rolled_back) so it can be named, but it is not "previous" any more
        await ex.submit(command(RollbackAction(), deploy_id="rb2", version=None, root=kit.root))
        done = await ex.wait("rb2")
        assert done.status == "rollback_failed" and "no previous release" in done.message
        await ex.submit(command(RollbackAction(), deploy_id="rb3", version="2.0", root=kit.root))
        done = await ex.wait("rb3")
        assert done.status == "rolled_back" and done.success and kit.current() == "2.0"
        assert get(port, "/health") == (200, "version 2.0\n")
        await ex.submit(command(RollbackAction(), deploy_id="rb4", version="7.7", root=kit.root))
        done = await ex.wait("rb4")
        assert done.status == "rollback_failed" and "release 7.7 of shop/api/prod is not kept" in done.message
        assert "kept: 1.0, 2.0" in done.message


async def test_keep_releases_and_variables(kit):
    async with kit.executor() as ex:
        for v in ("1", "2", "3", "4"):
            script = 'echo "${installPath} ${env} ${version} ${host} $HOME" > out.txt'
            await ex.submit(command(ShellAction(script), deploy_id=f"k{v}", version=v, root=kit.root, keep_releases=2))
            assert (await ex.wait(f"k{v}")).status == "success"
    releases = sorted(p.name for p in kit.release_dir("1").parent.iterdir() if not p.name.startswith("."))
    assert releases == ["3", "4", "current"]
    import os
    assert (kit.release_dir("4") / "out.txt").read_text() == f"{kit.release_dir('4')} prod 4 127.0.0.1 {os.environ['HOME']}\n"


async def test_tar_missing_or_corrupt_artifact(kit):
    port = free_port()
    cmd = tar_cmd(kit, "1.0", port)
    path = kit.artifacts / cmd.action.archive.sha256
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    async with kit.executor() as ex:
        await ex.submit(cmd)
        done = await ex.wait(cmd.deploy_id)
        assert done.status == "failed" and "refusing to use it" in done.message
        path.unlink()
        await ex.submit(command(cmd.action, deploy_id="again", version="1.0", root=kit.root))
        done = await ex.wait("again")
        assert done.status == "failed" and "is not on this node" in done.message
    assert kit.current() is None and not kit.release_dir("1.0").exists()
    assert APP.key == "shop/api/prod"
