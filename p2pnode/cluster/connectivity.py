"""Connectivity: keep a connection to every member (and to bootstrap peers until there are members).

Targets are recomputed on membership changes, disconnects and every second. A target that is
not connected is dialed; a failed dial waits an exponential backoff (0.5 s doubling, with
jitter, capped at 30 s) before the next try. A connection that stays up for STABLE_AFTER
resets it; one that ends sooner counts as a failed attempt, so a peer that accepts and hangs up
(a hostile bootstrap peer, a node crashing at start) is redialed ever more slowly, not in a
tight loop. Addresses come from the
snapshot, identify, and what this node has persisted from earlier runs. Only members' and
bootstrap peers' addresses are persisted (`PeerAddressStore`), so strangers cannot grow the table.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from .. import bootstrap, timefmt
from ..errors import DecodeError, P2PNodeError
from ..identity import PeerId
from ..logfmt import fmt
from ..multiaddr import Multiaddr
from ..platform.db import Database
from ..platform.service import Service, ServiceContext
from .membership import MembershipService

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
REBOOTSTRAP_INTERVAL = 60.0
MAX_PARALLEL_DIALS = 4  # per node; enough to mesh quickly without starving the handshakes in flight
IDLE_RECHECK = 30.0
DEFER_LARGER = (3.0, 6.0)  # seconds the larger peer ID waits before its first dial of a pair
STABLE_AFTER = 10.0  # a connection to a target that lasted this long resets its backoff

log = logging.getLogger("p2pnode.connectivity")


def backoff_delay(attempts: int, rng: random.Random) -> float:
    """Delay before retry number `attempts` (1-based): exponential, jittered to 50–100 %, ≤ 30 s."""
    return float(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempts - 1, 16)) * rng.uniform(0.5, 1.0))


@attrs.define
class _Backoff:
    attempts: int = 0
    next_at: float = 0.0


class PeerAddressStore:
    """The `peers` table: addresses of members and bootstrap peers, reused after a restart."""

    def __init__(self, db: Database):
        self.db = db

    async def load(self) -> list[tuple[PeerId, list[Multiaddr]]]:
        out = []
        for peer, addrs in await self.db.fetchall("SELECT peer_id, addrs FROM peers"):
            try:
                out.append((PeerId.from_string(peer), [Multiaddr.parse(a) for a in json.loads(addrs)]))
            except (DecodeError, ValueError, TypeError):
                continue
        return out

    def save(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        self.db.queue(
            "INSERT INTO peers (peer_id, addrs, last_connected) VALUES (?,?,?) ON CONFLICT(peer_id) DO UPDATE SET "
            "addrs=excluded.addrs, last_connected=excluded.last_connected",
            (str(peer), json.dumps([str(a) for a in addrs][:16]), timefmt.now()),
        )

    def keep_only(self, peers: frozenset[PeerId]) -> None:
        keep = [str(p) for p in peers]

        def prune(conn: sqlite3.Connection) -> None:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS keep_peers (peer_id TEXT PRIMARY KEY)")
            conn.execute("DELETE FROM keep_peers")
            conn.executemany("INSERT OR IGNORE INTO keep_peers VALUES (?)", [(k,) for k in keep])
            conn.execute("DELETE FROM peers WHERE peer_id NOT IN (SELECT peer_id FROM keep_peers)")

        self.db.queue_fn(prune)


class ConnectivityService(Service):
    name = "connectivity"

    def __init__(self, ctx: ServiceContext, membership: MembershipService, resolver: bootstrap.Resolver,
                 rng: random.Random | None = None):
        self.ctx = ctx
        self.host = ctx.host
        self.store = PeerAddressStore(ctx.db)
        self.membership = membership
        self.resolver = resolver
        self.init_connections = ctx.config.init_connections
        self.rng = rng or random.Random()
        self.bootstrap: dict[PeerId | None, list[Multiaddr]] = {}
        self._backoff: dict[object, _Backoff] = {}
        self._up_since: dict[PeerId, float] = {}  # connected targets: since when (for STABLE_AFTER)
        self._dialing: set[object] = set()
        self._wakeup = trio.Event()
        self._dial_limit = trio.CapacityLimiter(MAX_PARALLEL_DIALS)
        self.host.on_disconnected(self._disconnected)
        self.host.on_connected(self._connected)
        ctx.roster.on_change(self._on_membership)

    def wake(self) -> None:
        self._wakeup.set()

    async def load(self) -> None:
        for peer, addrs in await self.store.load():
            self.host.peerstore.add_addrs(peer, addrs)

    def _known(self) -> frozenset[PeerId]:
        return self.ctx.roster.members | {p for p in self.bootstrap if p is not None}

    def _target_keys(self, conn: Any) -> list[object]:
        """The targets (keys of `targets()`) that `conn` is a connection to."""
        keys: list[object] = [conn.peer_id] if conn.peer_id in self._known() else []
        if conn.direction == "outbound":
            keys += [str(a) for a in self.bootstrap.get(None, ()) if a.without_peer_id() == conn.remote_addr]
        return keys

    def _connected(self, conn: Any) -> None:
        if self._target_keys(conn):
            self._up_since.setdefault(conn.peer_id, trio.current_time())
        self._remember(conn)

    def _disconnected(self, conn: Any) -> None:
        if self.host.connection_to(conn.peer_id) is None:  # not a duplicate closing beside a live one
            since = self._up_since.pop(conn.peer_id, None)
            now = trio.current_time()
            for key in self._target_keys(conn):
                if since is not None and now - since >= STABLE_AFTER:
                    self._backoff.pop(key, None)
                    continue
                state = self._backoff.setdefault(key, _Backoff())
                state.attempts += 1
                delay = backoff_delay(state.attempts, self.rng)
                state.next_at = now + delay
                log.debug(fmt("redial_backoff", peer=key, attempt=state.attempts, retry_in=f"{delay:.1f}s",
                              reason=f"connection lasted {now - since:.1f}s" if since is not None else "connection ended"))
        self.wake()

    def _remember(self, conn: Any) -> None:
        if conn.peer_id not in self._known():
            return  # strangers' addresses are never persisted
        addrs = self.host.peerstore.addrs(conn.peer_id)
        if conn.direction == "outbound":
            addrs = [conn.remote_addr] + [a for a in addrs if a != conn.remote_addr]
        self.store.save(conn.peer_id, addrs)

    def _on_membership(self) -> None:
        if self.ctx.roster.members:
            self.store.keep_only(self._known())
        self.wake()

    def has_members(self) -> bool:
        return bool(self.ctx.roster.others())

    def targets(self) -> dict[object, tuple[PeerId | None, list[Multiaddr]]]:
        out: dict[object, tuple[PeerId | None, list[Multiaddr]]] = {}
        me = self.host.peer_id
        for m in self.membership.members():
            if m.peer_id != me:
                addrs = list(m.addrs) + [a for a in self.host.peerstore.addrs(m.peer_id) if a not in m.addrs]
                out[m.peer_id] = (m.peer_id, addrs)
        if not self.has_members():
            for pid, addrs in self.bootstrap.items():
                if pid is None:
                    for a in addrs:
                        out[str(a)] = (None, [a])
                elif pid != me:
                    out.setdefault(pid, (pid, addrs))
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._bootstrap_loop)
            task_status.started()
            while True:
                now = trio.current_time()
                for key, (pid, addrs) in self.targets().items():
                    if key in self._dialing or not addrs:
                        continue
                    if pid is not None and self.host.connection_to(pid) is not None:
                        continue
                    if pid is None and any(c.remote_addr == addrs[0].without_peer_id() for c in self.host.connections()):
                        continue
                    state = self._backoff.get(key)
                    if state is None and pid is not None and pid < self.host.peer_id:
                        # Both sides of a new pair see each other at once; let the smaller peer ID
                        # dial first, so the mesh forms without a simultaneous dial per pair.
                        state = self._backoff[key] = _Backoff(next_at=now + self.rng.uniform(*DEFER_LARGER))
                    if state is not None and state.next_at > now:
                        continue
                    self._dialing.add(key)
                    nursery.start_soon(self._dial, key, pid, addrs)
                # Sleep until the next retry falls due, or something changes (membership, a
                # disconnect, a finished dial): an idle, fully connected node does no work here.
                due = [b.next_at for k, b in self._backoff.items() if k not in self._dialing and b.next_at > now]
                with trio.move_on_at(min(due + [now + IDLE_RECHECK])):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()

    async def _dial(self, key: object, pid: PeerId | None, addrs: list[Multiaddr]) -> None:
        try:
            async with self._dial_limit:
                if pid is not None:
                    await self.host.connect_peer(pid, addrs)
                else:
                    conn = await self.host.connect(addrs[0])
                    if conn.peer_id == self.host.peer_id:
                        await conn.muxer.aclose()
        except (P2PNodeError, OSError, trio.TooSlowError) as exc:
            state = self._backoff.setdefault(key, _Backoff())
            state.attempts += 1
            delay = backoff_delay(state.attempts, self.rng)
            state.next_at = trio.current_time() + delay
            log.info(fmt("dial_failed", peer=pid or key, attempt=state.attempts, retry_in=f"{delay:.1f}s", reason=str(exc)))
        finally:
            self._dialing.discard(key)
            self.wake()

    async def _bootstrap_loop(self) -> None:
        if not self.init_connections:
            return
        while True:
            if not self.has_members() or not self.bootstrap:
                self.bootstrap = await bootstrap.resolve_init_connections(self.resolver, self.init_connections)
                for pid, addrs in self.bootstrap.items():
                    if pid is not None:
                        self.host.peerstore.add_addrs(pid, addrs)
                self.wake()
            await trio.sleep(REBOOTSTRAP_INTERVAL if self.bootstrap else 5.0)

    def member_status(self, peer_id: PeerId) -> Mapping[str, Any]:
        conn = self.host.connection_to(peer_id) if peer_id != self.ctx.peer_id else None
        rtt = conn.muxer.last_rtt if conn is not None else None
        return {"rtt_ms": round(rtt * 1000, 3) if rtt is not None else None}
