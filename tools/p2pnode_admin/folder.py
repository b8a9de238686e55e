"""`p2pnode-admin folder add|set|rm|list`: declare the folders nodes keep in sync.

A folder is an admin-signed `sync-folder` document (LWW per folder id; spec protocols/sync.md).
Every command talks to one node (`--to`, a multiaddr or a dnsaddr domain) as the admin: the
admin's key is the connection's identity and its proof rides as `auth`, so the node shows what it
shows members (its folders, its membership snapshot) and accepts the push without the stranger
limits. `add`/`set` build the folder with the model code the nodes run (`FolderConfig.from_dict`)
and refuse what a node would refuse; `set` starts from the folder the node holds; `rm` signs a
removal. The node verifies the document and forwards it to every member. Peers can be named by
peer ID or by their member name in the node's snapshot.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

import attrs
import trio

from p2pnode import timefmt
from p2pnode.cluster.documents import AdminProof, Member, Snapshot, Trust
from p2pnode.envelope import Envelope
from p2pnode.errors import DecodeError
from p2pnode.host import HostConfig, open_host
from p2pnode.identity import KeyPair, PeerId
from p2pnode.platform import bus
from p2pnode.sync.documents import FOLDER, FolderDoc, verify_folder
from p2pnode.sync.model import STRATEGIES, FolderConfig

from .cli import EXIT_INVALID, AdminError, _load_signer, connect_target, emit, progress, refuse_if_revoked

NODE_KEYS = {"target": "target_path", "target_path": "target_path", "strategy": "strategy", "include": "include", "exclude": "exclude"}


# -- what the node holds -------------------------------------------------------------------------
class Held:
    """A node's folders (current version per id, removals included) and its members."""

    def __init__(self, docs: list[Envelope], trust: Trust):
        self.folders: dict[str, tuple[FolderDoc, Envelope]] = {}
        self.members: tuple[Member, ...] = ()
        self.revocations = [d for d in docs if d.type == "revocation"]
        self.unreadable: list[str] = []
        now = timefmt.now_ns()
        for env in docs:
            if env.type == "membership-snapshot":
                try:
                    self.members = Snapshot.from_dict(env.verify()).members
                except DecodeError:
                    pass
            elif env.type == FOLDER:
                try:
                    doc = verify_folder(env, trust, now, stored=True)
                except DecodeError as exc:
                    self.unreadable.append(str(exc))
                    continue
                self.folders[doc.folder_id] = (doc, env)

    def names(self) -> dict[PeerId, str]:
        return {m.peer_id: m.name for m in self.members if m.name}

    def current(self, folder_id: str) -> FolderDoc | None:
        held = self.folders.get(folder_id)
        return held[0] if held is not None else None

    def resolve(self, text: str, what: str) -> PeerId:
        """A peer ID, or the name of exactly one member of the node's snapshot."""
        try:
            return PeerId.from_string(text)
        except DecodeError:
            pass
        matches = [m.peer_id for m in self.members if m.name == text]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AdminError(f"{what} {text!r}: {len(matches)} members have this name; give the peer ID")
        known = ", ".join(sorted(m.name for m in self.members if m.name)) or "none"
        raise AdminError(f"{what} {text!r} is neither a peer ID nor the name of a member (member names: {known})")


@attrs.frozen
class Signer:
    key: KeyPair
    proof_env: Envelope
    proof: AdminProof

    def sign(self, doc: FolderDoc) -> Envelope:
        return doc.sign(self.key, self.proof_env, self.proof.cluster_id)


async def _open_node(args: argparse.Namespace, work: Any, *, signing: bool) -> int:
    """Connect to --to as the admin, read what the node holds, and run `work(host, conn, held, signer)`.
    When `signing`: refuse first if the proof is not valid now or the node knows the admin is revoked."""
    key, proof_env, proof = await trio.to_thread.run_sync(_load_signer, args)
    signer = Signer(key, proof_env, proof)
    if signing:
        _check_proof_now(proof, timefmt.now_ns())
    trust = Trust(proof.cluster_id, proof_env.signer)
    async with open_host(key, HostConfig()) as host:
        with trio.fail_after(args.timeout):
            conn = await connect_target(host, args.to, args.dns_server)
            docs = await bus.pull(host, conn, [FOLDER, "membership-snapshot", "revocation"], auth=proof_env)
        held = Held(docs, trust)
        if not held.members:
            progress(args, f"note: {conn.peer_id} showed no membership snapshot (none yet, or it does not accept this admin proof "
                           f"for cluster {proof.cluster_id})")
        if signing:
            refuse_if_revoked(key.peer_id, proof_env, proof, held.revocations, [])
        result: int = await work(host, conn, held, signer)
        return result


def _check_proof_now(proof: AdminProof, now: int) -> None:
    if not proof.valid_from_ns <= now <= proof.valid_until_ns:
        raise AdminError(f"the admin proof is not valid now (valid {timefmt.format_ns(proof.valid_from_ns)} to "
                         f"{timefmt.format_ns(proof.valid_until_ns)}); ask for a new one with `p2pnode-admin rotate`")


def _issue_time(held: FolderDoc | None) -> int:
    now = timefmt.now_ns()
    if held is not None and now <= held.issued_at_ns:
        raise AdminError(f"refusing to sign: the node holds a version of folder {held.folder_id} issued at "
                         f"{timefmt.format_ns(held.issued_at_ns)}, not before now ({timefmt.format_ns(now)}); check this machine's clock")
    return now


# -- building a folder from the options ----------------------------------------------------------
def parse_node(spec: str, held: Held) -> dict[str, Any]:
    """`PEER;target=/srv/x;strategy=mirror;include=a/**,b;exclude=c` (PEER: peer ID or member name)."""
    parts = [p.strip() for p in spec.split(";") if p.strip()]
    if not parts:
        raise AdminError("--node needs a peer ID or member name")
    out: dict[str, Any] = {"node_id": str(held.resolve(parts[0], "--node"))}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        field = NODE_KEYS.get(key.strip())
        if not sep or field is None:
            raise AdminError(f"--node {spec!r}: expected PEER;target=/path;strategy=mirror|overlay;include=a,b;exclude=c — not {part!r}")
        value = value.strip()
        out[field] = [v.strip() for v in value.split(",") if v.strip()] if field in ("include", "exclude") else value
    if "target_path" not in out:
        raise AdminError(f"--node {spec!r}: needs target=/absolute/path (where that node writes the folder)")
    if out.get("strategy", STRATEGIES[0]) not in STRATEGIES:
        raise AdminError(f"--node {spec!r}: strategy must be {' or '.join(STRATEGIES)}")
    return out


def _backoff(text: str) -> tuple[float, float | None]:
    base, _, cap = text.partition(":")
    try:
        return float(base), (float(cap) if cap else None)
    except ValueError:
        raise AdminError(f"--backoff {text!r}: expected BASE or BASE:CAP in seconds, e.g. 5:600") from None


def apply_options(raw: dict[str, Any], args: argparse.Namespace, held: Held) -> dict[str, Any]:
    """The folder dict `raw` with every option given on the command line applied."""
    out = dict(raw)
    if args.source is not None:
        out["source"] = str(held.resolve(args.source, "--source"))
    if args.source_path is not None:
        out["source_path"] = args.source_path
    nodes: list[dict[str, Any]] = [dict(n) for n in out.get("nodes", [])]
    for text in getattr(args, "remove_node", None) or []:
        peer = str(held.resolve(text, "--remove-node"))
        if not any(n["node_id"] == peer for n in nodes):
            raise AdminError(f"--remove-node {text}: not a receiver of folder {out['id']}")
        nodes = [n for n in nodes if n["node_id"] != peer]
    for spec in args.node or []:
        entry = parse_node(spec, held)
        nodes = [n for n in nodes if n["node_id"] != entry["node_id"]] + [entry]
    out["nodes"] = nodes
    if args.max_parallel is not None:
        out["max_parallel_nodes"] = args.max_parallel
    if getattr(args, "clear_ignore", False):
        out["ignore_patterns"] = []
    if args.ignore:
        out["ignore_patterns"] = list(args.ignore)
    if args.ignore_defaults is not None:
        out["ignore_defaults"] = args.ignore_defaults
    if args.ignore_file is not None:
        if args.ignore_file:
            out["ignore_file"] = args.ignore_file
        else:
            out.pop("ignore_file", None)
    if args.ignore_permissions is not None:
        out["ignore_permissions"] = args.ignore_permissions
    if args.post_sync is not None:
        try:
            argv = shlex.split(args.post_sync)
        except ValueError as exc:
            raise AdminError(f"--post-sync {args.post_sync!r}: {exc}") from None
        if argv:
            out["post_sync"] = argv
        else:
            out.pop("post_sync", None)
    retry = dict(out.get("retry") or {})
    if args.max_attempts is not None:
        retry["max_attempts"] = args.max_attempts
    if args.backoff is not None:
        base, cap = _backoff(args.backoff)
        retry["backoff_base_s"] = base
        if cap is not None:
            retry["backoff_cap_s"] = cap
        elif retry.get("backoff_cap_s", 600.0) < base:
            retry["backoff_cap_s"] = base
    if args.jitter is not None:
        retry["jitter"] = args.jitter
    if retry:
        out["retry"] = retry
    if args.rescan_interval is not None:
        out["rescan_interval_s"] = args.rescan_interval
    return out


def build(raw: dict[str, Any], issued_at_ns: int) -> FolderConfig:
    """Validated exactly as a node validates it."""
    try:
        return FolderConfig.from_dict({**raw, "issued_at": timefmt.format_ns(issued_at_ns)})
    except DecodeError as exc:
        raise AdminError(f"refusing to sign: {exc}") from None


def changes(old: FolderConfig, new: FolderConfig, names: dict[PeerId, str]) -> list[str]:
    """What `set` changed, for the operator."""
    a, b = old.to_dict(), new.to_dict()
    out = [k for k in sorted(set(a) | set(b)) if k not in ("issued_at", "nodes") and a.get(k) != b.get(k)]
    before = {n.node_id: n for n in old.nodes}
    after = {n.node_id: n for n in new.nodes}
    for peer in after.keys() - before.keys():
        out.append(f"receiver {names.get(peer) or peer} added")
    for peer in before.keys() - after.keys():
        out.append(f"receiver {names.get(peer) or peer} removed")
    for peer in after.keys() & before.keys():
        if after[peer] != before[peer]:
            out.append(f"receiver {names.get(peer) or peer}")
    return out


def describe(config: FolderConfig, names: dict[PeerId, str]) -> list[str]:
    def who(peer: PeerId) -> str:
        return f"{names[peer]} ({peer})" if peer in names else str(peer)

    ignore = (["defaults"] if config.ignore_defaults else []) + list(config.ignore_patterns)
    if config.ignore_file:
        ignore.append(f"file {config.ignore_file}")
    lines = [
        f"  source      {who(config.source)}:{config.source_path}",
        f"  parallel    {config.max_parallel_nodes} receiver(s) at once; retry {config.retry.max_attempts} attempts, "
        f"backoff {config.retry.backoff_base_s:g}-{config.retry.backoff_cap_s:g} s",
        f"  ignore      {', '.join(ignore) or 'nothing'}{'; permissions ignored' if config.ignore_permissions else ''}",
    ]
    if config.post_sync:
        lines.append(f"  post_sync   {shlex.join(config.post_sync)}")
    for n in config.nodes:
        extra = "".join(f"; {k} {','.join(v)}" for k, v in (("include", n.include), ("exclude", n.exclude)) if v)
        lines.append(f"  receiver    {who(n.node_id)} -> {n.target_path} ({n.strategy}{extra})")
    if not config.nodes:
        lines.append("  receiver    none")
    return lines


def _warn_non_members(args: argparse.Namespace, config: FolderConfig, held: Held) -> None:
    if not held.members:
        return
    members = {m.peer_id for m in held.members}
    for peer in [config.source] + [n.node_id for n in config.nodes]:
        if peer not in members:
            progress(args, f"warning: {peer} is not a member of the node's snapshot; it takes part once a snapshot lists it")


# -- the commands --------------------------------------------------------------------------------
async def _publish(args: argparse.Namespace, host: Any, conn: Any, env: Envelope, proof_env: Envelope, data: dict[str, Any],
                   lines: list[str]) -> int:
    if args.dry_run:
        emit(args, {**data, "result": "not_sent"}, "\n".join([*lines, "dry run: not sent"]))
        return 0
    with trio.fail_after(args.timeout):
        verdict = await bus.push(host, conn, env, auth=proof_env)
    data = {**data, "result": verdict.result, "code": verdict.code, "reason": verdict.reason, "node": str(conn.peer_id)}
    if verdict.result == "rejected" or verdict.result == "failed":
        emit(args, data, "\n".join([*lines, f"{verdict.result} by {conn.peer_id}: {verdict.code}: {verdict.reason}"]))
        return EXIT_INVALID
    if verdict.result == "accepted":
        tail = (f"accepted by {conn.peer_id}; it forwards the folder to every member. "
                f"Follow it on any node with `p2pnode sync status {data['folder']}`")
    else:
        tail = f"{verdict.result} by {conn.peer_id} ({verdict.code}: {verdict.reason})"
    emit(args, data, "\n".join([*lines, tail]))
    return 0


async def cmd_folder_add_set(args: argparse.Namespace) -> int:
    async def work(host: Any, conn: Any, held: Held, signer: Signer) -> int:
        current = held.current(args.id)
        if args.folder_command == "add":
            if current is not None and current.config is not None:
                raise AdminError(f"folder {args.id} exists on {conn.peer_id} (issued {timefmt.format_ns(current.issued_at_ns)}); "
                                 "change it with `p2pnode-admin folder set`")
            if args.source is None or args.source_path is None:
                raise AdminError("folder add needs --source and --source-path")
            raw = apply_options({"id": args.id}, args, held)
        else:
            if current is None or current.config is None:
                raise AdminError(f"{conn.peer_id} holds no folder {args.id}" + _known(held) + "; declare it with `p2pnode-admin folder add`")
            raw = apply_options(current.config.to_dict(), args, held)
        issued = _issue_time(current)
        config = build(raw, issued)
        names = held.names()
        lines = [f"folder {config.id}: signed, issued {timefmt.format_ns(issued)}", *describe(config, names)]
        if args.folder_command == "set":
            assert current is not None and current.config is not None
            changed = changes(current.config, config, names)
            if not changed:
                raise AdminError(f"nothing to change in folder {args.id}: give an option that differs from what the node holds")
            lines.insert(1, f"  changed     {', '.join(changed)}")
        _warn_non_members(args, config, held)
        env = signer.sign(FolderDoc(config.id, issued, config))
        data = {"folder": config.id, "issued_at": timefmt.format_ns(issued), "config": config.to_dict()}
        return await _publish(args, host, conn, env, signer.proof_env, data, lines)

    return await _open_node(args, work, signing=True)


async def cmd_folder_rm(args: argparse.Namespace) -> int:
    async def work(host: Any, conn: Any, held: Held, signer: Signer) -> int:
        current = held.current(args.id)
        if current is None or current.config is None:
            raise AdminError(f"{conn.peer_id} holds no folder {args.id}" + _known(held))
        issued = _issue_time(current)
        env = signer.sign(FolderDoc(args.id, issued, None))
        lines = [f"folder {args.id}: removal signed, issued {timefmt.format_ns(issued)}; receivers stop syncing it and keep their files"]
        return await _publish(args, host, conn, env, signer.proof_env, {"folder": args.id, "issued_at": timefmt.format_ns(issued),
                                                                         "removed": True}, lines)

    return await _open_node(args, work, signing=True)


def _known(held: Held) -> str:
    live = sorted(i for i, (doc, _) in held.folders.items() if doc.config is not None)
    return f" (it holds: {', '.join(live)})" if live else " (it holds no folders)"


async def cmd_folder_list(args: argparse.Namespace) -> int:
    async def work(host: Any, conn: Any, held: Held, signer: Signer) -> int:
        names = held.names()
        items = []
        lines: list[str] = []
        for folder_id, (doc, env) in sorted(held.folders.items()):
            removed = doc.config is None
            items.append({"id": folder_id, "issued_at": timefmt.format_ns(doc.issued_at_ns), "issuer": str(env.signer_id),
                          "removed": removed, "config": doc.config.to_dict() if doc.config else None})
            if removed and not args.all:
                continue
            lines.append(f"{folder_id}{'  (removed)' if removed else ''}  issued {timefmt.format_ns(doc.issued_at_ns)} by {env.signer_id}")
            if doc.config is not None:
                lines += describe(doc.config, names)
        hidden = sum(1 for i in items if i["removed"]) if not args.all else 0
        if not lines:
            lines.append(f"{conn.peer_id} holds no folders")
        if hidden:
            lines.append(f"({hidden} removed folder(s) not shown; --all shows them)")
        for reason in held.unreadable:
            lines.append(f"unreadable folder document: {reason}")
        emit(args, {"node": str(conn.peer_id), "folders": items, "unreadable": held.unreadable}, "\n".join(lines))
        return 0

    return await _open_node(args, work, signing=False)


# -- the parser ----------------------------------------------------------------------------------
def register(sub: Any, common: argparse.ArgumentParser, net: argparse.ArgumentParser) -> None:
    """Add `folder` and its actions to p2pnode-admin's subparsers."""
    signer = argparse.ArgumentParser(add_help=False)
    signer.add_argument("--admin-key", required=True, help="admin.key")
    signer.add_argument("--proof", required=True, help="admin.proof")
    signer.add_argument("--to", required=True, metavar="MULTIADDR|DOMAIN", help="the node to read from and publish to")
    signer.add_argument("--timeout", type=float, default=30.0, help="seconds allowed for the dial, the read and the push (default 30)")

    fields = argparse.ArgumentParser(add_help=False)
    fields.add_argument("--source", metavar="PEER", help="the node whose directory is authoritative: peer ID or member name")
    fields.add_argument("--source-path", metavar="PATH", help="the directory on the source (absolute; under its sync.allowed_roots)")
    fields.add_argument("--node", action="append", metavar="SPEC", help=(
        "a receiver, repeatable: 'PEER;target=/srv/x[;strategy=mirror|overlay][;include=a/**,b][;exclude=c]' (PEER: peer ID or "
        "member name; mirror deletes what the source does not have, overlay never deletes). With set: adds it, or replaces "
        "that node's entry"))
    fields.add_argument("--max-parallel", type=int, metavar="N", help="receivers applying a version at once (default 1: rolling)")
    fields.add_argument("--ignore", action="append", metavar="PATTERN", help=(
        "gitignore-style pattern, repeatable (with set: replaces the list)"))
    fields.add_argument("--ignore-defaults", action=argparse.BooleanOptionalAction, default=None, help=(
        "ignore .git/ and runtime/tmp directories (default: yes)"))
    fields.add_argument("--ignore-file", metavar="NAME", help="a file of ignore patterns read from the source tree, e.g. .syncignore ('' for none)")
    fields.add_argument("--ignore-permissions", action=argparse.BooleanOptionalAction, default=None, help=(
        "do not sync file modes (default: sync them)"))
    fields.add_argument("--post-sync", metavar="'CMD ARGS'", help=(
        "command run on a receiver (in its target directory) after each successful sync, split like a shell would ('' for none)"))
    fields.add_argument("--max-attempts", type=int, metavar="N", help="attempts per version before the receiver is SYNC_DEGRADED (default 5)")
    fields.add_argument("--backoff", metavar="BASE[:CAP]", help="seconds between attempts: BASE doubling up to CAP (default 5:600)")
    fields.add_argument("--jitter", type=float, metavar="F", help="shorten each delay by up to this fraction at random (default 0.5)")
    fields.add_argument("--rescan-interval", type=int, metavar="S", help="the source's full rescan period, a safety net under its watcher (default 3600)")
    fields.add_argument("--dry-run", action="store_true", help="validate and print the folder; do not sign or send it")

    f = sub.add_parser("folder", help="declare folders to sync: add, set, rm, list", description=(
        "Folders are admin-signed documents every node holds; the newest per folder id wins. The source node's directory "
        "is copied to each receiver's target; a node writes only under its own config's sync.allowed_roots (else it "
        "refuses the folder: REFUSED in `p2pnode sync status`). Each command reads from --to as the admin and publishes "
        "there; the node forwards to every member."))
    fsub = f.add_subparsers(dest="folder_command", required=True, metavar="ACTION")

    p = fsub.add_parser("add", parents=[common, net, signer, fields], help="declare a new folder", description=(
        "Sign and publish a new folder. Refuses a folder the node already holds (use set), and anything a node\n"
        "would refuse (bad paths, patterns, a receiver that is also the source …), naming the field."),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
        "example:\n"
        "  p2pnode-admin folder add --admin-key admin.key --proof admin.proof --to cluster.example.com \\\n"
        "      --id site --source build1 --source-path /srv/site \\\n"
        "      --node 'web1;target=/srv/site' --node 'web2;target=/srv/site;strategy=overlay;exclude=uploads/**' \\\n"
        "      --ignore 'node_modules/' --post-sync 'systemctl reload nginx'"))
    p.add_argument("--id", required=True, help="folder id: 1-64 of A-Z a-z 0-9 . _ -")
    p.set_defaults(func=cmd_folder_add_set)

    p = fsub.add_parser("set", parents=[common, net, signer, fields], help="change a folder (from the version the node holds)",
                        description="Fetch the folder from the node, change the given fields, sign and publish the result.")
    p.add_argument("--id", required=True)
    p.add_argument("--remove-node", action="append", metavar="PEER", help="stop syncing to this receiver (repeatable); it keeps its files")
    p.add_argument("--clear-ignore", action="store_true", help="drop every ignore pattern")
    p.set_defaults(func=cmd_folder_add_set)

    p = fsub.add_parser("rm", parents=[common, net, signer], help="remove a folder (receivers stop syncing, keep their files)")
    p.add_argument("--id", required=True)
    p.add_argument("--dry-run", action="store_true", help="sign nothing, send nothing")
    p.set_defaults(func=cmd_folder_rm)

    p = fsub.add_parser("list", parents=[common, net, signer], help="the folders a node holds")
    p.add_argument("--all", action="store_true", help="also show removed folders")
    p.set_defaults(func=cmd_folder_list)
