"""The signed objects of folder sync.

- `sync-folder` (admin-signed, on the document bus, LWW per folder id): a folder's configuration,
  or its removal. Signed by a key whose proof grants the `admin` role.
- `sync-state` (signed by the node it describes, on the bus, LWW per folder and node): what a node
  holds of a folder and what it is doing — the source's newest index version, a receiver's applied
  version, task status and progress, last error and a log tail. Any node answers `sync status`
  from these; receivers learn new versions, pick block sources and take turns from them.
- `sync-index` (signed by the folder's source, carried by `/p2pnode/sync/1.0.0`): one IndexChunk.
  Any node may relay it; a receiver accepts it only if the folder's source signed it.

Spec: protocols/sync.md.
"""

from __future__ import annotations

from typing import Any

import attrs

from .. import timefmt
from ..cluster.documents import ROLE_ADMIN, Rejected, Trust, verify_admin_document
from ..codec import Fields
from ..envelope import Envelope, register_type
from ..errors import DecodeError
from ..identity import KeyPair, PeerId
from .model import IndexChunk, FolderConfig, check_folder_id

FOLDER = "sync-folder"
STATE = "sync-state"
INDEX = "sync-index"
register_type(FOLDER, "p2pnode-sync-folder-v1")
register_type(STATE, "p2pnode-sync-state-v1")
register_type(INDEX, "p2pnode-sync-index-v1")

# Task statuses (the seed's) and the folder-level ones a node can be in.
PENDING, RUNNING, SUCCESS, FAILED, RETRYING = "PENDING", "RUNNING", "SUCCESS", "FAILED", "RETRYING"
SYNC_DEGRADED = "SYNC_DEGRADED"  # max_attempts used up on the current version
REFUSED = "REFUSED"  # this node's own config does not allow the folder's path
SOURCE = "SOURCE"  # the source's state: it publishes versions
SOURCE_ERROR = "SOURCE_ERROR"  # the source cannot scan its folder
STATUSES = (PENDING, RUNNING, SUCCESS, FAILED, RETRYING, SYNC_DEGRADED, REFUSED, SOURCE, SOURCE_ERROR)
MAX_LOG_LINES = 20
MAX_LOG_LINE = 240


@attrs.frozen
class FolderDoc:
    """A folder's configuration as an admin signed it; `config` None means the folder is removed."""

    folder_id: str
    issued_at_ns: int
    config: FolderConfig | None

    def sign(self, key: KeyPair, proof: Envelope | None, cluster_id: str) -> Envelope:
        payload: dict[str, Any] = {
            "cluster_id": cluster_id,
            "issued_at": timefmt.format_ns(self.issued_at_ns),
            "issuer_peer_id": str(key.peer_id),
            "admin_proof": proof.to_dict() if proof is not None else None,
            "folder_id": self.folder_id,
        }
        if self.config is None:
            payload["removed"] = True
        else:
            payload["config"] = self.config.to_dict()
        return Envelope.seal(FOLDER, payload, key)


def verify_folder(env: Envelope, trust: Trust, now_ns: int, *, stored: bool = False) -> FolderDoc:
    head, f = verify_admin_document(env, trust, now_ns, type_=FOLDER, roles=frozenset({ROLE_ADMIN}), stored=stored)
    folder_id = check_folder_id(f.text("folder_id", max_len=64), "sync folder folder_id")
    if f.boolean("removed", optional=True, default=False):
        return FolderDoc(folder_id, head.issued_at_ns, None)
    config = FolderConfig.from_dict(f.raw.get("config"))
    if config.id != folder_id:
        raise Rejected("malformed", f"sync folder {folder_id}: its config is for folder {config.id}")
    return FolderDoc(folder_id, head.issued_at_ns, config)


@attrs.frozen
class TaskInfo:
    """A receiver's current task for a folder: one version to apply, with its attempts and progress."""

    id: str
    index_id: int
    seq: int  # the version (source seq) this task brings the folder to
    status: str
    attempt: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0  # bytes per second over the running attempt
    next_retry_at_ns: int = 0
    last_error: str = ""
    log: tuple[str, ...] = ()

    @property
    def eta_s(self) -> float | None:
        if self.status != RUNNING or self.rate <= 0 or self.bytes_total <= self.bytes_done:
            return None
        return (self.bytes_total - self.bytes_done) / self.rate

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "index_id": self.index_id, "seq": self.seq, "status": self.status, "attempt": self.attempt,
            "started_at_ns": self.started_at_ns, "finished_at_ns": self.finished_at_ns,
            "files_done": self.files_done, "files_total": self.files_total, "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total, "rate": float(self.rate), "next_retry_at_ns": self.next_retry_at_ns,
            "last_error": self.last_error, "log": list(self.log),
        }

    @classmethod
    def from_dict(cls, raw: object) -> TaskInfo:
        f = Fields(raw, "sync task")
        status = f.text("status", max_len=16)
        if status not in STATUSES:
            raise DecodeError(f"sync task: unknown status {status!r}")
        log = f.items("log", optional=True, max_items=MAX_LOG_LINES)
        if not all(isinstance(line, str) and len(line) <= MAX_LOG_LINE for line in log):
            raise DecodeError("sync task: log lines must be short strings")
        ints = {k: _nonneg(f, k) for k in ("index_id", "seq", "attempt", "started_at_ns", "finished_at_ns", "files_done",
                                            "files_total", "bytes_done", "bytes_total", "next_retry_at_ns")}
        rate = f.number("rate", optional=True, default=0.0) or 0.0
        return cls(id=f.text("id", max_len=200), status=status, rate=max(0.0, rate),
                   last_error=f.text("last_error", optional=True, default="", max_len=2000), log=tuple(log), **ints)


def _nonneg(f: Fields, key: str) -> int:
    value = f.integer(key, optional=True, default=0)
    if value is None or not 0 <= value < 2**63:
        raise DecodeError(f"{f.what}: {key} must be a non-negative integer")
    return value


@attrs.frozen
class SyncState:
    """What one node holds of one folder, signed by that node."""

    folder: str
    node: PeerId
    issued_at_ns: int
    role: str  # "source" | "receiver"
    status: str
    index_id: int = 0
    seq: int = 0  # source: the newest version it published; receiver: the version it has applied
    have_seq: int = 0  # receiver: how far it holds the source's index (it can relay chunks up to here)
    error: str = ""
    task: TaskInfo | None = None

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.node}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "folder": self.folder, "node": str(self.node), "issued_at": timefmt.format_ns(self.issued_at_ns),
            "role": self.role, "status": self.status, "index_id": self.index_id, "seq": self.seq,
            "have_seq": self.have_seq, "error": self.error,
        }
        if self.task is not None:
            out["task"] = self.task.to_dict()
        return out

    def sign(self, key: KeyPair) -> Envelope:
        return Envelope.seal(STATE, self.to_dict(), key)

    @classmethod
    def from_dict(cls, raw: object) -> SyncState:
        f = Fields(raw, "sync state")
        folder = check_folder_id(f.text("folder", max_len=64), "sync state folder")
        role = f.text("role", max_len=16)
        if role not in ("source", "receiver"):
            raise DecodeError(f"sync state: role must be source or receiver, got {role!r}")
        status = f.text("status", max_len=16)
        if status not in STATUSES:
            raise DecodeError(f"sync state: unknown status {status!r}")
        task_raw = f.raw.get("task")
        return cls(
            folder=folder, node=PeerId.from_string(f.text("node", max_len=128)),
            issued_at_ns=timefmt.parse_ns(f.text("issued_at", max_len=64)), role=role, status=status,
            index_id=_nonneg(f, "index_id"), seq=_nonneg(f, "seq"), have_seq=_nonneg(f, "have_seq"),
            error=f.text("error", optional=True, default="", max_len=2000),
            task=TaskInfo.from_dict(task_raw) if task_raw is not None else None,
        )


def verify_state(env: Envelope, now_ns: int, *, stored: bool = False) -> SyncState:
    """Signed by the node it describes; dated no more than 5 minutes ahead. (Whether that node is a
    member is the receiving service's check: membership changes, signatures don't.)"""
    if env.type != STATE:
        raise Rejected("malformed", f"expected a {STATE}, got {env.type}")
    try:
        raw = env.verify()
    except DecodeError as exc:
        raise Rejected("bad_signature", str(exc)) from None
    state = SyncState.from_dict(raw)
    if state.node != env.signer_id:
        raise Rejected("bad_signature", f"sync state describes {state.node} but was signed by {env.signer_id}")
    if not stored and state.issued_at_ns > now_ns + 5 * 60 * timefmt.NS:
        raise Rejected("future", "sync state is dated more than 5 minutes ahead of this node's clock")
    return state


def sign_chunk(chunk: IndexChunk, key: KeyPair) -> Envelope:
    return Envelope.seal(INDEX, chunk.to_dict(), key)


def verify_chunk(data: bytes, folder: str, source: PeerId) -> IndexChunk:
    """An index chunk relayed by anyone: it must be signed by the folder's source and be for the folder."""
    env = Envelope.from_bytes(data, INDEX)
    if env.signer_id != source:
        raise Rejected("wrong_signer", f"index chunk of {folder} is signed by {env.signer_id}, not by its source {source}")
    try:
        chunk = IndexChunk.from_dict(env.verify())
    except DecodeError as exc:
        raise Rejected("bad_signature" if "signature" in str(exc) else "malformed", str(exc)) from None
    if chunk.folder != folder:
        raise Rejected("malformed", f"index chunk is for folder {chunk.folder}, not {folder}")
    return chunk
