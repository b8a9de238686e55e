"""Heartbeats (`/p2pnode/heartbeat/1.0.0`): a signed message to every connected member each interval.

Each sender keeps one long-lived stream per member and writes one length-prefixed envelope per
interval. The payload carries the sender's state, its snapshot's `issued_at`, the time it was
sent and a sequence number: max(previous + 1, unix time in ns), persisted, so it keeps growing
across the sender's restarts. A receiver accepts a heartbeat only if it is signed by the peer at
the other end of the connection, that peer is a member, `sent_at` is within ±5 minutes of the
receiver's clock, and `seq` is above the last one it accepted from that peer (also persisted).
Rejections are counted by reason. Non-members neither get nor give heartbeats; their streams
are closed without noise. Spec: protocols/heartbeat.md.
"""

from __future__ import annotations

import logging
from collections import Counter

import attrs
import trio

from .. import codec, timefmt
from ..envelope import Envelope
from ..errors import DecodeError, P2PNodeError
from ..identity import KeyPair, PeerId
from ..logfmt import fmt
from ..streamio import MessageReader, send_message

PROTOCOL = "/p2pnode/heartbeat/1.0.0"
WINDOW_NS = 5 * 60 * timefmt.NS
MAX_MESSAGE = 4096

log = logging.getLogger("p2pnode.heartbeat")


@attrs.frozen
class Heartbeat:
    peer_id: PeerId
    cluster_id: str
    state: str
    snapshot_issued_at: str
    seq: int
    sent_at_ns: int

    def to_dict(self) -> dict:
        return {
            "peer_id": str(self.peer_id),
            "cluster_id": self.cluster_id,
            "state": self.state,
            "snapshot_issued_at": self.snapshot_issued_at,
            "seq": self.seq,
            "sent_at": timefmt.format_ns(self.sent_at_ns),
        }

    @classmethod
    def from_dict(cls, raw: dict) -> Heartbeat:
        f = codec.Fields(raw, "heartbeat")
        seq = f.integer("seq")
        if not 0 < seq < 2**63:
            raise DecodeError("heartbeat: seq out of range")
        return cls(
            peer_id=PeerId.from_string(f.text("peer_id")),
            cluster_id=f.text("cluster_id", max_len=256),
            state=f.text("state", max_len=32),
            snapshot_issued_at=f.text("snapshot_issued_at", max_len=64),
            seq=seq,
            sent_at_ns=timefmt.parse_ns(f.text("sent_at")),
        )

    def sign(self, key: KeyPair) -> Envelope:
        return Envelope.seal("heartbeat", self.to_dict(), key)


@attrs.define
class PeerRecord:
    last_seq: int = 0
    last_at: str = ""
    state: str = ""
    snapshot_issued_at: str = ""
    received: int = 0
    rejected: int = 0


class HeartbeatService:
    def __init__(self, host, store, membership, health, *, identity: KeyPair, cluster_id: str, interval: float):
        self.host = host
        self.store = store
        self.membership = membership
        self.health = health
        self.identity = identity
        self.cluster_id = cluster_id
        self.interval = interval
        self.peers: dict[PeerId, PeerRecord] = {}
        self.rejections: Counter[str] = Counter()
        self.sent = 0
        self.bytes_sent = 0
        self._seq = 0
        self._streams: dict[PeerId, object] = {}
        self._inflight: set[PeerId] = set()
        host.set_handler(PROTOCOL, self._serve)

    async def load(self) -> None:
        self._seq = int(await self.store.get_meta("heartbeat_seq") or 0)
        for peer, last_seq, last_at, state, received, rejected in await self.store.fetchall(
            "SELECT peer_id, last_seq, last_at, state, received, rejected FROM heartbeats"
        ):
            try:
                self.peers[PeerId.from_string(peer)] = PeerRecord(last_seq, last_at, state or "", "", received, rejected)
            except DecodeError:
                continue

    def next_seq(self) -> int:
        self._seq = max(self._seq + 1, timefmt.now_ns())
        self.store.queue_meta("heartbeat_seq", str(self._seq))
        return self._seq

    def make(self) -> Envelope:
        snap = self.membership.current
        hb = Heartbeat(
            peer_id=self.identity.peer_id,
            cluster_id=self.cluster_id,
            state=self.health.state,
            snapshot_issued_at=snap.issued_at if snap else "",
            seq=self.next_seq(),
            sent_at_ns=timefmt.now_ns(),
        )
        return hb.sign(self.identity)

    # -- sending --------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                me = self.host.peer_id
                targets = [m.peer_id for m in self.membership.members() if m.peer_id != me and self.host.connection_to(m.peer_id)]
                if targets and self.membership.is_member(me):
                    for peer in targets:
                        if peer not in self._inflight:  # a send still stuck from the last tick is not doubled
                            self._inflight.add(peer)
                            nursery.start_soon(self._send_one, peer)
                for peer in list(self._streams):
                    if peer not in targets:
                        stream = self._streams.pop(peer)
                        nursery.start_soon(stream.aclose)
                await trio.sleep(self.interval)

    async def _send_one(self, peer: PeerId) -> None:
        wire = b""
        try:
            with trio.fail_after(max(self.interval, 5.0)):
                stream = self._streams.get(peer)
                if stream is None or stream.connection.is_closed:
                    stream = await self.host.new_stream(peer, PROTOCOL)
                    self._streams[peer] = stream
                wire = self.make().to_bytes()
                await send_message(stream, wire, MAX_MESSAGE)
            self.sent += 1
            self.bytes_sent += len(wire)
        except (P2PNodeError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._streams.pop(peer, None)
            log.debug(fmt("heartbeat_send_failed", peer=peer, reason=str(exc) or type(exc).__name__))
        finally:
            self._inflight.discard(peer)

    # -- receiving -------------------------------------------------------------------------------
    async def _serve(self, stream, conn) -> None:
        if not self.membership.is_member(conn.peer_id) or not self.membership.is_member(self.host.peer_id):
            log.debug(fmt("heartbeat_ignored_non_member", peer=conn.peer_id))
            return
        reader = MessageReader(stream, MAX_MESSAGE)
        while True:
            message = await reader.next()
            if message is None:
                return
            self.receive(message, conn.peer_id)

    def receive(self, message: bytes, sender: PeerId) -> str:
        """Check and record one heartbeat from the peer at the other end of a connection.
        Returns "accepted" or the rejection reason."""
        reason = self._check(message, sender)
        record = self.peers.setdefault(sender, PeerRecord())
        if isinstance(reason, Heartbeat):
            hb = reason
            record.last_seq, record.last_at, record.state = hb.seq, timefmt.now(), hb.state
            record.snapshot_issued_at = hb.snapshot_issued_at
            record.received += 1
            self.store.queue(
                "INSERT INTO heartbeats (peer_id, last_seq, last_at, state, received, rejected) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(peer_id) DO UPDATE SET last_seq=excluded.last_seq, last_at=excluded.last_at, "
                "state=excluded.state, received=excluded.received",
                (str(sender), hb.seq, record.last_at, hb.state, record.received, record.rejected),
            )
            self.health.heard(sender)
            return "accepted"
        record.rejected += 1
        self.rejections[reason] += 1
        self.store.queue(
            "INSERT INTO heartbeats (peer_id, last_seq, last_at, rejected) VALUES (?,?,?,?) "
            "ON CONFLICT(peer_id) DO UPDATE SET rejected=excluded.rejected",
            (str(sender), record.last_seq, record.last_at or timefmt.now(), record.rejected),
        )
        log.warning(fmt("heartbeat_rejected", peer=sender, reason=reason))
        return reason

    def _check(self, message: bytes, sender: PeerId) -> Heartbeat | str:
        try:
            env = Envelope.from_bytes(message, "heartbeat")
            payload = env.verify()
            hb = Heartbeat.from_dict(payload)
        except DecodeError:
            return "invalid"
        if env.signer_id != sender or hb.peer_id != sender:
            return "wrong_sender"
        if self.cluster_id and hb.cluster_id != self.cluster_id:
            return "wrong_cluster"
        if abs(timefmt.now_ns() - hb.sent_at_ns) > WINDOW_NS:
            return "outside_window"
        record = self.peers.get(sender)
        if record is not None and hb.seq <= record.last_seq:
            return "replay"
        return hb
