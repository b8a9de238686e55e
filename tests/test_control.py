"""The local control API over its Unix socket: status and pushing a signed document."""

import trio

from clusterkit import ClusterKit, ClusterNode, wait_for
from p2pnode import control


async def test_control_status_and_push(tmp_path, nursery):
    kit = ClusterKit()
    a = ClusterNode(kit, tmp_path, "a")
    await a.start(nursery)
    path = a.node.control_path
    code, view = await control.request(path, "GET", "/status")
    assert code == 200 and view["state"] == "unconfigured" and "members" not in view

    env = kit.snapshot([a.member(["web"])])
    code, verdict = await control.request(path, "POST", "/push", {"envelope": env.to_bytes().hex()})
    assert (code, verdict["result"]) == (200, "accepted")
    await wait_for(lambda: a.node.health.state == "healthy", what="healthy")
    code, view = await control.request(path, "GET", "/status?members=1")
    assert view["members"][0]["labels"] == ["web"] and view["members"][0]["self"] is True

    code, verdict = await control.request(path, "POST", "/push", {"envelope": kit.snapshot([a.member()], proof=None).to_bytes().hex()})
    assert (code, verdict["code"]) == (422, "no_admin_proof")
    code, err = await control.request(path, "POST", "/push", {"envelope": "zz"})
    assert code == 400 and "signed document" in err["error"]
    code, err = await control.request(path, "GET", "/nope")
    assert code == 404 and "GET /status" in err["error"]
    # a client that connects and says nothing does not block others
    stalled = await trio.open_unix_socket(str(path))
    code, _ = await control.request(path, "GET", "/status")
    assert code == 200
    await stalled.aclose()
