"""Five hosts in network namespaces, installed with install.sh, bootstrapped through a real DNS
server's _dnsaddr records, published to with p2pnode-admin; then hosts are killed, restarted and
cut off. Needs root (CI runs as root); without namespaces it fails and says why."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnsserver import dnsmasq
from netns import lab_or_fail

ROOT = Path(__file__).resolve().parent.parent
N = 5
PORT = 4200  # not the default 4100: what install.sh prints and publishes must follow --listen
pytestmark = pytest.mark.multihost


def status(prefix: Path, data: Path) -> dict | None:
    result = subprocess.run([str(prefix / "venv/bin/p2pnode"), "status", "--data-dir", str(data), "--json", "--timeout", "3"],
                            capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else None


def wait_states(nodes, want: dict[int, str], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    seen = {}
    while time.monotonic() < deadline:
        seen = {i: (status(nodes[i]["prefix"], nodes[i]["data"]) or {}).get("state") for i in want}
        if seen == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: wanted {want}, saw {seen} after {timeout}s")


@pytest.fixture
def lab():
    with lab_or_fail(N) as lab:
        yield lab


def install(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "install.sh"), *args], capture_output=True, text=True, timeout=600)


def test_five_hosts(lab, tmp_path):
    nodes = {i: {"prefix": tmp_path / f"host{i}", "data": tmp_path / f"host{i}" / "data"} for i in range(1, N + 1)}
    admin_dir = tmp_path / "admin"
    common = ["--no-systemd", "--heartbeat", "1", "--bootstrap", "cluster.test", "--dns-server", f"{lab.hub_ip}:53",
              "--listen", f"/ip4/0.0.0.0/tcp/{PORT}", "--listen", f"/ip4/0.0.0.0/tcp/{PORT}/ws"]

    # host 1 starts the cluster; hosts 2-5 join it (one after another: pip builds in the checkout)
    first = install(["--prefix", str(nodes[1]["prefix"]), "--new-system", "--cluster", "mh", "--domain", "cluster.test",
                     "--admin-dir", str(admin_dir), *common])
    assert first.returncode == 0, first.stderr
    assert "_dnsaddr.cluster.test." in first.stdout and "p2pnode-admin://" in first.stdout
    peer1 = json.loads((nodes[1]["prefix"] / "install.json").read_text())["peer_id"]
    for addr in (f"/ip4/<public-ip>/tcp/{PORT}/p2p/{peer1}", f"/ip4/<public-ip>/tcp/{PORT}/ws/p2p/{peer1}"):
        assert f'_dnsaddr.cluster.test. 300 IN TXT "dnsaddr={addr}"' in first.stdout.splitlines()
    assert "/tcp/4100" not in first.stdout
    # without systemd it says that the node must be started and the snapshot published by hand, and how
    manual = first.stdout.split("Without systemd nothing starts the node or publishes the first snapshot: do both by hand.\n")[1]
    manual = [line.strip() for line in manual.splitlines()]
    assert manual[manual.index("Start it:") + 1].split() == [str(nodes[1]["prefix"] / "venv/bin/p2pnode"), "run", "--data-dir",
                                                             str(nodes[1]["data"])]
    publish_first = manual[manual.index("Then, from another shell, publish the first snapshot (this node becomes healthy):") + 1].split()
    assert publish_first == [str(nodes[1]["prefix"] / "venv/bin/p2pnode-admin"), "publish", str(admin_dir / "first.snapshot"),
                             "--to", f"/ip4/127.0.0.1/tcp/{PORT}/p2p/{peer1}"]
    system_pubkey = json.loads((admin_dir / "system.json").read_text())["system_pubkey"]
    for i in range(2, N + 1):
        joined = install(["--prefix", str(nodes[i]["prefix"]), "--join", "--cluster", "mh", "--system-pubkey", system_pubkey, *common])
        assert joined.returncode == 0, joined.stderr
    for i, n in nodes.items():
        n["peer_id"] = json.loads((n["prefix"] / "install.json").read_text())["peer_id"]
        n["addr"] = f"/ip4/{lab.ip(i)}/tcp/{PORT}/p2p/{n['peer_id']}"
    # re-running is safe: the key stays
    again = install(["--prefix", str(nodes[2]["prefix"]), "--join", "--cluster", "mh", "--system-pubkey", system_pubkey, *common])
    assert again.returncode == 0 and json.loads((nodes[2]["prefix"] / "install.json").read_text())["peer_id"] == nodes[2]["peer_id"]

    admin = [str(nodes[1]["prefix"] / "venv/bin/p2pnode-admin")]
    records = json.loads(subprocess.run(admin + ["dnsaddr", "--domain", "cluster.test", "--json"] + [n["addr"] for n in nodes.values()],
                                        capture_output=True, text=True, check=True).stdout)["records"]
    with dnsmasq([("_dnsaddr.cluster.test", r) for r in records], listen=lab.hub_ip, port=53, netns=lab.hub):
        for i, n in nodes.items():
            n["proc"] = lab.spawn(lab.hosts[i - 1], [str(n["prefix"] / "venv/bin/p2pnode"), "run", "--data-dir", str(n["data"])],
                                  tmp_path / f"host{i}.log")
        wait_states(nodes, {i: "unconfigured" for i in nodes}, 30, "all nodes up")
        # the first snapshot, published exactly as install.sh said, on host 1: host 1 alone is a member
        published = subprocess.run(lab.exec_args(lab.hosts[0], *publish_first, "--json"), capture_output=True, text=True)
        assert published.returncode == 0, published.stdout + published.stderr
        assert json.loads(published.stdout)["holding"] == 1
        wait_states(nodes, {1: "healthy"}, 15, "host 1 healthy on its first snapshot")

        snap = tmp_path / "all.snap"
        adds = sum((["--add", f"{n['peer_id']};name=host{i};addrs=/ip4/{lab.ip(i)}/tcp/{PORT}"] for i, n in nodes.items()), [])
        subprocess.run(admin + ["snapshot", "--admin-key", str(admin_dir / "admin.key"), "--proof", str(admin_dir / "admin.proof"),
                                "--state-dir", str(admin_dir / "state"), *adds, "--out", str(snap)], check=True, capture_output=True)
        published = subprocess.run(lab.exec_args(lab.hub, *admin, "publish", str(snap), "--to", "cluster.test", "--dns-server",
                                                 f"{lab.hub_ip}:53", "--timeout", "60", "--json"), capture_output=True, text=True)
        assert published.returncode == 0, published.stdout + published.stderr
        assert json.loads(published.stdout)["holding"] == N
        wait_states(nodes, {i: "healthy" for i in nodes}, 30, "all healthy")

        # kill -9 three hosts' nodes: the two left are a minority
        for i in (3, 4, 5):
            os.killpg(nodes[i]["proc"].pid, signal.SIGKILL)
            nodes[i]["proc"].wait()
        wait_states(nodes, {1: "degraded", 2: "degraded"}, 15, "degraded after kill -9")

        for i in (3, 4, 5):
            nodes[i]["proc"] = lab.spawn(lab.hosts[i - 1], [str(nodes[i]["prefix"] / "venv/bin/p2pnode"), "run", "--data-dir",
                                                            str(nodes[i]["data"])], tmp_path / f"host{i}.log")
        wait_states(nodes, {i: "healthy" for i in nodes}, 60, "healthy after restart")

        # cut host 2's link: the others stop counting it; bring it back: it reconnects
        lab.link(2, up=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            view = status(nodes[1]["prefix"], nodes[1]["data"])
            if view and view["online_count"] == N - 1:
                break
            time.sleep(0.5)
        assert view["online_count"] == N - 1 and view["state"] == "healthy"
        lab.link(2, up=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            views = [status(n["prefix"], n["data"]) for n in nodes.values()]
            if all(v and v["online_count"] == N for v in views):
                break
            time.sleep(0.5)
        assert all(v and v["online_count"] == N and v["state"] == "healthy" for v in views), views

        # SIGTERM stops a node cleanly (as systemd does)
        nodes[5]["proc"].send_signal(signal.SIGTERM)
        assert nodes[5]["proc"].wait(25) == 0
        log = (tmp_path / "host5.log").read_text()
        assert "action=stopping signal=SIGTERM" in log and "action=stopped" in log


def test_systemd_unit_verifies(tmp_path):
    prefix = tmp_path / "prefix"
    (prefix / "venv/bin").mkdir(parents=True)
    (prefix / "venv/bin/p2pnode").symlink_to(Path(sys.executable).parent / "p2pnode")
    data = tmp_path / "data"
    data.mkdir()
    unit = (ROOT / "systemd/p2pnode.service").read_text()
    rendered = unit.replace("@PREFIX@", str(prefix)).replace("@DATA_DIR@", str(data)).replace("@USER@", "p2pnode")
    path = tmp_path / "p2pnode.service"
    path.write_text(rendered)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    for line in ("Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict", f"ReadWritePaths={data}", "PrivateTmp=yes",
                 "ProtectHome=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert line in rendered.splitlines()
    # a broken unit is caught by the same check
    path.write_text(rendered.replace("Restart=always", "Restart=always\nRestartt=no"))
    broken = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert "Unknown key" in broken.stdout + broken.stderr


def test_install_sh_help_and_bad_flags():
    result = install(["--help"])
    assert result.returncode == 0 and "--new-system" in result.stdout and "--uninstall" in result.stdout
    bad = install(["--join"])
    assert bad.returncode == 2 and "--join needs --system-pubkey" in bad.stderr
    bad = install(["--frobnicate"])
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr


def test_uninstall_refuses_where_nothing_is_installed(tmp_path):
    (tmp_path / "data").mkdir()
    result = install(["--uninstall", "--prefix", str(tmp_path), "--no-systemd", "--purge"])
    assert result.returncode == 2
    assert result.stderr == (f"install.sh: nothing is installed at {tmp_path} (no install.json, no venv); "
                             "give the --prefix you installed with\n")
    assert (tmp_path / "data").exists()  # nothing was touched, --purge or not


def test_install_standalone_uninstall_keeps_data(tmp_path):
    prefix = tmp_path / "p"
    result = install(["--prefix", str(prefix), "--no-systemd"])
    assert result.returncode == 0, result.stderr
    key = prefix / "data" / "node.key"
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    peer = json.loads((prefix / "install.json").read_text())["peer_id"]
    result = install(["--prefix", str(prefix), "--no-systemd", "--uninstall"])
    assert result.returncode == 0 and "kept" in result.stderr
    assert key.exists() and not (prefix / "venv").exists()
    again = install(["--prefix", str(prefix), "--no-systemd"])
    assert again.returncode == 0, again.stderr
    assert json.loads((prefix / "install.json").read_text())["peer_id"] == peer  # the key survived
    install(["--prefix", str(prefix), "--no-systemd", "--uninstall", "--purge"])
    assert not prefix.exists()
