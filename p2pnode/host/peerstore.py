"""What the host knows about other peers: addresses, identify results (in memory)."""

from __future__ import annotations

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


class PeerStore:
    def __init__(self) -> None:
        self._peers: dict[PeerId, PeerInfo] = {}

    def get(self, peer_id: PeerId) -> PeerInfo:
        info = self._peers.get(peer_id)
        if info is None:
            info = self._peers[peer_id] = PeerInfo(peer_id)
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
