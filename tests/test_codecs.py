"""varint, multibase, protobuf and length-prefixed framing: vectors, round trips, fuzzing."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode import framing, multibase, protobuf, varint
from p2pnode.errors import DecodeError, MessageTooLarge


@pytest.mark.parametrize(
    "value,encoded",
    [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (255, b"\xff\x01"), (300, b"\xac\x02"), (16384, b"\x80\x80\x01")],
)
def test_varint_vectors(value, encoded):
    assert varint.encode(value) == encoded
    assert varint.decode(encoded) == (value, len(encoded))


def test_varint_rejects_overlong_and_non_minimal():
    with pytest.raises(DecodeError, match="longer than 9"):
        varint.decode(b"\xff" * 10)
    with pytest.raises(DecodeError, match="minimally"):
        varint.decode(b"\x81\x00")
    assert varint.decode(b"\x80") is None  # truncated: wait for more


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_roundtrip(value):
    assert varint.decode(varint.encode(value)) == (value, len(varint.encode(value)))


@given(st.binary(max_size=20))
def test_varint_fuzz_never_crashes(data):
    try:
        result = varint.decode(data)
    except DecodeError:
        return
    if result is not None:
        value, end = result
        assert varint.encode(value) == data[:end]


@given(st.binary(max_size=64))
def test_base58_roundtrip(data):
    assert multibase.b58decode(multibase.b58encode(data)) == data


def test_base58_rejects_bad_character():
    with pytest.raises(DecodeError, match="base58btc character '0'"):
        multibase.b58decode("10")


def test_protobuf_encode_decode():
    data = protobuf.encode_fields([(1, 1), (2, b"abc"), (3, "x"), (3, "y")])
    fields = protobuf.decode_fields(data)
    assert protobuf.first(fields, 1, int) == 1
    assert protobuf.first(fields, 2, bytes) == b"abc"
    assert protobuf.repeated(fields, 3) == [b"x", b"y"]
    with pytest.raises(DecodeError, match="wrong wire type"):
        protobuf.first(fields, 1, bytes)


@pytest.mark.parametrize(
    "data,message",
    [(b"\x0a\x05ab", "runs past the end"), (b"\x0b", "wire type 3"), (b"\x02\x00", "field number 0"), (b"\x0d\x00", "truncated")],
)
def test_protobuf_malformed(data, message):
    with pytest.raises(DecodeError, match=message):
        protobuf.decode_fields(data)


@given(st.binary(max_size=200))
def test_protobuf_fuzz_only_decode_errors(data):
    try:
        protobuf.decode_fields(data)
    except DecodeError:
        pass


def test_framing_split_across_feeds_and_many_per_feed():
    decoder = framing.LengthPrefixedDecoder(100)
    wire = framing.encode(b"hello") + framing.encode(b"") + framing.encode(b"x" * 100)
    out = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == [b"hello", b"", b"x" * 100]
    assert decoder.feed(wire) == [b"hello", b"", b"x" * 100]


def test_framing_refuses_oversized_before_body_arrives():
    decoder = framing.LengthPrefixedDecoder(1024)
    with pytest.raises(MessageTooLarge, match="1025 bytes exceeds the maximum of 1024"):
        decoder.feed(varint.encode(1025))  # only the prefix: refused without buffering a body


@given(st.lists(st.binary(max_size=300), max_size=10), st.integers(min_value=1, max_value=50))
def test_framing_roundtrip_any_chunking(messages, step):
    wire = b"".join(framing.encode(m) for m in messages)
    decoder = framing.LengthPrefixedDecoder(300)
    out = []
    for i in range(0, len(wire), step):
        out += decoder.feed(wire[i : i + step])
    assert out == messages


@given(st.binary(max_size=100))
def test_framing_fuzz(data):
    decoder = framing.LengthPrefixedDecoder(64)
    try:
        for message in decoder.feed(data):
            assert len(message) <= 64
    except DecodeError:
        pass
