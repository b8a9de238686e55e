"""Membership: the current admin-signed snapshot, revocations, and the two protocols that move them.

`/p2pnode/membership/1.0.0` (pull): on every new connection we send what we have; the peer
answers with its snapshot if it is newer, and with revocations we lack.
`/p2pnode/membership-push/1.0.0` (push): one document in, one verdict out. A node that accepts
a new document forwards it once to its connected members (not back to the sender); they accept
or ignore it (equal `issued_at`), so a push to any node reaches all of them and stops.
Spec: protocols/membership.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from .. import codec, timefmt
from ..envelope import Envelope
from ..errors import DecodeError, P2PNodeError
from ..identity import PeerId, PublicKey
from ..logfmt import fmt, limited
from ..streamio import MessageReader, send_message
from .documents import Revocation, Snapshot, Trust, verify_revocation, verify_snapshot

PULL = "/p2pnode/membership/1.0.0"
PUSH = "/p2pnode/membership-push/1.0.0"
MAX_MESSAGE = 4 << 20
REQUEST_TIMEOUT = 10.0
MAX_FORWARDED_TO = 10_000

log = logging.getLogger("p2pnode.membership")


@attrs.frozen
class Verdict:
    result: str  # "accepted" | "ignored" | "rejected"
    code: str = ""
    reason: str = ""

    def to_dict(self) -> dict:
        return {"result": self.result, "code": self.code, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: dict) -> Verdict:
        f = codec.Fields(raw, "push verdict")
        return cls(f.text("result", max_len=16), f.text("code", optional=True, default=""), f.text("reason", optional=True, default=""))


class MembershipService:
    def __init__(self, host, store, *, cluster_id: str, system_key: PublicKey | None, clock: Callable[[], int] = timefmt.now_ns):
        self.host = host
        self.store = store
        self.cluster_id = cluster_id
        self.system_key = system_key
        self.clock = clock
        self.current: Snapshot | None = None
        self.current_envelope: Envelope | None = None
        self.revocations: dict[str, tuple[Revocation, Envelope]] = {}
        self.rejections: Counter[str] = Counter()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._nursery: trio.Nursery | None = None
        host.set_handler(PULL, self._serve_pull)
        host.set_handler(PUSH, self._serve_push)
        host.on_connected(lambda conn: conn.nursery.start_soon(self._pull_quietly, conn))

    # -- state ---------------------------------------------------------------------------------
    @property
    def trust(self) -> Trust:
        revoked = frozenset(a for rev, _ in self.revocations.values() for a in rev.admins)
        return Trust(self.cluster_id, self.system_key, revoked)

    def on_change(self, listener: Callable[[Snapshot], None]) -> None:
        self._listeners.append(listener)

    def is_member(self, peer_id: PeerId) -> bool:
        return self.current is not None and self.current.member(peer_id) is not None

    def members(self) -> tuple:
        return self.current.members if self.current else ()

    async def load(self) -> None:
        """Restore revocations and the newest stored snapshot (re-verified) after a restart."""
        for digest, blob in await self.store.fetchall("SELECT digest, envelope FROM revocations"):
            try:
                env = Envelope.from_bytes(blob, "revocation")
                self.revocations[digest] = (verify_revocation(env, Trust(self.cluster_id, self.system_key), self.clock()), env)
            except DecodeError as exc:
                log.warning(fmt("stored_revocation_invalid", digest=digest, reason=str(exc)))
        row = await self.store.fetchone("SELECT envelope FROM snapshots ORDER BY issued_at_ns DESC, id DESC LIMIT 1")
        if row is not None:
            try:
                env = Envelope.from_bytes(row[0], "membership-snapshot")
                # Revocations stop *new* documents from a revoked admin; the stored one stays in force.
                snap = verify_snapshot(env, Trust(self.cluster_id, self.system_key), self.clock(), stored=True)
            except DecodeError as exc:
                log.warning(fmt("stored_snapshot_invalid", reason=str(exc)))
            else:
                self.current, self.current_envelope = snap, env
                log.info(fmt("snapshot_loaded", issued_at=snap.issued_at, members=len(snap.members), issuer=snap.issuer_peer_id))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- accepting documents -----------------------------------------------------------------------
    def _not_newer(self, env: Envelope) -> bool:
        """Cheap LWW pre-check on the unverified payload: a document that would be ignored anyway
        costs no signature checks. Ignoring changes no state, so trusting the claim is safe."""
        if self.current is None:
            return False
        try:
            issued = codec.decode_map(env.payload, "snapshot").get("issued_at")
            return isinstance(issued, str) and timefmt.parse_ns(issued) <= self.current.issued_at_ns
        except DecodeError:
            return False

    async def offer_snapshot(self, env: Envelope, source: PeerId | None = None, already: frozenset = frozenset()) -> Verdict:
        if self._not_newer(env):
            return Verdict("ignored", "not_newer", f"this node already has a snapshot issued at {self.current.issued_at}")
        # verify_snapshot does not await: `current` is still what _not_newer compared against.
        try:
            snap = verify_snapshot(env, self.trust, self.clock())
        except DecodeError as exc:  # Rejected carries a code; anything else is malformed
            return self._reject("snapshot", exc, source)
        previous = self.current
        self.current, self.current_envelope = snap, env
        await self.store.write(
            "INSERT INTO snapshots (issued_at_ns, issued_at, issuer, members, envelope, received_at, source) VALUES (?,?,?,?,?,?,?)",
            (snap.issued_at_ns, snap.issued_at, str(snap.issuer_peer_id), len(snap.members), env.to_bytes(), timefmt.now(), str(source) if source else None),
        )
        log.info(fmt(
            "apply_snapshot_push", issued_at=snap.issued_at, members=len(snap.members), issuer=snap.issuer_peer_id,
            source=source or "local", previous=previous.issued_at if previous else None,
        ))
        for listener in list(self._listeners):
            listener(snap)
        self._forward({"snapshot": env.to_dict()}, already=already, source=source)
        return Verdict("accepted")

    async def offer_revocation(self, env: Envelope, source: PeerId | None = None, already: frozenset = frozenset()) -> Verdict:
        try:
            rev = verify_revocation(env, self.trust, self.clock())
        except DecodeError as exc:
            return self._reject("revocation", exc, source)
        digest = env.digest()
        if digest in self.revocations:
            return Verdict("ignored", "known", "this node already has this revocation")
        self.revocations[digest] = (rev, env)
        await self.store.write(
            "INSERT OR IGNORE INTO revocations (digest, envelope, received_at) VALUES (?,?,?)", (digest, env.to_bytes(), timefmt.now())
        )
        log.info(fmt("apply_revocation", admins=",".join(str(a) for a in rev.admins), issued_at=timefmt.format_ns(rev.issued_at_ns), source=source or "local"))
        self._forward({"revocation": env.to_dict()}, already=already, source=source)
        return Verdict("accepted")

    def _reject(self, kind: str, exc: DecodeError, source: PeerId | None) -> Verdict:
        code, reason = getattr(exc, "code", "malformed"), str(exc)
        self.rejections[code] += 1
        limited.warning(log, fmt(f"{kind}_rejected", code=code, reason=reason, source=source or "local"), key=(f"{kind}_rejected", code))
        return Verdict("rejected", code, reason)

    async def offer(self, env: Envelope, source: PeerId | None = None, already: frozenset = frozenset()) -> Verdict:
        """Verify and apply a pushed document. `already`: peers the sender says it is pushing the
        same document to; we do not forward to them (or back to the source)."""
        if env.type == "membership-snapshot":
            return await self.offer_snapshot(env, source, already)
        if env.type == "revocation":
            return await self.offer_revocation(env, source, already)
        return Verdict("rejected", "malformed", f"cannot push a {env.type} document")

    # -- forwarding ------------------------------------------------------------------------------------
    def _forward(self, message: dict, already: frozenset, source: PeerId | None) -> None:
        """Push once to every connected member not already covered. The message names everyone
        covered (the sender's exclusion set, us, and our targets), so in a full mesh the first
        node's round reaches everybody and nobody forwards again: N-1 pushes, not N²."""
        if self._nursery is None:
            return
        me = self.host.peer_id
        skip = set(already) | {me} | ({source} if source else set())
        targets = [m.peer_id for m in self.members() if m.peer_id not in skip and self.host.connection_to(m.peer_id) is not None]
        if not targets:
            return
        covered = sorted(str(p) for p in skip | set(targets))
        for peer in targets:
            self._nursery.start_soon(self._push_quietly, peer, {**message, "forwarded_to": covered})

    async def _push_quietly(self, peer: PeerId, message: dict) -> None:
        try:
            verdict = await push(self.host, peer, message)
            log.debug(fmt("forwarded", peer=peer, result=verdict.result))
        except (P2PNodeError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(fmt("forward_failed", peer=peer, reason=str(exc) or type(exc).__name__))

    # -- protocol handlers ---------------------------------------------------------------------------------
    async def _serve_push(self, stream, conn) -> None:
        with trio.fail_after(REQUEST_TIMEOUT):
            raw = codec.decode_map(await MessageReader(stream, MAX_MESSAGE).one(), "push request")
            already = _peer_set(raw.get("forwarded_to"))
            if "snapshot" in raw:
                verdict = await self._offer_raw(raw["snapshot"], "membership-snapshot", conn.peer_id, already)
            elif "revocation" in raw:
                verdict = await self._offer_raw(raw["revocation"], "revocation", conn.peer_id, already)
            else:
                verdict = Verdict("rejected", "malformed", "push request holds neither snapshot nor revocation")
            await send_message(stream, codec.encode(verdict.to_dict()), MAX_MESSAGE)

    async def _offer_raw(self, raw: object, type_: str, source: PeerId, already: frozenset = frozenset()) -> Verdict:
        try:
            env = Envelope.from_dict(raw, type_)
        except DecodeError as exc:
            return self._reject("revocation" if type_ == "revocation" else "snapshot", exc, source)
        return await self.offer(env, source, already)

    async def _serve_pull(self, stream, conn) -> None:
        with trio.fail_after(REQUEST_TIMEOUT):
            f = codec.Fields(codec.decode_map(await MessageReader(stream, MAX_MESSAGE).one(), "pull request"), "pull request")
            have = f.text("have", optional=True, default="")
            have_ns = timefmt.parse_ns(have) if have else -1
            known = set(x for x in f.items("revocations", optional=True, max_items=1000) if isinstance(x, str))
            reply: dict = {"snapshot": None, "revocations": [env.to_dict() for d, (_, env) in self.revocations.items() if d not in known]}
            if self.current is not None and self.current.issued_at_ns > have_ns:
                reply["snapshot"] = self.current_envelope.to_dict()
            await send_message(stream, codec.encode(reply), MAX_MESSAGE)

    async def pull_from(self, conn) -> None:
        """Ask a newly connected peer for anything newer than what we hold."""
        stream = await self.host.new_stream(conn, PULL)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = {"have": self.current.issued_at if self.current else "", "revocations": sorted(self.revocations)}
                await send_message(stream, codec.encode(request), MAX_MESSAGE)
                reply = codec.Fields(codec.decode_map(await MessageReader(stream, MAX_MESSAGE).one(), "pull reply"), "pull reply")
        finally:
            await stream.aclose()
        for raw in reply.items("revocations", optional=True, max_items=1000):
            await self._offer_raw(raw, "revocation", conn.peer_id)
        if reply.raw.get("snapshot") is not None:
            await self._offer_raw(reply.raw["snapshot"], "membership-snapshot", conn.peer_id)

    async def _pull_quietly(self, conn) -> None:
        try:
            await self.pull_from(conn)
        except (P2PNodeError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(fmt("pull_failed", peer=conn.peer_id, reason=str(exc) or type(exc).__name__))


def _peer_set(raw: object) -> frozenset:
    """The optional `forwarded_to` list; entries that are not peer IDs are ignored (it only
    narrows whom we forward to, so a wrong list can cost reach, never correctness of state)."""
    if not isinstance(raw, list):
        return frozenset()
    out = set()
    for item in raw[:MAX_FORWARDED_TO]:
        if isinstance(item, str):
            try:
                out.add(PeerId.from_string(item))
            except DecodeError:
                continue
    return frozenset(out)


async def push(host, peer, message: dict, timeout: float = REQUEST_TIMEOUT) -> Verdict:
    """Push {"snapshot": env} or {"revocation": env} to `peer` (PeerId or Connection); returns its verdict."""
    stream = await host.new_stream(peer, PUSH)
    try:
        with trio.fail_after(timeout):
            await send_message(stream, codec.encode(message), MAX_MESSAGE)
            return Verdict.from_dict(codec.decode_map(await MessageReader(stream, MAX_MESSAGE).one(), "push verdict"))
    finally:
        await stream.aclose()
