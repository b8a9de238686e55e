"""The source's scanner on real files: what it indexes, what it re-hashes, and how it survives
files that change, vanish or turn unreadable while it works."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import unicodedata
from pathlib import Path

import pytest
import trio

from p2pnode.sync.blocks import Hasher, HashJob, HashOutcome, digest, split_hashes
from p2pnode.sync.blockstore import read_block
from p2pnode.sync.model import DIR, FILE, SYMLINK, FileEntry
from p2pnode.sync.scanner import ScanError
from synckit import MiB, SyncPair, make_tree, open_pair

ROOT = os.geteuid() == 0


@pytest.fixture
async def pair(tmp_path: Path):
    async with open_pair(tmp_path) as p:
        yield p


async def test_initial_scan_indexes_every_kind_of_entry(pair: SyncPair):
    make_tree(pair.src, large=2 * MiB)
    report = await pair.scan()
    assert report.problem_count == 0
    idx = await pair.index()
    on_disk = {str(p.relative_to(pair.src)) for p in pair.src.rglob("*")}
    assert set(idx) == on_disk
    assert idx["empty"].type == DIR and idx["a/b/empty2"].type == DIR
    assert idx["a/link"].type == SYMLINK and idx["a/link"].target == "b/c/deep.txt"
    assert idx["dangling"].target == "does/not/exist" and idx["lib"].type == SYMLINK
    assert idx["zero"].size == 0 and idx["zero"].blocks == b""
    assert idx["bin/run.sh"].mode == 0o755 and idx["secret.key"].mode == 0o600
    assert idx["中文 目录/文件 名.txt"].type == FILE
    big = (pair.src / "big.bin").read_bytes()
    assert split_hashes(idx["big.bin"].blocks) == [digest(big[i : i + 128 * 1024]) for i in range(0, len(big), 128 * 1024)]
    seqs = sorted(e.seq for e in idx.values())
    assert seqs == list(range(1, len(idx) + 1))
    assert report.files_hashed == sum(1 for e in idx.values() if e.type == FILE)


async def test_rescan_rehashes_only_what_changed(pair: SyncPair):
    make_tree(pair.src, large=MiB)
    first = await pair.scan()
    unchanged = await pair.scan()
    assert (unchanged.changed, unchanged.files_hashed) == (0, 0)

    before = await pair.index()
    (pair.src / "a/one.txt").write_text("new content")
    os.chmod(pair.src / "secret.key", 0o640)
    report = await pair.scan()
    assert report.files_hashed == 2
    assert report.changed == 2  # rewriting a file in place does not touch its directory
    after = await pair.index()
    changed = {n for n in after if after[n] != before[n]}
    assert {"a/one.txt", "secret.key"} <= changed
    assert all(after[n].seq > first.last_seq for n in changed)


async def test_deletions_become_tombstones_with_new_seqs(pair: SyncPair):
    make_tree(pair.src, large=MiB)
    first = await pair.scan()
    (pair.src / "zero").unlink()
    shutil.rmtree(pair.src / "a")
    report = await pair.scan()
    idx = await pair.index()
    gone = {n for n, e in idx.items() if e.deleted}
    assert gone == {"zero", "a", "a/one.txt", "a/link", "a/b", "a/b/c", "a/b/c/deep.txt", "a/b/empty2"}
    assert all(idx[n].seq > first.last_seq for n in gone)
    assert report.changed == len(gone)
    live, tombstones = await pair.src_db.read(lambda c: pair.src_repo.count_source(c, "app"))
    assert tombstones == len(gone)
    # a name that comes back gets a newer seq again
    (pair.src / "zero").write_bytes(b"")
    await pair.scan()
    assert not (await pair.index())["zero"].deleted


async def test_incremental_rescan_looks_only_at_the_named_paths(pair: SyncPair):
    make_tree(pair.src, large=MiB)
    await pair.scan()
    (pair.src / "a/b/c/deep.txt").write_text("changed")
    (pair.src / "new/inner").mkdir(parents=True)
    (pair.src / "new/inner/f").write_text("f")
    (pair.src / "medium.bin").write_text("not rescanned: not named")
    report = await pair.scanner.rescan(["a/b/c/deep.txt", "new/inner/f"])
    idx = await pair.index()
    assert idx["a/b/c/deep.txt"].size == len("changed")
    assert {"new", "new/inner", "new/inner/f"} <= set(idx)  # the new parents, whose own events were missed
    assert idx["medium.bin"].size == 700_000
    assert report.entries_seen < 10
    shutil.rmtree(pair.src / "new")
    gone = await pair.scanner.rescan(["new/inner/f"])
    assert gone.changed == 3
    idx = await pair.index()
    assert all(idx[n].deleted for n in ("new", "new/inner", "new/inner/f"))


class _Interfering(Hasher):
    """Does something to one file just before hashing it."""

    def __init__(self, victim: str, action):  # type: ignore[no-untyped-def]
        super().__init__(workers=1)
        self.victim = victim
        self.action = action
        self.done = False

    def hash_one(self, job: HashJob, buf: bytearray) -> HashOutcome:
        if job.name == self.victim and not self.done:
            self.done = True
            self.action(job.path)
        return super().hash_one(job, buf)


async def test_file_vanishing_mid_scan_is_reported_and_the_rest_indexed(pair: SyncPair):
    make_tree(pair.src, large=MiB)
    pair.scanner.hasher = _Interfering("a/one.txt", os.unlink)
    report = await pair.scan()
    assert [p.name for p in report.problems] == ["a/one.txt"]
    assert "vanished" in report.problems[0].reason
    idx = await pair.index()
    assert "a/one.txt" not in idx and "a/b/c/deep.txt" in idx and "big.bin" in idx
    # an indexed file that vanishes while re-hashed becomes a tombstone
    (pair.src / "zero").write_text("now non-empty")
    pair.scanner.hasher = _Interfering("zero", os.unlink)
    await pair.scan()
    assert (await pair.index())["zero"].deleted


@pytest.mark.skipif(not ROOT, reason="drops to another user to make a file unreadable")
async def test_unreadable_file_mid_scan_is_reported_and_keeps_its_entry(pair: SyncPair):
    base = Path(tempfile.mkdtemp())
    try:
        os.chmod(base, 0o755)
        pair.src = base / "src"
        make_tree(pair.src, large=MiB)
        for p in [pair.src, *pair.src.rglob("*")]:
            os.lchown(p, 65534, 65534)
        pair.reconfigure()
        pair.scanner.folder = pair.folder
        pair.scanner.root = str(pair.src)
        await pair.scan()
        (pair.src / "a/one.txt").write_text("changed, then made unreadable while the scanner works")
        (pair.src / "medium.bin").write_text("changed too")
        pair.scanner.hasher = _Interfering("a/one.txt", lambda path: os.chmod(path, 0))
        os.seteuid(65534)
        try:
            report = await pair.scan()
        finally:
            os.seteuid(0)
        assert [(p.name, p.reason) for p in report.problems] == [("a/one.txt", "cannot open: Permission denied")]
        idx = await pair.index()
        assert idx["a/one.txt"].size == 400 and not idx["a/one.txt"].deleted  # the last good version stays
        assert idx["medium.bin"].size == len("changed too")
    finally:
        shutil.rmtree(base)


async def test_file_changing_while_hashed_is_never_indexed_torn(pair: SyncPair):
    """A writer rewrites a file again and again, each version one repeated byte, in pieces (a reader
    in between sees a mix); whatever the scanner indexes must be one whole version, and once the
    writer stops, the last one."""
    path = pair.src / "hot.bin"
    size = 4 * MiB
    path.write_bytes(bytes(size))
    stop = threading.Event()
    last = 0

    def writer() -> None:
        nonlocal last
        v = 1
        while not stop.is_set() and v < 3000:
            with open(path, "r+b") as f:
                for off in range(0, size, 256 * 1024):
                    f.seek(off)
                    f.write(bytes([v % 256]) * (256 * 1024))
            last = v
            v += 1

    def check(entry: FileEntry | None) -> None:
        if entry is not None:
            hashes = set(split_hashes(entry.blocks))
            assert len(hashes) == 1, "blocks from different versions: torn"

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3):
            report = await pair.scan()
            check((await pair.index()).get("hot.bin"))
            assert all("changing" in p.reason for p in report.problems), report.problems
    finally:
        stop.set()
        t.join()
    await pair.scan()
    entry = (await pair.index())["hot.bin"]
    check(entry)
    assert entry.blocks[:32] == digest(bytes([last % 256]) * (128 * 1024))


async def test_names_are_nfc_and_collisions_reported(pair: SyncPair):
    nfd = unicodedata.normalize("NFD", "café.txt")
    (pair.src / nfd).write_text("decomposed on disk")
    (pair.src / "dir-é").mkdir()
    (pair.src / unicodedata.normalize("NFD", "dir-é")).mkdir()  # the same name after NFC
    (pair.src / "dir-é/x").write_text("x")
    os.mkfifo(pair.src / "fifo")
    Path(os.fsdecode(os.path.join(os.fsencode(pair.src), b"bad-\xff-name"))).write_text("not UTF-8")
    report = await pair.scan()
    idx = await pair.index()
    assert set(idx) == {"café.txt", "dir-é", "dir-é/x"}
    reasons = {p.name: p.reason for p in report.problems}
    assert "NFC" in reasons[unicodedata.normalize("NFD", "dir-é")]
    assert any("UTF-8" in r for r in reasons.values())
    # blocks of the NFD file are found under its name on disk
    locs = await pair.src_db.read(lambda c: pair.src_repo.locate(c, idx["café.txt"].blocks))
    assert [loc.name for loc in locs] == [nfd]


async def test_periodic_full_rescan(pair: SyncPair):
    pair.reconfigure(rescan_interval_s=1)  # below what a signed config may say (10 s): a test's patience
    pair.scanner.folder = pair.folder
    (pair.src / "f").write_text("1")
    async with trio.open_nursery() as nursery:
        await nursery.start(pair.scanner.run)
        assert "f" in await pair.index()
        (pair.src / "g").write_text("2")
        with trio.fail_after(10):
            while "g" not in await pair.index():
                await trio.sleep(0.1)
        assert pair.scanner.scans >= 2
        nursery.cancel_scope.cancel()


async def test_a_missing_root_is_an_error_not_a_mass_deletion(pair: SyncPair):
    make_tree(pair.src, large=MiB)
    await pair.scan()
    os.rename(pair.src, pair.base / "moved-away")
    with pytest.raises(ScanError, match="source_path"):
        await pair.scan()
    assert not any(e.deleted for e in (await pair.index()).values())


async def test_blocks_are_served_verified_and_never_through_a_symlink(pair: SyncPair, tmp_path: Path):
    (pair.src / "a.bin").write_bytes(b"A" * 1000)
    (pair.src / "b.bin").write_bytes(b"B" * 1000)
    await pair.scan()
    idx = await pair.index()
    assert await read_block(pair.src_db, pair.src_repo, idx["a.bin"].blocks) == b"A" * 1000
    (pair.src / "a.bin").write_bytes(b"changed, not rescanned yet")
    assert await read_block(pair.src_db, pair.src_repo, idx["a.bin"].blocks) is None
    (tmp_path / "outside").write_bytes(b"B" * 1000)  # the same bytes, reachable only through a symlink
    os.unlink(pair.src / "b.bin")
    os.symlink(tmp_path / "outside", pair.src / "b.bin")
    assert await read_block(pair.src_db, pair.src_repo, idx["b.bin"].blocks) is None
    assert await read_block(pair.src_db, pair.src_repo, digest(b"unknown")) is None
