"""Bytes the attacks craft by hand: yamux frames, multistream messages, WebSocket frames.

`RawMux` is a yamux *client* written from the spec (hashicorp/yamux spec.md) on top of a Noise
channel: it sends whatever frames an attack asks for, bypassing every rule a well-behaved session
keeps, and optionally answers the node just enough (pongs, RSTs for streams the node opens) to
keep the connection alive while the attack runs.
"""

from __future__ import annotations

import base64
import os
import struct

import trio

from p2pnode import varint
from p2pnode.errors import P2PNodeError

HEADER = struct.Struct(">BBHII")  # version, type, flags, stream id, length
HEADER_LEN = 12
DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8


def frame(ftype: int, flags: int, stream_id: int, length: int, body: bytes = b"") -> bytes:
    return HEADER.pack(0, ftype, flags, stream_id, length) + body


def syn(stream_id: int) -> bytes:
    """Open a stream (a window update carrying SYN, as go-yamux does)."""
    return frame(WINDOW_UPDATE, SYN, stream_id, 0)


def rst(stream_id: int) -> bytes:
    return frame(WINDOW_UPDATE, RST, stream_id, 0)


def ping(opaque: int) -> bytes:
    return frame(PING, SYN, 0, opaque)


def pong(opaque: int) -> bytes:
    return frame(PING, ACK, 0, opaque)


def data(stream_id: int, body: bytes, flags: int = 0) -> bytes:
    return frame(DATA, flags, stream_id, len(body), body)


def multistream(*protocols: str) -> bytes:
    """multistream-select messages: each uvarint-length-prefixed and newline-terminated."""
    out = b""
    for proto in protocols:
        line = proto.encode() + b"\n"
        out += varint.encode(len(line)) + line
    return out


MULTISTREAM = "/multistream/1.0.0"


class RawMux:
    """A hand-driven yamux client session on an encrypted channel. Client stream IDs are odd."""

    def __init__(self, channel: trio.abc.Stream, initial: bytes = b""):
        self.channel = channel
        self._initial = initial
        self._send_lock = trio.Lock()
        self.next_id = 1
        self.closed = trio.Event()
        self.counts: dict[str, int] = {"frames_in": 0, "pongs_sent": 0, "streams_refused_by_us": 0, "rst_in": 0, "go_away_in": 0}

    def take_ids(self, n: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + 2 * n, 2))
        self.next_id += 2 * n
        return ids

    async def send(self, raw: bytes) -> None:
        async with self._send_lock:
            await self.channel.send_all(raw)

    async def serve(self, *, answer_pings: bool = True, refuse_streams: bool = True) -> None:
        """Read the node's frames until the connection ends: answer its pings, reset the streams it
        opens (identify, document pull, heartbeats), count the RSTs it sends us. Sets `closed`."""
        buf = bytearray(self._initial)
        try:
            while True:
                replies = bytearray()
                pos = 0
                while len(buf) - pos >= HEADER_LEN:
                    _, ftype, flags, sid, length = HEADER.unpack_from(buf, pos)
                    size = HEADER_LEN + (length if ftype == DATA else 0)
                    if len(buf) - pos < size:
                        break
                    pos += size
                    self.counts["frames_in"] += 1
                    if ftype == PING and flags & SYN and answer_pings:
                        replies += pong(length)
                        self.counts["pongs_sent"] += 1
                    elif ftype == GO_AWAY:
                        self.counts["go_away_in"] += 1
                    elif ftype in (DATA, WINDOW_UPDATE):
                        if flags & RST:
                            self.counts["rst_in"] += 1
                        elif flags & SYN and sid % 2 == 0 and refuse_streams:
                            replies += rst(sid)
                            self.counts["streams_refused_by_us"] += 1
                del buf[:pos]
                if replies:
                    await self.send(bytes(replies))
                chunk = await self.channel.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, P2PNodeError):
            return  # the connection ended, or the node's Noise frames stopped authenticating
        finally:
            self.closed.set()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.channel.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


# -- WebSocket (RFC 6455) client, raw -----------------------------------------------------------
def ws_upgrade_request(host: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def ws_binary_header(length: int, mask: bytes = b"\0\0\0\0") -> bytes:
    """Header of one final, masked binary frame of `length` bytes (clients must mask; a zero
    mask leaves the payload as sent)."""
    if length < 126:
        size = bytes([0x80 | length])
    elif length < 1 << 16:
        size = bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        size = bytes([0x80 | 127]) + length.to_bytes(8, "big")
    return b"\x82" + size + mask
