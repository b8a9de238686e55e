"""Sync test kit: a sample tree with every kind of entry, and a source/receiver pair on one machine
(two sync.db, real directories, a local block provider that counts what it is asked for)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from p2pnode.identity import KeyPair
from p2pnode.sync.apply import ApplyReport, sync_folder
from p2pnode.sync.blockstore import read_block
from p2pnode.platform.db import Database
from p2pnode.sync.index_db import MIGRATIONS, IndexRepo
from p2pnode.sync.model import FileEntry, FolderConfig, IndexChunk, NodeTarget
from p2pnode.sync.scanner import Scanner, ScanReport

MiB = 1024 * 1024
T0 = 1_700_000_000_123_456_789  # a fixed mtime (ns) so trees are reproducible


def make_tree(root: Path, *, large: int = 32 * MiB) -> None:
    """Nested and empty directories, relative and dangling symlinks, a 0-byte file, a large random
    file, a sparse file, Unicode and space-containing names, executable bits, odd modes."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "a/b/c/deep.txt": b"deep\n",
        "a/one.txt": b"one\n" * 100,
        "zero": b"",
        "docs/résumé final.txt": "naïve café\n".encode(),
        "中文 目录/文件 名.txt": "你好\n".encode(),
        "with space/inner file": b"x" * 5000,
        "bin/run.sh": b"#!/bin/sh\necho hi\n",
        "secret.key": b"k" * 64,
        "medium.bin": os.urandom(700_000),
    }
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "bin/run.sh").chmod(0o755)
    (root / "secret.key").chmod(0o600)
    (root / "empty").mkdir()
    (root / "a/b/empty2").mkdir()
    (root / "a/link").symlink_to("b/c/deep.txt")
    (root / "dangling").symlink_to("does/not/exist")
    (root / "lib").symlink_to("a/b")
    with open(root / "big.bin", "wb") as f:
        left = large
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    with open(root / "sparse.img", "wb") as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB + 123)
        f.write(os.urandom(4096))
    stamp(root)


def write_at(path: str | Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def stamp(root: Path, t: int = T0) -> None:
    """Give every entry a distinct, fixed mtime (deepest first, so directories keep theirs)."""
    paths = sorted((p for p in root.rglob("*")), key=lambda p: -len(p.parts))
    for i, p in enumerate(paths):
        os.utime(p, ns=(t + i * 1000, t + i * 1000), follow_symlinks=False)


class CountingProvider:
    """The block source a receiver would use, served from the source's own index and files."""

    def __init__(self, pair: SyncPair):
        self.pair = pair
        self.calls: list[tuple[bytes, int]] = []

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.calls)

    async def __call__(self, block_hash: bytes, size: int) -> bytes:
        self.calls.append((block_hash, size))
        data = await read_block(self.pair.src_db, self.pair.src_repo, block_hash)
        if data is None:
            raise LookupError(f"the source has no block {block_hash.hex()[:16]}")
        return data


@attrs.define
class SyncPair:
    """A source and one receiver on this machine."""

    base: Path
    strategy: str = "mirror"
    config_options: dict = attrs.Factory(dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    src: Path = attrs.field(init=False)
    dst: Path = attrs.field(init=False)
    src_db: Database = attrs.field(init=False)
    dst_db: Database = attrs.field(init=False)
    src_repo: IndexRepo = attrs.field(init=False, factory=IndexRepo)
    dst_repo: IndexRepo = attrs.field(init=False, factory=IndexRepo)
    receiver: KeyPair = attrs.field(init=False, factory=KeyPair.generate)
    source: KeyPair = attrs.field(init=False, factory=KeyPair.generate)
    folder: FolderConfig = attrs.field(init=False)
    scanner: Scanner = attrs.field(init=False)
    provider: CountingProvider = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.src = self.base / "src"
        self.dst = self.base / "dst"
        self.src.mkdir(parents=True, exist_ok=True)
        self.reconfigure()
        self.provider = CountingProvider(self)

    def reconfigure(
        self, *, strategy: str | None = None, include: tuple[str, ...] | None = None, exclude: tuple[str, ...] | None = None, **options: object
    ) -> None:
        """Change the folder config (as a new signed document would) for the next scan and apply."""
        self.strategy = strategy or self.strategy
        self.include = self.include if include is None else include
        self.exclude = self.exclude if exclude is None else exclude
        self.config_options.update(options)
        node = NodeTarget(self.receiver.peer_id, str(self.dst), self.strategy, self.include, self.exclude)
        self.folder = FolderConfig("app", self.source.peer_id, str(self.src), (node,), 1, **self.config_options)
        if hasattr(self, "scanner"):
            self.scanner.folder = self.folder

    async def open(self) -> SyncPair:
        self.src_db = await Database.open(self.base / "src.db", MIGRATIONS)
        self.dst_db = await Database.open(self.base / "dst.db", MIGRATIONS)
        self.scanner = Scanner(self.src_db, self.src_repo, self.folder)
        return self

    async def close(self) -> None:
        await self.src_db.close()
        await self.dst_db.close()

    async def index(self) -> dict[str, FileEntry]:
        """The source's index, name -> entry (tombstones included)."""
        entries = await self.src_db.read(lambda c: self.src_repo.entries_since(c, "app", 0, 1_000_000))
        return {e.name: e for e in entries}

    async def scan(self) -> ScanReport:
        return await self.scanner.full_scan()

    async def publish(self) -> int:
        """Move the source's new index entries to the receiver as encoded chunks; returns chunks sent."""
        held = await self.dst_db.read(lambda c: self.dst_repo.desired_index(c, "app"))
        index_id, _ = await self.src_db.read(lambda c: self.src_repo.source_index(c, "app"))
        after = held[1] if held and held[0] == index_id else 0
        chunks = await self.src_db.read(lambda c: self.src_repo.unsigned_chunks(c, "app", after))
        for ch in chunks:
            decoded = IndexChunk.from_bytes(ch.to_bytes())
            result = await self.dst_db.write(lambda c, d=decoded: self.dst_repo.accept_chunk(c, d))
            assert result.status in ("applied", "reset"), result
        return len(chunks)

    async def sync(self, **options: object) -> ApplyReport:
        await self.scan()
        await self.publish()
        return await self.apply(**options)

    async def apply(self, **options: object) -> ApplyReport:
        return await sync_folder(
            self.dst_db,
            self.dst_repo,
            self.folder,
            self.folder.nodes[0],
            self.provider,
            allowed_roots=[str(self.base)],
            **options,  # type: ignore[arg-type]
        )


@asynccontextmanager
async def open_pair(base: Path) -> AsyncIterator[SyncPair]:
    pair = await SyncPair(base).open()
    try:
        yield pair
    finally:
        await pair.close()


def folder_from_file(path: str) -> FolderConfig:
    from p2pnode import codec

    return FolderConfig.from_dict(codec.decode(Path(path).read_bytes()))


async def _child(base: str, config_file: str, stop_after: int) -> None:
    """Run one apply in this process, announcing every fetched block on stdout; after `stop_after`
    blocks the provider hangs (the parent kills us with SIGKILL while we wait)."""
    import sys

    folder = folder_from_file(config_file)
    src_db = await Database.open(Path(base) / "src.db", MIGRATIONS)
    dst_db = await Database.open(Path(base) / "dst.db", MIGRATIONS)
    src_repo, dst_repo = IndexRepo(), IndexRepo()
    served = done = 0

    async def fetch(block_hash: bytes, size: int) -> bytes:
        nonlocal served, done
        if served >= stop_after:
            await trio.sleep_forever()
        served += 1
        data = await read_block(src_db, src_repo, block_hash)
        assert data is not None
        done += 1
        sys.stdout.write(f"fetched {done}\n")
        sys.stdout.flush()
        return data

    await sync_folder(dst_db, dst_repo, folder, folder.nodes[0], fetch, allowed_roots=[base])


if __name__ == "__main__":
    import sys

    import trio

    trio.run(_child, sys.argv[1], sys.argv[2], int(sys.argv[3]))
