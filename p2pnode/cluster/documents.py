"""Cluster documents and their verification: admin proofs, membership snapshots, revocations.

Trust chain: the system key (`system_pubkey`) signs admin proofs; an admin signs snapshots and
carries its proof inside them; the system key signs revocations of admins. Verification is
pure: given the envelope, the trust settings and the time, it returns the document or raises
Rejected with a machine-readable `code` and a sentence saying why.

Verification spends nothing on a stranger: the signature, signer, cluster, date and admin proof
are checked on the few fields they need, and only then is the member (or admin) list built.
An admin proof must be valid at the receiver's clock (± MAX_SKEW_NS) and cover the document's
`issued_at`; a node re-loading a snapshot it accepted earlier judges it at its `issued_at`.
"""

from __future__ import annotations

from typing import Any

import attrs

from .. import timefmt
from ..codec import Fields
from ..envelope import Envelope, SignatureInvalid
from ..errors import DecodeError
from ..identity import KeyPair, PeerId, PublicKey
from ..multiaddr import Multiaddr

ROLE_ADMIN = "admin"
ROLE_DEPLOY = "deploy"  # may sign deploy commands and artifact manifests, nothing else
MAX_SKEW_NS = 5 * 60 * timefmt.NS  # clocks may disagree this much: future dates, proof windows
MAX_FUTURE_NS = MAX_SKEW_NS  # documents dated further ahead than this are refused
MAX_MEMBERS = 10_000
MAX_ADDRS = 64  # per member
MAX_LABELS = 64  # per member
MAX_REVOKED = 1000  # admins per revocation


class Rejected(DecodeError):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def _peer(text: str, what: str) -> PeerId:
    try:
        return PeerId.from_string(text)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None


def _time(text: str, what: str) -> int:
    try:
        return timefmt.parse_ns(text)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None


@attrs.frozen
class AdminProof:
    role: str
    cluster_id: str
    admin_peer_id: PeerId
    valid_from_ns: int
    valid_until_ns: int
    issued_at_ns: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "cluster_id": self.cluster_id,
            "admin_peer_id": str(self.admin_peer_id),
            "valid_from": timefmt.format_ns(self.valid_from_ns),
            "valid_until": timefmt.format_ns(self.valid_until_ns),
            "issued_at": timefmt.format_ns(self.issued_at_ns),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdminProof:
        f = Fields(raw, "admin proof")
        return cls(
            role=f.text("role", max_len=32),
            cluster_id=f.text("cluster_id", max_len=256),
            admin_peer_id=_peer(f.text("admin_peer_id"), "admin proof admin_peer_id"),
            valid_from_ns=_time(f.text("valid_from"), "admin proof valid_from"),
            valid_until_ns=_time(f.text("valid_until"), "admin proof valid_until"),
            issued_at_ns=_time(f.text("issued_at"), "admin proof issued_at"),
        )

    def sign(self, system_key: KeyPair) -> Envelope:
        return Envelope.seal("admin-proof", self.to_dict(), system_key)


@attrs.frozen
class Member:
    peer_id: PeerId
    name: str | None = None
    addrs: tuple[Multiaddr, ...] = ()
    labels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peer_id": str(self.peer_id), "addrs": [str(a) for a in self.addrs], "labels": list(self.labels)}
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Member:
        f = Fields(raw, "member")
        pid = _peer(f.text("peer_id"), "member peer_id")
        addrs = []
        for a in f.items("addrs", optional=True, max_items=MAX_ADDRS):
            if not isinstance(a, str):
                raise DecodeError(f"member {pid}: addrs must be strings")
            try:
                addrs.append(Multiaddr.parse(a))
            except DecodeError as exc:
                raise DecodeError(f"member {pid}: {exc}") from None
        labels = f.items("labels", optional=True, max_items=MAX_LABELS)
        if not all(isinstance(label, str) and 0 < len(label) <= 64 for label in labels):
            raise DecodeError(f"member {pid}: labels must be non-empty strings of at most 64 characters")
        return cls(pid, f.text("name", optional=True, max_len=128), tuple(addrs), tuple(labels))


@attrs.frozen
class Snapshot:
    cluster_id: str
    issued_at_ns: int
    issuer_peer_id: PeerId
    members: tuple[Member, ...]
    admin_proof: Envelope | None = None

    @property
    def issued_at(self) -> str:
        return timefmt.format_ns(self.issued_at_ns)

    def member(self, peer_id: PeerId) -> Member | None:
        for m in self.members:
            if m.peer_id == peer_id:
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "issued_at": self.issued_at,
            "issuer_peer_id": str(self.issuer_peer_id),
            "members": [m.to_dict() for m in self.members],
            "admin_proof": self.admin_proof.to_dict() if self.admin_proof else None,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Snapshot:
        f = Fields(raw, "membership snapshot")
        return _SnapshotHead.parse(f).with_members(_members(f))

    def sign(self, admin_key: KeyPair) -> Envelope:
        if admin_key.peer_id != self.issuer_peer_id:
            raise ValueError("a snapshot must be signed by its issuer")
        return Envelope.seal("membership-snapshot", self.to_dict(), admin_key)


@attrs.frozen
class _SnapshotHead:
    """A snapshot's fields except its members: all that verification looks at."""

    cluster_id: str
    issued_at_ns: int
    issuer_peer_id: PeerId
    admin_proof: Envelope | None

    @classmethod
    def parse(cls, f: Fields) -> _SnapshotHead:
        proof_raw = f.raw.get("admin_proof")
        return cls(
            cluster_id=f.text("cluster_id", max_len=256),
            issued_at_ns=_time(f.text("issued_at"), "membership snapshot issued_at"),
            issuer_peer_id=_peer(f.text("issuer_peer_id"), "membership snapshot issuer_peer_id"),
            admin_proof=Envelope.from_dict(proof_raw, "admin-proof") if proof_raw is not None else None,
        )

    def with_members(self, members: tuple[Member, ...]) -> Snapshot:
        return Snapshot(self.cluster_id, self.issued_at_ns, self.issuer_peer_id, members, self.admin_proof)


def _members(f: Fields) -> tuple[Member, ...]:
    members = tuple(Member.from_dict(m) for m in f.items("members", max_items=MAX_MEMBERS))
    if len({m.peer_id for m in members}) != len(members):
        raise DecodeError("membership snapshot: a peer is listed twice")
    return members


@attrs.frozen
class Revocation:
    cluster_id: str
    issued_at_ns: int
    admins: tuple[PeerId, ...]
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "issued_at": timefmt.format_ns(self.issued_at_ns),
            "admins": [str(a) for a in self.admins],
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Revocation:
        f = Fields(raw, "revocation")
        return _revocation_rest(f, *_revocation_head(f))

    def sign(self, system_key: KeyPair) -> Envelope:
        return Envelope.seal("revocation", self.to_dict(), system_key)


def _revocation_head(f: Fields) -> tuple[str, int]:
    return f.text("cluster_id", max_len=256), _time(f.text("issued_at"), "revocation issued_at")


def _revocation_rest(f: Fields, cluster_id: str, issued_at_ns: int) -> Revocation:
    """The part of a revocation built only once its signer, cluster and date are accepted."""
    admins = []
    for a in f.items("admins", max_items=MAX_REVOKED):
        if not isinstance(a, str):
            raise DecodeError("revocation: admins must be peer ID strings")
        admins.append(_peer(a, "revocation admins"))
    return Revocation(cluster_id, issued_at_ns, tuple(admins), f.text("reason", optional=True, default="", max_len=1024))


@attrs.frozen
class Trust:
    """What a node checks documents against."""

    cluster_id: str = ""
    system_key: PublicKey | None = None
    revoked_admins: frozenset[PeerId] = frozenset()


def _open(env: Envelope) -> dict[str, Any]:
    try:
        return env.verify()
    except SignatureInvalid as exc:
        raise Rejected("bad_signature", str(exc)) from None


def verify_admin_proof(
    env: Envelope, trust: Trust, *, cluster_id: str, admin: PeerId, at_ns: int, now_ns: int | None = None,
    roles: frozenset[str] = frozenset({ROLE_ADMIN}),
) -> AdminProof:
    """Check an admin proof for a document dated `at_ns`, received when this node's clock says
    `now_ns`: the window must cover the document's date and, give or take MAX_SKEW_NS, now, so
    that an expired proof cannot be revived by back-dating a document. `now_ns=None` judges at
    `at_ns` alone: for a document this node accepted earlier, or a proof checked on its own."""
    if trust.system_key is None:
        raise ValueError("no system key to verify against")
    if env.type != "admin-proof":
        raise Rejected("proof_invalid", f"admin proof has type {env.type}")
    if env.signer != trust.system_key:
        raise Rejected("proof_invalid", "admin proof is not signed by this cluster's system key")
    proof = AdminProof.from_dict(_open(env))
    if proof.role not in roles:
        wanted = " or ".join(repr(r) for r in sorted(roles))
        raise Rejected("proof_invalid", f"admin proof role is {proof.role!r}, not {wanted}")
    if proof.cluster_id != cluster_id:
        raise Rejected("proof_invalid", f"admin proof is for cluster {proof.cluster_id!r}, not {cluster_id!r}")
    if proof.admin_peer_id != admin:
        raise Rejected("proof_invalid", f"admin proof names {proof.admin_peer_id}, but {admin} signed")
    window = f"admin proof is valid {timefmt.format_ns(proof.valid_from_ns)} to {timefmt.format_ns(proof.valid_until_ns)}"
    if not proof.valid_from_ns <= at_ns <= proof.valid_until_ns:
        raise Rejected("proof_expired", f"{window}, the document is dated {timefmt.format_ns(at_ns)}")
    if now_ns is not None and not proof.valid_from_ns - MAX_SKEW_NS <= now_ns <= proof.valid_until_ns + MAX_SKEW_NS:
        raise Rejected("proof_expired", f"{window}, this node's clock says {timefmt.format_ns(now_ns)}")
    if admin in trust.revoked_admins:
        raise Rejected("revoked_admin", f"admin {admin} has been revoked by the system key")
    return proof


def verify_snapshot(env: Envelope, trust: Trust, now_ns: int, *, stored: bool = False) -> Snapshot:
    """Verify a membership snapshot envelope. Raises Rejected (or DecodeError for malformed ones).

    Everything that decides trust is checked before the member list is built (signature,
    issuer, cluster, date, admin proof), so a stranger's snapshot costs one signature check and
    a handful of fields. `stored=True` re-verifies a snapshot this node accepted earlier (its own
    database, at start): it is judged at its own `issued_at`, not at `now_ns`, so it stays in
    force after its admin proof expires, as it does after its admin is revoked."""
    if env.type != "membership-snapshot":
        raise Rejected("malformed", f"expected a membership-snapshot, got {env.type}")
    f = Fields(_open(env), "membership snapshot")
    head = _SnapshotHead.parse(f)
    if head.issuer_peer_id != env.signer_id:
        raise Rejected("bad_signature", f"snapshot names issuer {head.issuer_peer_id} but was signed by {env.signer_id}")
    if trust.cluster_id and head.cluster_id != trust.cluster_id:
        raise Rejected("wrong_cluster", f"snapshot is for cluster {head.cluster_id!r}, this node is in {trust.cluster_id!r}")
    judged_at = head.issued_at_ns if stored else now_ns
    if head.issued_at_ns > judged_at + MAX_FUTURE_NS:
        raise Rejected("future", f"snapshot is dated {timefmt.format_ns(head.issued_at_ns)}, more than 5 minutes ahead of this node's clock")
    if trust.system_key is not None:
        if head.admin_proof is None:
            raise Rejected("no_admin_proof", "snapshot carries no admin proof and this cluster has a system key")
        verify_admin_proof(head.admin_proof, trust, cluster_id=head.cluster_id, admin=head.issuer_peer_id,
                           at_ns=head.issued_at_ns, now_ns=judged_at)
    return head.with_members(_members(f))


def verify_revocation(env: Envelope, trust: Trust, now_ns: int) -> Revocation:
    """Verify a revocation: signer, then cluster and date, then the list of admins it names."""
    if trust.system_key is None:
        raise Rejected("no_system_key", "revocations need a system_pubkey in this node's config")
    if env.type != "revocation":
        raise Rejected("malformed", f"expected a revocation, got {env.type}")
    if env.signer != trust.system_key:
        raise Rejected("bad_signature", "revocation is not signed by this cluster's system key")
    f = Fields(_open(env), "revocation")
    cluster_id, issued_at_ns = _revocation_head(f)
    if trust.cluster_id and cluster_id != trust.cluster_id:
        raise Rejected("wrong_cluster", f"revocation is for cluster {cluster_id!r}, this node is in {trust.cluster_id!r}")
    if issued_at_ns > now_ns + MAX_FUTURE_NS:
        raise Rejected("future", "revocation is dated more than 5 minutes ahead of this node's clock")
    return _revocation_rest(f, cluster_id, issued_at_ns)


@attrs.frozen
class SignedHead:
    """The common head of admin-signed documents other than snapshots (folder configs, deploy
    commands): who signed, for which cluster, when, with which proof."""

    cluster_id: str
    issued_at_ns: int
    issuer_peer_id: PeerId
    proof: AdminProof | None


def verify_admin_document(
    env: Envelope, trust: Trust, now_ns: int, *, type_: str, roles: frozenset[str], stored: bool = False,
) -> tuple[SignedHead, Fields]:
    """Verify a document signed by an admin-like key whose proof (signed by the system key) rides in
    the payload as `admin_proof` and grants one of `roles`. The payload carries `cluster_id`,
    `issued_at` and `issuer_peer_id`; everything else is the caller's to parse from the returned
    Fields, and only after this returned (verify before parse). `stored=True`: judged at its own
    `issued_at` (a document this node accepted earlier)."""
    what = type_.replace("-", " ")
    if env.type != type_:
        raise Rejected("malformed", f"expected a {type_}, got {env.type}")
    f = Fields(_open(env), what)
    cluster_id = f.text("cluster_id", max_len=256)
    issued_at_ns = _time(f.text("issued_at"), f"{what} issued_at")
    issuer = _peer(f.text("issuer_peer_id"), f"{what} issuer_peer_id")
    proof_raw = f.raw.get("admin_proof")
    if issuer != env.signer_id:
        raise Rejected("bad_signature", f"{what} names issuer {issuer} but was signed by {env.signer_id}")
    if trust.cluster_id and cluster_id != trust.cluster_id:
        raise Rejected("wrong_cluster", f"{what} is for cluster {cluster_id!r}, this node is in {trust.cluster_id!r}")
    judged_at = issued_at_ns if stored else now_ns
    if issued_at_ns > judged_at + MAX_FUTURE_NS:
        raise Rejected("future", f"{what} is dated {timefmt.format_ns(issued_at_ns)}, more than 5 minutes ahead of this node's clock")
    proof = None
    if trust.system_key is not None:
        if proof_raw is None:
            raise Rejected("no_admin_proof", f"{what} carries no admin proof and this cluster has a system key")
        proof = verify_admin_proof(Envelope.from_dict(proof_raw, "admin-proof"), trust, cluster_id=cluster_id, admin=issuer,
                                   at_ns=issued_at_ns, now_ns=judged_at, roles=roles)
    return SignedHead(cluster_id, issued_at_ns, issuer, proof), f
