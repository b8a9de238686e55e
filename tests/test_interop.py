"""Interop with a real js-libp2p node (tests/interop/peer.mjs), over TCP and WebSocket, both ways."""

import pytest
import trio

from jspeer import start_js_peer
from p2pnode import diag
from p2pnode.identity import PeerId
from p2pnode.stdproto import identify, ping

from conftest import LOOPBACK_TCP, LOOPBACK_WS

pytestmark = pytest.mark.interop
MiB = 1 << 20
KINDS = ["tcp", "ws"]


@pytest.fixture
async def js():
    async with start_js_peer() as peer:
        yield peer


def _our_addr(host, kind: str) -> str:
    return next(str(a) for a in host.full_addrs() if ("/ws" in str(a)) == (kind == "ws"))


@pytest.mark.parametrize("kind", KINDS)
async def test_we_dial_js_ping_and_identify(make_host, js, kind):
    async with make_host(LOOPBACK_TCP, LOOPBACK_WS) as h:
        conn = await h.connect(js.addr(kind))
        assert conn.peer_id == PeerId.from_string(js.peer_id)
        rtts = await ping.ping(h, conn, count=5)
        assert len(rtts) == 5 and max(rtts) < 2
        record = await identify.identify(h, conn)
        assert record.agent_version.startswith("js-libp2p/")
        assert {"/ipfs/ping/1.0.0", "/ipfs/id/1.0.0", diag.ECHO}.issubset(record.protocols)
        assert {str(a) for a in record.listen_multiaddrs()} == {a.rsplit("/p2p/", 1)[0] for a in js.addrs}


@pytest.mark.parametrize("kind", KINDS)
async def test_js_dials_us_ping_and_identify(make_host, js, kind):
    async with make_host(LOOPBACK_TCP, LOOPBACK_WS) as h:
        reply = await js.call("ping", addr=_our_addr(h, kind), count=3)
        assert len(reply["rtts"]) == 3
        reply = await js.call("identify", addr=_our_addr(h, kind))
        assert reply["peerId"] == str(h.peer_id)
        assert reply["agentVersion"].startswith("p2pnode/")
        assert "/ipfs/ping/1.0.0" in reply["protocols"]
        assert sorted(reply["listenAddrs"]) == sorted(str(a) for a in h.listen_addrs)
        conn = h.connection_to(PeerId.from_string(js.peer_id))
        assert conn is not None and conn.direction == "inbound"
        assert reply["observedAddr"].startswith(str(conn.remote_addr.without_peer_id()).split("/tcp/")[0])


@pytest.mark.parametrize("kind", KINDS)
async def test_we_send_64mib_each_way_on_concurrent_streams(make_host, js, kind):
    async with make_host(LOOPBACK_TCP, LOOPBACK_WS) as h:
        conn = await h.connect(js.addr(kind))
        with trio.fail_after(120):
            # echo: 64 MiB out and the same 64 MiB back, split over 8 streams, checked byte for byte
            await diag.transfer(h, conn, diag.ECHO, 64 * MiB, streams=8)
        assert conn.muxer.stream_count == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_js_sends_64mib_each_way_on_concurrent_streams(make_host, js, kind):
    async with make_host(LOOPBACK_TCP, LOOPBACK_WS) as h:
        diag.install(h)
        reply = await js.call("echo", addr=_our_addr(h, kind), streams=8, bytes=64 * MiB, timeout=120)
        assert reply["ok"] is True and reply["bytes"] == 64 * MiB


async def test_js_dials_wrong_peer_id_fails(make_host, js):
    from p2pnode.identity import KeyPair

    async with make_host(LOOPBACK_TCP) as h:
        expected = KeyPair.generate().peer_id  # js dials our address expecting someone else
        wrong = f"{h.listen_addrs[0]}/p2p/{expected}"
        with pytest.raises(RuntimeError, match=f"identity key {h.peer_id} does not match expected remote identity key {expected}"):
            await js.call("ping", addr=wrong, count=1)
        # and we are still fine for everyone else
        assert (await js.call("ping", addr=_our_addr(h, "tcp"), count=1))["rtts"]


async def test_js_dials_tcp_and_ws_on_one_shared_port(make_host, js):
    from clusterkit import free_tcp_port

    port = free_tcp_port()
    async with make_host(f"/ip4/127.0.0.1/tcp/{port}", f"/ip4/127.0.0.1/tcp/{port}/ws") as h:
        for kind in KINDS:
            reply = await js.call("identify", addr=_our_addr(h, kind))
            assert reply["peerId"] == str(h.peer_id)
            assert sorted(reply["listenAddrs"]) == sorted([f"/ip4/127.0.0.1/tcp/{port}", f"/ip4/127.0.0.1/tcp/{port}/ws"])
            assert len((await js.call("ping", addr=_our_addr(h, kind), count=2))["rtts"]) == 2
            (conn,) = h.connections()
            assert conn.remote_addr.protocols()[-1] == kind  # it really came in over that transport
            await js.call("hangup", addr=_our_addr(h, kind))
            with trio.fail_after(5):
                while h.connections():
                    await trio.sleep(0.02)
