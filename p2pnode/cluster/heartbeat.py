"""Heartbeats (`/p2pnode/heartbeat/1.0.0`): a signed message to every connected member each interval.

Each sender keeps one long-lived stream per member and writes one length-prefixed envelope per
interval. The payload carries the sender's state, its snapshot's `issued_at`, the time it was
sent and a sequence number: max(previous + 1, unix time in ns), persisted, so it keeps growing
across the sender's restarts. A receiver accepts a heartbeat only if the sender is a member (checked
per message, so a member removed while its stream stays open is cut off), it is signed by the peer at
the other end of the connection, `sent_at` is within ±5 minutes of the receiver's clock, and `seq` is
above the last one it accepted from that peer (also persisted). Rejections are counted by reason.
Non-members neither get nor give heartbeats; their streams are closed without noise.

`HeartbeatCore` is the pure part (messages and time in, decisions out); `HeartbeatService` moves
bytes, persists through `HeartbeatStore`, and tells the health service who was heard.
Spec: protocols/heartbeat.md.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from .. import codec, timefmt
from ..envelope import Envelope
from ..errors import DecodeError, P2PNodeError
from ..identity import KeyPair, PeerId
from ..logfmt import fmt, limited
from ..platform.db import Database
from ..platform.nodedb import MetaStore
from ..platform.service import Service, ServiceContext
from ..streamio import MessageReader, send_message
from .health import HealthService
from .membership import MembershipService

PROTOCOL = "/p2pnode/heartbeat/1.0.0"
WINDOW_NS = 5 * 60 * timefmt.NS
MAX_MESSAGE = 1024  # a heartbeat envelope is ~335 bytes

log = logging.getLogger("p2pnode.heartbeat")


@attrs.frozen
class Heartbeat:
    peer_id: PeerId
    cluster_id: str
    state: str
    snapshot_issued_at: str
    seq: int
    sent_at_ns: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_id": str(self.peer_id),
            "cluster_id": self.cluster_id,
            "state": self.state,
            "snapshot_issued_at": self.snapshot_issued_at,
            "seq": self.seq,
            "sent_at": timefmt.format_ns(self.sent_at_ns),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Heartbeat:
        f = codec.Fields(raw, "heartbeat")
        seq = f.integer("seq")
        if not 0 < seq < 2**63:
            raise DecodeError("heartbeat: seq out of range")
        return cls(
            peer_id=PeerId.from_string(f.text("peer_id", max_len=128)),
            cluster_id=f.text("cluster_id", max_len=256),
            state=f.text("state", max_len=32),
            snapshot_issued_at=f.text("snapshot_issued_at", max_len=64),
            seq=seq,
            sent_at_ns=timefmt.parse_ns(f.text("sent_at", max_len=64)),
        )

    def sign(self, key: KeyPair) -> Envelope:
        return Envelope.seal("heartbeat", self.to_dict(), key)


class HeartbeatCore:
    """Makes and checks heartbeats. No I/O: the time is an argument, state is two maps of ints."""

    def __init__(self, identity: KeyPair, cluster_id: str, *, seq: int = 0, window_ns: int = WINDOW_NS):
        self.identity = identity
        self.cluster_id = cluster_id
        self.window_ns = window_ns
        self.seq = seq
        self.last_seq: dict[PeerId, int] = {}

    def next_seq(self, now_ns: int) -> int:
        self.seq = max(self.seq + 1, now_ns)
        return self.seq

    def make(self, now_ns: int, state: str, snapshot_issued_at: str) -> Envelope:
        hb = Heartbeat(self.identity.peer_id, self.cluster_id, state, snapshot_issued_at, self.next_seq(now_ns), now_ns)
        return hb.sign(self.identity)

    def check(self, message: bytes, sender: PeerId, now_ns: int) -> Heartbeat | str:
        """The heartbeat if `message` from the peer `sender` is acceptable now (and record its seq),
        else the reason: invalid, wrong_sender, wrong_cluster, outside_window or replay."""
        try:
            env = Envelope.from_bytes(message, "heartbeat")
            hb = Heartbeat.from_dict(env.verify())
        except DecodeError:
            return "invalid"
        if env.signer_id != sender or hb.peer_id != sender:
            return "wrong_sender"
        if self.cluster_id and hb.cluster_id != self.cluster_id:
            return "wrong_cluster"
        if abs(now_ns - hb.sent_at_ns) > self.window_ns:
            return "outside_window"
        if hb.seq <= self.last_seq.get(sender, 0):
            return "replay"
        self.last_seq[sender] = hb.seq
        return hb


@attrs.define
class PeerRecord:
    last_at: str = ""
    state: str = ""
    snapshot_issued_at: str = ""
    received: int = 0
    rejected: int = 0


class HeartbeatStore:
    """The `heartbeats` table: per member, the last accepted seq and counters."""

    def __init__(self, db: Database):
        self.db = db

    async def load(self) -> list[tuple[PeerId, int, PeerRecord]]:
        def query(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute("SELECT peer_id, last_seq, last_at, state, received, rejected FROM heartbeats").fetchall()

        out = []
        for peer, last_seq, last_at, state, received, rejected in await self.db.read(query):
            try:
                pid = PeerId.from_string(peer)
            except (DecodeError, TypeError):
                continue
            if not all(isinstance(v, int) for v in (last_seq, received, rejected)):
                continue
            out.append((pid, last_seq, PeerRecord(str(last_at or ""), str(state or ""), "", received, rejected)))
        return out

    def save(self, peer: PeerId, last_seq: int, record: PeerRecord) -> None:
        self.db.queue(
            "INSERT INTO heartbeats (peer_id, last_seq, last_at, state, received, rejected) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(peer_id) DO UPDATE SET last_seq=excluded.last_seq, last_at=excluded.last_at, "
            "state=excluded.state, received=excluded.received, rejected=excluded.rejected",
            (str(peer), last_seq, record.last_at or timefmt.now(), record.state, record.received, record.rejected),
        )

    def forget_all_but(self, keep: frozenset[PeerId]) -> None:
        marks = ",".join("?" * len(keep))
        self.db.queue(f"DELETE FROM heartbeats WHERE peer_id NOT IN ({marks})", tuple(str(p) for p in keep))


class HeartbeatService(Service):
    name = "heartbeat"

    def __init__(self, ctx: ServiceContext, membership: MembershipService, health: HealthService):
        self.ctx = ctx
        self.membership = membership
        self.host = ctx.host
        self.roster = ctx.roster
        self.health = health
        self.interval = ctx.config.heartbeat_interval
        self.core = HeartbeatCore(ctx.identity, ctx.config.cluster_id)
        self.store = HeartbeatStore(ctx.db)
        self.meta = MetaStore(ctx.db)
        self.peers: dict[PeerId, PeerRecord] = {}
        self.rejections: Counter[str] = Counter()
        self.sent = 0
        self.bytes_sent = 0
        self._streams: dict[PeerId, Any] = {}
        self._inflight: set[PeerId] = set()
        self.host.set_handler(PROTOCOL, self._serve)
        self.roster.on_change(self._prune)

    async def load(self) -> None:
        self.core.seq = int(await self.meta.get("heartbeat_seq") or 0)
        for peer, last_seq, record in await self.store.load():
            self.core.last_seq[peer] = last_seq
            self.peers[peer] = record

    def _prune(self) -> None:
        """Forget peers that are no longer members (memory and disk stay bounded by the roster)."""
        members = self.roster.members
        gone = [p for p in self.peers if p not in members]
        for p in gone:
            self.peers.pop(p, None)
            self.core.last_seq.pop(p, None)
        if gone:
            self.store.forget_all_but(members)

    def make(self) -> Envelope:
        snap = self.membership.current
        env = self.core.make(self.ctx.clock.now_ns(), self.health.state, snap.issued_at if snap else "")
        self.meta.queue_set("heartbeat_seq", str(self.core.seq))
        return env

    def next_seq(self) -> int:
        seq = self.core.next_seq(self.ctx.clock.now_ns())
        self.meta.queue_set("heartbeat_seq", str(seq))
        return seq

    # -- sending --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                targets = [p for p in self.roster.others() if self.host.connection_to(p)] if self.roster.configured else []
                for peer in targets:
                    if peer not in self._inflight:  # a send still stuck from the last tick is not doubled
                        self._inflight.add(peer)
                        nursery.start_soon(self._send_one, peer)
                for peer in list(self._streams):
                    if peer not in targets:
                        nursery.start_soon(self._streams.pop(peer).aclose)
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

    # -- receiving ------------------------------------------------------------------------------
    async def _serve(self, stream: Any, conn: Any) -> None:
        reader = MessageReader(stream, MAX_MESSAGE)
        while self.roster.is_member(conn.peer_id) and self.roster.configured:
            message = await reader.next()
            if message is None:
                return
            if not self.roster.is_member(conn.peer_id):  # removed while its stream stayed open
                break
            self.receive(message, conn.peer_id)
        log.debug(fmt("heartbeat_ignored_non_member", peer=conn.peer_id))

    def receive(self, message: bytes, sender: PeerId) -> str:
        """Check and record one heartbeat from the peer at the other end of a connection.
        Returns "accepted" or the rejection reason."""
        result = self.core.check(message, sender, self.ctx.clock.now_ns())
        record = self.peers.setdefault(sender, PeerRecord())
        if isinstance(result, Heartbeat):
            record.last_at, record.state = timefmt.now(), result.state
            record.snapshot_issued_at = result.snapshot_issued_at
            record.received += 1
            self.store.save(sender, result.seq, record)
            self.health.heard(sender)
            return "accepted"
        record.rejected += 1
        self.rejections[result] += 1
        self.store.save(sender, self.core.last_seq.get(sender, 0), record)
        limited.warning(log, fmt("heartbeat_rejected", peer=sender, reason=result), key=("heartbeat_rejected", result))
        return result

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> Mapping[str, Any]:
        return {"heartbeats": {"sent": self.sent, "rejected": dict(self.rejections)}}

    def member_status(self, peer_id: PeerId) -> Mapping[str, Any]:
        if peer_id == self.ctx.peer_id:
            return {"last_heartbeat": None}
        record = self.peers.get(peer_id)
        return {
            "last_heartbeat": record.last_at if record and record.received else None,
            "state": record.state if record and record.state else None,
        }
