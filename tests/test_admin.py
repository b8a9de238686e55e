"""p2pnode-admin against real nodes. Commands run in the test's own trio loop (`cli.run`, the
same coroutine the console script runs under trio.run); as a process only where the process is
what is tested. Keys are unencrypted (no Argon2id) except in the test about encryption."""

import io
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
import trio

from clusterkit import ClusterKit, ClusterNode, wait_for
from dnsserver import dnsmasq
from p2pnode_admin import cli

PASSPHRASE_ENV = "P2PNODE_ADMIN_PASSPHRASE"


@pytest.fixture(autouse=True)
def keys_in_the_clear(monkeypatch):
    """The passphrase variable implies encryption: keep it out unless a test sets it."""
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


async def admin(*args, check=True):
    """Run p2pnode-admin in this process; returns (exit code, parsed JSON or text, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = await cli.run(list(args), stdout=out, stderr=err)
    if check and code != 0:
        raise AssertionError(f"p2pnode-admin {' '.join(args)} exited {code}: {err.getvalue()}")
    try:
        parsed = json.loads(out.getvalue())
    except json.JSONDecodeError:
        parsed = out.getvalue()
    return code, parsed, err.getvalue()


@pytest.fixture
async def cluster(tmp_path, nursery):
    """A system key, an admin, two pre-provisioned nodes running with that system key."""
    keys = tmp_path / "keys"
    _, system, _ = await admin("init-system", "--dir", str(keys), "--json")
    _, adm, _ = await admin("new-admin", "--system-key", str(keys / "system.key"), "--cluster", "prod", "--dir", str(keys), "--json")
    nodes = []
    for name in ("a", "b"):
        _, info, _ = await admin("new-node", "--dir", str(tmp_path / name), "--json")
        node = ClusterNode(ClusterKit(), tmp_path, name, cluster_id="prod", system_pubkey=system["system_pubkey"])
        assert str(node.peer_id) == info["peer_id"]  # the node runs with the provisioned key
        nodes.append(node)
    # each bootstraps from the other, as nodes of a cluster find each other through DNS: they are
    # connected before the first snapshot, so a push to one is forwarded to the other at once
    nodes[0].set_bootstrap([("multiaddr", str(nodes[1].full_addr))])
    nodes[1].set_bootstrap([("multiaddr", str(nodes[0].full_addr))])
    for node in nodes:
        await node.start(nursery)
    return {"keys": keys, "system": system, "admin": adm, "nodes": nodes, "tmp": tmp_path}


def spec(node) -> str:
    return f"{node.peer_id};name={node.name};addrs={node.addr};labels=web"


async def test_keys_are_0600_and_encrypted_with_the_passphrase(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    await admin("init-system", "--dir", str(keys))
    # new-admin decrypts the system key with the passphrase, then encrypts the admin key with it
    _, adm, _ = await admin("new-admin", "--system-key", str(keys / "system.key"), "--cluster", "prod", "--dir", str(keys), "--json")
    for name in ("system.key", "admin.key"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
        assert (keys / name).read_bytes().startswith(b"P2PNODE-ENCRYPTED-KEY-V1\n")
    rotate = ("rotate", "--system-key", str(keys / "system.key"), "--cluster", "prod", "--admin", adm["admin_peer_id"],
              "--out", str(keys / "x.proof"))
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    code, _, err = await admin(*rotate, check=False)
    assert code == 2 and "wrong passphrase" in err and not (keys / "x.proof").exists()
    monkeypatch.delenv(PASSPHRASE_ENV)
    code, _, err = await admin(*rotate, check=False)
    assert code == 2 and "is encrypted: set $P2PNODE_ADMIN_PASSPHRASE" in err
    code, _, err = await admin("init-system", "--dir", str(tmp_path / "other"), "--encrypt", check=False)
    assert code == 2 and "--encrypt needs a passphrase" in err and not (tmp_path / "other" / "system.key").exists()


async def test_unencrypted_keys_are_0600(cluster):
    for name in ("system.key", "admin.key"):
        path = cluster["keys"] / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not path.read_bytes().startswith(b"P2PNODE-ENCRYPTED")


async def test_snapshot_publish_inspect_and_refusals(cluster):
    keys, (a, b) = cluster["keys"], cluster["nodes"]
    snap = str(cluster["tmp"] / "s1.snap")
    sign = ["snapshot", "--admin-key", str(keys / "admin.key"), "--proof", str(keys / "admin.proof"),
            "--state-dir", str(keys / "state")]
    _, out, _ = await admin(*sign, "--add", spec(a), "--add", spec(b), "--out", snap, "--json")
    assert out["members"] == 2 and out["cluster_id"] == "prod"

    _, verdict, _ = await admin("inspect", snap, "--system-pubkey", cluster["system"]["system_pubkey"], "--cluster", "prod", "--json")
    assert verdict["valid"] is True and len(verdict["members"]) == 2

    code, out, err = await admin("publish", snap, "--to", str(a.full_addr), "--timeout", "20", "--json")
    assert code == 0 and out["holding"] == 2 and out["missing"] == []
    await wait_for(lambda: a.node.health.state == "healthy" and b.node.health.state == "healthy", what="healthy")
    code, text, err = await admin("publish", snap, "--to", str(b.full_addr), "--no-wait")
    assert code == 0 and "ignored" in err  # the same snapshot again: equal issued_at

    # a new snapshot built from the node's current one, minus b
    snap2 = str(cluster["tmp"] / "s2.snap")
    _, out, _ = await admin(*sign, "--base", str(a.full_addr), "--remove", str(b.peer_id), "--out", snap2, "--json")
    assert out["members"] == 1
    code, out, _ = await admin("publish", snap2, "--to", str(b.full_addr), "--timeout", "10", "--json")
    assert out["holding"] == 1
    await wait_for(lambda: b.node.health.state == "unconfigured", what="b removed")
    s2_issued = a.node.membership.current.issued_at

    # publishing a snapshot the nodes already hold, or an older one, answers at once with each node's verdict
    code, out, _ = await admin("publish", snap2, "--to", str(b.full_addr), "--timeout", "60", "--json")
    assert code == 0 and out["result"] == "ignored" and out["holding"] == 1
    started = time.monotonic()
    code, out, err = await admin("publish", snap, "--to", str(a.full_addr), "--timeout", "60", "--json", check=False)
    assert time.monotonic() - started < 10  # not the 60 s --timeout
    assert code == 1 and out["result"] == "ignored" and out["holding"] == 0
    assert [(n["verdict"], n["code"], n["holds"]) for n in out["nodes"]] == [("ignored", "not_newer", s2_issued)] * 2
    code, text, _ = await admin("publish", snap, "--to", str(a.full_addr), check=False)
    assert code == 1 and text.splitlines()[0] == f"0 of 2 members hold the snapshot issued at {out['issued_at']}"
    assert f"a {a.peer_id}: ignored (not_newer), holds a newer snapshot, issued at {s2_issued}" in text

    # refusing to sign one older than the newest known (the state dir remembers)
    state = keys / "state" / "last_snapshot"
    state.write_text(json.dumps({"issued_at": "2999-01-01T00:00:00.000000000Z"}))
    code, _, err = await admin(*sign, "--add", spec(a), "--out", str(cluster["tmp"] / "s3.snap"), check=False)
    assert code == 2 and "refusing to sign" in err and "2999-01-01" in err
    state.unlink()

    # a forged file: inspect says why, publish will not send it, and a node refuses it for the same reason
    snap3 = str(cluster["tmp"] / "s3.snap")
    await admin(*sign, "--add", spec(a), "--add", spec(b), "--out", snap3)
    forged = cluster["tmp"] / "forged.snap"
    raw = bytearray(Path(snap3).read_bytes())
    raw[raw.index(b"web") + 1] ^= 0x01  # a member's label, inside the signed payload
    forged.write_bytes(bytes(raw))
    code, out, _ = await admin("inspect", str(forged), "--json", check=False)
    assert code == 1 and out["code"] == "bad_signature"
    code, out, _ = await admin("publish", str(forged), "--to", str(a.full_addr), "--json", check=False)
    assert code == 1 and out["result"] == "not_sent" and out["code"] == "bad_signature"
    code, out, _ = await admin("publish", str(forged), "--to", str(a.full_addr), "--force", "--json", check=False)
    assert code == 1 and out["result"] == "rejected" and out["code"] == "bad_signature"
    # a snapshot checked against another system key: invalid proof
    other = "12D3KooWGzh3Wv5aKu1EhUvkuBiTo7QbDr3D7HR2Ki7TbeMmsG3E"
    code, out, _ = await admin("inspect", snap, "--system-pubkey", other, "--json", check=False)
    assert code == 1 and out["code"] == "proof_invalid"


async def test_revoke_rotate_and_bundle(cluster):
    keys, tmp, (a, b) = cluster["keys"], cluster["tmp"], cluster["nodes"]
    system_key = str(keys / "system.key")

    # revoke the admin; its next snapshot is refused by the nodes, with the reason
    rev = str(tmp / "r.rev")
    await admin("revoke", "--system-key", system_key, "--cluster", "prod", "--admin", cluster["admin"]["admin_peer_id"],
                "--reason", "laptop stolen", "--out", rev)
    _, out, _ = await admin("inspect", rev, "--system-pubkey", cluster["system"]["system_pubkey"], "--json")
    assert out["valid"] and out["reason"] == "laptop stolen"
    code, out, _ = await admin("publish", rev, "--to", str(a.full_addr), "--json")
    assert out["result"] == "accepted"
    assert len(a.node.membership.revocations) == 1  # applied before the verdict was sent
    # the admin tool refuses to sign with a key it knows is revoked: learned from the base node, or from a file
    sign = ("snapshot", "--admin-key", str(keys / "admin.key"), "--proof", str(keys / "admin.proof"), "--state-dir", str(tmp / "st"),
            "--add", spec(a))
    refused = (f"refusing to sign: admin {cluster['admin']['admin_peer_id']} was revoked by the system key at ", "(reason: laptop stolen)")
    code, _, err = await admin(*sign, "--base", str(a.full_addr), "--out", str(tmp / "x.snap"), check=False)
    assert code == 2 and all(part in err for part in refused) and not (tmp / "x.snap").exists()
    code, _, err = await admin(*sign, "--revocation", rev, "--out", str(tmp / "x.snap"), check=False)
    assert code == 2 and all(part in err for part in refused) and not (tmp / "x.snap").exists()
    foreign = str(tmp / "foreign.rev")
    await admin("init-system", "--dir", str(tmp / "foreign"))
    await admin("revoke", "--system-key", str(tmp / "foreign" / "system.key"), "--cluster", "prod",
                "--admin", cluster["admin"]["admin_peer_id"], "--out", foreign)
    code, _, err = await admin(*sign, "--revocation", foreign, "--out", str(tmp / "x.snap"), check=False)
    assert code == 2 and f"--revocation {foreign}: not a revocation of cluster prod's system key" in err
    # signed anyway (the tool cannot know without a base or the file): the nodes refuse it, and say why
    snap = str(tmp / "by-revoked.snap")
    await admin(*sign, "--out", snap)
    code, out, _ = await admin("publish", snap, "--to", str(a.full_addr), "--json", check=False)
    assert code == 1 and out["code"] == "revoked_admin"

    # a new admin, handed over as a bundle; rotate renews its proof
    new = tmp / "new-admin"
    _, adm2, _ = await admin("new-admin", "--system-key", system_key, "--cluster", "prod", "--dir", str(new), "--json")
    _, exported, _ = await admin("bundle", "export", "--admin-key", str(new / "admin.key"), "--proof", str(new / "admin.proof"),
                                 "--system-pubkey", cluster["system"]["system_pubkey"], "--bootstrap", str(a.full_addr), "--json")
    assert exported["bundle"].startswith("p2pnode-admin://")
    laptop = tmp / "laptop"
    _, imported, _ = await admin("bundle", "import", exported["bundle"], "--dir", str(laptop), "--json")
    assert imported["admin_peer_id"] == adm2["admin_peer_id"] and imported["cluster_id"] == "prod"
    _, renewed, _ = await admin("rotate", "--system-key", system_key, "--cluster", "prod", "--admin", adm2["admin_peer_id"],
                                "--valid-days", "30", "--out", str(laptop / "renewed.proof"), "--json")
    snap2 = str(tmp / "by-new.snap")
    await admin("snapshot", "--admin-key", str(laptop / "admin.key"), "--proof", str(laptop / "renewed.proof"),
                "--state-dir", str(tmp / "st2"), "--add", spec(a), "--add", spec(b), "--out", snap2)
    code, out, _ = await admin("publish", snap2, "--to", str(a.full_addr), "--timeout", "20", "--json")
    assert code == 0 and out["holding"] == 2

    # an expired proof cannot sign
    await admin("rotate", "--system-key", system_key, "--cluster", "prod", "--admin", adm2["admin_peer_id"],
                "--valid-from", "2020-01-01T00:00:00Z", "--valid-days", "1", "--out", str(laptop / "old.proof"))
    code, _, err = await admin("snapshot", "--admin-key", str(laptop / "admin.key"), "--proof", str(laptop / "old.proof"),
                               "--state-dir", str(tmp / "st3"), "--add", spec(a), "--out", str(tmp / "x.snap"), check=False)
    assert code == 2 and "not valid now" in err and "rotate" in err


async def test_dnsaddr_records_bootstrap_a_publish(cluster):
    keys, tmp, (a, b) = cluster["keys"], cluster["tmp"], cluster["nodes"]
    _, out, _ = await admin("dnsaddr", "--domain", "prod.test", str(a.full_addr), str(b.full_addr), "--json")
    assert out["name"] == "_dnsaddr.prod.test." and len(out["records"]) == 2
    _, text, _ = await admin("dnsaddr", "--domain", "prod.test", str(a.full_addr))
    assert text.strip() == f'_dnsaddr.prod.test. 300 IN TXT "dnsaddr={a.full_addr}"'
    snap = str(tmp / "s.snap")
    await admin("snapshot", "--admin-key", str(keys / "admin.key"), "--proof", str(keys / "admin.proof"),
                "--state-dir", str(tmp / "st"), "--add", spec(a), "--add", spec(b), "--out", snap)
    with dnsmasq([(out["name"].rstrip("."), r) for r in out["records"]]) as ns:
        code, res, _ = await admin("publish", snap, "--to", "prod.test", "--dns-server", ns, "--timeout", "20", "--json")
    assert code == 0 and res["holding"] == 2
    code, _, err = await admin("dnsaddr", "--domain", "x.test", "/ip4/1.2.3.4/tcp/1", check=False)
    assert code == 2 and "needs /p2p/" in err


async def test_help_for_every_subcommand():
    for cmd in ("init-system", "new-admin", "rotate", "new-node", "snapshot", "publish", "revoke", "dnsaddr", "inspect"):
        code, text, _ = await admin(cmd, "--help")
        assert code == 0 and "--json" in text
    for cmd in ("export", "import"):
        code, text, _ = await admin("bundle", cmd, "--help")
        assert code == 0 and "--json" in text
    code, out, err = await admin("snapshot", "--out", "x", check=False)
    assert code == 2 and out == "" and "error: the following arguments are required: --admin-key, --proof" in err


async def test_console_entry_point_as_a_process(tmp_path):
    """What only a process shows: the module runs, prints JSON on stdout, and exits with the
    command's code; errors are one line on stderr, exit 2."""
    async def process(*args):
        result = await trio.run_process([sys.executable, "-m", "p2pnode_admin.cli", *args], capture_stdout=True,
                                        capture_stderr=True, check=False, env={k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV})
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    code, out, err = await process("new-node", "--dir", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["peer_id"].startswith("12D3KooW") and err == ""
    code, out, err = await process("new-node", "--dir", str(tmp_path))
    assert code == 2 and out == "" and err == f"p2pnode-admin: {tmp_path}/node.key already exists; refusing to overwrite a node key\n"
    code, out, _ = await process("--help")
    assert code == 0 and "snapshot" in out and "publish" in out
