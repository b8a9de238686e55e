"""`p2pnode-admin`: the operator's tool for a p2pnode cluster. Run `p2pnode-admin --help`.

`run(argv)` is the whole command as a coroutine (tests await it in their own trio loop, with
their own output streams); `main()` runs it under `trio.run` for the console script. Commands
that touch the network are `async`; the others run on a worker thread, since loading an
encrypted key costs an Argon2id derivation. The network calls stay in `_fetch_current`,
`cmd_publish`, `_push_each` and `_ask_each`, on the document bus's client functions
(`p2pnode.platform.bus.push/pull`). Nodes show their snapshot and status to members only: the
tool reads as the admin (its own key as the connection's identity, its proof as `auth`), and
confirms what each member holds from the verdicts of pushes, which anyone may make.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import trio

from p2pnode import bootstrap, timefmt
from p2pnode.cluster.documents import (
    AdminProof, Member, Rejected, Revocation, Snapshot, Trust,
    verify_admin_proof, verify_revocation, verify_snapshot,
)
from p2pnode.envelope import Envelope, SignatureInvalid
from p2pnode.errors import DecodeError, DialError, P2PNodeError
from p2pnode.fsutil import atomic_write
from p2pnode.host import Connection, Host, HostConfig, open_client, open_host
from p2pnode.identity import KeyFileError, KeyPair, PeerId, PublicKey
from p2pnode.multiaddr import Multiaddr
from p2pnode.platform import bus
from p2pnode.platform.bus import Verdict

from . import bundle, keyfile

DAY_NS = 86400 * timefmt.NS
EXIT_INVALID = 1
EXIT_USAGE = 2
BASE_TIMEOUT = 30.0  # fetching --base from a node
MEMBER_TIMEOUT = 5.0  # one push or status question to one member


class AdminError(P2PNodeError):
    """A problem with the operator's input: printed as one line, exit code 2."""


# -- helpers -------------------------------------------------------------------------------------
def emit(args, data: dict, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text, file=args.stdout)


def progress(args, line: str) -> None:
    if not args.json:
        print(line, file=args.stderr, flush=True)


def write_new_key(path: Path, key: KeyPair, args, what: str) -> None:
    """Write a key created or imported here: encrypted when --encrypt is given or the
    passphrase variable is set, and then never silently in the clear."""
    secret = None
    if args.encrypt or os.environ.get(args.passphrase_env):
        secret = keyfile.passphrase(args.passphrase_env, confirm=True, what=what)
        if not secret:
            raise AdminError(f"--encrypt needs a passphrase: set ${args.passphrase_env} or run on a terminal")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyfile.save(path, key, secret)


def new_key_file(path: Path, args, what: str) -> KeyPair:
    key = KeyPair.generate()
    write_new_key(path, key, args, what)
    return key


def read_envelope(path: str, expected: str | None = None) -> Envelope:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise AdminError(f"cannot read {path}: {exc.strerror}") from None
    text = data.strip()
    if text and all(c in b"0123456789abcdefABCDEF" for c in text):
        data = bytes.fromhex(text.decode())
    try:
        return Envelope.from_bytes(data, expected)
    except DecodeError as exc:
        raise AdminError(f"{path}: not a signed p2pnode document: {exc}") from None


def write_envelope(path: str, env: Envelope) -> None:
    atomic_write(Path(path), env.to_bytes(), mode=0o644)


def parse_member(spec: str) -> Member:
    """`PEER_ID[;name=N][;addrs=MA,MA][;labels=a,b]`"""
    parts = [p.strip() for p in spec.split(";") if p.strip()]
    if not parts:
        raise AdminError("--add needs a peer ID")
    fields: dict[str, str | list[str]] = {"peer_id": parts[0].removeprefix("peer=")}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or key not in ("name", "addrs", "labels"):
            raise AdminError(f"--add {spec!r}: expected PEER_ID;name=N;addrs=MA,MA;labels=a,b — not {part!r}")
        fields[key] = value if key == "name" else [v for v in value.split(",") if v]
    try:
        return Member.from_dict(fields)
    except DecodeError as exc:
        raise AdminError(f"--add {spec!r}: {exc}") from None


def load_members_file(path: str) -> list[Member]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdminError(f"members file {path}: {exc}") from None
    items = raw.get("members") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise AdminError(f"members file {path}: expected a list of members or {{\"members\": [...]}}")
    try:
        return [Member.from_dict(m) for m in items]
    except DecodeError as exc:
        raise AdminError(f"members file {path}: {exc}") from None


def state_file(args) -> Path:
    return Path(args.state_dir) / "last_snapshot"


async def connect_target(host, target: str, dns_server: list[str]):
    """A multiaddr, or a domain whose _dnsaddr records list nodes: the first that answers."""
    if target.startswith("/"):
        return await host.connect(Multiaddr.parse(target))
    resolver = bootstrap.Resolver(dns_server)
    addrs = await bootstrap.resolve_dnsaddr(resolver, target)
    if not addrs:
        raise AdminError(f"{target}: no _dnsaddr TXT records found")
    errors = []
    for addr in addrs:
        try:
            return await host.connect(addr)
        except (DialError, P2PNodeError) as exc:
            errors.append(str(exc))
    raise DialError(f"no node of {target} answered: " + "; ".join(errors))


# -- subcommands -----------------------------------------------------------------------------------
def cmd_init_system(args) -> int:
    path = Path(args.dir) / "system.key"
    key = new_key_file(path, args, "the system key")
    emit(args, {"system_pubkey": str(key.peer_id), "key_file": str(path), "encrypted": keyfile.is_encrypted(path)},
         f"system_pubkey {key.peer_id}\nkey written to {path}{' (encrypted)' if keyfile.is_encrypted(path) else ''}\n"
         "Put system_pubkey in every node's config; keep the key file offline.")
    return 0


def _proof(args, system: KeyPair, admin: PeerId) -> Envelope:
    now = timefmt.now_ns()
    start = timefmt.parse_ns(args.valid_from) if args.valid_from else now
    proof = AdminProof("admin", args.cluster, admin, start, start + int(args.valid_days * DAY_NS), now)
    return proof.sign(system)


def cmd_new_admin(args) -> int:
    system = keyfile.load(Path(args.system_key), args.passphrase_env)
    path = Path(args.dir) / "admin.key"
    admin = new_key_file(path, args, "the admin key")
    proof = _proof(args, system, admin.peer_id)
    proof_path = Path(args.dir) / "admin.proof"
    write_envelope(str(proof_path), proof)
    p = AdminProof.from_dict(proof.verify())
    emit(args, {"admin_peer_id": str(admin.peer_id), "key_file": str(path), "proof_file": str(proof_path),
                "cluster_id": args.cluster, "valid_from": timefmt.format_ns(p.valid_from_ns), "valid_until": timefmt.format_ns(p.valid_until_ns)},
         f"admin {admin.peer_id}\nkey {path}\nproof {proof_path} (cluster {args.cluster}, valid until {timefmt.format_ns(p.valid_until_ns)})")
    return 0


def cmd_rotate(args) -> int:
    system = keyfile.load(Path(args.system_key), args.passphrase_env)
    try:
        admin = PeerId.from_string(args.admin)
    except DecodeError as exc:
        raise AdminError(f"--admin: {exc}") from None
    proof = _proof(args, system, admin)
    write_envelope(args.out, proof)
    p = AdminProof.from_dict(proof.verify())
    emit(args, {"admin_peer_id": str(admin), "proof_file": args.out, "valid_until": timefmt.format_ns(p.valid_until_ns)},
         f"new proof for {admin} written to {args.out}, valid until {timefmt.format_ns(p.valid_until_ns)}")
    return 0


def cmd_new_node(args) -> int:
    path = Path(args.dir) / "node.key"
    if path.exists():
        raise AdminError(f"{path} already exists; refusing to overwrite a node key")
    key = KeyPair.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyfile.save(path, key, None)  # nodes start unattended: their key is not passphrase-protected
    emit(args, {"peer_id": str(key.peer_id), "key_file": str(path)}, f"peer_id {key.peer_id}\nkey written to {path}")
    return 0


async def _fetch_current(target: str, dns_server: list[str], admin: KeyPair, proof: Envelope) -> tuple[Envelope | None, list[Envelope]]:
    """The current snapshot of a node (multiaddr or domain), and the revocations it knows. Nodes
    show their snapshot to members, and to an admin that connects with its own key and shows a
    proof valid now (revocations to anyone): a revoked admin gets only the revocations."""
    async with open_host(admin, HostConfig()) as host:
        with trio.fail_after(BASE_TIMEOUT):
            conn = await connect_target(host, target, dns_server)
            docs = await bus.pull(host, conn, ["membership-snapshot", "revocation"], auth=proof)
    snapshots = [d for d in docs if d.type == "membership-snapshot"]
    revocations = [d for d in docs if d.type == "revocation"]  # judged like the node judges them: see refuse_if_revoked
    return (snapshots[0] if snapshots else None), revocations


def _load_signer(args: argparse.Namespace) -> tuple[KeyPair, Envelope, AdminProof]:
    admin = keyfile.load(Path(args.admin_key), args.passphrase_env)
    proof_env = read_envelope(args.proof, "admin-proof")
    proof = AdminProof.from_dict(proof_env.verify())
    if proof.admin_peer_id != admin.peer_id:
        raise AdminError(f"{args.proof} is a proof for {proof.admin_peer_id}, not for this admin key ({admin.peer_id})")
    return admin, proof_env, proof


def refuse_if_revoked(admin: PeerId, proof_env: Envelope, proof: AdminProof, from_base: list[Envelope], files: list[str]) -> None:
    """Refuse to sign when a revocation we know of names this admin. A revocation counts when the
    key that signed our proof (the system key) signed it for our cluster, as nodes check it.
    Revocations from the base node that do not verify are skipped (the node checked them already,
    against its own config); a --revocation file that does not verify is an error."""
    trust = Trust(proof.cluster_id, proof_env.signer)
    now = timefmt.now_ns()
    known: list[Revocation] = []
    for env in from_base:
        with contextlib.suppress(DecodeError):
            known.append(verify_revocation(env, trust, now))
    for path in files:
        try:
            known.append(verify_revocation(read_envelope(path, "revocation"), trust, now))
        except DecodeError as exc:
            raise AdminError(f"--revocation {path}: not a revocation of cluster {proof.cluster_id}'s system key: {exc}") from None
    for rev in known:
        if admin in rev.admins:
            reason = f" (reason: {rev.reason})" if rev.reason else ""
            raise AdminError(f"refusing to sign: admin {admin} was revoked by the system key at "
                             f"{timefmt.format_ns(rev.issued_at_ns)}{reason}; nodes would refuse the snapshot. "
                             "Use another admin's key (p2pnode-admin new-admin)")


async def cmd_snapshot(args: argparse.Namespace) -> int:
    admin, proof_env, proof = await trio.to_thread.run_sync(_load_signer, args)
    base: Snapshot | None = None
    base_revocations: list[Envelope] = []
    if args.base:
        if await trio.Path(args.base).exists():
            env: Envelope | None = read_envelope(args.base)
        else:
            env, base_revocations = await _fetch_current(args.base, args.dns_server, admin, proof_env)
        if env is not None:
            base = Snapshot.from_dict(env.verify())
    refuse_if_revoked(admin.peer_id, proof_env, proof, base_revocations, args.revocation or [])
    members: dict[PeerId, Member] = {m.peer_id: m for m in (base.members if base else ())}
    if args.members:
        members = {m.peer_id: m for m in load_members_file(args.members)}
    for spec in args.add or []:
        m = parse_member(spec)
        members[m.peer_id] = m
    for text in args.remove or []:
        try:
            pid = PeerId.from_string(text)
        except DecodeError as exc:
            raise AdminError(f"--remove: {exc}") from None
        if members.pop(pid, None) is None:
            raise AdminError(f"--remove {text}: not a member")
    now = timefmt.now_ns()
    known = []
    if base is not None:
        known.append(base.issued_at_ns)
    last = state_file(args)
    if last.exists():
        try:
            known.append(timefmt.parse_ns(json.loads(last.read_text())["issued_at"]))
        except (ValueError, KeyError, DecodeError):
            pass
    if known and now <= max(known):
        raise AdminError(
            f"refusing to sign: the newest snapshot known here was issued at {timefmt.format_ns(max(known))}, "
            f"not before this one ({timefmt.format_ns(now)}); check this machine's clock"
        )
    if not proof.valid_from_ns <= now <= proof.valid_until_ns:
        raise AdminError(f"the admin proof is not valid now (valid {timefmt.format_ns(proof.valid_from_ns)} to "
                         f"{timefmt.format_ns(proof.valid_until_ns)}); ask for a new one with `p2pnode-admin rotate`")
    snap = Snapshot(proof.cluster_id, now, admin.peer_id, tuple(members.values()), proof_env)
    env = snap.sign(admin)
    write_envelope(args.out, env)
    last.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(last, json.dumps({"issued_at": snap.issued_at, "cluster_id": snap.cluster_id}).encode(), mode=0o600)
    emit(args, {"file": args.out, "issued_at": snap.issued_at, "cluster_id": snap.cluster_id, "members": len(snap.members)},
         f"snapshot of {len(snap.members)} members for cluster {snap.cluster_id}, issued at {snap.issued_at}, written to {args.out}")
    return 0


def cmd_revoke(args) -> int:
    system = keyfile.load(Path(args.system_key), args.passphrase_env)
    try:
        admins = tuple(PeerId.from_string(a) for a in args.admin)
    except DecodeError as exc:
        raise AdminError(f"--admin: {exc}") from None
    env = Revocation(args.cluster, timefmt.now_ns(), admins, args.reason or "").sign(system)
    write_envelope(args.out, env)
    emit(args, {"file": args.out, "admins": [str(a) for a in admins]},
         f"revocation of {len(admins)} admin(s) written to {args.out}; publish it with `p2pnode-admin publish {args.out} --to …`")
    return 0


async def cmd_publish(args: argparse.Namespace) -> int:
    env = read_envelope(args.file)
    if env.type not in ("membership-snapshot", "revocation"):
        raise AdminError(f"{args.file} is a {env.type}; only snapshots and revocations are published")
    key = "snapshot" if env.type == "membership-snapshot" else "revocation"
    try:
        payload = env.verify()
        snap = Snapshot.from_dict(payload) if key == "snapshot" else None
    except DecodeError as exc:
        if not args.force:
            emit(args, {"result": "not_sent", "code": "bad_signature" if isinstance(exc, SignatureInvalid) else "malformed",
                        "reason": str(exc)}, f"not sent: {exc} (use --force to send it anyway)")
            return EXIT_INVALID
        snap = None
    async with open_client() as host:
        with trio.fail_after(args.timeout):
            conn = await connect_target(host, args.to, args.dns_server)
            verdict = await bus.push(host, conn, env)
        progress(args, f"{conn.peer_id}: {verdict.result}{' (' + verdict.code + ': ' + verdict.reason + ')' if verdict.code else ''}")
        if verdict.result == "rejected":
            emit(args, {"result": "rejected", "code": verdict.code, "reason": verdict.reason},
                 f"rejected by {conn.peer_id}: {verdict.code}: {verdict.reason}")
            return EXIT_INVALID
        if snap is None or args.no_wait:
            emit(args, {"result": verdict.result, "node": str(conn.peer_id)}, f"{verdict.result} by {conn.peer_id}")
            return 0
        verdicts: dict[PeerId, Verdict | str] = {conn.peer_id: verdict}
        if verdict.result == "ignored":
            # The first node holds this snapshot or a newer one, so it forwards nothing: waiting would
            # only time out. Offer it to every other member ourselves and report each one's answer now.
            verdicts.update(await _push_each(host, conn, [m for m in snap.members if m.peer_id != conn.peer_id], env))
            holds = await _ask_each(host, conn, snap.members, env)
        else:
            holds = await _wait_held(host, conn, snap, env, args)
    return _report_members(args, snap, verdict, verdicts, holds)


def _report_members(args: argparse.Namespace, snap: Snapshot, first: Verdict, verdicts: dict[PeerId, Verdict | str],
                    holds: dict[PeerId, str | None]) -> int:
    """One line per member: its verdict (when we pushed to it) and the snapshot it holds; exit 0
    when all hold ours."""
    held = [m.peer_id for m in snap.members if holds.get(m.peer_id) == snap.issued_at]
    missing = [m.peer_id for m in snap.members if m.peer_id not in held]
    nodes, lines = [], []
    for m in snap.members:
        v = verdicts.get(m.peer_id)
        holding = holds.get(m.peer_id)
        entry: dict[str, object] = {"peer_id": str(m.peer_id), "name": m.name, "answered": m.peer_id in holds, "holds": holding}
        said = ""
        if isinstance(v, Verdict):
            entry.update(verdict=v.result, code=v.code, reason=v.reason)
            said = v.result + (f" ({v.code})" if v.code else "") + ", "
        elif v is not None:
            entry.update(verdict="unreachable", reason=v)
            said = f"unreachable ({v}), "
        if m.peer_id not in holds:
            now = "did not say which snapshot it holds"
        elif holding == snap.issued_at:
            now = "holds this snapshot"
        elif holding is None:
            now = "holds no snapshot"
        else:
            newer = (_issued_ns(holding) or 0) > snap.issued_at_ns
            now = f"holds {'a newer' if newer else 'an older'} snapshot, issued at {holding}"
        nodes.append(entry)
        lines.append(f"  {m.name or '-'} {m.peer_id}: {said}{now}")
    data = {"result": first.result, "issued_at": snap.issued_at, "members": len(snap.members), "holding": len(held),
            "missing": [str(p) for p in missing], "nodes": nodes}
    text = "\n".join([f"{len(held)} of {len(snap.members)} members hold the snapshot issued at {snap.issued_at}", *lines])
    emit(args, data, text)
    return 0 if not missing else EXIT_INVALID


def _issued_ns(text: str | None) -> int | None:
    try:
        return timefmt.parse_ns(text) if isinstance(text, str) else None
    except DecodeError:
        return None


async def _member_conn(host: Host, first_conn: Connection, member: Member) -> Connection:
    if member.peer_id == first_conn.peer_id:
        return first_conn
    return await host.connect_peer(member.peer_id, list(member.addrs))


async def _push_each(host: Host, first_conn: Connection, members: list[Member], env: Envelope) -> dict[PeerId, Verdict | str]:
    """Push `env` to each member directly, all at once; its verdict, or why it could not be asked."""
    out: dict[PeerId, Verdict | str] = {}

    async def one(member: Member) -> None:
        try:
            with trio.fail_after(MEMBER_TIMEOUT):
                out[member.peer_id] = await bus.push(host, await _member_conn(host, first_conn, member), env)
        except trio.TooSlowError:
            out[member.peer_id] = "timed out"
        except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            out[member.peer_id] = str(exc) or type(exc).__name__

    async with trio.open_nursery() as nursery:
        for m in members:
            nursery.start_soon(one, m)
    return out


async def _ask_each(host: Host, first_conn: Connection, members: Sequence[Member], env: Envelope) -> dict[PeerId, str | None]:
    """One round, all at once: which snapshot (issued_at) each member holds, learnt by offering it
    ours again (nodes answer status to members only, but anyone may push): `accepted` or `known`
    means it now holds ours, `not_newer` names the newer one it holds. Members that did not
    answer, or refused, are absent."""
    out: dict[PeerId, str | None] = {}
    ours = Snapshot.from_dict(env.verify()).issued_at

    async def one(member: Member) -> None:
        with contextlib.suppress(P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError, OSError), \
                trio.move_on_after(MEMBER_TIMEOUT):
            verdict = await bus.push(host, await _member_conn(host, first_conn, member), env)
            if verdict.result == "accepted" or verdict.code == "known":
                out[member.peer_id] = ours
            elif verdict.code == "not_newer" and verdict.held:
                out[member.peer_id] = verdict.held

    async with trio.open_nursery() as nursery:
        for m in members:
            nursery.start_soon(one, m)
    return out


async def _wait_held(host: Host, first_conn: Connection, snap: Snapshot, env: Envelope, args: argparse.Namespace) -> dict[PeerId, str | None]:
    """Ask the members which snapshot they hold until each holds ours or a newer one (which it
    will keep: nodes never go back), or --timeout passes. Asks again soon at first, then every second."""
    holds: dict[PeerId, str | None] = {}
    deadline = trio.current_time() + args.timeout
    pause = 0.1

    def settled(m: Member) -> bool:
        held = _issued_ns(holds.get(m.peer_id))
        return held is not None and held >= snap.issued_at_ns

    while True:
        holds.update(await _ask_each(host, first_conn, [m for m in snap.members if not settled(m)], env))
        have = sum(1 for m in snap.members if holds.get(m.peer_id) == snap.issued_at)
        progress(args, f"  {have}/{len(snap.members)} members hold it")
        if all(settled(m) for m in snap.members) or trio.current_time() >= deadline:
            return holds
        await trio.sleep(min(pause, max(0.0, deadline - trio.current_time())))
        pause = min(1.0, pause * 2)


def cmd_bundle_export(args) -> int:
    admin = keyfile.load(Path(args.admin_key), args.passphrase_env)
    proof_env = read_envelope(args.proof, "admin-proof")
    proof = AdminProof.from_dict(proof_env.verify())
    fields = {
        "cluster_id": proof.cluster_id,
        "system_pubkey": args.system_pubkey or "",
        "admin_key": admin.to_protobuf().hex(),
        "admin_proof": proof_env.to_bytes().hex(),
        "bootstrap": args.bootstrap or [],
    }
    if not fields["system_pubkey"]:
        raise AdminError("--system-pubkey is required (the 12D3KooW… printed by init-system)")
    text = bundle.export(fields)
    emit(args, {"bundle": text}, text)
    return 0


def cmd_bundle_import(args) -> int:
    try:
        data = bundle.parse(args.bundle if args.bundle != "-" else sys.stdin.read())
        admin = KeyPair.from_protobuf(bytes.fromhex(data["admin_key"]))
        proof_env = Envelope.from_bytes(bytes.fromhex(data["admin_proof"]), "admin-proof")
    except (DecodeError, ValueError) as exc:
        raise AdminError(f"bad bundle: {exc}") from None
    d = Path(args.dir)
    write_new_key(d / "admin.key", admin, args, "the admin key")
    write_envelope(str(d / "admin.proof"), proof_env)
    meta = {k: data[k] for k in ("cluster_id", "system_pubkey", "bootstrap") if k in data}
    atomic_write(d / "bundle.json", (json.dumps(meta, indent=2) + "\n").encode(), mode=0o600)
    emit(args, {"admin_peer_id": str(admin.peer_id), **meta, "dir": str(d)},
         f"admin {admin.peer_id} for cluster {data['cluster_id']} written to {d}/ (admin.key, admin.proof, bundle.json)")
    return 0


def cmd_dnsaddr(args) -> int:
    addrs: list[Multiaddr] = []
    if args.snapshot:
        snap = Snapshot.from_dict(read_envelope(args.snapshot, "membership-snapshot").verify())
        addrs += [a.with_peer_id(m.peer_id) for m in snap.members for a in m.addrs]
    for text in args.multiaddr:
        try:
            addr = Multiaddr.parse(text)
        except DecodeError as exc:
            raise AdminError(str(exc)) from None
        if addr.peer_id is None:
            raise AdminError(f"{text}: needs /p2p/<peer id> so nodes know whom they reach")
        addrs.append(addr)
    if not addrs:
        raise AdminError("give node multiaddrs (with /p2p/…) or --snapshot FILE")
    name = f"_dnsaddr.{args.domain.rstrip('.')}."
    records = [f"dnsaddr={a}" for a in addrs]
    lines = [f'{name} {args.ttl} IN TXT "{r}"' for r in records]
    emit(args, {"name": name, "ttl": args.ttl, "records": records}, "\n".join(lines))
    return 0


def cmd_inspect(args) -> int:
    env = read_envelope(args.file)
    system_key = None
    if args.system_pubkey:
        try:
            system_key = PublicKey.from_id_text(args.system_pubkey)
        except DecodeError as exc:
            raise AdminError(f"--system-pubkey: {exc}") from None
    trust = Trust(args.cluster or "", system_key)
    info: dict = {"type": env.type, "signer": str(env.signer_id), "digest": env.digest()}
    lines = [f"type    {env.type}", f"signer  {env.signer_id}"]
    now = timefmt.now_ns()
    try:
        payload = env.verify()
        info["signature"] = "valid"
        lines.append("sig     valid")
        if env.type == "membership-snapshot":
            snap = Snapshot.from_dict(payload)
            info.update(snap.to_dict())
            info.pop("admin_proof", None)
            lines += [f"cluster {snap.cluster_id}", f"issued  {snap.issued_at}", f"members {len(snap.members)}"]
            lines += [f"  {m.peer_id}  {m.name or '-'}  {','.join(m.labels) or '-'}  {' '.join(str(a) for a in m.addrs) or '-'}" for m in snap.members]
            if system_key is None:
                lines.append("proof   not checked (give --system-pubkey to check the admin proof)")
            verify_snapshot(env, trust, now)
            if system_key is not None:
                lines.append("proof   valid for this issuer, cluster and time")
        elif env.type == "admin-proof":
            proof = AdminProof.from_dict(payload)
            info.update(proof.to_dict())
            lines += [f"admin   {proof.admin_peer_id}", f"cluster {proof.cluster_id}", f"role    {proof.role}",
                      f"valid   {timefmt.format_ns(proof.valid_from_ns)} to {timefmt.format_ns(proof.valid_until_ns)}"]
            if system_key is not None:
                verify_admin_proof(env, trust, cluster_id=args.cluster or proof.cluster_id, admin=proof.admin_peer_id, at_ns=now)
            if not proof.valid_from_ns <= now <= proof.valid_until_ns:
                raise Rejected("proof_expired", "the proof is not valid at this time")
        elif env.type == "revocation":
            rev = Revocation.from_dict(payload)
            info.update(rev.to_dict())
            lines += [f"cluster {rev.cluster_id}", "revokes " + ", ".join(str(a) for a in rev.admins)]
            if system_key is not None:
                verify_revocation(env, trust, now)
        else:
            info["payload"] = payload
            lines.append(json.dumps(payload, indent=2, default=str))
    except Rejected as exc:
        info.update(valid=False, code=exc.code, reason=str(exc))
        emit(args, info, "\n".join(lines) + f"\nINVALID ({exc.code}): {exc}")
        return EXIT_INVALID
    except SignatureInvalid as exc:
        info.update(valid=False, code="bad_signature", reason=str(exc))
        emit(args, info, "\n".join(lines) + f"\nINVALID (bad_signature): {exc}")
        return EXIT_INVALID
    except DecodeError as exc:
        info.update(valid=False, code="malformed", reason=str(exc))
        emit(args, info, "\n".join(lines) + f"\nINVALID (malformed): {exc}")
        return EXIT_INVALID
    info["valid"] = True
    emit(args, info, "\n".join(lines) + "\nVALID")
    return 0


# -- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    common.add_argument("--passphrase-env", default=keyfile.DEFAULT_PASSPHRASE_ENV, metavar="VAR",
                        help="environment variable holding the key passphrase (default %(default)s); otherwise asked on the terminal")
    enc = argparse.ArgumentParser(add_help=False)
    enc.add_argument("--encrypt", action="store_true", help="encrypt the new key with a passphrase (also implied when the passphrase variable is set)")
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--dns-server", action="append", default=[], metavar="HOST:PORT", help="resolve dnsaddr domains through this server")
    validity = argparse.ArgumentParser(add_help=False)
    validity.add_argument("--cluster", required=True, help="cluster ID the proof is for")
    validity.add_argument("--valid-days", type=float, default=365, help="how long the proof is valid (default 365)")
    validity.add_argument("--valid-from", help="RFC 3339 start of validity (default: now)")

    parser = argparse.ArgumentParser(prog="p2pnode-admin", description=(
        "Administer a p2pnode cluster: keys, admin proofs, membership snapshots, revocations, deploys. "
        "Trust chain: the system key signs admin proofs and revocations; an admin signs snapshots; an admin "
        "or a deployer (new-deployer) signs deploy commands and artifact manifests."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-system", parents=[common, enc], help="create the cluster's system key; prints system_pubkey")
    p.add_argument("--dir", default=".", help="where to write system.key (default: .)")
    p.set_defaults(func=cmd_init_system)

    p = sub.add_parser("new-admin", parents=[common, enc, validity], help="create an admin key and its proof signed by the system key")
    p.add_argument("--system-key", required=True, help="system.key from init-system")
    p.add_argument("--dir", default=".", help="where to write admin.key and admin.proof")
    p.set_defaults(func=cmd_new_admin)

    p = sub.add_parser("rotate", parents=[common, validity], help="issue a new proof for an existing admin (renewal)")
    p.add_argument("--system-key", required=True)
    p.add_argument("--admin", required=True, help="the admin's peer ID")
    p.add_argument("--out", required=True, help="file for the new proof")
    p.set_defaults(func=cmd_rotate)

    p = sub.add_parser("new-node", parents=[common], help="create a node key (pre-provisioning); prints its peer ID")
    p.add_argument("--dir", default=".", help="where to write node.key (a node's data dir)")
    p.set_defaults(func=cmd_new_node)

    p = sub.add_parser("snapshot", parents=[common, net], help="build and sign a membership snapshot", description=(
        "Build a snapshot from --base (a snapshot file, or a node's multiaddr/domain to fetch the current one), "
        "a --members file (JSON list of {peer_id, name, addrs, labels}), --add and --remove; sign it with the admin "
        "key. Refuses to sign one not newer than the newest it knows of, and refuses to sign with an admin key "
        "it knows is revoked: it learns revocations from the node when --base is a node or domain, and from "
        "--revocation files."))
    p.add_argument("--admin-key", required=True)
    p.add_argument("--proof", required=True, help="admin.proof")
    p.add_argument("--base", help="start from this snapshot file, or from the current one of this node (multiaddr or domain)")
    p.add_argument("--members", help="JSON members file; replaces the base's members")
    p.add_argument("--add", action="append", metavar="SPEC", help="PEER_ID;name=N;addrs=MA,MA;labels=a,b (repeatable)")
    p.add_argument("--remove", action="append", metavar="PEER_ID", help="remove a member (repeatable)")
    p.add_argument("--revocation", action="append", metavar="FILE",
                   help="a revocation (from `revoke`); refuse to sign if it names this admin (repeatable)")
    p.add_argument("--state-dir", default=os.path.expanduser("~/.config/p2pnode-admin"), help="where the newest signed snapshot's time is kept")
    p.add_argument("--out", required=True, help="file to write the signed snapshot to")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("publish", parents=[common, net], help="push a snapshot or revocation to a node, then wait for the members", description=(
        "Dial TO (a multiaddr, or a domain whose _dnsaddr records list nodes), push FILE, and for a snapshot ask each "
        "member which snapshot it holds until all hold this one (or a newer one) or --timeout passes. When the "
        "first node already holds it or a newer one, push to every member directly and report each one's verdict "
        "at once. Exit 0 when all members hold this snapshot."))
    p.add_argument("file")
    p.add_argument("--to", required=True, metavar="MULTIADDR|DOMAIN")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--no-wait", action="store_true", help="return after the first node's verdict")
    p.add_argument("--force", action="store_true", help="send even if the document does not verify here (to see what a node says)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("revoke", parents=[common], help="revoke admins (signed by the system key)")
    p.add_argument("--system-key", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--admin", action="append", required=True, help="admin peer ID to revoke (repeatable)")
    p.add_argument("--reason", help="free text, kept in the document")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_revoke)

    b = sub.add_parser("bundle", help="export or import the admin bundle (p2pnode-admin://…)")
    bsub = b.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    p = bsub.add_parser("export", parents=[common], help="print the admin bundle: it contains the admin's private key")
    p.add_argument("--admin-key", required=True)
    p.add_argument("--proof", required=True)
    p.add_argument("--system-pubkey", required=True)
    p.add_argument("--bootstrap", action="append", help="a domain or multiaddr to reach the cluster (repeatable)")
    p.set_defaults(func=cmd_bundle_export)
    p = bsub.add_parser("import", parents=[common, enc], help="write admin.key, admin.proof and bundle.json from a bundle")
    p.add_argument("bundle", help="the p2pnode-admin://… string, or - to read it from stdin")
    p.add_argument("--dir", default=".")
    p.set_defaults(func=cmd_bundle_import)

    p = sub.add_parser("dnsaddr", parents=[common], help="print the _dnsaddr TXT records to publish for nodes")
    p.add_argument("--domain", required=True, help="the bootstrap domain (nodes use init_connections dns:<domain>)")
    p.add_argument("--snapshot", help="take the nodes and addresses from this snapshot")
    p.add_argument("--ttl", type=int, default=300)
    p.add_argument("multiaddr", nargs="*", help="node multiaddrs with /p2p/<peer id>")
    p.set_defaults(func=cmd_dnsaddr)

    p = sub.add_parser("inspect", parents=[common], help="decode and verify any signed object; say why it is (in)valid")
    p.add_argument("file", help="file (binary CBOR or hex), or - for stdin")
    p.add_argument("--system-pubkey", help="check admin proofs and revocations against this system key")
    p.add_argument("--cluster", help="expected cluster ID")
    p.set_defaults(func=cmd_inspect)

    from . import folder  # imports this module: registered here, once it is loaded
    folder.register(sub, common, net)
    from . import deploy  # deploys: new-deployer, artifact publish, deploy … (it imports this module)

    deploy.add_commands(sub, common, enc, net, validity)
    return parser


async def run(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Parse `argv`, run the command, return its exit code; errors are one line on `stderr`."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        # argparse writes --help and usage errors to sys.stdout/sys.stderr itself; it does not
        # await, so no other task of the loop writes while these are redirected
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    args.stdout, args.stderr = out, err
    try:
        if inspect.iscoroutinefunction(args.func):
            return await args.func(args)
        return await trio.to_thread.run_sync(args.func, args)
    except (AdminError, KeyFileError) as exc:
        print(f"p2pnode-admin: {exc}", file=err)
        return EXIT_USAGE
    except trio.TooSlowError:
        print(f"p2pnode-admin: {args.command}: timed out", file=err)
        return EXIT_INVALID
    except (DecodeError, P2PNodeError, OSError) as exc:
        print(f"p2pnode-admin: {args.command}: {exc}", file=err)
        return EXIT_INVALID


def main(argv: list[str] | None = None) -> int:
    try:
        return trio.run(run, argv)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
