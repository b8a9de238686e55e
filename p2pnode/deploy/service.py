"""The deploy service: signed deploy commands in, each target running its part, signed reports out.

Document types on the bus (documents.py): `deploy-command` (LWW by deploy ID, one version ever:
another command reusing an ID is refused as `replayed`), `deploy-report` (LWW by deploy ID and
node, newer `seq` wins), `artifact-manifest` (LWW by SHA-256). Every node verifies, stores and
relays all three; only a command's targets act on it, and only when their own config allows:
deploys enabled and the command's root inside `deploy.allowed_roots` — otherwise the target signs
a `failed` report saying why.

A target waits for its wave (rollout.py), hands the command to the Executor, and turns every
status change into a report signed by itself (progress within one status coalesced to one report
per `report_interval`). With `auto_revert`, a target whose deploy succeeded watches the rollout
until it is decided and reverts itself (a local deploy.rollback, reported under the same deploy
ID) if the rollout halts. Reports are on the bus, so a peer that was unreachable gets them when it
connects again (the bus pulls on every connection) and any node can answer `deploy status`.

Also here: replay protection (the seen-set in deploy.db besides the bus's own store), the artifact
store's upload protocol and block provider (store.py), garbage collection of artifacts, the
control-API routes (`/deploy/...`) and `/p2pnode/deploy-query/1.0.0`, which answers status, list
and log questions from members and from holders of an admin or deploy proof (the admin tool).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import codec, timefmt
from ..cluster.documents import Rejected, verify_admin_proof
from ..cluster.membership import MembershipService
from ..envelope import Envelope
from ..errors import DecodeError, P2PNodeError
from ..identity import PeerId
from ..logfmt import fmt
from ..platform import rpc
from ..platform.bus import LWW, Accepted, DocumentType
from ..platform.service import ControlRequest, Route, Service, ServiceContext
from . import journal as J
from . import report as R
from .config import DeployConfig
from .documents import (
    COMMAND, MANIFEST, REPORT, REVERT_SUFFIX, ROLES, Manifest, NodeReport, Outcome, SignedCommand, peek_report, verify_command, verify_manifest, verify_report,
)
from .errors import DeployError
from .executor import Executor
from .journal import Journal
from .records import CommandRecord, record, summary, view_of
from .releases import Releases
from .report import DeployReport
from .rollout import Plan, View
from .spec import Application, DeployCommand, DockerAction, RollbackAction, TarAction
from .store import UPLOAD, ArtifactStore

QUERY = "/p2pnode/deploy-query/1.0.0"
QUERY_LIMITS = rpc.Limits(max_request=16 << 10, max_reply=4 << 20, timeout=20.0)
GRACE_NS = 2 * timefmt.NS  # a missing outcome counts as missed this long after its wave's deadline
GC_INTERVAL = 600.0
MAX_RECORDS = 2000  # deploys held in memory for records (all stay in the bus's store)
MAX_LIST = 200
REVERT_VALID_NS = 3600 * timefmt.NS
POST_FETCH = frozenset({R.EXTRACTING, R.INSTALLING, R.STARTING, R.HEALTH_CHECK, R.SUCCESS})

log = logging.getLogger("p2pnode.deploy")


def artifacts_of(cmd: DeployCommand) -> list[str]:
    if isinstance(cmd.action, TarAction):
        return [a.sha256 for a in cmd.action.artifacts]
    if isinstance(cmd.action, DockerAction) and cmd.action.archive is not None:
        return [cmd.action.archive.sha256]
    return []


def _peek_command(payload: dict[str, Any]) -> tuple[str, int]:
    deploy_id, issued = payload.get("deploy_id"), payload.get("issued_at")
    if not isinstance(deploy_id, str) or not isinstance(issued, str):
        raise DecodeError("deploy command: deploy_id or issued_at missing")
    return deploy_id, timefmt.parse_ns(issued)


def _peek_manifest(payload: dict[str, Any]) -> tuple[str, int]:
    sha, issued = payload.get("sha256"), payload.get("issued_at")
    if not isinstance(sha, str) or not isinstance(issued, str):
        raise DecodeError("artifact manifest: sha256 or issued_at missing")
    return sha, timefmt.parse_ns(issued)


class DeployService(Service):
    name = "deploy"

    def __init__(self, ctx: ServiceContext, membership: MembershipService):
        self.ctx = ctx
        self.membership = membership
        cfg = ctx.config.deploy
        if cfg.artifact_dir is None:
            cfg = attrs.evolve(cfg, artifact_dir=ctx.config.data_dir / "artifacts")
        self.config: DeployConfig = cfg
        assert cfg.artifact_dir is not None
        self.me = str(ctx.peer_id)
        self.commands: dict[str, CommandRecord] = {}
        self.reports: dict[str, dict[str, NodeReport]] = {}
        self.seen: dict[str, tuple[str, int]] = {}
        self.store = ArtifactStore(cfg, cfg.artifact_dir, ctx.blocks, me=ctx.peer_id, candidates=self._candidates,
                                   now_ns=ctx.clock.now_ns)
        self.journal: Journal | None = None
        self.executor: Executor | None = None
        self._nursery: trio.Nursery | None = None
        self._following: set[str] = set()
        self._changed = trio.Event()
        self._gc_wakeup = trio.Event()
        self._started: dict[str, int] = {}
        self._last_sent: dict[str, tuple[str, float]] = {}  # deploy -> (status, monotonic time) of the last report sent
        self._pending: dict[str, DeployReport] = {}  # coalesced progress reports waiting for their turn
        self._pending_wakeup = trio.Event()
        self._revert_reasons: dict[str, str] = {}
        self.reports_sent = 0
        bus = ctx.bus
        bus.register(DocumentType(MANIFEST, verify=self._verify_manifest, reload=self._reload_manifest, apply=self._apply_manifest,
                                  ordering=LWW, peek=_peek_manifest, keep=1, rejected_action="artifact_manifest_rejected"))
        bus.register(DocumentType(COMMAND, verify=self._verify_command, reload=self._reload_command, apply=self._apply_command,
                                  ordering=LWW, peek=_peek_command, keep=1, rejected_action="deploy_command_rejected"))
        bus.register(DocumentType(REPORT, verify=self._verify_report, reload=self._reload_report, apply=self._apply_report,
                                  ordering=LWW, peek=peek_report, keep=1, rejected_action="deploy_report_rejected"))
        rpc.serve(ctx.host, QUERY, self._serve_query, QUERY_LIMITS, allow=self.authorized)
        ctx.host.set_handler(UPLOAD, self._serve_upload)

    # ---- documents ---------------------------------------------------------------------------------

    def _verify_command(self, env: Envelope, now_ns: int) -> Accepted:
        signed = verify_command(env, self.membership.trust, now_ns)
        cmd = signed.command
        seen = self.seen.get(cmd.deploy_id)
        if seen is not None:
            if seen[0] != env.digest():
                raise Rejected("replayed", f"deploy_id {cmd.deploy_id} was already used by another command on this node; "
                                           "every deploy needs a new deploy_id")
            if cmd.deploy_id not in self.ctx.bus.holding(COMMAND):
                raise Rejected("replayed", f"deploy {cmd.deploy_id} was already accepted by this node; a command runs once")
        return Accepted(cmd.deploy_id, cmd.issued_at_ns, signed)

    def _reload_command(self, env: Envelope, now_ns: int) -> Accepted:
        signed = verify_command(env, self.membership.trust, now_ns, stored=True)
        return Accepted(signed.command.deploy_id, signed.command.issued_at_ns, signed)

    def _apply_command(self, accepted: Accepted, env: Envelope, source: PeerId | None, loaded: bool) -> None:
        signed: SignedCommand = accepted.doc
        cmd = signed.command
        targets = self._resolve(cmd)
        rec = CommandRecord(cmd, str(signed.issuer), signed.role, targets, Plan.of(cmd, targets), env.digest())
        self.commands[cmd.deploy_id] = rec
        if cmd.deploy_id not in self.seen:
            self.seen[cmd.deploy_id] = (rec.digest, cmd.valid_until_ns)
            if self.journal is not None:
                self.journal.remember(cmd.deploy_id, rec.digest, cmd.valid_until_ns)
        if not loaded:
            log.info(fmt("deploy_command", deploy=cmd.deploy_id, type=cmd.kind, app=cmd.app.key, version=cmd.version,
                         targets=len(targets), issuer=signed.issuer, source=source or "local", target=self.me in targets or None))
        self._prune_memory()
        self._touch()
        self._follow_soon(cmd.deploy_id)

    def _resolve(self, cmd: DeployCommand) -> tuple[str, ...]:
        """The target list in wave order: the signed peers as given, then (for labels or "all", which
        the admin tool resolves before signing) the members of this node's snapshot, sorted."""
        out = list(dict.fromkeys(cmd.targets.peers))
        if cmd.targets.all or cmd.targets.labels:
            wanted = set(cmd.targets.labels)
            extra = sorted(str(m.peer_id) for m in self.membership.members() if cmd.targets.all or wanted & set(m.labels))
            out += [p for p in extra if p not in out]
        return tuple(out)

    def _verify_report(self, env: Envelope, now_ns: int) -> Accepted:
        nr = verify_report(env, self.membership.cluster_id, member=self.ctx.roster.is_member(env.signer_id))
        return Accepted(nr.key, nr.report.seq, nr)

    def _reload_report(self, env: Envelope, now_ns: int) -> Accepted:
        nr = verify_report(env, self.membership.cluster_id, member=True)
        return Accepted(nr.key, nr.report.seq, nr)

    def _apply_report(self, accepted: Accepted, env: Envelope, source: PeerId | None, loaded: bool) -> None:
        nr: NodeReport = accepted.doc
        self.reports.setdefault(nr.report.deploy_id, {})[str(nr.peer_id)] = nr
        if nr.report.final and not loaded:
            self._gc_wakeup.set()
        self._touch()

    def _verify_manifest(self, env: Envelope, now_ns: int) -> Accepted:
        m = verify_manifest(env, self.membership.trust, now_ns)
        return Accepted(m.sha256, m.issued_at_ns, m)

    def _reload_manifest(self, env: Envelope, now_ns: int) -> Accepted:
        m = verify_manifest(env, self.membership.trust, now_ns, stored=True)
        return Accepted(m.sha256, m.issued_at_ns, m)

    def _apply_manifest(self, accepted: Accepted, env: Envelope, source: PeerId | None, loaded: bool) -> None:
        self.store.add_manifest(accepted.doc)

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _prune_memory(self) -> None:
        if len(self.commands) <= MAX_RECORDS:
            return
        oldest = sorted(self.commands, key=lambda d: self.commands[d].command.issued_at_ns)
        for deploy_id in oldest[: len(self.commands) - MAX_RECORDS]:
            if deploy_id not in self._following:
                del self.commands[deploy_id]
                self.reports.pop(deploy_id, None)
                self._started.pop(deploy_id, None)
                self._revert_reasons.pop(deploy_id, None)

    # ---- lifetime ---------------------------------------------------------------------------------

    async def load(self) -> None:
        db = await self.ctx.databases.open("deploy.db", J.MIGRATIONS)
        await db.read(lambda conn: conn.execute("PRAGMA synchronous=FULL"))
        self.journal = Journal(db, self.config.keep_finished)
        stored = await self.journal.seen(self.ctx.clock.now_ns())
        for deploy_id, rec in self.commands.items():  # loaded by the bus before us
            if deploy_id not in stored:
                self.journal.remember(deploy_id, rec.digest, rec.command.valid_until_ns)
        self.seen = {**stored, **self.seen}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.journal is not None
        async with Executor.open(self.config, self.journal, on_report=self._on_report, artifacts=self.store,
                                 now_ns=self.ctx.clock.now_ns) as executor:
            self.executor = executor
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flush_pending)
                nursery.start_soon(self._collect_garbage)
                await self._republish()
                for deploy_id in list(self.commands):
                    self._follow_soon(deploy_id)
                task_status.started()
                await trio.sleep_forever()

    # ---- following a command this node is a target of ----------------------------------------------

    def _follow_soon(self, deploy_id: str) -> None:
        rec = self.commands.get(deploy_id)
        if self._nursery is None or rec is None or self.me not in rec.targets or deploy_id in self._following:
            return
        mine = self.reports.get(deploy_id, {}).get(self.me)
        if mine is not None and (mine.report.status == R.FAILED and mine.report.stage in ("halted", "refused")):
            return
        if self.ctx.clock.now_ns() > rec.command.valid_until_ns and mine is not None and mine.report.final:
            return  # long over; a revert it might still owe is judged by its executor journal at most once
        self._following.add(deploy_id)
        self._nursery.start_soon(self._follow, deploy_id)

    def view(self, rec: CommandRecord) -> View:
        return view_of(rec, self.reports.get(rec.command.deploy_id, {}), self.ctx.clock.now_ns(), GRACE_NS)

    async def _wait_change(self, until_ns: int | None, limit: float = 30.0) -> None:
        event = self._changed
        timeout = limit if until_ns is None else max(0.01, min(limit, (until_ns - self.ctx.clock.now_ns()) / timefmt.NS))
        with trio.move_on_after(timeout):
            await event.wait()

    async def _follow(self, deploy_id: str) -> None:
        try:
            await self._follow_command(deploy_id)
        except DeployError as exc:
            log.warning(fmt("deploy_follow_failed", deploy=deploy_id, error=str(exc)))
        except Exception:
            log.exception(fmt("deploy_follow_failed", deploy=deploy_id))
        finally:
            self._following.discard(deploy_id)

    async def _follow_command(self, deploy_id: str) -> None:
        assert self.journal is not None and self.executor is not None
        rec = self.commands[deploy_id]
        if await self.journal.get(deploy_id) is None:
            mine = self.reports.get(deploy_id, {}).get(self.me)
            if mine is not None and mine.report.final:
                return  # refused or halted earlier
            while True:
                view = self.view(rec)
                if view.may_start(rec.plan, self.me):
                    break
                if view.halted:
                    await self._local_final(rec.command, "halted", f"not started: {view.reason}")
                    return
                await self._wait_change(view.next_check_ns)
            if not await self._submit(rec.command):
                return
        final = await self.executor.wait(deploy_id)
        if not (rec.plan.auto_revert and final.success):
            return
        while True:
            view = self.view(rec)
            if view.should_revert(rec.plan, self.me):
                break
            if view.done or self.ctx.clock.now_ns() > rec.command.valid_until_ns:
                return
            await self._wait_change(view.next_check_ns)
        await self._revert(rec, view.reason)

    def local(self, cmd: DeployCommand) -> DeployCommand:
        """The command as this node runs it: `${host}` in its root is this node's deploy.host."""
        return attrs.evolve(cmd, root=cmd.root.replace("${host}", self.config.host)) if "${host}" in cmd.root else cmd

    async def _submit(self, cmd: DeployCommand) -> bool:
        assert self.executor is not None
        try:
            await self.executor.submit(self.local(cmd))
        except (DeployError, DecodeError) as exc:
            if "already accepted" in str(exc):
                return True
            log.warning(fmt("deploy_refused", deploy=cmd.deploy_id, app=cmd.app.key, reason=str(exc)))
            await self._local_final(cmd, "refused", f"refused by this node: {exc}")
            return False
        return True

    async def _local_final(self, cmd: DeployCommand, stage: str, message: str) -> None:
        now = self.ctx.clock.now_ns()
        self._started.setdefault(cmd.deploy_id, now)
        await self._publish(DeployReport(cmd.deploy_id, cmd.kind, cmd.app.key, cmd.version, R.FAILED, 0, stage, message[: R.MAX_MESSAGE],
                                         1, now, final=True, success=False))

    async def _revert(self, rec: CommandRecord, reason: str) -> None:
        """This node's part of auto_revert: back to the release that was current before the deploy."""
        assert self.journal is not None and self.executor is not None
        cmd = rec.command
        revert_id = cmd.deploy_id + REVERT_SUFFIX
        self._revert_reasons[cmd.deploy_id] = reason
        if await self.journal.get(revert_id) is None:
            entry = await self.journal.get(cmd.deploy_id)
            if entry is None:
                return
            now = self.ctx.clock.now_ns()
            revert = DeployCommand(revert_id, cmd.app, entry.prev_version, entry.command.root, RollbackAction(), now,
                                   now + REVERT_VALID_NS)
            log.info(fmt("deploy_revert", deploy=cmd.deploy_id, to=entry.prev_version or "previous", reason=reason))
            try:
                await self.executor.submit(revert)
            except (DeployError, DecodeError) as exc:
                log.warning(fmt("deploy_revert_refused", deploy=cmd.deploy_id, reason=str(exc)))
                return
        await self.executor.wait(revert_id)

    # ---- reports ---------------------------------------------------------------------------------

    async def _on_report(self, report: DeployReport) -> None:
        """The executor's callback: translate a revert's reports, coalesce progress, sign and publish."""
        if report.deploy_id.endswith(REVERT_SUFFIX):
            translated = await self._translate_revert(report)
            if translated is None:
                return
            report, outcome = translated
        else:
            outcome = None
        deploy_id = report.deploy_id
        if report.seq == 1 or report.status == R.PENDING:
            self._started.setdefault(deploy_id, report.at_ns)
        last = self._last_sent.get(deploy_id)
        now = trio.current_time()
        if report.final or last is None or last[0] != report.status or now - last[1] >= self.config.report_interval:
            self._pending.pop(deploy_id, None)
            await self._publish(report, outcome)
            if report.final:
                self._last_sent.pop(deploy_id, None)
        else:
            self._pending[deploy_id] = report
            self._pending_wakeup.set()

    async def _translate_revert(self, report: DeployReport) -> tuple[DeployReport, Outcome] | None:
        assert self.journal is not None
        deploy_id = report.deploy_id[: -len(REVERT_SUFFIX)]
        entry = await self.journal.get(deploy_id)
        if entry is None:
            return None
        base = entry.report
        outcome = Outcome(base.status, bool(base.success), base.at_ns)
        status, message = report.status, report.message
        if status == R.PENDING:
            status = R.ROLLING_BACK
            message = f"reverting: {self._revert_reasons.get(deploy_id, 'the rollout halted')}"
        translated = attrs.evolve(report, deploy_id=deploy_id, command_type=entry.command.kind, status=status, seq=base.seq + report.seq,
                                  stage=f"revert: {report.stage}", message=message[: R.MAX_MESSAGE],
                                  success=False if report.final else None)
        return translated, outcome

    async def _publish(self, report: DeployReport, outcome: Outcome | None = None) -> None:
        deploy_id = report.deploy_id
        started = self._started.get(deploy_id)
        if started is None and self.journal is not None:
            history = await self.journal.reports(deploy_id)
            started = history[0].at_ns if history else report.at_ns
            self._started[deploy_id] = started
        nr = NodeReport(self.ctx.peer_id, self.membership.cluster_id, report, started or report.at_ns, outcome)
        verdict = await self.ctx.bus.offer(nr.sign(self.ctx.identity))
        self._last_sent[deploy_id] = (report.status, trio.current_time())
        self.reports_sent += 1
        if verdict.result not in ("accepted", "ignored"):
            log.warning(fmt("deploy_report_not_stored", deploy=deploy_id, status=report.status, result=verdict.result,
                            reason=verdict.reason))

    async def _flush_pending(self) -> None:
        while True:
            if not self._pending:
                await self._pending_wakeup.wait()
                self._pending_wakeup = trio.Event()
                continue
            now = trio.current_time()
            due = {d: self._last_sent.get(d, ("", 0.0))[1] + self.config.report_interval for d in self._pending}
            ready = [d for d, t in due.items() if t <= now]
            if not ready:
                await trio.sleep(min(due.values()) - now)
                continue
            for deploy_id in ready:
                report = self._pending.pop(deploy_id, None)
                if report is not None:
                    await self._publish(report)

    async def _republish(self) -> None:
        """After a restart: publish the journal's latest report of each deploy whose report on the
        bus is older (the node died between journaling a status and publishing it)."""
        assert self.journal is not None
        for report in await self.journal.latest(limit=self.config.keep_finished):
            outcome = None
            if report.deploy_id.endswith(REVERT_SUFFIX):
                translated = await self._translate_revert(report)
                if translated is None:
                    continue
                report, outcome = translated
            held = self.reports.get(report.deploy_id, {}).get(self.me)
            if held is None or held.report.seq < report.seq:
                await self._publish(report, outcome)

    # ---- artifacts ---------------------------------------------------------------------------------

    def _candidates(self, manifest: Manifest) -> list[PeerId]:
        """Peers to fetch an artifact's blocks from: its origin, then nodes known to hold it (past
        the fetch of a deploy that uses it), then every other member."""
        roster = self.ctx.roster
        holders: list[str] = [str(manifest.origin)] if manifest.origin is not None else []
        for deploy_id, rec in self.commands.items():
            if manifest.sha256 in artifacts_of(rec.command):
                for holder, nr in self.reports.get(deploy_id, {}).items():
                    if nr.report.status in POST_FETCH or (nr.result is not None and nr.result.success):
                        holders.append(holder)
        out: list[PeerId] = []
        for text in [*holders, *(str(p) for p in roster.others())]:
            try:
                peer = PeerId.from_string(text)
            except DecodeError:
                continue
            if peer not in out and roster.is_member(peer) and peer != self.ctx.peer_id:
                out.append(peer)
        return out

    async def _serve_upload(self, stream: Any, conn: Any) -> None:
        await self.store.serve_upload(stream, conn.peer_id, self.membership.trust, lambda env: self.ctx.bus.offer(env))

    async def referenced(self) -> set[str]:
        """Artifacts this node must keep: used by a kept release, by a deploy not finished here, or
        by a command still valid (other nodes may fetch from us)."""
        assert self.journal is not None
        now = self.ctx.clock.now_ns()
        keep: set[str] = set()
        roots: set[tuple[str, str, str, str]] = set()
        for rec in self.commands.values():
            cmd = self.local(rec.command)
            if cmd.valid_until_ns >= now:
                keep.update(artifacts_of(cmd))
            if self.me in rec.targets:
                roots.add((cmd.root, cmd.app.project, cmd.app.name, cmd.app.env))
        for deploy_id in await self.journal.db.read(lambda c: [r[0] for r in c.execute("SELECT deploy_id FROM deploys WHERE final = 0")]):
            entry = await self.journal.get(deploy_id)
            if entry is not None:
                keep.update(artifacts_of(entry.command))
                roots.add((entry.command.root, entry.command.app.project, entry.command.app.name, entry.command.app.env))

        def kept_releases() -> set[str]:
            found: set[str] = set()
            for root, project, name, env in roots:
                rel = Releases(Path(root), Application(project, name, env))
                try:
                    for entry in rel.entries():
                        found.update(artifacts_of(DeployCommand.from_dict(entry.command)))
                except (DeployError, DecodeError, OSError, KeyError, TypeError):
                    continue
            return found

        keep |= await trio.to_thread.run_sync(kept_releases)
        return keep

    async def collect(self) -> list[str]:
        return await self.store.collect(await self.referenced())

    async def _collect_garbage(self) -> None:
        while True:
            with trio.move_on_after(GC_INTERVAL):
                await self._gc_wakeup.wait()
                await trio.sleep(1.0)  # let a burst of final reports settle
            self._gc_wakeup = trio.Event()
            try:
                await self.collect()
            except (P2PNodeError, OSError) as exc:
                log.warning(fmt("artifact_gc_failed", error=str(exc)))

    # ---- reading records -----------------------------------------------------------------------------

    def name_of(self, peer: str) -> str | None:
        snap = self.membership.current
        if snap is None:
            return None
        try:
            member = snap.member(PeerId.from_string(peer))
        except DecodeError:
            return None
        return member.name if member is not None else None

    def record(self, deploy_id: str) -> dict[str, Any] | None:
        rec = self.commands.get(deploy_id)
        reports = self.reports.get(deploy_id, {})
        if rec is None and not reports:
            return None
        return record(deploy_id, rec, reports, now_ns=self.ctx.clock.now_ns(), grace_ns=GRACE_NS, name_of=self.name_of)

    def list(self, app: str | None = None, node: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        ids = set(self.commands) | set(self.reports)

        def issued(deploy_id: str) -> int:
            rec = self.commands.get(deploy_id)
            if rec is not None:
                return rec.command.issued_at_ns
            return min((r.started_at_ns for r in self.reports.get(deploy_id, {}).values()), default=0)

        out = []
        for deploy_id in sorted(ids, key=issued, reverse=True):
            full = self.record(deploy_id)
            if full is None or (app and full.get("app") != app):
                continue
            if node and not any(node in (row["peer_id"], row["name"]) for row in full["nodes"]):
                continue
            out.append(summary(full))
            if len(out) >= limit:
                break
        return out

    def resolve_node(self, text: str) -> str:
        """A peer ID from a member's name, its peer ID or the end of its peer ID."""
        for m in self.membership.members():
            if text in (m.name, str(m.peer_id)) or (len(text) >= 6 and str(m.peer_id).endswith(text)):
                return str(m.peer_id)
        try:
            return str(PeerId.from_string(text))
        except DecodeError:
            raise DeployError(f"no member named {text!r}; give a member's name or peer ID") from None

    async def log_of(self, deploy_id: str) -> str | None:
        """This node's full log of a deploy (and of its revert, if it reverted)."""
        assert self.journal is not None
        parts = []
        for did, title in ((deploy_id, ""), (deploy_id + REVERT_SUFFIX, "== revert ==\n")):
            entry = await self.journal.get(did)
            if entry is not None:
                parts.append(title + entry.log.decode(errors="replace"))
        return "\n".join(parts) if parts else None

    async def remote_log(self, deploy_id: str, peer: str) -> dict[str, Any]:
        if peer == self.me:
            return {"peer_id": peer, "log": await self.log_of(deploy_id), "source": "local"}
        pid = PeerId.from_string(peer)
        member = self.membership.current.member(pid) if self.membership.current else None
        try:
            with trio.fail_after(QUERY_LIMITS.timeout):
                await self.ctx.host.connect_peer(pid, list(member.addrs) if member and member.addrs else None)
                reply = await rpc.request(self.ctx.host, pid, QUERY, {"op": "log", "deploy_id": deploy_id}, QUERY_LIMITS)
        except (P2PNodeError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            tail = self.reports.get(deploy_id, {}).get(peer)
            return {"peer_id": peer, "log": tail.report.log_tail if tail else None, "source": "report",
                    "note": f"{peer[-8:]} could not be asked ({exc or type(exc).__name__}); this is the log tail of its last report"}
        text = reply.get("log")
        return {"peer_id": peer, "log": text if isinstance(text, str) else None, "source": "node"}

    # ---- the query protocol ------------------------------------------------------------------------------

    def authorized(self, peer: PeerId, request: dict[str, Any]) -> bool:
        """Members, and a client presenting an admin or deploy proof for the key it connected with."""
        if self.ctx.roster.is_member(peer):
            return True
        raw = request.get("auth")
        if raw is None or self.membership.system_key is None:
            return False
        try:
            env = Envelope.from_dict(raw, "admin-proof")
            verify_admin_proof(env, self.membership.trust, cluster_id=self.membership.cluster_id, admin=peer,
                               at_ns=self.ctx.clock.now_ns(), roles=ROLES)
        except DecodeError:
            return False
        return True

    async def _serve_query(self, request: dict[str, Any], conn: Any) -> dict[str, Any]:
        f = codec.Fields(request, "deploy query")
        op = f.text("op", max_len=16)
        if op == "status":
            return {"record": _cbor_safe(self.record(f.text("deploy_id", max_len=128)))}
        if op == "list":
            limit = min(MAX_LIST, max(1, f.integer("limit", optional=True, default=50)))
            return {"deploys": _cbor_safe(self.list(f.text("app", optional=True, max_len=200), f.text("node", optional=True, max_len=128),
                                                    limit))}
        if op == "members":  # the admin tool resolves --node/--label/--all with this (deployers may not pull snapshots)
            snap = self.membership.current
            return {"issued_at": snap.issued_at if snap else None,
                    "members": [{"peer_id": str(m.peer_id), "name": m.name, "labels": list(m.labels)} for m in self.membership.members()]}
        if op == "log":
            deploy_id, node = f.text("deploy_id", max_len=128), f.text("node", optional=True, max_len=128)
            if node is None:
                return {"peer_id": self.me, "log": await self.log_of(deploy_id), "source": "node"}
            try:
                return await self.remote_log(deploy_id, self.resolve_node(node))
            except DeployError as exc:
                return {"error": str(exc)}
        return {"error": f"unknown op {op!r}"}

    # ---- status and control API ------------------------------------------------------------------------

    def status(self) -> Mapping[str, Any]:
        running = sum(1 for d in self._following)
        return {"deploy": {"enabled": self.config.enabled, "allowed_roots": [str(p) for p in self.config.allowed_roots],
                           "commands": len(self.commands), "following": running, "reports_sent": self.reports_sent,
                           "artifacts": self.store.status()}}

    def routes(self) -> Sequence[Route]:
        return [
            Route("GET", "/deploy/list", self._route_list, "deploys, newest first; ?app=project/name/env ?node=NAME|PEER ?limit=N"),
            Route("GET", "/deploy/status/", self._route_status, "/deploy/status/<deploy id>: the deploy's record from every node"),
            Route("GET", "/deploy/logs/", self._route_logs, "/deploy/logs/<deploy id>?node=NAME|PEER: that node's full log of it"),
        ]

    async def _route_list(self, request: ControlRequest) -> tuple[int, Any]:
        node = request.arg("node")
        try:
            peer = self.resolve_node(node) if node else None
        except DeployError as exc:
            return 400, {"error": str(exc)}
        return 200, {"deploys": self.list(request.arg("app"), peer, int(request.arg("limit") or 50))}

    async def _route_status(self, request: ControlRequest) -> tuple[int, Any]:
        deploy_id = request.path.removeprefix("/deploy/status/")
        rec = self.record(deploy_id)
        if rec is None:
            return 404, {"error": f"no deploy {deploy_id!r} is known to this node"}
        return 200, rec

    async def _route_logs(self, request: ControlRequest) -> tuple[int, Any]:
        deploy_id = request.path.removeprefix("/deploy/logs/")
        try:
            peer = self.resolve_node(request.arg("node") or self.me)
        except DeployError as exc:
            return 400, {"error": str(exc)}
        out = await self.remote_log(deploy_id, peer)
        if out.get("log") is None:
            return 404, {"error": f"node {peer} has no log of deploy {deploy_id!r}", **out}
        return 200, out


def _cbor_safe(value: Any) -> Any:
    """JSON-ready data as CBOR (the same shapes; floats stay floats)."""
    return json.loads(json.dumps(value))
