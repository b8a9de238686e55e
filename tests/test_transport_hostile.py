"""A hostile stranger against a real host over real loopback sockets: one test per
transport-level attack of issue 8. Each asserts that what the host buffers stays within its
resource limits (its accounting, and the process's RSS), that a member keeps pinging it
successfully four times a second throughout, and that the log stays small.

Before the resource manager, on the same attacks: 120 WebSocket announcers took RSS from 37 to
574 MiB; 200 unfinished 4 MiB pushes took 1,076 MiB; an unread ping flood queued 429 MiB; a SYN
flood logged 97 MB in 20 s; junk handshakes logged 34,141 warnings in 30 s; 1,000 idle strangers
stayed connected forever.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from p2pnode import varint
from p2pnode.errors import P2PNodeError
from p2pnode.host import Host, HostConfig, open_host
from p2pnode.host.resources import Limits
from p2pnode.identity import KeyPair
from p2pnode.stdproto import ping
from p2pnode.streamio import MessageReader
from p2pnode.transport import raw, yamux
from p2pnode.transport.multistream_trio import select
from p2pnode.transport.upgrade import UpgradeLimits, upgrade

from conftest import LOOPBACK_TCP, LOOPBACK_WS

KiB = 1024
MiB = 1024 * KiB
PUSH = "/p2pnode/test/push/1.0.0"  # stands in for membership push: one message of up to 4 MiB
ATTACKER_ERRORS = (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)
ATTACKER_LIMITS = UpgradeLimits(keepalive_interval=0, handshake_timeout=5)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@attrs.define
class Watch:
    """What the test saw while the attack ran."""

    target: Host
    rss_base: int = 0
    rss_peak: int = 0
    memory_peak: int = 0
    handshakes_peak: int = 0
    unprotected_peak: int = 0
    pings: int = 0
    ping_failures: list[str] = attrs.Factory(list)
    log_base: int = 0

    @property
    def rss_growth_mib(self) -> float:
        return (self.rss_peak - self.rss_base) / 1024


async def _watch(w: Watch) -> None:
    rm = w.target.resources
    while True:
        w.rss_peak = max(w.rss_peak, rss_kib())
        w.memory_peak = max(w.memory_peak, rm.memory_used)
        w.handshakes_peak = max(w.handshakes_peak, rm.handshakes)
        w.unprotected_peak = max(w.unprotected_peak, rm.unprotected_connections)
        await trio.sleep(0.02)


async def _good_peer(w: Watch, member: Host, conn: object) -> None:
    """A member pinging the target four times a second, a fresh stream each time."""
    while True:
        try:
            with trio.fail_after(5):
                await ping.ping(member, conn)  # type: ignore[arg-type]
            w.pings += 1
        except Exception as exc:  # every failure is recorded and asserted on
            w.ping_failures.append(f"{type(exc).__name__}: {exc}")
        await trio.sleep(0.25)


@asynccontextmanager
async def under_attack(caplog: pytest.LogCaptureFixture, *listen, **limits: object) -> AsyncIterator[Watch]:
    """A target host with default limits (except `limits`), a member connected and pinging it.
    On exit, checks that the member's pings all succeeded."""
    caplog.set_level(logging.INFO)
    config = HostConfig(listen=tuple(listen) or (LOOPBACK_TCP,), limits=Limits(**limits))  # type: ignore[arg-type]
    async with open_host(KeyPair.generate(), config) as target, \
            open_host(KeyPair.generate(), HostConfig(upgrade=UpgradeLimits(keepalive_interval=0))) as member:
        target.set_protected(lambda p: p == member.peer_id)
        member.set_protected(lambda p: True)
        conn = await member.connect(target.full_addrs()[0])
        await ping.ping(member, conn)
        w = Watch(target, rss_base=rss_kib(), rss_peak=rss_kib(), log_base=len(caplog.text))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, w)
            nursery.start_soon(_good_peer, w, member, conn)
            yield w
            with trio.fail_after(10):  # at least a few pings after the attack, too
                start = w.pings
                while w.pings < start + 2:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert w.ping_failures == []
        assert not conn.is_closed


def log_bytes(caplog: pytest.LogCaptureFixture, w: Watch) -> int:
    return len(caplog.text) - w.log_base


async def authenticated(target: Host, identity: KeyPair | None = None, sock_rcvbuf: int | None = None):
    """A hand-driven peer: TCP, a real Noise handshake and yamux, then whatever the test writes."""
    addr = target.listen_addrs[0]
    port = int(addr.value_for("tcp"))  # type: ignore[arg-type]
    if sock_rcvbuf is None:
        tcp, _, _ = await raw.dial(addr, 5)
    else:
        s = trio.socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_rcvbuf)
        await s.connect(("127.0.0.1", port))
        tcp = trio.SocketStream(s)
    conn, _ = await upgrade(tcp, identity or KeyPair.generate(), initiator=True, expected_peer=None,
                            limits=ATTACKER_LIMITS, label="evil")
    return conn


async def run_for(seconds: float, attack: Callable[[], Awaitable[None]]) -> None:
    with trio.move_on_after(seconds):
        await attack()


# -- (1) 120 WebSocket connections, each announcing a 4 MiB message and stopping one byte short -----
async def test_websocket_messages_announced_before_noise(caplog):
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Request

    async with under_attack(caplog, LOOPBACK_TCP, LOOPBACK_WS) as w:
        port = int(w.target.listen_addrs[1].value_for("tcp"))
        hold = trio.Event()
        refused = []

        async def announcer() -> None:
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                ws = WSConnection(ConnectionType.CLIENT)
                await sock.send_all(ws.send(Request(host="target", target="/")))
                # One binary frame announcing 4 MiB (mask key 0), carrying a valid multistream
                # start and a Noise frame that will never be complete: then filler up to one byte short.
                head = bytes([0x82, 0x80 | 127]) + (4 * MiB).to_bytes(8, "big") + bytes(4)
                start = b"\x13/multistream/1.0.0\n\x07/noise\n\xff\xff"
                await sock.send_all(head + start)
                left = 4 * MiB - 1 - len(start)
                filler = bytes(64 * KiB)
                while left:
                    n = min(left, len(filler))
                    await sock.send_all(filler[:n])
                    left -= n
                await hold.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                refused.append(1)
            finally:
                await sock.aclose()

        async with trio.open_nursery() as attackers:
            for _ in range(120):
                attackers.start_soon(announcer)
            with trio.fail_after(30):
                while len(refused) < 120:
                    await trio.sleep(0.05)  # the host hangs up on every one of them
            hold.set()
        rm = w.target.resources
        assert "websocket message larger than 65536 bytes" in caplog.text  # refused at the cap, before Noise
        assert w.handshakes_peak <= rm.limits.max_handshakes and rm.handshakes == 0
        assert w.rss_growth_mib < 48, f"RSS grew {w.rss_growth_mib:.0f} MiB"
        assert log_bytes(caplog, w) < 4 * KiB


# -- (2) 200 streams, each sending a 4 MiB − 1 message that never completes ----------------------------
async def test_unfinished_messages_on_many_streams(caplog):
    async with under_attack(caplog) as w:
        target = w.target
        got = []

        async def push(stream, conn) -> None:
            got.append(await MessageReader(stream, 4 * MiB).one())

        target.set_handler(PUSH, push)
        conn = await authenticated(target)
        message = memoryview(varint.encode(4 * MiB - 1) + bytes(4 * MiB - 2))  # one byte short
        in_flight = trio.CapacityLimiter(16)  # waves, so that memory (not the stream count) runs out first

        async def stream_attack() -> None:
            try:
                async with in_flight:
                    s = await conn.open_stream()
                    await select(s, [PUSH])
                    await s.send_all(message)
                    await s.receive_some()
            except ATTACKER_ERRORS:
                pass

        async with trio.open_nursery() as attackers:
            attackers.start_soon(conn.run)
            for _ in range(200):
                attackers.start_soon(stream_attack)
            with trio.fail_after(30):
                await conn.wait_closed()  # backed off: the host hung up
            attackers.cancel_scope.cancel()
        rm = target.resources
        assert got == []
        member_share = 1 * MiB  # the member's ping streams
        assert w.memory_peak <= rm.limits.connection_memory + member_share, w.memory_peak
        assert w.rss_growth_mib < 64, f"RSS grew {w.rss_growth_mib:.0f} MiB"
        assert rm.totals["backed_off"] == 1 and rm.totals["memory_refused"] >= 1
        with trio.fail_after(5):
            while rm.memory_used:
                await trio.sleep(0.02)
        assert log_bytes(caplog, w) < 6 * KiB


# -- (3) a yamux ping flood whose pongs are never read ---------------------------------------------------
async def test_ping_flood_with_unread_pongs(caplog):
    async with under_attack(caplog) as w:
        conn = await authenticated(w.target, sock_rcvbuf=4096)
        pings = yamux.encode_header(yamux.TYPE_PING, yamux.FLAG_SYN, 0, 1) * 5000

        async def flood() -> None:
            try:
                while True:
                    await conn.channel.send_all(pings)  # and never a read
            except ATTACKER_ERRORS:
                pass

        with trio.fail_after(30):
            await flood()  # ends when the host hangs up
        rm = w.target.resources
        assert rm.totals["yamux_protocol_error"] == 1
        assert "peer does not read" in caplog.text
        assert w.rss_growth_mib < 32, f"RSS grew {w.rss_growth_mib:.0f} MiB"
        with trio.fail_after(5):  # it tries a go-away for a second, then hangs up
            while rm.connections != 1:  # only the member
                await trio.sleep(0.02)
        assert log_bytes(caplog, w) < 4 * KiB


# -- (4) a SYN flood past the inbound stream limit ----------------------------------------------------------
async def test_syn_flood_past_the_stream_limit(caplog):
    async with under_attack(caplog) as w:
        rm = w.target.resources

        async def flood_once() -> None:
            conn = await authenticated(w.target)
            async with trio.open_nursery() as n:
                n.start_soon(conn.run)
                try:
                    for _ in range(1000):
                        await conn.open_stream()  # SYN, then nothing
                        await trio.lowlevel.checkpoint()
                    await conn.wait_closed()
                except ATTACKER_ERRORS:
                    pass
                n.cancel_scope.cancel()

        async def attack() -> None:
            while True:
                await flood_once()  # a fresh identity each time it is backed off

        await run_for(4, attack)
        assert rm.totals["stream_refused"] >= 2 * rm.limits.strikes and rm.totals["backed_off"] >= 2
        assert w.memory_peak <= rm.limits.unprotected_memory
        assert w.rss_growth_mib < 64, f"RSS grew {w.rss_growth_mib:.0f} MiB"
        assert log_bytes(caplog, w) < 6 * KiB, caplog.text[w.log_base:]


# -- (5) junk handshakes --------------------------------------------------------------------------------------
async def test_junk_handshakes(caplog):
    async with under_attack(caplog) as w:
        port = int(w.target.listen_addrs[0].value_for("tcp"))
        junk = [
            os.urandom(200),
            b"GET / HTTP/1.1\r\n\r\n",
            b"\x13/multistream/1.0.0\n\x07/noise\n" + b"\x00\x20" + os.urandom(32) + os.urandom(100),  # noise msg 1, then junk
            b"\x13/multistream/1.0.0\n" + b"\x05/nope\n" * 40,  # more proposals than are answered
        ]
        attempts = 0

        async def one(data: bytes) -> None:
            try:
                sock = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            try:
                await sock.send_all(data)
                with trio.move_on_after(5):
                    while await sock.receive_some():
                        pass
            except ATTACKER_ERRORS:
                pass
            finally:
                await sock.aclose()

        async def attack() -> None:
            nonlocal attempts
            async with trio.open_nursery() as n:
                while True:
                    for data in junk:
                        n.start_soon(one, data)
                        attempts += 1
                    await trio.sleep(0.01)

        await run_for(4, attack)
        rm = w.target.resources
        with trio.fail_after(10):
            while rm.handshakes:
                await trio.sleep(0.02)
        # each one failed its handshake, or found every handshake slot taken (stalled Noise
        # handshakes hold theirs for the 10 s timeout) and was closed unread
        assert rm.totals["handshake_failed"] + rm.totals["handshake_limit"] >= attempts // 2
        assert w.rss_growth_mib < 48, f"RSS grew {w.rss_growth_mib:.0f} MiB"
        assert log_bytes(caplog, w) < 4 * KiB, caplog.text[w.log_base:]


# -- (6) 1,000 authenticated idle non-member connections ---------------------------------------------------------
async def test_a_thousand_idle_strangers(caplog):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    async with under_attack(caplog, unprotected_idle_timeout=4, unprotected_grace_period=1) as w:
        rm = w.target.resources
        connected = 0
        limiter = trio.CapacityLimiter(32)

        async def stranger(n: trio.Nursery) -> None:
            nonlocal connected
            async with limiter:
                try:
                    conn = await authenticated(w.target)
                except ATTACKER_ERRORS:
                    return
            connected += 1
            n.start_soon(conn.run)  # stays connected, idle, until the host hangs up

        async with trio.open_nursery() as attackers:
            async with trio.open_nursery() as dialers:
                for _ in range(1000):
                    dialers.start_soon(stranger, attackers)
            assert w.unprotected_peak <= rm.limits.max_unprotected_connections
            with trio.fail_after(20):  # idle strangers are closed (go-away, and the attackers obey)
                while rm.connections != 1:
                    await trio.sleep(0.1)
            attackers.cancel_scope.cancel()
        assert connected >= rm.limits.max_unprotected_connections
        assert rm.totals["unprotected_idle_closed"] + rm.totals["unprotected_evicted"] >= rm.limits.max_unprotected_connections
        assert rm.memory_used < 1 * MiB
        assert w.rss_growth_mib < 96, f"RSS grew {w.rss_growth_mib:.0f} MiB"
        assert log_bytes(caplog, w) < 4 * KiB, caplog.text[w.log_base:]

