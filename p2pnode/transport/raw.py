"""Raw transports: turn a multiaddr into a listening or dialed byte stream (TCP and WebSocket).

A WebSocket carries the same byte stream as TCP in binary messages (libp2p websockets spec), so
both produce a trio.abc.Stream that the upgrader secures and multiplexes.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import attrs
import trio
import trio_websocket

from ..errors import DecodeError, DialError, P2PNodeError
from ..multiaddr import Multiaddr

RECEIVE_SIZE = 256 * 1024
WS_MAX_MESSAGE = 4 * 1024 * 1024
# trio-websocket reads 4 KiB at a time and queues one message by default: far too little for bulk data.
_WS_OPTIONS = dict(max_message_size=WS_MAX_MESSAGE, receive_buffer_size=RECEIVE_SIZE, message_queue_size=8)


@attrs.frozen
class Endpoint:
    """What a dialable/listenable multiaddr means to the socket layer."""

    host: str
    port: int
    family: int  # socket.AF_INET / AF_INET6 / AF_UNSPEC (dns)
    kind: str  # "tcp" | "ws"


def endpoint_of(maddr: Multiaddr) -> Endpoint:
    """Interpret `/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>[/ws][/p2p/<id>]`."""
    protos = maddr.without_peer_id().protocols()
    if len(protos) < 2 or protos[1] != "tcp":
        raise DecodeError(f"{maddr} is not a TCP-based address (/ip4|ip6|dns*/…/tcp/…)")
    host_proto = protos[0]
    families = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6, "dns4": socket.AF_INET, "dns6": socket.AF_INET6, "dns": socket.AF_UNSPEC}
    if host_proto not in families:
        raise DecodeError(f"{maddr}: cannot dial /{host_proto} directly (resolve /dnsaddr first)")
    rest = protos[2:]
    if rest == []:
        kind = "tcp"
    elif rest == ["ws"]:
        kind = "ws"
    elif rest == ["wss"]:
        raise DecodeError(f"{maddr}: /wss (TLS WebSocket) is not supported by this node; use /ws behind a TLS proxy")
    else:
        raise DecodeError(f"{maddr}: unsupported transport stack /{'/'.join(rest)}")
    return Endpoint(maddr.value_for(host_proto), int(maddr.value_for("tcp")), families[host_proto], kind)


def take(pending: bytes, max_bytes: int | None) -> tuple[bytes, bytes]:
    """Split buffered bytes into what receive_some(max_bytes) returns and what stays buffered."""
    if max_bytes is None or len(pending) <= max_bytes:
        return pending, b""
    return pending[:max_bytes], pending[max_bytes:]


class WebSocketStream(trio.abc.Stream):
    """A trio Stream over a trio-websocket connection: one binary message per write."""

    def __init__(self, ws: trio_websocket.WebSocketConnection):
        self._ws = ws
        self._pending = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._ws.send_message(bytes(data))
        except trio_websocket.ConnectionClosed as exc:
            raise trio.BrokenResourceError(f"websocket closed: {exc.reason}") from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            while True:
                try:
                    message = await self._ws.get_message()
                except trio_websocket.ConnectionClosed:
                    return b""
                if isinstance(message, str):
                    raise trio.BrokenResourceError("websocket peer sent a text message; libp2p uses binary")
                if message:
                    self._pending = message
                    break
        data, self._pending = take(self._pending, max_bytes)
        return data

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self._ws.aclose()


RawHandler = Callable[[trio.abc.Stream, Multiaddr, Multiaddr], Awaitable[None]]


def _sockaddr_to_maddr(sockaddr: tuple, family: int, ws: bool) -> Multiaddr:
    host, port = sockaddr[0], sockaddr[1]
    proto = "ip6" if family == socket.AF_INET6 else "ip4"
    tail = (("ws", None),) if ws else ()
    return Multiaddr(((proto, host.split("%")[0]), ("tcp", str(port))) + tail)


NameResolver = Callable[[str, int], Awaitable[list[str]]]


async def _open_tcp(ep: Endpoint, resolve: NameResolver | None) -> trio.SocketStream:
    if resolve is None or ep.family in (socket.AF_INET, socket.AF_INET6) and _is_ip(ep.host):
        return await trio.open_tcp_stream(ep.host, ep.port)
    ips = await resolve(ep.host, ep.family)
    if not ips:
        raise OSError(f"{ep.host} has no address records")
    errors = []
    for ip in ips:
        try:
            return await trio.open_tcp_stream(ip, ep.port)
        except OSError as exc:
            errors.append(f"{ip}: {exc}")
    raise OSError("; ".join(errors))


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


async def dial(
    maddr: Multiaddr, nursery: trio.Nursery, timeout: float, resolve: NameResolver | None = None
) -> tuple[trio.abc.Stream, Multiaddr, Multiaddr]:
    """Open a raw stream. Returns (stream, local_addr, remote_addr).

    /dns* names go through `resolve` (the node's configured nameservers) when given, else the OS."""
    ep = endpoint_of(maddr)
    try:
        with trio.fail_after(timeout):
            tcp = await _open_tcp(ep, resolve)
            sock = tcp.socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local = _sockaddr_to_maddr(sock.getsockname(), sock.family, ep.kind == "ws")
            remote = _sockaddr_to_maddr(sock.getpeername(), sock.family, ep.kind == "ws")
            if ep.kind == "tcp":
                return tcp, local, remote
            host_header = f"[{ep.host}]" if ":" in ep.host else ep.host
            ws = await trio_websocket.wrap_client_stream(
                nursery, tcp, f"{host_header}:{ep.port}", "/", **_WS_OPTIONS
            )
            return WebSocketStream(ws), local, remote
    except trio.TooSlowError:
        raise DialError(f"{maddr}: connect timed out after {timeout:g}s") from None
    except (OSError, trio_websocket.HandshakeError, P2PNodeError) as exc:
        raise DialError(f"{maddr}: {exc}") from None


class PrefixedStream(trio.abc.Stream):
    """A stream whose first bytes were already read (to tell WebSocket from plain TCP)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes):
        self._stream = stream
        self._prefix = prefix

    async def send_all(self, data) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            data, self._prefix = take(self._prefix, max_bytes)
            return data
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


SNIFF_TIMEOUT = 10.0


async def listen(
    maddrs: list[Multiaddr],
    handler: RawHandler,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; each accepted stream runs `handler(stream, local, remote)`.

    `maddrs` share one IP and port: `/tcp/P`, `/tcp/P/ws`, or both. With both, the first bytes
    decide: a WebSocket client starts with an HTTP `GET`, a libp2p dialer with the multistream
    header (both speak first). task_status.started() receives the bound multiaddrs (with the
    real port when 0 was asked)."""
    endpoints = [endpoint_of(m) for m in maddrs]
    ep = endpoints[0]
    if ep.family == socket.AF_UNSPEC:
        raise DecodeError(f"{maddrs[0]}: listen on an IP address (/ip4 or /ip6), not a DNS name")
    if any((e.host, e.port) != (ep.host, ep.port) for e in endpoints):
        raise ValueError("listen() serves addresses of one IP and port")
    kinds = {e.kind for e in endpoints}
    listeners = await trio.open_tcp_listeners(ep.port, host=ep.host)
    sock = listeners[0].socket
    bound = {kind: _sockaddr_to_maddr(sock.getsockname(), sock.family, kind == "ws") for kind in kinds}

    async def on_tcp(tcp: trio.SocketStream) -> None:
        s = tcp.socket
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            peer = s.getpeername()
        except OSError:
            await tcp.aclose()
            return
        stream: trio.abc.Stream = tcp
        kind = next(iter(kinds))
        if len(kinds) > 1:
            first = b""
            with trio.move_on_after(SNIFF_TIMEOUT):
                first = await tcp.receive_some(RECEIVE_SIZE)
            if not first:
                await tcp.aclose()
                return
            kind = "ws" if first.startswith(b"GET ") else "tcp"
            stream = PrefixedStream(tcp, first)
        remote = _sockaddr_to_maddr(peer, s.family, kind == "ws")
        if kind == "tcp":
            await handler(stream, bound["tcp"], remote)
            return
        async with trio.open_nursery() as ws_nursery:
            try:
                with trio.fail_after(SNIFF_TIMEOUT):
                    request = await trio_websocket.wrap_server_stream(ws_nursery, stream, **_WS_OPTIONS)
                    conn = await request.accept()
            except (trio.TooSlowError, trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError):
                await tcp.aclose()
                ws_nursery.cancel_scope.cancel()
                return
            try:
                await handler(WebSocketStream(conn), bound["ws"], remote)
            finally:
                ws_nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_tcp, listeners)
        task_status.started([bound[e.kind] for e in endpoints])
