"""yamux (`/yamux/1.0.0`) session as a sans-IO state machine (hashicorp/yamux spec.md).

Frames: a 12-byte header — version 0, type, flags, stream id, length — then, for Data frames,
`length` bytes. Types: 0 Data, 1 Window Update (length is a *delta*), 2 Ping, 3 Go Away.
Flags SYN/ACK/FIN/RST may ride on Data or Window Update frames only. Client streams are odd,
server streams even; stream 0 carries session messages (ping, go-away).

Flow control: each side may send at most the peer's advertised window; the window starts at
256 KiB and the receiver grants bytes back as its application consumes them. When grants come
faster than twice the measured RTT, the receive window doubles, up to `max_window`
(auto-tuning, as go-yamux does), so one stream can fill a long fat pipe.
"""

from __future__ import annotations

import struct

import attrs

from ..errors import ProtocolError

PROTOCOL_ID = "/yamux/1.0.0"
HEADER = struct.Struct(">BBHII")
HEADER_LEN = 12
VERSION = 0

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3

FLAG_SYN = 1
FLAG_ACK = 2
FLAG_FIN = 4
FLAG_RST = 8

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

INITIAL_WINDOW = 256 * 1024
DEFAULT_MAX_WINDOW = 16 * 1024 * 1024
DEFAULT_MAX_INBOUND_STREAMS = 256
MAX_UINT32 = 2**32 - 1
# One Data frame plus its header fits a single Noise transport frame (65519 bytes of plaintext).
MAX_DATA_FRAME = 65519 - HEADER_LEN


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(VERSION, frame_type, flags, stream_id, length)


# -- events ---------------------------------------------------------------------------------------
@attrs.frozen
class StreamOpened:
    stream_id: int


@attrs.frozen
class StreamRefused:
    stream_id: int
    reason: str


@attrs.frozen
class DataReceived:
    stream_id: int
    data: bytes


@attrs.frozen
class WindowUpdated:
    stream_id: int


@attrs.frozen
class StreamEnded:
    """The remote half-closed (FIN): no more data will arrive on this stream."""

    stream_id: int


@attrs.frozen
class StreamResetByPeer:
    stream_id: int


@attrs.frozen
class PongReceived:
    opaque: int


@attrs.frozen
class GoAwayReceived:
    code: int


Event = StreamOpened | StreamRefused | DataReceived | WindowUpdated | StreamEnded | StreamResetByPeer | PongReceived | GoAwayReceived


class _Stream:
    __slots__ = (
        "send_window",
        "recv_window",
        "window_size",
        "pending_grant",
        "last_grant_at",
        "local_closed",
        "remote_closed",
        "inbound",
    )

    def __init__(self, inbound: bool, window_size: int):
        self.send_window = INITIAL_WINDOW
        self.recv_window = window_size
        self.window_size = window_size
        self.pending_grant = 0
        self.last_grant_at: float | None = None
        self.local_closed = False
        self.remote_closed = False
        self.inbound = inbound


class YamuxSession:
    """The state of one yamux session; no I/O. Frames the caller must send accumulate in
    `data_to_send()`; frames for stream data are returned directly by `send_data`."""

    def __init__(
        self,
        *,
        is_client: bool,
        initial_window: int = INITIAL_WINDOW,
        max_window: int = DEFAULT_MAX_WINDOW,
        max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
    ):
        if initial_window < INITIAL_WINDOW:
            raise ValueError("yamux windows cannot start below 256 KiB")
        self.is_client = is_client
        self.initial_window = initial_window
        self.max_window = max(max_window, initial_window)
        self.max_inbound_streams = max_inbound_streams
        self.rtt: float = 0.0  # seconds; set by the driver from ping round trips
        self._next_id = 1 if is_client else 2
        self._streams: dict[int, _Stream] = {}
        self._inbound_count = 0
        self._buf = bytearray()
        self._outbound = bytearray()
        self._next_ping = 1
        self.go_away_sent = False
        self.go_away_received: int | None = None

    # -- outbound control --------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = bytes(self._outbound)
        self._outbound.clear()
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._outbound)

    def is_open(self, sid: int) -> bool:
        return sid in self._streams

    def open_stream(self) -> int:
        if self.go_away_received is not None:
            raise ProtocolError("remote sent go-away; no new streams")
        if self.go_away_sent:
            raise ProtocolError("session is going away; no new streams")
        sid = self._next_id
        if sid > MAX_UINT32:
            raise ProtocolError("yamux stream ids exhausted")
        self._next_id += 2
        stream = _Stream(False, self.initial_window)
        self._streams[sid] = stream
        self._outbound += encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, self.initial_window - INITIAL_WINDOW)
        return sid

    def send_window(self, sid: int) -> int:
        stream = self._streams.get(sid)
        return stream.send_window if stream is not None and not stream.local_closed else 0

    def send_data(self, sid: int, data: bytes | memoryview) -> bytes:
        """Frame `data` (which must fit in the send window) as Data frames; returns the bytes."""
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            raise ProtocolError(f"stream {sid} is not writable")
        n = len(data)
        if n > stream.send_window:
            raise ProtocolError(f"{n} bytes exceed the send window of {stream.send_window} on stream {sid}")
        stream.send_window -= n
        if n <= MAX_DATA_FRAME:
            return encode_header(TYPE_DATA, 0, sid, n) + bytes(data)
        view = memoryview(data)
        parts = []
        for start in range(0, n, MAX_DATA_FRAME):
            chunk = view[start : start + MAX_DATA_FRAME]
            parts.append(encode_header(TYPE_DATA, 0, sid, len(chunk)))
            parts.append(bytes(chunk))
        return b"".join(parts)

    def consume(self, sid: int, n: int, now: float) -> None:
        """The application read `n` bytes of `sid`: grant them back, growing the window if needed."""
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed:
            return
        stream.pending_grant += n
        if stream.pending_grant < stream.window_size // 2:
            return
        delta = stream.pending_grant
        if (
            stream.last_grant_at is not None
            and self.rtt > 0
            and now - stream.last_grant_at < 2 * self.rtt
            and stream.window_size < self.max_window
        ):
            grown = min(stream.window_size * 2, self.max_window)
            delta += grown - stream.window_size
            stream.window_size = grown
        stream.last_grant_at = now
        stream.pending_grant = 0
        stream.recv_window += delta
        self._outbound += encode_header(TYPE_WINDOW_UPDATE, 0, sid, delta)

    def window_size(self, sid: int) -> int:
        stream = self._streams.get(sid)
        return stream.window_size if stream else 0

    def close_stream(self, sid: int) -> None:
        """Half-close our side (FIN)."""
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            return
        stream.local_closed = True
        self._outbound += encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN, sid, 0)
        self._maybe_forget(sid, stream)

    def reset_stream(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        if stream is None:
            return
        if stream.inbound:
            self._inbound_count -= 1
        self._outbound += encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)

    def ping(self) -> int:
        opaque = self._next_ping
        self._next_ping = (self._next_ping + 1) & MAX_UINT32 or 1
        self._outbound += encode_header(TYPE_PING, FLAG_SYN, 0, opaque)
        return opaque

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        if not self.go_away_sent:
            self.go_away_sent = True
            self._outbound += encode_header(TYPE_GO_AWAY, 0, 0, code)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def _maybe_forget(self, sid: int, stream: _Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            del self._streams[sid]
            if stream.inbound:
                self._inbound_count -= 1

    # -- inbound -----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Parse frames. Raises ProtocolError on a rule violation (the caller sends go-away and closes)."""
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_LEN:
            version, ftype, flags, sid, length = HEADER.unpack_from(buf, pos)
            if version != VERSION:
                raise ProtocolError(f"yamux version {version} is not supported")
            if ftype == TYPE_DATA:
                stream = self._streams.get(sid)
                limit = stream.recv_window if stream is not None else self.initial_window
                if flags & FLAG_SYN and stream is None:
                    limit = INITIAL_WINDOW
                if length > limit:
                    raise ProtocolError(
                        f"window overrun: data frame of {length} bytes on stream {sid} exceeds the window of {limit}"
                    )
                if end - pos - HEADER_LEN < length:
                    break
                body = bytes(buf[pos + HEADER_LEN : pos + HEADER_LEN + length])
                pos += HEADER_LEN + length
                self._on_stream_frame(ftype, flags, sid, length, body, events)
            elif ftype == TYPE_WINDOW_UPDATE:
                pos += HEADER_LEN
                self._on_stream_frame(ftype, flags, sid, length, b"", events)
            elif ftype == TYPE_PING:
                pos += HEADER_LEN
                if sid != 0:
                    raise ProtocolError("yamux ping on a non-zero stream id")
                if flags & FLAG_SYN:
                    self._outbound += encode_header(TYPE_PING, FLAG_ACK, 0, length)
                elif flags & FLAG_ACK:
                    events.append(PongReceived(length))
            elif ftype == TYPE_GO_AWAY:
                pos += HEADER_LEN
                if sid != 0:
                    raise ProtocolError("yamux go-away on a non-zero stream id")
                self.go_away_received = length
                events.append(GoAwayReceived(length))
            else:
                raise ProtocolError(f"unknown yamux frame type {ftype}")
        if pos:
            del buf[:pos]
        return events

    def _on_stream_frame(self, ftype: int, flags: int, sid: int, length: int, body: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError("yamux data or window update on stream 0")
        stream = self._streams.get(sid)
        if flags & FLAG_SYN:
            if stream is not None:
                raise ProtocolError(f"SYN for stream {sid} which is already open")
            if (sid % 2 == 1) == self.is_client:
                raise ProtocolError(f"remote opened stream {sid} with our parity")
            if self.go_away_sent or self._inbound_count >= self.max_inbound_streams:
                reason = "going away" if self.go_away_sent else f"inbound stream limit {self.max_inbound_streams} reached"
                self._outbound += encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
                events.append(StreamRefused(sid, reason))
                return
            stream = _Stream(True, self.initial_window)
            stream.recv_window = INITIAL_WINDOW  # the peer assumes 256 KiB until we grant more
            self._streams[sid] = stream
            self._inbound_count += 1
            # ACK, and grant the remainder of our window if it starts above 256 KiB.
            grant = self.initial_window - INITIAL_WINDOW
            stream.recv_window += grant
            self._outbound += encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK, sid, grant)
            events.append(StreamOpened(sid))
        if stream is None:
            return  # a frame for a stream already closed or reset: dropped (its length was bounded)
        if flags & FLAG_RST:
            del self._streams[sid]
            if stream.inbound:
                self._inbound_count -= 1
            events.append(StreamResetByPeer(sid))
            return
        if ftype == TYPE_WINDOW_UPDATE:
            if length:
                stream.send_window = min(stream.send_window + length, MAX_UINT32)
                events.append(WindowUpdated(sid))
        elif body:
            if stream.remote_closed:
                raise ProtocolError(f"data on stream {sid} after its FIN")
            stream.recv_window -= len(body)
            events.append(DataReceived(sid, body))
        if flags & FLAG_FIN and not stream.remote_closed:
            stream.remote_closed = True
            events.append(StreamEnded(sid))
            self._maybe_forget(sid, stream)
