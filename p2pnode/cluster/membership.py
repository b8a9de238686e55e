"""Membership: the admin-signed snapshot in force and the system-signed revocations.

Both are document types on the bus (`membership-snapshot`: LWW, one current version;
`revocation`: append-only, never undone), so pushing, pulling, forwarding, persistence and restart
are the bus's. This service verifies them against the cluster's trust (documents.py), keeps the
current snapshot, writes its peer IDs into the roster, and tells listeners. A new snapshot is also
forwarded to the members it removed, so a removed node learns it is out and becomes `unconfigured`.

Who may read: members, and whoever presents a valid admin proof for the key it connected with
(the admin tool), see `authorized`.
Spec: protocols/membership.md (documents), protocols/documents.md (the bus).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from .. import timefmt
from ..envelope import Envelope
from ..errors import DecodeError
from ..identity import PeerId, PublicKey
from ..logfmt import fmt
from ..platform.bus import APPEND, LWW, Accepted, DocumentType, Verdict
from ..platform.service import Service, ServiceContext
from .documents import Revocation, Snapshot, Trust, verify_admin_proof, verify_revocation, verify_snapshot

SNAPSHOT = "membership-snapshot"
REVOCATION = "revocation"
KEEP_SNAPSHOTS = 100

log = logging.getLogger("p2pnode.membership")


def _peek_snapshot(payload: dict[str, Any]) -> tuple[str, int]:
    issued = payload.get("issued_at")
    if not isinstance(issued, str):
        raise DecodeError("snapshot: issued_at missing")
    return "", timefmt.parse_ns(issued)


class MembershipService(Service):
    name = "membership"

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.cluster_id = ctx.config.cluster_id
        self.system_key = PublicKey.from_id_text(ctx.config.system_pubkey) if ctx.config.system_pubkey else None
        self.current: Snapshot | None = None
        self.current_envelope: Envelope | None = None
        self.revocations: dict[str, tuple[Revocation, Envelope]] = {}
        self._listeners: list[Callable[[Snapshot], None]] = []
        ctx.bus.register(DocumentType(
            REVOCATION, verify=self._verify_revocation, apply=self._apply_revocation, ordering=APPEND, keep=None,
            rejected_action="revocation_rejected", public=True,
        ))
        ctx.bus.register(DocumentType(
            SNAPSHOT, verify=self._verify_snapshot, reload=self._reload_snapshot, apply=self._apply_snapshot,
            ordering=LWW, peek=_peek_snapshot, keep=KEEP_SNAPSHOTS, extra_targets=lambda _: ctx.roster.previous,
            rejected_action="snapshot_rejected",
        ))
        ctx.bus.authorize = self.authorized
        if self.system_key is None:
            log.warning(fmt("no_system_pubkey", note="any validly self-signed snapshot will be accepted; set system_pubkey"))

    # -- state -------------------------------------------------------------------------------------
    @property
    def trust(self) -> Trust:
        revoked = frozenset(a for rev, _ in self.revocations.values() for a in rev.admins)
        return Trust(self.cluster_id, self.system_key, revoked)

    def on_change(self, listener: Callable[[Snapshot], None]) -> None:
        self._listeners.append(listener)

    def is_member(self, peer_id: PeerId) -> bool:
        return self.ctx.roster.is_member(peer_id)

    def members(self) -> tuple[Any, ...]:
        return self.current.members if self.current else ()

    @property
    def rejections(self) -> dict[str, int]:
        counts = dict(self.ctx.bus.rejection_counts(SNAPSHOT))
        for code, n in self.ctx.bus.rejection_counts(REVOCATION).items():
            counts[code] = counts.get(code, 0) + n
        return counts

    async def offer(self, env: Envelope, source: PeerId | None = None) -> Verdict:
        """Offer a document to the bus as if it had been pushed (by the local operator when source is None)."""
        return await self.ctx.bus.offer(env, source)

    def authorized(self, peer: PeerId, request: Mapping[str, Any]) -> bool:
        """A non-member may read (pull, status) when its request carries an admin proof, signed by
        the system key, for the very key it connected with, valid now and not revoked."""
        raw = request.get("auth")
        if raw is None or self.system_key is None:
            return False
        try:
            env = Envelope.from_dict(raw, "admin-proof")
            verify_admin_proof(env, self.trust, cluster_id=self.cluster_id, admin=peer, at_ns=self.ctx.clock.now_ns())
        except DecodeError:
            return False
        return True

    # -- document types ----------------------------------------------------------------------------
    def _verify_snapshot(self, env: Envelope, now_ns: int) -> Accepted:
        snap = verify_snapshot(env, self.trust, now_ns)
        return Accepted("", snap.issued_at_ns, snap)

    def _reload_snapshot(self, env: Envelope, now_ns: int) -> Accepted:
        # Revocations stop *new* documents from a revoked admin, and a proof that expired since
        # stops new ones too: the snapshot this node accepted stays in force (judged at its issued_at).
        snap = verify_snapshot(env, Trust(self.cluster_id, self.system_key), now_ns, stored=True)
        return Accepted("", snap.issued_at_ns, snap)

    def _apply_snapshot(self, accepted: Accepted, env: Envelope, source: PeerId | None, loaded: bool) -> None:
        snap: Snapshot = accepted.doc
        previous = self.current
        self.current, self.current_envelope = snap, env
        self.ctx.roster.update(m.peer_id for m in snap.members)
        log.info(fmt(
            "snapshot_loaded" if loaded else "apply_snapshot_push", issued_at=snap.issued_at, members=len(snap.members),
            issuer=snap.issuer_peer_id, source=None if loaded else source or "local",
            previous=previous.issued_at if previous else None,
        ))
        for listener in list(self._listeners):
            listener(snap)

    def _verify_revocation(self, env: Envelope, now_ns: int) -> Accepted:
        rev = verify_revocation(env, self.trust, now_ns)
        return Accepted(env.digest(), rev.issued_at_ns, rev)

    def _apply_revocation(self, accepted: Accepted, env: Envelope, source: PeerId | None, loaded: bool) -> None:
        rev: Revocation = accepted.doc
        self.revocations[env.digest()] = (rev, env)
        if not loaded:
            log.info(fmt("apply_revocation", admins=",".join(str(a) for a in rev.admins),
                         issued_at=timefmt.format_ns(rev.issued_at_ns), source=source or "local"))

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> Mapping[str, Any]:
        snap = self.current
        return {
            "cluster_id": self.cluster_id,
            "member_count": len(snap.members) if snap else 0,
            "snapshot_issued_at": snap.issued_at if snap else None,
            "snapshot_rejections": self.rejections,
        }

    def member_rows(self) -> list[dict[str, Any]]:
        me = self.ctx.peer_id
        return [
            {"peer_id": str(m.peer_id), "name": m.name, "labels": list(m.labels), "self": m.peer_id == me}
            for m in self.members()
        ]
