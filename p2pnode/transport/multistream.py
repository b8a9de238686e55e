"""multistream-select 1.0 as sans-IO state machines (connections/README.md of libp2p/specs).

Each message is a uvarint length, UTF-8 text and a trailing newline. The dialer sends the header
and its first proposal at once; the listener echoes an accepted protocol or answers `na`, and
answers `ls` with the protocols it supports. Bytes that arrive after the agreement belong to the
negotiated protocol and are handed back as `trailing`.
"""

from __future__ import annotations

import attrs

from .. import framing, varint
from ..errors import DecodeError, NegotiationFailed, ProtocolError

PROTOCOL_ID = "/multistream/1.0.0"
NA = "na"
LS = "ls"
MAX_LINE = 1024  # longest protocol id we accept (go and js use the same order of magnitude)
MAX_LS_RESPONSE = 64 * 1024
MAX_ATTEMPTS = 32  # proposals a listener answers before giving up on the dialer


def encode_line(text: str) -> bytes:
    return framing.encode(text.encode("utf-8") + b"\n")


def _decode_line(message: bytes) -> str:
    if not message.endswith(b"\n"):
        raise ProtocolError("multistream message does not end with a newline")
    try:
        return message[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("multistream message is not UTF-8") from None


def encode_ls_response(protocols: list[str]) -> bytes:
    body = b"".join(encode_line(p) for p in protocols)
    return varint.encode(len(body)) + body


def decode_ls_response(message: bytes) -> list[str]:
    decoder = framing.LengthPrefixedDecoder(MAX_LINE + 1)
    lines = decoder.feed(message)
    if decoder.buffered:
        raise DecodeError("ls response has a truncated entry")
    return [_decode_line(line) for line in lines]


@attrs.frozen
class Agreed:
    protocol: str
    trailing: bytes


@attrs.frozen
class Listed:
    protocols: list[str]


class Dialer:
    """The side that proposes protocols, in order of preference."""

    def __init__(self, protocols: list[str]):
        if not protocols:
            raise ValueError("at least one protocol must be proposed")
        self._protocols = list(protocols)
        self._index = 0
        self._got_header = False
        self._decoder = framing.LengthPrefixedDecoder(MAX_LINE + 1)
        self._outbound = bytearray()
        self._listing = False
        self.result: Agreed | None = None

    def initiate(self) -> bytes:
        return encode_line(PROTOCOL_ID) + encode_line(self._protocols[0])

    @classmethod
    def for_listing(cls) -> Dialer:
        """A dialer that asks the listener which protocols it supports (`ls`)."""
        d = cls(["ls"])
        d._listing = True
        d._decoder = framing.LengthPrefixedDecoder(MAX_LS_RESPONSE)
        return d

    def initiate_listing(self) -> bytes:
        return encode_line(PROTOCOL_ID) + encode_line(LS)

    def data_to_send(self) -> bytes:
        out = bytes(self._outbound)
        self._outbound.clear()
        return out

    def receive_data(self, data: bytes) -> Agreed | Listed | None:
        """Feed bytes; returns the outcome once there is one. Raises NegotiationFailed when all were refused."""
        try:
            return self._receive(data)
        except DecodeError as exc:
            raise ProtocolError(f"multistream: {exc}") from None

    def _receive(self, data: bytes) -> Agreed | Listed | None:
        if self.result is not None:
            raise ProtocolError("negotiation already finished")
        message = self._decoder.next_message(data)
        while message is not None:
            if not self._got_header:
                if _decode_line(message) != PROTOCOL_ID:
                    raise ProtocolError(f"remote does not speak {PROTOCOL_ID}: {message[:64]!r}")
                self._got_header = True
            elif self._listing:
                return Listed(decode_ls_response(message))
            else:
                line = _decode_line(message)
                proposed = self._protocols[self._index]
                if line == proposed:
                    self.result = Agreed(proposed, self._decoder.take_buffered())
                    return self.result
                if line != NA:
                    raise ProtocolError(f"unexpected multistream answer {line!r} to {proposed!r}")
                self._index += 1
                if self._index >= len(self._protocols):
                    raise NegotiationFailed(f"remote supports none of {self._protocols}")
                self._outbound += encode_line(self._protocols[self._index])
            message = self._decoder.next_message()
        return None


class Listener:
    """The side that answers proposals from the set of protocols it has handlers for."""

    def __init__(self, supported: list[str] | tuple[str, ...] | set[str]):
        self._supported = supported
        self._got_header = False
        self._attempts = 0
        self._decoder = framing.LengthPrefixedDecoder(MAX_LINE + 1)
        self._outbound = bytearray()
        self.result: Agreed | None = None

    def initiate(self) -> bytes:
        return encode_line(PROTOCOL_ID)

    def data_to_send(self) -> bytes:
        out = bytes(self._outbound)
        self._outbound.clear()
        return out

    def receive_data(self, data: bytes) -> Agreed | None:
        """Feed bytes; returns the agreement once there is one. Malformed input raises ProtocolError."""
        try:
            return self._receive(data)
        except DecodeError as exc:
            raise ProtocolError(f"multistream: {exc}") from None

    def _receive(self, data: bytes) -> Agreed | None:
        if self.result is not None:
            raise ProtocolError("negotiation already finished")
        message = self._decoder.next_message(data)
        while message is not None:
            line = _decode_line(message)
            if not self._got_header:
                if line != PROTOCOL_ID:
                    raise ProtocolError(f"remote does not speak {PROTOCOL_ID}: {line[:64]!r}")
                self._got_header = True
            elif line == LS:
                self._outbound += encode_ls_response(sorted(self._supported))
            elif line in self._supported:
                self._outbound += encode_line(line)
                self.result = Agreed(line, self._decoder.take_buffered())
                return self.result
            else:
                self._attempts += 1
                if self._attempts > MAX_ATTEMPTS:
                    raise NegotiationFailed(f"remote proposed more than {MAX_ATTEMPTS} unsupported protocols")
                self._outbound += encode_line(NA)
            message = self._decoder.next_message()
        return None
