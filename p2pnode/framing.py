"""Unsigned-varint length-prefixed messages with a hard maximum size (sans-IO).

Every /p2pnode/... protocol, identify and multistream use this framing. The maximum is checked
as soon as the length prefix is complete, so an oversized frame is refused before its body is
buffered.
"""

from __future__ import annotations

from . import varint
from .errors import DecodeError, MessageTooLarge

DEFAULT_MAX_MESSAGE = 1 << 20  # 1 MiB, see protocols/README.md


def encode(message: bytes) -> bytes:
    return varint.encode(len(message)) + message


class LengthPrefixedDecoder:
    """Feed bytes, get complete messages. Raises MessageTooLarge / DecodeError on bad input."""

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE):
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        self._buf += data
        messages: list[bytes] = []
        pos = 0
        buf = self._buf
        while True:
            header = varint.decode(buf, pos)
            if header is None:
                break
            length, body_start = header
            if length > self.max_size:
                raise MessageTooLarge(f"message of {length} bytes exceeds the maximum of {self.max_size}")
            if len(buf) - body_start < length:
                break
            messages.append(bytes(buf[body_start : body_start + length]))
            pos = body_start + length
        if pos:
            del buf[:pos]
        return messages

    def next_message(self, data: bytes | bytearray = b"") -> bytes | None:
        """Feed `data` and return at most one message, leaving the rest buffered."""
        self._buf += data
        header = varint.decode(self._buf, 0)
        if header is None:
            return None
        length, body_start = header
        if length > self.max_size:
            raise MessageTooLarge(f"message of {length} bytes exceeds the maximum of {self.max_size}")
        if len(self._buf) - body_start < length:
            return None
        message = bytes(self._buf[body_start : body_start + length])
        del self._buf[: body_start + length]
        return message

    def take_buffered(self) -> bytes:
        """Bytes received past the last message (handed to whatever protocol comes next)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def pending_length(self) -> int | None:
        """The length the next, still incomplete, message announced (None until its prefix is complete)."""
        header = varint.decode(self._buf, 0)
        return header[0] if header is not None else None


__all__ = ["DecodeError", "MessageTooLarge", "LengthPrefixedDecoder", "encode", "DEFAULT_MAX_MESSAGE"]
