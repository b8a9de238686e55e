"""Resource manager: limits config, admission, accounting, strikes and back-off, idle pruning;
the transport pieces it relies on (yamux streaming and control backlog, budgeted message reads,
WebSocket pre-authentication cap); and the host applying them over real loopback sockets."""

import logging
from pathlib import Path

import pytest
import trio

from p2pnode import config as node_config
from p2pnode import framing
from p2pnode.errors import DialError
from p2pnode.host import HandlerExists, HostConfig, open_host
from p2pnode.host.peerstore import PeerStore
from p2pnode.host.resources import ConnectionAccount, Limits, LimitsError, ResourceManager, parse_limits
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr
from p2pnode.stdproto import ping
from p2pnode.streamio import MessageReader, ResourceLimitExceeded
from p2pnode.transport import yamux as y
from p2pnode.transport.upgrade import UpgradeLimits

from conftest import LOOPBACK_TCP, LOOPBACK_WS

KiB = 1024
MiB = 1024 * KiB


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def manager(limits: Limits = Limits(), protected=frozenset()):
    clock = Clock()
    return ResourceManager(limits, clock=clock, is_protected=lambda p: p in protected), clock


def connect(rm: ResourceManager, ip: str = "10.0.0.1", peer=None) -> ConnectionAccount:
    hs = rm.admit_inbound(ip)
    assert hs is not None
    conn = hs.authenticate(peer or KeyPair.generate().peer_id)
    assert isinstance(conn, ConnectionAccount)
    return conn


# -- the limits section ---------------------------------------------------------------------------
def test_limits_parse_round_trip_and_only_changes_are_written():
    assert Limits().to_json() == {}
    limits = parse_limits({"max_connections": 10, "strike_window": 5, "ip_limit_exempt": ["10.1.0.0/16"]})
    assert limits.max_connections == 10 and limits.strike_window == 5.0 and limits.ip_limit_exempt == ("10.1.0.0/16",)
    assert limits.to_json() == {"max_connections": 10, "strike_window": 5.0, "ip_limit_exempt": ["10.1.0.0/16"]}
    assert parse_limits(limits.to_json()) == limits
    assert limits.is_exempt("10.1.2.3") and not limits.is_exempt("10.2.0.1") and not limits.is_exempt("nonsense")


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"max_connections": 0}, "config field 'limits.max_connections': invalid value 0; expected an integer from 1 to 1000000"),
        ({"stream_memory": 1000}, "'limits.stream_memory': invalid value 1000; expected a size in bytes from 262144"),
        ({"backoff": "60"}, "'limits.backoff': invalid value '60'; expected seconds from 0 to 86400"),
        ({"strikes": True}, "'limits.strikes': invalid value True"),
        ({"max_handshakes": 1.5}, "'limits.max_handshakes': invalid value 1.5; expected an integer"),
        ({"ip_limit_exempt": "127.0.0.0/8"}, "'limits.ip_limit_exempt': invalid value '127.0.0.0/8'; expected a list"),
        ({"ip_limit_exempt": ["300.0.0.0/8"]}, "'limits.ip_limit_exempt': invalid value '300.0.0.0/8'; expected an IP prefix"),
        ({"max_conections": 1}, "config field 'limits.max_conections' is unknown; allowed fields: backoff,"),
        ([], "config field 'limits': invalid value []; expected an object"),
    ],
)
def test_limits_errors_name_field_value_and_what_is_allowed(raw, message):
    with pytest.raises(LimitsError) as info:
        parse_limits(raw)
    assert message in str(info.value)


def test_config_json_limits_section(tmp_path: Path):
    cfg = node_config.parse({"limits": {"max_unprotected_connections": 8}}, data_dir=tmp_path)
    assert cfg.limits.max_unprotected_connections == 8
    assert cfg.to_json()["limits"] == {"max_unprotected_connections": 8}
    assert node_config.parse(cfg.to_json(), data_dir=tmp_path).limits == cfg.limits
    assert node_config.NodeConfig(data_dir=tmp_path).to_json()["limits"] == {}
    with pytest.raises(node_config.ConfigError, match="'limits.total_memory': invalid value -1"):
        node_config.parse({"limits": {"total_memory": -1}}, data_dir=tmp_path)


# -- admission ------------------------------------------------------------------------------------
def test_handshakes_in_flight_and_per_ip_are_capped_before_anything_is_read():
    rm, _ = manager(Limits(max_handshakes=3, max_connections_per_ip=2))
    a1, a2 = rm.admit_inbound("10.0.0.1"), rm.admit_inbound("10.0.0.1")
    assert a1 and a2 and rm.admit_inbound("10.0.0.1") is None  # per IP
    b1 = rm.admit_inbound("10.0.0.2")
    assert b1 and rm.admit_inbound("10.0.0.3") is None  # in flight, whatever the IP
    a1.failed("junk")
    assert rm.admit_inbound("10.0.0.3") is not None
    assert rm.totals["ip_limit"] == 1 and rm.totals["handshake_limit"] == 1


def test_loopback_is_exempt_from_per_ip_limits_by_default():
    rm, _ = manager(Limits(max_connections_per_ip=1))
    assert all(rm.admit_inbound("127.0.0.1") for _ in range(5))
    assert rm.admit_inbound("10.9.9.9") and rm.admit_inbound("10.9.9.9") is None


def test_total_connections_include_handshakes():
    rm, _ = manager(Limits(max_connections=2))
    connect(rm)
    hs = rm.admit_inbound("10.0.0.2")
    assert hs is not None and rm.admit_inbound("10.0.0.3") is None and rm.admit_outbound() is None


def test_our_dials_do_not_take_inbound_handshake_slots():
    rm, _ = manager(Limits(max_handshakes=1))
    dials = [rm.admit_outbound() for _ in range(5)]
    assert all(dials) and rm.admit_inbound("10.0.0.1") is not None and rm.admit_inbound("10.0.0.2") is None
    for d in dials:
        d.release()
    assert rm.dials == 0 and rm.handshakes == 1


def test_non_member_connections_are_capped_evicting_the_longest_idle_past_grace():
    member = KeyPair.generate().peer_id
    rm, clock = manager(Limits(max_unprotected_connections=2, unprotected_grace_period=10), protected={member})
    closed = []
    first, second = connect(rm, "10.0.0.1"), connect(rm, "10.0.0.2")
    first.on_close = lambda reason, graceful: closed.append(("first", reason, graceful))
    second.on_close = lambda reason, graceful: closed.append(("second", reason, graceful))
    assert isinstance(rm.admit_inbound("10.0.0.3").authenticate(KeyPair.generate().peer_id), str)  # both in grace
    connect(rm, "10.0.0.4", member)  # members are never counted against the cap
    clock.t += 11
    second.open_stream(True, 256 * KiB)  # busy: not a candidate
    third = rm.admit_inbound("10.0.0.5").authenticate(KeyPair.generate().peer_id)
    assert isinstance(third, ConnectionAccount)
    assert closed == [("first", "non-member connection limit: closing the longest idle", True)]
    first.close()
    assert rm.unprotected_connections == 2 and rm.connections == 3


# -- accounting -----------------------------------------------------------------------------------
def test_stream_windows_and_messages_are_reserved_along_the_whole_chain():
    rm, _ = manager(Limits(connection_memory=1 * MiB, stream_memory=512 * KiB, max_streams_per_connection=100))
    conn = connect(rm)
    streams = [conn.open_stream(True, 256 * KiB) for _ in range(4)]
    assert all(streams) and rm.memory_used == 1 * MiB and rm.unprotected.used == 1 * MiB
    assert conn.open_stream(True, 256 * KiB) is None  # the connection's budget is spent
    with pytest.raises(ResourceLimitExceeded, match="connection memory limit of 1048576 bytes reached"):
        streams[0].reserve(1)
    streams[0].done()
    streams[1].reserve(200 * KiB)
    with pytest.raises(ResourceLimitExceeded, match="stream memory limit of 524288"):
        streams[1].reserve(100 * KiB)
    assert streams[1].available() == 56 * KiB
    for s in streams[1:]:
        s.done()
    assert rm.memory_used == 0 and conn.streams == 0 and conn.idle_since is not None
    conn.close()
    assert rm.peers == {} and rm.connections == 0


def test_inbound_stream_counts_per_connection_peer_and_protocol():
    rm, _ = manager(Limits(max_streams_per_connection=3, max_unprotected_streams_per_protocol=2))
    conn = connect(rm)
    s = [conn.open_stream(True, 256 * KiB) for _ in range(3)]
    assert conn.open_stream(True, 256 * KiB) is None
    assert conn.open_stream(False, 256 * KiB) is not None  # our own streams are not counted
    assert s[0].set_protocol("/x") and s[1].set_protocol("/x") and not s[2].set_protocol("/x")
    other = connect(rm, "10.0.0.9")
    assert not other.open_stream(True, 256 * KiB).set_protocol("/x")  # non-members share the protocol's cap
    s[0].done()
    assert s[2].set_protocol("/x")


def test_protection_changes_move_a_peers_memory_out_of_the_non_member_pool():
    protected: set = set()
    clock = Clock()
    rm = ResourceManager(Limits(), clock=clock, is_protected=lambda p: p in protected)
    conn = connect(rm)
    conn.open_stream(True, 256 * KiB)
    assert rm.unprotected.used == 256 * KiB
    protected.add(conn.peer.peer_id)
    rm.sweep()
    assert conn.peer.protected and rm.unprotected.used == 0 and rm.memory_used == 256 * KiB


def test_idle_non_member_connections_are_closed_members_are_not():
    member = KeyPair.generate().peer_id
    rm, clock = manager(Limits(unprotected_idle_timeout=30), protected={member})
    closed = []
    stranger, friend = connect(rm), connect(rm, peer=member)
    stranger.on_close = lambda reason, graceful: closed.append(reason)
    friend.on_close = lambda reason, graceful: closed.append("member!")
    clock.t += 29
    rm.sweep()
    assert closed == []
    clock.t += 1
    rm.sweep()
    assert closed == ["idle non-member connection (30s)"]


# -- strikes and back-off -------------------------------------------------------------------------------
def test_a_peer_that_keeps_hitting_limits_is_disconnected_and_backed_off(caplog):
    caplog.set_level(logging.INFO)
    rm, clock = manager(Limits(strikes=3, strike_window=10, backoff=60, max_backoff=100))
    peer = KeyPair.generate().peer_id
    conn = connect(rm, peer=peer)
    closed = []
    conn.on_close = lambda reason, graceful: closed.append((reason, graceful))
    for _ in range(2):
        conn.report("stream_refused", "stream 9: inbound stream limit 3 reached")
    clock.t += 11  # old strikes expire
    for _ in range(2):
        conn.report("stream_refused", "x")
    assert closed == []
    conn.report("stream_refused", "x")
    assert closed == [("backed off for 60s after 3 limit hits", False)]
    conn.close()
    assert rm.admit_inbound("10.0.0.1").authenticate(peer) == "backed off after repeated limit hits"
    clock.t += 61
    again = connect(rm, peer=peer)
    for _ in range(3):
        again.report("yamux_protocol_error", "bad frame")
    assert "peer_backed_off" in caplog.text and "seconds=100" in caplog.text  # doubled, capped at max_backoff
    assert rm.stats()["backed_off"] == 1


def test_junk_handshakes_strike_the_ip_unless_exempt():
    rm, clock = manager(Limits(strikes=2))
    for _ in range(2):
        rm.admit_inbound("10.0.0.7").failed("security negotiation: garbage")
    assert rm.admit_inbound("10.0.0.7") is None and rm.totals["backed_off_ip"] == 1
    for _ in range(5):
        rm.admit_inbound("127.0.0.1").failed("garbage")
    assert rm.admit_inbound("127.0.0.1") is not None


def test_logs_are_rate_limited_per_event_and_summarised(caplog):
    caplog.set_level(logging.INFO)
    rm, clock = manager(Limits(log_interval=60))
    conn = connect(rm)
    for i in range(1000):
        conn.report("keepalive_timeout", f"no pong {i}")
    lines = [r for r in caplog.records if "keepalive_timeout" in r.getMessage()]
    assert len(lines) == rm.logs.burst
    clock.t += 60
    rm.sweep()
    assert f"action=log_suppressed event=keepalive_timeout count={1000 - rm.logs.burst}" in caplog.text
    assert "action=resource_summary" in caplog.text and "keepalive_timeout=1000" in caplog.text


def test_offender_table_is_bounded():
    rm, clock = manager(Limits(strikes=1000))
    for i in range(5000):
        rm.admit_inbound(f"10.{i // 250}.{i % 250}.1").failed("junk")
    assert len(rm._offenders) <= 4096
    clock.t += 10_000
    rm.sweep()
    assert len(rm._offenders) == 0


# -- peerstore ------------------------------------------------------------------------------------
def test_peerstore_forgets_gone_unprotected_peers():
    clock = Clock()
    store = PeerStore(clock)
    member, stranger, online = (KeyPair.generate().peer_id for _ in range(3))
    addr = Multiaddr.parse("/ip4/10.0.0.1/tcp/4100")
    for p in (member, stranger, online):
        store.add_addrs(p, [addr])
    store.mark_connected(online)
    clock.t += 601
    assert store.prune(lambda p: p == member, ttl=600, max_unprotected=100) == 1
    assert stranger not in store and member in store and online in store
    many = [KeyPair.generate().peer_id for _ in range(20)]
    for p in many:
        clock.t += 1
        store.add_addrs(p, [addr])
    store.prune(lambda p: False, ttl=600, max_unprotected=5)
    assert [p for p in many if p in store] == many[-5:]


# -- transport pieces -----------------------------------------------------------------------------
def test_yamux_delivers_a_data_frame_as_its_bytes_arrive():
    s = y.YamuxCore(is_client=False)
    wire = y.encode_header(y.TYPE_WINDOW_UPDATE, y.FLAG_SYN, 1, 0) + y.encode_header(y.TYPE_DATA, y.FLAG_FIN, 1, 10) + b"0123456789"
    assert s.receive_data(wire[:20]) == [y.StreamOpened(1)]
    assert s.receive_data(wire[20:28]) == [y.DataReceived(1, b"0123")]
    assert s.receive_data(wire[28:]) == [y.DataReceived(1, b"456789"), y.StreamEnded(1)]


def test_yamux_peer_that_does_not_read_its_pongs_is_refused():
    s = y.YamuxCore(is_client=False, max_control_backlog=1200)
    ping = y.encode_header(y.TYPE_PING, y.FLAG_SYN, 0, 7)
    s.receive_data(ping * 100)  # 1200 bytes of pongs wait
    with pytest.raises(y.ProtocolError, match="peer does not read: 1212 bytes of control frames"):
        s.receive_data(ping)
    s2 = y.YamuxCore(is_client=False, max_control_backlog=1200)
    for _ in range(10):
        s2.receive_data(ping * 100)
        s2.data_to_send()  # a peer that reads keeps the backlog empty


def test_yamux_window_grows_only_as_far_as_the_budget_allows():
    c, s = y.YamuxCore(is_client=True), y.YamuxCore(is_client=False)
    s.rtt = 1.0
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    growth = []
    for now in (0.0, 0.5, 1.0):
        n = c.send_window(sid)
        c.send_data(sid, b"x" * n)
        s.receive_data(c.data_to_send())
        growth.append(s.consume(sid, n, now=now, max_growth=300 * KiB))
        c.receive_data(s.data_to_send())
    assert growth == [0, 256 * KiB, 0] and s.window_size(sid) == 512 * KiB  # 512K → 1M would need 512K more


class _BudgetedStream:
    """A receive stream that carries a budget, as the host's streams do."""

    def __init__(self, data: bytes, limit: int):
        self._data = data
        self.reserved: list[int] = []
        self.limit = limit
        self.budget = self
        self.used = 0

    async def receive_some(self, max_bytes=None):
        await trio.lowlevel.checkpoint()
        chunk, self._data = self._data[:1000], self._data[1000:]
        return chunk

    def reserve(self, n):
        if self.used + n > self.limit:
            raise ResourceLimitExceeded(f"{n} bytes is over budget")
        self.used += n
        self.reserved.append(n)

    def release(self, n):
        self.used -= n

    def available(self):
        return self.limit - self.used


async def test_message_reader_reserves_the_announced_length_before_reading_the_body():
    stream = _BudgetedStream(framing.encode(b"a" * 3000) + framing.encode(b"b" * 10), limit=5000)
    reader = MessageReader(stream, max_size=1 << 20)
    assert await reader.one() == b"a" * 3000 and stream.used == 0
    assert await reader.one() == b"b" * 10
    assert stream.reserved == [3000]  # the second message came whole within one read: nothing to hold
    greedy = _BudgetedStream(framing.encode(b"c" * 6000), limit=5000)
    with pytest.raises(ResourceLimitExceeded, match="6000 bytes is over budget"):
        await MessageReader(greedy, max_size=1 << 20).one()
    assert len(greedy._data) > 5000  # refused on the prefix: the body was not read


# -- the host -------------------------------------------------------------------------------------
async def test_set_handler_refuses_a_second_registration(make_host):
    async with make_host() as a:
        async def handler(stream, conn):
            pass

        with pytest.raises(HandlerExists, match="a handler for /ipfs/ping/1.0.0 is already registered"):
            a.set_handler("/ipfs/ping/1.0.0", handler)
        a.remove_handler("/ipfs/ping/1.0.0")
        a.set_handler("/ipfs/ping/1.0.0", handler)


def _config(*listen, **limits) -> HostConfig:
    return HostConfig(listen=tuple(listen) or (LOOPBACK_TCP,), limits=Limits(**limits), upgrade=UpgradeLimits(keepalive_interval=0))


async def test_per_ip_limit_refuses_sockets_before_the_handshake():
    async with open_host(KeyPair.generate(), _config(ip_limit_exempt=(), max_connections_per_ip=2)) as a:
        port = int(a.listen_addrs[0].value_for("tcp"))
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await extra.receive_some() == b""  # closed without a byte: not even the multistream header
        with trio.fail_after(5):
            while a.resources.handshakes != 2:
                await trio.sleep(0.01)
        for s in held + [extra]:
            await s.aclose()
        assert a.resources.totals["ip_limit"] == 1


async def test_idle_non_member_connection_is_closed_member_is_kept():
    limits = dict(unprotected_idle_timeout=1.0, unprotected_grace_period=0.0)
    async with open_host(KeyPair.generate(), _config(**limits)) as a, \
            open_host(KeyPair.generate(), _config(**limits)) as member, open_host(KeyPair.generate(), _config(**limits)) as stranger:
        a.set_protected(lambda p: p == member.peer_id)
        member.set_protected(lambda p: True)
        m = await member.connect(a.full_addrs()[0])
        s = await stranger.connect(a.full_addrs()[0])
        with trio.fail_after(10):
            await s.muxer.wait_closed()
        assert a.connection_to(stranger.peer_id) is None and a.resources.totals["unprotected_idle_closed"] == 1
        assert not m.is_closed and await ping.ping(member, m)


async def test_backed_off_peer_is_refused_on_reconnect():
    identity = KeyPair.generate()
    async with open_host(KeyPair.generate(), _config(strikes=1, backoff=60)) as a, open_host(identity, _config()) as b:
        conn = await b.connect(a.full_addrs()[0])
        a.connection_to(b.peer_id).scope.report("memory_refused", "test")
        with trio.fail_after(5):
            await conn.muxer.wait_closed()
        conn = await b.connect(a.full_addrs()[0])  # the handshake completes, then a closes it at once
        with trio.fail_after(5):
            await conn.muxer.wait_closed()
        assert a.resources.totals["backed_off_peer"] == 1 and a.connections() == []


async def test_outbound_dials_are_refused_past_the_connection_limit(make_host):
    async with make_host() as a, open_host(KeyPair.generate(), _config(max_connections=1)) as b, make_host() as c:
        await b.connect(a.full_addrs()[0])
        with pytest.raises(DialError, match="connection limit 1 reached"):
            await b.connect(c.full_addrs()[0])


async def test_websocket_message_before_noise_is_capped():
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, Request

    async with open_host(KeyPair.generate(), _config(LOOPBACK_WS, preauth_message_size=16 * KiB)) as a:
        port = int(a.listen_addrs[0].value_for("tcp"))
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await sock.send_all(ws.send(Request(host="localhost", target="/")))
        ws.receive_data(await sock.receive_some())
        assert isinstance(next(ws.events()), AcceptConnection)
        # one message: a valid multistream start, then filler, 32 KiB in all
        message = b"\x13/multistream/1.0.0\n\x07/noise\n" + b"\x00" * (32 * KiB)
        await sock.send_all(ws.send(BytesMessage(data=message)))
        received = b""
        with trio.fail_after(5):
            while chunk := await sock.receive_some():
                received += chunk
        ws.receive_data(received)
        assert any(getattr(e, "code", None) == 1009 for e in ws.events())  # closed: message too big
        assert a.resources.handshakes == 0 and a.resources.totals["handshake_failed"] == 1
        await sock.aclose()
