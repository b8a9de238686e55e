"""The operator's path end to end: `p2pnode-admin new-deployer`, `artifact publish`, `deploy tar --wait`
(live view, exit code), a failing deploy that rolls back, and `p2pnode deploy status|list|logs` run as
processes against a node that was not a target."""

from __future__ import annotations

import io
import json
import sys

import pytest
import trio
from deploykit import Mesh, free_port, get_at, http_release
from p2pnode_admin import cli

from p2pnode.identity import save_key


async def admin(*args: str) -> tuple[int, object, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await cli.run(list(args), stdout=out, stderr=err)
    try:
        parsed: object = json.loads(out.getvalue())
    except json.JSONDecodeError:
        parsed = out.getvalue()
    return code, parsed, err.getvalue()


async def p2pnode(*args: str) -> tuple[int, str]:
    proc = await trio.run_process([sys.executable, "-m", "p2pnode", *args], capture_stdout=True, capture_stderr=True, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).decode()


@pytest.fixture
def mesh(tmp_path, monkeypatch):
    monkeypatch.delenv("P2PNODE_ADMIN_PASSPHRASE", raising=False)
    m = Mesh(tmp_path, 3, labels={"n0": ("web",), "n1": ("web",)})
    yield m
    m.kill_servers()


async def test_operator_deploys_with_the_admin_tool_and_reads_records_anywhere(mesh, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    save_key(keys / "system.key", mesh.kit.system)
    code, info, err = await admin("new-deployer", "--system-key", str(keys / "system.key"), "--cluster", mesh.kit.cluster_id,
                                  "--dir", str(keys), "--json")
    assert code == 0 and info["role"] == "deploy", err
    port = free_port()
    (tmp_path / "v1.tar.gz").write_bytes(http_release("1.0"))
    (tmp_path / "v2.tar.gz").write_bytes(http_release("2.0", healthy=False))
    who = ["--to", str(mesh.nodes[2].full_addr), "--key", str(keys / "deployer.key"), "--proof", str(keys / "deployer.proof")]
    spec = ["--app", "shop/api/prod", "--root", mesh.shared_root, "--label", "web", "--max-parallel", "2",
            "--health-http", f"http://${{host}}:{port}/health", "--health-interval", "0.1", "--health-retries", "40",
            "--start", "start.sh", "--stop", "stop.sh", "--env", f"PORT={port}", "--env", f"PYTHON={sys.executable}",
            "--env", "HOST=${host}"]
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery)
        # a keyless mistake first: a clear error, exit 2
        code, _, err = await admin("deploy", "tar", str(tmp_path / "v1.tar.gz"), *who, *spec[:4], "--version", "1.0")
        assert code == 2 and "name the targets: --node" in err, err

        code, rec, err = await admin("deploy", "tar", str(tmp_path / "v1.tar.gz"), *who, *spec, "--version", "1.0",
                                     "--deploy-id", "web-1", "--wait", "--json")
        assert code == 0 and rec["state"] == "success" and rec["settled"], (rec, err)
        assert [row["name"] for row in rec["nodes"]] == sorted(["n0", "n1"], key=lambda n: str(mesh.nodes[int(n[1])].peer_id))
        for i in (0, 1):
            assert get_at(mesh.host(i), port, "/health") == (200, "version 1.0\n")

        # the same without --json: the live per-node view on stderr, the record on stdout
        code, text, err = await admin("deploy", "tar", str(tmp_path / "v2.tar.gz"), *who, *spec, "--version", "2.0",
                                      "--deploy-id", "web-2", "--health-retries", "3", "--wait")
        assert code == 1, (text, err)
        assert "web-2: running" in err or "health_check" in err, err
        assert "state  failed" in str(text) and "rolled_back" in str(text) and "rolled back to 1.0" in str(text), text
        for i in (0, 1):
            assert get_at(mesh.host(i), port, "/health") == (200, "version 1.0\n")

        # records from n2, which ran nothing, through its control socket
        data = ["--data-dir", str(mesh.nodes[2].data_dir)]
        code, out = await p2pnode("deploy", "status", "web-2", *data)
        assert code == 1 and "state  failed" in out and "rolled_back" in out and "n0" in out and "n1" in out, out
        code, out = await p2pnode("deploy", "status", "web-1", *data, "--json")
        assert code == 0 and json.loads(out)["state"] == "success"
        code, out = await p2pnode("deploy", "list", *data, "--node", "n1")
        assert code == 0 and out.splitlines()[1].startswith("web-2") and out.splitlines()[2].startswith("web-1"), out
        code, out = await p2pnode("deploy", "logs", "web-2", "--node", "n1", *data)
        assert code == 0 and "health check attempt" in out and "== start.sh (1.0)" in out, out
        code, out = await p2pnode("deploy", "logs", "nope", "--node", "n1", *data)
        assert code == 1 and "has no log of deploy 'nope'" in out

        # and from the admin tool, through any node
        code, rec, _ = await admin("deploy", "status", "web-1", *who[:2], "--key", who[3], "--proof", who[5], "--json")
        assert code == 0 and rec["state"] == "success"
        code, logs, _ = await admin("deploy", "logs", "web-1", "--node", "n0", *who)
        assert code == 0 and "== start.sh (1.0)" in str(logs)
        code, listed, _ = await admin("deploy", "list", *who, "--app", "shop/api/prod", "--json")
        assert [d["deploy_id"] for d in listed["deploys"]] == ["web-2", "web-1"]

        # artifact publish on its own: one upload, the SHA-256 to reference
        code, art, _ = await admin("artifact", "publish", str(tmp_path / "v1.tar.gz"), *who, "--json")
        assert code == 0 and art["size"] == (tmp_path / "v1.tar.gz").stat().st_size
        nursery.cancel_scope.cancel()
