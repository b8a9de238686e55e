"""The signed envelope every signed object travels in (after libp2p RFC 0002).

CBOR map {type, payload, signer, sig}: `payload` is the CBOR-encoded object, `signer` the raw
32-byte Ed25519 public key, `sig` an Ed25519 signature over

    uvarint(len(domain)) ‖ domain ‖ uvarint(len(type)) ‖ type ‖ uvarint(len(payload)) ‖ payload

where the domain string is fixed per object type, so a signature made for one kind of object
can never be accepted as another.
"""

from __future__ import annotations

import hashlib

import attrs

from . import codec, varint
from .errors import DecodeError
from .identity import KeyPair, PeerId, PublicKey

DOMAINS = {
    "admin-proof": "p2pnode-admin-proof-v1",
    "membership-snapshot": "p2pnode-membership-snapshot-v1",
    "revocation": "p2pnode-revocation-v1",
    "heartbeat": "p2pnode-heartbeat-v1",
    "status": "p2pnode-status-v1",
}


def register_type(type_: str, domain: str) -> None:
    """Make a new envelope type known (at import of the module that defines it). Its domain
    string must be new, so one kind of signature can never be replayed as another."""
    if DOMAINS.get(type_, domain) != domain or (type_ not in DOMAINS and domain in DOMAINS.values()):
        raise ValueError(f"envelope type {type_!r} / domain {domain!r} clashes with a registered one")
    DOMAINS[type_] = domain


class SignatureInvalid(DecodeError):
    """The envelope is well formed but its signature does not verify."""


def signing_bytes(type_: str, payload: bytes) -> bytes:
    domain = DOMAINS[type_].encode()
    t = type_.encode()
    return varint.encode(len(domain)) + domain + varint.encode(len(t)) + t + varint.encode(len(payload)) + payload


@attrs.frozen
class Envelope:
    type: str
    payload: bytes
    signer: PublicKey
    sig: bytes

    @classmethod
    def seal(cls, type_: str, obj: dict, key: KeyPair) -> Envelope:
        if type_ not in DOMAINS:
            raise ValueError(f"unknown envelope type {type_!r}")
        payload = codec.encode(obj)
        return cls(type_, payload, key.public_key, key.sign(signing_bytes(type_, payload)))

    def to_dict(self) -> dict:
        return {"type": self.type, "payload": self.payload, "signer": self.signer.raw, "sig": self.sig}

    def to_bytes(self) -> bytes:
        return codec.encode(self.to_dict())

    @classmethod
    def from_dict(cls, raw: object, expected_type: str | None = None) -> Envelope:
        f = codec.Fields(raw, "signed envelope")
        type_ = f.text("type", max_len=64)
        if type_ not in DOMAINS:
            raise DecodeError(f"signed envelope: unknown type {type_!r}")
        if expected_type is not None and type_ != expected_type:
            raise DecodeError(f"expected a {expected_type} envelope, got {type_}")
        sig = f.blob("sig")
        if len(sig) != 64:
            raise DecodeError("signed envelope: sig must be 64 bytes")
        return cls(type_, f.blob("payload"), PublicKey(f.blob("signer")), sig)

    @classmethod
    def from_bytes(cls, data: bytes, expected_type: str | None = None) -> Envelope:
        return cls.from_dict(codec.decode(data), expected_type)

    def verify(self) -> dict:
        """Check the signature; return the decoded payload map. Raises SignatureInvalid/DecodeError."""
        if not self.signer.verify(signing_bytes(self.type, self.payload), self.sig):
            raise SignatureInvalid(f"{self.type} signature does not verify")
        return codec.decode_map(self.payload, self.type)

    @property
    def signer_id(self) -> PeerId:
        return self.signer.peer_id

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()
