"""multistream-select 1.0 as sans-IO cores (connections/README.md of libp2p/specs).

Each message is a uvarint length, UTF-8 text and a trailing newline. The dialer sends the header
and its first proposal at once; the listener echoes an accepted protocol or answers `na`, and
answers `ls` with the protocols it supports. Bytes that arrive after the agreement belong to the
negotiated protocol and are handed back as `trailing`.

Like every transport core: `send_*` queues output, `receive_data(bytes)` returns events (and may
queue replies), `data_to_send()` drains what is queued. The trio driver is `multistream_trio`.
"""

from __future__ import annotations

import abc

from collections.abc import Collection, Sequence

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


def encode_ls_response(protocols: Sequence[str]) -> bytes:
    body = b"".join(encode_line(p) for p in protocols)
    return varint.encode(len(body)) + body


def decode_ls_response(message: bytes) -> list[str]:
    decoder = framing.LengthPrefixedDecoder(MAX_LINE + 1)
    lines = decoder.feed(message)
    if decoder.buffered:
        raise DecodeError("ls response has a truncated entry")
    return [_decode_line(line) for line in lines]


# -- events ---------------------------------------------------------------------------------------
@attrs.frozen
class ProtocolAgreed:
    protocol: str
    trailing: bytes  # bytes received past the agreement: they belong to `protocol`


@attrs.frozen
class ProtocolsListed:
    protocols: list[str]


Event = ProtocolAgreed | ProtocolsListed


class _Core(abc.ABC):
    """What the dialer and the listener share: framing, output, the one outcome."""

    def __init__(self, max_message: int) -> None:
        self._decoder = framing.LengthPrefixedDecoder(max_message)
        self._outbound = bytearray()
        self._got_header = False
        self.result: Event | None = None

    def data_to_send(self) -> bytes:
        out = bytes(self._outbound)
        self._outbound.clear()
        return out

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes; returns [outcome] once there is one, else []. Malformed input raises
        ProtocolError; a negotiation with no common protocol raises NegotiationFailed."""
        if self.result is not None:
            raise ProtocolError("negotiation already finished")
        try:
            message = self._decoder.next_message(data)
            while message is not None:
                if self._on_message(message):
                    assert self.result is not None
                    return [self.result]
                message = self._decoder.next_message()
        except DecodeError as exc:
            raise ProtocolError(f"multistream: {exc}") from None
        return []

    def _header(self, line: str) -> None:
        if line != PROTOCOL_ID:
            raise ProtocolError(f"remote does not speak {PROTOCOL_ID}: {line[:64]!r}")
        self._got_header = True

    @abc.abstractmethod
    def _on_message(self, message: bytes) -> bool:
        """Handle one line; True once there is an outcome (in self.result)."""


class MultistreamDialerCore(_Core):
    """The side that proposes protocols, in order of preference (or asks for `ls`)."""

    def __init__(self, protocols: Sequence[str] = ()):
        super().__init__(MAX_LINE + 1)
        self._protocols = list(protocols)
        self._index = 0
        self._listing = False
        self._sent = False

    def send_proposal(self) -> None:
        """Queue the header and the first proposal (later ones follow each `na` by themselves)."""
        if not self._protocols:
            raise ValueError("at least one protocol must be proposed")
        self._send_first(self._protocols[0])

    def send_ls(self) -> None:
        """Queue the header and `ls`: the outcome is a ProtocolsListed."""
        self._listing = True
        self._decoder = framing.LengthPrefixedDecoder(MAX_LS_RESPONSE)
        self._send_first(LS)

    def _send_first(self, line: str) -> None:
        if self._sent:
            raise ProtocolError("multistream proposal already sent")
        self._sent = True
        self._outbound += encode_line(PROTOCOL_ID) + encode_line(line)

    def _on_message(self, message: bytes) -> bool:
        if not self._got_header:
            self._header(_decode_line(message))
            return False
        if self._listing:
            self.result = ProtocolsListed(decode_ls_response(message))
            return True
        line = _decode_line(message)
        proposed = self._protocols[self._index]
        if line == proposed:
            self.result = ProtocolAgreed(proposed, self._decoder.take_buffered())
            return True
        if line != NA:
            raise ProtocolError(f"unexpected multistream answer {line!r} to {proposed!r}")
        self._index += 1
        if self._index >= len(self._protocols):
            raise NegotiationFailed(f"remote supports none of {self._protocols}")
        self._outbound += encode_line(self._protocols[self._index])
        return False


class MultistreamListenerCore(_Core):
    """The side that answers proposals from the set of protocols it has handlers for."""

    def __init__(self, supported: Collection[str]):
        super().__init__(MAX_LINE + 1)
        self._supported = supported
        self._attempts = 0

    def send_header(self) -> None:
        """Queue our header (the listener speaks first too; answers follow by themselves)."""
        self._outbound += encode_line(PROTOCOL_ID)

    def _on_message(self, message: bytes) -> bool:
        line = _decode_line(message)
        if not self._got_header:
            self._header(line)
        elif line == LS:
            self._outbound += encode_ls_response(sorted(self._supported))
        elif line in self._supported:
            self._outbound += encode_line(line)
            self.result = ProtocolAgreed(line, self._decoder.take_buffered())
            return True
        else:
            self._attempts += 1
            if self._attempts > MAX_ATTEMPTS:
                raise NegotiationFailed(f"remote proposed more than {MAX_ATTEMPTS} unsupported protocols")
            self._outbound += encode_line(NA)
        return False
