"""The CBOR decoder (p2pnode.codec): only our canonical subset, at a cost bounded by the input.

Every input either decodes to a value that re-encodes to exactly the same bytes, or is refused
with a DecodeError; either way the CPU time and the memory it costs are bounded per input byte.
"""

from __future__ import annotations

import struct
import sys
import time
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from p2pnode import codec
from p2pnode.errors import DecodeError

# Generation is slow for the big inputs on a busy machine; what is fuzzed stays the same.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CPU_PER_BYTE = 2e-6  # seconds; the scan measures ~0.07 µs per byte at worst, cbor2 ~0.03
MEMORY_PER_BYTE = codec.MAX_EXPANSION


def head(major: int, arg: int) -> bytes:
    """The shortest CBOR head (major type + argument)."""
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if arg < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, arg)
    raise ValueError(arg)


def _cost(data: bytes, traced: bool = True) -> tuple[Any, float, int]:
    """Decode `data`: (the value or the DecodeError, CPU seconds, traced peak bytes, or the
    deep size of the value when not `traced`: tracemalloc costs ~10 µs per object)."""
    start = time.process_time()
    try:
        result: Any = codec.decode(data)
    except DecodeError as exc:
        result = exc
    cpu = time.process_time() - start
    if not traced:
        return result, cpu, deep_size(result)
    tracemalloc.start()
    try:
        try:
            codec.decode(data)
        except DecodeError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, cpu, peak


def deep_size(value: Any) -> int:
    size, todo, seen = 0, [value], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        size += sys.getsizeof(v)
        if isinstance(v, list):
            todo += v
        elif isinstance(v, dict):
            todo += list(v.keys()) + list(v.values())
    return size


def assert_bounded(data: bytes, traced: bool = True) -> Any:
    result, cpu, peak = _cost(data, traced)
    assert cpu <= 0.02 + CPU_PER_BYTE * len(data), f"{cpu:.3f} s for {len(data)} bytes"
    assert peak <= MEMORY_PER_BYTE * len(data) + 2 * codec.SLACK, f"{peak} bytes of objects for {len(data)} input bytes"
    if not isinstance(result, DecodeError):
        assert codec.encode(result) == data  # accepted means canonical: one encoding per value
        assert codec.scan(data).items <= len(data)
    return result


# -- the rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hexdata,reason",
    [
        ("1801", "shortest form"), ("190017", "shortest form"), ("1a0000ffff", "shortest form"),
        ("1b00000000ffffffff", "shortest form"), ("3817", "shortest form"), ("580100", "shortest form"),
        ("78016161", "shortest form"), ("980100", "shortest form"), ("b8016161f6", "shortest form"),
        ("5f41ff", "indefinite"), ("7f6161ff", "indefinite"), ("9fff", "indefinite"), ("bfff", "indefinite"), ("ff", "break"),
        ("c0", "tag 0"), ("c249010000000000000000", "tag 2"), ("d81c80", "tag 28"), ("d81d00", "tag 29"),
        ("d81900", "tag 25"), ("d9010080", "tag 256"), ("d9d9f700", "tag 55799"),
        ("f7", "simple value 23"), ("e0", "simple value 0"), ("f820", "simple value 32"),
        ("fa3fc00000", "shortest form"), ("fb3ff8000000000000", "shortest form"), ("fb3fb99999a0000000", "shortest form"),
        ("f97e01", "NaN"), ("fa7fc00000", "NaN"), ("fb7ff8000000000000", "NaN"),
        ("fc", "reserved"), ("1c", "reserved"), ("5e", "reserved"),
        ("a10100", "not a text string"), ("a14000", "not a text string"), ("a18000", "not a text string"),
        ("a2616201616100", "canonical order"), ("a2616101616102", "repeated"), ("a2626161006162", "canonical order"),
        ("81" * 17 + "80", "deeper than 16"),
        ("8201", "truncated"), ("6261", "truncated"), ("1901", "truncated"), ("fb00", "truncated"), ("a161", "truncated"),
        ("a16161", "truncated"), ("9a7fffffff", "truncated"), ("", "truncated"),
        ("0000", "trailing bytes"), ("80ff", "trailing bytes"),
    ],
)
def test_refused(hexdata, reason):
    with pytest.raises(DecodeError, match=reason):
        codec.decode(bytes.fromhex(hexdata))


@pytest.mark.parametrize(
    "value",
    [0, 23, 24, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -25, -(2**64), 1.5, 0.1, 1e300, 65504.0, 100000.0, -0.0,
     float("inf"), "", "é", "😀" * 3, b"", b"\x00" * 300, True, False, None, [], {}, {"a": 1, "bb": [1, {"c": None}]}],
)
def test_accepted_and_canonical(value):
    data = codec.encode(value)
    assert codec.decode(data) == value
    assert codec.encode(codec.decode(data)) == data


def test_nan_and_the_depth_limit():
    assert codec.decode(bytes.fromhex("f97e00")) != codec.decode(bytes.fromhex("f97e00"))  # NaN, canonically
    assert codec.scan(b"\x81" * 15 + b"\x80").depth == 16


def test_invalid_utf8_and_decode_map_name_the_message():
    with pytest.raises(DecodeError, match="malformed CBOR"):
        codec.decode(b"\x62\xc3\x28")
    with pytest.raises(DecodeError, match="^push request: malformed CBOR: tag 28"):
        codec.decode_map(b"\xd8\x1c\xa0", "push request")
    with pytest.raises(DecodeError, match="push request must be a CBOR map"):
        codec.decode_map(b"\x80", "push request")


def test_expansion_limit_counts_what_decoding_would_build():
    # 1 byte each: an empty array is ~80 bytes of Python objects, an empty map ~200
    for unit in (b"\x80", b"\xa0", b"\x81\x00", b"\xa1\x60\x00"):
        n = 100_000
        with pytest.raises(DecodeError, match="decoded size would exceed 24 bytes per input byte"):
            codec.decode(head(4, n) + unit * n)
    # a little of it is fine (SLACK), and so are dense scalars: 100,000 small ints
    assert codec.decode(head(4, 50) + b"\x80" * 50) == [[]] * 50
    assert codec.decode(head(4, 100_000) + b"\x00" * 100_000) == [0] * 100_000


# -- the attacks from issue 8 --------------------------------------------------------------------------

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def shared_reference_snapshot(repeats: int = 10_000) -> bytes:
    member = {"peer_id": PEER, "name": "x", "addrs": [f"/ip4/10.0.0.{i}/tcp/4100/ws" for i in range(64)],
              "labels": [f"l{i}" for i in range(64)]}
    rest = codec.encode({"cluster_id": "c", "issued_at": "2026-11-23T12:00:00Z", "issuer_peer_id": PEER, "admin_proof": None})
    members = head(4, repeats) + b"\xd8\x1c" + codec.encode(member) + b"\xd8\x1d\x00" * (repeats - 1)
    return b"\xa5" + codec.encode("members") + members + rest[1:]  # "members" is the first key canonically


ATTACKS = {
    "shared references (28/29)": (shared_reference_snapshot(), "tag 28"),
    "string references (256/25)": (b"\xd9\x01\x00" + head(4, 100_001) + codec.encode("x" * 1024) + b"\xd8\x19\x00" * 100_000, "tag 256"),
    "4 MiB of empty arrays": (b"\x9a\x00\x3f\xff\xfb" + b"\x80" * ((4 << 20) - 5), "decoded size"),
    "4 MiB of empty maps": (b"\x9a\x00\x3f\xff\xfb" + b"\xa0" * ((4 << 20) - 5), "decoded size"),
    "4 MiB of nested arrays": (b"\x81" * ((4 << 20) - 1) + b"\x80", "deeper than 16"),
    "an array announcing 2^64-1 items": (b"\x9b" + b"\xff" * 8, "truncated"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_refused_at_once(name):
    data, reason = ATTACKS[name]
    with pytest.raises(DecodeError, match=reason):
        codec.decode(data)
    result, cpu, peak = _cost(data)
    assert isinstance(result, DecodeError)
    assert cpu < 0.05 and peak < 256 * 1024, (cpu, peak)  # cbor2.loads: up to 2 s and 290 MiB


# -- big legitimate messages ----------------------------------------------------------------------------


def big_messages() -> dict[str, bytes]:
    members = [{"peer_id": PEER[:-5] + f"{i:05d}", "name": f"node-{i:05d}", "labels": ["web", "eu-west", f"rack-{i % 40}"],
                "addrs": [f"/ip4/10.{i >> 8 & 255}.{i & 255}.1/tcp/4100", f"/ip6/2001:db8::{i:x}/tcp/4100",
                          f"/dns4/node-{i:05d}.example.org/tcp/443/wss", f"/ip4/203.0.{i & 255}.7/tcp/4100"]}
               for i in range(10_000)]
    snapshot = codec.encode({"cluster_id": "prod", "issued_at": "2026-11-23T12:00:00Z", "issuer_peer_id": PEER,
                             "members": members, "admin_proof": None})
    envelope = {"type": "membership-snapshot", "payload": snapshot, "signer": b"\x01" * 32, "sig": b"\x02" * 64}
    return {
        "push of a 10,000-member snapshot": codec.encode({"snapshot": envelope, "forwarded_to": [PEER] * 50}),
        "10,000-member snapshot payload": snapshot,
        "index update of 100,000 entries": codec.encode({"folder": "photos", "entries": [
            {"n": f"d{i // 1000:03d}/f{i:06d}.jpg", "s": 1000 + 37 * i, "v": i} for i in range(100_000)]}),
        "4 MiB byte string": codec.encode({"data": b"\xab" * ((4 << 20) - 16)}),
    }


def test_big_legitimate_messages_decode_like_cbor2():
    for name, data in big_messages().items():
        value = assert_bounded(data, traced=False)
        assert value == cbor2.loads(data), name


# -- fuzzing: exceptions, canonical round trips, time and memory -----------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=30), st.binary(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                      max_leaves=30)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def count(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(count(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + count(v) for v in value.values())
    return 1


@FUZZ
@given(values)
def test_fuzz_roundtrip(value):
    data = codec.encode(value)
    if depth(value) > codec.MAX_DEPTH:
        with pytest.raises(DecodeError, match="deeper"):
            codec.decode(data)
        return
    assert codec.decode(data) == value
    assert codec.scan(data).items == count(value)


# Heads with the arguments that matter (0, boundaries, huge counts) and the bytes attackers use.
tokens = st.one_of(
    st.builds(head, st.integers(0, 6), st.sampled_from([0, 1, 2, 5, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])),
    st.sampled_from([b"\x9f", b"\xbf", b"\x5f", b"\xff", b"\xd8\x1c", b"\xd8\x1d\x00", b"\xd9\x01\x00", b"\xd8\x19\x00",
                     b"\xf4", b"\xf6", b"\xf7", b"\xf9\x7e\x00", b"\xfa\x3f\xc0\x00\x00", b"\x80", b"\xa0", b"\x60", b"\x61a", b"\x62ab"]),
    st.binary(min_size=1, max_size=4),
)
streams = st.lists(tokens, max_size=40).map(b"".join)


@FUZZ
@given(st.one_of(st.binary(max_size=300), streams))
def test_fuzz_bytes_bounded(data):
    assert_bounded(data)


@st.composite
def repetitions(draw: st.DrawFn) -> bytes:
    """The shape of every amplification attack: one small unit, many times, in one container."""
    unit = draw(st.one_of(streams, values.map(codec.encode)).filter(lambda u: 0 < len(u) <= 64))
    times = draw(st.integers(1, 100_000 // len(unit)))
    body = unit * times
    if draw(st.booleans()):
        return head(4, times) + body
    keys = [codec.encode(f"k{i:06d}") for i in range(times)]  # a map: distinct, ordered keys
    return head(5, times) + b"".join(k + unit for k in keys)


@settings(FUZZ, max_examples=60)
@given(repetitions())
def test_fuzz_repetition_bounded(data):
    assume(len(data) > 0)
    assert_bounded(data)
