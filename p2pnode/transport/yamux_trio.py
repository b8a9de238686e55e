"""Thin trio driver for the yamux core: one reader task, one writer task, streams as trio Streams.

The reader never writes: control frames it causes (ACK, pong, RST, window updates) are queued in
the core and flushed by the writer task, so two peers that both write heavily cannot deadlock
each other through full socket buffers. Every write holds one lock and drains the core's queue
in order, so control frames queued so far always precede the data that follows them; a stream
queues its batch only once it holds the lock. A write is shielded from its task's cancellation
(half a Noise frame would corrupt everything after it); what ends a write stuck on a peer that
stopped reading is the connection closing its socket (a protocol error, a resource limit, a
timeout, aclose), which happens before the connection waits for its tasks.

Resources: the connection is given a ConnectionScope (the host's resource manager; unlimited by
default). Every stream, inbound or outbound, must be admitted by it with its receive window
reserved; window growth (auto-tuning) only happens as far as the stream's budget allows; rule
violations and limit hits are reported to it (it logs, counts and may close the connection).
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Protocol

import trio

from ..errors import ConnectionClosed, ProtocolError, StreamReset
from ..logfmt import fmt
from ..streamio import MemoryBudget, ResourceLimitExceeded
from . import yamux

log = logging.getLogger("p2pnode.yamux")
WRITE_BATCH = 256 * 1024
WRITE_TIMEOUT = 60.0


# -- what the connection needs from the resource manager --------------------------------------
class StreamScope(MemoryBudget, Protocol):
    def done(self) -> None:
        """The stream ended: release what it reserved and its slot. Called once."""


class ConnectionScope(Protocol):
    def open_stream(self, inbound: bool, window: int) -> StreamScope | None:
        """Admit a stream, reserving `window` bytes for its receive buffer; None refuses it."""

    def report(self, event: str, detail: str) -> None:
        """Something the peer caused: a rule broken, a limit hit, a timeout (see host.resources)."""


class _Unlimited:
    """The scope of a connection without a resource manager (tests, tools)."""

    def reserve(self, n: int) -> None:
        pass

    def release(self, n: int) -> None:
        pass

    def available(self) -> int:
        return 1 << 62

    def done(self) -> None:
        pass

    def open_stream(self, inbound: bool, window: int) -> StreamScope | None:
        return self

    def report(self, event: str, detail: str) -> None:
        log.debug(fmt(event, detail=detail))


UNLIMITED = _Unlimited()


# -- what a stream needs from its connection ---------------------------------------------------
class StreamTransport(Protocol):
    """The narrow interface a YamuxStream uses; YamuxConnection implements it."""

    @property
    def is_closed(self) -> bool: ...

    def send_window(self, stream_id: int) -> int: ...

    async def send_data(self, stream_id: int, data: memoryview) -> None:
        """Write `data` (at most the send window) as one batch; raises StreamReset if the
        stream went away meanwhile, ConnectionClosed if the connection did."""

    def consumed(self, stream_id: int, n: int) -> None:
        """The application read `n` bytes: grant them back to the peer."""

    def close_write(self, stream_id: int) -> None:
        """Queue FIN."""

    def reset(self, stream_id: int) -> None:
        """Queue RST and forget the stream."""


class YamuxStream(trio.abc.HalfCloseableStream):
    """One multiplexed stream. `protocol` is set once multistream-select agreed on one;
    `budget` accounts what this stream buffers (MessageReader reserves messages against it)."""

    def __init__(self, transport: StreamTransport, stream_id: int, budget: StreamScope):
        self._transport = transport
        self.stream_id = stream_id
        self.budget: MemoryBudget = budget
        self._scope = budget
        self.protocol: str | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._reset = False
        self._closed = False
        self._write_closed = False
        self._done = False
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()
        self._receiving = False
        self._sending = False

    @property
    def connection(self) -> StreamTransport:
        return self._transport

    def unread(self, data: bytes) -> None:
        """Put back bytes read past a negotiation; they are returned first by receive_some."""
        if data:
            self._chunks.appendleft(data)

    # -- called by the connection (not for applications) ---------------------------------------
    def deliver_data(self, data: bytes) -> None:
        if self._closed:
            self._transport.consumed(self.stream_id, len(data))  # nobody will read it; don't stall the peer
            return
        self._chunks.append(data)
        self._readable.unpark_all()

    def deliver_eof(self) -> None:
        self._eof = True
        self._readable.unpark_all()

    def deliver_reset(self) -> None:
        """The peer reset the stream, or the connection is gone: buffered data is dropped."""
        self._reset = True
        self._chunks.clear()
        self._finish()
        self._readable.unpark_all()
        self._writable.unpark_all()

    def wake_writer(self) -> None:
        self._writable.unpark_all()

    def deliver_connection_closed(self) -> None:
        if self._eof:  # it had all its data; only writes fail now
            self.wake_writer()
            self._finish()
        else:
            self.deliver_reset()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._scope.done()

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
                if self._eof or self._transport.is_closed:
                    if self._write_closed:
                        self._finish()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                await self._readable.park()
            chunk = self._chunks.popleft()
            if max_bytes is not None and len(chunk) > max_bytes:
                self._chunks.appendleft(chunk[max_bytes:])
                chunk = chunk[:max_bytes]
            self._transport.consumed(self.stream_id, len(chunk))
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
            if not view:
                await trio.lowlevel.checkpoint()
            while view:
                window = self._check_writable()
                while window == 0:
                    await self._writable.park()
                    window = self._check_writable()
                n = min(window, len(view), WRITE_BATCH)
                await self._transport.send_data(self.stream_id, view[:n])
                view = view[n:]
        finally:
            self._sending = False

    def _check_writable(self) -> int:
        if self._reset:
            raise StreamReset(f"stream {self.stream_id} was reset")
        if self._closed or self._write_closed:
            raise trio.ClosedResourceError("stream is closed for writing")
        if self._transport.is_closed:
            raise ConnectionClosed("connection closed")
        return self._transport.send_window(self.stream_id)

    async def wait_send_all_might_not_block(self) -> None:
        while self._check_writable() == 0:
            await self._writable.park()

    async def send_eof(self) -> None:
        if self._write_closed or self._reset:
            await trio.lowlevel.checkpoint()
            return
        self._write_closed = True
        self._transport.close_write(self.stream_id)
        if self._eof and not self._chunks:
            self._finish()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._write_closed = True
        for chunk in self._chunks:
            self._transport.consumed(self.stream_id, len(chunk))
        self._chunks.clear()
        if not self._reset:
            self._transport.close_write(self.stream_id)
        self._finish()
        self._readable.unpark_all()
        self._writable.unpark_all()
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        """Abort the stream in both directions (RST)."""
        if not self._reset:
            self._reset = True
            self._chunks.clear()
            self._transport.reset(self.stream_id)
            self._finish()
        self._readable.unpark_all()
        self._writable.unpark_all()
        await trio.lowlevel.checkpoint()


class YamuxConnection:
    """A yamux session over a secure channel. `run()` must be running (in the owner's nursery)
    for streams to make progress; it returns when the connection is closed."""

    def __init__(
        self,
        channel: trio.abc.Stream,
        core: yamux.YamuxCore,
        *,
        initial: bytes = b"",
        label: str = "",
        keepalive_interval: float = 30.0,
        keepalive_timeout: float = 20.0,
        scope: ConnectionScope = UNLIMITED,
    ):
        self.channel = channel
        self.core = core
        self.label = label
        self.scope = scope
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self._initial = initial
        self._streams: dict[int, YamuxStream] = {}
        self._send_lock = trio.StrictFIFOLock()
        self._write_broken = False
        self._channel_closed = False
        self._writer_wakeup = trio.Event()
        self._inbound_send, self.inbound = trio.open_memory_channel[YamuxStream](math.inf)
        self._pongs: dict[int, trio.Event] = {}
        self._closed = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
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

    async def wait_idle(self) -> None:
        """Return once no stream is open (or the connection is closed)."""
        await self._idle.wait()

    def _add_stream(self, stream: YamuxStream) -> None:
        self._streams[stream.stream_id] = stream
        if self._idle.is_set():
            self._idle = trio.Event()

    def _drop_stream(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and not self._streams:
            self._idle.set()

    # -- lifetime ------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                try:
                    await self._reader()
                finally:
                    nursery.cancel_scope.cancel()
                    self._mark_closed(self.close_reason or "closed")
                    await self._close_channel()  # ends a shielded write stuck on a peer that stopped reading
        finally:
            self._mark_closed(self.close_reason or "closed")
            await self._close_channel()

    async def _reader(self) -> None:
        data: bytes | bytearray = self._initial
        self._initial = b""
        while True:
            if data:
                try:
                    events = self.core.receive_data(data)
                except ProtocolError as exc:
                    self.scope.report("yamux_protocol_error", str(exc))
                    self.close_reason = f"protocol error: {exc}"
                    self.core.send_go_away(yamux.GO_AWAY_PROTOCOL_ERROR)
                    await self._flush_quietly()
                    return
                for event in events:
                    self._dispatch(event)
                if self.core.has_output:
                    self._kick_writer()
            try:
                data = await self.channel.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.close_reason = self.close_reason or f"read failed: {exc!r}"
                return
            except ProtocolError as exc:  # noise authentication failure
                self.scope.report("secure_channel_error", str(exc))
                self.close_reason = f"secure channel error: {exc}"
                return
            if not data:
                self.close_reason = self.close_reason or "remote closed the connection"
                return

    def _dispatch(self, event: yamux.Event) -> None:
        if isinstance(event, yamux.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.deliver_data(event.data)
            else:
                self.core.consume(event.stream_id, len(event.data), trio.current_time())
        elif isinstance(event, yamux.WindowUpdated):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.wake_writer()
        elif isinstance(event, yamux.StreamOpened):
            scope = self.scope.open_stream(True, self.core.initial_window)
            if scope is None:
                self.core.send_reset(event.stream_id)
                self.scope.report("stream_refused", f"stream {event.stream_id}: resource limit")
                return
            stream = YamuxStream(self, event.stream_id, scope)
            self._add_stream(stream)
            self._inbound_send.send_nowait(stream)
        elif isinstance(event, yamux.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.deliver_eof()
                if not self.core.is_open(event.stream_id):
                    self._drop_stream(event.stream_id)
        elif isinstance(event, yamux.StreamResetByPeer):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                self._drop_stream(event.stream_id)
                stream.deliver_reset()
        elif isinstance(event, yamux.PongReceived):
            waiter = self._pongs.pop(event.opaque, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(event, yamux.StreamRefused):
            if not self.core.go_away_sent:
                self.scope.report("stream_refused", f"stream {event.stream_id}: {event.reason}")
        elif isinstance(event, yamux.GoAwayReceived):
            log.debug(fmt("go_away_received", conn=self.label, code=event.code))

    async def _writer(self) -> None:
        while True:
            await self._writer_wakeup.wait()
            self._writer_wakeup = trio.Event()
            if self.core.has_output:
                try:
                    async with self._send_lock:
                        await self._write_queued()
                except ConnectionClosed:
                    return

    async def _keepalive(self) -> None:
        """Ping at once (the RTT drives window auto-tuning), then every keepalive_interval if > 0."""
        while True:
            try:
                self.last_rtt = await self.ping(timeout=self.keepalive_timeout)
                self.core.rtt = self.last_rtt
            except trio.TooSlowError:
                self.scope.report("keepalive_timeout", f"no pong within {self.keepalive_timeout:g}s")
                self.abort("keepalive timeout")
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
        streams = list(self._streams.values())
        self._streams.clear()
        self._idle.set()
        for stream in streams:
            stream.deliver_connection_closed()
        for waiter in self._pongs.values():
            waiter.set()

    def abort(self, reason: str) -> None:
        """End the connection at once, without go-away (run() then closes the channel)."""
        self.close_reason = self.close_reason or reason
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _close_channel(self) -> None:
        if self._channel_closed:
            await trio.lowlevel.checkpoint()
            return
        self._channel_closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.channel.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def _kick_writer(self) -> None:
        self._writer_wakeup.set()

    # -- StreamTransport: what streams call ------------------------------------------------------
    def send_window(self, stream_id: int) -> int:
        return self.core.send_window(stream_id)

    async def send_data(self, stream_id: int, data: memoryview) -> None:
        async with self._send_lock:
            if self.is_closed or self._write_broken:
                raise ConnectionClosed(f"connection closed: {self.close_reason}")
            if self.core.send_window(stream_id) < len(data):  # the window only shrinks if the stream went away
                raise StreamReset(f"stream {stream_id} was closed or reset while writing")
            self.core.send_data(stream_id, data)
            await self._write_queued()

    def consumed(self, stream_id: int, n: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self.core.consume(stream_id, n, trio.current_time())
        else:
            growth = self.core.consume(stream_id, n, trio.current_time(), stream.budget.available())
            if growth:
                stream.budget.reserve(growth)
        if self.core.has_output:
            self._kick_writer()

    def close_write(self, stream_id: int) -> None:
        self.core.send_close(stream_id)
        if not self.core.is_open(stream_id):
            self._drop_stream(stream_id)
        self._kick_writer()

    def reset(self, stream_id: int) -> None:
        self.core.send_reset(stream_id)
        self._drop_stream(stream_id)
        self._kick_writer()

    # -- writing -----------------------------------------------------------------------------------
    async def _write_queued(self) -> None:
        """Write everything the core has queued; the caller holds the send lock."""
        if self.is_closed or self._write_broken:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        payload = self.core.data_to_send()
        if not payload:
            return
        # A batch of frames is written whole: cancelling the caller half-way would leave the
        # peer with half a Noise frame, and every later byte would reach it as corruption. The
        # caller's cancellation lands at its next checkpoint; a peer that stops reading is
        # bounded by WRITE_TIMEOUT, or by the connection closing its socket.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_TIMEOUT) as timer:
                try:
                    await self.channel.send_all(payload)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._write_broken = True
                    self.abort(f"write failed: {exc or type(exc).__name__}")
                    raise ConnectionClosed(f"connection closed: {self.close_reason}") from None
        if timer.cancelled_caught:
            self._write_broken = True
            self.abort(f"write stalled for {WRITE_TIMEOUT:g}s")
            raise ConnectionClosed(f"connection closed: {self.close_reason}")

    async def _flush_quietly(self) -> None:
        """Best effort before closing (go-away): write what is queued, within a second (a write
        already under way may be stuck on a peer that does not read; closing the socket ends it)."""
        with trio.move_on_after(1) as timer:
            async with self._send_lock:
                payload = self.core.data_to_send()
                if payload and not self._write_broken:
                    try:
                        await self.channel.send_all(payload)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        self._write_broken = True
        if timer.cancelled_caught:
            self._write_broken = True  # perhaps half a frame went out: nothing more may follow

    # -- public API ------------------------------------------------------------------------------
    async def open_stream(self) -> YamuxStream:
        """Open a stream. Raises ConnectionClosed, or ResourceLimitExceeded when the resource
        manager has no room for another stream's receive window."""
        if self.is_closed:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        scope = self.scope.open_stream(False, self.core.initial_window)
        if scope is None:
            raise ResourceLimitExceeded(f"no room for another stream to {self.label}")
        try:
            sid = self.core.open_stream()
        except ProtocolError as exc:
            scope.done()
            raise ConnectionClosed(str(exc)) from None
        stream = YamuxStream(self, sid, scope)
        self._add_stream(stream)
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
        opaque = self.core.send_ping()
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
        self.core.send_go_away(code)
        with trio.CancelScope(shield=True):
            await self._flush_quietly()
            self._mark_closed(self.close_reason)
            self.abort(self.close_reason)
            await self._close_channel()
