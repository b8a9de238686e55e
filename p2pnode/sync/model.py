"""Sync values: folder configuration, file entries, index chunks; CBOR maps with hard limits.

`FolderConfig` is the payload of an admin-signed folder document (last writer wins per `id`).
`FileEntry` is one file's latest state in a source's index; `IndexChunk` is the unit the source
signs and any peer may relay: the latest state of every file whose `seq` is in (prev_seq, seq].

Every `from_dict` validates everything a peer could get wrong and raises DecodeError naming the
message and the field; the attrs classes themselves do not validate, so code that builds values
locally (the scanner) pays nothing and `apply` re-checks names on its own (defence in depth).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from .. import codec, timefmt
from ..codec import Fields
from ..errors import DecodeError
from ..identity import PeerId
from . import names
from .blocks import HASH_LEN, MAX_FILE_SIZE, block_count, block_size_for
from .ignore import check_patterns

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
TYPES = (FILE, DIR, SYMLINK)


def file_type(st_mode: int) -> str | None:
    """FILE, DIR or SYMLINK for an lstat mode; None for what sync leaves alone (fifos, sockets, devices)."""
    if stat.S_ISREG(st_mode):
        return FILE
    if stat.S_ISDIR(st_mode):
        return DIR
    if stat.S_ISLNK(st_mode):
        return SYMLINK
    return None


MIRROR = "mirror"
OVERLAY = "overlay"
STRATEGIES = (MIRROR, OVERLAY)

MAX_CHUNK_BYTES = 1024 * 1024  # one encoded IndexChunk; larger updates are split into several
MAX_CHUNK_ENTRIES = 50_000
MAX_NODES = 1024
MAX_PATTERNS = 1000
MAX_PATTERN_LEN = 1024
MAX_PATH_LEN = 4095
MAX_SEQ = 2**63 - 1
MAX_ID = 2**63 - 1  # SQLite integers are signed 64-bit
_FOLDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_folder_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _FOLDER_ID.fullmatch(value):
        raise DecodeError(f"{what}: folder id must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return value


def check_abs_path(value: str, what: str) -> str:
    """An absolute, already normalised path (no `..`, no `//`, no trailing `/`)."""
    if "\x00" in value or len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_LEN:
        raise DecodeError(f"{what}: path contains NUL or is longer than {MAX_PATH_LEN} bytes")
    if not value.startswith("/") or os.path.normpath(value) != value or value.startswith("//"):
        raise DecodeError(f"{what}: {value!r} must be an absolute, normalised path like /srv/app")
    return value


def _int_range(value: int, lo: int, hi: int, what: str) -> int:
    if not lo <= value <= hi:
        raise DecodeError(f"{what} must be between {lo} and {hi}, got {value}")
    return value


def _text_list(f: Fields, key: str, max_items: int, max_len: int) -> tuple[str, ...]:
    items = f.items(key, optional=True, max_items=max_items)
    for item in items:
        if not isinstance(item, str) or len(item) > max_len:
            raise DecodeError(f"{f.what}: every item of {key!r} must be text of at most {max_len} characters")
    return tuple(items)


# -- folder configuration ---------------------------------------------------------------------------


@attrs.frozen
class RetryPolicy:
    """Failed sync tasks retry after min(cap, base * 2^(attempt-1)), shortened by up to `jitter` of it."""

    max_attempts: int = 5
    backoff_base_s: float = 5.0
    backoff_cap_s: float = 600.0
    jitter: float = 0.5

    def delay(self, attempt: int, u: float) -> float:
        """Seconds to wait before attempt `attempt + 1`, given a uniform random `u` in [0, 1)."""
        base: float = min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** max(0, min(attempt - 1, 62)))
        return base * (1.0 - self.jitter * u)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "backoff_base_s": self.backoff_base_s,
            "backoff_cap_s": self.backoff_cap_s,
            "jitter": self.jitter,
        }

    @classmethod
    def from_dict(cls, raw: object) -> RetryPolicy:
        f = Fields(raw, "folder retry")
        d = cls()
        def number(key: str, default: float) -> float:
            value = f.number(key, optional=True, default=default)
            return default if value is None else value

        policy = cls(
            max_attempts=f.integer("max_attempts", optional=True, default=d.max_attempts),
            backoff_base_s=number("backoff_base_s", d.backoff_base_s),
            backoff_cap_s=number("backoff_cap_s", d.backoff_cap_s),
            jitter=number("jitter", d.jitter),
        )
        _int_range(policy.max_attempts, 1, 1000, "folder retry: max_attempts")
        if not 0 < policy.backoff_base_s <= policy.backoff_cap_s <= 86_400:
            raise DecodeError("folder retry: need 0 < backoff_base_s <= backoff_cap_s <= 86400 seconds")
        if not 0.0 <= policy.jitter <= 1.0:
            raise DecodeError("folder retry: jitter must be between 0 and 1")
        return policy


@attrs.frozen
class NodeTarget:
    """One receiver of a folder: where it writes and what it takes."""

    node_id: PeerId
    target_path: str
    strategy: str = MIRROR
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node_id": str(self.node_id), "target_path": self.target_path, "strategy": self.strategy}
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        return out

    @classmethod
    def from_dict(cls, raw: object, what: str) -> NodeTarget:
        f = Fields(raw, what)
        try:
            node_id = PeerId.from_string(f.text("node_id", max_len=128))
        except DecodeError as exc:
            raise DecodeError(f"{what}: node_id: {exc}") from None
        strategy = f.text("strategy", optional=True, default=MIRROR, max_len=16)
        if strategy not in STRATEGIES:
            raise DecodeError(f"{what}: strategy must be mirror or overlay, got {strategy!r}")
        include = _text_list(f, "include", MAX_PATTERNS, MAX_PATTERN_LEN)
        exclude = _text_list(f, "exclude", MAX_PATTERNS, MAX_PATTERN_LEN)
        check_patterns(include, f"{what}: include")
        check_patterns(exclude, f"{what}: exclude")
        return cls(node_id, check_abs_path(f.text("target_path", max_len=MAX_PATH_LEN), f"{what}: target_path"), strategy, include, exclude)


@attrs.frozen
class FolderConfig:
    """An admin-signed folder: which node is the source, which nodes receive it and how."""

    id: str
    source: PeerId
    source_path: str
    nodes: tuple[NodeTarget, ...]
    issued_at_ns: int
    max_parallel_nodes: int = 1
    ignore_defaults: bool = True
    ignore_patterns: tuple[str, ...] = ()
    ignore_file: str | None = None
    ignore_permissions: bool = False
    retry: RetryPolicy = RetryPolicy()
    post_sync: tuple[str, ...] = ()  # argv run on a receiver after each successful sync; () = none
    rescan_interval_s: int = 3600  # the source's periodic full rescan, a safety net under the watcher

    def node(self, peer_id: PeerId) -> NodeTarget | None:
        for n in self.nodes:
            if n.node_id == peer_id:
                return n
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "source": str(self.source),
            "source_path": self.source_path,
            "nodes": [n.to_dict() for n in self.nodes],
            "max_parallel_nodes": self.max_parallel_nodes,
            "ignore_defaults": self.ignore_defaults,
            "ignore_patterns": list(self.ignore_patterns),
            "ignore_permissions": self.ignore_permissions,
            "retry": self.retry.to_dict(),
            "rescan_interval_s": self.rescan_interval_s,
            "issued_at": timefmt.format_ns(self.issued_at_ns),
        }
        if self.ignore_file is not None:
            out["ignore_file"] = self.ignore_file
        if self.post_sync:
            out["post_sync"] = list(self.post_sync)
        return out

    @classmethod
    def from_dict(cls, raw: object) -> FolderConfig:
        f = Fields(raw, "folder config")
        folder_id = check_folder_id(f.text("id", max_len=64), "folder config id")
        what = f"folder config {folder_id}"
        f.what = what
        try:
            source = PeerId.from_string(f.text("source", max_len=128))
        except DecodeError as exc:
            raise DecodeError(f"{what}: source: {exc}") from None
        nodes = tuple(NodeTarget.from_dict(n, f"{what}: nodes[{i}]") for i, n in enumerate(f.items("nodes", max_items=MAX_NODES)))
        if len({n.node_id for n in nodes}) != len(nodes):
            raise DecodeError(f"{what}: nodes: a node is listed twice")
        if any(n.node_id == source for n in nodes):
            raise DecodeError(f"{what}: nodes: the source cannot also be a receiver")
        patterns = _text_list(f, "ignore_patterns", MAX_PATTERNS, MAX_PATTERN_LEN)
        check_patterns(patterns, f"{what}: ignore_patterns")
        ignore_file = f.text("ignore_file", optional=True, max_len=names.MAX_NAME_BYTES)
        if ignore_file is not None:
            try:
                names.validate(ignore_file)
            except DecodeError as exc:
                raise DecodeError(f"{what}: ignore_file: {exc}") from None
        post_sync = _text_list(f, "post_sync", 64, 4096)
        if post_sync and not post_sync[0]:
            raise DecodeError(f"{what}: post_sync: the command (first item) is empty")
        retry_raw = f.raw.get("retry")
        try:
            issued_at_ns = timefmt.parse_ns(f.text("issued_at", max_len=64))
        except DecodeError as exc:
            raise DecodeError(f"{what}: issued_at: {exc}") from None
        return cls(
            id=folder_id,
            source=source,
            source_path=check_abs_path(f.text("source_path", max_len=MAX_PATH_LEN), f"{what}: source_path"),
            nodes=nodes,
            issued_at_ns=issued_at_ns,
            max_parallel_nodes=_int_range(
                f.integer("max_parallel_nodes", optional=True, default=1), 1, MAX_NODES, f"{what}: max_parallel_nodes"
            ),
            ignore_defaults=f.boolean("ignore_defaults", optional=True, default=True),
            ignore_patterns=patterns,
            ignore_file=ignore_file,
            ignore_permissions=f.boolean("ignore_permissions", optional=True, default=False),
            retry=RetryPolicy.from_dict(retry_raw) if retry_raw is not None else RetryPolicy(),
            post_sync=post_sync,
            rescan_interval_s=_int_range(
                f.integer("rescan_interval_s", optional=True, default=3600), 10, 7 * 86_400, f"{what}: rescan_interval_s"
            ),
        )


# -- the index --------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class FileEntry:
    """One file's latest state in a source's index. `blocks` is the concatenated 32-byte SHA-256
    digests of its blocks; `seq` is assigned by the source and strictly increases per index."""

    name: str
    type: str
    seq: int = 0
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    uid: int = 0
    gid: int = 0
    deleted: bool = False
    block_size: int = 0
    blocks: bytes = b""
    target: str = ""

    @property
    def block_total(self) -> int:
        return len(self.blocks) // HASH_LEN

    def block_hash(self, index: int) -> bytes:
        return self.blocks[index * HASH_LEN : (index + 1) * HASH_LEN]

    def same_content(self, other: FileEntry) -> bool:
        return (self.type, self.size, self.blocks, self.target, self.deleted) == (
            other.type,
            other.size,
            other.blocks,
            other.target,
            other.deleted,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "seq": self.seq, "mtime_ns": self.mtime_ns}
        if self.deleted:
            out["deleted"] = True
            return out
        out["mode"] = self.mode
        out["uid"] = self.uid
        out["gid"] = self.gid
        if self.type == FILE:
            out["size"] = self.size
            out["block_size"] = self.block_size
            out["blocks"] = self.blocks
        elif self.type == SYMLINK:
            out["target"] = self.target
        return out

    @classmethod
    def from_dict(cls, raw: object) -> FileEntry:
        f = Fields(raw, "file entry")
        name = f.text("name", max_len=names.MAX_NAME_BYTES)
        try:
            names.validate(name)
        except DecodeError as exc:
            raise DecodeError(f"file entry: name: {exc}") from None
        f.what = f"file entry {name!r}"
        type_ = f.text("type", max_len=16)
        if type_ not in TYPES:
            raise DecodeError(f"{f.what}: type must be one of {', '.join(TYPES)}, got {type_!r}")
        seq = _int_range(f.integer("seq"), 1, MAX_SEQ, f"{f.what}: seq")
        mtime_ns = _int_range(f.integer("mtime_ns"), -(2**63), 2**63 - 1, f"{f.what}: mtime_ns")
        if f.boolean("deleted", optional=True, default=False):
            return cls(name, type_, seq, mtime_ns=mtime_ns, deleted=True)
        mode = _int_range(f.integer("mode"), 0, 0o7777, f"{f.what}: mode")
        uid = _int_range(f.integer("uid", optional=True, default=0), 0, 2**32 - 1, f"{f.what}: uid")
        gid = _int_range(f.integer("gid", optional=True, default=0), 0, 2**32 - 1, f"{f.what}: gid")
        if type_ == FILE:
            size = _int_range(f.integer("size"), 0, MAX_FILE_SIZE, f"{f.what}: size")
            block_size = f.integer("block_size")
            if block_size != block_size_for(size):
                raise DecodeError(f"{f.what}: block_size {block_size} is not {block_size_for(size)}, the size for {size} bytes")
            blocks = f.blob("blocks")
            if len(blocks) != HASH_LEN * block_count(size, block_size):
                raise DecodeError(f"{f.what}: blocks must be {block_count(size, block_size)} hashes of {HASH_LEN} bytes")
            return cls(name, type_, seq, size, mode, mtime_ns, uid, gid, False, block_size, bytes(blocks))
        if type_ == SYMLINK:
            target = f.text("target", max_len=names.MAX_NAME_BYTES)
            if target == "" or "\x00" in target:
                raise DecodeError(f"{f.what}: target must be non-empty text without NUL")
            return cls(name, type_, seq, 0, mode, mtime_ns, uid, gid, target=target)
        return cls(name, type_, seq, 0, mode, mtime_ns, uid, gid)


def encoded_entry_size(entry: FileEntry) -> int:
    return len(codec.encode(entry.to_dict()))


@attrs.frozen
class IndexChunk:
    """Part of a source's index, signed by the source: every file whose seq is in (prev_seq, seq].

    `index_id` is random per lifetime of the source's index (a wiped database gets a new one); a
    receiver that sees a new index_id forgets what it knew and starts again from seq 0."""

    folder: str
    index_id: int
    prev_seq: int
    seq: int
    entries: tuple[FileEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "index_id": self.index_id,
            "prev_seq": self.prev_seq,
            "seq": self.seq,
            "entries": [e.to_dict() for e in self.entries],
        }

    def to_bytes(self) -> bytes:
        data = codec.encode(self.to_dict())
        if len(data) > MAX_CHUNK_BYTES:
            raise ValueError(f"index chunk is {len(data)} bytes, more than {MAX_CHUNK_BYTES}; split it with build_chunks")
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexChunk:
        if len(data) > MAX_CHUNK_BYTES:
            raise DecodeError(f"index chunk: {len(data)} bytes is more than {MAX_CHUNK_BYTES}")
        return cls.from_dict(codec.decode_map(data, "index chunk"))

    @classmethod
    def from_dict(cls, raw: object) -> IndexChunk:
        f = Fields(raw, "index chunk")
        folder = check_folder_id(f.text("folder", max_len=64), "index chunk folder")
        f.what = f"index chunk of {folder}"
        index_id = _int_range(f.integer("index_id"), 1, MAX_ID, f"{f.what}: index_id")
        prev_seq = _int_range(f.integer("prev_seq"), 0, MAX_SEQ - 1, f"{f.what}: prev_seq")
        seq = _int_range(f.integer("seq"), prev_seq + 1, MAX_SEQ, f"{f.what}: seq")
        entries = tuple(FileEntry.from_dict(e) for e in f.items("entries", max_items=MAX_CHUNK_ENTRIES))
        seen: set[str] = set()
        for e in entries:
            if not prev_seq < e.seq <= seq:
                raise DecodeError(f"{f.what}: entry {e.name!r} has seq {e.seq} outside ({prev_seq}, {seq}]")
            if e.name in seen:
                raise DecodeError(f"{f.what}: entry {e.name!r} appears twice")
            seen.add(e.name)
        return cls(folder, index_id, prev_seq, seq, entries)


_CHUNK_OVERHEAD = 128  # the map around the entries: folder id, index_id, seqs, array header


def build_chunks(
    folder: str, index_id: int, prev_seq: int, entries: Iterable[FileEntry], max_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[IndexChunk]:
    """Split entries (ascending seq, all > prev_seq) into chunks of at most `max_bytes` encoded.

    Consecutive chunks chain: each one's prev_seq is the previous one's seq."""
    batch: list[FileEntry] = []
    size = _CHUNK_OVERHEAD
    for entry in entries:
        n = encoded_entry_size(entry)
        if batch and (size + n > max_bytes or len(batch) >= MAX_CHUNK_ENTRIES):
            yield IndexChunk(folder, index_id, prev_seq, batch[-1].seq, tuple(batch))
            prev_seq = batch[-1].seq
            batch, size = [], _CHUNK_OVERHEAD
        batch.append(entry)
        size += n
    if batch:
        yield IndexChunk(folder, index_id, prev_seq, batch[-1].seq, tuple(batch))
