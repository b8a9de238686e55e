"""Noise XX sans-IO core: handshake, identity binding, tampering, framing, the spec vector file."""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import HandshakeError, PeerIdMismatch, ProtocolError
from p2pnode.identity import KeyPair
from p2pnode.transport import noise

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors" / "noise-xx.json"
sys.path.insert(0, str(VECTORS.parent))
import make_noise_vector  # noqa: E402


def completed(events):
    """The HandshakeCompleted among `events`, if any."""
    return next((e for e in events if isinstance(e, noise.HandshakeCompleted)), None)


def plaintext(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, noise.DataReceived))


def encrypt(core: noise.NoiseCore, data: bytes) -> bytes:
    core.send_data(data)
    return core.data_to_send()


def handshake(init: noise.NoiseCore, resp: noise.NoiseCore):
    init.send_handshake()
    resp.receive_data(init.data_to_send())
    done_i = completed(init.receive_data(resp.data_to_send()))
    done_r = completed(resp.receive_data(init.data_to_send()))
    return done_i, done_r


def test_handshake_authenticates_both_sides_and_carries_data():
    a, b = KeyPair.generate(), KeyPair.generate()
    init = noise.NoiseCore(a, initiator=True, expected_peer=b.peer_id)
    resp = noise.NoiseCore(b, initiator=False)
    done_i, done_r = handshake(init, resp)
    assert done_i.remote_peer == b.peer_id and done_r.remote_peer == a.peer_id
    big = bytes(range(256)) * 1000  # 256000 bytes: more than one Noise frame
    wire = encrypt(init, big)
    assert _frame_lengths(wire) == [65535, 65535, 65535, 256000 - 3 * 65519 + 16]
    assert plaintext(resp.receive_data(wire)) == big
    assert plaintext(init.receive_data(encrypt(resp, b"pong"))) == b"pong"


def _frame_lengths(wire: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(wire):
        n = int.from_bytes(wire[pos : pos + 2], "big")
        out.append(n)
        pos += 2 + n
    return out


def test_byte_at_a_time_delivery():
    a, b = KeyPair.generate(), KeyPair.generate()
    init, resp = noise.NoiseCore(a, initiator=True), noise.NoiseCore(b, initiator=False)
    init.send_handshake()
    for byte in init.data_to_send():
        resp.receive_data(bytes([byte]))
    for byte in resp.data_to_send():
        init.receive_data(bytes([byte]))
    out = b""
    for byte in init.data_to_send() + encrypt(init, b"hello"):
        out += plaintext(resp.receive_data(bytes([byte])))
    assert out == b"hello" and resp.remote.remote_peer == a.peer_id


def test_dialing_the_wrong_peer_id_fails():
    a, b, c = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    init = noise.NoiseCore(a, initiator=True, expected_peer=c.peer_id)
    resp = noise.NoiseCore(b, initiator=False)
    init.send_handshake()
    resp.receive_data(init.data_to_send())
    with pytest.raises(PeerIdMismatch, match=f"dialed {c.peer_id} but the remote proved it is {b.peer_id}"):
        init.receive_data(resp.data_to_send())


class _LyingResponder(noise.NoiseCore):
    """Signs some other static key than the one it uses: an attempt to borrow an identity."""

    def _payload(self) -> bytes:
        sig = self.identity.sign(noise.SIGNATURE_PREFIX + b"\x00" * 32)
        return noise.HandshakePayload(self.identity.public_key.to_protobuf(), sig).encode()


def test_static_key_signature_must_verify():
    init = noise.NoiseCore(KeyPair.generate(), initiator=True)
    resp = _LyingResponder(KeyPair.generate(), initiator=False)
    init.send_handshake()
    resp.receive_data(init.data_to_send())
    with pytest.raises(HandshakeError, match="signature does not verify"):
        init.receive_data(resp.data_to_send())


def test_tampered_handshake_message_fails():
    init = noise.NoiseCore(KeyPair.generate(), initiator=True)
    resp = noise.NoiseCore(KeyPair.generate(), initiator=False)
    init.send_handshake()
    resp.receive_data(init.data_to_send())
    msg2 = bytearray(resp.data_to_send())
    msg2[50] ^= 1
    with pytest.raises(HandshakeError, match="message 2"):
        init.receive_data(bytes(msg2))


def test_tampered_transport_frame_fails_and_replay_fails():
    init = noise.NoiseCore(KeyPair.generate(), initiator=True)
    resp = noise.NoiseCore(KeyPair.generate(), initiator=False)
    handshake(init, resp)
    frame = encrypt(init, b"secret")
    resp.receive_data(frame)
    with pytest.raises(ProtocolError, match="failed authentication"):
        resp.receive_data(frame)  # the same frame again: the nonce has moved on


def test_low_order_ephemeral_key_is_refused():
    resp = noise.NoiseCore(KeyPair.generate(), initiator=False)
    with pytest.raises(HandshakeError, match="invalid X25519"):
        resp.receive_data(b"\x00\x20" + b"\x00" * 32)


@settings(max_examples=200)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_fuzz_responder(msg1, msg3):
    resp = noise.NoiseCore(KeyPair.generate(), initiator=False)
    try:
        resp.receive_data(len(msg1).to_bytes(2, "big") + msg1)
        resp.receive_data(len(msg3).to_bytes(2, "big") + msg3)
    except (HandshakeError, ProtocolError):
        return
    assert not resp.handshake_done  # random bytes can never complete a handshake


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_fuzz_initiator(msg2):
    init = noise.NoiseCore(KeyPair.generate(), initiator=True)
    init.send_handshake()
    try:
        init.receive_data(len(msg2).to_bytes(2, "big") + msg2)
    except (HandshakeError, ProtocolError):
        return
    assert not init.handshake_done


def test_vector_file_reproduces_exactly():
    """protocols/vectors/noise-xx.json: fixed keys → the exact bytes on the wire (the generator
    also checks that both sides authenticated each other)."""
    assert make_noise_vector.build() == json.loads(VECTORS.read_text())
    v = json.loads(VECTORS.read_text())
    assert v["message1"][:4] == "0020"  # message 1 is the bare 32-byte ephemeral key
    assert len(bytes.fromhex(v["transport_frame"])) == 2 + len(bytes.fromhex(v["transport_plaintext"])) + noise.TAG_LEN
