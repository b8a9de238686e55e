"""Deploy records as operators read them: one deploy's command, rollout and per-node state.

Built from what every node holds — the signed command and the latest signed report of each node —
so any node gives the same answer (`p2pnode deploy status ID`, `deploy list`, the admin tool's
`--wait`). Pure: values in, JSON-ready maps out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .. import timefmt
from .documents import NodeReport, Outcome
from .report import ROLLBACK_FAILED, ROLLED_BACK
from .rollout import FAILED, HALTED, LATE, MISSED, SUCCESS, Plan, View, evaluate
from .spec import DeployCommand


@attrs.frozen
class CommandRecord:
    command: DeployCommand
    issuer: str
    issuer_role: str
    targets: tuple[str, ...]  # resolved, in wave order
    plan: Plan
    digest: str


def outcomes(reports: Mapping[str, NodeReport]) -> dict[str, Outcome]:
    return {peer: r.result for peer, r in reports.items() if r.result is not None}


def view_of(rec: CommandRecord, reports: Mapping[str, NodeReport], now_ns: int, grace_ns: int) -> View:
    return evaluate(rec.plan, outcomes(reports), now_ns, grace_ns)


def _reverted(report: NodeReport) -> bool:
    return report.outcome is not None and report.report.final and report.report.status in (ROLLED_BACK, ROLLBACK_FAILED)


def state_of(rec: CommandRecord | None, reports: Mapping[str, NodeReport], view: View | None) -> tuple[str, bool]:
    """(state, settled): waiting, running, success, partial (failures within max_failures) or failed;
    settled once nothing will change
    (every decided node's last report is final, and every node due to revert has reverted)."""
    if rec is None or view is None:
        finals = [r for r in reports.values() if r.report.final]
        if not reports:
            return "unknown", False
        if len(finals) < len(reports):
            return "running", False
        return ("success" if all(r.report.success for r in finals) else "failed"), False
    if not view.done:
        return ("running" if reports else "waiting"), False
    settled = True
    for peer, verdict in view.verdicts.items():
        report = reports.get(peer)
        if verdict in (SUCCESS, FAILED, LATE) and report is not None and not report.report.final:
            settled = False
        if view.should_revert(rec.plan, peer) and (report is None or not _reverted(report)):
            settled = False
    if view.halted:
        return "failed", settled
    if all(v == SUCCESS for v in view.verdicts.values()):
        return "success", settled
    return "partial", settled


def node_row(peer: str, report: NodeReport | None, wave: int | None, verdict: str | None, name: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"peer_id": peer, "name": name, "wave": wave, "verdict": verdict}
    if report is None:
        row.update(status=None, progress=0, stage="", message="", final=False)
        if verdict == HALTED:
            row.update(stage="halted", message="not started: the rollout halted")
        elif verdict == MISSED:
            row.update(message="no final report within the rollout's progress_deadline")
        return row
    r = report.report
    row.update(status=r.status, progress=r.progress, stage=r.stage, message=r.message, seq=r.seq, final=r.final, success=r.success,
               version=r.version, started_at=timefmt.format_ns(report.started_at_ns), updated_at=timefmt.format_ns(r.at_ns),
               log_tail=r.log_tail)
    if report.outcome is not None:
        row["outcome"] = report.outcome.to_dict()
    return row


def record(deploy_id: str, rec: CommandRecord | None, reports: Mapping[str, NodeReport], *, now_ns: int, grace_ns: int,
           name_of: Callable[[str], str | None]) -> dict[str, Any]:
    view = view_of(rec, reports, now_ns, grace_ns) if rec is not None else None
    state, settled = state_of(rec, reports, view)
    out: dict[str, Any] = {"deploy_id": deploy_id, "known": rec is not None, "state": state, "settled": settled}
    peers: list[str] = list(rec.targets) if rec is not None else []
    peers += sorted(p for p in reports if p not in peers)
    if rec is not None and view is not None:
        cmd = rec.command
        out.update(type=cmd.kind, app=cmd.app.key, version=cmd.version, root=cmd.root, issued_at=timefmt.format_ns(cmd.issued_at_ns),
                   valid_until=timefmt.format_ns(cmd.valid_until_ns), issuer=rec.issuer, issuer_role=rec.issuer_role,
                   rollout=cmd.rollout.to_dict(), waves=[list(w) for w in rec.plan.waves], open_waves=view.open_waves,
                   halted=view.halted, reason=view.describe(lambda p: name_of(p) or p[-8:]))
    else:
        any_report = next(iter(reports.values()), None)
        if any_report is not None:
            out.update(type=any_report.report.command_type, app=any_report.report.app, version=any_report.report.version)
    nodes = []
    for peer in peers:
        wave = rec.plan.wave_of(peer) if rec is not None else None
        verdict = view.verdicts.get(peer) if view is not None else None
        nodes.append(node_row(peer, reports.get(peer), wave, verdict, name_of(peer)))
    out["nodes"] = nodes
    counts: dict[str, int] = {}
    for row in nodes:
        key = row["status"] or row["verdict"] or "waiting"
        counts[key] = counts.get(key, 0) + 1
    out["counts"] = counts
    return out


def summary(rec: dict[str, Any]) -> dict[str, Any]:
    """A record without its per-node rows (for lists)."""
    keep = ("deploy_id", "known", "state", "settled", "type", "app", "version", "issued_at", "halted", "counts")
    out = {k: rec[k] for k in keep if k in rec}
    out["targets"] = len(rec.get("nodes", ()))
    return out


# ---- text, for the CLIs ------------------------------------------------------------------------------

def node_line(row: dict[str, Any]) -> str:
    name = row.get("name") or row["peer_id"][-8:]
    wave = "-" if row.get("wave") is None else str(row["wave"] + 1)
    status = row.get("status") or row.get("verdict") or "waiting"
    said = row.get("message") or row.get("stage") or ""
    if row.get("verdict") in (MISSED, LATE, HALTED) and row.get("verdict") != status:
        said = f"[{row['verdict']}] {said}"
    return f"  {name:<14} wave {wave:<3} {status:<15} {row.get('progress') or 0:>3}%  {said}"[:200]


def format_record(rec: dict[str, Any]) -> str:
    head = f"deploy {rec['deploy_id']}  {rec.get('type', '?')} {rec.get('app', '?')} {rec.get('version') or ''}".rstrip()
    lines = [head, f"state  {rec['state']}{'' if rec.get('settled') else ' (in progress)'}"]
    if rec.get("known"):
        ro = rec.get("rollout", {})
        lines.append(f"issued {rec.get('issued_at')} by {rec.get('issuer', '')[-8:]} ({rec.get('issuer_role')}); "
                     f"{len(rec.get('waves', []))} wave(s) of at most {ro.get('max_parallel')}, max_failures {ro.get('max_failures')}, "
                     f"auto_revert {'on' if ro.get('auto_revert') else 'off'}")
    else:
        lines.append("(this node does not hold the command; showing the reports it has)")
    if rec.get("reason"):
        lines.append(rec["reason"])
    lines += [node_line(row) for row in rec.get("nodes", [])]
    return "\n".join(lines)


def format_list(deploys: list[dict[str, Any]]) -> str:
    if not deploys:
        return "no deploys"
    rows = [("DEPLOY", "TYPE", "APP", "VERSION", "STATE", "NODES", "ISSUED")]
    for d in deploys:
        counts = d.get("counts", {})
        rows.append((d["deploy_id"], d.get("type", "?"), d.get("app", "?"), d.get("version") or "-", d["state"],
                     " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-", d.get("issued_at") or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
