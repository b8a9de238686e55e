"""The node's state: `unconfigured` / `degraded` / `healthy` (DESIGN.md, from the P2POS seed).

unconfigured: this node is not in the current snapshot. healthy: online * 2 > member_count,
where online counts this node and every member that is connected and has been heard from
(a heartbeat, or the connection itself) within 3 heartbeat intervals. Otherwise degraded.
Recomputed on membership and connectivity changes, on heartbeats and on every interval tick;
transitions are logged and stored.
"""

from __future__ import annotations

import logging

import trio

from .. import timefmt
from ..identity import PeerId
from ..logfmt import fmt

UNCONFIGURED = "unconfigured"
DEGRADED = "degraded"
HEALTHY = "healthy"

log = logging.getLogger("p2pnode.health")


class Health:
    def __init__(self, host, store, membership, *, interval: float):
        self.host = host
        self.store = store
        self.membership = membership
        self.interval = interval
        self.state = UNCONFIGURED
        self.online: list[PeerId] = []
        self.last_heard: dict[PeerId, float] = {}  # trio clock of the last heartbeat or connect
        self.changed = trio.Event()
        host.on_connected(lambda conn: self.heard(conn.peer_id))
        host.on_disconnected(lambda conn: self.recompute("disconnected"))
        membership.on_change(self._on_membership)

    def _on_membership(self, snap) -> None:
        # Peers that just became members have sent no heartbeats yet (non-members don't): a live
        # connection is our evidence for them until their first heartbeat, one interval away.
        now = trio.current_time()
        for m in snap.members:
            if self.host.connection_to(m.peer_id) is not None:
                self.last_heard[m.peer_id] = max(self.last_heard.get(m.peer_id, now), now)
        self.recompute("membership")

    def heard(self, peer_id: PeerId) -> None:
        self.last_heard[peer_id] = trio.current_time()
        # A heartbeat from a member already counted online changes nothing; anyone else (new, or
        # back after a reconnect while its last heartbeat still looked fresh) is counted now.
        if peer_id not in self.online:
            self.recompute("heard")

    def is_online(self, peer_id: PeerId, now: float) -> bool:
        if self.host.connection_to(peer_id) is None:
            return False
        heard = self.last_heard.get(peer_id)
        return heard is not None and now - heard <= 3 * self.interval

    def recompute(self, reason: str) -> str:
        snap = self.membership.current
        me = self.host.peer_id
        now = trio.current_time()
        if snap is None or snap.member(me) is None:
            online, state = [], UNCONFIGURED
        else:
            online = [me] + [m.peer_id for m in snap.members if m.peer_id != me and self.is_online(m.peer_id, now)]
            state = HEALTHY if len(online) * 2 > len(snap.members) else DEGRADED
        self.online = online
        if state != self.state:
            members = len(snap.members) if snap else 0
            log.info(fmt("state_change", **{"from": self.state}, to=state, online=len(online), members=members, reason=reason))
            self.store.queue(
                "INSERT INTO state_transitions (at, from_state, to_state, online, members) VALUES (?,?,?,?,?)",
                (timefmt.now(), self.state, state, len(online), members),
            )
            self.state = state
            self.changed.set()
            self.changed = trio.Event()
        return state

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.recompute("start")
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            self.recompute("tick")
