"""Reading and writing length-prefixed messages and exact byte counts on trio streams."""

from __future__ import annotations

import trio

from . import framing
from .errors import ProtocolError


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
    beyond `max_size`; an oversized prefix raises MessageTooLarge before the body is read."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_size: int = framing.DEFAULT_MAX_MESSAGE):
        self._stream = stream
        self._decoder = framing.LengthPrefixedDecoder(max_size)

    async def next(self) -> bytes | None:
        """The next message, or None at a clean end of stream (between messages)."""
        message = self._decoder.next_message()
        while message is None:
            data = await self._stream.receive_some(64 * 1024)
            if not data:
                if self._decoder.buffered:
                    raise ProtocolError("stream ended in the middle of a message")
                return None
            message = self._decoder.next_message(data)
        return message

    async def one(self) -> bytes:
        message = await self.next()
        if message is None:
            raise ProtocolError("stream ended before a message arrived")
        return message
