"""The node's state: `unconfigured` / `degraded` / `healthy` (DESIGN.md, from the P2POS seed).

unconfigured: this node is not in the current snapshot. healthy: online * 2 > member_count,
where online counts this node and every member that is connected and has been heard from
(a heartbeat, or the connection itself) within 3 heartbeat intervals. Otherwise degraded.

`judge()` and `OnlineTracker` are the pure part (members, connections and times in, state out);
`HealthService` recomputes on membership and connectivity changes, on heartbeats and on every
interval tick, and logs and stores transitions (`StateHistory`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from .. import timefmt
from ..identity import PeerId
from ..logfmt import fmt
from ..platform.db import Database
from ..platform.service import Service, ServiceContext

UNCONFIGURED = "unconfigured"
DEGRADED = "degraded"
HEALTHY = "healthy"
KEEP_TRANSITIONS = 1000

log = logging.getLogger("p2pnode.health")


def judge(members: Iterable[PeerId], me: PeerId, is_online: Callable[[PeerId], bool]) -> tuple[str, list[PeerId]]:
    """(state, online members with this node first) for a member list and an online test."""
    members = list(members)
    if me not in members:
        return UNCONFIGURED, []
    online = [me] + [p for p in members if p != me and is_online(p)]
    return (HEALTHY if len(online) * 2 > len(members) else DEGRADED), online


class OnlineTracker:
    """When each peer was last heard (heartbeat or connect), on the monotonic clock."""

    def __init__(self, interval: float):
        self.interval = interval
        self.last_heard: dict[PeerId, float] = {}

    def heard(self, peer: PeerId, now: float) -> None:
        self.last_heard[peer] = now

    def is_online(self, peer: PeerId, connected: bool, now: float) -> bool:
        heard = self.last_heard.get(peer)
        return connected and heard is not None and now - heard <= 3 * self.interval

    def keep_only(self, peers: frozenset[PeerId]) -> None:
        for p in [p for p in self.last_heard if p not in peers]:
            del self.last_heard[p]


class StateHistory:
    """The `state_transitions` table, bounded to the last KEEP_TRANSITIONS rows."""

    def __init__(self, db: Database):
        self.db = db
        db.after_flush(self._prune)

    def record(self, from_state: str, to_state: str, online: int, members: int) -> None:
        self.db.queue(
            "INSERT INTO state_transitions (at, from_state, to_state, online, members) VALUES (?,?,?,?,?)",
            (timefmt.now(), from_state, to_state, online, members),
        )

    async def last(self, n: int) -> list[tuple[str, str]]:
        rows = await self.db.fetchall("SELECT from_state, to_state FROM state_transitions ORDER BY id DESC LIMIT ?", (n,))
        return [(str(a), str(b)) for a, b in reversed(rows)]

    @staticmethod
    def _prune(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM state_transitions WHERE id <= (SELECT MAX(id) FROM state_transitions) - ?", (KEEP_TRANSITIONS,))


class HealthService(Service):
    name = "health"

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.host = ctx.host
        self.roster = ctx.roster
        self.interval = ctx.config.heartbeat_interval
        self.tracker = OnlineTracker(self.interval)
        self.history = StateHistory(ctx.db)
        self.state = UNCONFIGURED
        self.online: list[PeerId] = []
        self.changed = trio.Event()
        self.host.on_connected(lambda conn: self.heard(conn.peer_id))
        self.host.on_disconnected(self._on_disconnected)
        self.roster.on_change(self._on_membership)

    def _on_membership(self) -> None:
        # Peers that just became members have sent no heartbeats yet (non-members don't): a live
        # connection is our evidence for them until their first heartbeat, one interval away.
        now = self.ctx.clock.monotonic()
        members = self.roster.members
        self.tracker.keep_only(members)
        for p in members:
            if self.host.connection_to(p) is not None:
                self.tracker.last_heard[p] = max(self.tracker.last_heard.get(p, now), now)
        self.recompute("membership")

    def _on_disconnected(self, conn: object) -> None:
        self.recompute("disconnected")

    def heard(self, peer_id: PeerId) -> None:
        if not self.roster.is_member(peer_id):
            return  # strangers (CLI clients, bootstrap peers) do not count and are not remembered
        self.tracker.heard(peer_id, self.ctx.clock.monotonic())
        # A heartbeat from a member already counted online changes nothing; anyone else (new, or
        # back after a reconnect while its last heartbeat still looked fresh) is counted now.
        if peer_id not in self.online:
            self.recompute("heard")

    def is_online(self, peer_id: PeerId) -> bool:
        return peer_id in self.online

    def recompute(self, reason: str) -> str:
        now = self.ctx.clock.monotonic()
        members = sorted(self.roster.members)
        state, online = judge(members, self.ctx.peer_id,
                              lambda p: self.tracker.is_online(p, self.host.connection_to(p) is not None, now))
        self.online = online
        if state != self.state:
            log.info(fmt("state_change", **{"from": self.state}, to=state, online=len(online), members=len(members), reason=reason))
            self.history.record(self.state, state, len(online), len(members))
            self.state = state
            self.changed.set()
            self.changed = trio.Event()
        return state

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.recompute("start")
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            self.recompute("tick")

    def status(self) -> Mapping[str, Any]:
        return {"state": self.state, "online_count": len(self.online)}

    def member_status(self, peer_id: PeerId) -> Mapping[str, Any]:
        out: dict[str, Any] = {"online": peer_id in self.online}
        if peer_id == self.ctx.peer_id:
            out["state"] = self.state
        return out
