"""`p2pnode-admin folder add|set|rm|list` against real nodes on loopback: the folder a node gets is
what the admin asked for (peers named by member name), it syncs, changes and removals reach every
member, and what a node would refuse is refused before anything is signed."""

import io
import json

import attrs
import pytest

from clusterkit import ClusterKit, ClusterNode, wait_for
from test_admin import admin
from p2pnode.config import SyncConfig
from p2pnode.sync import cli as sync_cli
from p2pnode.sync.service import SyncService
from p2pnode_admin import keyfile
from p2pnode_admin.cli import write_envelope


@attrs.define
class Fleet:
    kit: ClusterKit
    nodes: dict
    data: object
    keys: object

    def signer(self, node="src", proof="admin.proof"):
        return ["--admin-key", str(self.keys / "admin.key"), "--proof", str(self.keys / proof), "--to", str(self.nodes[node].full_addr)]

    def folders(self, name):
        return self.nodes[name].node.service(SyncService).folders


@pytest.fixture
async def fleet(tmp_path, nursery):
    kit = ClusterKit()
    keys = tmp_path / "keys"
    keys.mkdir()
    keyfile.save(keys / "admin.key", kit.admin, None)
    write_envelope(str(keys / "admin.proof"), kit.proof())
    data = tmp_path / "data"
    nodes = {name: ClusterNode(kit, tmp_path / "n", name) for name in ("src", "web1", "web2")}
    for n in nodes.values():
        n.config = attrs.evolve(n.config, sync=SyncConfig(allowed_roots=(data,)))
        await n.start(nursery)
    await nodes["src"].node.membership.offer(kit.snapshot([n.member() for n in nodes.values()]))
    await wait_for(lambda: all(n.node.health.state == "healthy" for n in nodes.values()), what="healthy")
    (data / "site/css").mkdir(parents=True)
    (data / "site/index.html").write_text("hello\n")
    (data / "site/css/a.css").write_text("a{}\n")
    (data / "site/debug.log").write_text("noise\n")
    return Fleet(kit, nodes, data, keys)


async def test_add_sync_set_rm_list(fleet):
    data, src, web1, web2 = fleet.data, *fleet.nodes.values()
    code, out, err = await admin("folder", "add", *fleet.signer(), "--id", "site", "--source", "src", "--source-path", str(data / "site"),
                                 "--node", f"web1;target={data / 'w1'}", "--node", f"{web2.peer_id};target={data / 'w2'};exclude=css/**",
                                 "--ignore", "*.log", "--max-parallel", "2", "--post-sync", "touch 'synced here'", "--backoff", "1:30")
    assert code == 0, err
    assert out.startswith("folder site: signed, issued ")
    assert f"receiver    web1 ({web1.peer_id}) -> {data / 'w1'} (mirror)" in out
    assert f"receiver    web2 ({web2.peer_id}) -> {data / 'w2'} (mirror; exclude css/**)" in out
    assert f"accepted by {src.peer_id}" in out and "p2pnode sync status site" in out
    await wait_for(lambda: all("site" in fleet.folders(n) for n in fleet.nodes), what="every node holds the folder")
    config = fleet.folders("web2")["site"]
    assert config.source == src.peer_id and config.max_parallel_nodes == 2 and config.ignore_patterns == ("*.log",)
    assert config.post_sync == ("touch", "synced here") and (config.retry.backoff_base_s, config.retry.backoff_cap_s) == (1.0, 30.0)
    assert [n.node_id for n in config.nodes] == [web1.peer_id, web2.peer_id] and config.nodes[1].exclude == ("css/**",)

    # it syncs: the source's trigger --wait sees both receivers reach the version
    out = io.StringIO()
    assert await sync_cli.run(["trigger", "site", "--wait", "--timeout", "30", "--interval", "0.2", "--data-dir", str(src.data_dir)],
                              stdout=out) == 0, out.getvalue()
    assert (data / "w1/css/a.css").read_text() == "a{}\n" and not (data / "w2/css").exists() and not (data / "w1/debug.log").exists()
    assert (data / "w1/synced here").exists()  # post_sync ran in the target

    code, listing, _ = await admin("folder", "list", *fleet.signer("web1"), "--json")
    (item,) = listing["folders"]
    assert item["id"] == "site" and not item["removed"] and item["config"]["nodes"][0]["node_id"] == str(web1.peer_id)
    assert item["issuer"] == str(fleet.kit.admin.peer_id)

    # set: starts from what the node holds and changes only what is given
    code, out, err = await admin("folder", "set", *fleet.signer("web2"), "--id", "site", "--node", f"web2;target={data / 'w2'};strategy=overlay",
                                 "--max-attempts", "3", "--no-ignore-defaults")
    assert code == 0, err
    assert "changed     ignore_defaults, retry, receiver web2" in out
    await wait_for(lambda: all(fleet.folders(n)["site"].retry.max_attempts == 3 for n in fleet.nodes), what="the change everywhere")
    config = fleet.folders("src")["site"]
    assert config.nodes[1].strategy == "overlay" and config.nodes[1].exclude == () and config.ignore_defaults is False
    assert config.ignore_patterns == ("*.log",) and config.max_parallel_nodes == 2 and config.post_sync == ("touch", "synced here")

    code, out, err = await admin("folder", "set", *fleet.signer(), "--id", "site", "--remove-node", "web2", "--clear-ignore")
    assert code == 0 and "changed     ignore_patterns, receiver web2 removed" in out, out + err
    await wait_for(lambda: len(fleet.folders("web1")["site"].nodes) == 1, what="web2 removed")

    code, out, err = await admin("folder", "rm", *fleet.signer(), "--id", "site")
    assert code == 0 and "removal signed" in out, err
    await wait_for(lambda: all("site" not in fleet.folders(n) for n in fleet.nodes), what="removed everywhere")
    assert (data / "w1/index.html").exists()  # receivers keep their files
    code, out, _ = await admin("folder", "list", *fleet.signer("web2"))
    assert f"{web2.peer_id} holds no folders" in out and "(1 removed folder(s) not shown; --all shows them)" in out
    code, out, _ = await admin("folder", "list", *fleet.signer("web2"), "--all")
    assert out.startswith("site  (removed)  issued ")


async def test_what_a_node_would_refuse_is_refused_before_signing(fleet):
    data, web1 = fleet.data, fleet.nodes["web1"]
    base = ["folder", "add", *fleet.signer(), "--id", "site", "--source", "src", "--source-path", str(data / "site")]

    async def refused(*args):
        code, _, err = await admin(*args, check=False)
        assert code == 2, err
        return err

    assert "target_path: 'srv/x' must be an absolute, normalised path" in await refused(*base, "--node", "web1;target=srv/x")
    assert "needs target=/absolute/path" in await refused(*base, "--node", "web1")
    assert "expected PEER;target=/path;" in await refused(*base, "--node", f"web1;target={data};colour=red")
    assert "strategy must be mirror or overlay" in await refused(*base, "--node", f"web1;target={data};strategy=copy")
    err = await refused(*base, "--node", f"web9;target={data / 'x'}")
    assert "'web9' is neither a peer ID nor the name of a member (member names: src, web1, web2)" in err
    assert "the source cannot also be a receiver" in await refused(*base, "--node", f"src;target={data / 'x'}")
    assert "max_attempts must be between 1 and 1000" in await refused(*base, "--max-attempts", "0")
    assert "folder id must be 1-64 characters" in await refused(*base[:-6], "--id", "no/slash", *base[-4:])
    assert "holds no folder site (it holds no folders)" in await refused("folder", "set", *fleet.signer(), "--id", "site", "--max-parallel", "2")
    assert "holds no folder site" in await refused("folder", "rm", *fleet.signer(), "--id", "site")
    assert not any(fleet.folders(n) for n in fleet.nodes)  # nothing was signed or sent

    code, out, _ = await admin(*base, "--node", f"web1;target={data / 'w1'}", "--dry-run", "--json")
    assert code == 0 and out["result"] == "not_sent" and out["config"]["nodes"][0]["node_id"] == str(web1.peer_id)
    assert not fleet.folders("src")

    await admin(*base, "--node", f"web1;target={data / 'w1'}")
    assert "exists on" in await refused(*base, "--node", f"web1;target={data / 'w1'}")
    assert "nothing to change in folder site" in await refused("folder", "set", *fleet.signer(), "--id", "site", "--source", "src")


async def test_a_node_rejects_a_folder_signed_for_another_cluster(fleet):
    data, src, web1, _ = fleet.data, *fleet.nodes.values()
    write_envelope(str(fleet.keys / "other.proof"), fleet.kit.proof(cluster_id="elsewhere"))
    code, out, err = await admin("folder", "add", *fleet.signer(proof="other.proof"), "--id", "site", "--source", str(src.peer_id),
                                 "--source-path", str(data / "site"), "--node", f"{web1.peer_id};target={data / 'w1'}", check=False)
    assert code == 1
    assert "showed no membership snapshot" in err  # the node does not take this proof as an admin's
    assert f"rejected by {src.peer_id}: wrong_cluster" in out
    assert not fleet.folders("src")
    code, out, _ = await admin("folder", "list", *fleet.signer(), "--json")
    assert out["folders"] == [] and json.dumps(out)
