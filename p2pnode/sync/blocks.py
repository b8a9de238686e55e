"""Fixed-size blocks and their SHA-256 hashes, computed off the trio thread.

Block size (the seed's rule, after Syncthing's): start at 128 KiB and double while the file would
have more than 256 blocks, up to 4 MiB; files larger than 1 GiB simply get more 4 MiB blocks. A
file's block list is the concatenation of the 32-byte digests of its blocks, in order.

Hashing reads with `os.preadv` into one preallocated buffer per worker and hashes a memoryview,
so hashlib releases the GIL while it works (it does for buffers over 2 KiB). A file is hashed
through one open descriptor and its `fstat` is compared before and after: if size, mtime, ctime
or inode moved, the file changed under us and the result is thrown away (`Torn`), never indexed.
The stat check alone is not enough: a write updates ctime when it starts, so a write already under
way when we start reading (its thread preempted mid-copy on a busy machine) can tear a read with no
timestamp moving; measured here, a 4 MiB file rewritten in a loop slipped through about 1 in 300
reads with a 10 ms window. So, as git does with its "racy" entries, a file whose ctime is within
RACY_NS (0.5 s) of the read is hashed again once it has been quiet that long.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import attrs
import trio

KiB = 1024
MiB = 1024 * KiB
MIN_BLOCK = 128 * KiB
MAX_BLOCK = 4 * MiB
TARGET_BLOCKS = 256
HASH_LEN = 32
MAX_FILE_BLOCKS = 16_384  # 64 GiB at 4 MiB; keeps one entry's hash list at 512 KiB, inside an index chunk
MAX_FILE_SIZE = MAX_FILE_BLOCKS * MAX_BLOCK
RACY_NS = 500_000_000
SMALL_FILE = 256 * KiB  # files up to this size are hashed several to a thread call
BATCH_BYTES = 8 * MiB
BATCH_FILES = 64


def block_size_for(size: int) -> int:
    """The block size for a file of `size` bytes (128 KiB doubling to 4 MiB, ~256 blocks a file)."""
    bs = MIN_BLOCK
    while bs < MAX_BLOCK and size > bs * TARGET_BLOCKS:
        bs *= 2
    return bs


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def block_span(index: int, size: int, block_size: int) -> tuple[int, int]:
    """(offset, length) of block `index` in a file of `size` bytes."""
    offset = index * block_size
    return offset, min(block_size, size - offset)


def split_hashes(blocks: bytes) -> list[bytes]:
    return [blocks[i : i + HASH_LEN] for i in range(0, len(blocks), HASH_LEN)]


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


_zero_cache: dict[int, bytes] = {}


def zero_hash(length: int) -> bytes:
    """The hash of `length` zero bytes: such blocks (sparse regions) need neither a fetch nor a write."""
    h = _zero_cache.get(length)
    if h is None:
        h = _zero_cache[length] = digest(bytes(length))
    return h


class Torn(Exception):
    """The file changed (or may have changed) while it was hashed: its hashes may describe no real version of it."""


class StatSig(NamedTuple):
    """What the scanner compares to decide that a file is unchanged without reading it.
    `mode` is the permission bits; `size` is 0 for anything but a regular file. A tuple: a rescan
    builds and compares one per name in the folder."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> StatSig:
        mode = st.st_mode
        return cls(st.st_size if stat.S_ISREG(mode) else 0, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, mode & 0o7777)


@attrs.frozen
class Hashed:
    """A consistently hashed regular file: its blocks and the stat it had throughout."""

    name: str
    sig: StatSig
    uid: int
    gid: int
    block_size: int
    blocks: bytes


@attrs.frozen
class HashJob:
    """Hash `path` (absolute) unless it is no longer a regular file."""

    name: str
    path: str


@attrs.frozen
class HashFailure:
    name: str
    reason: str
    vanished: bool = False  # ENOENT: the file is gone, which is a deletion rather than an error
    racy: bool = False  # it changed (or may have) while read: hash it again a moment later


HashOutcome = Hashed | HashFailure


def hash_fd(fd: int, buf: bytearray, name: str = "") -> Hashed:
    """Hash an open regular file. Raises Torn if it changed while being read."""
    before = os.fstat(fd)
    size = before.st_size
    if size > MAX_FILE_SIZE:
        raise ValueError(f"file is {size} bytes, more than the {MAX_FILE_SIZE} bytes sync supports")
    bs = block_size_for(size)
    t_start = time.time_ns()
    view = memoryview(buf)
    out = bytearray()
    offset = 0
    while offset < size:
        want = min(bs, size - offset)
        got = 0
        while got < want:
            n = os.preadv(fd, [view[got:want]], offset + got)
            if n == 0:  # truncated under us
                raise Torn("file shrank while it was read")
            got += n
        out += hashlib.sha256(view[:want]).digest()
        offset += want
    if os.pread(fd, 1, size):  # grew under us
        raise Torn("file grew while it was read")
    after = os.fstat(fd)
    if StatSig.of(before) != StatSig.of(after):
        raise Torn("file changed while it was read")
    if t_start - RACY_NS <= after.st_ctime_ns <= time.time_ns() + RACY_NS:
        raise Torn("file changed less than 0.5 s before or while it was read")
    return Hashed(name, StatSig.of(after), after.st_uid, after.st_gid, bs, bytes(out))


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)


def open_for_read(path: str) -> int:
    """Open without following a final symlink; O_NOATIME when we are allowed to (our own files, or root)."""
    try:
        return os.open(path, _OPEN_FLAGS)
    except PermissionError:
        if _OPEN_FLAGS & getattr(os, "O_NOATIME", 0):  # EPERM for files we do not own
            return os.open(path, _OPEN_FLAGS & ~os.O_NOATIME)
        raise


def hash_path(job: HashJob, buf: bytearray) -> HashOutcome:
    """Hash one file (one attempt; the caller retries a racy one after a pause). Runs on a worker thread."""
    try:
        fd = open_for_read(job.path)
    except FileNotFoundError:
        return HashFailure(job.name, "vanished before it could be read", vanished=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return HashFailure(job.name, "became a symlink while being scanned; rescanned next time")
        return HashFailure(job.name, f"cannot open: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return HashFailure(job.name, "is no longer a regular file; rescanned next time")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return hash_fd(fd, buf, job.name)
    except Torn as exc:
        return HashFailure(job.name, str(exc), racy=True)
    except ValueError as exc:
        return HashFailure(job.name, str(exc))
    except OSError as exc:
        return HashFailure(job.name, f"cannot read: {exc.strerror}")
    finally:
        os.close(fd)


def _batches(jobs: Sequence[tuple[HashJob, int]]) -> list[list[HashJob]]:
    """Group small files so one thread call hashes many; large files go one per call."""
    out: list[list[HashJob]] = []
    cur: list[HashJob] = []
    cur_bytes = 0
    for job, size in jobs:
        if size > SMALL_FILE:
            out.append([job])
            continue
        cur.append(job)
        cur_bytes += size
        if cur_bytes >= BATCH_BYTES or len(cur) >= BATCH_FILES:
            out.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        out.append(cur)
    return out


class Hasher:
    """Hashes files on `workers` threads at once (each with its own 4 MiB buffer); a file is one
    job, small files several to a job.

    benchmarks/sync.py on this 2-core VM (shared, so noisy): a 383 MiB tree (one 256 MiB file,
    4,000 small ones) scans cold at ~320 MiB/s with one worker and ~430-440 with two to four (reads
    overlap); warm, one worker already reaches 700 MiB/s and more do not help (the large file is
    one job). Two is the default. Subclass and override `hash_one` to observe or interfere with
    each file (tests do, to change a file mid-scan)."""

    def __init__(self, workers: int = 2):
        if workers < 1:
            raise ValueError("need at least one hash worker")
        self.workers = workers
        self.bytes_hashed = 0
        self.files_hashed = 0

    def hash_one(self, job: HashJob, buf: bytearray) -> HashOutcome:
        return hash_path(job, buf)

    def _hash_batch(self, batch: list[HashJob], buf: bytearray) -> list[HashOutcome]:
        return [self.hash_one(j, buf) for j in batch]

    async def hash_many(self, jobs: Sequence[tuple[HashJob, int]], on_result: Callable[[HashOutcome], None]) -> None:
        """Hash every (job, expected size); `on_result` is called on the trio thread as each finishes."""
        pending = iter(_batches(jobs))

        async def worker() -> None:
            buf = bytearray(MAX_BLOCK)
            for batch in pending:  # the workers share one iterator: each takes the next batch
                results = await trio.to_thread.run_sync(self._hash_batch, batch, buf)
                for r in results:
                    if isinstance(r, Hashed):
                        self.bytes_hashed += r.sig.size
                        self.files_hashed += 1
                    on_result(r)

        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(worker)
