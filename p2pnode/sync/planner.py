"""What a receiver must do to make its directory match the source: a pure function.

Inputs: the desired entries (the source's index as this receiver holds it, tombstones included),
the local state (what is on disk now), the applied state (what this receiver last wrote, with the
stat it had right after) and a block lookup. Output: a Plan, in the order `apply` runs it —
directories to create (parents first), files to write, symlinks, metadata-only fixes, deletes
(`mirror` only, deepest first), then directory metadata (deepest first, after their content).

For each block of a file to write the plan says whether it is all zeros (no fetch, no write: a
hole), can be copied from a local file that holds a block with that hash (unchanged parts of the
same file, a renamed or copied file, any folder or artifact on this node), or must be fetched.
Local copies are candidates: `apply` verifies every block it reads against its hash.

A local edit (a name whose stat no longer matches what we wrote) is reverted: the file is
written again even if the source did not change. A file that exists but that we never wrote is
treated as unknown: `apply` reads its blocks first and fetches only what differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from . import names
from .blocks import block_span, zero_hash
from .ignore import IgnoreRules, NodeFilter
from .index_db import AppliedState, BlockLocation, content_id
from .model import DIR, FILE, MIRROR, SYMLINK, FileEntry

DEFAULT_FILE_MODE = 0o644  # new files and directories when ignore_permissions is set
DEFAULT_DIR_MODE = 0o755
MODE_BITS = 0o777  # setuid, setgid and sticky bits from a source are not reproduced


@attrs.frozen(slots=True)
class LocalState:
    """One name as it is on the receiver's disk (lstat; never followed)."""

    type: str
    size: int
    mode: int  # permission bits
    mtime_ns: int
    ctime_ns: int
    ino: int
    uid: int
    gid: int
    target: str = ""

    def same_stat(self, a: AppliedState) -> bool:
        return (self.type, self.size, self.mtime_ns, self.ctime_ns, self.ino) == (a.type, a.size, a.mtime_ns, a.ctime_ns, a.ino)


@attrs.frozen
class PlanOptions:
    strategy: str = MIRROR
    ignore_permissions: bool = False
    as_root: bool = False  # set owners (uid/gid) too
    case_insensitive: bool = False  # the target filesystem folds case


@attrs.frozen(slots=True)
class BlockPlan:
    index: int
    offset: int
    size: int
    hash: bytes
    copy_from: tuple[BlockLocation, ...] = ()
    zero: bool = False

    @property
    def fetch(self) -> bool:
        return not self.zero and not self.copy_from


@attrs.frozen
class FileWrite:
    """Write a file. Only the blocks with local copies are listed (`copies`: block index -> where
    this node holds that block); zero blocks and the rest follow from the entry (`block_plans`), so
    a plan for a large folder stays small."""

    entry: FileEntry
    mode: int
    owner: tuple[int, int] | None
    replace: str | None = None  # the type of what is in the way and removed first
    existing: bool = False  # an unknown file is at the name: try its blocks at the same offsets first
    local_edit: bool = False
    copies: tuple[tuple[int, tuple[BlockLocation, ...]], ...] = ()

    def block_plans(self) -> tuple[BlockPlan, ...]:
        e = self.entry
        copies = dict(self.copies)
        out = []
        for i in range(e.block_total):
            offset, size = block_span(i, e.size, e.block_size)
            h = e.block_hash(i)
            if h == zero_hash(size):
                out.append(BlockPlan(i, offset, size, h, zero=True))
            else:
                out.append(BlockPlan(i, offset, size, h, copies.get(i, ())))
        return tuple(out)

    @property
    def fetch_bytes(self) -> int:
        return sum(b.size for b in self.block_plans() if b.fetch)


@attrs.frozen
class MakeDir:
    entry: FileEntry
    replace: str | None = None


@attrs.frozen
class MakeSymlink:
    entry: FileEntry
    owner: tuple[int, int] | None
    replace: str | None = None
    local_edit: bool = False


@attrs.frozen
class SetMeta:
    """Content is right; mode, mtime or owner is not. For directories this runs after their content."""

    entry: FileEntry
    mode: int | None  # None: leave the mode alone
    owner: tuple[int, int] | None


@attrs.frozen
class Delete:
    name: str
    type: str


@attrs.frozen
class Skip:
    name: str
    reason: str


@attrs.frozen
class Plan:
    dirs: tuple[MakeDir, ...] = ()
    files: tuple[FileWrite, ...] = ()
    symlinks: tuple[MakeSymlink, ...] = ()
    meta: tuple[SetMeta, ...] = ()
    deletes: tuple[Delete, ...] = ()
    dir_meta: tuple[SetMeta, ...] = ()
    skipped: tuple[Skip, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.dirs or self.files or self.symlinks or self.meta or self.deletes or self.dir_meta)

    @property
    def fetch_bytes(self) -> int:
        return sum(f.fetch_bytes for f in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.entry.size for f in self.files)


Locate = Callable[[bytes], Sequence[BlockLocation]]


def _depth_desc(name: str) -> tuple[int, str]:
    return (-name.count("/"), name)


def plan(
    desired: Iterable[FileEntry],
    local: Mapping[str, LocalState],
    applied: Mapping[str, AppliedState],
    *,
    options: PlanOptions = PlanOptions(),
    rules: IgnoreRules = IgnoreRules(),
    node_filter: NodeFilter = NodeFilter(),
    locate: Locate = lambda h: (),
) -> Plan:
    """Compute what to do; reads nothing but its arguments (and `locate`)."""
    skipped: list[Skip] = []
    live: dict[str, FileEntry] = {}
    all_dirs: dict[str, FileEntry] = {}
    for e in desired:
        if e.deleted:
            continue  # a tombstone: the name is not live, so mirror deletes it below
        if e.type == DIR:
            all_dirs[e.name] = e
        if not node_filter.wants(e.name, e.type == DIR):
            continue
        live[e.name] = e
    if not node_filter.everything:
        # the directories above an included name are created even if the filter did not name them
        for name in list(live):
            for a in names.ancestors(name):
                if a not in live and a in all_dirs:
                    live[a] = all_dirs[a]
    if options.case_insensitive:
        for first, others in names.find_collisions(sorted(live)).items():
            for other in others:
                skipped.append(Skip(other, f"differs from {first!r} only by case; the target filesystem folds case"))
                live.pop(other, None)

    dirs: list[MakeDir] = []
    files: list[FileWrite] = []
    symlinks: list[MakeSymlink] = []
    meta: list[SetMeta] = []
    dir_meta: list[SetMeta] = []
    touched: set[str] = set()  # directories whose content this plan changes (their mtime must be set again)
    mirror = options.strategy == MIRROR

    def want_mode(e: FileEntry, have: LocalState | None) -> int | None:
        if options.ignore_permissions:
            if have is not None and have.type == e.type:
                return None
            return DEFAULT_DIR_MODE if e.type == DIR else DEFAULT_FILE_MODE
        return e.mode & MODE_BITS

    def want_owner(e: FileEntry) -> tuple[int, int] | None:
        return (e.uid, e.gid) if options.as_root and not options.ignore_permissions else None

    def meta_differs(e: FileEntry, have: LocalState) -> bool:
        mode = want_mode(e, have)
        owner = want_owner(e)
        if e.type != SYMLINK and mode is not None and have.mode != mode:
            return True
        if owner is not None and (have.uid, have.gid) != owner:
            return True
        return have.mtime_ns != e.mtime_ns

    for name in sorted(live):
        e = live[name]
        have = local.get(name)
        was = applied.get(name)
        replace = have.type if have is not None and have.type != e.type else None
        if replace == DIR and not mirror:
            skipped.append(Skip(name, f"a local directory is where the source has a {e.type}; overlay never deletes"))
            continue
        if replace is not None or have is None:
            touched.add(names.parent(name))
        if e.type == DIR:
            if have is None or replace is not None:
                dirs.append(MakeDir(e, replace))
                dir_meta.append(SetMeta(e, want_mode(e, None), want_owner(e)))
            elif meta_differs(e, have):
                dir_meta.append(SetMeta(e, want_mode(e, have), want_owner(e)))
            continue
        if e.type == SYMLINK:
            edited = have is not None and have.type == SYMLINK and have.target != e.target
            if have is None or replace is not None or edited:
                symlinks.append(MakeSymlink(e, want_owner(e), replace, local_edit=edited and was is not None))
                touched.add(names.parent(name))
            elif meta_differs(e, have):
                meta.append(SetMeta(e, None, want_owner(e)))
            continue
        # a regular file
        clean = have is not None and was is not None and have.same_stat(was)
        if clean and was is not None and was.content == content_id(e):
            assert have is not None
            if meta_differs(e, have):
                meta.append(SetMeta(e, want_mode(e, have), want_owner(e)))
            continue
        # unknown or locally edited content: apply reads it first (all of it may still be right,
        # e.g. after a chmod, which moves ctime; then only the metadata is set)
        local_edit = have is not None and have.type == FILE and was is not None and not have.same_stat(was)
        existing = have is not None and have.type == FILE and not clean
        mode = want_mode(e, have)
        if mode is None:  # ignore_permissions: the rewritten file keeps the mode the local one had
            assert have is not None
            mode = have.mode
        files.append(FileWrite(e, mode, want_owner(e), replace, existing, local_edit, _copies(e, locate)))
        touched.add(names.parent(name))

    deletes: list[Delete] = []
    if mirror:
        for name, have in local.items():
            if name in live:
                continue
            if not node_filter.wants(name, have.type == DIR) or rules.ignored_path(name, have.type == DIR):
                continue
            if any(a in live and live[a].type != DIR for a in names.ancestors(name)):
                continue  # inside a directory that a file replaces: removed with it
            deletes.append(Delete(name, have.type))
            touched.add(names.parent(name))
        deletes.sort(key=lambda d: _depth_desc(d.name))

    # a directory whose content changed gets its mtime (and mode) set again after that content
    planned = {m.entry.name for m in dir_meta}
    for d in touched:
        if d and d not in planned and d in live and live[d].type == DIR:
            e = live[d]
            dir_meta.append(SetMeta(e, want_mode(e, local.get(d)), want_owner(e)))
    dir_meta.sort(key=lambda m: _depth_desc(m.entry.name))
    return Plan(tuple(dirs), tuple(files), tuple(symlinks), tuple(meta), tuple(deletes), tuple(dir_meta), tuple(skipped))


def _copies(e: FileEntry, locate: Locate) -> tuple[tuple[int, tuple[BlockLocation, ...]], ...]:
    out = []
    for i in range(e.block_total):
        offset, size = block_span(i, e.size, e.block_size)
        h = e.block_hash(i)
        if h == zero_hash(size):
            continue
        here = tuple(loc for loc in locate(h) if loc.size == size)
        if here:
            out.append((i, here))
    return tuple(out)
