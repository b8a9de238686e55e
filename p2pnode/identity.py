"""Ed25519 identities and libp2p peer IDs.

A peer ID is the multihash of the protobuf-encoded public key (peer-ids spec): for Ed25519 the
36-byte encoding is short enough to be inlined with the identity hash, so the public key can be
recovered from the ID itself. Text forms: base58btc (`12D3KooW…`) and CIDv1 (`bafz…`, codec
libp2p-key).
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from pathlib import Path

import attrs
import nacl.exceptions
import nacl.signing

from . import multibase, protobuf, varint
from .errors import DecodeError, P2PNodeError
from .fsutil import atomic_write

KEY_TYPE_ED25519 = 1
_KEY_TYPE_NAMES = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}
MULTIHASH_IDENTITY = 0x00
MULTIHASH_SHA2_256 = 0x12
CID_CODEC_LIBP2P_KEY = 0x72
MAX_INLINE_KEY_LEN = 42
# Text lengths of the base58btc forms: an Ed25519 key inlined (identity multihash), a sha2-256 digest.
_TEXT_LENGTHS = (("12D3KooW", 52), ("Qm", 46))


class KeyFileError(P2PNodeError):
    """A key file that is missing, unreadable, malformed or readable by others."""


@attrs.frozen
class PublicKey:
    """An Ed25519 public key (the only key type this node creates or verifies)."""

    raw: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))

    def __attrs_post_init__(self) -> None:
        if len(self.raw) != 32:
            raise DecodeError(f"Ed25519 public key must be 32 bytes, got {len(self.raw)}")

    def to_protobuf(self) -> bytes:
        return protobuf.encode_fields([(1, KEY_TYPE_ED25519), (2, self.raw)])

    @classmethod
    def from_protobuf(cls, data: bytes) -> PublicKey:
        fields = protobuf.decode_fields(data)
        key_type = protobuf.first(fields, 1, int)
        key_data = protobuf.first(fields, 2, bytes)
        if not isinstance(key_type, int) or not isinstance(key_data, bytes):
            raise DecodeError("PublicKey protobuf lacks Type or Data")
        if key_type != KEY_TYPE_ED25519:
            name = _KEY_TYPE_NAMES.get(key_type, f"unknown type {key_type}")
            raise DecodeError(f"{name} public keys are not supported (only Ed25519)")
        return cls(key_data)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
            return True
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False

    @property
    def peer_id(self) -> PeerId:
        return PeerId.from_public_key(self)

    @classmethod
    def from_id_text(cls, text: str) -> PublicKey:
        """A key written as its peer ID (`12D3KooW…`), which inlines Ed25519 keys (system_pubkey)."""
        key = PeerId.from_string(text).extract_public_key()
        if key is None:
            raise DecodeError(f"{text!r} names a key by its hash; an Ed25519 key written as its 12D3KooW… ID is needed")
        return key


class KeyPair:
    """An Ed25519 signing key with its public half. Not a value class: it holds a secret."""

    def __init__(self, signing_key: nacl.signing.SigningKey):
        self._signing_key = signing_key
        self.public_key = PublicKey(bytes(signing_key.verify_key))
        self.peer_id = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        if len(seed) != 32:
            raise DecodeError("Ed25519 seed must be 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature

    def to_protobuf(self) -> bytes:
        """libp2p PrivateKey protobuf: Data is seed || public key (64 bytes), as go-libp2p writes."""
        return protobuf.encode_fields([(1, KEY_TYPE_ED25519), (2, self.seed + self.public_key.raw)])

    @classmethod
    def from_protobuf(cls, data: bytes) -> KeyPair:
        fields = protobuf.decode_fields(data)
        if protobuf.first(fields, 1, int) != KEY_TYPE_ED25519:
            raise DecodeError("private key is not an Ed25519 libp2p PrivateKey")
        key_data = protobuf.first(fields, 2, bytes)
        if not isinstance(key_data, bytes) or len(key_data) not in (32, 64):
            raise DecodeError("Ed25519 private key data must be 32 or 64 bytes")
        pair = cls.from_seed(key_data[:32])
        if len(key_data) == 64 and key_data[32:] != pair.public_key.raw:
            raise DecodeError("private key's embedded public key does not match its seed")
        return pair

    def __repr__(self) -> str:
        return f"KeyPair(peer_id={self.peer_id})"


def save_key(path: str | os.PathLike, key: KeyPair) -> None:
    atomic_write(path, key.to_protobuf(), mode=0o600)


def load_key(path: str | os.PathLike) -> KeyPair:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be readable by "
            f"group or others — fix with: chmod 600 {path}"
        )
    try:
        return KeyPair.from_protobuf(path.read_bytes())
    except DecodeError as exc:
        raise KeyFileError(f"key file {path} is not a valid Ed25519 key: {exc}") from None


def load_or_create_key(path: str | os.PathLike) -> tuple[KeyPair, bool]:
    """Load the key at `path`, creating it (mode 0600) when absent. Returns (key, created)."""
    if Path(path).exists():
        return load_key(path), False
    key = KeyPair.generate()
    save_key(path, key)
    return key, True


@attrs.frozen(order=True)
class PeerId:
    """A libp2p peer ID: the multihash bytes, ordered bytewise."""

    multihash: bytes

    @classmethod
    def from_public_key(cls, key: PublicKey) -> PeerId:
        encoded = key.to_protobuf()
        if len(encoded) <= MAX_INLINE_KEY_LEN:
            return cls(bytes((MULTIHASH_IDENTITY,)) + varint.encode(len(encoded)) + encoded)
        digest = hashlib.sha256(encoded).digest()
        return cls(bytes((MULTIHASH_SHA2_256, 32)) + digest)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        code, pos = varint.decode_complete(data)
        length, pos = varint.decode_complete(data, pos)
        if len(data) - pos != length:
            raise DecodeError(f"truncated or corrupted: its multihash declares {length} digest bytes but holds {len(data) - pos}")
        if code == MULTIHASH_IDENTITY:
            if length > MAX_INLINE_KEY_LEN:
                raise DecodeError("identity-hashed peer ID is longer than 42 bytes")
        elif code == MULTIHASH_SHA2_256:
            if length != 32:
                raise DecodeError("sha2-256 peer ID digest must be 32 bytes")
        else:
            raise DecodeError(f"peer ID uses unsupported multihash code 0x{code:x}")
        return cls(bytes(data))

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse base58btc multihash (`12D3KooW…`, `Qm…`) or a CIDv1 with codec libp2p-key."""
        if not isinstance(text, str):
            raise DecodeError(f"peer ID must be text, got {type(text).__name__}")
        return _parse_peer_id(text)

    @classmethod
    def _from_string(cls, text: str) -> PeerId:
        if not isinstance(text, str) or not text:
            raise DecodeError("empty peer ID")
        try:
            return cls._from_text_form(text)
        except DecodeError as exc:
            raise DecodeError(f"invalid peer ID {text!r}: {exc}") from None

    @classmethod
    def _from_text_form(cls, text: str) -> PeerId:
        if text.startswith(("Qm", "1")):
            raw = multibase.b58decode(text)
            for prefix, length in _TEXT_LENGTHS:
                if text.startswith(prefix) and len(text) != length:
                    # the common slip: an ID cut short, or run into other text, when copied
                    raise DecodeError(f"a {prefix}… peer ID has {length} characters, this one has {len(text)}; "
                                      "check that it was copied whole")
            return cls.from_bytes(raw)
        prefix, body = text[0], text[1:]
        if prefix == "b":
            raw = multibase.b32decode_lower(body)
        elif prefix == "z":
            raw = multibase.b58decode(body)
        else:
            raise DecodeError("it is neither base58btc nor a base32/base58 CID (a peer ID looks like 12D3KooW… or Qm…)")
        version, pos = varint.decode_complete(raw)
        if version != 1:
            raise DecodeError(f"peer ID CID must be version 1, got {version}")
        codec, pos = varint.decode_complete(raw, pos)
        if codec != CID_CODEC_LIBP2P_KEY:
            raise DecodeError(f"peer ID CID codec must be libp2p-key (0x72), got 0x{codec:x}")
        return cls.from_bytes(raw[pos:])

    def to_base58(self) -> str:
        return _b58(self.multihash)

    def to_cid(self) -> str:
        return "b" + multibase.b32encode_lower(varint.encode(1) + varint.encode(CID_CODEC_LIBP2P_KEY) + self.multihash)

    def extract_public_key(self) -> PublicKey | None:
        """The public key, if the ID inlines it (identity multihash); None for hashed IDs."""
        if self.multihash[0] != MULTIHASH_IDENTITY:
            return None
        _, pos = varint.decode_complete(self.multihash, 1)
        return PublicKey.from_protobuf(self.multihash[pos:])

    def short(self) -> str:
        text = self.to_base58()
        return text[-8:]

    def __str__(self) -> str:
        return self.to_base58()


@functools.lru_cache(maxsize=4096)
def _parse_peer_id(text: str) -> PeerId:
    # Heartbeats, snapshots and status name the same few peers over and over; base58 is slow.
    return PeerId._from_string(text)


@functools.lru_cache(maxsize=4096)
def _b58(multihash: bytes) -> str:
    return multibase.b58encode(multihash)
