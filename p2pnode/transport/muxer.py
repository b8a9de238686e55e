"""Thin trio driver for the yamux core: one reader task, one writer task, streams as trio Streams.

The reader never writes: control frames it causes (ACK, pong, RST, window updates) are queued in
the session and flushed by the writer task, so two peers that both write heavily cannot deadlock
each other through full socket buffers. Every write goes through one lock (one writer at a time),
and session control frames queued so far are always written before the data that follows them.
"""

from __future__ import annotations

import collections
import logging
import math

import trio

from ..errors import ConnectionClosed, ProtocolError, StreamReset
from ..logfmt import fmt
from . import yamux

log = logging.getLogger("p2pnode.yamux")
WRITE_BATCH = 256 * 1024
WRITE_TIMEOUT = 60.0


class YamuxStream(trio.abc.HalfCloseableStream):
    """One multiplexed stream. `protocol` is set once multistream-select agreed on one."""

    def __init__(self, conn: YamuxConnection, stream_id: int):
        self._conn = conn
        self.stream_id = stream_id
        self.protocol: str | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._reset = False
        self._closed = False
        self._write_closed = False
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()
        self._receiving = False
        self._sending = False

    @property
    def connection(self) -> YamuxConnection:
        return self._conn

    def unread(self, data: bytes) -> None:
        """Put back bytes read past a negotiation; they are returned first by receive_some."""
        if data:
            self._chunks.appendleft(data)

    # -- called by the connection ------------------------------------------------------------
    def _on_data(self, data: bytes) -> None:
        if self._closed:
            self._conn._consumed(self.stream_id, len(data))  # nobody will read it; don't stall the peer
            return
        self._chunks.append(data)
        self._readable.unpark_all()

    def _on_eof(self) -> None:
        self._eof = True
        self._readable.unpark_all()

    def _on_reset(self) -> None:
        self._reset = True
        self._readable.unpark_all()
        self._writable.unpark_all()

    # -- trio Stream API -----------------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while not self._chunks:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed locally")
                if self._reset:
                    raise StreamReset(f"stream {self.stream_id} was reset")
                if self._eof or self._conn.is_closed:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                await self._readable.park()
            chunk = self._chunks.popleft()
            if max_bytes is not None and len(chunk) > max_bytes:
                self._chunks.appendleft(chunk[max_bytes:])
                chunk = chunk[:max_bytes]
            self._conn._consumed(self.stream_id, len(chunk))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return chunk
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            view = memoryview(data).cast("B")
            session = self._conn.session
            if not view:
                await trio.lowlevel.checkpoint()
            while view:
                window = self._check_writable()
                while window == 0:
                    await self._writable.park()
                    window = self._check_writable()
                n = min(window, len(view), WRITE_BATCH)
                frames = session.send_data(self.stream_id, view[:n])
                view = view[n:]
                await self._conn._write(frames)
        finally:
            self._sending = False

    def _check_writable(self) -> int:
        if self._reset:
            raise StreamReset(f"stream {self.stream_id} was reset")
        if self._closed or self._write_closed:
            raise trio.ClosedResourceError("stream is closed for writing")
        if self._conn.is_closed:
            raise ConnectionClosed("connection closed")
        return self._conn.session.send_window(self.stream_id)

    async def wait_send_all_might_not_block(self) -> None:
        while self._check_writable() == 0:
            await self._writable.park()

    async def send_eof(self) -> None:
        if self._write_closed or self._reset:
            await trio.lowlevel.checkpoint()
            return
        self._write_closed = True
        self._conn._close_stream(self.stream_id)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._write_closed = True
        for chunk in self._chunks:
            self._conn._consumed(self.stream_id, len(chunk))
        self._chunks.clear()
        if not self._reset:
            self._conn._close_stream(self.stream_id)
        self._readable.unpark_all()
        self._writable.unpark_all()
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        """Abort the stream in both directions (RST)."""
        if not self._reset:
            self._reset = True
            self._conn.session.reset_stream(self.stream_id)
            self._conn._forget(self.stream_id)
            self._conn._kick_writer()
        self._readable.unpark_all()
        self._writable.unpark_all()
        await trio.lowlevel.checkpoint()


class YamuxConnection:
    """A yamux session over a secure channel. `run()` must be running (in the owner's nursery)
    for streams to make progress; it returns when the connection is closed."""

    def __init__(
        self,
        channel: trio.abc.Stream,
        session: yamux.YamuxSession,
        *,
        initial: bytes = b"",
        label: str = "",
        keepalive_interval: float = 30.0,
        keepalive_timeout: float = 20.0,
    ):
        self.channel = channel
        self.session = session
        self.label = label
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self._initial = initial
        self._streams: dict[int, YamuxStream] = {}
        self._send_lock = trio.StrictFIFOLock()
        self._write_broken = False
        self._writer_wakeup = trio.Event()
        self._inbound_send, self.inbound = trio.open_memory_channel[YamuxStream](math.inf)
        self._pongs: dict[int, trio.Event] = {}
        self._closed = trio.Event()
        self.close_reason: str | None = None
        self.last_rtt: float | None = None
        self._cancel_scope: trio.CancelScope | None = None

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    # -- lifetime ------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self._mark_closed(self.close_reason or "closed")
            await self._close_channel()

    async def _reader(self) -> None:
        data = self._initial
        self._initial = b""
        while True:
            if data:
                try:
                    events = self.session.receive_data(data)
                except ProtocolError as exc:
                    log.warning(fmt("yamux_protocol_error", conn=self.label, reason=str(exc)))
                    self.close_reason = f"protocol error: {exc}"
                    self.session.go_away(yamux.GO_AWAY_PROTOCOL_ERROR)
                    await self._flush_quietly()
                    return
                for event in events:
                    self._dispatch(event)
                if self.session.has_output:
                    self._kick_writer()
            try:
                data = await self.channel.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.close_reason = self.close_reason or f"read failed: {exc!r}"
                return
            except ProtocolError as exc:  # noise authentication failure
                log.warning(fmt("secure_channel_error", conn=self.label, reason=str(exc)))
                self.close_reason = f"secure channel error: {exc}"
                return
            if not data:
                self.close_reason = self.close_reason or "remote closed the connection"
                return

    def _dispatch(self, event: yamux.Event) -> None:
        if isinstance(event, yamux.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_data(event.data)
            else:
                self.session.consume(event.stream_id, len(event.data), trio.current_time())
        elif isinstance(event, yamux.WindowUpdated):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._writable.unpark_all()
        elif isinstance(event, yamux.StreamOpened):
            stream = YamuxStream(self, event.stream_id)
            self._streams[event.stream_id] = stream
            self._inbound_send.send_nowait(stream)
        elif isinstance(event, yamux.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_eof()
                if not self.session.is_open(event.stream_id):
                    self._streams.pop(event.stream_id, None)
        elif isinstance(event, yamux.StreamResetByPeer):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._on_reset()
        elif isinstance(event, yamux.PongReceived):
            waiter = self._pongs.pop(event.opaque, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(event, yamux.StreamRefused):
            level = logging.DEBUG if self.session.go_away_sent else logging.WARNING
            log.log(level, fmt("stream_refused", conn=self.label, stream=event.stream_id, reason=event.reason))
        elif isinstance(event, yamux.GoAwayReceived):
            log.info(fmt("go_away_received", conn=self.label, code=event.code))

    async def _writer(self) -> None:
        while True:
            await self._writer_wakeup.wait()
            self._writer_wakeup = trio.Event()
            if self.session.has_output:
                try:
                    await self._write(b"")
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ConnectionClosed):
                    self._abort("write failed")
                    return

    async def _keepalive(self) -> None:
        """Ping at once (the RTT drives window auto-tuning), then every keepalive_interval if > 0."""
        while True:
            try:
                self.last_rtt = await self.ping(timeout=self.keepalive_timeout)
                self.session.rtt = self.last_rtt
            except trio.TooSlowError:
                log.warning(fmt("keepalive_timeout", conn=self.label, timeout=self.keepalive_timeout))
                self._abort("keepalive timeout")
                return
            except ConnectionClosed:
                return
            if self.keepalive_interval <= 0:
                return
            await trio.sleep(self.keepalive_interval)

    def _mark_closed(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        self._closed.set()
        self._inbound_send.close()
        for stream in self._streams.values():
            if stream._eof:  # it had all its data; only writes fail now
                stream._writable.unpark_all()
            else:
                stream._on_reset()
        self._streams.clear()
        for waiter in self._pongs.values():
            waiter.set()

    def _abort(self, reason: str) -> None:
        """End the connection from inside (run() then closes the channel)."""
        self.close_reason = self.close_reason or reason
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _close_channel(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.channel.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    # -- helpers used by streams ---------------------------------------------------------------
    def _kick_writer(self) -> None:
        self._writer_wakeup.set()

    def _consumed(self, stream_id: int, n: int) -> None:
        self.session.consume(stream_id, n, trio.current_time())
        if self.session.has_output:
            self._kick_writer()

    def _close_stream(self, stream_id: int) -> None:
        self.session.close_stream(stream_id)
        if not self.session.is_open(stream_id):
            self._streams.pop(stream_id, None)
        self._kick_writer()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    async def _write(self, frames: bytes) -> None:
        async with self._send_lock:
            if self.is_closed or self._write_broken:
                raise ConnectionClosed(f"connection closed: {self.close_reason}")
            control = self.session.data_to_send()
            payload = control + frames if control else frames
            if payload:
                # A batch of frames is written whole: cancelling the caller half-way would leave the
                # peer with half a Noise frame, and every later byte would reach it as corruption.
                # The caller's cancellation lands at its next checkpoint; a peer that stops reading
                # is bounded by WRITE_TIMEOUT.
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(WRITE_TIMEOUT) as timer:
                        try:
                            await self.channel.send_all(payload)
                        except BaseException:
                            self._write_broken = True
                            raise
                if timer.cancelled_caught:
                    self._write_broken = True
                    self._abort(f"write stalled for {WRITE_TIMEOUT:g}s")
                    raise ConnectionClosed(self.close_reason)

    async def _flush_quietly(self) -> None:
        with trio.move_on_after(1):
            try:
                await self._write(b"")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ConnectionClosed):
                pass

    # -- public API ------------------------------------------------------------------------------
    async def open_stream(self) -> YamuxStream:
        if self.is_closed:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        try:
            sid = self.session.open_stream()
        except ProtocolError as exc:
            raise ConnectionClosed(str(exc)) from None
        stream = YamuxStream(self, sid)
        self._streams[sid] = stream
        # The SYN is queued: it rides in front of the stream's first write (usually the
        # multistream proposal, right away), or the writer task sends it alone if none follows.
        # Not yielding here is what lets the first write take it.
        self._kick_writer()
        await trio.lowlevel.checkpoint_if_cancelled()
        return stream

    async def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time of a yamux ping, in seconds."""
        if self.is_closed:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        opaque = self.session.ping()
        waiter = trio.Event()
        self._pongs[opaque] = waiter
        start = trio.current_time()
        self._kick_writer()
        try:
            with trio.fail_after(timeout):
                await waiter.wait()
        finally:
            self._pongs.pop(opaque, None)
        if self.is_closed:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        return trio.current_time() - start

    async def aclose(self, code: int = yamux.GO_AWAY_NORMAL) -> None:
        """Send go-away, then close the channel. Safe to call more than once."""
        if self.is_closed:
            await trio.lowlevel.checkpoint()
            return
        self.close_reason = self.close_reason or ("local close" if code == yamux.GO_AWAY_NORMAL else f"go-away code {code}")
        self.session.go_away(code)
        with trio.CancelScope(shield=True):
            await self._flush_quietly()
            self._mark_closed(self.close_reason)
            await self._close_channel()
        self._abort(self.close_reason)
