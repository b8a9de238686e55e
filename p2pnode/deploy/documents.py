"""The deploy engine's signed documents: commands, node reports and artifact manifests.

- `deploy-command` — a DeployCommand signed by a key whose proof (signed by the system key) grants
  the `admin` or `deploy` role; the payload is the command's fields plus `cluster_id`,
  `issuer_peer_id` and `admin_proof` (verify_admin_document). Refused: a cluster without a
  system key (anyone could deploy), a command outside its validity window, a deploy ID longer than
  MAX_DEPLOY_ID (room for the ':revert' suffix a node uses for its own revert).
- `deploy-report` — a DeployReport signed by the node that executes, naming itself (`peer_id`),
  its cluster, when it accepted the deploy (`started_at`), and once the deploy had its first final
  result, that result (`outcome`), which later reports (a revert) keep, so the rollout is judged
  on it whatever the node did afterwards.
- `artifact-manifest` — a file's size, SHA-256 and the SHA-256 of each `block_size` block, signed
  by a deploy-role key; a node stores an upload, and fetches an artifact from peers, only under
  a manifest. `origin` names the node the file was uploaded to (the first place to fetch from).

Verification is pure (envelope, trust, now → value, or Rejected with a code). Spec:
protocols/deploy.md.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs

from .. import timefmt
from ..cluster.documents import ROLE_ADMIN, ROLE_DEPLOY, Rejected, Trust, verify_admin_document
from ..cluster.documents import _peer  # a peer ID field, the error naming it
from ..codec import Fields
from ..envelope import Envelope, register_type
from ..errors import DecodeError
from ..identity import KeyPair, PeerId
from .report import DeployReport
from .spec import MAX_ARTIFACT_SIZE, DeployCommand
from .spec import _time  # a timestamp field, the error naming it

COMMAND = "deploy-command"
REPORT = "deploy-report"
MANIFEST = "artifact-manifest"
register_type(COMMAND, "p2pnode-deploy-command-v1")
register_type(REPORT, "p2pnode-deploy-report-v1")
register_type(MANIFEST, "p2pnode-artifact-manifest-v1")

ROLES = frozenset({ROLE_ADMIN, ROLE_DEPLOY})
REVERT_SUFFIX = ":revert"
MAX_DEPLOY_ID = 120
MIN_BLOCK = 64 * 1024
MAX_BLOCK = 4 * 1024 * 1024
DEFAULT_BLOCK = 1024 * 1024
MAX_BLOCKS = 65_536


def _need_system_key(trust: Trust, what: str) -> None:
    if trust.system_key is None:
        raise Rejected("no_system_key", f"{what}s need the cluster's system_pubkey in this node's config: without it anyone could sign one")


# ---- commands ------------------------------------------------------------------------------------

def sign_command(cmd: DeployCommand, key: KeyPair, proof: Envelope, cluster_id: str) -> Envelope:
    payload = {**cmd.to_dict(), "cluster_id": cluster_id, "issuer_peer_id": str(key.peer_id), "admin_proof": proof.to_dict()}
    return Envelope.seal(COMMAND, payload, key)


@attrs.frozen
class SignedCommand:
    command: DeployCommand
    issuer: PeerId
    role: str  # the issuer's role: admin or deploy


def verify_command(env: Envelope, trust: Trust, now_ns: int, *, stored: bool = False) -> SignedCommand:
    """Signature, issuer, cluster, date and the issuer's proof first; then the command's fields;
    then (unless `stored`) its validity window at `now_ns`."""
    _need_system_key(trust, "deploy command")
    head, f = verify_admin_document(env, trust, now_ns, type_=COMMAND, roles=ROLES, stored=stored)
    cmd = DeployCommand.from_dict(f.raw)
    if len(cmd.deploy_id) > MAX_DEPLOY_ID:
        raise Rejected("malformed", f"deploy command: deploy_id is longer than {MAX_DEPLOY_ID} characters")
    if not stored:
        if now_ns > cmd.valid_until_ns:
            raise Rejected("expired", f"deploy {cmd.deploy_id} expired at {timefmt.format_ns(cmd.valid_until_ns)} "
                                      f"(this node's clock says {timefmt.format_ns(now_ns)}); sign a new command")
    return SignedCommand(cmd, head.issuer_peer_id, head.proof.role if head.proof else ROLE_ADMIN)


# ---- reports -------------------------------------------------------------------------------------

@attrs.frozen
class Outcome:
    """A deploy's first final result on a node: what the rollout is judged on."""

    status: str
    success: bool
    at_ns: int

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "success": self.success, "at": timefmt.format_ns(self.at_ns)}

    @classmethod
    def from_dict(cls, raw: object) -> Outcome:
        f = Fields(raw, "deploy report outcome")
        return cls(f.text("status", max_len=32), f.boolean("success"), _time(f, "at"))


@attrs.frozen
class NodeReport:
    peer_id: PeerId
    cluster_id: str
    report: DeployReport
    started_at_ns: int
    outcome: Outcome | None = None

    @property
    def key(self) -> str:
        return report_key(self.report.deploy_id, self.peer_id)

    @property
    def result(self) -> Outcome | None:
        """The outcome the rollout counts: the first final result (kept by later reports)."""
        if self.outcome is not None:
            return self.outcome
        if self.report.final:
            return Outcome(self.report.status, bool(self.report.success), self.report.at_ns)
        return None

    def to_dict(self) -> dict[str, Any]:
        out = {**self.report.to_dict(), "peer_id": str(self.peer_id), "cluster_id": self.cluster_id,
               "started_at": timefmt.format_ns(self.started_at_ns)}
        if self.outcome is not None:
            out["outcome"] = self.outcome.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NodeReport:
        f = Fields(raw, "deploy report")
        outcome = Outcome.from_dict(raw["outcome"]) if "outcome" in raw else None
        return cls(_peer(f.text("peer_id", max_len=128), "deploy report peer_id"), f.text("cluster_id", max_len=256),
                   DeployReport.from_dict(raw), _time(f, "started_at"), outcome)

    def sign(self, key: KeyPair) -> Envelope:
        if key.peer_id != self.peer_id:
            raise ValueError("a node signs only its own reports")
        return Envelope.seal(REPORT, self.to_dict(), key)


def report_key(deploy_id: str, peer: PeerId | str) -> str:
    return f"{deploy_id}/{peer}"


def peek_report(payload: dict[str, Any]) -> tuple[str, int]:
    """(key, order) of an unverified report: newer `seq` wins."""
    deploy_id, peer, seq = payload.get("deploy_id"), payload.get("peer_id"), payload.get("seq")
    if not isinstance(deploy_id, str) or not isinstance(peer, str) or not isinstance(seq, int) or isinstance(seq, bool):
        raise DecodeError("deploy report: deploy_id, peer_id or seq missing")
    return report_key(deploy_id, peer), seq


def verify_report(env: Envelope, cluster_id: str, *, member: bool) -> NodeReport:
    """A report must be signed by the node it names, for this cluster; `member`: the signer is a
    member now (checked by the caller; a stored report is judged without it)."""
    if env.type != REPORT:
        raise Rejected("malformed", f"expected a deploy-report, got {env.type}")
    try:
        raw = env.verify()
    except DecodeError as exc:
        raise Rejected("bad_signature", str(exc)) from None
    peer = raw.get("peer_id")
    if peer != str(env.signer_id):
        raise Rejected("bad_signature", f"deploy report names node {peer!r} but was signed by {env.signer_id}")
    if not member:
        raise Rejected("not_member", f"deploy report from {env.signer_id}, which is not a member of this cluster")
    report = NodeReport.from_dict(raw)
    if cluster_id and report.cluster_id != cluster_id:
        raise Rejected("wrong_cluster", f"deploy report is for cluster {report.cluster_id!r}, this node is in {cluster_id!r}")
    if report.report.seq < 1:
        raise Rejected("malformed", "deploy report: seq must be at least 1")
    return report


# ---- artifact manifests --------------------------------------------------------------------------

def block_size_for(size: int) -> int:
    """1 MiB blocks, larger (up to 4 MiB) for files of more than 16384 MiB."""
    block = DEFAULT_BLOCK
    while block < MAX_BLOCK and -(-size // block) > 16384:
        block *= 2
    return block


@attrs.frozen
class Manifest:
    sha256: str
    size: int
    block_size: int
    blocks: tuple[bytes, ...]
    issued_at_ns: int
    name: str = ""
    origin: PeerId | None = None

    def block_range(self, index: int) -> tuple[int, int]:
        start = index * self.block_size
        return start, min(self.size, start + self.block_size)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size, "block_size": self.block_size, "blocks": list(self.blocks),
                               "issued_at": timefmt.format_ns(self.issued_at_ns), "name": self.name}
        if self.origin is not None:
            out["origin"] = str(self.origin)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        f = Fields(raw, "artifact manifest")
        sha = f.text("sha256", max_len=64)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise DecodeError("artifact manifest: field 'sha256' must be 64 lowercase hex digits")
        size, block = f.integer("size"), f.integer("block_size")
        if not 0 <= size <= MAX_ARTIFACT_SIZE:
            raise DecodeError(f"artifact manifest: field 'size' must be 0 to {MAX_ARTIFACT_SIZE}")
        if block not in {MIN_BLOCK << i for i in range(7)}:
            raise DecodeError("artifact manifest: field 'block_size' must be a power of two from 64 KiB to 4 MiB")
        blocks = f.items("blocks", max_items=MAX_BLOCKS)
        if len(blocks) != max(1, -(-size // block)) or not all(isinstance(b, bytes) and len(b) == 32 for b in blocks):
            raise DecodeError(f"artifact manifest: field 'blocks' must hold one 32-byte SHA-256 per {block}-byte block "
                              f"({max(1, -(-size // block))} for {size} bytes)")
        origin = f.text("origin", optional=True, max_len=128)
        return cls(sha, size, block, tuple(blocks), _time(f, "issued_at"), f.text("name", optional=True, default="", max_len=255),
                   None if origin is None else _peer(origin, "artifact manifest origin"))

    def sign(self, key: KeyPair, proof: Envelope, cluster_id: str) -> Envelope:
        payload = {**self.to_dict(), "cluster_id": cluster_id, "issuer_peer_id": str(key.peer_id), "admin_proof": proof.to_dict()}
        return Envelope.seal(MANIFEST, payload, key)


def verify_manifest(env: Envelope, trust: Trust, now_ns: int, *, stored: bool = False) -> Manifest:
    _need_system_key(trust, "artifact manifest")
    _, f = verify_admin_document(env, trust, now_ns, type_=MANIFEST, roles=ROLES, stored=stored)
    return Manifest.from_dict(f.raw)


def hash_file(path: str, block_size: int | None = None) -> tuple[str, int, int, tuple[bytes, ...]]:
    """(sha256 hex, size, block_size, block hashes) of a file; blocking."""
    import os

    size = os.path.getsize(path)
    block = block_size or block_size_for(size)
    whole = hashlib.sha256()
    blocks = []
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block)
            if not data:
                break
            whole.update(data)
            blocks.append(hashlib.sha256(data).digest())
    if not blocks:
        blocks.append(hashlib.sha256(b"").digest())
    return whole.hexdigest(), size, block, tuple(blocks)
