"""CBOR for our messages: canonical encoding, and a decoder that accepts only the canonical,
tag-free subset our messages are made of, at a cost bounded by the input's length.

Decoding is two steps. `scan` walks the bytes once without building anything and refuses
whatever our encoder never produces or whose decoded form would cost far more than its bytes;
only then does cbor2's native decoder build the objects. The rules (RFC 8949 terms):

- definite lengths only (no indefinite strings, arrays or maps, no "break");
- no tags at all: this refuses shared references (28/29), string references (25/256),
  bignums, dates — every one of them; our messages carry none;
- simple values only false, true and null; floats in their shortest exact width (NaN only as
  f97e00), as `encode` writes them;
- integers and lengths in their shortest form; map keys text strings in strictly increasing
  canonical (bytewise) order, so a key can never appear twice;
- nesting at most MAX_DEPTH containers deep; exactly one item, no trailing bytes;
- the Python objects decoding would build are estimated while scanning (containers, their slots,
  strings, integers, floats); more than MAX_EXPANSION bytes per input byte read so far (plus
  SLACK) is refused before anything is built. One CBOR byte can be an empty array worth 80
  bytes of Python objects; our real messages estimate at 1 to 14 (a 10,000-member snapshot 6,
  an index of 100,000 small entries 14, a byte string 1).

Every byte costs one step of the scan at most, and the decoded objects at most
MAX_EXPANSION × len(data) + SLACK bytes (estimated; tests/test_cbor.py measures the real peak).
Sizes are bounded by the framing layer (and each protocol's limit) before we get here.
"""

from __future__ import annotations

import struct
from typing import Any, Literal, cast, overload

import attrs
import cbor2

from .errors import DecodeError

MAX_DEPTH = 16
MAX_EXPANSION = 24
SLACK = 64 * 1024

# Estimated CPython (3.11, 64-bit) sizes, GC header included, of what cbor2 builds.
_LIST = 72
_LIST_SLOT = 8  # per element
_DICT = 160
_DICT_SLOT = 48  # per entry: the hash table's share, amortised
_STR = 56  # + length (strings of 0 or 1 ASCII/latin-1 character are shared singletons)
_BYTES = 40  # + length (b"" and 1-byte strings are shared singletons)
_INT = 32  # integers outside CPython's small-int cache (-5..256)
_FLOAT = 24


def _tables() -> tuple[bytes, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Per initial byte: the whole size of an item that needs no more inspection (0: the slow
    path decides), and the estimated cost of the object it decodes to, alone, as an array
    element and as a map entry's value (with the entry's slot)."""
    size = [0] * 256
    cost = [0] * 256
    for ib in range(256):
        major, info = ib >> 5, ib & 31
        if major == 0 and info < 24:
            size[ib] = 1
        elif major == 1 and info < 24:
            size[ib] = 1
            cost[ib] = 0 if info < 5 else _INT
        elif major == 2 and info < 24:
            size[ib] = 1 + info
            cost[ib] = 0 if info < 2 else _BYTES + info
        elif major == 3 and info < 24:
            size[ib] = 1 + info
            cost[ib] = 0 if info < 2 else _STR + info
        elif ib in (0xF4, 0xF5, 0xF6):  # false, true, null
            size[ib] = 1
    return bytes(size), tuple(cost), tuple(c + _LIST_SLOT for c in cost), tuple(c + _DICT_SLOT for c in cost)


_LEAF_SIZE, _COST_TOP, _COST_IN_LIST, _COST_IN_DICT = _tables()


@attrs.frozen
class Shape:
    """What `scan` found: items visited, deepest nesting, estimated bytes of decoded objects."""

    items: int
    depth: int
    estimated_bytes: int


def _fail(reason: str, pos: int) -> DecodeError:
    return DecodeError(f"malformed CBOR: {reason} at byte {pos}")


def _check_float(info: int, raw: bytes, pos: int) -> None:
    """Floats must be in the shortest width that holds the value exactly (NaN: f97e00)."""
    if info == 25:
        value = struct.unpack(">e", raw)[0]
        if value != value and raw != b"\x7e\x00":
            raise _fail("non-canonical NaN", pos)
        return
    value = struct.unpack(">f" if info == 26 else ">d", raw)[0]
    if value != value:
        raise _fail("non-canonical NaN", pos)
    for fmt in (">e",) if info == 26 else (">e", ">f"):
        try:
            narrower = struct.unpack(fmt, struct.pack(fmt, value))[0]
        except (OverflowError, struct.error):
            continue
        if narrower == value:
            raise _fail("float not in its shortest form", pos)


_SHORTEST = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}  # smallest argument each width may carry


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the item at `pos`, for the slow path:
    refuses indefinite lengths, reserved values and integers not in their shortest form."""
    ib = data[pos]
    major, info = ib >> 5, ib & 31
    if info < 24:
        return major, info, pos + 1
    if info < 28:
        width = 1 << (info - 24)
        end = pos + 1 + width
        if end > len(data):
            raise IndexError
        arg = int.from_bytes(data[pos + 1 : end], "big")
        if major != 7 and arg < _SHORTEST[info]:
            raise _fail("integer or length not in its shortest form", pos)
        return major, arg, end
    if info == 31:
        raise _fail("indefinite length or break", pos)
    raise _fail(f"reserved additional information {info}", pos)


def scan(data: bytes, *, max_depth: int = MAX_DEPTH, max_expansion: int = MAX_EXPANSION) -> Shape:
    """Check that `data` is one item of our canonical CBOR subset (see the module docstring),
    without building it. Raises DecodeError saying what is wrong and where.

    One loop over the bytes, written for CPython's speed: the head of each item is decoded
    inline for the common cases, and `IndexError` from reading past the end means truncated."""
    data = bytes(data)
    n = len(data)
    leaf_size = _LEAF_SIZE
    top_cost, in_list, in_dict = _COST_TOP, _COST_IN_LIST, _COST_IN_DICT
    list_cost, dict_cost, int_cost, str_cost, bytes_cost = _LIST, _DICT, _INT, _STR, _BYTES
    budget = SLACK
    pos = items = est = depth = deepest = 0
    # The innermost open container: entries left (map entries count once), whether it is a map,
    # the cost table of its children, its last key. Enclosing ones wait on the stack.
    todo, in_map, cost, prev_key = 1, False, top_cost, b""
    stack: list[tuple[int, bool, tuple[int, ...], bytes]] = []
    try:
        while True:
            if not todo:
                if not depth:
                    break
                todo, in_map, cost, prev_key = stack.pop()
                depth -= 1
                continue
            todo -= 1
            if in_map:
                ib = data[pos]
                if 0x60 <= ib <= 0x77:  # the usual short key
                    end = pos + ib - 0x5F
                    est += top_cost[ib]
                elif 0x78 <= ib <= 0x7B:
                    _, length, end = _head(data, pos)
                    end += length
                    est += str_cost + length
                else:
                    raise _fail("map key is not a text string", pos)
                key = data[pos:end]
                if key <= prev_key:
                    raise _fail("map keys repeated or not in canonical order", pos)
                prev_key = key
                pos = end
            ib = data[pos]
            size = leaf_size[ib]
            if size:
                pos += size
                est += cost[ib]
                continue
            start = pos
            major = ib >> 5
            info = ib & 31
            if info < 24:
                arg = info
                pos += 1
            elif major == 7:
                if ib in (0xF9, 0xFA, 0xFB):
                    pos += 1 + (1 << (info - 24))
                    if pos > n:
                        raise IndexError
                    _check_float(info, data[start + 1 : pos], start)
                    est += _FLOAT + cost[0]
                    continue
                if info == 24:
                    raise _fail(f"simple value {data[pos + 1]} is not allowed", start)
                raise _fail("indefinite length or break" if info == 31 else f"reserved additional information {info}", start)
            elif info == 24:
                arg = data[pos + 1]
                pos += 2
                if arg < 24:
                    raise _fail("integer or length not in its shortest form", start)
            elif info == 25:
                arg = data[pos + 1] << 8 | data[pos + 2]  # IndexError if truncated
                pos += 3
                if arg < 256:
                    raise _fail("integer or length not in its shortest form", start)
            elif info == 26:
                arg = int.from_bytes(data[pos + 1 : pos + 5], "big")
                pos += 5
                if pos > n:
                    raise IndexError
                if arg < 65536:
                    raise _fail("integer or length not in its shortest form", start)
            else:
                major, arg, pos = _head(data, pos)
            if major < 2:
                est += (0 if major == 0 and arg <= 256 else int_cost) + cost[0]
            elif major < 4:
                pos += arg
                est += (str_cost if major == 3 else bytes_cost) + arg + cost[0]
            elif major < 6:
                if depth == max_depth:
                    raise _fail(f"nesting deeper than {max_depth}", start)
                if (arg if major == 4 else 2 * arg) > n - pos:
                    raise IndexError  # every item takes at least one byte
                est += (list_cost if major == 4 else dict_cost) + cost[0]
                if est > max_expansion * pos + budget:
                    raise _fail(f"decoded size would exceed {max_expansion} bytes per input byte", start)
                stack.append((todo, in_map, cost, prev_key))
                depth += 1
                if depth > deepest:
                    deepest = depth
                if major == 4:
                    items += arg
                    todo, in_map, cost = arg, False, in_list
                else:
                    items += 2 * arg
                    todo, in_map, cost, prev_key = arg, True, in_dict, b""
            elif major == 6:
                raise _fail(f"tag {arg} is not allowed", start)
            else:
                raise _fail(f"simple value {arg} is not allowed", start)
    except IndexError:
        raise _fail("truncated", n) from None
    if pos > n:
        raise _fail("truncated", n)
    if pos < n:
        raise _fail("trailing bytes after the item", pos)
    if est > max_expansion * n + budget:
        raise _fail(f"decoded size would exceed {max_expansion} bytes per input byte", n)
    return Shape(items + 1, deepest, est)


def encode(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def decode(data: bytes) -> Any:
    """Decode one message; anything outside our canonical subset is a DecodeError (see `scan`)."""
    scan(data)
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise DecodeError(f"malformed CBOR: {exc}") from None


def decode_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = decode(data)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"{what} must be a CBOR map")
    return obj


class Fields:
    """Typed access to a decoded CBOR map; every failure names the message and the field."""

    def __init__(self, raw: object, what: str):
        if not isinstance(raw, dict):
            raise DecodeError(f"{what} must be a map")
        self.raw: dict[str, Any] = raw
        self.what = what

    def _get(self, key: str, kind: type | tuple[type, ...], optional: bool, default: object = None) -> Any:
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
        return cast(str, value)

    def integer(self, key: str, optional: bool = False, default: int | None = None) -> int:
        return cast(int, self._get(key, int, optional, default))

    def number(self, key: str, optional: bool = False, default: float | None = None) -> float | None:
        value = self._get(key, (int, float), optional, default)
        return float(value) if value is not None else None

    @overload
    def blob(self, key: str, optional: Literal[False] = False) -> bytes: ...
    @overload
    def blob(self, key: str, optional: bool) -> bytes | None: ...
    def blob(self, key: str, optional: bool = False) -> bytes | None:
        return cast("bytes | None", self._get(key, bytes, optional))

    def boolean(self, key: str, optional: bool = False, default: bool | None = None) -> bool:
        return cast(bool, self._get(key, bool, optional, default))

    def items(self, key: str, optional: bool = False, max_items: int = 10_000) -> list[Any]:
        value: list[Any] = self._get(key, list, optional, [])
        if len(value) > max_items:
            raise DecodeError(f"{self.what}: field {key!r} has more than {max_items} items")
        return value
