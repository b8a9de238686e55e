"""What the host knows about other peers: addresses, identify results (in memory, bounded).

Entries of peers that are not connected and not protected are forgotten `ttl` seconds after
they were last seen, and beyond `max_unprotected` of them the oldest go first.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ..identity import PeerId, PublicKey
from ..multiaddr import Multiaddr


@attrs.define
class PeerInfo:
    peer_id: PeerId
    addrs: list[Multiaddr] = attrs.Factory(list)
    protocols: tuple[str, ...] = ()
    agent_version: str | None = None
    protocol_version: str | None = None
    public_key: PublicKey | None = None
    observed_addr: Multiaddr | None = None
    seen_at: float | None = None  # when it was added or last disconnected; None while connected


class PeerStore:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._peers: dict[PeerId, PeerInfo] = {}
        self._clock = clock
        self._connected: set[PeerId] = set()

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def get(self, peer_id: PeerId) -> PeerInfo:
        info = self._peers.get(peer_id)
        if info is None:
            seen = None if peer_id in self._connected else self._clock()
            info = self._peers[peer_id] = PeerInfo(peer_id, seen_at=seen)
        return info

    def add_addrs(self, peer_id: PeerId, addrs: list[Multiaddr]) -> None:
        info = self.get(peer_id)
        for addr in addrs:
            addr = addr.without_peer_id()
            if addr not in info.addrs:
                info.addrs.append(addr)

    def addrs(self, peer_id: PeerId) -> list[Multiaddr]:
        info = self._peers.get(peer_id)
        return list(info.addrs) if info else []

    def mark_connected(self, peer_id: PeerId) -> None:
        self._connected.add(peer_id)
        info = self._peers.get(peer_id)
        if info is not None:
            info.seen_at = None

    def mark_disconnected(self, peer_id: PeerId) -> None:
        self._connected.discard(peer_id)
        info = self._peers.get(peer_id)
        if info is not None:
            info.seen_at = self._clock()

    def prune(self, is_protected: Callable[[PeerId], bool], ttl: float, max_unprotected: int) -> int:
        """Forget peers gone longer than `ttl` (and the oldest beyond `max_unprotected`) unless
        protected. Returns how many were forgotten."""
        now = self._clock()
        gone = [
            info for info in self._peers.values()
            if info.seen_at is not None and info.peer_id not in self._connected and not is_protected(info.peer_id)
        ]
        gone.sort(key=lambda info: info.seen_at or 0.0)
        excess = len(gone) - max_unprotected
        forgotten = 0
        for i, info in enumerate(gone):
            if i < excess or now - (info.seen_at or now) >= ttl:
                del self._peers[info.peer_id]
                forgotten += 1
        return forgotten
