"""Folder sync as a service of the node: the source's scanner publishes signed index versions, the
receivers take turns applying them, fetching blocks from every peer that has them.

Per folder this node takes part in (the admin-signed `sync-folder` documents say which):
- **source** (`SourceRun`): scanner + watcher + periodic rescan over `source_path`; every commit
  of the scanner becomes signed index chunks (stored, served to any member) and a new version in
  the source's `sync-state`.
- **receiver** (`ReceiverRun`): learns versions from the source's state, fetches the chunks it lacks
  from the source or any member that holds them (verified: signed by the source), then runs a task:
  PENDING until its turn (at most `max_parallel_nodes` receivers, in the order the folder lists
  them, apply a version at once) → RUNNING (plan + apply; blocks from peers that have them, the
  source last) → SUCCESS (then `post_sync`), or RETRYING with backoff, FAILED → SYNC_DEGRADED
  after `max_attempts`. Every change, and progress every few seconds, is a signed `sync-state`
  on the bus, so any node can show any receiver's state, and receivers see each other's turns.
While applying, blocks already written to a temporary file are served to the other receivers
and announced to them (`have`), so the source uploads each block about once.

A node writes (and reads, as a source) only under its own `sync.allowed_roots`, whatever an admin
signed; a folder pointing elsewhere is REFUSED on that node, with the reason in its state.
Spec: protocols/sync.md.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from .. import codec, timefmt
from ..cluster.documents import Rejected
from ..cluster.membership import MembershipService
from ..envelope import Envelope
from ..errors import DecodeError, P2PNodeError
from ..identity import PeerId
from ..logfmt import fmt, limited
from ..platform import rpc
from ..platform.blocks import BlockUnavailable
from ..platform.bus import LWW, Accepted, DocumentType
from ..platform.db import Database, StoreError
from ..platform.service import ControlRequest, Route, Service, ServiceContext
from ..deploy.runner import BoundedLog, run_argv
from .apply import ApplyError, ApplyReport, NotAllowed, check_allowed, sync_folder
from .blockstore import read_block, read_blocks, read_verified
from .documents import (
    FAILED, FOLDER, PENDING, REFUSED, RETRYING, RUNNING, SOURCE, SOURCE_ERROR, STATE, SUCCESS, SYNC_DEGRADED,
    MAX_LOG_LINE, MAX_LOG_LINES, FolderDoc, SyncState, TaskInfo, sign_chunk, verify_chunk, verify_folder, verify_state,
)
from .index_db import MIGRATIONS, BlockLocation, IndexRepo
from .model import FolderConfig, NodeTarget
from .planner import BlockPlan, Plan
from .scanner import ScanError, Scanner
from .tasks import FolderTasks, TaskStore
from .watcher import Watcher

PROTOCOL = "/p2pnode/sync/1.0.0"
LIMITS = rpc.Limits(max_request=512 << 10, max_reply=6 << 20, timeout=30.0)
MAX_REPLY_CHUNK_BYTES = 4 << 20
MAX_HAVE_PER_MESSAGE = 8192
MAX_HAVE_PER_PEER = 1 << 18
HAVE_INTERVAL = 0.25
PROGRESS_INTERVAL = 2.0
POST_SYNC_TIMEOUT = 600.0
MAX_INDEX_ROUNDS = 10_000
SWARM_WAIT = 1.0  # a block others may soon have waits at most this long per look before asking the source

log = logging.getLogger("p2pnode.sync")


class SyncService(Service):
    name = "sync"

    def __init__(self, ctx: ServiceContext, membership: MembershipService):
        self.ctx = ctx
        self.membership = membership
        self.me = ctx.peer_id
        self.allowed_roots = [str(p) for p in ctx.config.sync.allowed_roots]
        self.repo = IndexRepo()
        self._db: Database | None = None
        self.tasks: TaskStore | None = None
        self.folders: dict[str, FolderConfig] = {}
        self.states: dict[str, SyncState] = {}
        self.runs: dict[str, _Run] = {}
        self.have: dict[str, dict[PeerId, set[bytes]]] = {}
        self.partial_blocks: dict[bytes, tuple[str, str, int, int]] = {}
        self._temp_blocks: dict[tuple[str, str], list[bytes]] = {}
        self._have_out: dict[str, list[bytes]] = {}
        self._have_events: dict[str, trio.Event] = {}
        self.applied_settings: dict[str, str] = {}  # folder -> fingerprint of the settings its version was applied with
        self.counters: Counter[str] = Counter()
        self._changed = trio.Event()
        self._last_issued: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        ctx.bus.register(DocumentType(
            FOLDER, verify=self._verify_folder, reload=self._reload_folder, apply=self._apply_folder, ordering=LWW,
            peek=_peek("folder_id"), keep=5, rejected_action="sync_folder_rejected",
        ))
        ctx.bus.register(DocumentType(
            STATE, verify=self._verify_state, reload=self._reload_state, apply=self._apply_state, ordering=LWW,
            peek=_peek_state, keep=1, max_size=64 << 10, rejected_action="sync_state_rejected",
        ))
        rpc.serve(ctx.host, PROTOCOL, self._serve, LIMITS, allow=lambda peer, request: ctx.roster.is_member(peer))
        ctx.blocks.add_provider(self._provide, self._provide_many)
        ctx.roster.on_change(self._membership_changed)
        ctx.host.on_connected(lambda conn: self.wake())
        ctx.host.on_disconnected(lambda conn: self.wake())

    @property
    def db(self) -> Database:
        assert self._db is not None, "the sync service is not loaded"
        return self._db

    def _membership_changed(self) -> None:
        for peers in self.have.values():  # what peers that left announced is of no use now
            for peer in [p for p in peers if not self.ctx.roster.is_member(p)]:
                del peers[peer]
        self.wake()

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._changed.wait()

    # -- documents ------------------------------------------------------------------------------
    def _verify_folder(self, env: Envelope, now_ns: int) -> Accepted:
        doc = verify_folder(env, self.membership.trust, now_ns)
        return Accepted(doc.folder_id, doc.issued_at_ns, doc)

    def _reload_folder(self, env: Envelope, now_ns: int) -> Accepted:
        doc = verify_folder(env, self.membership.trust, now_ns, stored=True)
        return Accepted(doc.folder_id, doc.issued_at_ns, doc)

    def _apply_folder(self, accepted: Accepted, env: Envelope, source: PeerId | None, loaded: bool) -> None:
        doc: FolderDoc = accepted.doc
        if doc.config is None:
            self.folders.pop(doc.folder_id, None)
            self.have.pop(doc.folder_id, None)
        else:
            self.folders[doc.folder_id] = doc.config
        if not loaded:
            log.info(fmt("sync_folder_config", folder=doc.folder_id, removed=doc.config is None or None,
                         source=doc.config.source if doc.config else None, receivers=len(doc.config.nodes) if doc.config else None))
        self.wake()

    def _verify_state(self, env: Envelope, now_ns: int) -> Accepted:
        state = verify_state(env, now_ns)
        if not self.ctx.roster.is_member(state.node):
            raise Rejected("not_member", f"sync state of {state.node}, which is not a member")
        return Accepted(state.key, state.issued_at_ns, state)

    def _reload_state(self, env: Envelope, now_ns: int) -> Accepted:
        state = verify_state(env, now_ns, stored=True)
        return Accepted(state.key, state.issued_at_ns, state)

    def _apply_state(self, accepted: Accepted, env: Envelope, source: PeerId | None, loaded: bool) -> None:
        state: SyncState = accepted.doc
        self.states[state.key] = state
        self.wake()

    def state_of(self, folder: str, node: PeerId) -> SyncState | None:
        return self.states.get(f"{folder}/{node}")

    async def publish(self, state: SyncState) -> None:
        """Sign our own state and hand it to the bus (stored, forwarded to every member)."""
        last = self._last_issued.get(state.key, 0)
        issued = max(self.ctx.clock.now_ns(), last + 1)
        self._last_issued[state.key] = issued
        env = attrs.evolve(state, issued_at_ns=issued).sign(self.ctx.identity)
        verdict = await self.ctx.bus.offer(env)
        if verdict.result not in ("accepted", "ignored"):
            limited.warning(log, fmt("sync_state_not_published", folder=state.folder, result=verdict.result, reason=verdict.reason),
                            key=("sync_state_not_published", verdict.code))

    # -- lifetime -------------------------------------------------------------------------------
    async def load(self) -> None:
        self._db = await self.ctx.databases.open("sync.db", MIGRATIONS)
        self.tasks = TaskStore(self._db)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._send_haves)
            task_status.started()
            while True:
                self._reconcile(nursery)
                await self.changed(30.0)

    def _reconcile(self, nursery: trio.Nursery) -> None:
        """Start, restart (new config) or stop the per-folder runs this node has a part in."""
        wanted: dict[str, _Run] = {}
        for folder_id, config in self.folders.items():
            if config.source == self.me:
                wanted[folder_id] = SourceRun(self, config)
            elif (target := config.node(self.me)) is not None:
                wanted[folder_id] = ReceiverRun(self, config, target)
        for folder_id, run in list(self.runs.items()):
            new = wanted.get(folder_id)
            if new is None or type(new) is not type(run) or new.config != run.config or run.finished:
                run.scope.cancel()
                del self.runs[folder_id]
        for folder_id, run in wanted.items():
            if folder_id not in self.runs:
                self.runs[folder_id] = run
                nursery.start_soon(run.main)

    # -- serving --------------------------------------------------------------------------------
    async def _serve(self, request: dict[str, Any], conn: Any) -> dict[str, Any]:
        f = codec.Fields(request, "sync request")
        op = f.text("op", max_len=16)
        folder = f.text("folder", max_len=64)
        if op == "index":
            return await self._serve_index(folder, f.integer("index_id", optional=True, default=0) or 0,
                                           f.integer("after", optional=True, default=0) or 0)
        if op == "have":
            hashes = [h for h in f.items("hashes", max_items=MAX_HAVE_PER_MESSAGE) if isinstance(h, bytes) and len(h) == 32]
            peer_have = self.have.setdefault(folder, {}).setdefault(conn.peer_id, set())
            if folder in self.folders and len(peer_have) + len(hashes) <= MAX_HAVE_PER_PEER:
                peer_have.update(hashes)
                event = self._have_events.pop(folder, None)
                if event is not None:
                    event.set()
            return {}
        raise DecodeError(f"sync request: unknown op {op!r}")

    async def _serve_index(self, folder: str, index_id: int, after: int) -> dict[str, Any]:
        """The signed chunks this node holds of `folder` after `after` (from 0 if it holds another index_id)."""
        self.counters["index_requests"] += 1
        config = self.folders.get(folder)
        if config is None:
            return {"index_id": 0, "chunks": [], "more": False}

        def read(conn: Any) -> tuple[int, list[tuple[int, int, bytes]]]:
            if config.source == self.me:
                held_id, _ = self.repo.source_index(conn, folder)
            else:
                desired = self.repo.desired_index(conn, folder)
                if desired is None:
                    return 0, []
                held_id = desired[0]
            start = after if held_id == index_id else 0
            return held_id, self.repo.chunks_after(conn, folder, held_id, start)

        held_id, rows = await self.db.read(read)
        chunks: list[bytes] = []
        size = 0
        for _, _, data in rows:
            if chunks and size + len(data) > MAX_REPLY_CHUNK_BYTES:
                break
            chunks.append(data)
            size += len(data)
        return {"index_id": held_id, "chunks": chunks, "more": len(chunks) < len(rows)}

    async def _provide_many(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        """A peer's batch of small blocks: complete files in one lookup, files being written one by one."""
        found: dict[bytes, bytes] = dict(await read_blocks(self.db, self.repo, list(digests)))
        for digest in digests:
            if digest not in found and digest in self.partial_blocks:
                data = await self._provide(digest)
                if data is not None:
                    found[digest] = data
        return found

    async def _provide(self, digest: bytes) -> bytes | None:
        """A block for a peer: from any complete file this node holds, or from a file it is writing."""
        data = await read_block(self.db, self.repo, digest)
        if data is not None:
            return data
        spot = self.partial_blocks.get(digest)
        if spot is None:
            return None
        folder, temp, offset, size = spot
        root = await self.db.read(lambda c: self.repo.root(c, folder))
        return await trio.to_thread.run_sync(
            functools.partial(read_verified, [(BlockLocation(folder, temp, offset, size), root)], digest, temp=True))

    # -- what a receiver tells the others while it writes ---------------------------------------------
    def note_blocks(self, folder: str, temp: str, blocks: Sequence[BlockPlan]) -> None:
        spots = self._temp_blocks.setdefault((folder, temp), [])
        out = self._have_out.setdefault(folder, [])
        for b in blocks:
            self.partial_blocks[b.hash] = (folder, temp, b.offset, b.size)
            spots.append(b.hash)
            out.append(b.hash)

    def note_file_done(self, folder: str, temp: str) -> None:
        for digest in self._temp_blocks.pop((folder, temp), ()):
            spot = self.partial_blocks.get(digest)
            if spot is not None and spot[:2] == (folder, temp):
                del self.partial_blocks[digest]  # now in a complete file: the block lookup has it

    async def _send_haves(self) -> None:
        while True:
            await trio.sleep(HAVE_INTERVAL)
            for folder, hashes in list(self._have_out.items()):
                if not hashes:
                    continue
                self._have_out[folder] = []
                config = self.folders.get(folder)
                if config is None:
                    continue
                peers = [n.node_id for n in config.nodes if n.node_id != self.me and self.ctx.host.connection_to(n.node_id)]
                for i in range(0, len(hashes), MAX_HAVE_PER_MESSAGE):
                    message = {"op": "have", "folder": folder, "hashes": hashes[i : i + MAX_HAVE_PER_MESSAGE]}
                    for peer in peers:
                        assert self._nursery is not None
                        self._nursery.start_soon(self._tell, peer, message)

    async def _tell(self, peer: PeerId, message: dict[str, Any]) -> None:
        try:
            await rpc.request(self.ctx.host, peer, PROTOCOL, message, LIMITS)
        except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug(fmt("sync_have_failed", peer=peer, reason=str(exc)))

    def have_arrived(self, folder: str) -> trio.Event:
        """Set when another receiver next announces blocks of `folder`."""
        event = self._have_events.get(folder)
        if event is None:
            event = self._have_events[folder] = trio.Event()
        return event

    def others_busy(self, config: FolderConfig) -> bool:
        """Whether another receiver is applying this folder right now (it may bring blocks we need)."""
        for target in config.nodes:
            if target.node_id != self.me and self.ctx.host.connection_to(target.node_id) is not None:
                st = self.state_of(config.id, target.node_id)
                if st is not None and st.status == RUNNING:
                    return True
        return False

    # -- block sources ----------------------------------------------------------------------------
    def block_sources(self, config: FolderConfig, digest: bytes, index_id: int, seq: int) -> tuple[list[PeerId], list[PeerId]]:
        """(peers likely to have the block, the rest to try after them: other receivers, then the source)."""
        connected = [p for p in [n.node_id for n in config.nodes] + [config.source]
                     if p != self.me and self.ctx.host.connection_to(p) is not None]
        have = self.have.get(config.id, {})
        preferred, others = [], []
        for p in connected:
            st = self.state_of(config.id, p)
            complete = st is not None and st.role == "receiver" and st.index_id == index_id and st.seq >= seq
            if digest in have.get(p, ()) or complete:
                preferred.append(p)
            elif p != config.source:
                others.append(p)
        if config.source in connected and config.source not in preferred:
            others = [config.source]  # receivers that announced nothing would only answer "missing"
        return preferred, others

    # -- status and control -----------------------------------------------------------------------
    def status(self) -> Mapping[str, Any]:
        folders = {}
        for folder_id, config in sorted(self.folders.items()):
            role = "source" if config.source == self.me else "receiver" if config.node(self.me) else None
            if role is None:
                continue
            st = self.state_of(folder_id, self.me)
            folders[folder_id] = {"role": role, "status": st.status if st else PENDING, "seq": st.seq if st else 0,
                                  "error": st.error if st and st.error else None}
        return {"sync": {"folders": folders, "counters": dict(self.counters)}}

    def routes(self) -> Sequence[Route]:
        return [
            Route("GET", "/sync/status", self._route_status, "?folder=ID: every folder's source version and each receiver's state"),
            Route("GET", "/sync/tasks", self._route_tasks, "?folder=ID&node=PEER: receivers' current tasks (+ this node's history)"),
            Route("GET", "/sync/log", self._route_log, "?task=ID: a task's log"),
            Route("POST", "/sync/trigger", self._route_trigger, 'body {"folder": ID}: rescan now (on the source) and publish',
                  timeout=3600.0),
        ]

    def folder_view(self, config: FolderConfig) -> dict[str, Any]:
        src = self.state_of(config.id, config.source)
        version = {"index_id": src.index_id, "seq": src.seq} if src else None
        names = {m.peer_id: m.name for m in self.membership.members()}
        nodes = []
        for target in config.nodes:
            st = self.state_of(config.id, target.node_id)
            entry: dict[str, Any] = {"node": str(target.node_id), "name": names.get(target.node_id), "target_path": target.target_path,
                                     "strategy": target.strategy, "online": target.node_id == self.me
                                     or self.ctx.host.connection_to(target.node_id) is not None}
            if st is None:
                entry.update(state="unknown", status=None, seq=0)
            else:
                entry.update(status=st.status, seq=st.seq, index_id=st.index_id, error=st.error or None,
                             updated_at=timefmt.format_ns(st.issued_at_ns), task=st.task.to_dict() if st.task else None,
                             eta_s=st.task.eta_s if st.task else None, state=_judge(st, src))
            nodes.append(entry)
        return {"id": config.id, "source": str(config.source), "source_name": names.get(config.source),
                "source_path": config.source_path, "source_status": src.status if src else None,
                "source_error": src.error or None if src else None, "version": version,
                "max_parallel_nodes": config.max_parallel_nodes, "nodes": nodes}

    async def _route_status(self, request: ControlRequest) -> tuple[int, Any]:
        wanted = request.arg("folder")
        if wanted and wanted not in self.folders:
            return 404, {"error": f"no folder {wanted!r}; folders: {', '.join(sorted(self.folders)) or 'none'}"}
        return 200, {"folders": [self.folder_view(c) for i, c in sorted(self.folders.items()) if not wanted or i == wanted]}

    async def _route_tasks(self, request: ControlRequest) -> tuple[int, Any]:
        folder, node = request.arg("folder"), request.arg("node")
        rows = []
        for st in self.states.values():
            if st.task is None or (folder and st.folder != folder) or (node and not str(st.node).startswith(node)):
                continue
            rows.append({"folder": st.folder, "node": str(st.node), "current": True, **st.task.to_dict()})
        if self.tasks is not None and (not node or str(self.me).startswith(node)):
            current = {r["id"] for r in rows}
            for name, task in await self.tasks.history(folder):
                if task.id not in current:
                    rows.append({"folder": name, "node": str(self.me), "current": False, **task.to_dict()})
        return 200, {"tasks": rows}

    async def _route_log(self, request: ControlRequest) -> tuple[int, Any]:
        task_id = request.arg("task") or ""
        for st in self.states.values():
            if st.task is not None and st.task.id == task_id:
                return 200, {"task": st.task.to_dict(), "folder": st.folder, "node": str(st.node)}
        if self.tasks is not None:
            for name, task in await self.tasks.history(None, limit=1000):
                if task.id == task_id:
                    return 200, {"task": task.to_dict(), "folder": name, "node": str(self.me)}
        return 404, {"error": f"no task {task_id!r} known here (see p2pnode sync tasks)"}

    async def _route_trigger(self, request: ControlRequest) -> tuple[int, Any]:
        body = request.json()
        folder = body.get("folder") if isinstance(body, dict) else None
        config = self.folders.get(folder) if isinstance(folder, str) else None
        if config is None:
            return 404, {"error": f"no folder {folder!r}; folders: {', '.join(sorted(self.folders)) or 'none'}"}
        run = self.runs.get(config.id)
        if not isinstance(run, SourceRun):
            return 409, {"error": f"this node is not the source of {config.id} (the source is {config.source}); run the trigger there"}
        try:
            changed = await run.trigger()
        except (ScanError, NotAllowed) as exc:
            return 409, {"error": str(exc)}
        return 200, {"folder": config.id, "index_id": run.index_id, "seq": run.published_seq, "changed": changed}


def _judge(st: SyncState, source: SyncState | None) -> str:
    if st.status == REFUSED:
        return "refused"
    if st.status in (FAILED, SYNC_DEGRADED):
        return "failed"
    if source is not None and st.index_id == source.index_id and st.seq >= source.seq and st.status == SUCCESS:
        return "in-sync"
    return "syncing" if st.status == RUNNING else "behind"


def _peek(field: str) -> Any:
    def peek(payload: dict[str, Any]) -> tuple[str, int]:
        key, issued = payload.get(field), payload.get("issued_at")
        if not isinstance(key, str) or not isinstance(issued, str):
            raise DecodeError("missing key or issued_at")
        return key, timefmt.parse_ns(issued)

    return peek


def _peek_state(payload: dict[str, Any]) -> tuple[str, int]:
    folder, node, issued = payload.get("folder"), payload.get("node"), payload.get("issued_at")
    if not isinstance(folder, str) or not isinstance(node, str) or not isinstance(issued, str):
        raise DecodeError("missing folder, node or issued_at")
    return f"{folder}/{node}", timefmt.parse_ns(issued)


# -- per-folder runs -------------------------------------------------------------------------------
class _Run(abc.ABC):
    def __init__(self, svc: SyncService, config: FolderConfig):
        self.svc = svc
        self.config = config
        self.scope = trio.CancelScope()
        self.finished = False

    async def main(self) -> None:
        with self.scope:
            try:
                await self.run()
            except StoreError as exc:  # sync.db refused a write: the supervisor starts the run again
                if not self.svc.db.closed:  # (closed: the node is stopping)
                    log.error(fmt("sync_store_failed", folder=self.config.id, error=str(exc), retry_in="10s"))
                    await trio.sleep(10)
            finally:
                self.finished = True
                self.svc.wake()

    @abc.abstractmethod
    async def run(self) -> None: ...


class SourceRun(_Run):
    """This node is the folder's source: scan, sign, publish."""

    index_id = 0
    published_seq = 0
    scanner: Scanner | None = None
    refusal: NotAllowed | None = None

    async def run(self) -> None:
        svc, config = self.svc, self.config
        try:
            root = check_allowed(config.id, config.source_path, svc.allowed_roots, what="source_path")
        except NotAllowed as exc:
            self.refusal = exc
            await self._publish(REFUSED, str(exc))
            log.warning(fmt("sync_folder_refused", folder=config.id, role="source", reason=str(exc)))
            await trio.sleep_forever()
        scan_config = attrs.evolve(config, source_path=root)

        def head(conn: Any) -> tuple[int, int]:
            index_id, _ = svc.repo.source_index(conn, config.id)
            return index_id, svc.repo.last_chunk_seq(conn, config.id, index_id)

        self.index_id, self.published_seq = await svc.db.write(head)
        self.scanner = Scanner(svc.db, svc.repo, scan_config, on_commit=self._committed)
        await self._publish(SOURCE)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._scan_forever)
            nursery.start_soon(self._watch)

    async def _scan_forever(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            await self.trigger(report_errors=True)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self.config.rescan_interval_s)

    async def _watch(self) -> None:
        assert self.scanner is not None
        while True:
            try:
                await Watcher(self.scanner).run()
            except (ScanError, OSError) as exc:
                limited.warning(log, fmt("sync_watch_failed", folder=self.config.id, error=str(exc)), key=("sync_watch_failed", self.config.id))
            await trio.sleep(5)  # e.g. the folder's root is missing: the rescan reports it; watch again later

    async def trigger(self, report_errors: bool = False) -> int:
        """A full rescan now; returns how many entries changed."""
        if self.refusal is not None:
            raise self.refusal
        if self.scanner is None:
            raise ScanError(f"folder {self.config.id} is still starting on this node; try again in a moment")
        self.svc.counters["rescans"] += 1
        try:
            report = await self.scanner.full_scan()
        except ScanError as exc:
            await self._publish(SOURCE_ERROR, str(exc))
            if report_errors:
                return 0
            raise
        mine = self.svc.state_of(self.config.id, self.svc.me)
        if mine is not None and mine.status != SOURCE:
            await self._publish(SOURCE)  # the folder is readable again
        return report.changed

    async def _committed(self, first_seq: int, last_seq: int) -> None:
        """The scanner committed entries first..last: sign them as chunks, store, publish the version."""
        svc, folder = self.svc, self.config.id

        def unsigned(conn: Any) -> Any:
            return svc.repo.unsigned_chunks(conn, folder, self.published_seq)

        chunks = await svc.db.read(unsigned)
        if not chunks:
            return
        signed = [(c.prev_seq, c.seq, sign_chunk(c, svc.ctx.identity).to_bytes()) for c in chunks]

        def store(conn: Any) -> None:
            for prev_seq, seq, data in signed:
                svc.repo.put_chunk(conn, folder, self.index_id, prev_seq, seq, data)

        await svc.db.write(store)
        self.published_seq = signed[-1][1]
        svc.counters["chunks_published"] += len(signed)
        await self._publish(SOURCE)

    async def _publish(self, status: str, error: str = "") -> None:
        await self.svc.publish(SyncState(self.config.id, self.svc.me, 0, "source", status, self.index_id,
                                         self.published_seq, self.published_seq, error))


class ReceiverRun(_Run):
    """This node receives the folder: follow the source's versions, apply each in turn."""

    def __init__(self, svc: SyncService, config: FolderConfig, target: NodeTarget):
        super().__init__(svc, config)
        self.target = target
        self.applied = (0, 0)
        self.task: TaskInfo | None = None
        self.error = ""
        # The folder's settings as applied here: when they change (strategy, filters, ignore rules,
        # permissions), or the node restarts, the version in place is checked again with them.
        self.fingerprint = hashlib.sha256(codec.encode({**config.to_dict(), "issued_at": ""})).hexdigest()
        self.recheck = svc.applied_settings.get(config.id) != self.fingerprint
        self._t0 = 0.0

    @property
    def db(self) -> Database:
        return self.svc.db

    async def run(self) -> None:
        svc, config = self.svc, self.config
        assert svc.tasks is not None
        saved = (await svc.tasks.load()).get(config.id, FolderTasks())  # as stored: a restart resumes it
        self.applied = (saved.applied_index_id, saved.applied_seq)
        self.task = saved.task
        try:
            check_allowed(config.id, self.target.target_path, svc.allowed_roots)
        except NotAllowed as exc:
            self.error = str(exc)
            await self._publish(REFUSED)
            log.warning(fmt("sync_folder_refused", folder=config.id, role="receiver", reason=str(exc)))
            await trio.sleep_forever()
        if self.task is not None and self.task.status == RUNNING:
            self.task = attrs.evolve(self.task, status=PENDING)  # interrupted (restart): it resumes
        await self._publish(self._status())
        while True:
            head = await self._catch_up_index()
            desired = await self.db.read(lambda c: svc.repo.desired_index(c, config.id))
            if desired is not None and desired[1] > 0 and (desired != self.applied or self._task_open() or self.recheck):
                if not await self._work_on(desired):
                    continue
                source = svc.state_of(config.id, config.source)
                if self.applied == desired and source is not None and (source.index_id, source.seq) != desired:
                    continue  # the source announced a newer version while this one was applied: its wake-up is gone
            await self._publish(self._status())
            wait = 60.0 if head is None else 30.0
            if self.task is not None and self.task.status == RETRYING:
                wait = min(wait, max(0.0, (self.task.next_retry_at_ns - svc.ctx.clock.now_ns()) / 1e9))
            await svc.changed(wait)

    def _task_open(self) -> bool:
        return self.task is not None and self.task.status in (PENDING, RUNNING, RETRYING)

    def _status(self) -> str:
        if self.task is None:
            return SUCCESS if self.applied[1] else PENDING
        if self.task.status == FAILED and self.task.attempt >= self.config.retry.max_attempts:
            return SYNC_DEGRADED
        return self.task.status

    # -- the index ----------------------------------------------------------------------------------
    async def _catch_up_index(self) -> tuple[int, int] | None:
        """Bring this node's copy of the source's index to the newest version anyone announced."""
        svc, config = self.svc, self.config
        source = svc.state_of(config.id, config.source)
        head = (source.index_id, source.seq) if source is not None and source.seq else None
        if head is None:
            return None
        for _ in range(MAX_INDEX_ROUNDS):
            held = await self.db.read(lambda c: svc.repo.desired_index(c, config.id))
            if held is not None and held[0] == head[0] and held[1] >= head[1]:
                return head
            after = held[1] if held is not None and held[0] == head[0] else 0
            candidates = [config.source] + [n.node_id for n in config.nodes if n.node_id != svc.me and
                                            (st := svc.state_of(config.id, n.node_id)) is not None and st.index_id == head[0]
                                            and st.have_seq > after]
            progressed = False
            for peer in candidates:
                if svc.ctx.host.connection_to(peer) is None:
                    continue
                try:
                    progressed = await self.fetch_chunks(peer, head[0], after)
                except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.info(fmt("sync_index_fetch_failed", folder=config.id, peer=peer, reason=str(exc)))
                    continue
                if progressed:
                    break
            if not progressed:
                return head  # nobody reachable has more now; the next change wakes us
        return head

    async def fetch_chunks(self, peer: PeerId, index_id: int, after: int) -> bool:
        """Ask `peer` (the source or a relay) for the chunks after `after`; keep those the source
        signed. Returns whether this node's copy of the index moved on."""
        svc, config = self.svc, self.config
        reply = await rpc.request(svc.ctx.host, peer, PROTOCOL, {"op": "index", "folder": config.id, "index_id": index_id,
                                                                  "after": after}, LIMITS)
        f = codec.Fields(reply, "sync index reply")
        if f.integer("index_id", optional=True, default=0) != index_id:
            return False
        chunks = []
        for data in f.items("chunks", max_items=10_000):
            if not isinstance(data, bytes):
                continue
            try:
                chunks.append((verify_chunk(data, config.id, config.source), data))
            except DecodeError as exc:
                svc.counters["chunks_rejected"] += 1
                limited.warning(log, fmt("sync_index_rejected", folder=config.id, peer=peer, reason=str(exc)),
                                key=("sync_index_rejected", getattr(exc, "code", "malformed")))
        if not chunks:
            return False

        def accept(conn: Any) -> int:
            moved = 0
            for chunk, data in sorted(chunks, key=lambda c: c[0].seq):
                result = svc.repo.accept_chunk(conn, chunk)
                if result.status in ("applied", "reset"):
                    svc.repo.put_chunk(conn, config.id, chunk.index_id, chunk.prev_seq, chunk.seq, data)
                    moved += 1
            if moved:
                svc.repo.drop_chunks(conn, config.id, except_index_id=index_id)
            return moved

        moved = await self.db.write(accept)
        if moved:
            await self._publish(self._status())
        return moved > 0

    # -- a task -------------------------------------------------------------------------------------
    async def _work_on(self, desired: tuple[int, int]) -> bool:
        """One attempt at bringing the folder to `desired`. Returns False when the caller should
        look again at once (a newer version arrived while waiting)."""
        svc, config = self.svc, self.config
        index_id, seq = desired
        task = self.task
        if task is None or (task.index_id, task.seq) != desired or (self.recheck and task.status == SUCCESS):
            suffix = f"-{int(svc.ctx.clock.now_ns() // 10**6)}" if desired == self.applied else ""  # a re-check of the same version
            task = TaskInfo(f"{config.id}@{svc.me.short()}:{seq}{suffix}", index_id, seq, PENDING)
        elif task.status == FAILED and task.attempt >= config.retry.max_attempts:
            return True  # degraded on this version: wait for a new one
        self.task = task
        if task.status == RETRYING and task.next_retry_at_ns > svc.ctx.clock.now_ns():
            await self._save()
            await self._publish(RETRYING)
            with trio.move_on_after((task.next_retry_at_ns - svc.ctx.clock.now_ns()) / 1e9):
                await self._newer_version(desired)
                return False
        if not await self._wait_turn(desired):
            return False
        self.task = attrs.evolve(self.task, status=RUNNING, attempt=self.task.attempt + 1, started_at_ns=svc.ctx.clock.now_ns(),
                                 files_done=0, bytes_done=0, rate=0.0, last_error="")
        self._line(f"attempt {self.task.attempt}: applying version {seq}")
        await self._save()
        await self._publish(RUNNING)
        log.info(fmt("sync_task_started", folder=config.id, task=self.task.id, attempt=self.task.attempt))
        error = await self._apply(desired)
        now = svc.ctx.clock.now_ns()
        if error is None:
            self.applied = desired
            self.recheck = False
            svc.applied_settings[config.id] = self.fingerprint
            self.task = attrs.evolve(self.task, status=SUCCESS, finished_at_ns=now)
            self._line("done")
            log.info(fmt("sync_task_done", folder=config.id, task=self.task.id, bytes=self.task.bytes_done))
        else:
            attempt = self.task.attempt
            final = attempt >= config.retry.max_attempts or isinstance(error, NotAllowed)
            delay = config.retry.delay(attempt, random.random())
            self.task = attrs.evolve(self.task, status=FAILED if final else RETRYING, finished_at_ns=now, last_error=str(error),
                                     next_retry_at_ns=0 if final else now + int(delay * 1e9))
            self._line(f"failed: {error}" + ("" if final else f"; retrying in {delay:.0f} s"))
            log.warning(fmt("sync_task_failed", folder=config.id, task=self.task.id, attempt=attempt, final=final, error=str(error)))
            if final:
                log.warning(fmt("sync_degraded", folder=config.id, attempts=attempt))
        await self._save()
        if self.task.status in (SUCCESS, FAILED) and svc.tasks is not None:
            await svc.tasks.finish(config.id, self.task)
        await self._publish(self._status())
        return True

    async def _newer_version(self, desired: tuple[int, int]) -> None:
        while True:
            await self.svc.changed(30.0)
            source = self.svc.state_of(self.config.id, self.config.source)
            if source is not None and (source.index_id, source.seq) != desired and source.seq:
                return

    async def _wait_turn(self, desired: tuple[int, int]) -> bool:
        """Rolling: at most max_parallel_nodes receivers apply at once, in the folder's node order.
        A receiver counts as ahead of us while it is online and has not applied this version (and
        has not given up on it). Returns False if a newer version arrived meanwhile."""
        svc, config = self.svc, self.config
        order = [n.node_id for n in config.nodes]
        mine = order.index(svc.me)
        published = False
        while True:
            busy = 0
            for peer in order[:mine]:
                if svc.ctx.host.connection_to(peer) is None:
                    continue  # offline receivers do not hold up the others
                st = svc.state_of(config.id, peer)
                if st is not None and (st.status in (REFUSED, SYNC_DEGRADED, FAILED) or
                                       (st.index_id == desired[0] and st.seq >= desired[1])):
                    continue
                busy += 1
            if busy < config.max_parallel_nodes:
                return True
            if not published:
                published = True
                self.task = attrs.evolve(self.task, status=PENDING) if self.task else None
                self._line(f"waiting for its turn ({busy} receivers ahead, at most {config.max_parallel_nodes} at once)")
                await self._save()
                await self._publish(PENDING)
            await svc.changed(10.0)
            source = svc.state_of(config.id, config.source)
            if source is not None and source.index_id == desired[0] and source.seq > desired[1]:
                held = await self.db.read(lambda c: svc.repo.desired_index(c, config.id))
                if held != desired:
                    return False

    async def _apply(self, desired: tuple[int, int]) -> Exception | None:
        svc, config = self.svc, self.config
        receivers = [n.node_id for n in config.nodes]
        rotate = receivers.index(svc.me) / max(1, len(receivers))
        self._t0 = trio.current_time()

        async def fetch(digest: bytes, size: int) -> bytes:
            # Swarming: ask the source only for blocks nobody else has, and only while it has room
            # for us; otherwise wait for another receiver to announce the block (or for room).
            blocks = svc.ctx.blocks
            while True:
                preferred, others = svc.block_sources(config, digest, *desired)
                source_budget = blocks.budget(config.source)
                if preferred or not svc.others_busy(config):
                    data, _ = await blocks.fetch(digest, preferred, others, size=size)
                    return data
                if source_budget.try_acquire(size):
                    data, _ = await blocks.fetch(digest, preferred, others, size=size, reserved=config.source)
                    return data
                with trio.move_on_after(SWARM_WAIT):
                    async with trio.open_nursery() as waiting:
                        async def first(wait: Any) -> None:
                            await wait()
                            waiting.cancel_scope.cancel()

                        waiting.start_soon(first, source_budget.wait_released)
                        waiting.start_soon(first, svc.have_arrived(config.id).wait)

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._progress_ticker)
            try:
                report = await sync_folder(svc.db, svc.repo, config, self.target, fetch, allowed_roots=svc.allowed_roots,
                                           observer=_Observer(self), rotate=rotate,
                                           max_inflight_bytes=svc.ctx.config.sync.max_bytes_in_flight)
            except (ApplyError, OSError, BlockUnavailable) as exc:  # ApplyError covers DiskFull, NotAllowed
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            return failure
        if not report.ok:
            first = report.errors[0] if report.errors else ("", "")
            return ApplyError(f"{report.error_count} entries failed, e.g. {first[0]}: {first[1]}")
        self._report_line(report)
        if config.post_sync:
            return await self._post_sync()
        return None

    def _report_line(self, r: ApplyReport) -> None:
        self._line(f"files {r.files}, dirs {r.dirs}, symlinks {r.symlinks}, deleted {r.deleted}, fetched {r.bytes_fetched} B, "
                   f"copied locally {r.bytes_copied} B, resumed {r.bytes_resumed} B, local edits reverted {r.local_edits_reverted}")

    async def _post_sync(self) -> Exception | None:
        out = BoundedLog()
        try:
            result = await run_argv(self.config.post_sync, cwd=self.target.target_path, env=dict(os.environ), timeout=POST_SYNC_TIMEOUT,
                                    log=out)
        except OSError as exc:
            return ApplyError(f"post_sync could not start: {exc}")
        for line in out.tail(2000).splitlines()[-5:]:
            self._line(f"post_sync: {line}")
        if result.timed_out:
            return ApplyError(f"post_sync timed out after {POST_SYNC_TIMEOUT:.0f} s")
        if result.returncode != 0:
            return ApplyError(f"post_sync exited with {result.returncode}")
        return None

    # -- progress ---------------------------------------------------------------------------------
    def planned(self, p: Plan) -> None:
        if self.task is not None:
            total = sum(f.entry.size for f in p.files)
            self.task = attrs.evolve(self.task, files_total=len(p.files), bytes_total=total)
            self._line(f"plan: {len(p.files)} files ({total} B), {len(p.dirs)} dirs, {len(p.symlinks)} symlinks, {len(p.deletes)} deletes")

    def progressed(self, files: int, nbytes: int) -> None:
        if self.task is not None:
            elapsed = max(1e-3, trio.current_time() - self._t0)
            done = self.task.bytes_done + nbytes
            self.task = attrs.evolve(self.task, files_done=self.task.files_done + files, bytes_done=done, rate=done / elapsed)

    async def _progress_ticker(self) -> None:
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            await self._publish(RUNNING)

    def _line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        line = f"{stamp} {text}"[:MAX_LOG_LINE]
        if self.task is not None:
            self.task = attrs.evolve(self.task, log=(*self.task.log, line)[-MAX_LOG_LINES:])

    async def _save(self) -> None:
        if self.svc.tasks is not None:
            await self.svc.tasks.save(self.config.id, FolderTasks(self.applied[0], self.applied[1], self.task))

    async def _publish(self, status: str) -> None:
        config = self.config
        held = await self.db.read(lambda c: self.svc.repo.desired_index(c, config.id))
        index_id = self.applied[0] or (held[0] if held else 0)
        await self.svc.publish(SyncState(config.id, self.svc.me, 0, "receiver", status, index_id, self.applied[1],
                                         held[1] if held and held[0] == index_id else 0, self.error, self.task))


class _Observer:
    """Relays the applier's progress to the task and its written blocks to the service."""

    def __init__(self, run: ReceiverRun):
        self.run = run

    def planned(self, p: Plan) -> None:
        self.run.planned(p)

    def blocks_written(self, name: str, temp: str, blocks: Sequence[BlockPlan], fetched: bool) -> None:
        self.run.svc.note_blocks(self.run.config.id, temp, blocks)
        self.run.progressed(0, sum(b.size for b in blocks))

    def file_done(self, name: str, temp: str, size: int) -> None:
        self.run.svc.note_file_done(self.run.config.id, temp)
        self.run.progressed(1, 0)


__all__ = ["PROTOCOL", "SyncService"]
