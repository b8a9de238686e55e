"""Multiaddr text and binary codecs."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import DecodeError
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr

PID = KeyPair.generate().peer_id


@pytest.mark.parametrize(
    "text,hexbytes",
    [
        ("/ip4/127.0.0.1/tcp/4100", "047f000001061004"),
        ("/ip6/::1/tcp/80", "2900000000000000000000000000000001060050"),
        ("/ip4/1.2.3.4/tcp/443/ws", "04010203040601bbdd03"),
        ("/ip4/1.2.3.4/tcp/443/wss", "04010203040601bbde03"),
        ("/dns4/example.com/tcp/1", "360b6578616d706c652e636f6d060001"),
        ("/dnsaddr/bootstrap.libp2p.io", "3813626f6f7473747261702e6c69627032702e696f"),
    ],
)
def test_vectors(text, hexbytes):
    # Byte forms as go-multiaddr and js-multiaddr produce them.
    addr = Multiaddr.parse(text)
    assert addr.to_bytes().hex() == hexbytes
    assert Multiaddr.from_bytes(bytes.fromhex(hexbytes)) == addr
    assert str(addr) == text


def test_p2p_component_and_helpers():
    addr = Multiaddr.parse(f"/dns6/node.example/tcp/4101/ws/p2p/{PID}")
    assert addr.peer_id == PID
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert str(addr.without_peer_id()) == "/dns6/node.example/tcp/4101/ws"
    assert addr.without_peer_id().with_peer_id(PID) == addr
    assert Multiaddr.parse(f"/ip4/1.1.1.1/tcp/1/ipfs/{PID}") == Multiaddr.parse(f"/ip4/1.1.1.1/tcp/1/p2p/{PID}")
    assert Multiaddr.parse(f"/dns/x/tcp/1/p2p/{PID.to_cid()}").peer_id == PID


def test_ipv6_canonical_form():
    assert str(Multiaddr.parse("/ip6/0:0:0:0:0:0:0:1/tcp/1")) == "/ip6/::1/tcp/1"


@pytest.mark.parametrize(
    "text,message",
    [
        ("ip4/1.2.3.4", "must start with '/'"),
        ("/", "empty"),
        ("/ip4/1.2.3.4/udp/53", "unknown protocol 'udp'"),
        ("/ip4/300.1.1.1", r"/ip4: invalid value '300.1.1.1'"),
        ("/ip4/1.2.3.4/tcp/70000", r"/tcp: invalid value '70000'"),
        ("/ip4/1.2.3.4/tcp/-1", r"/tcp: invalid value '-1'"),
        ("/ip4/1.2.3.4/tcp", "/tcp needs a value"),
        ("/ip6/1.2.3.4", "/ip6: invalid value"),
        ("/p2p/notapeer", "peer ID"),
    ],
)
def test_errors_name_the_component(text, message):
    with pytest.raises(DecodeError, match=message):
        Multiaddr.parse(text)


@pytest.mark.parametrize(
    "data,message",
    [(b"", "empty"), (b"\x04\x7f\x00", "/ip4 value truncated"), (b"\x91\x02", "unknown protocol code 273"), (b"\x38\x05ab", "truncated")],
)
def test_binary_errors(data, message):
    with pytest.raises(DecodeError, match=message):
        Multiaddr.from_bytes(data)


_component = st.one_of(
    st.ip_addresses(v=4).map(lambda a: f"/ip4/{a}"),
    st.ip_addresses(v=6).map(lambda a: f"/ip6/{a}"),
    st.integers(0, 65535).map(lambda p: f"/tcp/{p}"),
    st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z]{2,5}){1,2}", fullmatch=True).flatmap(
        lambda d: st.sampled_from([f"/dns/{d}", f"/dns4/{d}", f"/dns6/{d}", f"/dnsaddr/{d}"])
    ),
    st.just("/ws"),
    st.just("/wss"),
    st.just(f"/p2p/{PID}"),
)


@given(st.lists(_component, min_size=1, max_size=6))
def test_roundtrip_text_and_binary(parts):
    addr = Multiaddr.parse("".join(parts))
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert Multiaddr.parse(str(addr)) == addr


@given(st.binary(max_size=80))
def test_binary_fuzz_only_decode_errors(data):
    try:
        addr = Multiaddr.from_bytes(data)
    except DecodeError:
        return
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr


@given(st.text(max_size=60))
def test_text_fuzz_only_decode_errors(text):
    try:
        Multiaddr.parse(text)
    except DecodeError:
        pass
