"""`p2pnode-admin` deploy commands: deployer keys, artifacts into the mesh, signed deploy commands.

    new-deployer              a key whose proof grants the `deploy` role (cannot change membership)
    artifact publish FILE     hand a file to ONE node under a signed manifest; the mesh does the rest
    deploy shell|tar|docker|rollback
                              sign a command and hand it to one node; --wait follows every target
    deploy status ID | list | logs ID --node N
                              read records from any node

Targets named by --label or --all are resolved to an explicit, sorted peer list from the node's
current snapshot when the command is signed (--node keeps the order given: a canary first), so
every node derives the same waves from the signed command whatever snapshot it holds later.
The network calls: `_session` (connect with the deployer key, fetch the snapshot), `client.upload`,
`bus.push`, `client.query` / `client.follow`.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import trio

from p2pnode import timefmt
from p2pnode.cluster.documents import AdminProof, Member
from p2pnode.deploy import client
from p2pnode.deploy.documents import MAX_DEPLOY_ID, sign_command
from p2pnode.deploy.records import format_list, format_record, node_line
from p2pnode.deploy.spec import (
    Application, ArtifactRef, DeployCommand, DockerAction, FileArtifact, HealthCheck, RollbackAction, Rollout, Service, ShellAction,
    TarAction, Targets,
)
from p2pnode.envelope import Envelope
from p2pnode.errors import DecodeError
from p2pnode.host import Connection, Host, open_host
from p2pnode.identity import KeyPair
from p2pnode.platform import bus

from . import keyfile
from .cli import AdminError, connect_target, emit, new_key_file, progress, read_envelope, write_envelope

DAY_NS = 86400 * timefmt.NS
EXIT_FAILED = 1
CONNECT_TIMEOUT = 30.0


def _fail(message: str) -> AdminError:
    return AdminError(message)


# ---- keys and sessions ----------------------------------------------------------------------------

def cmd_new_deployer(args: argparse.Namespace) -> int:

    system = keyfile.load(Path(args.system_key), args.passphrase_env)
    key_path = Path(args.dir) / "deployer.key"
    if key_path.exists():
        raise _fail(f"{key_path} already exists; refusing to overwrite a key (use another --dir, or `rotate --admin` for a new proof)")
    key = new_key_file(key_path, args, "the deployer key")
    now = timefmt.now_ns()
    start = timefmt.parse_ns(args.valid_from) if args.valid_from else now
    proof = AdminProof("deploy", args.cluster, key.peer_id, start, start + int(args.valid_days * DAY_NS), now).sign(system)
    proof_path = Path(args.dir) / "deployer.proof"
    write_envelope(str(proof_path), proof)
    until = timefmt.format_ns(start + int(args.valid_days * DAY_NS))
    emit(args, {"deployer_peer_id": str(key.peer_id), "key_file": str(key_path), "proof_file": str(proof_path), "role": "deploy",
                "cluster_id": args.cluster, "valid_until": until},
         f"deployer {key.peer_id}\nkey {key_path}\nproof {proof_path} (role deploy, cluster {args.cluster}, valid until {until})\n"
         "It signs deploy commands and artifact manifests; nodes refuse membership snapshots signed by it.")
    return 0


@attrs.frozen
class Signer:
    key: KeyPair
    proof: Envelope
    cluster_id: str


def load_signer(args: argparse.Namespace) -> Signer:

    key = keyfile.load(Path(args.key), args.passphrase_env)
    proof_env = read_envelope(args.proof, "admin-proof")
    proof = AdminProof.from_dict(proof_env.verify())
    if proof.admin_peer_id != key.peer_id:
        raise _fail(f"{args.proof} is a proof for {proof.admin_peer_id}, not for this key ({key.peer_id})")
    if proof.role not in ("admin", "deploy"):
        raise _fail(f"{args.proof} grants role {proof.role!r}; deploys need 'admin' or 'deploy' (p2pnode-admin new-deployer)")
    now = timefmt.now_ns()
    if not proof.valid_from_ns <= now <= proof.valid_until_ns:
        raise _fail(f"{args.proof} is not valid now (valid {timefmt.format_ns(proof.valid_from_ns)} to "
                    f"{timefmt.format_ns(proof.valid_until_ns)}); ask for a new one with `p2pnode-admin rotate`")
    return Signer(key, proof_env, proof.cluster_id)


@attrs.define
class Session:
    host: Host
    conn: Connection
    signer: Signer
    snapshot: tuple[Member, ...] | None = None  # the node's members, once asked
    uploaded: int = 0  # bytes this session uploaded

    async def members(self) -> tuple[Member, ...]:
        if self.snapshot is None:
            reply = await self.query({"op": "members"})
            try:
                members = tuple(Member.from_dict(m) for m in reply.get("members") or [])
            except DecodeError as exc:
                raise _fail(f"node {self.conn.peer_id} sent a bad member list: {exc}") from None
            if not members:
                raise _fail(f"node {self.conn.peer_id} holds no membership snapshot; publish one first")
            self.snapshot = members
        return self.snapshot

    async def query(self, message: dict[str, Any]) -> dict[str, Any]:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await client.query(self.host, self.conn, message, self.signer.proof)


@contextlib.asynccontextmanager
async def session(args: argparse.Namespace) -> AsyncIterator[Session]:
    """Connect to --to with the deployer's key (so the node can check its proof)."""

    signer = await trio.to_thread.run_sync(load_signer, args)
    async with open_host(signer.key) as host:
        with trio.fail_after(CONNECT_TIMEOUT):
            conn = await connect_target(host, args.to, args.dns_server)
        yield Session(host, conn, signer)


# ---- artifacts -------------------------------------------------------------------------------------

async def publish_file(s: Session, path: str, args: argparse.Namespace) -> ArtifactRef:

    if not await trio.Path(path).is_file():
        raise _fail(f"{path}: no such file")
    progress(args, f"hashing {path} …")
    manifest, env = await client.manifest_for(path, s.signer.key, s.signer.proof, s.signer.cluster_id, origin=s.conn.peer_id)
    shown = [0]

    def moved(sent: int, total: int) -> None:
        pct = 100 * sent // max(1, total)
        if pct >= shown[0] + 10:
            shown[0] = pct
            progress(args, f"  uploaded {pct}% of {total} bytes to {str(s.conn.peer_id)[-8:]}")

    try:
        result = await client.upload(s.host, s.conn, path, manifest, env, moved)
    except client.UploadRefused as exc:
        raise _fail(f"node {s.conn.peer_id} refused {path}: {exc.reason} ({exc.code})") from None
    progress(args, f"artifact {manifest.sha256} ({manifest.size} bytes) stored on {s.conn.peer_id}; sent {result.sent_bytes} bytes")
    s.uploaded += result.sent_bytes
    return ArtifactRef(manifest.sha256, manifest.size)


async def cmd_artifact_publish(args: argparse.Namespace) -> int:

    async with session(args) as s:
        ref = await publish_file(s, args.file, args)
    emit(args, {"sha256": ref.sha256, "size": ref.size, "node": str(s.conn.peer_id)},
         f"sha256 {ref.sha256}\nsize   {ref.size}\nstored on {s.conn.peer_id}; targets fetch it from the mesh")
    return 0


# ---- building commands ------------------------------------------------------------------------------

def _app(text: str) -> Application:
    parts = text.split("/")
    if len(parts) != 3:
        raise _fail(f"--app {text!r}: expected project/name/env, e.g. shop/api/prod")
    try:
        return Application.from_dict({"project": parts[0], "name": parts[1], "env": parts[2]})
    except DecodeError as exc:
        raise _fail(f"--app {text!r}: {exc}") from None


def _env(items: list[str] | None, flag: str = "--env") -> tuple[tuple[str, str], ...]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise _fail(f"{flag} {item!r}: expected NAME=value")
        out[name] = value
    return tuple(sorted(out.items()))


def _text(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise _fail(f"{what} {path}: {exc.strerror}") from None


def _health(args: argparse.Namespace) -> HealthCheck | None:
    common = dict(timeout=args.health_timeout, retries=args.health_retries, interval=args.health_interval,
                  min_healthy_time=args.min_healthy_time)
    given = [x for x in (args.health_http, args.health_tcp, args.health_script) if x]
    if len(given) > 1:
        raise _fail("give one of --health-http, --health-tcp, --health-script")
    raw: dict[str, Any]
    if args.health_http:
        raw = {"type": "http", "url": args.health_http, "expect_status": args.expect_status, **common}
        if args.body_contains:
            raw["body_contains"] = args.body_contains
    elif args.health_tcp:
        host, _, port = args.health_tcp.rpartition(":")
        if not host or not port.isdigit():
            raise _fail(f"--health-tcp {args.health_tcp!r}: expected HOST:PORT")
        raw = {"type": "tcp", "host": host, "port": int(port), **common}
    elif args.health_script:
        raw = {"type": "script", "script": _text(args.health_script, "--health-script"), **common}
    else:
        return None
    try:
        return HealthCheck.from_dict(raw)
    except DecodeError as exc:
        raise _fail(str(exc)) from None


def _service(args: argparse.Namespace) -> Service | None:
    if args.exec_start and args.start:
        raise _fail("give --exec (a systemd unit) or --start/--stop (the release's scripts), not both")
    try:
        if args.exec_start:
            return Service.from_dict({"type": "systemd", "command": args.exec_start, "env": dict(_env(args.service_env, "--service-env")),
                                      "timeout": args.service_timeout})
        if args.start:
            return Service.from_dict({"type": "scripts", "start": args.start, "stop": args.stop or "stop.sh", "timeout": args.service_timeout})
    except DecodeError as exc:
        raise _fail(str(exc)) from None
    return None


async def _targets(s: Session, args: argparse.Namespace) -> tuple[str, ...]:
    if not (args.node or args.label or args.all):
        raise _fail("name the targets: --node NAME|PEER_ID (repeatable, in wave order), --label LABEL (repeatable) or --all")
    members = await s.members()
    out: list[str] = []
    for text in args.node or []:
        found = [m for m in members if text in (m.name, str(m.peer_id))]
        if not found:
            names = ", ".join(m.name or str(m.peer_id)[-8:] for m in members)
            raise _fail(f"--node {text}: no member of that name or peer ID in the snapshot of {s.conn.peer_id} (members: {names})")
        out += [str(m.peer_id) for m in found if str(m.peer_id) not in out]
    picked = sorted(str(m.peer_id) for m in members if args.all or set(args.label or ()) & set(m.labels))
    if (args.label or args.all) and not picked:
        raise _fail(f"no member carries label(s) {', '.join(args.label or [])}")
    out += [p for p in picked if p not in out]
    return tuple(out)


def _deploy_id(args: argparse.Namespace, app: Application, version: str | None) -> str:
    if args.deploy_id:
        return str(args.deploy_id)
    stamp = timefmt.now().replace("-", "").replace(":", "")[:15]
    return f"{app.name}-{version or 'rollback'}-{stamp}"[:MAX_DEPLOY_ID]


async def _build(s: Session, args: argparse.Namespace) -> DeployCommand:
    app = _app(args.app)
    version = args.version
    kind = args.deploy_command
    action: Any
    if kind == "shell":
        script = args.run if args.run is not None else _text(args.script, "--script")
        if script is None:
            raise _fail("deploy shell needs --script FILE (or - for stdin) or --run 'COMMANDS'")
        action = ShellAction(script, args.workdir, _env(args.env), args.script_timeout, _text(args.rollback_script, "--rollback-script"))
    elif kind == "tar":
        archive = await publish_file(s, args.archive, args)
        files = []
        for spec in args.file or []:
            local, sep, rest = spec.partition(":")
            dest, _, mode = rest.partition(":")
            if not sep or not dest:
                raise _fail(f"--file {spec!r}: expected LOCAL_FILE:PATH_IN_RELEASE[:MODE], e.g. build/app:bin/app:755")
            ref = await publish_file(s, local, args)
            files.append(FileArtifact(ref, dest, int(mode, 8) if mode else 0o644))
        action = TarAction(archive, tuple(files), _text(args.install_script, "--install-script"), args.install_timeout, _env(args.env))
    elif kind == "docker":
        archive_ref = await publish_file(s, args.image_archive, args) if args.image_archive else None
        action = DockerAction(args.image, args.name, tuple(args.port or ()), _env(args.env), tuple(args.volume or ()),
                              tuple(args.run_arg or ()), tuple(args.command or ()), args.pull, archive_ref, args.step_timeout)
    else:
        action = RollbackAction()
    now = timefmt.now_ns()
    targets = await _targets(s, args)
    try:
        cmd = DeployCommand(_deploy_id(args, app, version), app, version, args.root, action, now, now + int(args.valid_for * timefmt.NS),
                            health=_health(args), service=_service(args) if kind != "rollback" else None,
                            keep_releases=args.keep_releases, targets=Targets(peers=targets),
                            rollout=Rollout(args.max_parallel, args.max_failures, args.auto_revert, args.progress_deadline))
        return DeployCommand.from_dict(cmd.to_dict())  # every field validated as a node will
    except DecodeError as exc:
        raise _fail(str(exc)) from None


async def cmd_deploy(args: argparse.Namespace) -> int:

    if args.deploy_command != "rollback" and not args.version:
        raise _fail(f"deploy {args.deploy_command} needs --version")
    async with session(args) as s:
        cmd = await _build(s, args)
        env = sign_command(cmd, s.signer.key, s.signer.proof, s.signer.cluster_id)
        with trio.fail_after(CONNECT_TIMEOUT):
            verdict = await bus.push(s.host, s.conn, env)
        if verdict.result == "rejected":
            emit(args, {"deploy_id": cmd.deploy_id, "result": "rejected", "code": verdict.code, "reason": verdict.reason},
                 f"rejected by {s.conn.peer_id}: {verdict.code}: {verdict.reason}")
            return EXIT_FAILED
        progress(args, f"deploy {cmd.deploy_id} ({cmd.kind} {cmd.app.key} {cmd.version or ''}) {verdict.result} by {s.conn.peer_id}; "
                       f"{len(cmd.targets.peers)} target(s)")
        if not args.wait:
            emit(args, {"deploy_id": cmd.deploy_id, "result": verdict.result, "node": str(s.conn.peer_id),
                        "targets": list(cmd.targets.peers), "uploaded_bytes": s.uploaded},
                 f"{cmd.deploy_id}\nfollow it with: p2pnode-admin deploy status {cmd.deploy_id} --to {args.to} --wait …")
            return 0
        return await _wait_and_report(s, cmd.deploy_id, args)


async def _wait_and_report(s: Session, deploy_id: str, args: argparse.Namespace) -> int:

    live = LiveView(args)
    record = await client.follow(s.host, s.conn, deploy_id, auth=s.signer.proof, timeout=args.timeout, on_update=live.update)
    live.close()
    if record is None:
        emit(args, {"deploy_id": deploy_id, "state": "unknown"}, f"node {s.conn.peer_id} does not know deploy {deploy_id}")
        return EXIT_FAILED
    if not record.get("settled"):
        record["timed_out"] = True
    emit(args, record, format_record(record) + ("\n(timed out waiting; still in progress)" if not record.get("settled") else ""))
    return 0 if record["state"] == "success" and record.get("settled") else EXIT_FAILED


class LiveView:
    """Per-node progress while waiting: redrawn in place on a terminal, changed lines otherwise."""

    def __init__(self, args: argparse.Namespace):
        self.out = args.stderr
        self.enabled = not args.json
        self.tty = self.enabled and getattr(self.out, "isatty", lambda: False)()
        self.shown: dict[str, str] = {}
        self.drawn = 0

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        lines = [f"{record['deploy_id']}: {record['state']}"] + [node_line(row) for row in record.get("nodes", [])]
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.out.write("\n".join(lines) + "\n")
            self.drawn = len(lines)
        else:
            for row, line in zip(record.get("nodes", []), lines[1:]):
                if self.shown.get(row["peer_id"]) != line:
                    self.shown[row["peer_id"]] = line
                    self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.out.flush()


async def cmd_status(args: argparse.Namespace) -> int:

    async with session(args) as s:
        if args.wait:
            return await _wait_and_report(s, args.deploy_id, args)
        record = (await s.query({"op": "status", "deploy_id": args.deploy_id})).get("record")
    if not isinstance(record, dict):
        emit(args, {"deploy_id": args.deploy_id, "state": "unknown"}, f"node {s.conn.peer_id} does not know deploy {args.deploy_id}")
        return EXIT_FAILED
    emit(args, record, format_record(record))
    return 0 if record["state"] in ("success", "running", "waiting") else EXIT_FAILED


async def cmd_list(args: argparse.Namespace) -> int:

    message: dict[str, Any] = {"op": "list", "limit": args.limit}
    if args.app:
        message["app"] = args.app
    async with session(args) as s:
        if args.node:
            members = await s.members()
            found = [str(m.peer_id) for m in members if args.node in (m.name, str(m.peer_id))]
            message["node"] = found[0] if found else args.node
        deploys = (await s.query(message)).get("deploys") or []
    emit(args, {"deploys": deploys}, format_list(deploys))
    return 0


async def cmd_logs(args: argparse.Namespace) -> int:

    async with session(args) as s:
        reply = await s.query({"op": "log", "deploy_id": args.deploy_id, "node": args.node})
    log = reply.get("log")
    if not isinstance(log, str):
        emit(args, reply, f"node {args.node} has no log of deploy {args.deploy_id}")
        return EXIT_FAILED
    emit(args, reply, log.rstrip("\n") + (f"\n({reply['note']})" if reply.get("note") else ""))
    return 0


# ---- parser -------------------------------------------------------------------------------------------

HELP = """\
Deploys without a central server: sign a command with an admin or deployer key and hand it to ANY
node (--to); the mesh carries it to the targets, each runs its part (waves of --max-parallel),
reports signed status that every node stores, and rolls back on failure. Artifacts (deploy tar's
archive, --file, --image-archive) are uploaded ONCE to the --to node and fetched by the targets
block by block from every peer that has them. Targets: --node (in wave order), --label, --all —
resolved from the node's snapshot into an explicit peer list when signing. --wait shows live
per-node progress and exits 0 only if every target succeeded (1 on failure or timeout)."""


def add_commands(sub: Any, common: argparse.ArgumentParser, enc: argparse.ArgumentParser, net: argparse.ArgumentParser,
                 validity: argparse.ArgumentParser) -> None:
    p = sub.add_parser("new-deployer", parents=[common, enc, validity], help="create a deployer key (role deploy) and its proof",
                       description="Create deployer.key and deployer.proof (signed by the system key, role 'deploy'). A deployer "
                                   "signs deploy commands and artifact manifests (for CI); nodes refuse membership snapshots it signs.")
    p.add_argument("--system-key", required=True)
    p.add_argument("--dir", default=".", help="where to write deployer.key and deployer.proof")
    p.set_defaults(func=cmd_new_deployer)

    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--to", required=True, metavar="MULTIADDR|DOMAIN", help="the node to talk to (any node of the cluster)")
    conn.add_argument("--key", required=True, help="deployer.key (or an admin.key)")
    conn.add_argument("--proof", required=True, help="deployer.proof (or admin.proof)")

    a = sub.add_parser("artifact", help="artifacts in the mesh")
    asub = a.add_subparsers(dest="artifact_command", required=True, metavar="ACTION")
    p = asub.add_parser("publish", parents=[common, net, conn], help="upload a file once, to one node",
                        description="Hash FILE into 1 MiB blocks, sign a manifest (size, SHA-256, block hashes) and upload it to the "
                                    "--to node, which stores it within its deploy.max_artifact_bytes / min_free_bytes and serves it to "
                                    "its peers. Prints the SHA-256 that deploy commands reference. A repeated upload resumes.")
    p.add_argument("file")
    p.set_defaults(func=cmd_artifact_publish)

    d = sub.add_parser("deploy", help="deploy commands and records", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = d.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")

    spec = argparse.ArgumentParser(add_help=False)
    g = spec.add_argument_group("application and targets")
    g.add_argument("--app", required=True, metavar="PROJECT/NAME/ENV")
    g.add_argument("--version", help="release to install (for rollback: the release to return to; default the previous)")
    g.add_argument("--root", required=True, help="application root on the nodes (inside their deploy.allowed_roots; may contain ${host})")
    g.add_argument("--node", action="append", metavar="NAME|PEER_ID", help="target (repeatable; the order gives the waves)")
    g.add_argument("--label", action="append", help="every member with this label (repeatable)")
    g.add_argument("--all", action="store_true", help="every member")
    g.add_argument("--deploy-id", help="unique ID (default: NAME-VERSION-TIMESTAMP)")
    g.add_argument("--valid-for", type=float, default=3600.0, metavar="SECONDS", help="how long nodes accept the command (default 3600)")
    g.add_argument("--keep-releases", type=int, default=5)
    g = spec.add_argument_group("rollout (Nomad's update stanza)")
    g.add_argument("--max-parallel", type=int, default=1, help="nodes per wave (default 1)")
    g.add_argument("--max-failures", type=int, default=0, help="failed nodes tolerated before the rollout halts (default 0)")
    g.add_argument("--auto-revert", action="store_true", help="when the rollout fails, updated nodes go back to their previous release")
    g.add_argument("--progress-deadline", type=float, default=600.0, metavar="SECONDS",
                   help="a node without a final report this long after its wave could start counts as failed (default 600)")
    g = spec.add_argument_group("health check (defaults: timeout 60 s, 3 retries, 10 s apart)")
    g.add_argument("--health-http", metavar="URL", help="e.g. http://${host}:8080/health")
    g.add_argument("--expect-status", type=int, default=200)
    g.add_argument("--body-contains")
    g.add_argument("--health-tcp", metavar="HOST:PORT")
    g.add_argument("--health-script", metavar="FILE", help="healthy when it exits 0")
    g.add_argument("--health-timeout", type=float, default=60.0)
    g.add_argument("--health-retries", type=int, default=3)
    g.add_argument("--health-interval", type=float, default=10.0)
    g.add_argument("--min-healthy-time", type=float, default=0.0)
    g = spec.add_argument_group("service")
    g.add_argument("--exec", dest="exec_start", metavar="COMMAND", help="run as a systemd unit <project>-<name>-<env>.service")
    g.add_argument("--service-env", action="append", metavar="NAME=VALUE")
    g.add_argument("--start", metavar="PATH", help="the release's start script (the lightnode way), e.g. start.sh")
    g.add_argument("--stop", metavar="PATH", help="the release's stop script (default stop.sh)")
    g.add_argument("--service-timeout", type=float, default=60.0)
    g = spec.add_argument_group("waiting")
    g.add_argument("--wait", action="store_true", help="follow the deploy until every target is done; exit 1 unless all succeeded")
    g.add_argument("--timeout", type=float, default=3600.0, help="how long --wait waits (default 3600 s)")

    p = dsub.add_parser("shell", parents=[common, net, conn, spec], help="run a script (≤ 100 KB) on every target",
                        description="deploy.shell: run --script (or --run) in --workdir with --env, killed whole on --script-timeout; "
                                    "on failure the --rollback-script (if any) runs, or the previous release comes back.")
    p.add_argument("--script", metavar="FILE")
    p.add_argument("--run", metavar="COMMANDS", help="the script as text")
    p.add_argument("--workdir", default="${installPath}")
    p.add_argument("--env", action="append", metavar="NAME=VALUE")
    p.add_argument("--script-timeout", type=float, default=600.0)
    p.add_argument("--rollback-script", metavar="FILE")
    p.set_defaults(func=cmd_deploy)

    p = dsub.add_parser("tar", parents=[common, net, conn, spec], help="publish a tar.gz and deploy it as a release",
                        description="deploy.tar: upload ARCHIVE (and each --file) once, then every target fetches it from the mesh, "
                                    "verifies its SHA-256, extracts it safely into <root>/releases/<project>/<name>/<env>/<version>, "
                                    "runs --install-script there, switches `current` and starts the service.")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("--file", action="append", metavar="LOCAL:PATH[:MODE]", help="an extra single-file artifact placed in the release")
    p.add_argument("--install-script", metavar="FILE")
    p.add_argument("--install-timeout", type=float, default=600.0)
    p.add_argument("--env", action="append", metavar="NAME=VALUE")
    p.set_defaults(func=cmd_deploy)

    p = dsub.add_parser("docker", parents=[common, net, conn, spec], help="pull (or load) an image and run it",
                        description="deploy.docker: pull the image (or load --image-archive, published through the mesh), stop and "
                                    "remove the old container, run the new one (the node's deploy.docker_command: docker or podman).")
    p.add_argument("--image", required=True)
    p.add_argument("--name", help="container name (default p2pnode-<project>-<name>-<env>)")
    p.add_argument("-p", "--port", action="append")
    p.add_argument("-e", "--env", action="append", metavar="NAME=VALUE")
    p.add_argument("-v", "--volume", action="append")
    p.add_argument("--run-arg", action="append", help="extra `run` argument (repeatable), e.g. --run-arg=--init")
    p.add_argument("--command", action="append", help="the container's command, one argument per flag")
    p.add_argument("--pull", choices=["always", "if_not_present", "never"], default="if_not_present")
    p.add_argument("--image-archive", metavar="FILE", help="a `docker save` archive to load instead of pulling")
    p.add_argument("--step-timeout", type=float, default=600.0)
    p.set_defaults(func=cmd_deploy)

    p = dsub.add_parser("rollback", parents=[common, net, conn, spec], help="go back to the previous (or --version) release",
                        description="deploy.rollback: stop the current release, switch `current` back and start it, health-checked.")
    p.set_defaults(func=cmd_deploy)

    p = dsub.add_parser("status", parents=[common, net, conn], help="a deploy's record (from any node)")
    p.add_argument("deploy_id")
    p.add_argument("--wait", action="store_true", help="follow it until settled; exit 1 unless every target succeeded")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.set_defaults(func=cmd_status)

    p = dsub.add_parser("list", parents=[common, net, conn], help="deploys, newest first")
    p.add_argument("--app", metavar="PROJECT/NAME/ENV")
    p.add_argument("--node", metavar="NAME|PEER_ID")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_list)

    p = dsub.add_parser("logs", parents=[common, net, conn], help="one node's full log of a deploy")
    p.add_argument("deploy_id")
    p.add_argument("--node", required=True, metavar="NAME|PEER_ID")
    p.set_defaults(func=cmd_logs)

