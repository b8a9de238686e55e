"""The document bus: every signed document that replicates across the cluster goes through here.

A service registers a `DocumentType`: its envelope type, how to verify it (pure: envelope + now →
Accepted, or DecodeError with a `code`), how versions are ordered, and what to do once one is
accepted. The bus does the rest, the same way for every type:

  offer → size check → cheap ordering pre-check on the unverified payload (a document that would be
  ignored costs no signature checks) → verify (off the event loop when large) → durable write →
  in-memory state and the type's `apply` → forward once to members (and to whoever the type adds,
  e.g. the members a new snapshot removed, so they learn it).

Ordering: `lww` — one current version per key; a newer `issued_at` wins, and for equal `issued_at`
the lower digest (SHA-256 of the envelope's canonical bytes) wins, the same on every node, so nodes
never diverge. `append` — every valid document is kept (revocations).

Protocols (spec: protocols/documents.md):
  /p2pnode/doc-push/1.0.0  {doc, forwarded_to?, auth?} → verdict. Anyone may push (trust comes from
                           the signatures), but a non-member only small documents and not many.
  /p2pnode/doc-pull/1.0.0  per-type summaries, then (key, issued_at, digest) lists for the types that
                           differ → the documents the asker lacks. Members, and whoever presents a
                           valid admin proof for the key it connected with (`auth`), get every type;
                           anyone else only the public ones (revocations). A node pulls from every
                           new connection of a member or protected peer (bootstrap), quietly
                           skipping peers that serve no pull (the CLI), and from a few strangers'
                           connections: STRANGER_PULLS, whose documents count as strangers' pushes.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import trio

from .. import codec, timefmt
from ..envelope import Envelope
from ..errors import DecodeError, NegotiationFailed, P2PNodeError
from ..identity import PeerId
from ..logfmt import fmt, limited
from . import rpc
from .clock import Clock
from .db import StoreError
from .docstore import DocumentStore, StoredDocument
from .roster import Roster

PUSH = "/p2pnode/doc-push/1.0.0"
PULL = "/p2pnode/doc-pull/1.0.0"
LWW = "lww"
APPEND = "append"

MAX_DOCUMENT = 4 << 20
PUSH_LIMITS = rpc.Limits(max_request=MAX_DOCUMENT + (1 << 20), max_reply=8 << 10, timeout=10.0)
PULL_LIMITS = rpc.Limits(max_request=4 << 20, max_reply=MAX_DOCUMENT + (1 << 20), timeout=20.0)
MAX_FORWARDED_TO = 10_000
MAX_PULL_ROUNDS = 16
MAX_FORWARDS_IN_FLIGHT = 256
STRANGER_MAX_DOCUMENT = 1 << 20
STRANGER_PUSHES = (20, 10.0)  # non-members together: at most 20 documents per 10 s, pushed or pulled from them
STRANGER_PULLS = (10, 10.0)  # pulls from non-members' new connections: at most 10 per 10 s, node-wide
OFF_LOOP_BYTES = 64 << 10  # verify payloads larger than this on a worker thread

log = logging.getLogger("p2pnode.bus")


@attrs.frozen
class Verdict:
    result: str  # "accepted" | "ignored" | "rejected" | "failed" (valid, but could not be stored now)
    code: str = ""
    reason: str = ""
    held: str = ""  # for an ignored lww document: the issued_at of the version this node holds

    def to_dict(self) -> dict[str, str]:
        out = {"result": self.result, "code": self.code, "reason": self.reason}
        if self.held:
            out["held"] = self.held
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Verdict:
        f = codec.Fields(raw, "push verdict")
        return cls(
            f.text("result", max_len=16),
            f.text("code", optional=True, default="", max_len=64),
            f.text("reason", optional=True, default="", max_len=2048),
            f.text("held", optional=True, default="", max_len=64),
        )


@attrs.frozen
class Accepted:
    """A verified document: its ordering key (LWW), its issued_at, and the parsed value."""

    key: str
    issued_at_ns: int
    doc: Any


Verify = Callable[[Envelope, int], Accepted]


@attrs.frozen
class DocumentType:
    name: str  # the envelope type
    verify: Verify  # pure, thread-safe; raises DecodeError (with .code) to reject
    apply: Callable[[Accepted, Envelope, PeerId | None, bool], None]  # (…, source, loaded) after the durable write
    ordering: str = LWW
    peek: Callable[[dict[str, Any]], tuple[str, int]] | None = None  # (key, issued_at) of an unverified payload
    reload: Verify | None = None  # verification of a stored document at start (default: verify)
    keep: int | None = 10  # versions per key kept on disk (None: all)
    max_size: int = MAX_DOCUMENT
    extra_targets: Callable[[Accepted], Iterable[PeerId]] | None = None
    rejected_action: str = "document_rejected"  # the log line's action for a rejection
    public: bool = False  # served to non-members too (revocations: an admin tool must learn it is revoked)


@attrs.frozen
class Held:
    issued_at_ns: int
    digest: str


def wins(new: Held, old: Held) -> bool:
    """LWW with a deterministic tie-break: newer issued_at, then the lower digest."""
    return (new.issued_at_ns, _neg(new.digest)) > (old.issued_at_ns, _neg(old.digest))


def _neg(digest: str) -> bytes:
    return bytes(255 - b for b in bytes.fromhex(digest)) if len(digest) == 64 else b""


class DocumentBus:
    def __init__(self, host: Any, store: DocumentStore, roster: Roster, clock: Clock):
        self.host = host
        self.store = store
        self.roster = roster
        self.clock = clock
        self.types: dict[str, DocumentType] = {}
        self.held: dict[str, dict[str, Held]] = {}
        self.rejections: Counter[tuple[str, str]] = Counter()
        self.authorize: Callable[[PeerId, dict[str, Any]], bool] = lambda peer, request: False
        self._summaries: dict[str, str] = {}
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._forwards = 0
        self._stranger_docs = _Window(*STRANGER_PUSHES)
        self._stranger_pulls = _Window(*STRANGER_PULLS)
        self.forward_drops = 0
        self.stranger_pulls_skipped = 0
        rpc.serve(host, PUSH, self._serve_push, PUSH_LIMITS)
        rpc.serve(host, PULL, self._serve_pull, PULL_LIMITS)
        host.on_connected(self._on_connected)

    # -- registry ------------------------------------------------------------------------------
    def register(self, dtype: DocumentType) -> None:
        if dtype.name in self.types:
            raise ValueError(f"document type {dtype.name!r} is registered twice")
        self.types[dtype.name] = dtype
        self.held[dtype.name] = {}

    def holding(self, type_: str) -> dict[str, Held]:
        return self.held.get(type_, {})

    # -- lifetime ------------------------------------------------------------------------------
    async def load(self) -> None:
        """Restore every registered type from the database, re-verified, in registration order (so
        revocations are in force before snapshots are checked). For LWW types the newest valid
        version of each key wins; an invalid newest one falls back to the next stored version."""
        for dtype in self.types.values():
            verify = dtype.reload or dtype.verify
            invalid = 0
            chosen: set[str] = set()
            for row in await self.store.load(dtype.name):
                if dtype.ordering == LWW and row.key in chosen:
                    continue
                try:
                    env = Envelope.from_bytes(row.envelope, dtype.name)
                    accepted = verify(env, self.clock.now_ns())
                except DecodeError as exc:
                    invalid += 1
                    if invalid <= 3:
                        log.warning(fmt("stored_document_invalid", type=dtype.name, key=row.key or None, reason=str(exc)))
                    continue
                chosen.add(accepted.key)
                self.held[dtype.name][accepted.key] = Held(accepted.issued_at_ns, row.digest)
                dtype.apply(accepted, env, None, True)
            if invalid > 3:
                log.warning(fmt("stored_documents_invalid", type=dtype.name, count=invalid))
            self._summaries.pop(dtype.name, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- accepting -----------------------------------------------------------------------------
    async def offer(self, env: Envelope, source: PeerId | None = None, forwarded_to: frozenset[PeerId] = frozenset()) -> Verdict:
        """Verify and apply a document from `source` (None: the local operator). `forwarded_to`:
        peers the sender says are already being sent the same document."""
        dtype = self.types.get(env.type)
        if dtype is None:
            return Verdict("rejected", "unknown_type", f"this node does not accept {env.type} documents")
        if len(env.payload) > dtype.max_size:
            return self._reject(dtype, DecodeError(f"{env.type} of {len(env.payload)} bytes exceeds {dtype.max_size}"), source)
        digest = env.digest()
        large = len(env.payload) > OFF_LOOP_BYTES  # decode and verify those off the event loop
        if large:
            known = await trio.to_thread.run_sync(self._ordering_verdict, dtype, env, digest)
        else:
            known = self._ordering_verdict(dtype, env, digest)
        if known is not None:
            return known
        now = self.clock.now_ns()
        try:
            if large:
                accepted = await trio.to_thread.run_sync(dtype.verify, env, now)
            else:
                accepted = dtype.verify(env, now)
        except DecodeError as exc:
            return self._reject(dtype, exc, source)
        held = Held(accepted.issued_at_ns, digest)
        key = accepted.key if dtype.ordering == LWW else digest
        async with self._lock:
            current = self.held[dtype.name].get(key)
            if current is not None and (current.digest == digest or not wins(held, current)):
                return Verdict("ignored", "not_newer" if current.digest != digest else "known",
                               "this node already holds that or a newer version", timefmt.format_ns(current.issued_at_ns))
            try:
                await self.store.put(
                    StoredDocument(dtype.name, key, digest, accepted.issued_at_ns, env.to_bytes(), str(source) if source else None),
                    dtype.keep if dtype.ordering == LWW else None,
                )
            except StoreError as exc:
                return Verdict("failed", "store", f"this node could not store it: {exc}")
            previous = current
            self.held[dtype.name][key] = held
            self._summaries.pop(dtype.name, None)
            dtype.apply(accepted, env, source, False)
        log.debug(fmt("document_accepted", type=dtype.name, key=key or None, source=source or "local", replaced=previous is not None))
        self._forward(dtype, accepted, env, forwarded_to, source)
        return Verdict("accepted")

    def _ordering_verdict(self, dtype: DocumentType, env: Envelope, digest: str) -> Verdict | None:
        """The cheap pre-check: decide `ignored` from the unverified payload. Ignoring changes no
        state, so trusting the claim is safe; anything that would change state is verified first."""
        if dtype.ordering == APPEND:
            return Verdict("ignored", "known", "this node already has this document") if digest in self.held[dtype.name] else None
        if dtype.peek is None:
            return None
        try:
            key, issued = dtype.peek(codec.decode_map(env.payload, dtype.name))
        except DecodeError:
            return None  # verification will say what is wrong
        current = self.held[dtype.name].get(key)
        if current is None:
            return None
        held = timefmt.format_ns(current.issued_at_ns)
        if current.digest == digest:
            return Verdict("ignored", "known", "this node already has this document", held)
        if not wins(Held(issued, digest), current):
            return Verdict("ignored", "not_newer", f"this node holds a newer version (issued at {held}) or an equal one that wins the tie-break", held)
        return None

    def _reject(self, dtype: DocumentType, exc: DecodeError, source: PeerId | None) -> Verdict:
        code, reason = str(getattr(exc, "code", "malformed")), str(exc)
        self.rejections[(dtype.name, code)] += 1
        limited.warning(log, fmt(dtype.rejected_action, code=code, reason=reason, source=source or "local"),
                        key=(dtype.rejected_action, code))
        return Verdict("rejected", code, reason)

    def rejection_counts(self, type_: str) -> dict[str, int]:
        return {code: n for (t, code), n in self.rejections.items() if t == type_}

    # -- forwarding ----------------------------------------------------------------------------
    def _forward(self, dtype: DocumentType, accepted: Accepted, env: Envelope, already: frozenset[PeerId], source: PeerId | None) -> None:
        """Push once to every connected member (and the type's extra targets) not already covered.
        The push names everyone covered, so in a full mesh the first round reaches everybody and
        nobody forwards again: N-1 pushes, not N²."""
        if self._nursery is None:
            return
        me = self.roster.me
        skip = set(already) | {me} | ({source} if source else set())
        wanted = list(self.roster.members) + list(dtype.extra_targets(accepted) if dtype.extra_targets else ())
        targets = sorted({p for p in wanted if p not in skip and self.host.connection_to(p) is not None})
        if not targets:
            return
        covered = sorted(str(p) for p in skip | set(targets))
        message: dict[str, Any] = {"doc": env.to_dict(), "forwarded_to": covered[:MAX_FORWARDED_TO]}
        if len(codec.encode(message)) > PUSH_LIMITS.max_request:
            message = {"doc": env.to_dict()}  # the list only saves pushes; reach does not need it
            if len(codec.encode(message)) > PUSH_LIMITS.max_request:
                self.forward_drops += 1
                log.warning(fmt("forward_dropped", type=dtype.name, reason="too large to push", peers=len(targets)))
                return
        for peer in targets:
            if self._forwards >= MAX_FORWARDS_IN_FLIGHT:
                self.forward_drops += 1
                continue  # pulls on the next connection fill the gap
            self._forwards += 1
            self._nursery.start_soon(self._push_quietly, peer, message)

    async def _push_quietly(self, peer: PeerId, message: dict[str, Any]) -> None:
        try:
            reply = await rpc.request(self.host, peer, PUSH, message, PUSH_LIMITS)
            log.debug(fmt("forwarded", peer=peer, result=reply.get("result")))
        except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(fmt("forward_failed", peer=peer, reason=str(exc) or type(exc).__name__))
        finally:
            self._forwards -= 1

    # -- serving -------------------------------------------------------------------------------
    def is_stranger(self, peer: PeerId, request: dict[str, Any]) -> bool:
        """Neither a member nor the holder of a valid admin proof for its own key (see `authorize`)."""
        return not self.roster.is_member(peer) and not self.authorize(peer, request)

    async def _serve_push(self, request: dict[str, Any], conn: Any) -> dict[str, Any]:
        try:
            env = Envelope.from_dict(request.get("doc"))
        except DecodeError as exc:
            return Verdict("rejected", "malformed", f"push request: {exc}").to_dict()
        if self.is_stranger(conn.peer_id, request):
            refusal = self._stranger_refusal(env)
            if refusal is not None:
                return refusal.to_dict()
        verdict = await self.offer(env, conn.peer_id, _peer_set(request.get("forwarded_to")))
        return verdict.to_dict()

    def _stranger_refusal(self, env: Envelope) -> Verdict | None:
        """Non-members (the admin tool without its key, or anyone) may hand us signed documents
        (push, or answer our pull), but small ones and not many: together at most STRANGER_PUSHES."""
        if len(env.payload) > STRANGER_MAX_DOCUMENT:
            return Verdict("rejected", "too_large", f"documents from non-members are limited to {STRANGER_MAX_DOCUMENT >> 20} MiB; "
                           "push as an admin (with its key and proof) for larger ones")
        if not self._stranger_docs.take(trio.current_time()):
            return Verdict("rejected", "rate_limited", "too many pushes from non-members just now; try again in a few seconds")
        return None

    def summary(self, type_: str) -> str:
        cached = self._summaries.get(type_)
        if cached is None:
            h = hashlib.sha256()
            for key, held in sorted(self.held.get(type_, {}).items()):
                h.update(f"{key}\0{held.issued_at_ns}\0{held.digest}\n".encode())
            cached = self._summaries[type_] = h.hexdigest()
        return cached

    async def _serve_pull(self, request: dict[str, Any], conn: Any) -> dict[str, Any]:
        f = codec.Fields(request, "pull request")
        summaries = f.raw.get("summaries")
        have = f.raw.get("have")
        if not isinstance(summaries, dict) or (have is not None and not isinstance(have, dict)):
            raise DecodeError("pull request: summaries must be a map (and have, if present, a map)")
        need_have: list[str] = []
        wanted: list[tuple[str, str]] = []
        stranger = self.is_stranger(conn.peer_id, request)
        for type_, their_summary in summaries.items():
            if type_ not in self.types or not self.held[type_] or their_summary == self.summary(type_):
                continue
            if stranger and not self.types[type_].public:
                continue
            if have is None or type_ not in have:
                need_have.append(type_)
                continue
            theirs = _have_list(have[type_], type_)
            for key, held in self.held[type_].items():
                other = theirs.get(key)
                if other is None or (other.digest != held.digest and wins(held, other)):
                    wanted.append((type_, held.digest))
        wanted.sort()
        after = _cursor(f.raw.get("after"))
        if after is not None:
            wanted = [w for w in wanted if w > after]
        docs: list[dict[str, Any]] = []
        size, cursor = 0, None
        for type_ in sorted({t for t, _ in wanted}):
            digests = [d for t, d in wanted if t == type_]
            blobs = await self.store.envelopes(type_, digests)
            for digest in digests:
                blob = blobs.get(digest)
                if blob is None:
                    continue
                if docs and size + len(blob) > PULL_LIMITS.max_reply - (64 << 10):
                    break  # the cursor stays at the last document sent
                docs.append(Envelope.from_bytes(blob).to_dict())
                size += len(blob)
                cursor = [type_, digest]
            else:
                continue
            break
        more = bool(wanted) and cursor is not None and tuple(cursor) < wanted[-1]
        reply: dict[str, Any] = {"docs": docs, "need_have": need_have, "more": more}
        if more and cursor is not None:
            reply["cursor"] = cursor
        return reply

    # -- pulling -------------------------------------------------------------------------------
    def _on_connected(self, conn: Any) -> None:
        # A stranger's connection costs a pull only now and then: anyone can open thousands.
        stranger = not conn.protected and not self.roster.is_member(conn.peer_id)
        if stranger and not self._stranger_pulls.take(trio.current_time()):
            self.stranger_pulls_skipped += 1
            return
        conn.nursery.start_soon(self._pull_quietly, conn, stranger)

    async def _pull_quietly(self, conn: Any, stranger: bool) -> None:
        try:
            await self.pull_from(conn, stranger=stranger)
        except (rpc.RequestRefused, NegotiationFailed) as exc:
            # Clients (the CLI, the admin tool) serve no pull; a node may refuse a non-member.
            log.debug(fmt("pull_skipped", peer=conn.peer_id, reason=str(exc)))
        except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.log(logging.DEBUG if stranger else logging.INFO,
                    fmt("pull_failed", peer=conn.peer_id, reason=str(exc) or type(exc).__name__))

    def have_lists(self, types: Iterable[str]) -> dict[str, list[list[Any]]]:
        return {t: [[k, h.issued_at_ns, h.digest] for k, h in sorted(self.held[t].items())] for t in types if t in self.held}

    async def pull_from(self, peer: Any, *, stranger: bool = False) -> int:
        """Ask a peer for every document we lack; offer each as if pushed (by a non-member, with
        its limits, when `stranger`). Returns how many were accepted."""
        accepted = 0
        rejected: Counter[str] = Counter()
        source = peer.peer_id if hasattr(peer, "peer_id") else peer
        # What a pull brings is not forwarded: the others had it from the push that spread it, or
        # will pull it themselves when they connect (forwarding every pulled document to every
        # member made each new connection a flood).
        everyone = frozenset(self.roster.members)
        send_have: list[str] = []
        cursor: object = None
        for _ in range(MAX_PULL_ROUNDS):
            request: dict[str, Any] = {"summaries": {t: self.summary(t) for t in self.types}}
            if send_have:
                request["have"] = self.have_lists(send_have)
            if cursor is not None:
                request["after"] = cursor
            reply = await rpc.request(self.host, peer, PULL, request, PULL_LIMITS)
            docs, need_have, more = _pull_reply(reply)
            cursor = reply.get("cursor")
            for i, raw in enumerate(docs):
                try:
                    env = Envelope.from_dict(raw)
                except DecodeError:
                    rejected["malformed"] += 1
                    continue
                verdict = (self._stranger_refusal(env) if stranger else None) or await self.offer(env, source, everyone)
                if verdict.code == "rate_limited":
                    rejected["rate_limited"] += len(docs) - i
                    more, need_have = False, []
                    break
                if verdict.result == "accepted":
                    accepted += 1
                elif verdict.result == "rejected":
                    rejected[verdict.code] += 1
            if need_have and not send_have:
                send_have = sorted(set(need_have) & set(self.types))
                if send_have:
                    continue
            if not more:
                break
        if rejected:
            limited.info(log, fmt("pull_rejected", peer=source, **{code: n for code, n in sorted(rejected.items())[:8]}),
                         key="pull_rejected")
        return accepted


class _Window:
    """At most `count` events per `seconds` (a sliding window)."""

    def __init__(self, count: int, seconds: float):
        self.count, self.seconds = count, seconds
        self._times: deque[float] = deque()

    def take(self, now: float) -> bool:
        """Count one event now, or False if the window is full."""
        while self._times and now - self._times[0] >= self.seconds:
            self._times.popleft()
        if len(self._times) >= self.count:
            return False
        self._times.append(now)
        return True


def _peer_set(raw: object) -> frozenset[PeerId]:
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


def _have_list(raw: object, type_: str) -> dict[str, Held]:
    if not isinstance(raw, list) or len(raw) > 200_000:
        raise DecodeError(f"pull request: have[{type_}] must be a list of at most 200000 entries")
    out: dict[str, Held] = {}
    for item in raw:
        if (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], int)
                and isinstance(item[2], str)):
            out[item[0]] = Held(item[1], item[2])
    return out


def _cursor(raw: object) -> tuple[str, str] | None:
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, str) for x in raw):
        return (raw[0], raw[1])
    return None


def _pull_reply(reply: dict[str, Any]) -> tuple[list[Any], list[str], bool]:
    f = codec.Fields(reply, "pull reply")
    docs = f.items("docs", optional=True, max_items=100_000)
    need = [t for t in f.items("need_have", optional=True, max_items=1000) if isinstance(t, str)]
    return docs, need, bool(f.boolean("more", optional=True, default=False))


# -- clients (the admin tool, tests) ---------------------------------------------------------------
async def push(host: Any, peer: Any, env: Envelope, *, forwarded_to: Sequence[str] = (), auth: Envelope | None = None) -> Verdict:
    """Push one signed document to `peer` (PeerId or Connection); returns its verdict."""
    message: dict[str, Any] = {"doc": env.to_dict()}
    if forwarded_to:
        message["forwarded_to"] = list(forwarded_to)
    if auth is not None:
        message["auth"] = auth.to_dict()
    return Verdict.from_dict(await rpc.request(host, peer, PUSH, message, PUSH_LIMITS))


async def pull(host: Any, peer: Any, types: Sequence[str], *, auth: Envelope | None = None) -> list[Envelope]:
    """Every document of `types` that `peer` holds (for a client that holds none)."""
    out: list[Envelope] = []
    cursor: object = None
    for _ in range(MAX_PULL_ROUNDS):
        request: dict[str, Any] = {"summaries": {t: "" for t in types}, "have": {t: [] for t in types}}
        if auth is not None:
            request["auth"] = auth.to_dict()
        if cursor is not None:
            request["after"] = cursor
        reply = await rpc.request(host, peer, PULL, request, PULL_LIMITS)
        docs, _, more = _pull_reply(reply)
        out += [Envelope.from_dict(raw) for raw in docs]
        cursor = reply.get("cursor")
        if not more:
            break
    return out
