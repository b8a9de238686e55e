"""Noise XX (`/noise`) for libp2p, as a sans-IO state machine (noise/README.md of libp2p/specs).

Handshake `Noise_XX_25519_ChaChaPoly_SHA256`, empty prologue:
    -> e
    <- e, ee, s, es      payload: responder's NoiseHandshakePayload
    -> s, se             payload: initiator's NoiseHandshakePayload
The payload binds the libp2p identity to the Noise static key: identity_key (protobuf PublicKey)
and identity_sig = Ed25519 signature over "noise-libp2p-static-key:" + static public key.
Every message, handshake and transport, is framed with a 2-byte big-endian length (≤ 65535).

The core follows the transport cores' shape (`send_*` queues, `receive_data` → events,
`data_to_send()`); its trio driver is `noise_trio`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import attrs
from nacl import bindings

from .. import protobuf
from ..errors import DecodeError, HandshakeError, PeerIdMismatch, ProtocolError
from ..identity import KeyPair, PeerId, PublicKey

PROTOCOL_ID = "/noise"
PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
MAX_FRAME = 65535
TAG_LEN = 16
MAX_PLAINTEXT = MAX_FRAME - TAG_LEN
DH_LEN = 32
_MAX_NONCE = 2**64 - 1

_aead_encrypt = bindings.crypto_aead_chacha20poly1305_ietf_encrypt
_aead_decrypt = bindings.crypto_aead_chacha20poly1305_ietf_decrypt
_pack_nonce = struct.Struct("<4xQ").pack
_pack_len = struct.Struct(">H").pack


def x25519_keypair(private: bytes | None = None) -> tuple[bytes, bytes]:
    private = private if private is not None else os.urandom(32)
    return private, bindings.crypto_scalarmult_base(private)


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return bindings.crypto_scalarmult(private, public)
    except Exception:  # libsodium refuses low-order points (all-zero shared secret)
        raise HandshakeError("remote sent an invalid X25519 public key") from None


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = hmac.digest(chaining_key, ikm, "sha256")
    out1 = hmac.digest(temp, b"\x01", "sha256")
    out2 = hmac.digest(temp, out1 + b"\x02", "sha256")
    return out1, out2


class CipherState:
    """A ChaChaPoly key with its 64-bit nonce counter."""

    __slots__ = ("key", "nonce")

    def __init__(self, key: bytes | None = None):
        self.key = key
        self.nonce = 0

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.key is None:
            return plaintext
        if self.nonce >= _MAX_NONCE:
            raise ProtocolError("noise nonce exhausted; the connection must be closed")
        ct = _aead_encrypt(plaintext, ad or None, _pack_nonce(self.nonce), self.key)
        self.nonce += 1
        return ct

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.key is None:
            return ciphertext
        if self.nonce >= _MAX_NONCE:
            raise ProtocolError("noise nonce exhausted; the connection must be closed")
        try:
            pt = _aead_decrypt(ciphertext, ad or None, _pack_nonce(self.nonce), self.key)
        except Exception:
            raise ProtocolError("noise frame failed authentication (corrupted or forged)") from None
        self.nonce += 1
        return pt


class SymmetricState:
    def __init__(self) -> None:
        # The protocol name is exactly 32 bytes (HASHLEN), so h starts as the name itself.
        self.h = PROTOCOL_NAME
        self.ck = PROTOCOL_NAME
        self.cipher = CipherState()
        self.mix_hash(b"")  # empty prologue

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf2(self.ck, ikm)
        self.cipher = CipherState(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf2(self.ck, b"")
        return CipherState(k1), CipherState(k2)


@attrs.frozen
class HandshakePayload:
    identity_key: bytes
    identity_sig: bytes
    stream_muxers: tuple[str, ...] = ()

    def encode(self) -> bytes:
        fields: list[tuple[int, bytes]] = [(1, self.identity_key), (2, self.identity_sig)]
        if self.stream_muxers:
            fields.append((4, protobuf.encode_fields((2, m) for m in self.stream_muxers)))
        return protobuf.encode_fields(fields)

    @classmethod
    def decode(cls, data: bytes) -> HandshakePayload:
        fields = protobuf.decode_fields(data)
        key = protobuf.first(fields, 1, bytes)
        sig = protobuf.first(fields, 2, bytes)
        if not isinstance(key, bytes) or not isinstance(sig, bytes):
            raise DecodeError("noise handshake payload lacks identity_key or identity_sig")
        muxers: tuple[str, ...] = ()
        ext = protobuf.first(fields, 4, bytes)
        if isinstance(ext, bytes):
            try:
                muxers = tuple(m.decode("utf-8") for m in protobuf.repeated(protobuf.decode_fields(ext), 2))
            except UnicodeDecodeError:
                raise DecodeError("noise extension stream_muxers is not UTF-8") from None
        return cls(key, sig, muxers)


# -- events ---------------------------------------------------------------------------------------
@attrs.frozen
class HandshakeCompleted:
    remote_peer: PeerId
    remote_key: PublicKey
    remote_muxers: tuple[str, ...]


@attrs.frozen
class DataReceived:
    """Decrypted transport plaintext (all of it that the bytes fed so far completed)."""

    data: bytes


Event = HandshakeCompleted | DataReceived


class NoiseCore:
    """Drives the XX handshake, then encrypts and decrypts transport frames.

    Use: `send_handshake()` (the initiator queues message 1), then feed received bytes to
    `receive_data()` and send whatever `data_to_send()` holds; the responder's and the
    initiator's later handshake messages are queued by `receive_data` itself. Events: one
    HandshakeCompleted, then DataReceived with decrypted plaintext. After the handshake,
    `send_data(plaintext)` queues encrypted frames.
    """

    def __init__(
        self,
        identity: KeyPair,
        *,
        initiator: bool,
        expected_peer: PeerId | None = None,
        static_private: bytes | None = None,
        ephemeral_private: bytes | None = None,
    ):
        self.identity = identity
        self.initiator = initiator
        self.expected_peer = expected_peer
        self._s_priv, self._s_pub = x25519_keypair(static_private)
        self._e_priv, self._e_pub = x25519_keypair(ephemeral_private)
        self._re = b""
        self._rs = b""
        self._sym = SymmetricState()
        self._step = 0  # handshake messages processed (sent or received)
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        self._inbuf = bytearray()
        self._outbound: list[bytes] = []
        self.remote: HandshakeCompleted | None = None

    # -- handshake ---------------------------------------------------------------------------
    def _payload(self) -> bytes:
        sig = self.identity.sign(SIGNATURE_PREFIX + self._s_pub)
        return HandshakePayload(self.identity.public_key.to_protobuf(), sig).encode()

    def _queue_frame(self, body: bytes) -> None:
        self._outbound.append(_pack_len(len(body)))
        self._outbound.append(body)

    def send_handshake(self) -> None:
        """The initiator queues message 1 (-> e); the responder only ever answers, so for it this
        does nothing."""
        if self.initiator:
            if self._step != 0:
                raise ProtocolError("noise handshake already started")
            sym = self._sym
            sym.mix_hash(self._e_pub)
            self._queue_frame(self._e_pub + sym.encrypt_and_hash(b""))
            self._step = 1

    def _verify_payload(self, payload: bytes) -> HandshakeCompleted:
        try:
            decoded = HandshakePayload.decode(payload)
            key = PublicKey.from_protobuf(decoded.identity_key)
        except DecodeError as exc:
            raise HandshakeError(f"bad noise handshake payload: {exc}") from None
        if not key.verify(SIGNATURE_PREFIX + self._rs, decoded.identity_sig):
            raise HandshakeError("noise static key signature does not verify")
        peer = key.peer_id
        if self.expected_peer is not None and peer != self.expected_peer:
            raise PeerIdMismatch(f"dialed {self.expected_peer} but the remote proved it is {peer}")
        return HandshakeCompleted(peer, key, decoded.stream_muxers)

    def _handle_handshake_frame(self, frame: bytes) -> HandshakeCompleted | None:
        sym = self._sym
        if not self.initiator and self._step == 0:  # <- e
            if len(frame) < DH_LEN:
                raise HandshakeError("noise message 1 is shorter than an ephemeral key")
            self._re = frame[:DH_LEN]
            sym.mix_hash(self._re)
            sym.decrypt_and_hash(frame[DH_LEN:])  # payload must be empty-ish; content ignored
            # -> e, ee, s, es + payload
            sym.mix_hash(self._e_pub)
            out = bytearray(self._e_pub)
            sym.mix_key(_dh(self._e_priv, self._re))
            out += sym.encrypt_and_hash(self._s_pub)
            sym.mix_key(_dh(self._s_priv, self._re))
            out += sym.encrypt_and_hash(self._payload())
            self._queue_frame(bytes(out))
            self._step = 2
            return None
        if self.initiator and self._step == 1:  # <- e, ee, s, es + payload
            if len(frame) < DH_LEN + DH_LEN + TAG_LEN + TAG_LEN:
                raise HandshakeError("noise message 2 is too short")
            self._re = frame[:DH_LEN]
            sym.mix_hash(self._re)
            sym.mix_key(_dh(self._e_priv, self._re))
            try:
                self._rs = sym.decrypt_and_hash(frame[DH_LEN : DH_LEN * 2 + TAG_LEN])
                sym.mix_key(_dh(self._e_priv, self._rs))
                payload = sym.decrypt_and_hash(frame[DH_LEN * 2 + TAG_LEN :])
            except ProtocolError as exc:
                raise HandshakeError(f"noise message 2: {exc}") from None
            complete = self._verify_payload(payload)
            # -> s, se + payload
            out = bytearray(sym.encrypt_and_hash(self._s_pub))
            sym.mix_key(_dh(self._s_priv, self._re))
            out += sym.encrypt_and_hash(self._payload())
            self._queue_frame(bytes(out))
            self._send, self._recv = sym.split()
            self._step = 3
            return complete
        if not self.initiator and self._step == 2:  # <- s, se + payload
            if len(frame) < DH_LEN + TAG_LEN + TAG_LEN:
                raise HandshakeError("noise message 3 is too short")
            try:
                self._rs = sym.decrypt_and_hash(frame[: DH_LEN + TAG_LEN])
                sym.mix_key(_dh(self._e_priv, self._rs))
                payload = sym.decrypt_and_hash(frame[DH_LEN + TAG_LEN :])
            except ProtocolError as exc:
                raise HandshakeError(f"noise message 3: {exc}") from None
            complete = self._verify_payload(payload)
            self._recv, self._send = sym.split()
            self._step = 3
            return complete
        raise HandshakeError("unexpected noise handshake message")

    # -- I/O -----------------------------------------------------------------------------------
    @property
    def handshake_done(self) -> bool:
        return self._send is not None

    def data_to_send(self) -> bytes:
        out = self._outbound
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed received bytes; returns [HandshakeCompleted] when the handshake completes now,
        then [DataReceived] with the plaintext of every transport frame completed."""
        buf = self._inbuf
        buf += data
        events: list[Event] = []
        plaintext: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            length = (buf[pos] << 8) | buf[pos + 1]
            if end - pos - 2 < length:
                break
            frame = bytes(buf[pos + 2 : pos + 2 + length])
            pos += 2 + length
            if self._recv is not None:
                plaintext.append(self._recv.decrypt(b"", frame))
            else:
                result = self._handle_handshake_frame(frame)
                if result is not None:
                    self.remote = result
                    events.append(result)
        if pos:
            del buf[:pos]
        if plaintext:
            events.append(DataReceived(plaintext[0] if len(plaintext) == 1 else b"".join(plaintext)))
        return events

    def send_data(self, plaintext: bytes | bytearray | memoryview) -> None:
        """Queue transport data, encrypted in frames of at most 65519 bytes of plaintext."""
        send = self._send
        if send is None:
            raise ProtocolError("noise handshake not complete")
        out = self._outbound
        if len(plaintext) <= MAX_PLAINTEXT:
            ct = send.encrypt(b"", plaintext if isinstance(plaintext, bytes) else bytes(plaintext))
            out.append(_pack_len(len(ct)))
            out.append(ct)
            return
        view = memoryview(plaintext)
        for start in range(0, len(view), MAX_PLAINTEXT):
            ct = send.encrypt(b"", bytes(view[start : start + MAX_PLAINTEXT]))
            out.append(_pack_len(len(ct)))
            out.append(ct)
