"""The source's scanner: walks the folder, hashes what changed, gives every change the next seq.

A full scan walks every directory; an incremental rescan looks at the paths a watcher (or a
trigger) names and the subtrees below them; `run` does a full scan now and again every
`rescan_interval_s` as a safety net for events a watcher missed. Scans never overlap.

Per directory, on the database thread: list it (`os.scandir`), `lstat` each entry, drop what the
ignore rules match (ignored directories are not entered), and compare with the index rows of
that directory. Files whose size, mtime, ctime, inode or mode are unchanged are not read again;
the rest are hashed on the Hasher's threads (a file that changes while hashed is retried, then
reported, never indexed torn). Names the index has but the disk no longer does (or that are now
ignored) become tombstones, a vanished directory's whole subtree with it. Symlinks are recorded
with their target and never followed; directories (empty ones too) are entries of their own.

A problem with one file (unreadable, vanished, a name we cannot represent, a name that collides
with another after NFC normalisation) is reported in the ScanReport and logged; the scan goes on.
Work is done in bounded batches (files and bytes), so memory does not grow with the folder.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import stat
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import attrs
import trio

from ..errors import P2PNodeError
from ..logfmt import fmt
from . import names
from .blocks import RACY_NS, Hashed, HashFailure, Hasher, HashJob, HashOutcome, StatSig
from ..platform.db import Database
from .ignore import IgnoreRules, read_ignore_file
from .index_db import IndexRepo, SourceChange, SourceRow
from .model import DIR, FILE, SYMLINK, FileEntry, FolderConfig, file_type

log = logging.getLogger("p2pnode.sync.scanner")

BATCH_FILES = 2000
BATCH_BYTES = 256 * 1024 * 1024
MAX_PROBLEMS = 100  # kept in a report; the count goes on
MAX_LOGGED_PROBLEMS = 20  # per scan; then one summary line
MAX_RESCAN_PATHS = 10_000
RACY_ROUNDS = 3  # files that changed while (or just before) they were hashed are hashed again this many times
RACY_WAIT_S = RACY_NS / 1e9  # after this long without a change, a file is no longer racy  # more paths than this in one rescan: a full scan is cheaper


class ScanError(P2PNodeError):
    """The folder as a whole cannot be scanned (its root is missing or unreadable)."""


@attrs.frozen
class ScanProblem:
    name: str
    reason: str


@attrs.define
class ScanReport:
    kind: str  # "full" | "incremental"
    changed: int = 0  # entries that got a new seq
    first_seq: int = 0
    last_seq: int = 0
    entries_seen: int = 0
    files_hashed: int = 0
    bytes_hashed: int = 0
    problems: list[ScanProblem] = attrs.Factory(list)
    problem_count: int = 0
    seconds: float = 0.0

    def problem(self, name: str, reason: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(ScanProblem(name, reason))


@attrs.define
class _Batch:
    """Work found by the walk, waiting to be hashed and committed."""

    changes: list[SourceChange] = attrs.Factory(list)
    jobs: list[tuple[HashJob, int]] = attrs.Factory(list)
    disk_names: dict[str, str | None] = attrs.Factory(dict)
    known: dict[str, SourceRow | None] = attrs.Factory(dict)  # index rows of the files being hashed
    job_bytes: int = 0

    @property
    def full(self) -> bool:
        return len(self.jobs) >= BATCH_FILES or self.job_bytes >= BATCH_BYTES or len(self.changes) >= BATCH_FILES

    @property
    def empty(self) -> bool:
        return not self.changes and not self.jobs


class Scanner:
    """Keeps the source's index of one folder in step with its directory."""

    def __init__(
        self,
        db: Database,
        repo: IndexRepo,
        folder: FolderConfig,
        *,
        hasher: Hasher | None = None,
        on_commit: Callable[[int, int], Awaitable[None]] | None = None,
    ):
        self.db = db
        self.repo = repo
        self.folder = folder
        self.root = folder.source_path
        self.hasher = hasher or Hasher()
        self.on_commit = on_commit
        self._lock = trio.Lock()
        self._rules = IgnoreRules()
        self.scans = 0

    # -- public ---------------------------------------------------------------------------------------
    async def full_scan(self) -> ScanReport:
        async with self._lock:
            return await self._scan("full", [("", "")])

    async def rescan(self, paths: Iterable[str]) -> ScanReport:
        """Look again at these folder-relative paths (as on disk) and everything below them."""
        wanted = sorted({p.strip("/") for p in paths})
        if len(wanted) > MAX_RESCAN_PATHS or "" in wanted or (self.folder.ignore_file in wanted):
            return await self.full_scan()  # the ignore file decides about every name: look at all of them
        async with self._lock:
            return await self._scan("incremental", _outermost(wanted))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Full scan now, then every `rescan_interval_s`, until cancelled. A folder whose root is
        missing is reported and tried again at the next interval; nothing is indexed meanwhile."""
        started = False
        while True:
            try:
                await self.full_scan()
            except ScanError as exc:
                log.warning(fmt("sync_scan_failed", folder=self.folder.id, error=str(exc)))
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self.folder.rescan_interval_s)

    # -- the scan -------------------------------------------------------------------------------------
    async def _scan(self, kind: str, starts: list[tuple[str, str]]) -> ScanReport:
        """Scan from each (name, disk_name) start; ("", "") is the whole folder."""
        report = ScanReport(kind)
        t0 = trio.current_time()
        self.scans += 1
        await trio.to_thread.run_sync(self._check_root)
        await self.db.write(lambda conn: self.repo.set_root(conn, self.folder.id, self.root))
        self._rules = await trio.to_thread.run_sync(self._load_rules)
        hashed_files, hashed_bytes = self.hasher.files_hashed, self.hasher.bytes_hashed
        pending: deque[tuple[str, str]] = deque()
        batch = _Batch()
        for name, disk in starts:
            if name:
                await self.db.read(functools.partial(self._examine_start, name=name, disk=disk, batch=batch, pending=pending, report=report))
            else:
                pending.append(("", ""))
            while pending:
                if batch.full:
                    await self._flush(batch, report)
                    batch = _Batch()
                d_name, d_disk = pending.popleft()
                await self.db.read(functools.partial(self._scan_dir, name=d_name, disk=d_disk, batch=batch, pending=pending, report=report))
        await self._flush(batch, report)
        report.files_hashed = self.hasher.files_hashed - hashed_files
        report.bytes_hashed = self.hasher.bytes_hashed - hashed_bytes
        report.seconds = trio.current_time() - t0
        for p in report.problems[:MAX_LOGGED_PROBLEMS]:
            log.warning(fmt("sync_scan_problem", folder=self.folder.id, name=p.name, reason=p.reason))
        log.info(
            fmt(
                "sync_scanned",
                folder=self.folder.id,
                kind=kind,
                changed=report.changed,
                seq=report.last_seq or None,
                seen=report.entries_seen,
                hashed_files=report.files_hashed,
                hashed_bytes=report.bytes_hashed,
                problems=report.problem_count,
                seconds=round(report.seconds, 3),
            )
        )
        return report

    def _check_root(self) -> None:
        """A missing folder root is an error, never "everything was deleted" (which mirror would act on)."""
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise ScanError(f"folder {self.folder.id}: source_path {self.root} cannot be read ({exc.strerror}); nothing indexed") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ScanError(f"folder {self.folder.id}: source_path {self.root} is not a directory; nothing indexed")

    def _load_rules(self) -> IgnoreRules:
        text = None
        if self.folder.ignore_file:
            try:
                text = read_ignore_file(self.root, self.folder.ignore_file)
            except (OSError, ValueError) as exc:
                log.warning(fmt("sync_ignore_file_unreadable", folder=self.folder.id, file=self.folder.ignore_file, error=str(exc)))
        return IgnoreRules.build(defaults=self.folder.ignore_defaults, patterns=self.folder.ignore_patterns, file_text=text)

    def _abs(self, disk: str) -> str:
        return os.path.join(self.root, disk) if disk else self.root

    # -- on the database thread: compare the disk with the index ---------------------------------------
    def _examine(
        self,
        name: str,
        disk: str,
        st: os.stat_result,
        kind: str,
        row: SourceRow | None,
        batch: _Batch,
        pending: deque[tuple[str, str]],
        report: ScanReport,
    ) -> None:
        report.entries_seen += 1
        if kind == DIR:
            pending.append((name, disk))
        sig = StatSig.of(st)
        if row is not None and row.unchanged(kind, sig):
            return
        disk_name = disk if disk != name else None
        if kind == FILE:
            batch.jobs.append((HashJob(name, self._abs(disk)), st.st_size))
            batch.disk_names[name] = disk_name
            batch.known[name] = row
            batch.job_bytes += st.st_size
            return
        target = ""
        if kind == SYMLINK:
            try:
                target = os.readlink(self._abs(disk))
                target.encode("utf-8")
            except FileNotFoundError:
                return  # gone since the listing; the next look at its directory settles it
            except OSError as exc:
                report.problem(name, f"cannot read symlink: {exc.strerror}")
                return
            except UnicodeEncodeError:
                report.problem(name, "symlink target is not valid UTF-8; not synced")
                return
            if not target:
                report.problem(name, "symlink has an empty target; not synced")
                return
        entry = FileEntry(name, kind, 0, 0, sig.mode, st.st_mtime_ns, st.st_uid, st.st_gid, target=target)
        batch.changes.append(SourceChange(entry, sig, disk_name))

    def _tombstone(self, conn: sqlite3.Connection, name: str, row: SourceRow, batch: _Batch) -> None:
        batch.changes.append(SourceChange(FileEntry(name, row.type, deleted=True), None))
        if row.type == DIR:
            for below in self.repo.live_names_under(conn, self.folder.id, name):
                below_row = self.repo.source_row(conn, self.folder.id, below)
                if below_row is not None:
                    batch.changes.append(SourceChange(FileEntry(below, below_row.type, deleted=True), None))

    def _scan_dir(
        self, conn: sqlite3.Connection, name: str, disk: str, batch: _Batch, pending: deque[tuple[str, str]], report: ScanReport
    ) -> None:
        rows = self.repo.source_rows(conn, self.folder.id, name)
        seen: set[str] = set()
        try:
            with os.scandir(self._abs(disk)) as it:
                listing = list(it)
        except FileNotFoundError:
            if not name:
                raise ScanError(f"folder {self.folder.id}: source_path {self.root} vanished during the scan; nothing indexed") from None
            listing = []  # vanished: everything it held becomes a tombstone below
        except NotADirectoryError:
            return  # replaced by a file since its parent was listed; the parent's next scan sees it
        except OSError as exc:
            report.problem(name or "/", f"cannot list directory: {exc.strerror}")
            return
        if not all(de.name.isascii() for de in listing):
            # Names already in NFC first, so when two disk names normalise to one, the NFC one wins.
            listing.sort(key=lambda de: not unicodedata.is_normalized("NFC", de.name))
        for de in listing:
            comp = de.name
            if names.is_temp_name(comp):
                continue
            child_disk = f"{disk}/{comp}" if disk else comp
            try:
                child = names.child(name, comp)
            except names.BadName as exc:
                report.problem(child_disk, str(exc))
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report.problem(child, f"cannot stat: {exc.strerror}")
                seen.add(child)  # it exists: keep what the index says
                continue
            kind = file_type(st.st_mode)
            if kind is None:
                continue  # fifos, sockets, devices: not synced
            if child in seen:
                report.problem(child_disk, f"collides with another name after Unicode NFC normalisation ({child!r}); not synced")
                continue
            if self._rules.ignored(child, kind == DIR):
                continue
            seen.add(child)
            self._examine(child, child_disk, st, kind, rows.get(child), batch, pending, report)
        for gone, row in rows.items():
            if not row.deleted and gone not in seen:
                self._tombstone(conn, gone, row, batch)

    def _examine_start(
        self, conn: sqlite3.Connection, name: str, disk: str, batch: _Batch, pending: deque[tuple[str, str]], report: ScanReport
    ) -> None:
        """An incremental start: the path itself (then its subtree via `pending`) and its parent's entry.
        If the parent is not indexed (its own event was missed), start from the parent instead."""
        if any(self._rules.ignored(a, True) for a in names.ancestors(name)):
            return
        row = self.repo.source_row(conn, self.folder.id, name)
        par = names.parent(name)
        if par:
            par_row = self.repo.source_row(conn, self.folder.id, par)
            try:
                par_st: os.stat_result | None = os.lstat(self._abs(names.parent(disk)))
            except OSError:
                par_st = None
            if par_row is None or par_row.deleted or par_st is None or file_type(par_st.st_mode) != DIR:
                # the parent is new (its own event was missed) or gone: look at it instead, with its subtree
                self._examine_start(conn, par, names.parent(disk), batch, pending, report)
                return
            sub: deque[tuple[str, str]] = deque()  # the parent's entry only, not its other children
            self._examine(par, names.parent(disk), par_st, DIR, par_row, batch, sub, report)
            report.entries_seen -= 1
        try:
            st = os.lstat(self._abs(disk))
        except FileNotFoundError:
            st = None
        except OSError as exc:
            report.problem(name, f"cannot stat: {exc.strerror}")
            return
        kind = file_type(st.st_mode) if st is not None else None
        if st is None or kind is None or self._rules.ignored(name, kind == DIR):
            if row is not None and not row.deleted:
                self._tombstone(conn, name, row, batch)
            return
        self._examine(name, disk, st, kind, row, batch, pending, report)

    # -- hash, then commit ----------------------------------------------------------------------------
    async def _flush(self, batch: _Batch, report: ScanReport) -> None:
        if batch.empty:
            return
        changes = batch.changes
        racy: list[str] = []

        def on_result(r: HashOutcome) -> None:
            if isinstance(r, HashFailure) and r.racy:
                racy.append(r.name)
            elif isinstance(r, Hashed):
                entry = FileEntry(
                    r.name, FILE, 0, r.sig.size, r.sig.mode, r.sig.mtime_ns, r.uid, r.gid, False, r.block_size, r.blocks
                )
                changes.append(SourceChange(entry, r.sig, batch.disk_names.get(entry.name)))
            else:
                row = batch.known.get(r.name)
                if r.vanished and row is not None and not row.deleted:
                    changes.append(SourceChange(FileEntry(r.name, FILE, deleted=True), None))
                report.problem(r.name, r.reason)

        jobs = batch.jobs
        for attempt in range(RACY_ROUNDS + 1):
            if not jobs:
                break
            if attempt:
                await trio.sleep(RACY_WAIT_S)
            racy.clear()
            await self.hasher.hash_many(jobs, on_result)
            again = set(racy)
            jobs = [(j, size) for j, size in jobs if j.name in again]
        for name in racy:
            report.problem(name, f"kept changing while it was hashed ({RACY_ROUNDS + 1} attempts); rescanned next time")
        if not changes:
            return
        committed = await self.db.write(lambda conn: self.repo.commit_source_changes(conn, self.folder.id, changes))
        if committed:
            if not report.first_seq:
                report.first_seq = committed[0].seq
            report.last_seq = committed[-1].seq
            report.changed += len(committed)
            if self.on_commit is not None:
                await self.on_commit(committed[0].seq, committed[-1].seq)


def _outermost(paths: list[str]) -> list[tuple[str, str]]:
    """Disk paths -> (name, disk) starts, dropping any path inside another one."""
    chosen: set[str] = set()
    out: list[tuple[str, str]] = []
    for p in sorted(paths, key=lambda p: p.count("/")):
        if p in chosen or any(a in chosen for a in names.ancestors(p)):
            continue
        try:
            out.append((names.normalize(p), p))
        except names.BadName:
            continue
        chosen.add(p)
    return out
