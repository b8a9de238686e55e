"""The receiver's writer: carries out a Plan under `target_path`, safe against hostile names and races.

Order: directories (parents first, created 0700 so content can go in), files, symlinks,
metadata-only fixes, deletes (deepest first), then directory modes and mtimes (deepest first,
after their content). Every path is resolved through `localfs.SafeRoot` (component by component,
O_NOFOLLOW, dir_fd); after each write the path is walked again and a directory that was swapped
meanwhile is reported and what was written through it removed.

A file is built in `.p2psync.<name>.tmp` beside its final name: blocks of zeros are left as
holes, blocks this node already holds are copied (verified by hash), the rest come from the
caller's `fetch(hash, size)` — concurrently, bounded by `max_inflight_bytes` — and are verified
too. Then owner, mode, mtime, fsync, rename, and the directory is fsynced at the end.

Resume: for files of more than one block, the temp name and the set of blocks in it are kept in
`partials` (written every few MiB). After a crash, even `kill -9`, the next attempt reopens the
temp, checks each recorded block against its hash and fetches only the rest.

Disk full (checked with statvfs before a file, and ENOSPC while writing) raises DiskFull after
removing the temp file: no partial file is ever left under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import attrs
import trio

from ..errors import DecodeError, P2PNodeError
from ..logfmt import fmt
from ..platform.blocks import ByteBudget, is_verified
from ..platform.db import Database
from . import names
from .ignore import IgnoreRules, NodeFilter, read_ignore_file
from .index_db import Applied, AppliedState, BlockLocation, IndexRepo, Partial
from .localfs import SafeRoot, UnsafePath, read_exact, remove_at, temp_name
from .model import DIR, FILE, SYMLINK, FolderConfig, NodeTarget
from .planner import BlockPlan, Delete, FileWrite, LocalState, MakeDir, MakeSymlink, Plan, PlanOptions, SetMeta, plan

log = logging.getLogger("p2pnode.sync.apply")

Fetch = Callable[[bytes, int], Awaitable[bytes]]
T = TypeVar("T")


class ApplyObserver(Protocol):
    """What the sync service learns while a plan is applied (progress, and blocks it can already
    serve to other receivers from the temporary file). Called on the trio thread."""

    def planned(self, p: Plan) -> None: ...
    def blocks_written(self, name: str, temp: str, blocks: Sequence[BlockPlan], fetched: bool) -> None: ...
    def file_done(self, name: str, temp: str, size: int) -> None: ...

MAX_ERRORS = 100
MAX_LOGGED = 50
RECORD_BATCH = 256
# Files written are recorded at least this often (seconds): only then can this node serve their
# blocks to the other receivers (the temporary file it announced them from is renamed by then).
RECORD_INTERVAL = 0.25
PERSIST_EVERY = 4 * 1024 * 1024  # bytes written to a temp file between saves of its resume state
FREE_SPACE_MARGIN = 1024 * 1024
# Files written at once. Small files are bound by round trips (block request, worker threads,
# fsync), not bytes: with 4 at once a link with 10 ms of round trip could not pass 200 files/s.
# On this 2-core VM the CPU is the limit and 4, 16 or 32 make no difference (benchmarks/sync.py).
FILE_WORKERS = 16


class ApplyError(P2PNodeError):
    pass


class NotAllowed(ApplyError):
    """The folder's target_path is outside every directory this node's config allows."""


class DiskFull(ApplyError):
    """No space left for a file; its temporary file has been removed."""


class BlockMismatch(ApplyError):
    """A fetched block does not hash to what the index says."""


class FetchFailed(ApplyError):
    """The block source could not provide a block."""


def check_allowed(folder_id: str, target_path: str, allowed_roots: Sequence[str], *, what: str = "target_path") -> str:
    """The real path of target_path if it lies under one of `allowed_roots`; NotAllowed otherwise."""
    real = os.path.realpath(target_path)
    for root in allowed_roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip("/") + "/"):
            return real
    shown = ", ".join(allowed_roots) if allowed_roots else "none configured"
    raise NotAllowed(
        f"folder {folder_id}: {what} {target_path} is not under any of this node's sync.allowed_roots ({shown}); "
        f"this node will not {'read' if what == 'source_path' else 'write'} there. Add a parent directory to "
        f"sync.allowed_roots in this node's config, or have an admin change the folder's {what}"
    )


@attrs.define
class ApplyReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    meta: int = 0
    deleted: int = 0
    adopted: int = 0  # existing files found identical: only metadata set
    local_edits_reverted: int = 0
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    blocks_copied: int = 0
    bytes_copied: int = 0
    blocks_resumed: int = 0
    bytes_resumed: int = 0
    blocks_zero: int = 0
    errors: list[tuple[str, str]] = attrs.Factory(list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def error(self, name: str, reason: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append((name, reason))
        if self.error_count <= MAX_LOGGED:
            log.warning(fmt("sync_apply_error", name=name, reason=reason))

    def merge(self, other: ApplyReport) -> None:
        for field in attrs.fields(ApplyReport):
            if field.name == "errors":
                self.errors.extend(other.errors[: MAX_ERRORS - len(self.errors)])
            else:
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@attrs.define
class _OpenFile:
    dir_name: str
    leaf: str
    tmp: str
    dir_fd: int
    fd: int
    satisfied: set[int]
    blocks: tuple[BlockPlan, ...]
    unsaved: int = 0
    adopt: bool = False
    error: Exception | None = None  # the first failure among its concurrent block fetches

    @property
    def tmp_rel(self) -> str:
        """The temp file's folder-relative name."""
        return f"{self.dir_name}/{self.tmp}" if self.dir_name else self.tmp


def _split(name: str) -> tuple[str, str]:
    names.validate(name)  # defence in depth: the planner's input came from a verified index, check again
    d, _, leaf = name.rpartition("/")
    return d, leaf


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _is_enospc(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Applier:
    """Applies plans to one folder's target directory."""

    def __init__(
        self,
        db: Database,
        repo: IndexRepo,
        folder: str,
        target: str,
        fetch: Fetch,
        *,
        max_inflight_bytes: int = 32 * 1024 * 1024,
        file_workers: int = FILE_WORKERS,
        fsync: bool = True,
        observer: ApplyObserver | None = None,
        rotate: float = 0.0,
    ):
        self.db = db
        self.repo = repo
        self.folder = folder
        self.target = target
        self.fetch = fetch
        self.max_inflight_bytes = max_inflight_bytes
        self.file_workers = file_workers
        self.fsync = fsync
        self.observer = observer
        self.rotate = rotate  # start this fraction into the list of files and of each file's blocks
        self._root: SafeRoot | None = None
        self._records: list[Applied] = []
        self._gone: list[str] = []
        self._synced_dirs: set[str] = set()
        self._other_roots: dict[str, str | None] = {}
        self._fatal: DiskFull | None = None
        self._flushed_at = 0.0

    @property
    def root(self) -> SafeRoot:
        assert self._root is not None, "Applier.apply is not running"
        return self._root

    async def apply(self, p: Plan) -> ApplyReport:
        report = ApplyReport()
        self._root = await trio.to_thread.run_sync(SafeRoot, self.target)
        self._budget = ByteBudget(self.max_inflight_bytes)
        folders = {loc.folder for f in p.files for _, locs in f.copies for loc in locs if loc.folder != self.folder}
        if folders:
            self._other_roots = await self.db.read(lambda c: {f: self.repo.root(c, f) for f in folders})
        for s in p.skipped:
            report.error(s.name, s.reason)
        try:
            await trio.to_thread.run_sync(self._make_dirs, p.dirs, report)
            # Receivers of one folder start at different places (rotate), so that early on they
            # fetch different blocks from the source and then fetch the rest from each other.
            pending = iter(_rotated(p.files, self.rotate))
            async with trio.open_nursery() as nursery:
                for _ in range(self.file_workers):
                    nursery.start_soon(self._file_worker, pending, report)
            if self._fatal is not None:
                raise self._fatal
            await trio.to_thread.run_sync(self._make_symlinks, p.symlinks, report)
            await trio.to_thread.run_sync(self._set_metas, p.meta, report)
            await trio.to_thread.run_sync(self._deletes, p.deletes, report)
            await trio.to_thread.run_sync(self._set_metas, p.dir_meta, report)
            if self.fsync:
                await trio.to_thread.run_sync(self._fsync_dirs)
        finally:
            with trio.CancelScope(shield=True):
                await self._flush_records(force=True)
                await trio.to_thread.run_sync(self.root.close)
        log.info(
            fmt(
                "sync_applied",
                folder=self.folder,
                files=report.files,
                dirs=report.dirs,
                symlinks=report.symlinks,
                meta=report.meta,
                deleted=report.deleted,
                fetched_bytes=report.bytes_fetched,
                copied_bytes=report.bytes_copied,
                resumed_bytes=report.bytes_resumed,
                reverted=report.local_edits_reverted or None,
                errors=report.error_count,
            )
        )
        return report

    # -- records --------------------------------------------------------------------------------------
    async def _record(self, a: Applied) -> None:
        self._records.append(a)
        await self._flush_records()

    async def _flush_records(self, force: bool = False) -> None:
        if not self._records and not self._gone:
            return
        if not force and len(self._records) + len(self._gone) < RECORD_BATCH and trio.current_time() < self._flushed_at + RECORD_INTERVAL:
            return
        self._flushed_at = trio.current_time()
        records, self._records = self._records, []
        gone, self._gone = self._gone, []

        def write(conn: sqlite3.Connection) -> None:
            self.repo.forget_applied(conn, self.folder, gone)
            self.repo.record_applied(conn, self.folder, records)

        await self.db.write(write)

    # -- directories, symlinks, metadata, deletes (worker thread) ------------------------------------
    def _each(self, items: Sequence[T], name_of: Callable[[T], str], act: Callable[[T, str, int, str], None], report: ApplyReport) -> None:
        """act(item, dir_name, dir_fd, leaf) in each item's directory, reached safely; a failure is that item's error."""
        for item in items:
            name = name_of(item)
            try:
                dir_name, leaf = _split(name)
                fd = self.root.open_dir(dir_name)
                try:
                    act(item, dir_name, fd, leaf)
                finally:
                    os.close(fd)
            except (UnsafePath, DecodeError, OSError) as exc:
                report.error(name, _reason(exc))

    def _make_dirs(self, dirs: Sequence[MakeDir], report: ApplyReport) -> None:
        def make(d: MakeDir, dir_name: str, fd: int, leaf: str) -> None:
            if d.replace is not None:
                remove_at(fd, leaf)
            try:
                os.mkdir(leaf, 0o700, dir_fd=fd)  # its mode is set after its content (dir_meta)
            except FileExistsError:
                st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise UnsafePath(f"{d.entry.name}: something that is not a directory appeared here") from None
            self._synced_dirs.add(dir_name)
            report.dirs += 1

        self._each(dirs, lambda d: d.entry.name, make, report)

    def _make_symlinks(self, links: Sequence[MakeSymlink], report: ApplyReport) -> None:
        def make(s: MakeSymlink, dir_name: str, fd: int, leaf: str) -> None:
            e = s.entry
            tmp = temp_name(leaf)
            remove_at(fd, tmp)
            if s.replace == DIR:
                remove_at(fd, leaf)
            os.symlink(e.target, tmp, dir_fd=fd)
            if s.owner is not None:
                os.chown(tmp, *s.owner, dir_fd=fd, follow_symlinks=False)
            os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns), dir_fd=fd, follow_symlinks=False)
            os.rename(tmp, leaf, src_dir_fd=fd, dst_dir_fd=fd)
            st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
            self._check_still_there(dir_name, fd, leaf, e.name)
            self._records.append(Applied(e.name, e, 0, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            self._synced_dirs.add(dir_name)
            report.symlinks += 1
            if s.local_edit:
                report.local_edits_reverted += 1
                log.info(fmt("sync_local_edit_reverted", folder=self.folder, name=e.name))

        self._each(links, lambda s: s.entry.name, make, report)

    def _set_metas(self, metas: Sequence[SetMeta], report: ApplyReport) -> None:
        def set_meta(m: SetMeta, dir_name: str, fd: int, leaf: str) -> None:
            e = m.entry
            if e.type == SYMLINK:
                if m.owner is not None:
                    os.chown(leaf, *m.owner, dir_fd=fd, follow_symlinks=False)
                os.utime(leaf, ns=(e.mtime_ns, e.mtime_ns), dir_fd=fd, follow_symlinks=False)
                st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
            else:
                st = self._meta_nofollow(fd, leaf, e.type, m.mode, m.owner, e.mtime_ns)
            self._records.append(Applied(e.name, e, st.st_size if e.type == FILE else 0, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            report.meta += 1

        self._each(metas, lambda m: m.entry.name, set_meta, report)

    def _deletes(self, deletes: Sequence[Delete], report: ApplyReport) -> None:
        def delete(d: Delete, dir_name: str, fd: int, leaf: str) -> None:
            try:
                if d.type == DIR:
                    try:
                        os.rmdir(leaf, dir_fd=fd)
                    except OSError as exc:
                        if exc.errno == errno.ENOTEMPTY:
                            return  # it still holds ignored or excluded names, which mirror keeps
                        raise
                else:
                    if stat.S_ISDIR(os.stat(leaf, dir_fd=fd, follow_symlinks=False).st_mode):
                        return  # became a directory since the plan; the next pass decides
                    os.unlink(leaf, dir_fd=fd)
            except FileNotFoundError:
                self._gone.append(d.name)
                return
            self._gone.append(d.name)
            self._synced_dirs.add(dir_name)
            report.deleted += 1

        self._each(deletes, lambda d: d.name, delete, report)

    def _fsync_dirs(self) -> None:
        for d in sorted(self._synced_dirs):
            try:
                fd = self.root.open_dir(d)
            except (UnsafePath, OSError):
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _check_still_there(self, dir_name: str, dir_fd: int, leaf: str, name: str) -> None:
        if not self.root.still_there(dir_name, dir_fd):
            try:
                remove_at(dir_fd, leaf)
            except OSError:
                pass
            raise UnsafePath(f"{name}: directory {dir_name or '/'} was replaced while it was written; what was written there is removed")

    @staticmethod
    def _meta_nofollow(dir_fd: int, leaf: str, kind: str, mode: int | None, owner: tuple[int, int] | None, mtime_ns: int) -> os.stat_result:
        """chown/chmod/utime the inode at `leaf` without following a symlink there (via an O_PATH fd)."""
        pfd = os.open(leaf, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(pfd)
            have = DIR if stat.S_ISDIR(st.st_mode) else FILE if stat.S_ISREG(st.st_mode) else None
            if have != kind:
                raise UnsafePath(f"{leaf}: expected a {kind}, found something else; not touched")
            proc = f"/proc/self/fd/{pfd}"  # the inode we opened, whatever the name points at now
            if owner is not None:
                os.chown(proc, *owner)
            if mode is not None:
                os.chmod(proc, mode)
            os.utime(proc, ns=(mtime_ns, mtime_ns))
            return os.fstat(pfd)
        finally:
            os.close(pfd)

    # -- files ----------------------------------------------------------------------------------------
    async def _file_worker(self, pending: Iterable[FileWrite], report: ApplyReport) -> None:
        for fw in pending:  # the workers share one iterator
            if self._fatal is not None:
                return
            try:
                await self._write_file(fw, report)
            except DiskFull as exc:
                self._fatal = self._fatal or exc
                return
            except (UnsafePath, BlockMismatch, FetchFailed, DecodeError, OSError) as exc:
                report.error(fw.entry.name, _reason(exc))

    async def _write_file(self, fw: FileWrite, report: ApplyReport) -> None:
        e = fw.entry
        partial = None
        if e.block_total > 1:
            partial = await self.db.read(lambda c: self.repo.partial(c, self.folder, e.name))
        op, copy_error = await trio.to_thread.run_sync(self._prepare, fw, partial, report)
        finished = False
        try:
            if copy_error is not None:
                raise copy_error
            applied = None
            if not op.adopt:
                if self.observer is not None:
                    local = [b for b in op.blocks if b.index in op.satisfied and not b.zero]
                    self.observer.blocks_written(e.name, op.tmp_rel, local, False)
                todo = [b for b in op.blocks if b.index not in op.satisfied]
                if len(todo) == 1 and e.block_total == 1:
                    applied = await self._fetch_and_finish(fw, op, todo[0], report)
                else:
                    await self._fetch_rest(fw, op, report)
            if applied is None:
                applied = await trio.to_thread.run_sync(self._finish, fw, op)
            finished = True
            if self.observer is not None:
                self.observer.file_done(e.name, op.tmp_rel, e.size)
        except DiskFull:
            await trio.to_thread.run_sync(self._discard, op)
            with trio.CancelScope(shield=True):
                await self.db.write(lambda c: self.repo.drop_partial(c, self.folder, e.name))
            raise
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, op)
                if e.block_total > 1 and op.satisfied:
                    await self._save_partial(fw, op)
            raise
        if finished:
            if partial is not None or e.block_total > 1:
                await self.db.write(lambda c: self.repo.drop_partial(c, self.folder, e.name))
            await self._record(applied)
            if op.adopt:
                report.adopted += 1
            else:
                report.files += 1
            if fw.local_edit:
                report.local_edits_reverted += 1
                log.info(fmt("sync_local_edit_reverted", folder=self.folder, name=e.name))

    async def _save_partial(self, fw: FileWrite, op: _OpenFile) -> None:
        e = fw.entry
        p = Partial(op.tmp_rel, e.size, e.block_size, frozenset(op.satisfied))
        op.unsaved = 0  # at the snapshot: blocks written while it is stored count towards the next save
        await self.db.write(lambda c: self.repo.put_partial(c, self.folder, e.name, p))

    def _prepare(self, fw: FileWrite, partial: Partial | None, report: ApplyReport) -> tuple[_OpenFile, BaseException | None]:
        """Open the temp file and fill what this node holds locally, in one trip to a worker thread;
        a failure while copying is returned with the open file, for the caller to clean up."""
        op = self._open_temp(fw, partial, report)
        if op.adopt:
            return op, None
        try:
            self._copy_local(fw, op, report)
        except Exception as exc:
            return op, exc
        return op, None

    def _open_temp(self, fw: FileWrite, partial: Partial | None, report: ApplyReport) -> _OpenFile:
        """Open the directory, clear what is in the way, and open (resume) or create the temp file."""
        e = fw.entry
        blocks = fw.block_plans()
        dir_name, leaf = _split(e.name)
        dir_fd = self.root.open_dir(dir_name)
        try:
            if fw.replace is not None:
                remove_at(dir_fd, leaf)
            if fw.existing and fw.replace is None and self._identical(dir_fd, leaf, e.size, blocks):
                pfd = os.open(leaf, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                return _OpenFile(dir_name, leaf, "", dir_fd, pfd, set(range(e.block_total)), blocks, adopt=True)
            tmp = temp_name(leaf)
            satisfied: set[int] = set()
            fd = -1
            if partial is not None and partial.size == e.size and partial.block_size == e.block_size:
                try:
                    fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                except OSError:
                    fd = -1
                if fd >= 0:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        os.close(fd)
                        fd = -1
                    else:
                        for i in sorted(partial.done):
                            if i >= e.block_total:
                                continue
                            b = blocks[i]
                            if hashlib.sha256(read_exact(fd, b.size, b.offset)).digest() == b.hash:
                                satisfied.add(i)
                                if not b.zero:
                                    report.blocks_resumed += 1
                                    report.bytes_resumed += b.size
            if fd < 0:
                remove_at(dir_fd, tmp)
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            op = _OpenFile(dir_name, leaf, tmp, dir_fd, fd, satisfied, blocks)
            try:
                os.ftruncate(fd, e.size)  # the rest reads as zeros: blocks of zeros are done already
                for b in blocks:
                    if b.zero and b.index not in satisfied:
                        satisfied.add(b.index)
                        report.blocks_zero += 1
                need = sum(b.size for b in blocks if b.index not in satisfied)
                vfs = os.fstatvfs(fd)
                free = vfs.f_bavail * vfs.f_frsize
                if need + FREE_SPACE_MARGIN > free:
                    raise DiskFull(
                        f"{e.name}: not enough space left on device: needs {need} more bytes, {free} are free under "
                        f"{self.target}; nothing was written in its place"
                    )
            except OSError as exc:
                if _is_enospc(exc):
                    raise DiskFull(f"{e.name}: no space left on device under {self.target} ({exc.strerror})") from None
                raise
            except BaseException:
                os.close(fd)
                remove_at(dir_fd, tmp)
                raise
            return op
        except BaseException:
            os.close(dir_fd)
            raise

    def _identical(self, dir_fd: int, leaf: str, size: int, blocks: tuple[BlockPlan, ...]) -> bool:
        """Whether the file already at `leaf` has exactly the desired content (then only metadata is set)."""
        try:
            fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != size:
                return False
            return all(hashlib.sha256(read_exact(fd, b.size, b.offset)).digest() == b.hash for b in blocks)
        finally:
            os.close(fd)

    def _copy_local(self, fw: FileWrite, op: _OpenFile, report: ApplyReport) -> None:
        """Fill blocks from this node's own files: the old file at the same name, then any holder of the hash."""
        todo = [b for b in op.blocks if b.index not in op.satisfied]
        if not todo:
            return
        opened: dict[tuple[str, str], int] = {}

        def source(folder: str, name: str) -> int:
            key = (folder, name)
            if key not in opened:
                opened[key] = self._open_local(folder, name)
            return opened[key]

        try:
            for b in todo:
                candidates: list[BlockLocation] = []
                if fw.existing:
                    candidates.append(BlockLocation(self.folder, fw.entry.name, b.offset, b.size))
                candidates.extend(b.copy_from)
                for loc in candidates:
                    fd = source(loc.folder, loc.name)
                    if fd < 0:
                        continue
                    try:
                        data = read_exact(fd, b.size, loc.offset)
                    except OSError:
                        continue
                    if len(data) == b.size and hashlib.sha256(data).digest() == b.hash:
                        self._write_block(op, b, data)
                        report.blocks_copied += 1
                        report.bytes_copied += b.size
                        break
        finally:
            for fd in opened.values():
                if fd >= 0:
                    os.close(fd)

    def _open_local(self, folder: str, name: str) -> int:
        """A read descriptor for a file this node holds, or -1; never through a symlink."""
        try:
            if folder == self.folder:
                return self.root.open_file(name)
            root_path = self._other_roots.get(folder)
            if not root_path:
                return -1
            other = SafeRoot(root_path)
            try:
                return other.open_file(name)
            finally:
                other.close()
        except (UnsafePath, OSError, DecodeError):
            return -1

    def _write_block(self, op: _OpenFile, b: BlockPlan, data: bytes) -> None:
        try:
            _pwrite_all(op.fd, data, b.offset)
        except OSError as exc:
            if _is_enospc(exc):
                raise DiskFull(f"no space left on device under {self.target} ({exc.strerror}); the temporary file is removed") from None
            raise
        op.satisfied.add(b.index)
        op.unsaved += b.size

    async def _fetch_rest(self, fw: FileWrite, op: _OpenFile, report: ApplyReport) -> None:
        todo = [b for b in op.blocks if b.index not in op.satisfied]
        if not todo:
            return
        async with trio.open_nursery() as nursery:
            for b in _rotated(todo, self.rotate):
                if op.error is not None and not isinstance(op.error, FetchFailed):
                    break  # a block that could not be fetched does not stop the others: they are kept for the resume
                await self._budget.acquire(b.size)
                nursery.start_soon(self._fetch_one, fw, op, b, report)
        if op.error is not None:
            raise op.error

    async def _fetch_block(self, b: BlockPlan) -> bytes:
        try:
            return await self.fetch(b.hash, b.size)
        except trio.Cancelled:
            raise
        except Exception as exc:
            raise FetchFailed(f"block {b.index} ({b.hash.hex()[:16]}…): {exc}") from None

    def _verify_and_write(self, op: _OpenFile, b: BlockPlan, data: bytes) -> None:
        """On a worker thread. The block exchange hands over blocks it has verified (VerifiedBlock):
        those are not hashed a second time."""
        if len(data) != b.size or not (is_verified(data, b.hash) or hashlib.sha256(data).digest() == b.hash):
            raise BlockMismatch(f"block {b.index}: the data received does not match its hash {b.hash.hex()[:16]}…")
        self._write_block(op, b, data)

    async def _fetch_one(self, fw: FileWrite, op: _OpenFile, b: BlockPlan, report: ApplyReport) -> None:
        try:
            data = await self._fetch_block(b)
            await trio.to_thread.run_sync(self._verify_and_write, op, b, data)
            report.blocks_fetched += 1
            report.bytes_fetched += b.size
            if self.observer is not None:
                self.observer.blocks_written(fw.entry.name, op.tmp_rel, [b], True)
        except (ApplyError, OSError) as exc:
            op.error = op.error or exc  # the others go on: what they bring is kept for the resume
        finally:
            self._budget.release(b.size)
        if fw.entry.block_total > 1 and op.unsaved >= PERSIST_EVERY:
            await self._save_partial(fw, op)

    async def _fetch_and_finish(self, fw: FileWrite, op: _OpenFile, b: BlockPlan, report: ApplyReport) -> Applied:
        """A file of one block: fetch it, then write and finish the file in one trip to a worker
        thread (small files are most of a tree, and each trip costs as much as writing one)."""
        await self._budget.acquire(b.size)
        try:
            data = await self._fetch_block(b)

            def write_and_finish() -> Applied:
                self._verify_and_write(op, b, data)
                return self._finish(fw, op)

            applied = await trio.to_thread.run_sync(write_and_finish)
        finally:
            self._budget.release(b.size)
        report.blocks_fetched += 1
        report.bytes_fetched += b.size
        if self.observer is not None:
            self.observer.blocks_written(fw.entry.name, op.tmp_rel, [b], True)
        return applied

    def _finish(self, fw: FileWrite, op: _OpenFile) -> Applied:
        e = fw.entry
        try:
            if op.adopt:
                st = self._meta_nofollow(op.dir_fd, op.leaf, FILE, fw.mode, fw.owner, e.mtime_ns)
                return Applied(e.name, e, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            try:
                if fw.owner is not None:
                    os.fchown(op.fd, *fw.owner)  # before chmod: chown clears setuid/setgid
                os.fchmod(op.fd, fw.mode)
                os.utime(op.fd, ns=(e.mtime_ns, e.mtime_ns))
                if self.fsync:
                    os.fsync(op.fd)
            except OSError as exc:
                if _is_enospc(exc):
                    raise DiskFull(f"{e.name}: no space left on device under {self.target} ({exc.strerror})") from None
                raise
            os.rename(op.tmp, op.leaf, src_dir_fd=op.dir_fd, dst_dir_fd=op.dir_fd)
            st = os.fstat(op.fd)
            self._check_still_there(op.dir_name, op.dir_fd, op.leaf, e.name)
            self._synced_dirs.add(op.dir_name)
            return Applied(e.name, e, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        finally:
            self._close(op)

    @staticmethod
    def _close(op: _OpenFile) -> None:
        for attr in ("fd", "dir_fd"):
            fd = getattr(op, attr)
            if fd >= 0:
                os.close(fd)
                setattr(op, attr, -1)

    def _discard(self, op: _OpenFile) -> None:
        """Remove the temp file (disk full: keeping it would hold the space that is missing)."""
        try:
            if op.dir_fd >= 0 and op.tmp:
                remove_at(op.dir_fd, op.tmp)
        finally:
            self._close(op)


def _rotated(items: Sequence[T], fraction: float) -> list[T]:
    k = int(len(items) * fraction) % len(items) if items else 0
    return [*items[k:], *items[:k]]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)


# -- one pass over a folder ----------------------------------------------------------------------------


async def sync_folder(
    db: Database,
    repo: IndexRepo,
    folder: FolderConfig,
    node: NodeTarget,
    fetch: Fetch,
    *,
    allowed_roots: Sequence[str],
    as_root: bool | None = None,
    **applier_options: int | bool | float | ApplyObserver | None,
) -> ApplyReport:
    """Bring `node.target_path` to the desired state this node holds for `folder`.

    Reads the local tree, plans, applies; if the pass wrote the folder's ignore file, plans once
    more so `mirror` deletes by the rules that are now in place. Raises NotAllowed or DiskFull;
    other per-file problems are in the report."""
    target = check_allowed(folder.id, node.target_path, allowed_roots)
    await trio.to_thread.run_sync(lambda: os.makedirs(target, 0o755, exist_ok=True))
    await db.write(lambda c: repo.set_root(c, folder.id, target))
    root_user = os.geteuid() == 0 if as_root is None else as_root
    node_filter = NodeFilter(node.include, node.exclude)
    total = ApplyReport()
    for _ in range(2):
        rules, local, case_insensitive = await trio.to_thread.run_sync(_read_target, folder, target)
        keep = await db.write(lambda c: repo.partial_temps(c, folder.id))
        await trio.to_thread.run_sync(_remove_stale_temps, target, local[1], keep)
        applied = await db.read(lambda c: repo.applied_states(c, folder.id))
        options = PlanOptions(node.strategy, folder.ignore_permissions, root_user, case_insensitive)

        def make_plan(
            conn: sqlite3.Connection, states: dict[str, LocalState] = local[0], applied: dict[str, AppliedState] = applied,
            options: PlanOptions = options, rules: IgnoreRules = rules,
        ) -> Plan:
            return plan(
                repo.iter_desired(conn, folder.id),
                states,
                applied,
                options=options,
                rules=rules,
                node_filter=node_filter,
                locate=lambda h: repo.locate(conn, h),
            )

        p = await db.read(make_plan)
        del local, applied
        new_rules = bool(folder.ignore_file) and any(f.entry.name == folder.ignore_file for f in p.files)
        if new_rules:
            p = attrs.evolve(p, deletes=())  # delete by the rules the ignore file is about to bring, next round
        observer = applier_options.get("observer")
        if observer is not None:
            observer.planned(p)  # type: ignore[union-attr]
        applier = Applier(db, repo, folder.id, target, fetch, **applier_options)  # type: ignore[arg-type]
        total.merge(await applier.apply(p))
        if not new_rules:
            break
    return total


def _read_target(folder: FolderConfig, target: str) -> tuple[IgnoreRules, tuple, bool]:  # type: ignore[type-arg]
    text = None
    if folder.ignore_file:
        try:
            text = read_ignore_file(target, folder.ignore_file)
        except (OSError, ValueError):
            text = None
    rules = IgnoreRules.build(defaults=folder.ignore_defaults, patterns=folder.ignore_patterns, file_text=text)
    root = SafeRoot(target)
    try:
        walked = root.walk(rules)
        return rules, walked, root.case_insensitive()
    finally:
        root.close()


def _remove_stale_temps(target: str, temps: list[str], keep: set[str]) -> None:
    root = SafeRoot(target)
    try:
        for t in temps:
            if t in keep:
                continue
            dir_name, _, leaf = t.rpartition("/")
            try:
                fd = root.open_dir(dir_name)
            except (UnsafePath, OSError):
                continue
            try:
                remove_at(fd, leaf)
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        root.close()

