"""WebSocket (`/ws`) as a byte stream: wsproto is the sans-IO core, this is its trio driver.

libp2p carries the same byte stream over WebSocket as over TCP, in binary messages whose
boundaries mean nothing (websockets/README.md of libp2p/specs). So message payloads are handed
on as they arrive and nothing is buffered whole: a connection holds at most one read of the
socket. Until the host lifts it (after Noise), a message may be at most `max_message_size`
bytes: a stranger cannot announce a 4 MiB message before proving who it is.

Pongs and the answer to a close are sent in front of our next write (or at close), never from
the reading side, so reading never waits on a full socket.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..errors import HandshakeError
from ..streamio import RECEIVE_SIZE, take

CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
MAX_HANDSHAKE_READ = 16 * 1024  # h11 refuses an HTTP head larger than 16 KiB anyway


class WebSocketStream(trio.abc.Stream):
    """A trio Stream over an established WebSocket: one binary message per write."""

    def __init__(self, tcp: trio.abc.Stream, ws: WSConnection, *, max_message_size: int | None):
        self._tcp = tcp
        self._ws = ws
        self.max_message_size = max_message_size  # None: unlimited (messages are never buffered whole)
        self._message_size = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._reply = b""  # pong or close answer, sent in front of the next write
        self._eof = False
        self._sending = False

    # -- receiving -------------------------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending:
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            data = await self._tcp.receive_some(RECEIVE_SIZE)
            if not data:
                self._eof = True
                continue
            try:
                self._ws.receive_data(bytes(data))
            except LocalProtocolError:  # data after the close handshake
                self._eof = True
                continue
            self._process(self._ws.events())
        chunk = self._pending.popleft()
        out, rest = take(chunk, max_bytes)
        if rest:
            self._pending.appendleft(rest)
        return out

    def _process(self, events: Iterator[Event]) -> None:
        for event in events:
            if isinstance(event, BytesMessage):
                self._message_size += len(event.data)
                if self.max_message_size is not None and self._message_size > self.max_message_size:
                    self._close_with(CLOSE_TOO_BIG, f"message larger than {self.max_message_size} bytes")
                    raise trio.BrokenResourceError(f"websocket message larger than {self.max_message_size} bytes")
                if event.message_finished:
                    self._message_size = 0
                if event.data:
                    data = event.data
                    self._pending.append(data if isinstance(data, bytes) else bytes(data))
            elif isinstance(event, TextMessage):
                raise trio.BrokenResourceError("websocket peer sent a text message; libp2p uses binary")
            elif isinstance(event, Ping):
                self._reply = self._ws.send(event.response())  # only the latest ping needs an answer
            elif isinstance(event, CloseConnection):
                self._eof = True
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._reply = self._ws.send(event.response())
                break

    def _close_with(self, code: int, reason: str) -> None:
        try:
            self._reply = self._ws.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:
            pass
        self._eof = True

    # -- sending ---------------------------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            frame = self._ws.send(Message(data=bytes(data)))
        except LocalProtocolError:
            raise trio.BrokenResourceError("websocket is closing") from None
        if self._reply:
            frame, self._reply = self._reply + frame, b""
        self._sending = True
        try:
            await self._tcp.send_all(frame)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self._tcp.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                if not self._reply and self._ws.state is ConnectionState.OPEN:
                    self._reply = self._ws.send(CloseConnection(code=CLOSE_NORMAL))
                if self._reply and not self._sending:  # a write in progress just fails when the socket closes
                    await self._tcp.send_all(self._reply)
                    self._reply = b""
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, LocalProtocolError):
                pass
            await self._tcp.aclose()


async def _handshake_events(tcp: trio.abc.Stream, ws: WSConnection, data: bytes) -> Event:
    """Feed the socket to wsproto until the handshake's first event (Request / Accept / Reject)."""
    while True:
        if data:
            try:
                ws.receive_data(data)
            except RemoteProtocolError as exc:
                raise HandshakeError(f"websocket handshake: {exc}") from None
            for event in ws.events():
                return event
        data = bytes(await tcp.receive_some(MAX_HANDSHAKE_READ))
        if not data:
            raise HandshakeError("connection closed during the websocket handshake")


async def accept(tcp: trio.abc.Stream, initial: bytes, *, max_message_size: int | None) -> WebSocketStream:
    """Server side: read the HTTP upgrade request (whatever its path) and accept it."""
    # The request's head is split off here: wsproto's server would drop bytes a client sends
    # right behind it (before our 101), and the HTTP head is bounded like h11 bounds it.
    buf = bytearray(initial)
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HANDSHAKE_READ:
            raise HandshakeError(f"websocket upgrade request longer than {MAX_HANDSHAKE_READ} bytes")
        chunk = await tcp.receive_some(MAX_HANDSHAKE_READ)
        if not chunk:
            raise HandshakeError("connection closed during the websocket handshake")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    ws = WSConnection(ConnectionType.SERVER)
    event = await _handshake_events(tcp, ws, bytes(buf[:end]))
    if not isinstance(event, Request):
        raise HandshakeError(f"websocket handshake: expected an upgrade request, got {type(event).__name__}")
    await tcp.send_all(ws.send(AcceptConnection()))
    stream = WebSocketStream(tcp, ws, max_message_size=max_message_size)
    if end < len(buf):
        ws.receive_data(bytes(buf[end:]))
        stream._process(ws.events())
    return stream


async def connect(tcp: trio.abc.Stream, host: str, path: str = "/") -> WebSocketStream:
    """Client side: send the upgrade request and wait for the 101 answer."""
    ws = WSConnection(ConnectionType.CLIENT)
    await tcp.send_all(ws.send(Request(host=host, target=path)))
    event = await _handshake_events(tcp, ws, b"")  # wsproto's client keeps what follows the 101
    if isinstance(event, RejectConnection):
        raise HandshakeError(f"websocket upgrade refused with HTTP {event.status_code}")
    if not isinstance(event, AcceptConnection):
        raise HandshakeError(f"websocket handshake: unexpected {type(event).__name__}")
    stream = WebSocketStream(tcp, ws, max_message_size=None)
    stream._process(ws.events())
    return stream
