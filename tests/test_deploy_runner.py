"""Scripts in their own process group, health checks against real sockets, service management."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h11
import pytest
import trio
from deploykit import alive, free_port, trio_wait

from p2pnode.deploy.errors import DeployError
from p2pnode.deploy.healthcheck import http_probe, tcp_probe, wait_healthy
from p2pnode.deploy.runner import BoundedLog, group_members, run_argv, run_script, script_env
from p2pnode.deploy.services import ScriptsService, SystemdService, render_unit
from p2pnode.deploy.spec import Application, HealthCheck, Service

ENV = script_env({"GREETING": "hello"}, "test-deploy")


async def test_exit_code_env_cwd_and_marker(tmp_path):
    log = BoundedLog()
    result = await run_script('echo "$GREETING from $(pwd) as $P2PNODE_DEPLOY_ID"; echo oops >&2; exit 4', cwd=tmp_path, env=ENV,
                              timeout=10, log=log)
    assert result.returncode == 4 and not result.ok and result.describe() == "exit 4"
    assert log.tail() == f"hello from {tmp_path} as test-deploy\noops\n"
    assert "SECRET" not in script_env({}, "x", base={"SECRET": "s", "PATH": "/bin"})


async def test_log_keeps_the_tail(tmp_path):
    log = BoundedLog(max_bytes=4096)
    result = await run_script("for i in $(seq 1 20000); do echo line-$i; done", cwd=tmp_path, env=ENV, timeout=30, log=log)
    assert result.ok
    assert log.tail().endswith("line-20000\n") and len(log.data()) == 4096 and log.dropped > 100_000
    log.note("step done")
    assert log.tail().endswith("== step done\n")


async def test_timeout_kills_the_whole_group_even_children_ignoring_sigterm(tmp_path):
    pids = tmp_path / "pids"
    script = (f"echo $$ >> {pids}\n"
              f"(trap '' TERM; sleep 300 & echo $! >> {pids}; wait) &\n"
              f"bash -c 'trap \"\" TERM; echo $$ >> {pids}; sleep 300' &\n"
              "trap '' TERM\nwait\n")
    started: list[int] = []

    async def on_start(pgid: int) -> None:
        started.append(pgid)

    with trio.fail_after(10):
        result = await run_script(script, cwd=tmp_path, env=ENV, timeout=1.0, log=BoundedLog(), kill_grace=0.3, on_start=on_start)
    assert result.timed_out and result.describe().startswith("timed out after 1.")
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 3 and started == [recorded[0]]
    await trio_wait(lambda: not any(alive(p) for p in recorded), 5, "every process of the group to die")
    # the subshells too (SIGKILL is delivered at once, but exiting takes a moment on a busy machine)
    await trio_wait(lambda: group_members(started[0]) == [], 5, "the process group to be empty")


async def test_normal_exit_leaves_daemons_running_and_does_not_wait_for_their_pipe(tmp_path):
    pidfile = tmp_path / "daemon.pid"
    # a careless start.sh: the daemon keeps our stdout open
    script = f"sleep 300 & echo $! > {pidfile}\necho started\n"
    with trio.fail_after(5):
        result = await run_script(script, cwd=tmp_path, env=ENV, timeout=10, log=(log := BoundedLog()), drain=0.2)
    pid = int(pidfile.read_text())
    try:
        assert result.ok and "started" in log.tail() and alive(pid)
        assert group_members(os.getpgid(pid), marker="test-deploy") == [pid]
        assert group_members(os.getpgid(pid), marker="another-deploy") == []
    finally:
        os.kill(pid, 9)


async def test_cancelled_runner_takes_its_group_down(tmp_path):
    pids = tmp_path / "pids"
    with trio.move_on_after(0.5):
        await run_script(f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait", cwd=tmp_path, env=ENV, timeout=60, log=BoundedLog())
    recorded = [int(p) for p in pids.read_text().split()]
    await trio_wait(lambda: not any(alive(p) for p in recorded), 5, "the group to die")


async def test_missing_program_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        await run_argv(["/nonexistent/program"], cwd=tmp_path, env=ENV, timeout=5, log=BoundedLog())


# ---- health checks -------------------------------------------------------------------------------

async def _accept(listener, handle):
    async with trio.open_nursery() as n:
        while True:
            stream = await listener.accept()
            n.start_soon(handle, stream)


@pytest.fixture
async def http(nursery):
    async def start(answers):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        served = [0]

        async def handle(stream):
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):  # a TCP check: connect, then hang up
                    return
            status, body = answers[min(served[0], len(answers) - 1)]
            served[0] += 1
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=[("Content-Length", str(len(body)))])) +
                                  conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            await stream.aclose()

        nursery.start_soon(_accept, listener, handle)
        return port, served
    return start


async def test_http_probe(http):
    port, _ = await http([(200, b"ok version 3")])
    assert await http_probe(f"http://127.0.0.1:{port}/health") == (True, f"GET http://127.0.0.1:{port}/health: status 200")
    assert (await http_probe(f"http://127.0.0.1:{port}/health", body_contains="version 3"))[0]
    ok, msg = await http_probe(f"http://127.0.0.1:{port}/health", body_contains="version 4")
    assert not ok and "does not contain 'version 4'" in msg
    ok, msg = await http_probe(f"http://127.0.0.1:{port}/health", expect_status=204)
    assert not ok and "status 200, expected 204" in msg
    dead = free_port()
    ok, msg = await http_probe(f"http://127.0.0.1:{dead}/")
    assert not ok and f"cannot connect to 127.0.0.1:{dead}" in msg
    assert await tcp_probe("127.0.0.1", port) == (True, f"connected to 127.0.0.1:{port}")
    assert not (await tcp_probe("127.0.0.1", dead))[0]


async def test_retries_then_healthy(http):
    port, served = await http([(503, b"starting"), (503, b"starting"), (200, b"ok")])
    check = HealthCheck("http", url=f"http://127.0.0.1:{port}/", retries=3, interval=0.05, timeout=5)
    attempts: list[tuple[int, bool]] = []

    async def on_attempt(n, ok, message):
        attempts.append((n, ok))

    result = await wait_healthy(check, on_attempt=on_attempt)
    assert result.ok and result.attempts == 3 and result.retry_count == 2 and attempts == [(1, False), (2, False), (3, True)]


async def test_retries_exhausted_and_deadline(http):
    port, _ = await http([(500, b"")])
    result = await wait_healthy(HealthCheck("http", url=f"http://127.0.0.1:{port}/", retries=2, interval=0.01, timeout=5))
    assert not result.ok and result.attempts == 3 and result.message.startswith("unhealthy after 3 attempts: ")
    result = await wait_healthy(HealthCheck("http", url=f"http://127.0.0.1:{port}/", retries=50, interval=0.1, timeout=0.35))
    assert not result.ok and "not healthy within 0.35 s" in result.message and result.attempts <= 4


async def test_min_healthy_time_restarts_after_a_failure(http):
    # healthy once, then a blip, then healthy for good: the window starts again after the blip
    port, served = await http([(200, b""), (500, b""), (200, b"")])
    clock_start = trio.current_time()
    check = HealthCheck("http", url=f"http://127.0.0.1:{port}/", retries=3, interval=0.05, timeout=5, min_healthy_time=0.2)
    result = await wait_healthy(check)
    assert result.ok and result.retry_count >= 3 and served[0] >= 5
    assert trio.current_time() - clock_start >= 0.2
    port2, _ = await http([(200, b""), (500, b"")])  # healthy once, then never again
    result = await wait_healthy(HealthCheck("http", url=f"http://127.0.0.1:{port2}/", retries=2, interval=0.02, timeout=5,
                                            min_healthy_time=1.0))
    assert not result.ok and "unhealthy after" in result.message


async def test_injected_clock_and_sleep(tmp_path):
    now = [1000.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def failing(script: str, timeout: float):
        return (await run_script("exit 1", cwd=tmp_path, env=ENV, timeout=timeout, log=BoundedLog()))

    result = await wait_healthy(HealthCheck("script", script="exit 1"), run_script=failing, clock=lambda: now[0], sleep=fake_sleep)
    # the seed's defaults: 3 retries, 10 s apart, within 60 s
    assert not result.ok and result.attempts == 4 and slept == [10.0, 10.0, 10.0]


async def test_script_check(tmp_path):
    async def runner(script: str, timeout: float):
        return await run_script(script, cwd=tmp_path, env=ENV, timeout=timeout, log=BoundedLog())

    (tmp_path / "ready").touch()
    assert (await wait_healthy(HealthCheck("script", script="test -f ready"), run_script=runner)).ok
    result = await wait_healthy(HealthCheck("script", script="exit 3", retries=0), run_script=runner)
    assert not result.ok and "health script: exit 3" in result.message


# ---- services ------------------------------------------------------------------------------------

APP = Application("shop", "api", "prod")


def runner_for(log: BoundedLog):
    async def run(argv, cwd: Path, timeout: float, label: str):
        log.note(label)
        return await run_argv(argv, cwd=cwd, env=ENV, timeout=timeout, log=log)
    return run


async def test_start_and_stop_scripts(tmp_path):
    release = tmp_path / "1.0"
    (release / "lightnode").mkdir(parents=True)
    (release / "lightnode/start.sh").write_text('echo "start in $(pwd)" > started\n')
    (release / "lightnode/stop.sh").write_text("rm started; exit 0\n")
    log = BoundedLog()
    svc = ScriptsService(Service("scripts", start="lightnode/start.sh", stop="lightnode/stop.sh"), runner_for(log))
    await svc.start(release, "1.0")
    assert (release / "lightnode/started").read_text() == f"start in {release / 'lightnode'}\n"
    await svc.stop(release, "1.0")
    assert not (release / "lightnode/started").exists()
    (release / "lightnode/start.sh").write_text("exit 9\n")
    with pytest.raises(DeployError, match="lightnode/start.sh of release 1.0: exit 9"):
        await svc.start(release, "1.0")
    (release / "lightnode/stop.sh").unlink()
    await svc.stop(release, "1.0")  # nothing to stop with
    (release / "lightnode/start.sh").unlink()
    with pytest.raises(DeployError, match="release 1.0 has no lightnode/start.sh"):
        await svc.start(release, "1.0")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (test.sh installs it)")
def test_generated_unit_verifies(tmp_path):
    release = tmp_path / "releases/shop/api/prod/1.0"
    (release / "bin").mkdir(parents=True)
    app_bin = release / "bin/backend-app"
    app_bin.write_text("#!/bin/sh\nexec sleep 1000\n")
    app_bin.chmod(0o755)
    spec = Service("systemd", command=f"{app_bin} -env=prod -config={release}/config/app.yaml --rate=50%",
                   env=(("GREETING", 'say "hi" 100%'), ("MODE", "prod")))
    text = render_unit(APP, spec, release, "1.0", user="deploy")
    path = tmp_path / APP.unit_name
    path.write_text(text)
    assert path.name == "shop-api-prod.service"
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    lines = text.splitlines()
    assert f"WorkingDirectory={release}" in lines and "User=deploy" in lines and "Restart=on-failure" in lines
    assert f"ExecStart={app_bin} -env=prod -config={release}/config/app.yaml --rate=50%%" in lines
    assert 'Environment="GREETING=say \\"hi\\" 100%%"' in lines
    path.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))  # the check catches a bad unit
    broken = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert "Restart=sometimes" in broken.stdout + broken.stderr or "Failed to parse" in broken.stdout + broken.stderr


async def test_systemd_service_writes_the_unit_and_calls_systemctl(tmp_path):
    """No systemd runs on the test machines, so `systemctl` here is a program that records its
    arguments; what this proves is the unit file and the order of systemctl calls, not a start."""
    calls = tmp_path / "calls"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    systemctl.chmod(0o755)
    log = BoundedLog()
    spec = Service("systemd", command="/bin/sleep 1000")
    svc = SystemdService(APP, spec, runner_for(log), unit_dir=tmp_path / "units", systemctl=[str(systemctl)])
    await svc.stop(tmp_path, "1.0")  # no unit yet: nothing to stop
    await svc.start(tmp_path / "rel", "1.0")
    await svc.stop(tmp_path / "rel", "1.0")
    assert (tmp_path / "units/shop-api-prod.service").read_text().startswith("[Unit]\nDescription=p2pnode deploy shop/api/prod 1.0\n")
    assert calls.read_text().splitlines() == ["daemon-reload", "enable shop-api-prod.service", "restart shop-api-prod.service",
                                              "stop shop-api-prod.service"]
    assert sys.executable
