"""Ed25519 identities, peer IDs (spec vectors), key files."""

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import DecodeError
from p2pnode.identity import KeyFileError, KeyPair, PeerId, PublicKey, load_key, load_or_create_key, save_key

# peer-ids/peer-ids.md "Test vectors" (libp2p/specs)
SPEC_PRIVATE = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PUBLIC = bytes.fromhex("080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")


def test_spec_vector_private_key_gives_public_key():
    key = KeyPair.from_protobuf(SPEC_PRIVATE)
    assert key.public_key.to_protobuf() == SPEC_PUBLIC
    assert key.to_protobuf() == SPEC_PRIVATE


def test_peer_id_text_forms():
    key = KeyPair.from_protobuf(SPEC_PRIVATE)
    pid = key.peer_id
    assert pid.multihash == b"\x00\x24" + SPEC_PUBLIC  # identity multihash of the 36-byte key
    text = pid.to_base58()
    assert text.startswith("12D3KooW")
    assert PeerId.from_string(text) == pid
    cid = pid.to_cid()
    assert cid.startswith("bafz")
    assert PeerId.from_string(cid) == pid
    assert pid.extract_public_key() == key.public_key


def test_peer_id_parses_sha256_form():
    # A go-ipfs RSA-style ID (sha2-256 multihash): parseable, but no inline key.
    pid = PeerId.from_string("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
    assert pid.extract_public_key() is None


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty"),
        ("12D3KooW0", "base58btc character"),
        ("xyz", "neither base58btc nor"),
        ("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi", "libp2p-key"),
    ],
)
def test_peer_id_errors(text, message):
    with pytest.raises(DecodeError, match=message):
        PeerId.from_string(text)


@given(st.binary(max_size=60))
def test_peer_id_fuzz(data):
    try:
        pid = PeerId.from_bytes(data)
    except DecodeError:
        return
    assert PeerId.from_string(pid.to_base58()) == pid


def test_signatures_verify_and_forgeries_fail():
    key = KeyPair.generate()
    sig = key.sign(b"message")
    assert key.public_key.verify(b"message", sig)
    assert not key.public_key.verify(b"messagE", sig)
    assert not KeyPair.generate().public_key.verify(b"message", sig)
    assert not key.public_key.verify(b"message", b"short")


def test_only_ed25519_public_keys():
    rsa_like = bytes.fromhex("080012020102")
    with pytest.raises(DecodeError, match="RSA public keys are not supported"):
        PublicKey.from_protobuf(rsa_like)


def test_key_file_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "sub" / "node.key"
    key, created = load_or_create_key(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_key(path)
    assert not created_again
    assert again.peer_id == key.peer_id


def test_key_file_created_0600_despite_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        save_key(tmp_path / "k", KeyPair.generate())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KeyPair.generate())
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="mode 0640.*chmod 600"):
        load_key(path)


def test_corrupt_key_file_is_a_clear_error(tmp_path):
    path = tmp_path / "node.key"
    path.write_bytes(b"garbage")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a valid Ed25519 key"):
        load_key(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("12D3KooWbogus", "invalid peer ID '12D3KooWbogus': a 12D3KooW… peer ID has 52 characters, this one has 13; "
                          "check that it was copied whole"),
        ("12D3KooWGzh3Wv5aKu1EhUvkuBiTo7QbDr3D7HR2Ki7TbeMmsG3E1", "this one has 53"),
        ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5", "a Qm… peer ID has 46 characters, this one has 45"),
        ("1111", "invalid peer ID '1111': truncated or corrupted"),
    ],
)
def test_malformed_peer_id_is_a_plain_error(text, message):
    with pytest.raises(DecodeError) as info:
        PeerId.from_string(text)
    assert message in str(info.value)
    assert "multihash length" not in str(info.value)


def test_malformed_peer_id_in_a_multiaddr_is_a_plain_error():
    from p2pnode.multiaddr import Multiaddr

    with pytest.raises(DecodeError, match=r"^multiaddr /p2p: invalid peer ID '12D3KooWbogus': a 12D3KooW… peer ID has 52 characters"):
        Multiaddr.parse("/ip4/127.0.0.1/tcp/4100/p2p/12D3KooWbogus")
