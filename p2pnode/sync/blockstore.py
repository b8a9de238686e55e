"""Blocks by hash from this node's own files: what a node serves when a peer asks for a block.

The block lookup in sync.db says which complete files hold a block with that hash (a source's
folder, a receiver's applied files, deploy artifacts under a pseudo-folder). The file is opened
under its folder's root without following any symlink, the block read and checked against its
hash: a file that changed since it was registered is skipped, never served. What is returned is a
`VerifiedBlock`, so the block exchange does not hash it a second time.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3

import trio

from ..errors import DecodeError
from ..platform.blocks import VerifiedBlock
from ..platform.db import Database
from .index_db import BlockLocation, IndexRepo
from .localfs import SafeRoot, UnsafePath, read_exact

READ_WITH_LOOKUP = 128 * 1024  # blocks up to this size are read on the database thread, with their lookup


def read_verified(candidates: list[tuple[BlockLocation, str | None]], block_hash: bytes, *,
                  temp: bool = False) -> VerifiedBlock | None:
    """The first candidate whose bytes hash to `block_hash` (`temp`: the names are temporary files
    of downloads in progress). Runs on a worker thread."""
    for loc, root_path in candidates:
        if not root_path:
            continue
        try:
            root = SafeRoot(root_path)
            try:
                fd = root.open_file(loc.name, temp=temp)
            finally:
                root.close()
        except (UnsafePath, DecodeError, OSError):
            continue
        try:
            data = read_exact(fd, loc.size, loc.offset)
        except OSError:
            continue
        finally:
            os.close(fd)
        if len(data) == loc.size and hashlib.sha256(data).digest() == block_hash:
            return VerifiedBlock(data, block_hash)
    return None


async def read_block(db: Database, repo: IndexRepo, block_hash: bytes) -> VerifiedBlock | None:
    """The block with this hash from any complete file this node holds, verified; None if it has none.

    A small block is read right where its location is looked up, on the database's thread: one
    trip between threads instead of two per block, which is most of what serving a small file
    costs (benchmarks/sync.py). Larger ones are read and hashed on a worker thread of their own,
    leaving the database to others meanwhile."""

    def lookup(conn: sqlite3.Connection) -> VerifiedBlock | list[tuple[BlockLocation, str | None]] | None:
        found = [(loc, repo.root(conn, loc.folder)) for loc in repo.locate(conn, block_hash)]
        if found and found[0][0].size <= READ_WITH_LOOKUP:
            return read_verified(found, block_hash)
        return found

    found = await db.read(lookup)
    if not isinstance(found, list):
        return found
    if not found:
        return None
    return await trio.to_thread.run_sync(read_verified, found, block_hash)


async def read_blocks(db: Database, repo: IndexRepo, digests: list[bytes]) -> dict[bytes, VerifiedBlock]:
    """Several blocks at once (a peer's batch of small blocks): one trip to the database thread
    looks them all up and reads the small ones there; larger ones are read on a worker thread."""

    def lookup(conn: sqlite3.Connection) -> tuple[dict[bytes, VerifiedBlock], dict[bytes, list[tuple[BlockLocation, str | None]]]]:
        small: dict[bytes, VerifiedBlock] = {}
        large: dict[bytes, list[tuple[BlockLocation, str | None]]] = {}
        roots: dict[str, str | None] = {}
        for digest in digests:
            found = []
            for loc in repo.locate(conn, digest):
                if loc.folder not in roots:
                    roots[loc.folder] = repo.root(conn, loc.folder)
                found.append((loc, roots[loc.folder]))
            if not found:
                continue
            if found[0][0].size <= READ_WITH_LOOKUP:
                block = read_verified(found, digest)
                if block is not None:
                    small[digest] = block
            else:
                large[digest] = found
        return small, large

    out, large = await db.read(lookup)
    for digest, found in large.items():
        block = await trio.to_thread.run_sync(read_verified, found, digest)
        if block is not None:
            out[digest] = block
    return out
