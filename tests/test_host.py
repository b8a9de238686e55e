"""The host over real loopback sockets: transports, dialing, dedup, bad peers, shutdown."""

import logging
import socket

import pytest
import trio

from p2pnode import diag, framing
from p2pnode.errors import (
    ConnectionClosed, DecodeError, DialError, MessageTooLarge, NegotiationFailed, P2PNodeError, StreamReset,
)
from p2pnode.host import HostConfig, open_host
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr
from p2pnode.stdproto import identify, ping
from p2pnode.streamio import MessageReader, send_message
from p2pnode.transport import raw, yamux
from p2pnode.transport.upgrade import UpgradeLimits, upgrade

from conftest import LOOPBACK_TCP, LOOPBACK_WS


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("listen", ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/ws", "/ip6/::1/tcp/0", "/ip6/::1/tcp/0/ws"])
async def test_ping_identify_and_echo_both_directions(make_host, listen):
    if "ip6" in listen and not _ipv6_available():
        pytest.fail("IPv6 loopback is not available on this machine")
    async with make_host(listen) as a, make_host(listen) as b:
        diag.install(a)
        diag.install(b)
        conn = await b.connect(a.full_addrs()[0])
        assert conn.peer_id == a.peer_id
        rtts = await ping.ping(b, conn, count=3)
        assert len(rtts) == 3 and all(0 < r < 1 for r in rtts)
        record = await identify.identify(b, conn)
        assert record.agent_version.startswith("p2pnode/")
        assert "/ipfs/ping/1.0.0" in record.protocols and diag.ECHO in record.protocols
        assert record.listen_multiaddrs() == a.listen_addrs
        assert record.observed_multiaddr() == conn.local_addr
        await diag.transfer(b, conn, diag.ECHO, 4 << 20, streams=4)
        # the other direction, over the same connection
        back = a.connection_to(b.peer_id)
        assert back is not None and back.direction == "inbound"
        assert len(await ping.ping(a, b.peer_id, count=2)) == 2
        await diag.transfer(a, b.peer_id, diag.ECHO, 1 << 20, streams=2)


async def test_identify_runs_on_connect(make_host):
    async with make_host() as a, make_host() as b:
        await b.connect(a.full_addrs()[0])
        with trio.fail_after(5):
            while not b.peerstore.get(a.peer_id).protocols or not a.peerstore.get(b.peer_id).agent_version:
                await trio.sleep(0.01)
        assert "/ipfs/id/1.0.0" in b.peerstore.get(a.peer_id).protocols
        assert a.peerstore.get(b.peer_id).agent_version.startswith("p2pnode/")


async def test_one_connection_per_peer_with_concurrent_dials(make_host):
    async with make_host() as a, make_host() as b:
        results = []

        async def dial():
            results.append(await b.connect(a.full_addrs()[0]))

        async with trio.open_nursery() as n:
            for _ in range(10):
                n.start_soon(dial)
        assert len({id(c) for c in results}) == 1
        assert len(b.connections()) == 1 and a.stats["connections_opened"] == 1
        # a later dial reuses it; so does opening a stream by peer id
        assert await b.connect(a.full_addrs()[0]) is results[0]
        await ping.ping(b, a.peer_id)
        assert b.stats["connections_opened"] == 1


async def test_simultaneous_dial_keeps_one_connection(make_host):
    async with make_host() as a, make_host() as b:
        async with trio.open_nursery() as n:
            n.start_soon(b.connect, a.full_addrs()[0])
            n.start_soon(a.connect, b.full_addrs()[0])
        with trio.fail_after(5):
            while len(a.connections()) > 1 or len(b.connections()) > 1:
                await trio.sleep(0.02)
        assert a.connection_to(b.peer_id) is not None and b.connection_to(a.peer_id) is not None
        assert len(await ping.ping(a, b.peer_id)) == 1


async def test_dialing_wrong_peer_id_fails_clearly(make_host):
    async with make_host() as a, make_host() as b:
        impostor = KeyPair.generate().peer_id
        addr = a.listen_addrs[0].with_peer_id(impostor)
        with pytest.raises(DialError, match=f"dialed {impostor} but the remote proved it is {a.peer_id}"):
            await b.connect(addr)
        assert b.connections() == []


async def test_dial_refused_and_unsupported_addresses():
    async with open_host(KeyPair.generate()) as h:
        with pytest.raises(DialError, match="127.0.0.1/tcp/1"):
            await h.connect("/ip4/127.0.0.1/tcp/1")
        with pytest.raises(DecodeError, match="/wss"):
            await h.connect("/ip4/127.0.0.1/tcp/1/wss")


async def test_negotiation_na_for_unknown_protocol(make_host):
    async with make_host() as a, make_host() as b:
        with pytest.raises(NegotiationFailed, match="none of"):
            await b.new_stream(await b.connect(a.full_addrs()[0]), ["/nope/1.0.0"])
        assert len(await ping.ping(b, a.peer_id)) == 1  # the connection is still fine


async def _serving(a, b) -> None:
    """b can still reach a: the node keeps serving another peer."""
    with trio.fail_after(10):
        rtts = await ping.ping(b, await b.connect(a.full_addrs()[0]), count=1)
    assert rtts


async def test_garbage_peer_is_dropped_and_others_are_served(make_host, caplog):
    caplog.set_level(logging.INFO)
    async with make_host() as a, make_host() as b:
        addr = a.listen_addrs[0]
        sock = await trio.open_tcp_stream("127.0.0.1", int(addr.value_for("tcp")))
        await sock.send_all(b"GET / HTTP/1.1\r\n\r\n" * 4)
        # the listener speaks first (its multistream header), then hangs up on the garbage
        assert await _read_to_eof(sock) == b"\x13/multistream/1.0.0\n"
        await sock.aclose()
        await _serving(a, b)
    assert "action=handshake_failed direction=inbound" in caplog.text
    assert "security negotiation" in caplog.text


async def test_stalled_handshake_times_out(make_host, caplog):
    caplog.set_level(logging.INFO)
    async with make_host(handshake_timeout=0.3) as a, make_host() as b:
        addr = a.listen_addrs[0]
        sock = await trio.open_tcp_stream("127.0.0.1", int(addr.value_for("tcp")))
        await sock.send_all(b"\x13/multistream/1.0.0\n\x07/noise\n")  # then nothing: no noise message 1
        data = await _read_to_eof(sock)
        assert data.startswith(b"\x13/multistream/1.0.0\n")  # it answered, waited, then hung up
        await _serving(a, b)
    assert "noise handshake timed out after 0.3s" in caplog.text


async def _read_to_eof(stream, timeout: float = 5) -> bytes:
    data = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def _raw_client(addr: Multiaddr, nursery):
    """A hand-driven peer: a real upgrade, then yamux frames written by the test itself."""
    stream, _, _ = await raw.dial(addr, 5)
    conn, _ = await upgrade(stream, KeyPair.generate(), initiator=True, expected_peer=None, limits=UpgradeLimits(), label="evil")
    return conn


async def test_window_overrun_closes_the_connection(make_host, caplog):
    caplog.set_level(logging.INFO)
    async with make_host() as a, make_host() as b, trio.open_nursery() as n:
        conn = await _raw_client(a.listen_addrs[0], n)
        channel = conn.channel
        await channel.send_all(
            yamux.encode_header(yamux.TYPE_WINDOW_UPDATE, yamux.FLAG_SYN, 1, 0)
            + yamux.encode_header(yamux.TYPE_DATA, 0, 1, 300 * 1024)  # refused on the header alone
        )
        received = await _read_to_eof(channel)
        go_away = yamux.encode_header(yamux.TYPE_GO_AWAY, 0, 0, yamux.GO_AWAY_PROTOCOL_ERROR)
        assert go_away in received
        await _serving(a, b)
        n.cancel_scope.cancel()
    assert "window overrun" in caplog.text


async def test_inbound_stream_limit(make_host, caplog):
    caplog.set_level(logging.INFO)
    async with make_host(max_inbound_streams=3) as a, make_host() as b, trio.open_nursery() as n:
        conn = await _raw_client(a.listen_addrs[0], n)
        n.start_soon(conn.run)
        streams = [await conn.open_stream() for _ in range(5)]
        for s in streams:
            try:
                await s.send_all(b"\x13")  # start (but never finish) a multistream header
            except StreamReset:
                assert s in streams[3:]  # the RST for an extra stream may arrive before this write
        with trio.fail_after(5):
            for s in streams[3:]:
                with pytest.raises(StreamReset):
                    await s.receive_some()
        assert conn.is_closed is False
        await _serving(a, b)
        await conn.aclose()
    assert "action=stream_refused" in caplog.text and "inbound stream limit 3 reached" in caplog.text


async def test_oversized_message_is_refused_on_a_stream(make_host):
    async with make_host() as a, make_host() as b:
        got = []

        async def handler(stream, conn):
            try:
                await MessageReader(stream, max_size=1024).one()
            except MessageTooLarge as exc:
                got.append(str(exc))
                raise

        a.set_handler("/p2pnode/test/msg/1.0.0", handler)
        stream = await b.new_stream(await b.connect(a.full_addrs()[0]), "/p2pnode/test/msg/1.0.0")
        await stream.send_all(framing.encode(b"x" * 2048))
        with trio.fail_after(5):
            with pytest.raises(StreamReset):
                while await stream.receive_some():
                    pass
        assert got == ["message of 2048 bytes exceeds the maximum of 1024"]
        with pytest.raises(ValueError, match="exceeds the maximum"):
            await send_message(stream, b"x" * 2048, max_size=1024)
        await _serving(a, b)


def _all_tasks() -> int:
    def count(task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


async def test_clean_shutdown_sends_go_away_and_leaves_no_tasks(make_host):
    before = _all_tasks()
    async with make_host() as b:
        async with make_host() as a:
            conn = await b.connect(a.full_addrs()[0])
            stream = await b.new_stream(conn, "/ipfs/ping/1.0.0")
            assert _all_tasks() > before + 10  # listeners, readers, writers, keepalives, handlers
        # a is gone: b saw its go-away, the connection closed, and the open stream fails cleanly
        with trio.fail_after(5):
            await conn.muxer.wait_closed()
        assert conn.muxer.core.go_away_received == yamux.GO_AWAY_NORMAL
        with pytest.raises((StreamReset, ConnectionClosed, trio.ClosedResourceError)):
            await stream.send_all(b"x" * 32)
        assert b.connections() == []
    assert _all_tasks() == before  # every task either host started has ended


async def test_host_refuses_to_listen_twice_on_a_port():
    async with open_host(KeyPair.generate(), HostConfig(listen=(LOOPBACK_TCP,))) as a:
        taken = a.listen_addrs[0]
        with pytest.raises(P2PNodeError, match=f"cannot listen on {taken}"):
            async with open_host(KeyPair.generate(), HostConfig(listen=(taken,))):
                pass


async def test_keepalive_measures_rtt(make_host):
    async with make_host(keepalive_interval=0.05) as a, make_host(keepalive_interval=0.05) as b:
        conn = await b.connect(a.full_addrs()[0])
        with trio.fail_after(5):
            while conn.muxer.last_rtt is None:
                await trio.sleep(0.01)
        assert 0 < conn.muxer.last_rtt < 1
        assert conn.muxer.core.rtt == conn.muxer.last_rtt


async def test_ws_and_tcp_on_one_host(make_host):
    async with make_host(LOOPBACK_TCP, LOOPBACK_WS) as a, make_host() as b, make_host() as c:
        tcp, ws = a.full_addrs()
        assert "/ws" not in str(tcp) and "/ws/" in str(ws)
        await ping.ping(b, await b.connect(tcp))
        await ping.ping(c, await c.connect(ws))
        assert {x.remote_addr.protocols()[-1] for x in a.connections()} == {"tcp", "ws"}


async def test_wildcard_listen_is_announced_as_interface_addresses(make_host):
    async with make_host("/ip4/0.0.0.0/tcp/0") as a, make_host() as b:
        port = a.listen_addrs[0].value_for("tcp")
        announced = [str(x) for x in a.full_addrs()]
        assert f"/ip4/127.0.0.1/tcp/{port}/p2p/{a.peer_id}" in announced
        assert not any("/0.0.0.0/" in x for x in announced)
        record = await identify.identify(b, await b.connect(announced[-1]))
        assert {str(x) for x in record.listen_multiaddrs()} == {x.rsplit("/p2p/", 1)[0] for x in announced}


async def test_tcp_and_websocket_share_one_port(make_host):
    from clusterkit import free_tcp_port

    port = free_tcp_port()
    async with make_host(f"/ip4/127.0.0.1/tcp/{port}", f"/ip4/127.0.0.1/tcp/{port}/ws") as a, make_host() as b, make_host() as c:
        assert [str(x) for x in a.listen_addrs] == [f"/ip4/127.0.0.1/tcp/{port}", f"/ip4/127.0.0.1/tcp/{port}/ws"]
        tcp, ws = a.full_addrs()
        assert await ping.ping(b, await b.connect(tcp)) and await ping.ping(c, await c.connect(ws))
        assert sorted(x.remote_addr.protocols()[-1] for x in a.connections()) == ["tcp", "ws"]
        # a client that connects and never speaks is dropped after the sniff timeout, others unaffected
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        assert await ping.ping(b, b.connection_to(a.peer_id))
        await idle.aclose()


async def test_websocket_client_may_send_frames_right_behind_its_upgrade_request(make_host):
    """Bytes that arrive with the HTTP upgrade request (before our 101) are kept, not dropped."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, Request

    async with make_host(LOOPBACK_WS) as a:
        port = int(a.listen_addrs[0].value_for("tcp"))
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        proposal = b"\x13/multistream/1.0.0\n\x07/noise\n"
        frame = bytes([0x82, 0x80 | len(proposal)]) + bytes(4) + proposal  # masked with key 0
        await sock.send_all(ws.send(Request(host="localhost", target="/")) + frame)  # one write
        got = b""
        with trio.fail_after(5):
            while proposal not in got:
                ws.receive_data(await sock.receive_some())
                for event in ws.events():
                    assert isinstance(event, (AcceptConnection, BytesMessage))
                    if isinstance(event, BytesMessage):
                        got += event.data
        assert got == proposal  # the listener's header, then /noise accepted
        await sock.aclose()
