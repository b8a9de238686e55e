"""CBOR for our messages: canonical (deterministic) encoding, and decoding that turns every
malformation into a DecodeError. Sizes are bounded by the framing layer before we get here."""

from __future__ import annotations

from typing import Any

import cbor2

from .errors import DecodeError


def encode(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def decode(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise DecodeError(f"malformed CBOR: {exc}") from None


def decode_map(data: bytes, what: str) -> dict:
    obj = decode(data)
    if not isinstance(obj, dict):
        raise DecodeError(f"{what} must be a CBOR map")
    return obj


class Fields:
    """Typed access to a decoded CBOR map; every failure names the message and the field."""

    def __init__(self, raw: dict, what: str):
        if not isinstance(raw, dict):
            raise DecodeError(f"{what} must be a map")
        self.raw = raw
        self.what = what

    def _get(self, key: str, kind, optional: bool, default=None):
        if key not in self.raw:
            if optional:
                return default
            raise DecodeError(f"{self.what}: missing field {key!r}")
        value = self.raw[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise DecodeError(f"{self.what}: field {key!r} must be {getattr(kind, '__name__', kind)}")
        return value

    def text(self, key: str, optional: bool = False, default: str | None = None, max_len: int = 4096) -> str:
        value = self._get(key, str, optional, default)
        if value is not None and len(value) > max_len:
            raise DecodeError(f"{self.what}: field {key!r} is longer than {max_len}")
        return value

    def integer(self, key: str, optional: bool = False, default: int | None = None) -> int:
        return self._get(key, int, optional, default)

    def number(self, key: str, optional: bool = False, default: float | None = None) -> float:
        value = self._get(key, (int, float), optional, default)
        return float(value) if value is not None else None

    def blob(self, key: str, optional: bool = False) -> bytes | None:
        return self._get(key, bytes, optional)

    def boolean(self, key: str, optional: bool = False, default: bool | None = None) -> bool:
        return self._get(key, bool, optional, default)

    def items(self, key: str, optional: bool = False, max_items: int = 10_000) -> list:
        value = self._get(key, list, optional, [])
        if len(value) > max_items:
            raise DecodeError(f"{self.what}: field {key!r} has more than {max_items} items")
        return value

