"""yamux (`/yamux/1.0.0`) session as a sans-IO state machine (hashicorp/yamux spec.md).

Frames: a 12-byte header — version 0, type, flags, stream id, length — then, for Data frames,
`length` bytes. Types: 0 Data, 1 Window Update (length is a *delta*), 2 Ping, 3 Go Away.
Flags SYN/ACK/FIN/RST may ride on Data or Window Update frames only. Client streams are odd,
server streams even; stream 0 carries session messages (ping, go-away).

Flow control: each side may send at most the peer's advertised window; the window starts at
256 KiB and the receiver grants bytes back as its application consumes them. When grants come
faster than twice the measured RTT, the receive window doubles, up to `max_window`
(auto-tuning, as go-yamux does), so one stream can fill a long fat pipe.

The core follows the transport cores' shape: `open_stream()`, `consume()` and `send_*` queue
frames, `receive_data(bytes)` returns events (and queues ACKs, pongs, RSTs), `data_to_send()`
drains the queue in order. Data frames are delivered as their bytes arrive (a frame's body is
never buffered whole). Frames caused by the peer's input are bounded: if more than
`max_control_backlog` bytes of them wait unsent (a peer that does not read its pongs), input
raises ProtocolError. The trio driver is `yamux_trio`.
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
DEFAULT_CONTROL_BACKLOG = 64 * 1024
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
    """Bytes of a data frame, as they arrive (one frame may give several events)."""

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


class YamuxCore:
    """The state of one yamux session; no I/O."""

    def __init__(
        self,
        *,
        is_client: bool,
        initial_window: int = INITIAL_WINDOW,
        max_window: int = DEFAULT_MAX_WINDOW,
        max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
        max_control_backlog: int = DEFAULT_CONTROL_BACKLOG,
    ):
        if initial_window < INITIAL_WINDOW:
            raise ValueError("yamux windows cannot start below 256 KiB")
        self.is_client = is_client
        self.initial_window = initial_window
        self.max_window = max(max_window, initial_window)
        self.max_inbound_streams = max_inbound_streams
        self.max_control_backlog = max_control_backlog
        self.rtt: float = 0.0  # seconds; set by the driver from ping round trips
        self._next_id = 1 if is_client else 2
        self._streams: dict[int, _Stream] = {}
        self._inbound_count = 0
        self._outbound: list[bytes | memoryview] = []
        self._control_backlog = 0  # bytes of frames caused by input, queued since the last drain
        self._next_ping = 1
        # inbound parsing: a partial header, or the rest of a data frame's body
        self._header = bytearray()
        self._body_remaining = 0
        self._body_stream: int | None = None  # None: the body is dropped
        self._body_fin = False
        self.go_away_sent = False
        self.go_away_received: int | None = None

    # -- outbound ------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = self._outbound
        self._control_backlog = 0
        if not out:
            return b""
        data = out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)
        out.clear()
        return data

    @property
    def has_output(self) -> bool:
        return bool(self._outbound)

    def _queue_reply(self, frame: bytes) -> None:
        """Queue a frame the peer's input caused; refuse input that piles them up unread."""
        self._outbound.append(frame)
        self._control_backlog += len(frame)
        if self._control_backlog > self.max_control_backlog:
            raise ProtocolError(
                f"peer does not read: {self._control_backlog} bytes of control frames (pongs, ACKs, resets) wait unsent"
            )

    def is_open(self, sid: int) -> bool:
        return sid in self._streams

    def open_stream(self) -> int:
        """Allocate a stream id and queue its SYN."""
        if self.go_away_received is not None:
            raise ProtocolError("remote sent go-away; no new streams")
        if self.go_away_sent:
            raise ProtocolError("session is going away; no new streams")
        sid = self._next_id
        if sid > MAX_UINT32:
            raise ProtocolError("yamux stream ids exhausted")
        self._next_id += 2
        self._streams[sid] = _Stream(False, self.initial_window)
        self._outbound.append(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, self.initial_window - INITIAL_WINDOW))
        return sid

    def send_window(self, sid: int) -> int:
        stream = self._streams.get(sid)
        return stream.send_window if stream is not None and not stream.local_closed else 0

    def send_data(self, sid: int, data: bytes | memoryview) -> None:
        """Queue `data` (which must fit in the send window) as Data frames. Immutable input is
        not copied until data_to_send()."""
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            raise ProtocolError(f"stream {sid} is not writable")
        n = len(data)
        if n > stream.send_window:
            raise ProtocolError(f"{n} bytes exceed the send window of {stream.send_window} on stream {sid}")
        stream.send_window -= n
        if isinstance(data, memoryview) and not data.readonly:
            data = bytes(data)
        out = self._outbound
        if n <= MAX_DATA_FRAME:
            out.append(encode_header(TYPE_DATA, 0, sid, n))
            out.append(data)
            return
        view = memoryview(data)
        for start in range(0, n, MAX_DATA_FRAME):
            chunk = view[start : start + MAX_DATA_FRAME]
            out.append(encode_header(TYPE_DATA, 0, sid, len(chunk)))
            out.append(chunk)

    def consume(self, sid: int, n: int, now: float, max_growth: int | None = None) -> int:
        """The application read `n` bytes of `sid`: grant them back, doubling the window when
        grants come fast (by at most `max_growth` bytes). Returns how much the window grew."""
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed:
            return 0
        stream.pending_grant += n
        if stream.pending_grant < stream.window_size // 2:
            return 0
        delta = stream.pending_grant
        growth = 0
        if (
            stream.last_grant_at is not None
            and self.rtt > 0
            and now - stream.last_grant_at < 2 * self.rtt
            and stream.window_size < self.max_window
        ):
            grown = min(stream.window_size * 2, self.max_window)
            if max_growth is None or grown - stream.window_size <= max_growth:
                growth = grown - stream.window_size
                stream.window_size = grown
        stream.last_grant_at = now
        stream.pending_grant = 0
        stream.recv_window += delta + growth
        self._outbound.append(encode_header(TYPE_WINDOW_UPDATE, 0, sid, delta + growth))
        return growth

    def window_size(self, sid: int) -> int:
        stream = self._streams.get(sid)
        return stream.window_size if stream else 0

    def send_close(self, sid: int) -> None:
        """Half-close our side (FIN)."""
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            return
        stream.local_closed = True
        self._outbound.append(encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN, sid, 0))
        self._maybe_forget(sid, stream)

    def send_reset(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        if stream is None:
            return
        if stream.inbound:
            self._inbound_count -= 1
        self._outbound.append(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))

    def send_ping(self) -> int:
        opaque = self._next_ping
        self._next_ping = (self._next_ping + 1) & MAX_UINT32 or 1
        self._outbound.append(encode_header(TYPE_PING, FLAG_SYN, 0, opaque))
        return opaque

    def send_go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        if not self.go_away_sent:
            self.go_away_sent = True
            self._outbound.append(encode_header(TYPE_GO_AWAY, 0, 0, code))

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def _maybe_forget(self, sid: int, stream: _Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            del self._streams[sid]
            if stream.inbound:
                self._inbound_count -= 1

    # -- inbound -------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Parse frames. Raises ProtocolError on a rule violation (the caller sends go-away and closes)."""
        events: list[Event] = []
        view = memoryview(data)
        pos = 0
        end = len(data)
        header = self._header
        while pos < end:
            if self._body_remaining:
                n = min(self._body_remaining, end - pos)
                if self._body_stream is not None:
                    chunk = data if n == end and isinstance(data, bytes) else bytes(view[pos : pos + n])
                    events.append(DataReceived(self._body_stream, chunk))
                pos += n
                self._body_remaining -= n
                if not self._body_remaining:
                    self._end_body(events)
                continue
            if header or end - pos < HEADER_LEN:
                part = view[pos : pos + HEADER_LEN - len(header)]
                header += part
                pos += len(part)
                if len(header) < HEADER_LEN:
                    break
                version, ftype, flags, sid, length = HEADER.unpack(header)
                header.clear()
            else:
                version, ftype, flags, sid, length = HEADER.unpack_from(view, pos)
                pos += HEADER_LEN
            self._on_frame(version, ftype, flags, sid, length, events)
        return events

    def _on_frame(self, version: int, ftype: int, flags: int, sid: int, length: int, events: list[Event]) -> None:
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
            self._on_stream_frame(ftype, flags, sid, length, events)
        elif ftype == TYPE_WINDOW_UPDATE:
            self._on_stream_frame(ftype, flags, sid, length, events)
        elif ftype == TYPE_PING:
            if sid != 0:
                raise ProtocolError("yamux ping on a non-zero stream id")
            if flags & FLAG_SYN:
                self._queue_reply(encode_header(TYPE_PING, FLAG_ACK, 0, length))
            elif flags & FLAG_ACK:
                events.append(PongReceived(length))
        elif ftype == TYPE_GO_AWAY:
            if sid != 0:
                raise ProtocolError("yamux go-away on a non-zero stream id")
            self.go_away_received = length
            events.append(GoAwayReceived(length))
        else:
            raise ProtocolError(f"unknown yamux frame type {ftype}")

    def _on_stream_frame(self, ftype: int, flags: int, sid: int, length: int, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError("yamux data or window update on stream 0")
        is_data = ftype == TYPE_DATA
        stream = self._streams.get(sid)
        if flags & FLAG_SYN:
            if stream is not None:
                raise ProtocolError(f"SYN for stream {sid} which is already open")
            if (sid % 2 == 1) == self.is_client:
                raise ProtocolError(f"remote opened stream {sid} with our parity")
            if self.go_away_sent or self._inbound_count >= self.max_inbound_streams:
                reason = "going away" if self.go_away_sent else f"inbound stream limit {self.max_inbound_streams} reached"
                self._queue_reply(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
                events.append(StreamRefused(sid, reason))
                self._start_body(None, length if is_data else 0, False, events)
                return
            stream = _Stream(True, self.initial_window)
            stream.recv_window = INITIAL_WINDOW  # the peer assumes 256 KiB until we grant more
            self._streams[sid] = stream
            self._inbound_count += 1
            # ACK, and grant the remainder of our window if it starts above 256 KiB.
            grant = self.initial_window - INITIAL_WINDOW
            stream.recv_window += grant
            self._queue_reply(encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK, sid, grant))
            events.append(StreamOpened(sid))
        if stream is None or flags & FLAG_RST:
            if stream is not None:
                del self._streams[sid]
                if stream.inbound:
                    self._inbound_count -= 1
                events.append(StreamResetByPeer(sid))
            # a frame for a stream already closed or reset (or reset now): its body is dropped
            self._start_body(None, length if is_data else 0, False, events)
            return
        if not is_data:
            if length:
                stream.send_window = min(stream.send_window + length, MAX_UINT32)
                events.append(WindowUpdated(sid))
            self._start_body(sid, 0, bool(flags & FLAG_FIN), events)
            return
        if length and stream.remote_closed:
            raise ProtocolError(f"data on stream {sid} after its FIN")
        stream.recv_window -= length
        self._start_body(sid, length, bool(flags & FLAG_FIN), events)

    def _start_body(self, sid: int | None, length: int, fin: bool, events: list[Event]) -> None:
        self._body_stream = sid
        self._body_fin = fin
        self._body_remaining = length
        if not length:
            self._end_body(events)

    def _end_body(self, events: list[Event]) -> None:
        sid = self._body_stream
        if sid is not None and self._body_fin:
            stream = self._streams.get(sid)
            if stream is not None and not stream.remote_closed:
                stream.remote_closed = True
                events.append(StreamEnded(sid))
                self._maybe_forget(sid, stream)
        self._body_stream = None
        self._body_fin = False
