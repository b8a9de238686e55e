"""Raw transports: turn a multiaddr into a listening or dialed byte stream (TCP and WebSocket).

A WebSocket carries the same byte stream as TCP in binary messages (libp2p websockets spec), so
both produce a trio.abc.Stream that the upgrader secures and multiplexes. A listener hands each
accepted socket to the host as an `Inbound` before reading a byte from it, so the host's
resource manager can refuse it at once; `Inbound.open()` then tells WebSocket from TCP and runs
the WebSocket handshake.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..errors import DecodeError, DialError, HandshakeError, P2PNodeError
from ..multiaddr import Multiaddr
from ..streamio import take
from . import websocket_trio

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
    host, port = maddr.value_for(host_proto), maddr.value_for("tcp")
    assert host is not None and port is not None  # the protocols above are present
    return Endpoint(host, int(port), families[host_proto], kind)


def _sockaddr_to_maddr(sockaddr: tuple[Any, ...], family: int, ws: bool) -> Multiaddr:
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
    maddr: Multiaddr, timeout: float, resolve: NameResolver | None = None
) -> tuple[trio.abc.Stream, Multiaddr, Multiaddr]:
    """Open a raw stream. Returns (stream, local_addr, remote_addr).

    /dns* names go through `resolve` (the node's configured nameservers) when given, else the OS."""
    ep = endpoint_of(maddr)
    tcp: trio.SocketStream | None = None
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
            return await websocket_trio.connect(tcp, f"{host_header}:{ep.port}"), local, remote
    except trio.TooSlowError:
        await _close_quietly(tcp)
        raise DialError(f"{maddr}: connect timed out after {timeout:g}s") from None
    except (OSError, trio.BrokenResourceError, P2PNodeError) as exc:
        await _close_quietly(tcp)
        raise DialError(f"{maddr}: {exc}") from None


async def _close_quietly(stream: trio.abc.AsyncResource | None) -> None:
    if stream is not None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


class PrefixedStream(trio.abc.Stream):
    """A stream whose first bytes were already read (to tell WebSocket from plain TCP)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes):
        self._stream = stream
        self._prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            data, self._prefix = take(self._prefix, max_bytes)
            return data
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


SNIFF_TIMEOUT = 10.0
_WS_START = b"GET "


class Inbound:
    """An accepted TCP connection, nothing read from it yet. The host admits it (or calls
    `aclose()` at once), then `open()`s it."""

    def __init__(self, tcp: trio.SocketStream, remote_ip: str, family: int, kinds: set[str], bound: dict[str, Multiaddr]):
        self.tcp = tcp
        self.remote_ip = remote_ip
        self._family = family
        self._kinds = kinds
        self._bound = bound

    async def open(self, *, timeout: float, max_ws_message: int | None) -> tuple[trio.abc.Stream, Multiaddr, Multiaddr]:
        """Tell WebSocket from TCP (when both share the port) and run the WebSocket handshake.
        Returns (stream, local, remote); raises HandshakeError. `max_ws_message` bounds each
        WebSocket message until the caller lifts it (WebSocketStream.max_message_size)."""
        sockaddr = self.tcp.socket.getpeername()
        kind = next(iter(self._kinds))
        stream: trio.abc.Stream = self.tcp
        first = b""
        try:
            with trio.fail_after(timeout):
                if len(self._kinds) > 1:
                    # Both kinds of client speak first: an HTTP GET is a WebSocket upgrade,
                    # anything else (the multistream header) is libp2p over TCP.
                    while len(first) < len(_WS_START) and _WS_START.startswith(first):
                        chunk = await self.tcp.receive_some(websocket_trio.MAX_HANDSHAKE_READ)
                        if not chunk:
                            raise HandshakeError("connection closed before sending anything")
                        first += chunk
                    kind = "ws" if first.startswith(_WS_START) else "tcp"
                if kind == "ws":
                    stream = await websocket_trio.accept(self.tcp, first, max_message_size=max_ws_message)
                elif first:
                    stream = PrefixedStream(self.tcp, first)
        except trio.TooSlowError:
            raise HandshakeError(f"{'websocket handshake' if first else 'first bytes'} timed out after {timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise HandshakeError(f"connection failed before the handshake ({exc or type(exc).__name__})") from None
        return stream, self._bound[kind], _sockaddr_to_maddr(sockaddr, self._family, kind == "ws")

    async def aclose(self) -> None:
        await _close_quietly(self.tcp)


InboundHandler = Callable[[Inbound], Awaitable[None]]


async def listen(
    maddrs: list[Multiaddr],
    handler: InboundHandler,
    *,
    task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; each accepted socket runs `handler(Inbound)`, which owns it.

    `maddrs` share one IP and port: `/tcp/P`, `/tcp/P/ws`, or both. task_status.started()
    receives the bound multiaddrs (with the real port when 0 was asked)."""
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
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            remote_ip = s.getpeername()[0].split("%")[0]
        except OSError:
            await _close_quietly(tcp)
            return
        await handler(Inbound(tcp, remote_ip, s.family, kinds, bound))

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_tcp, listeners)
        task_status.started([bound[e.kind] for e in endpoints])
