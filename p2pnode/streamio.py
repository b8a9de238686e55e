"""Reading and writing on trio streams: read sizes, buffered reads, exact byte counts,
length-prefixed messages, and the memory budget a stream may carry.

A stream that holds a `budget` (the host's streams do) has every message a MessageReader
buffers reserved against it at the length its prefix announces, before the body is read; a
peer that announces more than the budget allows gets ResourceLimitExceeded at once.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import trio

from . import framing
from .errors import P2PNodeError, ProtocolError

RECEIVE_SIZE = 256 * 1024  # bytes asked of a socket (or secure channel) per read
MESSAGE_READ_SIZE = 64 * 1024


class ResourceLimitExceeded(P2PNodeError):
    """A limit of the resource manager was reached: the stream or connection is refused."""


class MemoryBudget(Protocol):
    """Where buffered bytes are accounted; the host's resource manager implements it."""

    def reserve(self, n: int) -> None:
        """Account `n` more bytes, or raise ResourceLimitExceeded (nothing is then reserved)."""

    def release(self, n: int) -> None: ...

    def available(self) -> int:
        """Bytes that can still be reserved without reaching any limit."""


@runtime_checkable
class BudgetedStream(Protocol):
    budget: MemoryBudget


def take(pending: bytes, max_bytes: int | None) -> tuple[bytes, bytes]:
    """Split buffered bytes into what receive_some(max_bytes) returns and what stays buffered."""
    if max_bytes is None or len(pending) <= max_bytes:
        return pending, b""
    return pending[:max_bytes], pending[max_bytes:]


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise ProtocolError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def send_message(stream: trio.abc.SendStream, message: bytes, max_size: int = framing.DEFAULT_MAX_MESSAGE) -> None:
    if len(message) > max_size:
        raise ValueError(f"message of {len(message)} bytes exceeds the maximum of {max_size}")
    await stream.send_all(framing.encode(message))


class MessageReader:
    """Reads uvarint-prefixed messages from a stream, never buffering more than one frame's worth
    beyond `max_size`; an oversized prefix raises MessageTooLarge before the body is read.

    If the stream carries a budget, each message is reserved at its announced length as soon as
    the prefix is complete and released when the message is returned."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_size: int = framing.DEFAULT_MAX_MESSAGE):
        self._stream = stream
        self._decoder = framing.LengthPrefixedDecoder(max_size)
        self._budget = stream.budget if isinstance(stream, BudgetedStream) else None
        self._reserved = 0

    async def next(self) -> bytes | None:
        """The next message, or None at a clean end of stream (between messages)."""
        message = self._next_buffered()
        while message is None:
            data = await self._stream.receive_some(MESSAGE_READ_SIZE)
            if not data:
                if self._decoder.buffered:
                    raise ProtocolError("stream ended in the middle of a message")
                return None
            message = self._next_buffered(data)
        return message

    def _next_buffered(self, data: bytes | bytearray = b"") -> bytes | None:
        message = self._decoder.next_message(data)
        if message is not None:
            self._release()
            return message
        if self._budget is not None and not self._reserved:
            pending = self._decoder.pending_length
            if pending:
                self._budget.reserve(pending)
                self._reserved = pending
        return None

    def _release(self) -> None:
        if self._reserved and self._budget is not None:
            self._budget.release(self._reserved)
        self._reserved = 0

    async def one(self) -> bytes:
        message = await self.next()
        if message is None:
            raise ProtocolError("stream ended before a message arrived")
        return message
