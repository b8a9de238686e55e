"""Content-addressed block exchange (`/p2pnode/blocks/1.0.0`): any block by its SHA-256, from any
member that holds it.

A node serves every block it holds — in any synced folder, in any stored artifact — to members
only: services register *providers* (hash → bytes or None). A requester names the hash and gets
the bytes; it checks them against the hash before use, and a peer that sends a wrong block is
counted, logged and avoided for a while. `fetch` spreads requests over the candidate peers,
choosing the one with the fewest requests in flight; `ByteBudget` bounds the bytes a puller has
in flight (Syncthing uses 32 MiB per folder).

Per peer, besides the bytes of replies awaited (PEER_INFLIGHT_BYTES), at most
MAX_REQUESTS_PER_PEER requests are in flight: each is a stream, and the peer refuses inbound
streams beyond its per-connection limit (128 by default; 256 KiB blocks at 32 MiB in flight were
refused so, benchmarks/sync.py). A request that this node's own memory limit refuses is not the
peer's fault: the requests allowed at once to that peer are halved (and grow back by one per
reply), and the request waits for another one to finish and is asked again.

Bytes are hashed once per hop: a provider that has already checked what it read returns a
`VerifiedBlock`, and `fetch` returns one, so neither the server nor the caller hashes again;
large blocks are hashed on a worker thread, not on the event loop.

Small blocks travel in batches: requests for blocks of at most BATCH_BLOCK bytes to one peer that
start within BATCH_WAIT of each other share one stream (up to BATCH_MAX of them): one request,
one reply, one lookup on the serving side. A folder of many small files costs a stream per batch,
not per file.

Request `{hash: bstr .size 32}` → reply `{data: bstr}` or `{missing: true}`; or `{hashes: [* bstr]}`
→ `{blocks: [* bstr / null]}` (null: missing); or `{error: "forbidden"}` to a non-member.
Spec: protocols/blocks.md.
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
from ..identity import PeerId
from ..logfmt import fmt
from ..streamio import ResourceLimitExceeded
from . import rpc
from .roster import Roster
from .service import Service

PROTOCOL = "/p2pnode/blocks/1.0.0"
MAX_BLOCK = 4 << 20
BATCH_BLOCK = 128 << 10  # blocks up to this size are asked for in batches
BATCH_MAX = 64  # blocks in one batch
BATCH_BYTES = 2 << 20  # bytes in one batch's reply
BATCH_WAIT = 0.002  # seconds a batch waits for company before it is sent
BATCH_LIMITS = rpc.Limits(max_request=BATCH_MAX * 40 + 256, max_reply=BATCH_BYTES + BATCH_MAX * 16 + 256, timeout=30.0)
LIMITS = rpc.Limits(max_request=BATCH_MAX * 40 + 256, max_reply=MAX_BLOCK + 256, timeout=30.0)
AVOID_AFTER = 3  # wrong blocks before a peer is avoided
PEER_INFLIGHT_BYTES = 8 << 20  # replies in flight from one peer: well under the host's per-connection memory budget
SUSPECT_FOR = 30.0  # a peer that let a request time out is "suspect" this long (a dead link looks alive until keepalive notices)
SUSPECT_TIMEOUT = 3.0  # a suspect peer is asked with this deadline,
SUSPECT_PROBE_EVERY = 2.0  # at most this often; in between, requests that only it could answer fail at once
AVOID_FOR = 300.0  # seconds
MAX_REQUESTS_PER_PEER = 64  # block requests in flight to one peer: half its default inbound streams per connection
LOCAL_LIMIT_RETRIES = 40  # times a request refused by this node's own memory limit is asked again
LOCAL_LIMIT_WAIT = 0.05  # seconds at most between those (a closed stream's memory comes back when both sides closed it)
HASH_OFF_THREAD = 256 << 10  # larger blocks are hashed on a worker thread, not on the event loop

log = logging.getLogger("p2pnode.blocks")

Provider = Callable[[bytes], Awaitable[bytes | None]]
ManyProvider = Callable[[Sequence[bytes]], Awaitable[dict[bytes, bytes]]]


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


class _Batch:
    """Small-block requests to one peer that go out together; the first one's task sends them."""

    def __init__(self) -> None:
        self.digests: list[bytes] = []
        self.nbytes = 0
        self.sent = False
        self.full = trio.Event()
        self.done = trio.Event()
        self.results: dict[bytes, bytes] = {}
        self.error: Exception | None = None

    def room_for(self, size: int) -> bool:
        return not self.sent and len(self.digests) < BATCH_MAX and self.nbytes + size <= BATCH_BYTES


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

    def has_room(self, n: int) -> bool:
        return not self.used or self.used + n <= self.limit

    def try_acquire(self, n: int) -> bool:
        """Take `n` bytes now if there is room, without waiting."""
        if not self.has_room(n):
            return False
        self.used += n
        return True

    async def wait_released(self) -> None:
        await self._changed.wait()


class BlockExchange:
    def __init__(self, host: Any, roster: Roster, *, allow: Callable[[PeerId], bool] | None = None,
                 max_requests_per_peer: int = MAX_REQUESTS_PER_PEER):
        self.host = host
        self.roster = roster
        self.providers: list[tuple[Provider, ManyProvider | None]] = []
        self._batches: dict[PeerId, _Batch] = {}
        self.peers: dict[PeerId, PeerCounters] = {}
        self.inflight: Counter[PeerId] = Counter()
        self.max_requests_per_peer = max_requests_per_peer
        self.sending: Counter[PeerId] = Counter()  # requests on the wire (inflight also counts those waiting for bytes)
        self._caps: dict[PeerId, int] = {}  # lower caps on requests at once, after this node's memory refused some
        self._request_done = trio.Event()
        self._peer_budgets: dict[PeerId, ByteBudget] = {}
        self._suspect_until: dict[PeerId, float] = {}
        self._probe_at: dict[PeerId, float] = {}
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
        for peer in [p for p, b in self._peer_budgets.items() if not b.used and not self.roster.is_member(p)]:
            del self._peer_budgets[peer]
        for peer in [p for p in self._caps if not self.roster.is_member(p)]:
            del self._caps[peer]
        for peer in [p for p in self._suspect_until if not self.roster.is_member(p)]:
            del self._suspect_until[peer]
            self._probe_at.pop(peer, None)

    def add_provider(self, provider: Provider, many: ManyProvider | None = None) -> None:
        """`provider(hash)`: a block this node holds, or None; `many(hashes)`, if given, does a batch
        in one go (hash -> block for those it holds)."""
        self.providers.append((provider, many))

    def counters(self, peer: PeerId) -> PeerCounters:
        counters = self.peers.get(peer)
        if counters is None:
            counters = self.peers[peer] = PeerCounters()
        return counters

    async def read_local(self, digest: bytes) -> bytes | None:
        """The block from this node's own providers, verified (a file may have changed since it was indexed)."""
        for provider, _ in self.providers:
            data = await provider(digest)
            if data is not None and (is_verified(data, digest) or await sha256(data) == digest):
                return data
        return None

    async def read_local_many(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        """Several blocks at once, verified: batch-capable providers first, one call each."""
        found: dict[bytes, bytes] = {}
        for provider, many in self.providers:
            wanted = [d for d in digests if d not in found]
            if not wanted:
                break
            if many is not None:
                got = await many(wanted)
            else:
                got = {}
                for d in wanted:
                    data = await provider(d)
                    if data is not None:
                        got[d] = data
            for d, data in got.items():
                if d in wanted and (is_verified(data, d) or await sha256(data) == d):
                    found[d] = data
        return found

    def _served(self, peer: PeerId, data: bytes) -> None:
        c = self.counters(peer)
        c.bytes_out += len(data)
        c.blocks_out += 1
        self.blocks_served += 1

    async def _serve(self, request: dict[str, Any], conn: Any) -> dict[str, Any]:
        f = codec.Fields(request, "block request")
        if "hashes" in f.raw:
            digests = [d for d in f.items("hashes", max_items=BATCH_MAX) if isinstance(d, bytes) and len(d) == 32]
            found = await self.read_local_many(digests)
            blocks: list[bytes | None] = []
            size = 0
            for d in digests:
                data = found.get(d)
                if data is not None and size + len(data) <= BATCH_BYTES:
                    size += len(data)
                    self._served(conn.peer_id, data)
                    blocks.append(data)
                else:
                    blocks.append(None)
            return {"blocks": blocks}
        digest = f.blob("hash")
        if digest is None or len(digest) != 32:
            return {"missing": True}
        data = await self.read_local(digest)
        if data is None:
            return {"missing": True}
        self._served(conn.peer_id, data)
        return {"data": data}

    # -- fetching -------------------------------------------------------------------------------
    def budget(self, peer: PeerId) -> ByteBudget:
        """The bytes of replies awaited from `peer` (callers may check for room before choosing it)."""
        budget = self._peer_budgets.get(peer)
        if budget is None:
            budget = self._peer_budgets[peer] = ByteBudget(PEER_INFLIGHT_BYTES)
        return budget

    def avoided(self, peer: PeerId) -> bool:
        strikes = self._strikes.get(peer)
        return strikes is not None and strikes[0] >= AVOID_AFTER and trio.current_time() < strikes[1]

    def _strike(self, peer: PeerId) -> None:
        count, _ = self._strikes.get(peer, (0, 0.0))
        self._strikes[peer] = (count + 1, trio.current_time() + AVOID_FOR)
        if count + 1 == AVOID_AFTER:
            log.warning(fmt("peer_avoided", peer=peer, reason="sent wrong blocks", seconds=int(AVOID_FOR)))

    async def fetch(self, digest: bytes, candidates: Sequence[PeerId], fallback: Sequence[PeerId] = (),
                    size: int = MAX_BLOCK, reserved: PeerId | None = None) -> tuple[VerifiedBlock, PeerId]:
        """The block `digest` (of `size` bytes, at most) from one of `candidates` (least busy first,
        avoided peers last), then from `fallback` in its order (e.g. the original source, asked
        only when no one else has it); verified. Raises BlockUnavailable when none supplies it.
        At most PEER_INFLIGHT_BYTES of replies are awaited from one peer at a time; `reserved`:
        a peer whose budget the caller already took `size` from (released here)."""
        held = [reserved] if reserved is not None else []
        try:
            return await self._fetch(digest, candidates, fallback, size, held)
        finally:
            for peer in held:  # a reservation the attempts did not use
                self.budget(peer).release(size)

    async def _fetch(self, digest: bytes, candidates: Sequence[PeerId], fallback: Sequence[PeerId], size: int,
                     held: list[PeerId]) -> tuple[VerifiedBlock, PeerId]:
        now = trio.current_time()
        usable = [p for p in candidates if p != self.roster.me]
        order = sorted(usable, key=lambda p: (self.avoided(p), self._suspect_until.get(p, 0) > now, self.inflight[p]))
        order += sorted((p for p in fallback if p != self.roster.me and p not in order),
                        key=lambda p: self._suspect_until.get(p, 0) > now)
        reasons = []
        for peer in order:
            budget = self.budget(peer)
            now = trio.current_time()
            suspect = self._suspect_until.get(peer, 0) > now
            if suspect:
                if self._probe_at.get(peer, 0) > now:
                    reasons.append(f"{peer.short()}: not answering")
                    continue  # fail fast: the caller gets on with blocks other peers have
                self._probe_at[peer] = now + SUSPECT_PROBE_EVERY
            limits = attrs.evolve(LIMITS, timeout=SUSPECT_TIMEOUT) if suspect else LIMITS
            self.inflight[peer] += 1
            if peer in held:
                held.remove(peer)  # taken by the caller: released below like our own
            else:
                await budget.acquire(size)
            try:
                if size <= BATCH_BLOCK:
                    reply = await self._batched(peer, digest, size, limits)
                else:
                    reply = await self._request(peer, {"hash": digest}, limits)
            except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if "timed out" in str(exc) or "no reply within" in str(exc):
                    self._suspect_until[peer] = trio.current_time() + SUSPECT_FOR
                reasons.append(f"{peer.short()}: {exc}")
                continue
            finally:
                budget.release(size)
                self.inflight[peer] -= 1
                if not self.inflight[peer]:
                    del self.inflight[peer]
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
            self._suspect_until.pop(peer, None)
            self._probe_at.pop(peer, None)
            return VerifiedBlock(data, digest), peer
        raise BlockUnavailable(f"block {digest.hex()[:16]}…: " + ("; ".join(reasons[:8]) if reasons else "no peer to ask"))

    async def _batched(self, peer: PeerId, digest: bytes, size: int, limits: rpc.Limits) -> dict[str, Any]:
        """A small block's request, sent together with others to the same peer: the first request of
        a batch waits BATCH_WAIT (or until the batch is full), sends them all, and hands out the
        answers; the others wait for it. Returns the single-request reply shape."""
        batch = self._batches.get(peer)
        leader = batch is None or not batch.room_for(size)
        if leader:
            batch = self._batches[peer] = _Batch()
        assert batch is not None
        batch.digests.append(digest)
        batch.nbytes += size
        if not batch.room_for(BATCH_BLOCK):
            batch.full.set()
        if leader:
            with trio.move_on_after(BATCH_WAIT):
                await batch.full.wait()
            batch.sent = True
            if self._batches.get(peer) is batch:
                del self._batches[peer]
            try:
                timeout = attrs.evolve(BATCH_LIMITS, timeout=limits.timeout)
                reply = await self._request(peer, {"hashes": batch.digests}, timeout)
                blocks = codec.Fields(reply, "block batch reply").items("blocks", max_items=BATCH_MAX)
                batch.results = {d: b for d, b in zip(batch.digests, blocks) if isinstance(b, bytes)}
            except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                batch.error = exc
                raise
            except BaseException:
                batch.error = P2PNodeError(f"the batch request to {peer.short()} was cancelled")
                raise
            finally:
                batch.done.set()
        else:
            await batch.done.wait()
            if batch.error is not None:
                raise batch.error
        data = batch.results.get(digest)
        return {"data": data} if data is not None else {"missing": True}

    async def _request(self, peer: PeerId, message: dict[str, Any], limits: rpc.Limits) -> dict[str, Any]:
        """One request, on a stream of its own, with fewer than max_requests_per_peer to `peer` on the wire."""
        for attempt in range(LOCAL_LIMIT_RETRIES + 1):
            while self.sending[peer] >= self._caps.get(peer, self.max_requests_per_peer):
                await self._request_done.wait()
            self.sending[peer] += 1
            try:
                reply = await rpc.request(self.host, peer, PROTOCOL, message, limits)
                cap = self._caps.pop(peer, None)
                if cap is not None and cap + 1 < self.max_requests_per_peer:
                    self._caps[peer] = cap + 1  # back up by one per reply
                return reply
            except ResourceLimitExceeded:  # this node's own memory: not the peer's doing; fewer at once to it
                self._caps[peer] = max(1, min(self._caps.get(peer, self.max_requests_per_peer), self.sending[peer]) // 2)
                if attempt == LOCAL_LIMIT_RETRIES:
                    raise
            finally:
                self.sending[peer] -= 1
                if not self.sending[peer]:
                    del self.sending[peer]
                self._request_done.set()
                self._request_done = trio.Event()
            with trio.move_on_after(LOCAL_LIMIT_WAIT):
                await self._request_done.wait()  # until another request is done, then ask again
        raise AssertionError("unreachable")

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
