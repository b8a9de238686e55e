"""A minimal protobuf wire-format codec for the few libp2p messages we exchange.

Only varint (type 0) and length-delimited (type 2) fields are produced; fixed-width
fields are skipped on decode so newer peers can add fields without breaking us.
"""

from collections.abc import Iterable

from . import varint
from .errors import DecodeError

VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5


def encode_fields(fields: Iterable[tuple[int, int | bytes | str]]) -> bytes:
    """Encode (field_number, value) pairs in order: int → varint, bytes/str → length-delimited."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, bool) or isinstance(value, int):
            out += varint.encode(number << 3 | VARINT)
            out += varint.encode(int(value))
        else:
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            out += varint.encode(number << 3 | LEN)
            out += varint.encode(len(raw))
            out += raw
    return bytes(out)


def decode_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Decode a message into (field_number, value) pairs; unknown wire types are an error."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = varint.decode_complete(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("protobuf field number 0 is invalid")
        if wire_type == VARINT:
            value, pos = varint.decode_complete(data, pos)
            fields.append((number, value))
        elif wire_type == LEN:
            length, pos = varint.decode_complete(data, pos)
            if pos + length > end:
                raise DecodeError(f"protobuf field {number} runs past the end of the message")
            fields.append((number, bytes(data[pos : pos + length])))
            pos += length
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise DecodeError(f"protobuf field {number} truncated")
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise DecodeError(f"protobuf field {number} truncated")
            pos += 4
        else:
            raise DecodeError(f"protobuf wire type {wire_type} (field {number}) is not supported")
    return fields


def first(fields: list[tuple[int, int | bytes]], number: int, kind: type) -> object | None:
    """The first value of `number`, checked to be of `kind` (bytes or int)."""
    for n, value in fields:
        if n == number:
            if not isinstance(value, kind):
                raise DecodeError(f"protobuf field {number} has the wrong wire type")
            return value
    return None


def repeated(fields: list[tuple[int, int | bytes]], number: int) -> list[bytes]:
    values = []
    for n, value in fields:
        if n == number:
            if not isinstance(value, bytes):
                raise DecodeError(f"protobuf field {number} has the wrong wire type")
            values.append(value)
    return values
