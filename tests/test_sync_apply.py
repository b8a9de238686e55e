"""Scan a real tree, plan and apply it into a second directory with a local block provider, and
compare the trees; then change, rename, delete, ignore, toggle permissions, and attack."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pnode import codec
from p2pnode.errors import DecodeError
from p2pnode.sync import names
from p2pnode.sync.apply import Applier, DiskFull, NotAllowed, check_allowed
from p2pnode.sync.blocks import block_size_for
from p2pnode.sync.index_db import content_id
from p2pnode.sync.model import FILE, FileEntry, IndexChunk
from p2pnode.sync.planner import FileWrite, Plan
from synckit import MiB, SyncPair, make_tree, open_pair, stamp, write_at
from treecmp import assert_same_tree, differences, snapshot

ROOT = os.geteuid() == 0


@pytest.fixture
async def pair(tmp_path: Path):
    async with open_pair(tmp_path) as p:
        yield p


def temps(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if names.is_temp_name(p.name)]


async def test_full_tree_then_nothing_to_do(pair: SyncPair):
    make_tree(pair.src)
    if ROOT:
        os.chown(pair.src / "a/one.txt", 1234, 5678)
        os.lchown(pair.src / "a/link", 4321, 8765)
        stamp(pair.src)
    report = await pair.sync()
    assert report.ok, report.errors
    assert_same_tree(pair.src, pair.dst, owner=ROOT)
    # the sparse file: only the block with data was fetched, and the copy has holes too
    sparse_nonzero = 128 * 1024
    total = sum(p.stat().st_size for p in pair.src.rglob("*") if p.is_file() and not p.is_symlink())
    assert pair.provider.bytes == total - 16 * MiB + sparse_nonzero
    assert os.stat(pair.dst / "sparse.img").st_blocks * 512 < MiB
    assert not temps(pair.dst)

    before = len(pair.provider.calls)
    again = await pair.sync()
    assert (again.files, again.dirs, again.symlinks, again.meta, again.deleted) == (0, 0, 0, 0, 0)
    assert len(pair.provider.calls) == before


async def test_change_one_mib_fetches_only_changed_blocks(pair: SyncPair):
    make_tree(pair.src)
    await pair.sync()
    assert block_size_for(32 * MiB) == 128 * 1024
    write_at(pair.src / "big.bin", 10 * MiB + 1000, os.urandom(MiB))  # unaligned: 1 MiB touches 9 blocks of 128 KiB
    pair.provider.calls.clear()
    report = await pair.sync()
    assert report.ok, report.errors
    assert len(pair.provider.calls) == 9
    assert report.blocks_copied == 256 - 9
    assert_same_tree(pair.src, pair.dst)


async def test_rename_directory_reuses_blocks_locally(pair: SyncPair):
    make_tree(pair.src)
    (pair.src / "a/big-copy.bin").write_bytes((pair.src / "big.bin").read_bytes())
    await pair.sync()
    os.rename(pair.src / "a", pair.src / "renamed")
    os.rename(pair.src / "big.bin", pair.src / "renamed/moved.bin")
    pair.provider.calls.clear()
    report = await pair.sync()
    assert report.ok, report.errors
    assert pair.provider.calls == []
    assert report.blocks_copied >= 2 * 256
    assert report.deleted >= 6  # a, a/b, a/b/c, files, the symlink
    assert_same_tree(pair.src, pair.dst)


async def test_mirror_deletes_overlay_keeps(pair: SyncPair):
    make_tree(pair.src, large=MiB)
    await pair.sync()
    (pair.dst / "local-only.txt").write_text("mine")
    (pair.src / "a/one.txt").unlink()
    shutil.rmtree(pair.src / "with space")

    pair.reconfigure(strategy="overlay")
    report = await pair.sync()
    assert report.deleted == 0
    assert (pair.dst / "a/one.txt").exists() and (pair.dst / "with space/inner file").exists()
    assert (pair.dst / "local-only.txt").exists()

    pair.reconfigure(strategy="mirror")
    report = await pair.sync()
    assert report.ok, report.errors
    assert not (pair.dst / "a/one.txt").exists() and not (pair.dst / "with space").exists()
    assert not (pair.dst / "local-only.txt").exists()
    assert_same_tree(pair.src, pair.dst)


async def test_ignored_files_are_not_indexed_and_receivers_keep_theirs(pair: SyncPair):
    pair.reconfigure(ignore_patterns=("*.log",), ignore_file="sync.ignore")
    make_tree(pair.src, large=MiB)
    (pair.src / "sync.ignore").write_text("build/\n# a comment\n[z-a]broken\n")
    for name in (".git/HEAD", "a/.git/config", "runtime/cache/x", "tmp/t", "x.log", "a/deep.log", "build/out.o"):
        (pair.src / name).parent.mkdir(parents=True, exist_ok=True)
        (pair.src / name).write_text("ignored")
    (pair.src / "src/runtime").mkdir(parents=True)
    (pair.src / "src/runtime/kept.go").write_text("package runtime")  # only /runtime/ at the root is a default
    # the receiver's own runtime files and logs
    for name in ("runtime/app.pid", "tmp/upload", "server.log", "build/local.o"):
        (pair.dst / name).parent.mkdir(parents=True, exist_ok=True)
        (pair.dst / name).write_text("receiver's own")
    report = await pair.sync()
    assert report.ok, report.errors
    indexed = {e.name for e in await pair.src_db.read(lambda c: pair.src_repo.entries_since(c, "app", 0))}
    assert "src/runtime/kept.go" in indexed and "sync.ignore" in indexed
    assert not {n for n in indexed if n.endswith(".log") or n.split("/")[0] in (".git", "runtime", "tmp", "build") or "/.git" in n}
    for name in ("runtime/app.pid", "tmp/upload", "server.log", "build/local.o"):
        assert (pair.dst / name).read_text() == "receiver's own"
    skip = ("runtime", "tmp", "build", ".git", "a/.git")

    def ignored(name: str) -> bool:
        return name.endswith(".log") or name in skip

    assert_same_tree(pair.src, pair.dst, skip=ignored)


async def test_toggle_ignore_permissions(pair: SyncPair):
    make_tree(pair.src, large=MiB)
    pair.reconfigure(ignore_permissions=True)
    await pair.sync()
    assert os.stat(pair.dst / "bin/run.sh").st_mode & 0o777 == 0o644
    assert os.stat(pair.dst / "empty").st_mode & 0o777 == 0o755
    assert differences(pair.src, pair.dst, mode=False) == []

    os.chmod(pair.src / "a/one.txt", 0o640)
    (pair.src / "new.sh").write_text("#!/bin/sh\n")
    os.chmod(pair.src / "new.sh", 0o750)
    os.chmod(pair.dst / "secret.key", 0o400)  # a receiver's own choice, kept while permissions are ignored
    await pair.sync()
    assert os.stat(pair.dst / "a/one.txt").st_mode & 0o777 == 0o644
    assert os.stat(pair.dst / "new.sh").st_mode & 0o777 == 0o644
    assert os.stat(pair.dst / "secret.key").st_mode & 0o777 == 0o400

    pair.reconfigure(ignore_permissions=False)
    calls = len(pair.provider.calls)
    report = await pair.sync()
    assert report.ok and report.files == 0 and len(pair.provider.calls) == calls  # metadata only
    assert_same_tree(pair.src, pair.dst)


async def test_local_edits_are_reverted(pair: SyncPair):
    make_tree(pair.src)
    await pair.sync()
    write_at(pair.dst / "big.bin", 3 * MiB, b"local edit")
    (pair.dst / "a/one.txt").write_text("changed here")
    os.unlink(pair.dst / "a/link")
    os.symlink("/etc/passwd", pair.dst / "a/link")
    os.chmod(pair.dst / "bin/run.sh", 0o600)
    pair.provider.calls.clear()
    report = await pair.apply()
    assert report.ok, report.errors
    assert report.local_edits_reverted == 4  # two edited files, a chmod (content found intact), a symlink
    assert report.adopted == 1  # run.sh: its content was right, only its mode is set back
    assert len(pair.provider.calls) == 2  # the one edited block of big.bin, and one.txt
    assert_same_tree(pair.src, pair.dst)


async def test_include_exclude_per_node(pair: SyncPair):
    make_tree(pair.src, large=MiB)
    pair.reconfigure(include=("a/", "docs/"), exclude=("a/b/c/",))
    (pair.dst / "other").mkdir(parents=True)
    (pair.dst / "other/keep").write_text("not ours")
    report = await pair.sync()
    assert report.ok, report.errors
    got = set(snapshot(pair.dst))
    assert got == {"a", "a/one.txt", "a/link", "a/b", "a/b/empty2", "docs", "docs/résumé final.txt", "other", "other/keep"}


async def test_hostile_names_are_refused_at_the_edge():
    good = FileEntry("ok", FILE, 1, 0, 0o644, 0, 0, 0, False, block_size_for(0), b"").to_dict()
    for bad in ("../escape", "/etc/passwd", "a/../../x", "a//b", "./a", "a/./b", "a\x00b", "e\u0301", "", ".p2psync.x.tmp"):
        chunk = {"folder": "app", "index_id": 1, "prev_seq": 0, "seq": 2, "entries": [good, {**good, "name": bad, "seq": 2}]}
        with pytest.raises(DecodeError, match="name"):
            IndexChunk.from_bytes(codec.encode(chunk))


async def test_applier_checks_names_again_and_never_follows_symlinks(pair: SyncPair, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    pair.dst.mkdir()
    os.symlink(outside, pair.dst / "a")
    data = b"payload"
    from p2pnode.sync.blocks import digest

    def entry(name: str) -> FileEntry:
        return FileEntry(name, FILE, 1, len(data), 0o644, 0, 0, 0, False, block_size_for(len(data)), digest(data))

    async def fetch(h: bytes, size: int) -> bytes:
        return data

    def write(name: str) -> FileWrite:
        return FileWrite(entry(name), 0o644, None)

    applier = Applier(pair.dst_db, pair.dst_repo, "app", str(pair.dst), fetch)
    report = await applier.apply(Plan(files=(write("../escape"), write("/abs"), write("a/through-link"), write("fine"))))
    assert sorted(n for n, _ in report.errors) == ["../escape", "/abs", "a/through-link"]
    assert "not followed" in dict(report.errors)["a/through-link"]
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape").exists()
    assert (pair.dst / "fine").read_bytes() == data


async def test_an_index_with_a_symlink_and_a_file_below_it_writes_nothing_outside(pair: SyncPair, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    data = b"through the link?"
    from p2pnode.sync.blocks import digest

    hostile = IndexChunk(
        "app",
        5,
        0,
        3,
        (
            FileEntry("a", "symlink", 1, mode=0o777, mtime_ns=1, target=str(outside)),
            FileEntry("a/x", FILE, 2, len(data), 0o644, 1, 0, 0, False, block_size_for(len(data)), digest(data)),
            FileEntry("f", FILE, 3, len(data), 0o644, 1, 0, 0, False, block_size_for(len(data)), digest(data)),
        ),
    )
    await pair.dst_db.write(lambda c: pair.dst_repo.accept_chunk(c, IndexChunk.from_bytes(hostile.to_bytes())))

    async def fetch(h: bytes, size: int) -> bytes:
        return data

    pair.provider = fetch  # type: ignore[assignment]
    for _ in range(2):  # the second pass starts with the symlink already in place
        report = await pair.apply()
        assert [n for n, _ in report.errors] == ["a/x"]
    assert list(outside.iterdir()) == []
    assert os.readlink(pair.dst / "a") == str(outside) and (pair.dst / "f").read_bytes() == data


async def test_a_symlink_in_the_way_is_replaced_not_followed(pair: SyncPair, tmp_path: Path):
    make_tree(pair.src, large=MiB)
    outside = tmp_path / "outside"
    outside.mkdir()
    pair.dst.mkdir()
    os.symlink(outside, pair.dst / "a")  # where the source has a directory
    os.symlink(outside / "victim", pair.dst / "zero")  # where the source has a file
    report = await pair.sync()
    assert report.ok, report.errors
    assert list(outside.iterdir()) == []
    assert_same_tree(pair.src, pair.dst)


async def test_symlink_swapped_in_during_apply_is_detected(pair: SyncPair, tmp_path: Path):
    (pair.src / "sub").mkdir()
    (pair.src / "sub/data.bin").write_bytes(os.urandom(3 * MiB))
    await pair.scan()
    await pair.publish()
    pair.dst.mkdir()
    (pair.dst / "sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    provider = pair.provider
    swapped = False

    async def swapping_fetch(h: bytes, size: int) -> bytes:
        nonlocal swapped
        if not swapped:  # an attacker on the receiver swaps the directory for a symlink mid-write
            swapped = True
            os.rename(pair.dst / "sub", tmp_path / "sub-moved")
            os.symlink(outside, pair.dst / "sub")
        return await provider(h, size)

    pair.provider = swapping_fetch  # type: ignore[assignment]
    report = await pair.apply()
    assert swapped
    errors = dict(report.errors)
    assert "was replaced while it was written" in errors["sub/data.bin"]
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "sub-moved/data.bin").exists()  # what went into the moved directory is removed


async def test_allowed_roots(pair: SyncPair, tmp_path: Path):
    with pytest.raises(NotAllowed, match="sync.allowed_roots"):
        check_allowed("app", "/srv/app", ["/data"])
    with pytest.raises(NotAllowed, match="none configured"):
        check_allowed("app", "/srv/app", [])
    assert check_allowed("app", str(tmp_path / "x"), [str(tmp_path)]) == os.path.realpath(tmp_path / "x")
    (tmp_path / "elsewhere").mkdir()
    os.symlink("/", tmp_path / "link")
    with pytest.raises(NotAllowed):  # a symlinked target path that leads out is judged by where it leads
        check_allowed("app", str(tmp_path / "link/etc"), [str(tmp_path)])
    await pair.scan()
    await pair.publish()
    with pytest.raises(NotAllowed, match="target_path"):
        from p2pnode.sync.apply import sync_folder

        await sync_folder(pair.dst_db, pair.dst_repo, pair.folder, pair.folder.nodes[0], pair.provider, allowed_roots=["/nonexistent"])
    assert not pair.dst.exists()


@pytest.fixture
def small_disk(pair: SyncPair):
    """The receiver's target is a 4 MiB tmpfs (unmounted after the test)."""
    if not ROOT:
        pytest.skip("mounts a small tmpfs (needs root)")
    pair.dst.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(pair.dst)], check=True)
    try:
        yield pair.dst
    finally:
        subprocess.run(["umount", str(pair.dst)], check=True)


def assert_only_complete_files(pair: SyncPair) -> None:
    assert temps(pair.dst) == []
    for p in pair.dst.rglob("*"):
        if p.name != "filler":
            assert p.read_bytes() == (pair.src / p.relative_to(pair.dst)).read_bytes()


async def test_disk_full_before_writing(pair: SyncPair, small_disk: Path):
    (pair.src / "fits.txt").write_text("small")
    (pair.src / "big.bin").write_bytes(os.urandom(6 * MiB))
    with pytest.raises(DiskFull, match="not enough space left on device: needs 6291456 more bytes"):
        await pair.sync()
    assert_only_complete_files(pair)
    assert not (pair.dst / "big.bin").exists()


async def test_disk_full_while_writing(pair: SyncPair, small_disk: Path):
    (pair.src / "big.bin").write_bytes(os.urandom(2 * MiB))
    provider = pair.provider

    async def fetch_while_something_else_fills_the_disk(h: bytes, size: int) -> bytes:
        if not (small_disk / "filler").exists():
            try:
                (small_disk / "filler").write_bytes(bytes(4 * MiB))
            except OSError:
                pass  # full: that was the point
        return await provider(h, size)

    pair.provider = fetch_while_something_else_fills_the_disk  # type: ignore[assignment]
    with pytest.raises(DiskFull, match="no space left on device"):
        await pair.sync()
    assert_only_complete_files(pair)
    assert not (pair.dst / "big.bin").exists()
    assert await pair.dst_db.read(lambda c: pair.dst_repo.partial(c, "app", "big.bin")) is None


async def test_kill_9_mid_file_resumes_with_the_blocks_already_written(pair: SyncPair):
    (pair.src / "big.bin").write_bytes(os.urandom(32 * MiB))  # 256 blocks of 128 KiB
    await pair.scan()
    await pair.publish()
    config = pair.base / "folder.cbor"
    config.write_bytes(codec.encode(pair.folder.to_dict()))
    child = await trio.lowlevel.open_process(
        [sys.executable, str(Path(__file__).parent / "synckit.py"), str(pair.base), str(config), "100"], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        out = b""
        with trio.fail_after(60):
            while b"fetched 100\n" not in out:
                more = await child.stdout.receive_some()
                assert more, "the child exited before it fetched 100 blocks"
                out += more
            # the child now waits for blocks that never come; kill it once its resume state has the
            # blocks it wrote (saved every 32 blocks of 128 KiB: 96 of the 100)
            while True:
                partial = await pair.dst_db.read(lambda c: pair.dst_repo.partial(c, "app", "big.bin"))
                if partial is not None and len(partial.done) >= 96:
                    break
                await trio.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert temps(pair.dst) == [".p2psync.big.bin.tmp"]
    report = await pair.apply()
    assert report.ok, report.errors
    assert report.blocks_resumed >= 96
    assert report.blocks_fetched == 256 - report.blocks_resumed
    assert_same_tree(pair.src, pair.dst)


async def test_content_id_distinguishes_types():
    f = FileEntry("x", FILE, 1, 0, 0o644, 0, 0, 0, False, 131072, b"")
    assert content_id(f) != content_id(FileEntry("x", "symlink", 1, target="t"))


def test_blocks_of_a_file_still_being_written_are_served_never_through_a_symlink(tmp_path: Path):
    """What a receiver has written to a temporary file is served to the others (swarming); the
    temporary name is opened by the same walk as any other, no symlink followed."""
    import hashlib

    from p2pnode.platform.blocks import VerifiedBlock
    from p2pnode.sync.blockstore import read_verified
    from p2pnode.sync.index_db import BlockLocation

    root, elsewhere = tmp_path / "target", tmp_path / "elsewhere"
    (root / "d").mkdir(parents=True)
    elsewhere.mkdir()
    data = os.urandom(1000)
    digest = hashlib.sha256(data).digest()
    temp = f"{names.TEMP_PREFIX}f{names.TEMP_SUFFIX}"
    for d in (root / "d", elsewhere):
        (d / temp).write_bytes(b"x" * 10 + data)
    (root / "link").symlink_to(elsewhere)
    (root / "d" / f"{names.TEMP_PREFIX}g{names.TEMP_SUFFIX}").symlink_to(root / "d" / temp)

    def read(name: str) -> bytes | None:
        return read_verified([(BlockLocation("f", name, 10, 1000), str(root))], digest, temp=True)

    got = read(f"d/{temp}")
    assert got == data and isinstance(got, VerifiedBlock) and got.digest == digest
    assert read(f"link/{temp}") is None  # a symlinked directory on the way
    assert read(f"d/{names.TEMP_PREFIX}g{names.TEMP_SUFFIX}") is None  # the temporary name is a symlink
    assert read(f"../elsewhere/{temp}") is None
