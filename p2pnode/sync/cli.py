"""`p2pnode sync …`: folder sync as an operator sees it, through the local node's control socket.

`status`, `tasks` and `log` render what the node's GET /sync/status, /sync/tasks and /sync/log
return (any node answers for every receiver: each one's signed sync state reaches all members).
`trigger` POSTs /sync/trigger to the folder's source (a rescan that publishes a new version if
anything changed); with `--wait` it follows GET /sync/status until every receiver holds that
version, drawing a progress bar per node, and exits non-zero when a receiver fails or the
timeout passes. The rendering and the wait's verdict are pure functions of those JSON views;
`wait_for_version` is the thin trio loop around them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode

import attrs
import trio

from .. import control
from ..errors import P2PNodeError
from .documents import FAILED, REFUSED, SYNC_DEGRADED

EXIT_OK = 0
EXIT_FAILED = 1  # a receiver failed (FAILED / SYNC_DEGRADED) or refused the folder
EXIT_USAGE = 2  # no node on this data dir, unknown folder, not the source … (as `p2pnode status`)
EXIT_TIMEOUT = 3  # --wait: some receiver did not reach the version in time
REQUEST_TIMEOUT = 30.0  # one control-socket request during --wait
BAR_WIDTH = 20
MAX_ERROR_IN_TABLE = 80

DONE, FAILING, WAITING = "done", "failed", "waiting"


# -- formatting ------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_rate(rate: float | None) -> str:
    return f"{fmt_bytes(rate)}/s" if rate else "-"


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_time(ns: int | None) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9))


def short_peer(peer: str) -> str:
    return peer[:8] + "…" + peer[-6:] if len(peer) > 16 else peer


def clip(text: str, limit: int = MAX_ERROR_IN_TABLE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]


def node_label(entry: dict[str, Any]) -> str:
    return entry.get("name") or short_peer(entry["node"])


def version_text(version: dict[str, Any] | None) -> str:
    return str(version["seq"]) if version else "none yet"


def _task_progress(task: dict[str, Any] | None) -> tuple[str, str]:
    if not task:
        return "-", "-"
    files = f"{task['files_done']}/{task['files_total']}"
    data = f"{fmt_bytes(task['bytes_done'])}/{fmt_bytes(task['bytes_total'])}"
    return files, data


# -- sync status -------------------------------------------------------------------------------
def render_folder(folder: dict[str, Any]) -> list[str]:
    source = folder.get("source_name") or "-"
    head = (f"folder {folder['id']}  version {version_text(folder.get('version'))}  source {source} {short_peer(folder['source'])}"
            f" {folder['source_path']}  ({folder.get('source_status') or 'no state yet'})")
    lines = [head]
    if folder.get("source_error"):
        lines.append(f"  source error: {folder['source_error']}")
    nodes = folder.get("nodes") or []
    if not nodes:
        lines.append("  no receivers")
        return lines
    rows: list[tuple[str, ...]] = [("NODE", "PEER", "ONLINE", "VERSION", "STATE", "STATUS", "FILES", "BYTES", "RATE", "ETA", "UPDATED (UTC)")]
    errors = []
    for n in nodes:
        task = n.get("task")
        files, data = _task_progress(task)
        updated = n.get("updated_at")
        rows.append((
            node_label(n), short_peer(n["node"]), "yes" if n.get("online") else "no", str(n.get("seq") or 0),
            n.get("state") or "-", n.get("status") or "-", files, data,
            fmt_rate(task.get("rate")) if task and n.get("status") == "RUNNING" else "-", fmt_eta(n.get("eta_s")),
            updated[:19].replace("T", " ") if updated else "-",
        ))
        error = n.get("error") or (task.get("last_error") if task else "")
        if error and n.get("state") != "in-sync":
            errors.append(f"  {node_label(n)}: {error}")
    lines += table(rows, "  ")
    in_sync = sum(1 for n in nodes if n.get("state") == "in-sync")
    lines.append(f"  {in_sync} of {len(nodes)} receivers in sync, at most {folder.get('max_parallel_nodes', 1)} applying at once")
    if errors:
        lines.append("  last errors:")
        lines += ["  " + e for e in errors]
    return lines


def render_status(view: dict[str, Any]) -> str:
    folders = view.get("folders") or []
    if not folders:
        return "no folders: this node holds no sync-folder document (an admin declares one with `p2pnode-admin folder add`)"
    blocks: list[str] = []
    for folder in folders:
        if blocks:
            blocks.append("")
        blocks += render_folder(folder)
    return "\n".join(blocks)


# -- sync tasks / log --------------------------------------------------------------------------
def render_tasks(rows: list[dict[str, Any]], names: dict[str, str]) -> str:
    if not rows:
        return "no tasks"
    out: list[tuple[str, ...]] = [("TASK", "FOLDER", "NODE", "STATUS", "ATTEMPT", "VERSION", "FILES", "BYTES", "STARTED (UTC)",
                                   "TOOK", "LAST ERROR")]
    for t in sorted(rows, key=lambda r: (not r.get("current"), -int(r.get("started_at_ns") or 0))):
        files, data = _task_progress(t)
        took = "-"
        if t.get("finished_at_ns") and t.get("started_at_ns") and t["finished_at_ns"] >= t["started_at_ns"]:
            took = fmt_eta((t["finished_at_ns"] - t["started_at_ns"]) / 1e9)
        out.append((
            t["id"], t["folder"], names.get(t["node"]) or short_peer(t["node"]), t["status"] + ("" if t.get("current") else " (past)"),
            str(t.get("attempt", 0)), str(t["seq"]), files, data, fmt_time(t.get("started_at_ns")), took, clip(t.get("last_error") or "-"),
        ))
    return "\n".join(table(out))


def render_log(view: dict[str, Any], names: dict[str, str]) -> str:
    t = view["task"]
    node = view["node"]
    files, data = _task_progress(t)
    lines = [
        f"task      {t['id']}",
        f"folder    {view['folder']}",
        f"node      {names.get(node) or '-'} {node}",
        f"status    {t['status']}  attempt {t.get('attempt', 0)}",
        f"version   {t['seq']}",
        f"started   {fmt_time(t.get('started_at_ns'))} UTC",
        f"finished  {fmt_time(t.get('finished_at_ns'))}" + (" UTC" if t.get("finished_at_ns") else ""),
        f"progress  {files} files, {data}",
    ]
    if t.get("next_retry_at_ns"):
        lines.append(f"retry at  {fmt_time(t['next_retry_at_ns'])} UTC")
    lines.append(f"error     {t.get('last_error') or '-'}")
    lines.append("log (UTC):")
    lines += [f"  {line}" for line in t.get("log") or ["(empty)"]]
    return "\n".join(lines)


# -- trigger --wait: the verdict and the bars --------------------------------------------------
@attrs.frozen
class Target:
    """The version a trigger published: every receiver must hold it."""

    folder: str
    index_id: int
    seq: int


def judge(node: dict[str, Any], target: Target) -> str:
    """DONE when the receiver has applied `target` (or newer), FAILING when it refuses the folder or
    gave up on this version, WAITING otherwise (behind, pending its turn, running, retrying, offline).
    A failure on an older version is not final: the new version gives the receiver a new task."""
    status = node.get("status")
    if node.get("index_id") == target.index_id and (node.get("seq") or 0) >= target.seq:
        return DONE
    if status == REFUSED:
        return FAILING
    task = node.get("task")
    if status in (FAILED, SYNC_DEGRADED) and task and task.get("index_id") == target.index_id and task.get("seq", 0) >= target.seq:
        return FAILING
    return WAITING


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = int(max(0.0, min(1.0, fraction)) * width + 1e-9)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(node: dict[str, Any], target: Target, label_width: int = 0) -> str:
    verdict = judge(node, target)
    task = node.get("task") if isinstance(node.get("task"), dict) else None
    current = task is not None and task.get("index_id") == target.index_id and task.get("seq", 0) >= target.seq
    fraction = 0.0
    detail = ""
    if verdict == DONE:
        fraction = 1.0
        detail = f"in sync at version {node.get('seq')}"
    elif current and task is not None and node.get("status") == "RUNNING" and not task["files_total"]:
        detail = "planning"
    elif current and task is not None:
        if task["bytes_total"]:
            fraction = task["bytes_done"] / task["bytes_total"]
        elif task["files_total"]:
            fraction = task["files_done"] / task["files_total"]
        files, data = _task_progress(task)
        detail = f"{files} files  {data}"
        if node.get("status") == "RUNNING" and task.get("rate"):
            detail += f"  {fmt_rate(task.get('rate'))}  ETA {fmt_eta(node.get('eta_s'))}"
    else:
        detail = f"at version {node.get('seq') or 0}, waiting for version {target.seq}"
    status = node.get("status") or "no state yet"
    if not node.get("online"):
        status += ", offline"
    error = node.get("error") or (task.get("last_error") if task and verdict != DONE else "")
    line = f"{node_label(node).ljust(label_width)}  {bar(fraction)} {int(fraction * 100):3d}%  {detail}  {status}"
    if error and verdict != DONE:
        line += f": {clip(error)}"
    return line


class Painter:
    """Draws one line per receiver. On a terminal the block is redrawn in place; otherwise a line
    is printed each time a receiver's line changes (logs, CI)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.drawn = 0
        self.last: dict[int, str] = {}

    def paint(self, lines: Sequence[str]) -> None:
        if self.tty:
            moves = f"\x1b[{self.drawn}F" if self.drawn else ""
            body = "".join(f"\x1b[2K{line}\n" for line in lines)
            self.out.write(moves + body + ("\x1b[J" if self.drawn > len(lines) else ""))
            self.drawn = len(lines)
        else:
            for i, line in enumerate(lines):
                if self.last.get(i) != line:
                    self.last[i] = line
                    self.out.write(line + "\n")
        self.out.flush()


@attrs.frozen
class WaitResult:
    code: int
    folder: dict[str, Any]
    verdicts: dict[str, str]


def wait_summary(folder: dict[str, Any], target: Target, code: int, timeout: float) -> str:
    nodes = folder.get("nodes") or []
    done = [n for n in nodes if judge(n, target) == DONE]
    if code == EXIT_OK:
        return f"{folder['id']}: all {len(nodes)} receivers hold version {target.seq}"
    lines = []
    if code == EXIT_FAILED:
        lines.append(f"{folder['id']}: version {target.seq} failed on "
                     + ", ".join(node_label(n) for n in nodes if judge(n, target) == FAILING))
    else:
        lines.append(f"{folder['id']}: timed out after {timeout:g}s; {len(done)} of {len(nodes)} receivers hold version {target.seq}")
    for n in nodes:
        if judge(n, target) == DONE:
            continue
        task = n.get("task") or {}
        why = n.get("error") or task.get("last_error")
        where = f"at version {n.get('seq') or 0}" + ("" if n.get("online") else ", offline")
        lines.append(f"  {node_label(n)}: {n.get('status') or 'no state yet'}, {where}" + (f": {why}" if why else ""))
    return "\n".join(lines)


async def wait_for_version(get_folder: Callable[[], Any], target: Target, *, timeout: float, interval: float,
                           painter: Painter | None) -> WaitResult:
    """Poll `get_folder()` (one folder's status view) until every receiver holds `target` (EXIT_OK),
    one fails (EXIT_FAILED), or `timeout` seconds pass (EXIT_TIMEOUT)."""
    deadline = trio.current_time() + timeout
    while True:
        folder: dict[str, Any] = await get_folder()
        nodes = folder.get("nodes") or []
        verdicts = {n["node"]: judge(n, target) for n in nodes}
        if painter is not None:
            width = max((len(node_label(n)) for n in nodes), default=0)
            painter.paint([progress_line(n, target, width) for n in nodes])
        if any(v == FAILING for v in verdicts.values()):
            return WaitResult(EXIT_FAILED, folder, verdicts)
        if all(v == DONE for v in verdicts.values()):
            return WaitResult(EXIT_OK, folder, verdicts)
        left = deadline - trio.current_time()
        if left <= 0:
            return WaitResult(EXIT_TIMEOUT, folder, verdicts)
        await trio.sleep(min(interval, left))


# -- talking to the node -----------------------------------------------------------------------
class Node:
    """The local node's control socket."""

    def __init__(self, data_dir: str, timeout: float):
        self.path = Path(data_dir) / control.SOCKET_NAME
        self.timeout = timeout

    async def call(self, method: str, target: str, body: dict[str, Any] | None = None) -> Any:
        with trio.fail_after(self.timeout):
            code, view = await control.request(self.path, method, target, body)
        if code == 404 and isinstance(view, dict) and str(view.get("error", "")).startswith("no route"):
            raise control.ControlError("this node has no folder sync (an older p2pnode?); upgrade it")
        if code != 200:
            error = view.get("error") if isinstance(view, dict) else None
            if code == 408:
                error = f"the node did not answer within its control timeout ({error})"
            raise control.ControlError(error or f"HTTP {code}")
        return view

    async def folder(self, folder: str) -> dict[str, Any]:
        view = await self.call("GET", "/sync/status?" + urlencode({"folder": folder}))
        folders = view.get("folders") or []
        if not folders:
            raise control.ControlError(f"the node does not hold folder {folder!r} (any more)")
        result: dict[str, Any] = folders[0]
        return result

    async def names(self) -> dict[str, str]:
        """Peer ID → member name, as the node's folder views show them."""
        view = await self.call("GET", "/sync/status")
        out: dict[str, str] = {}
        for f in view.get("folders") or []:
            if f.get("source_name"):
                out[f["source"]] = f["source_name"]
            for n in f.get("nodes") or []:
                if n.get("name"):
                    out[n["node"]] = n["name"]
        return out


def _print(args: argparse.Namespace, text: str) -> None:
    print(text, file=args.stdout or sys.stdout, flush=True)


async def cmd_status(args: argparse.Namespace) -> int:
    node = Node(args.data_dir, args.timeout)
    view = await node.call("GET", "/sync/status" + ("?" + urlencode({"folder": args.folder}) if args.folder else ""))
    _print(args, json.dumps(view, indent=2) if args.json else render_status(view))
    return EXIT_OK


async def cmd_tasks(args: argparse.Namespace) -> int:
    node = Node(args.data_dir, args.timeout)
    names = await node.names()
    query: dict[str, str] = {}
    if args.folder:
        query["folder"] = args.folder
    if args.node:
        by_name = [peer for peer, name in names.items() if name == args.node]
        query["node"] = by_name[0] if len(by_name) == 1 else args.node
    view = await node.call("GET", "/sync/tasks" + ("?" + urlencode(query) if query else ""))
    _print(args, json.dumps(view, indent=2) if args.json else render_tasks(view.get("tasks") or [], names))
    return EXIT_OK


async def cmd_log(args: argparse.Namespace) -> int:
    node = Node(args.data_dir, args.timeout)
    view = await node.call("GET", "/sync/log?task=" + quote(args.task, safe=""))
    if args.json:
        _print(args, json.dumps(view, indent=2))
    else:
        _print(args, render_log(view, await node.names()))
    return EXIT_OK


async def cmd_trigger(args: argparse.Namespace) -> int:
    node = Node(args.data_dir, REQUEST_TIMEOUT)
    before = await node.folder(args.folder)
    if before.get("source_status") == REFUSED:
        print(f"p2pnode sync trigger: the source refuses folder {args.folder}: {before.get('source_error')}", file=args.stderr or sys.stderr)
        return EXIT_FAILED
    reply = await node.call("POST", "/sync/trigger", {"folder": args.folder})
    target = Target(reply["folder"], int(reply["index_id"]), int(reply["seq"]))
    changed = reply.get("changed", 0)
    if not args.wait:
        _print(args, json.dumps(reply, indent=2) if args.json else
               f"{target.folder}: rescanned, {changed} entries changed; version {target.seq}")
        return EXIT_OK
    out = args.stdout or sys.stdout
    painter = None
    if not args.json:
        _print(args, f"{target.folder}: rescanned, {changed} entries changed; waiting for every receiver to hold version {target.seq}")
        painter = Painter(out)
    result = await wait_for_version(lambda: node.folder(target.folder), target, timeout=args.timeout, interval=args.interval,
                                    painter=painter)
    summary = wait_summary(result.folder, target, result.code, args.timeout)
    if args.json:
        outcome = {EXIT_OK: "in-sync", EXIT_FAILED: "failed", EXIT_TIMEOUT: "timeout"}[result.code]
        _print(args, json.dumps({**reply, "result": outcome, "nodes": result.folder.get("nodes") or []}, indent=2))
    else:
        _print(args, summary)
    return result.code


async def dispatch(args: argparse.Namespace) -> int:
    """Run one `sync` subcommand; errors are one line on stderr and an exit code."""
    err = args.stderr or sys.stderr
    try:
        result: int = await args.sync_func(args)
        return result
    except control.ControlError as exc:
        print(f"p2pnode sync {args.sync_command}: {exc}", file=err)
        return EXIT_USAGE
    except trio.TooSlowError:
        print(f"p2pnode sync {args.sync_command}: the node did not answer in time", file=err)
        return EXIT_FAILED
    except (P2PNodeError, OSError, KeyError, TypeError, ValueError) as exc:
        print(f"p2pnode sync {args.sync_command}: unexpected answer or error: {exc!r}", file=err)
        return EXIT_FAILED


# -- the parser --------------------------------------------------------------------------------
def register(sub: Any, default_data_dir: str) -> None:
    """Add `sync` and its subcommands to p2pnode's subparsers."""
    sync = sub.add_parser("sync", help="folder sync: status, tasks, logs, trigger a new version", formatter_class=argparse.RawDescriptionHelpFormatter,
                          description=(
        "Folder sync as the local node sees it, through its control socket (<data-dir>/control.sock, usable only\n"
        "by the user running the node). Any node shows every folder and every receiver: each receiver signs its\n"
        "state and every member gets it. Folders are declared by an admin (p2pnode-admin folder add); a node\n"
        "writes only under its own sync.allowed_roots."), epilog=(
        "states of a receiver: in-sync (holds the source's newest version), behind (an older version; PENDING while it waits\n"
        "for its turn, RETRYING after an error), syncing (RUNNING), failed (FAILED or SYNC_DEGRADED: max_attempts used up on\n"
        "this version), refused (REFUSED: its target is outside that node's sync.allowed_roots).\n\n"
        "examples:\n"
        "  p2pnode sync status                 every folder: source version, each receiver's state and progress\n"
        "  p2pnode sync tasks --node web2      tasks of one receiver (name or peer ID prefix)\n"
        "  p2pnode sync log 'site@AbCd1234:42' one task's log\n"
        "  p2pnode sync trigger site --wait    on the source, e.g. from a git post-receive hook"))
    sync.set_defaults(func=dispatch, stdout=None, stderr=None)
    ssub = sync.add_subparsers(dest="sync_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser, timeout: bool = True) -> None:
        p.add_argument("--data-dir", default=default_data_dir, help="the local node's data directory (default: $P2PNODE_DATA_DIR or ./.p2pnode)")
        p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
        if timeout:
            p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node's answer (default 10)")

    p = ssub.add_parser("status", help="each folder's source version and every receiver's state", description=(
        "Per folder: the source, its path and newest version; per receiver: name, peer, online, the version it applied, "
        "its state (in-sync / behind / syncing / failed / refused) and task status, progress (files, bytes, rate, ETA) and "
        "the last error."))
    p.add_argument("folder", nargs="?", help="only this folder")
    common(p)
    p.set_defaults(sync_func=cmd_status)

    p = ssub.add_parser("tasks", help="receivers' tasks: current ones, and this node's past ones", description=(
        "One task per receiver and source version: status (PENDING, RUNNING, SUCCESS, FAILED, RETRYING), attempt, "
        "progress, timing and last error. Current tasks of every receiver; finished ones of this node."))
    p.add_argument("--folder", help="only this folder")
    p.add_argument("--node", help="only this receiver: a member name or a peer ID (or its first characters)")
    common(p)
    p.set_defaults(sync_func=cmd_tasks)

    p = ssub.add_parser("log", help="one task's log", description="A task's details and its log (the last lines the receiver kept).")
    p.add_argument("task", help="task ID, as `p2pnode sync tasks` shows it (folder@node:version)")
    common(p)
    p.set_defaults(sync_func=cmd_log)

    p = ssub.add_parser("trigger", help="rescan a folder on its source now; --wait for every receiver", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=(
        "Run on the folder's source node: rescan the folder now and publish a new version if anything changed\n"
        "(the source also watches the folder and rescans periodically; this is for git hooks and CI). With --wait,\n"
        "show a progress bar per receiver (redrawn in place on a terminal, one line per change otherwise) until\n"
        "every receiver holds the version."), epilog=(
        "exit codes: 0 every receiver holds the version; 1 a receiver failed (FAILED, SYNC_DEGRADED) or refused the\n"
        "folder (REFUSED); 2 the node could not be asked (not running, unknown folder, not the source); 3 --timeout passed.\n\n"
        "a git post-receive hook on the source:\n"
        "  git --work-tree=/srv/site checkout -f main && p2pnode sync trigger site --wait --timeout 600"))
    p.add_argument("folder")
    p.add_argument("--wait", action="store_true", help="wait until every receiver holds the new version, or one fails")
    p.add_argument("--timeout", type=float, default=600.0, help="with --wait: give up after this many seconds (default 600)")
    p.add_argument("--interval", type=float, default=1.0, help="with --wait: seconds between looks at the receivers (default 1)")
    common(p, timeout=False)
    p.set_defaults(sync_func=cmd_trigger)


async def run(argv: list[str], *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """`p2pnode sync ARGV…` in the caller's trio loop (tests), with its own output streams."""
    from ..cli import build_parser

    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = build_parser().parse_args(["sync", *argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    args.stdout, args.stderr = out, err
    return await dispatch(args)
