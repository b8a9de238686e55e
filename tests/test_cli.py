"""The `p2pnode` command as an operator runs it: real processes, real sockets."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from clusterkit import free_tcp_port
from p2pnode import datadir

P2PNODE = [sys.executable, "-m", "p2pnode"]


@pytest.fixture
def node(tmp_path, request):
    """A `p2pnode run` process on loopback; yields (process, [full multiaddrs]). A test that also
    asks for `node_config` (e.g. parametrized) starts it with those config.json fields."""
    config = request.getfixturevalue("node_config") if "node_config" in request.fixturenames else None
    if config:
        (tmp_path / "data").mkdir(mode=0o700)
        (tmp_path / "data" / "config.json").write_text(json.dumps(config))
    tcp, ws = free_tcp_port(), free_tcp_port()
    proc = subprocess.Popen(
        P2PNODE + ["run", "--data-dir", str(tmp_path / "data"), "--listen", f"/ip4/127.0.0.1/tcp/{tcp}",
                   "--listen", f"/ip4/127.0.0.1/tcp/{ws}/ws"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        addrs = [proc.stdout.readline().strip() for _ in range(2)]
        assert all("/p2p/12D3KooW" in a for a in addrs), addrs
        yield proc, addrs
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(*args, timeout=60):
    return subprocess.run(P2PNODE + list(args), capture_output=True, text=True, timeout=timeout)


def test_run_creates_key_and_config_and_logs_addrs(node, tmp_path):
    proc, addrs = node
    key = tmp_path / "data" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    config = json.loads((tmp_path / "data" / "config.json").read_text())
    assert config["listen"] == ["/ip4/0.0.0.0/tcp/4100", "/ip4/0.0.0.0/tcp/4100/ws"]  # the file keeps the defaults
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    err = proc.stderr.read()
    assert "action=key_created" in err and "action=listening addr=" + addrs[0] in err
    assert "action=stopping signal=SIGTERM" in err and "action=stopped" in err


@pytest.mark.parametrize("which", [0, 1])
def test_ping_prints_rtts(node, which):
    _, addrs = node
    result = run("ping", addrs[which], "-n", "3", "-i", "0.05")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"PING {addrs[which]}")
    assert [l.split()[0] for l in lines[1:4]] == ["seq=1", "seq=2", "seq=3"]
    assert all(float(l.split("rtt=")[1].split()[0]) > 0 for l in lines[1:4])
    assert lines[4].startswith("--- 3 replies")


def test_id_prints_identify_record(node):
    _, addrs = node
    result = run("id", addrs[0], "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["peer_id"] == addrs[0].rsplit("/", 1)[1]
    assert info["agent_version"].startswith("p2pnode/")
    assert "/ipfs/ping/1.0.0" in info["protocols"]
    assert sorted(info["listen_addrs"]) == sorted(a.rsplit("/p2p/", 1)[0] for a in addrs)
    text = run("id", addrs[1])
    assert "agent_version" in text.stdout and "/ipfs/id/1.0.0" in text.stdout


def test_ping_failure_exits_nonzero():
    result = run("ping", f"/ip4/127.0.0.1/tcp/{free_tcp_port()}", "-n", "1", "--timeout", "3")
    assert result.returncode == 1
    assert "ping:" in result.stderr and "Traceback" not in result.stderr


def test_ping_wrong_identity_exits_nonzero(node):
    _, addrs = node
    other = "12D3KooWGzh3Wv5aKu1EhUvkuBiTo7QbDr3D7HR2Ki7TbeMmsG3E"
    result = run("ping", addrs[0].rsplit("/p2p/", 1)[0] + "/p2p/" + other, "-n", "1")
    assert result.returncode == 1
    assert f"dialed {other} but the remote proved it is" in result.stderr


def test_bad_multiaddr_is_a_clear_error():
    result = run("ping", "/ip4/127.0.0.1/tcp/notaport")
    assert result.returncode != 0
    assert "invalid value 'notaport'" in result.stderr and "Traceback" not in result.stderr
    result = run("ping", "/ip4/127.0.0.1/tcp/4100/p2p/12D3KooWbogus")
    assert result.returncode != 0
    assert result.stderr.strip() == ("p2pnode: multiaddr /p2p: invalid peer ID '12D3KooWbogus': a 12D3KooW… peer ID has "
                                     "52 characters, this one has 13; check that it was copied whole")


@pytest.mark.parametrize(
    "config,expected",
    [
        ('{"listen": ["/ip4/1.2.3.4/udp/1"]}', "config field 'listen': invalid value '/ip4/1.2.3.4/udp/1'"),
        ('{"network_mode": "mesh"}', "allowed: public, private, auto"),
        ('{"heartbeat_interval": -1}', "config field 'heartbeat_interval'"),
        ('{"colour": "blue"}', "config field 'colour' is unknown"),
        ('{"listen": ', "not valid JSON"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, config, expected):
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.json").write_text(config)
    result = run("run", "--data-dir", str(data), timeout=30)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_world_readable_key_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.json").write_text("{}")
    from p2pnode.identity import KeyPair, save_key

    save_key(data / "node.key", KeyPair.generate())
    os.chmod(data / "node.key", 0o644)
    result = run("run", "--data-dir", str(data), timeout=30)
    assert result.returncode == 2
    assert "chmod 600" in result.stderr


def test_help_explains_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("run", "ping", "id"):
        assert command in result.stdout
    assert "node.key" in run("run", "--help").stdout


def test_status_local_and_remote(node, tmp_path):
    proc, addrs = node
    data = tmp_path / "data"
    sock = data / "control.sock"
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    local = run("status", "--data-dir", str(data), "--json")
    assert local.returncode == 0, local.stderr
    view = json.loads(local.stdout)
    assert view["state"] == "unconfigured" and view["member_count"] == 0
    assert sorted(view["addrs"]) == sorted(addrs)
    table = run("status", "--data-dir", str(data))
    assert "state     unconfigured  (0 of 0 members online)" in table.stdout
    # nodes answer status to members only: a stranger is told why, in one line
    remote = run("status", "--data-dir", str(tmp_path / "elsewhere"), "--peer", addrs[0], "--json")
    assert remote.returncode == 1 and "answers status only to members" in remote.stderr and "Traceback" not in remote.stderr


@pytest.mark.parametrize("node_config", [{"public_status": True}])
def test_status_of_a_public_node_from_anywhere(node, node_config, tmp_path):
    proc, addrs = node
    remote = run("status", "--data-dir", str(tmp_path / "elsewhere"), "--peer", addrs[0], "--json")
    assert remote.returncode == 0, remote.stderr
    view = json.loads(remote.stdout)
    assert view["peer_id"] == addrs[0].rsplit("/", 1)[1] and view["state"] == "unconfigured"


def test_status_without_a_running_node_says_so(tmp_path):
    result = run("status", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "is `p2pnode run` running with this data dir?" in result.stderr


def test_second_node_on_one_data_dir_is_refused(node, tmp_path):
    proc, addrs = node
    data = tmp_path / "data"
    second = run("run", "--data-dir", str(data), "--listen", f"/ip4/127.0.0.1/tcp/{free_tcp_port()}", timeout=30)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"p2pnode: data dir {data} is in use by another p2pnode (pid {proc.pid}); "
                                     "stop it first, or use another --data-dir")
    assert proc.poll() is None and (data / "control.sock").exists()  # the first one is untouched
    assert run("status", "--data-dir", str(data)).returncode == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    # the lock dies with its process: the data dir is usable again at once
    with datadir.lock(data):
        assert (data / "lock").read_text().strip() == str(os.getpid())


def test_data_dir_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    data = tmp_path / "new" / "data"
    with datadir.lock(data) as path:
        assert path == data and stat.S_IMODE(data.stat().st_mode) == 0o700
        with datadir.lock(data):  # the CLI holds it around the node; the node may take it again
            pass
        holder = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(data)], capture_output=True, text=True, timeout=30)
        assert holder.returncode == 3 and holder.stdout.strip() == f"in use by {os.getpid()}"
    holder = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(data)], capture_output=True, text=True, timeout=30)
    assert holder.returncode == 0 and holder.stdout.strip() == "locked"


HOLD_LOCK = """
import sys
from p2pnode import datadir
try:
    with datadir.lock(sys.argv[1]):
        print("locked")
except datadir.DataDirInUse as exc:
    print(f"in use by {exc.pid}")
    sys.exit(3)
"""


def _as_unprivileged(args: list[str]) -> list[str]:
    """Root may write anywhere: drop to nobody so that permissions apply."""
    if os.geteuid() != 0:
        return args
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot test permissions")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *args]


@pytest.mark.parametrize("case", ["under_a_file", "is_a_file", "not_writable"])
@pytest.mark.parametrize("command", ["run", "init"])
def test_impossible_data_dir_exits_2_with_one_line(tmp_path, case, command):
    (tmp_path / "file").write_text("x")
    args = P2PNODE + [command, "--data-dir"]
    if case == "under_a_file":
        data, expected = tmp_path / "file" / "data", f"data dir {tmp_path}/file/data cannot be created: {tmp_path}/file is a file"
    elif case == "is_a_file":
        data, expected = tmp_path / "file", f"data dir {tmp_path}/file exists and is not a directory"
    else:
        closed = tmp_path / "closed"
        closed.mkdir(mode=0o500)
        data, expected = closed / "data", f"data dir {closed}/data cannot be created: permission denied"
        args = _as_unprivileged(args)
    result = subprocess.run(args + [str(data)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("p2pnode: " + expected) and len(result.stderr.strip().splitlines()) == 1, result.stderr
