"""Content-addressed block exchange (`/p2pnode/blocks/1.0.0`): any block by its SHA-256, from any
member that holds it.

A node serves every block it holds — in any synced folder, in any stored artifact — to members
only: services register *providers* (hash → bytes or None). A requester names the hash and gets
the bytes; it checks them against the hash before use, and a peer that sends a wrong block is
counted, logged and avoided for a while. `fetch` spreads requests over the candidate peers,
choosing the one with the fewest requests in flight; `ByteBudget` bounds the bytes a puller has
in flight (Syncthing uses 32 MiB per folder).

Per peer, `fetch` keeps what one connection can take: at most MAX_REQUESTS_PER_PEER requests in
flight (each is a stream; the peer refuses inbound streams beyond its per-connection limit, 128
by default) and, for requests whose size the caller names, replies that fit in half of this
node's per-connection memory (a reply is reserved at its length, plus its stream's receive
window, which grows with it). Sync's 32 MiB in flight against one peer otherwise filled the
32 MiB a connection may buffer and blocks failed (benchmarks/sync.py). Should this node's own
memory limit still refuse a request (its size unknown), that is not the peer's fault: the peer's
cap on requests in flight is halved (and grows back by one per reply), and the request waits for
another one to finish and asks again.

Bytes are hashed once per hop: a provider that has already checked what it read returns a
`VerifiedBlock`, and `fetch` returns one, so neither the server nor the caller hashes again.

Request `{hash: bstr .size 32}` → reply `{data: bstr}` or `{missing: true}` (or `{error:
"forbidden"}` to a non-member). Spec: protocols/blocks.md.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio

from .. import codec
from ..errors import P2PNodeError
from ..host.resources import MIN_STREAM_MEMORY
from ..identity import PeerId
from ..logfmt import fmt
from ..streamio import ResourceLimitExceeded
from . import rpc
from .roster import Roster
from .service import Service

PROTOCOL = "/p2pnode/blocks/1.0.0"
MAX_BLOCK = 4 << 20
LIMITS = rpc.Limits(max_request=256, max_reply=MAX_BLOCK + 256, timeout=30.0)
AVOID_AFTER = 3  # wrong blocks before a peer is avoided
AVOID_FOR = 300.0  # seconds
MAX_REQUESTS_PER_PEER = 32  # block requests in flight to one peer (a quarter of its default inbound streams per connection)
DEFAULT_PEER_BYTES = 16 << 20  # reply bytes in flight to one peer when the host has no resource limits to go by
LOCAL_LIMIT_RETRIES = 40  # times a request refused by this node's own memory limit is asked again
LOCAL_LIMIT_WAIT = 0.05  # seconds at most between those
HASH_OFF_THREAD = 256 << 10  # larger blocks are hashed on a worker thread, not on the event loop

log = logging.getLogger("p2pnode.blocks")

Provider = Callable[[bytes], Awaitable[bytes | None]]
Sources = Callable[[], tuple[Sequence[PeerId], Sequence[PeerId]]]  # () -> (candidates, fallback), asked again while waiting


class VerifiedBlock(bytes):
    """Block bytes already checked against their SHA-256 (`digest`): whoever gets one need not hash again."""

    digest: bytes

    def __new__(cls, data: bytes | bytearray | memoryview, digest: bytes) -> VerifiedBlock:
        block = super().__new__(cls, data)
        block.digest = digest
        return block


def is_verified(data: bytes, digest: bytes) -> bool:
    return isinstance(data, VerifiedBlock) and data.digest == digest


async def sha256(data: bytes) -> bytes:
    if len(data) >= HASH_OFF_THREAD:
        return await trio.to_thread.run_sync(lambda: hashlib.sha256(data).digest())
    return hashlib.sha256(data).digest()


class BlockUnavailable(P2PNodeError):
    """No candidate peer could supply the block (each one's reason is in the message)."""


@attrs.define
class PeerCounters:
    bytes_in: int = 0
    bytes_out: int = 0
    blocks_in: int = 0
    blocks_out: int = 0
    hash_failures: int = 0
    missing: int = 0


class ByteBudget:
    """At most `limit` bytes in flight; a single request larger than the limit still goes alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._changed = trio.Event()

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            await self._changed.wait()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()


class BlockExchange:
    def __init__(self, host: Any, roster: Roster, *, allow: Callable[[PeerId], bool] | None = None,
                 max_requests_per_peer: int = MAX_REQUESTS_PER_PEER):
        self.host = host
        self.roster = roster
        self.providers: list[Provider] = []
        self.peers: dict[PeerId, PeerCounters] = {}
        self.inflight: Counter[PeerId] = Counter()
        self.inflight_bytes: Counter[PeerId] = Counter()
        self.max_requests_per_peer = max_requests_per_peer
        limits = getattr(getattr(host, "resources", None), "limits", None)
        self.max_bytes_per_peer = limits.connection_memory // 2 if limits is not None else DEFAULT_PEER_BYTES
        self._released = trio.Event()
        self._caps: dict[PeerId, int] = {}  # peers whose requests in flight are capped lower, after local refusals
        self._strikes: dict[PeerId, tuple[int, float]] = {}
        self.blocks_served = 0
        self.hash_failures = 0
        is_allowed = allow or roster.is_member
        rpc.serve(host, PROTOCOL, self._serve, LIMITS, allow=lambda peer, request: is_allowed(peer))
        roster.on_change(self._prune)

    def _prune(self) -> None:
        for peer in [p for p in self.peers if not self.roster.is_member(p)]:
            del self.peers[peer]
        for peer in [p for p in self._strikes if not self.roster.is_member(p)]:
            del self._strikes[peer]
        for peer in [p for p in self._caps if not self.roster.is_member(p)]:
            del self._caps[peer]

    def add_provider(self, provider: Provider) -> None:
        self.providers.append(provider)

    def counters(self, peer: PeerId) -> PeerCounters:
        counters = self.peers.get(peer)
        if counters is None:
            counters = self.peers[peer] = PeerCounters()
        return counters

    async def read_local(self, digest: bytes) -> bytes | None:
        """The block from this node's own providers, verified (a file may have changed since it was indexed)."""
        for provider in self.providers:
            data = await provider(digest)
            if data is not None and (is_verified(data, digest) or await sha256(data) == digest):
                return data
        return None

    async def _serve(self, request: dict[str, Any], conn: Any) -> dict[str, Any]:
        digest = codec.Fields(request, "block request").blob("hash")
        if digest is None or len(digest) != 32:
            return {"missing": True}
        data = await self.read_local(digest)
        if data is None:
            return {"missing": True}
        c = self.counters(conn.peer_id)
        c.bytes_out += len(data)
        c.blocks_out += 1
        self.blocks_served += 1
        return {"data": data}

    # -- fetching -------------------------------------------------------------------------------
    def avoided(self, peer: PeerId) -> bool:
        strikes = self._strikes.get(peer)
        return strikes is not None and strikes[0] >= AVOID_AFTER and trio.current_time() < strikes[1]

    def _strike(self, peer: PeerId) -> None:
        count, _ = self._strikes.get(peer, (0, 0.0))
        self._strikes[peer] = (count + 1, trio.current_time() + AVOID_FOR)
        if count + 1 == AVOID_AFTER:
            log.warning(fmt("peer_avoided", peer=peer, reason="sent wrong blocks", seconds=int(AVOID_FOR)))

    async def fetch(self, digest: bytes, candidates: Sequence[PeerId], fallback: Sequence[PeerId] = (),
                    size: int | None = None, *, sources: Sources | None = None) -> tuple[VerifiedBlock, PeerId]:
        """The block `digest` from one of `candidates` (least busy first, avoided peers last), then
        from `fallback` in its order (e.g. the original source, asked only when no one else has
        it); verified. Raises BlockUnavailable when none supplies it.

        `size`, when the caller knows it, lets the exchange keep the bytes in flight to one peer
        within what its connection may buffer. `sources`, when given, is asked again for
        (candidates, fallback) whenever the peer to ask has no free slot: the request waits for
        one, and meanwhile another peer may have got the block (swarming: the source's slots are
        not taken by blocks that the other receivers are about to have)."""
        # A reply is reserved at its length, and its stream's receive window (reserved too) may grow
        # to about twice that while it arrives.
        cost = 3 * size + MIN_STREAM_MEMORY if size is not None else 0
        reasons: list[str] = []
        asked: set[PeerId] = set()
        while True:
            order = self._order(candidates, fallback, asked)
            if not order:
                raise BlockUnavailable(f"block {digest.hex()[:16]}…: " + ("; ".join(reasons[:8]) if reasons else "no peer to ask"))
            peer = order[0]
            if sources is not None and not self._room(peer, cost):
                await self._released.wait()
                candidates, fallback = sources()
                continue
            asked.add(peer)
            reply = await self._request(peer, digest, cost, reasons)
            if reply is None:
                continue
            data = reply.get("data")
            c = self.counters(peer)
            if not isinstance(data, bytes):
                c.missing += 1
                reasons.append(f"{peer.short()}: missing")
                continue
            if await sha256(data) != digest:
                c.hash_failures += 1
                self.hash_failures += 1
                self._strike(peer)
                log.warning(fmt("block_hash_mismatch", peer=peer, block=digest.hex()[:16], size=len(data)))
                reasons.append(f"{peer.short()}: wrong data")
                continue
            c.bytes_in += len(data)
            c.blocks_in += 1
            return VerifiedBlock(data, digest), peer

    def _order(self, candidates: Sequence[PeerId], fallback: Sequence[PeerId], asked: set[PeerId]) -> list[PeerId]:
        usable = [p for p in candidates if p != self.roster.me and p not in asked]
        order = sorted(usable, key=lambda p: (self.avoided(p), self.inflight[p]))
        return order + [p for p in fallback if p != self.roster.me and p not in asked and p not in order]

    async def _request(self, peer: PeerId, digest: bytes, cost: int, reasons: list[str]) -> dict[str, Any] | None:
        """One block request to `peer` in a slot of its own; None (and the reason) if it failed."""
        for attempt in range(LOCAL_LIMIT_RETRIES + 1):
            await self._acquire(peer, cost)
            try:
                reply = await rpc.request(self.host, peer, PROTOCOL, {"hash": digest}, LIMITS)
                self._widen(peer)
                return reply
            except ResourceLimitExceeded as exc:  # this node's own limit: not the peer's doing
                self._narrow(peer)
                if attempt == LOCAL_LIMIT_RETRIES:
                    reasons.append(f"{peer.short()}: {exc}")
                    return None
            except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reasons.append(f"{peer.short()}: {exc}")
                return None
            finally:
                self._release(peer, cost)
            # Until another request finishes, or a moment for streams that ended to give back
            # their windows (a stream's memory is freed when both sides have closed it).
            with trio.move_on_after(LOCAL_LIMIT_WAIT):
                await self._released.wait()
        return None

    def _room(self, peer: PeerId, cost: int) -> bool:
        return self.inflight[peer] < self._caps.get(peer, self.max_requests_per_peer) and not (
            self.inflight_bytes[peer] and self.inflight_bytes[peer] + cost > self.max_bytes_per_peer)

    async def _acquire(self, peer: PeerId, cost: int) -> None:
        """A request slot to `peer`: fewer requests in flight than its cap, and `cost` more bytes
        within max_bytes_per_peer (a single request larger than that still goes, alone)."""
        while not self._room(peer, cost):
            await self._released.wait()
        self.inflight[peer] += 1
        self.inflight_bytes[peer] += cost

    def _narrow(self, peer: PeerId) -> None:
        """This node's memory refused a request to `peer`: halve the requests it may have in flight
        there (requests of unknown size are only bounded this way)."""
        self._caps[peer] = max(1, min(self._caps.get(peer, self.max_requests_per_peer), self.inflight[peer]) // 2)

    def _widen(self, peer: PeerId) -> None:
        cap = self._caps.get(peer)
        if cap is not None:
            if cap + 1 >= self.max_requests_per_peer:
                del self._caps[peer]
            else:
                self._caps[peer] = cap + 1

    def _release(self, peer: PeerId, cost: int) -> None:
        self.inflight[peer] -= 1
        self.inflight_bytes[peer] -= cost
        if not self.inflight[peer]:
            del self.inflight[peer]
            del self.inflight_bytes[peer]
        self._released.set()
        self._released = trio.Event()

    def status(self) -> Mapping[str, Any]:
        return {
            "blocks": {
                "served": self.blocks_served,
                "hash_failures": self.hash_failures,
                "peers": {str(p): attrs.asdict(c) for p, c in sorted(self.peers.items())},
            }
        }


class BlockService(Service):
    """The exchange's counters in the node's status (bytes in/out per peer, served, hash failures)."""

    name = "blocks"

    def __init__(self, exchange: BlockExchange):
        self.exchange = exchange

    def status(self) -> Mapping[str, Any]:
        return self.exchange.status()


__all__ = ["BlockService", "BlockExchange", "BlockUnavailable", "ByteBudget", "MAX_BLOCK", "PROTOCOL", "Provider", "PeerCounters",
           "VerifiedBlock", "is_verified"]
