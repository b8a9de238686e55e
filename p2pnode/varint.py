"""Unsigned varint (multiformats uvarint / protobuf base-128) encoding and decoding."""

from .errors import DecodeError

MAX_VARINT_BYTES = 9  # multiformats caps uvarints at 9 bytes (63 bits)


def encode(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"uvarint cannot encode negative value {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode one uvarint at `offset`.

    Returns (value, new_offset), or None if the data ends before the varint does.
    Raises DecodeError for a varint longer than 9 bytes or one not minimally encoded.
    """
    value = 0
    shift = 0
    pos = offset
    end = len(data)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and pos - offset > 1:
                raise DecodeError("uvarint is not minimally encoded")
            return value, pos
        shift += 7
        if pos - offset >= MAX_VARINT_BYTES:
            raise DecodeError(f"uvarint longer than {MAX_VARINT_BYTES} bytes")
    return None


def decode_complete(data: bytes, offset: int = 0) -> tuple[int, int]:
    """Like decode() but a truncated varint is an error."""
    result = decode(data, offset)
    if result is None:
        raise DecodeError("truncated uvarint")
    return result
