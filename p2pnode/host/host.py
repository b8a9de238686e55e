"""Host: owns listeners and connections in one nursery; dials, dedups, dispatches streams.

Lifetimes: `open_host()` opens the host's nursery. Each listener, each connection (its yamux
reader/writer and its inbound stream handlers) and each dial is a task in that tree, so closing
the host — cancellation — sends go-away to every peer and leaves no task behind.

Resources: every accepted socket, handshake, connection and stream is admitted by the host's
ResourceManager (`host.resources`, limits from `HostConfig.limits`). The host does not know who
is a member: the node tells it with `set_protected(predicate)`; protected peers are never pruned,
other peers' connections are capped and closed when idle.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs
import trio

from .. import netif
from ..errors import ConnectionClosed, DialError, HandshakeError, P2PNodeError, ProtocolError, StreamReset
from ..identity import KeyPair, PeerId
from ..logfmt import fmt
from ..multiaddr import Multiaddr, ensure
from ..streamio import ResourceLimitExceeded
from ..transport import raw
from ..transport.multistream_trio import answer, select
from ..transport.upgrade import UpgradeLimits, upgrade
from ..transport.websocket_trio import WebSocketStream
from ..transport.yamux_trio import YamuxConnection, YamuxStream
from ..trioutil import open_nursery_unwrapped
from .peerstore import PeerStore
from .resources import ConnectionAccount, Limits, ResourceManager, StreamAccount

log = logging.getLogger("p2pnode.host")

Handler = Callable[[YamuxStream, "Connection"], Awaitable[None]]
ConnectionListener = Callable[["Connection"], None]
SWEEP_INTERVAL = 5.0


class HandlerExists(P2PNodeError, ValueError):
    """A second handler for a protocol that already has one."""


@attrs.frozen
class HostConfig:
    listen: tuple[Multiaddr, ...] = ()
    upgrade: UpgradeLimits = UpgradeLimits()
    limits: Limits = Limits()
    dial_timeout: float = 10.0
    negotiation_timeout: float = 10.0
    standard_protocols: bool = True  # serve ping and identify, identify every new connection


@attrs.define(eq=False)
class Connection:
    peer_id: PeerId
    local_addr: Multiaddr
    remote_addr: Multiaddr
    direction: str  # "inbound" | "outbound"
    muxer: YamuxConnection
    scope: ConnectionAccount
    superseded: bool = False
    nursery: trio.Nursery | None = None  # tasks that live as long as this connection

    @property
    def is_closed(self) -> bool:
        return self.muxer.is_closed

    @property
    def label(self) -> str:
        return self.muxer.label

    @property
    def protected(self) -> bool:
        return self.scope.peer.protected


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
        self._protected: Callable[[PeerId], bool] = lambda peer: False
        self.resources = ResourceManager(config.limits, clock=trio.current_time, is_protected=self.is_protected)
        self.peerstore = PeerStore(trio.current_time)
        self.listen_addrs: list[Multiaddr] = []
        self._upgrade_limits = attrs.evolve(
            config.upgrade,
            max_inbound_streams=min(config.upgrade.max_inbound_streams, config.limits.max_streams_per_connection),
            control_backlog=min(config.upgrade.control_backlog, config.limits.control_backlog),
        )
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
        """Serve `protocol` with `handler`. A protocol has one handler: registering a second one
        raises HandlerExists (remove_handler first to replace it)."""
        if protocol in self._handlers:
            raise HandlerExists(f"a handler for {protocol} is already registered")
        self._handlers[protocol] = handler

    def remove_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    @property
    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    def on_connected(self, listener: ConnectionListener) -> None:
        self._listeners_connected.append(listener)

    def on_disconnected(self, listener: ConnectionListener) -> None:
        self._listeners_disconnected.append(listener)

    def set_protected(self, predicate: Callable[[PeerId], bool]) -> None:
        """Tell the host which peers to protect (the node's members). Called often, it must be
        cheap; changes are picked up within a few seconds."""
        self._protected = predicate

    def protection_changed(self) -> None:
        """The predicate's answers changed (a new membership): re-check every peer now."""
        self.resources.recheck_protection()

    def is_protected(self, peer_id: PeerId) -> bool:
        return self._protected(peer_id)

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
            assert host is not None
            for ip in netif.expand(host):
                expanded = Multiaddr(((proto, ip),) + addr.components[1:])
                if expanded not in out:
                    out.append(expanded)
        return out

    def full_addrs(self) -> list[Multiaddr]:
        return [a.with_peer_id(self.peer_id) for a in self.announce_addrs()]

    # -- lifetime --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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
            nursery.start_soon(self._sweep)
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

    async def _sweep(self) -> None:
        limits = self.config.limits
        while True:
            await trio.sleep(min(SWEEP_INTERVAL, limits.unprotected_idle_timeout / 4))
            self.resources.sweep()
            self.peerstore.prune(self.is_protected, limits.peerstore_ttl, limits.max_peerstore_peers)

    # -- inbound ---------------------------------------------------------------------------------
    async def _on_inbound(self, inbound: raw.Inbound) -> None:
        handshake = self.resources.admit_inbound(inbound.remote_ip)
        if handshake is None:
            await inbound.aclose()
            return
        stream: trio.abc.Stream | None = None
        try:
            stream, local, remote = await inbound.open(
                timeout=raw.SNIFF_TIMEOUT, max_ws_message=self.config.limits.preauth_message_size
            )
            muxer, remote_info = await upgrade(
                stream, self.identity, initiator=False, expected_peer=None, limits=self._upgrade_limits, label=f"in:{remote}"
            )
        except Exception as exc:  # HandshakeError, or a bug: either way this peer alone is dropped
            reason = str(exc) if isinstance(exc, HandshakeError) else f"{type(exc).__name__}: {exc}"
            handshake.failed(reason)
            await _close_quietly(stream if stream is not None else inbound.tcp)
            return
        finally:
            handshake.release()
        peer = remote_info.remote_peer
        scope = handshake.authenticate(peer)
        if isinstance(scope, str):
            log.debug(fmt("connection_refused", peer=peer, remote=remote, reason=scope))
            await _close_quietly(stream)
            return
        if isinstance(stream, WebSocketStream):
            stream.max_message_size = None  # authenticated: messages stream through unbounded
        muxer.label = f"in:{peer.short()}@{remote}"
        await self._run_connection(Connection(peer, local, remote, "inbound", muxer, scope))

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
            if self._nursery is None:
                raise DialError("host is not running")
            conn: Connection = await self._nursery.start(self._dial_and_run, maddr, expected)
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

    async def _dial_and_run(
        self, maddr: Multiaddr, expected: PeerId | None, *, task_status: trio.TaskStatus[Connection]
    ) -> None:
        if self._closing:
            raise DialError("host is shutting down")
        handshake = self.resources.admit_outbound()
        if handshake is None:
            raise DialError(f"{maddr}: connection limit {self.config.limits.max_connections} reached")
        try:
            stream, local, remote = await raw.dial(maddr, self.config.dial_timeout, self.name_resolver)
            try:
                muxer, remote_info = await upgrade(
                    stream, self.identity, initiator=True, expected_peer=expected, limits=self._upgrade_limits,
                    label=f"out:{maddr}",
                )
            except HandshakeError as exc:
                log.info(fmt("handshake_failed", direction="outbound", remote=maddr, reason=str(exc)))
                await _close_quietly(stream)
                raise DialError(f"{maddr}: {exc}") from None
        finally:
            handshake.release()
        peer = remote_info.remote_peer
        scope = handshake.authenticate(peer)
        assert not isinstance(scope, str)  # our own dials are not refused once they succeed
        muxer.label = f"out:{peer.short()}@{remote}"
        self.peerstore.add_addrs(peer, [maddr])
        await self._run_connection(Connection(peer, local, remote, "outbound", muxer, scope), task_status)

    # -- a connection's whole life ---------------------------------------------------------------
    async def _run_connection(
        self, conn: Connection, task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        conn.muxer.scope = conn.scope
        conn.scope.on_close = lambda reason, graceful: self._close_soon(conn, reason, graceful)
        peers = self._conns.setdefault(conn.peer_id, [])
        peers.append(conn)
        self.peerstore.mark_connected(conn.peer_id)
        self.stats["connections_opened"] += 1
        self._dedup(conn)
        level = logging.INFO if conn.protected else logging.DEBUG  # strangers come and go by the thousand
        log.log(level, fmt("connected", peer=conn.peer_id, direction=conn.direction, remote=conn.remote_addr))
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
            conn.scope.close()
            peers = self._conns.get(conn.peer_id, [])
            if conn in peers:
                peers.remove(conn)
            if not peers:
                self._conns.pop(conn.peer_id, None)
                self.peerstore.mark_disconnected(conn.peer_id)
            level = logging.INFO if conn.protected else logging.DEBUG
            log.log(level, fmt("disconnected", peer=conn.peer_id, direction=conn.direction, reason=conn.muxer.close_reason))
            for listener in list(self._listeners_disconnected):
                listener(conn)

    def _close_soon(self, conn: Connection, reason: str, graceful: bool) -> None:
        """The resource manager wants `conn` closed: go-away for an idle one, at once for an offender."""
        if conn.is_closed:
            return
        if graceful and conn.nursery is not None:
            conn.muxer.close_reason = conn.muxer.close_reason or reason
            conn.nursery.start_soon(conn.muxer.aclose)
        else:
            conn.muxer.abort(reason)

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
                level = logging.INFO if c.protected else logging.DEBUG  # a stranger can connect twice at will
                log.log(level, fmt("connection_superseded", peer=peer_id, direction=c.direction))
                if c is not new and self._nursery is not None:
                    self._nursery.start_soon(self._drain, c)

    async def _drain(self, conn: Connection) -> None:
        """Close a superseded connection once its streams are done (at most 30 s)."""
        with trio.move_on_after(30):
            await conn.muxer.wait_idle()
        await conn.muxer.aclose()

    async def _accept_streams(self, conn: Connection, nursery: trio.Nursery) -> None:
        async for stream in conn.muxer.inbound:
            nursery.start_soon(self._handle_stream, conn, stream)

    async def _handle_stream(self, conn: Connection, stream: YamuxStream) -> None:
        try:
            with trio.fail_after(self.config.negotiation_timeout):
                agreed = await answer(stream, self._handlers)
        except (trio.TooSlowError, P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug(fmt("stream_negotiation_failed", peer=conn.peer_id, reason=str(exc) or type(exc).__name__))
            await stream.reset()
            return
        stream.protocol = agreed.protocol
        stream.unread(agreed.trailing)
        budget = stream.budget
        if isinstance(budget, StreamAccount) and not budget.set_protocol(agreed.protocol):
            conn.scope.report("protocol_refused", f"inbound stream limit of {agreed.protocol} reached")
            await stream.reset()
            return
        handler = self._handlers.get(agreed.protocol)
        if handler is None:  # removed meanwhile
            await stream.reset()
            return
        try:
            await handler(stream, conn)
        except (StreamReset, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug(fmt("stream_ended", peer=conn.peer_id, protocol=agreed.protocol, reason=str(exc) or type(exc).__name__))
        except ResourceLimitExceeded as exc:
            conn.scope.report("memory_refused", f"{agreed.protocol}: {exc}")
            await stream.reset()
            return
        except trio.TooSlowError:
            self.resources.logs.log(logging.INFO, "handler_timeout", peer=conn.peer_id, protocol=agreed.protocol)
            await stream.reset()
            return
        except Exception as exc:  # a handler bug or bad input must not take the node down
            self.resources.logs.log(logging.WARNING, "handler_error", peer=conn.peer_id, protocol=agreed.protocol,
                                    error=f"{type(exc).__name__}: {exc}")
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


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _listen_groups(addrs: tuple[Multiaddr, ...]) -> list[list[Multiaddr]]:
    """Addresses sharing a fixed IP and port (TCP and WebSocket) get one socket; port 0 never shares."""
    groups: dict[object, list[Multiaddr]] = {}
    for addr in addrs:
        ep = raw.endpoint_of(addr)
        key = (ep.host, ep.port) if ep.port else object()
        groups.setdefault(key, []).append(addr)
    return list(groups.values())


def open_client() -> AbstractAsyncContextManager[Host]:
    """A host for one-off client work (CLI ping, status, publish): a throwaway identity, no listeners."""
    return open_host(KeyPair.generate(), HostConfig())


@asynccontextmanager
async def open_host(identity: KeyPair, config: HostConfig = HostConfig()) -> AsyncIterator[Host]:
    """Run a host for the duration of the block; leaving it closes every connection."""
    host = Host(identity, config)
    async with open_nursery_unwrapped() as nursery:
        await nursery.start(host.run)
        try:
            yield host
        finally:
            await host.aclose()
            nursery.cancel_scope.cancel()
