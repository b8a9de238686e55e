"""Host: owns listeners and connections in one nursery; dials, dedups, dispatches streams.

Lifetimes: `open_host()` opens the host's nursery. Each listener, each connection (its yamux
reader/writer and its inbound stream handlers) and each dial is a task in that tree, so closing
the host — cancellation — sends go-away to every peer and leaves no task behind.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from .. import netif
from ..errors import ConnectionClosed, DialError, HandshakeError, P2PNodeError, ProtocolError, StreamReset
from ..identity import KeyPair, PeerId
from ..logfmt import fmt
from ..multiaddr import Multiaddr, ensure
from ..transport import raw
from ..transport.muxer import YamuxConnection, YamuxStream
from ..transport.negotiate import answer, select
from ..transport.upgrade import UpgradeLimits, upgrade
from ..trioutil import open_nursery_unwrapped
from .peerstore import PeerStore

log = logging.getLogger("p2pnode.host")

Handler = Callable[[YamuxStream, "Connection"], Awaitable[None]]
ConnectionListener = Callable[["Connection"], None]


@attrs.frozen
class HostConfig:
    listen: tuple[Multiaddr, ...] = ()
    upgrade: UpgradeLimits = UpgradeLimits()
    dial_timeout: float = 10.0
    negotiation_timeout: float = 10.0
    max_message_size: int = 1 << 20
    standard_protocols: bool = True  # serve ping and identify, identify every new connection


@attrs.define(eq=False)
class Connection:
    peer_id: PeerId
    local_addr: Multiaddr
    remote_addr: Multiaddr
    direction: str  # "inbound" | "outbound"
    muxer: YamuxConnection
    superseded: bool = False
    nursery: trio.Nursery | None = None  # tasks that live as long as this connection

    @property
    def is_closed(self) -> bool:
        return self.muxer.is_closed

    @property
    def label(self) -> str:
        return self.muxer.label


class _PendingDial:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.conn: Connection | None = None
        self.error: BaseException | None = None


class Host:
    def __init__(self, identity: KeyPair, config: HostConfig = HostConfig()):
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config
        self.peerstore = PeerStore()
        self.listen_addrs: list[Multiaddr] = []
        self._handlers: dict[str, Handler] = {}
        self._conns: dict[PeerId, list[Connection]] = {}
        self._pending: dict[object, _PendingDial] = {}
        self._listeners_connected: list[ConnectionListener] = []
        self._listeners_disconnected: list[ConnectionListener] = []
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self.name_resolver: raw.NameResolver | None = None  # /dns* at dial time; None = the OS resolver
        self.stats = {"connections_opened": 0}
        if config.standard_protocols:
            from ..stdproto import identify, ping

            ping.install(self)
            identify.install(self)

    # -- registry --------------------------------------------------------------------------------
    def set_handler(self, protocol: str, handler: Handler) -> None:
        self._handlers[protocol] = handler

    @property
    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    def on_connected(self, listener: ConnectionListener) -> None:
        self._listeners_connected.append(listener)

    def on_disconnected(self, listener: ConnectionListener) -> None:
        self._listeners_disconnected.append(listener)

    def connection_to(self, peer_id: PeerId) -> Connection | None:
        for conn in self._conns.get(peer_id, ()):
            if not conn.is_closed and not conn.superseded:
                return conn
        return None

    def connections(self) -> list[Connection]:
        return [c for conns in self._conns.values() for c in conns if not c.is_closed]

    def announce_addrs(self) -> list[Multiaddr]:
        """Listen addresses as peers can dial them: a wildcard becomes each interface address."""
        out: list[Multiaddr] = []
        for addr in self.listen_addrs:
            proto, host = addr.components[0]
            for ip in netif.expand(host):
                expanded = Multiaddr(((proto, ip),) + addr.components[1:])
                if expanded not in out:
                    out.append(expanded)
        return out

    def full_addrs(self) -> list[Multiaddr]:
        return [a.with_peer_id(self.peer_id) for a in self.announce_addrs()]

    # -- lifetime --------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for group in _listen_groups(self.config.listen):
                try:
                    bound = await nursery.start(raw.listen, group, self._on_inbound)
                except OSError as exc:
                    raise P2PNodeError(f"cannot listen on {group[0]}: {exc.strerror or exc}") from None
                for addr in bound:
                    self.listen_addrs.append(addr)
                    log.info(fmt("listening", addr=addr.with_peer_id(self.peer_id)))
            task_status.started()
            await trio.sleep_forever()

    async def aclose(self) -> None:
        """Send go-away on every connection, then cancel everything the host runs."""
        self._closing = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(2):
                async with trio.open_nursery() as n:
                    for conn in self.connections():
                        n.start_soon(conn.muxer.aclose)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- inbound ---------------------------------------------------------------------------------
    async def _on_inbound(self, stream: trio.abc.Stream, local: Multiaddr, remote: Multiaddr) -> None:
        label = f"in:{remote}"
        try:
            muxer, remote_info = await upgrade(
                stream, self.identity, initiator=False, expected_peer=None, limits=self.config.upgrade, label=label
            )
        except Exception as exc:  # HandshakeError, or a bug: either way this peer alone is dropped
            reason = str(exc) if isinstance(exc, HandshakeError) else f"{type(exc).__name__}: {exc}"
            log.warning(fmt("handshake_failed", direction="inbound", remote=remote, reason=reason))
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()
            return
        muxer.label = f"in:{remote_info.remote_peer.short()}@{remote}"
        conn = Connection(remote_info.remote_peer, local, remote, "inbound", muxer)
        await self._run_connection(conn)

    # -- outbound --------------------------------------------------------------------------------
    async def connect(self, addr: Multiaddr | str) -> Connection:
        """Connect to one multiaddr (reusing a live connection to its /p2p peer)."""
        maddr = ensure(addr)
        expected = maddr.peer_id
        if expected == self.peer_id:
            raise DialError(f"{maddr}: refusing to dial ourselves")
        if expected is not None:
            existing = self.connection_to(expected)
            if existing is not None:
                return existing
        key: object = expected if expected is not None else str(maddr)
        pending = self._pending.get(key)
        if pending is not None:
            await pending.done.wait()
            if pending.conn is not None:
                return pending.conn
            raise DialError(str(pending.error))
        pending = self._pending[key] = _PendingDial()
        try:
            conn = await self._nursery.start(self._dial_and_run, maddr, expected)
            pending.conn = conn
            return conn
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            pending.done.set()
            self._pending.pop(key, None)

    async def connect_peer(self, peer_id: PeerId, addrs: list[Multiaddr] | None = None) -> Connection:
        """Connect to a peer, trying its known addresses in order until one works."""
        existing = self.connection_to(peer_id)
        if existing is not None:
            return existing
        candidates = addrs if addrs is not None else self.peerstore.addrs(peer_id)
        if not candidates:
            raise DialError(f"no known address for {peer_id}")
        errors = []
        for addr in candidates:
            try:
                return await self.connect(addr.with_peer_id(peer_id))
            except (DialError, HandshakeError) as exc:
                errors.append(str(exc))
        raise DialError(f"all {len(candidates)} addresses of {peer_id} failed: " + "; ".join(errors))

    async def _dial_and_run(self, maddr: Multiaddr, expected: PeerId | None, *, task_status) -> None:
        if self._closing:
            raise DialError("host is shutting down")
        stream, local, remote = await raw.dial(maddr, self._nursery, self.config.dial_timeout, self.name_resolver)
        try:
            muxer, remote_info = await upgrade(
                stream, self.identity, initiator=True, expected_peer=expected, limits=self.config.upgrade, label=f"out:{maddr}"
            )
        except HandshakeError as exc:
            log.warning(fmt("handshake_failed", direction="outbound", remote=maddr, reason=str(exc)))
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            raise DialError(f"{maddr}: {exc}") from None
        muxer.label = f"out:{remote_info.remote_peer.short()}@{remote}"
        self.peerstore.add_addrs(remote_info.remote_peer, [maddr])
        conn = Connection(remote_info.remote_peer, local, remote, "outbound", muxer)
        await self._run_connection(conn, task_status)

    # -- a connection's whole life ---------------------------------------------------------------
    async def _run_connection(self, conn: Connection, task_status=trio.TASK_STATUS_IGNORED) -> None:
        peers = self._conns.setdefault(conn.peer_id, [])
        peers.append(conn)
        self.stats["connections_opened"] += 1
        self._dedup(conn)
        log.info(fmt("connected", peer=conn.peer_id, direction=conn.direction, remote=conn.remote_addr))
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(self._accept_streams, conn, nursery)
                task_status.started(conn)
                for listener in list(self._listeners_connected):
                    listener(conn)
                if conn.superseded:
                    nursery.start_soon(self._drain, conn)
                await conn.muxer.run()
                nursery.cancel_scope.cancel()
        finally:
            peers = self._conns.get(conn.peer_id, [])
            if conn in peers:
                peers.remove(conn)
            if not peers:
                self._conns.pop(conn.peer_id, None)
            log.info(fmt("disconnected", peer=conn.peer_id, direction=conn.direction, reason=conn.muxer.close_reason))
            for listener in list(self._listeners_disconnected):
                listener(conn)

    def _dedup(self, new: Connection) -> None:
        """Two live connections to one peer (simultaneous dials): both sides keep the one dialed
        by the smaller peer ID, and drain the other (the new one drains from its own task)."""
        peer_id = new.peer_id
        live = [c for c in self._conns.get(peer_id, ()) if not c.is_closed and not c.superseded]
        if len(live) < 2:
            return
        smaller_is_us = self.peer_id < peer_id
        preferred_direction = "outbound" if smaller_is_us else "inbound"
        keep = next((c for c in live if c.direction == preferred_direction), live[0])
        for c in live:
            if c is not keep:
                c.superseded = True
                log.info(fmt("connection_superseded", peer=peer_id, direction=c.direction))
                if c is not new:
                    self._nursery.start_soon(self._drain, c)

    async def _drain(self, conn: Connection) -> None:
        """Close a superseded connection once its streams are done (at most 30 s)."""
        with trio.move_on_after(30):
            while conn.muxer.stream_count and not conn.is_closed:
                await trio.sleep(0.5)
        await conn.muxer.aclose()

    async def _accept_streams(self, conn: Connection, nursery: trio.Nursery) -> None:
        async for stream in conn.muxer.inbound:
            nursery.start_soon(self._handle_stream, conn, stream)

    async def _handle_stream(self, conn: Connection, stream: YamuxStream) -> None:
        try:
            with trio.fail_after(self.config.negotiation_timeout):
                agreed = await answer(stream, self._handlers)
        except (trio.TooSlowError, P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(fmt("stream_negotiation_failed", peer=conn.peer_id, reason=str(exc) or type(exc).__name__))
            await stream.reset()
            return
        stream.protocol = agreed.protocol
        stream.unread(agreed.trailing)
        handler = self._handlers.get(agreed.protocol)
        try:
            await handler(stream, conn)
        except (StreamReset, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug(fmt("stream_ended", peer=conn.peer_id, protocol=agreed.protocol, reason=str(exc) or type(exc).__name__))
        except trio.TooSlowError:
            log.warning(fmt("handler_timeout", peer=conn.peer_id, protocol=agreed.protocol))
            await stream.reset()
            return
        except Exception as exc:  # a handler bug or bad input must not take the node down
            log.warning(fmt("handler_error", peer=conn.peer_id, protocol=agreed.protocol, error=f"{type(exc).__name__}: {exc}"))
            await stream.reset()
            return
        await stream.aclose()

    # -- streams -----------------------------------------------------------------------------------
    async def new_stream(self, peer: PeerId | Connection, protocols: list[str] | str) -> YamuxStream:
        """Open a stream to `peer` and negotiate the first of `protocols` it supports.

        Raises ConnectionClosed if an explicitly given connection is closed or going away."""
        if isinstance(protocols, str):
            protocols = [protocols]
        # A Connection given explicitly is used as is (tasks owned by a connection stay on it);
        # a PeerId goes to the peer's current connection, dialing if needed.
        conn = peer if isinstance(peer, Connection) else await self.connect_peer(peer)
        stream = await conn.muxer.open_stream()
        try:
            with trio.fail_after(self.config.negotiation_timeout):
                agreed = await select(stream, protocols)
        except trio.TooSlowError:
            await stream.reset()
            raise ProtocolError(f"protocol negotiation with {conn.peer_id} timed out") from None
        except BaseException:
            await stream.reset()
            raise
        stream.protocol = agreed.protocol
        stream.unread(agreed.trailing)
        return stream


def _listen_groups(addrs: tuple[Multiaddr, ...]) -> list[list[Multiaddr]]:
    """Addresses sharing a fixed IP and port (TCP and WebSocket) get one socket; port 0 never shares."""
    groups: dict[object, list[Multiaddr]] = {}
    for addr in addrs:
        ep = raw.endpoint_of(addr)
        key = (ep.host, ep.port) if ep.port else object()
        groups.setdefault(key, []).append(addr)
    return list(groups.values())


def open_client():
    """A host for one-off client work (CLI ping, status, publish): a throwaway identity, no listeners."""
    return open_host(KeyPair.generate(), HostConfig())


@asynccontextmanager
async def open_host(identity: KeyPair, config: HostConfig = HostConfig()):
    """Run a host for the duration of the block; leaving it closes every connection."""
    host = Host(identity, config)
    async with open_nursery_unwrapped() as nursery:
        await nursery.start(host.run)
        try:
            yield host
        finally:
            await host.aclose()
            nursery.cancel_scope.cancel()
