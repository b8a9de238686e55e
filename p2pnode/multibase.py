"""The two multibase alphabets libp2p text forms use: base58btc (peer IDs) and base32 lower (CIDs)."""

import base64
import binascii

from .errors import DecodeError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    num = int.from_bytes(data, "big")
    out = []
    while num:
        num, rem = divmod(num, 58)
        out.append(_B58[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    num = 0
    for ch in text:
        try:
            num = num * 58 + _B58_INDEX[ch]
        except KeyError:
            raise DecodeError(f"invalid base58btc character {ch!r}") from None
    zeros = len(text) - len(text.lstrip("1"))
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    return b"\0" * zeros + body


def b32encode_lower(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode_lower(text: str) -> bytes:
    if text != text.lower():
        raise DecodeError("base32 multibase 'b' must be lower case")
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded)
    except (ValueError, binascii.Error) as exc:
        raise DecodeError(f"invalid base32: {exc}") from None
