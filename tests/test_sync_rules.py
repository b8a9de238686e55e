"""Ignore rules and node filters, block hashing, and the pure planner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.sync.blocks import RACY_NS, Hashed, HashFailure, Hasher, HashJob, HashOutcome, block_size_for, digest, zero_hash
from p2pnode.sync.ignore import IgnoreRules, NodeFilter, read_ignore_file
from p2pnode.sync.index_db import AppliedState, BlockLocation, content_id
from p2pnode.sync.model import DIR, FILE, OVERLAY, SYMLINK, FileEntry
from p2pnode.sync.planner import LocalState, PlanOptions, plan

# -- ignore rules ---------------------------------------------------------------------------------------


def test_default_rules():
    r = IgnoreRules.build(defaults=True)
    assert r.ignored(".git", True) and r.ignored("sub/module/.git", True)
    assert r.ignored("runtime", True) and r.ignored("tmp", True)
    assert not r.ignored("src/runtime", True) and not r.ignored("pkg/tmp", True)
    assert not r.ignored(".gitignore", False) and not r.ignored("runtime", False)  # a *file* named runtime is kept
    assert r.ignored_path("a/.p2psync.x.tmp", False)  # our temp files, always (a listing drops them first)
    assert not IgnoreRules.build(defaults=False).ignored(".git", True)


def test_patterns_file_and_negation():
    r = IgnoreRules.build(defaults=True, patterns=("*.log", "!keep.log"), file_text="node_modules/\n\n# c\n[z-a]bad\n/build/\n")
    assert r.ignored("x.log", False) and r.ignored("deep/x.log", False) and not r.ignored("keep.log", False)
    assert r.ignored("node_modules", True) and r.ignored("web/node_modules", True)
    assert r.ignored("build", True) and not r.ignored("src/build", True)
    assert r.ignored_path("web/node_modules/pkg/index.js", False)


def test_node_filter():
    everything = NodeFilter()
    assert everything.everything and everything.wants("anything", False)
    f = NodeFilter(include=("dist/", "README*"), exclude=("dist/maps/", "*.map"))
    assert f.wants("dist", True) and f.wants("dist/app.js", False) and f.wants("dist/sub/x", False)
    assert f.wants("README.md", False) and not f.wants("src/app.py", False)
    assert not f.wants("dist/maps", True) and not f.wants("dist/maps/a.js", False) and not f.wants("dist/app.js.map", False)


def test_ignore_file_is_not_read_through_a_symlink(tmp_path: Path):
    (tmp_path / "real").write_text("secret/\n")
    os.symlink(tmp_path / "real", tmp_path / "sync.ignore")
    assert read_ignore_file(str(tmp_path), "sync.ignore") is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/i").write_text("x\n")
    assert read_ignore_file(str(tmp_path), "sub/i") == "x\n"
    assert read_ignore_file(str(tmp_path), "missing") is None


# -- hashing --------------------------------------------------------------------------------------------


async def test_hasher_matches_hashlib_for_every_size(tmp_path: Path):
    sizes = [0, 1, 128 * 1024, 128 * 1024 + 1, 300_000, 33 * 1024 * 1024] + [i * 997 for i in range(200)]
    jobs = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(size))
        jobs.append((HashJob(f"f{i}", str(p)), size))
    jobs.append((HashJob("missing", str(tmp_path / "missing")), 10))
    os.symlink("f1", tmp_path / "link")
    jobs.append((HashJob("link", str(tmp_path / "link")), 10))
    results: dict[str, HashOutcome] = {}
    hasher = Hasher(workers=3)
    for _ in range(5):  # files written less than RACY_NS ago are "racy": hashed again once quiet
        await hasher.hash_many(jobs, lambda r: results.__setitem__(r.name, r))
        jobs = [(j, n) for j, n in jobs if isinstance(results[j.name], HashFailure) and results[j.name].racy]
        if not jobs:
            break
        await trio.sleep(RACY_NS / 1e9)
    for i, size in enumerate(sizes):
        r = results[f"f{i}"]
        assert isinstance(r, Hashed)
        data = (tmp_path / f"f{i}").read_bytes()
        bs = block_size_for(size)
        assert r.block_size == bs and r.sig.size == size
        assert r.blocks == b"".join(digest(data[o : o + bs]) for o in range(0, size, bs))
    missing = results["missing"]
    assert isinstance(missing, HashFailure) and missing.vanished
    link = results["link"]
    assert isinstance(link, HashFailure) and "symlink" in link.reason
    assert hasher.files_hashed == len(sizes)


# -- the planner (pure) ---------------------------------------------------------------------------------


def fe(name: str, kind: str = FILE, data: bytes = b"x", seq: int = 1, mode: int = 0o644, mtime: int = 5, target: str = "") -> FileEntry:
    if kind != FILE:
        return FileEntry(name, kind, seq, 0, mode, mtime, 0, 0, target=target)
    bs = block_size_for(len(data))
    blocks = b"".join(digest(data[o : o + bs]) for o in range(0, len(data), bs))
    return FileEntry(name, FILE, seq, len(data), mode, mtime, 0, 0, False, bs, blocks)


def ls(kind: str = FILE, size: int = 1, mode: int = 0o644, mtime: int = 5, ino: int = 1, target: str = "") -> LocalState:
    return LocalState(kind, size, mode, mtime, 100, ino, 0, 0, target)


def was(e: FileEntry, st: LocalState) -> AppliedState:
    return AppliedState(e.type, e.seq, st.size, st.mtime_ns, st.ctime_ns, st.ino, content_id(e))


def test_plan_for_an_empty_target_orders_work():
    desired = [fe("a", DIR), fe("a/b", DIR), fe("a/b/f", data=b"hello"), fe("a/l", SYMLINK, target="b/f"), fe("z")]
    p = plan(desired, {}, {})
    assert [d.entry.name for d in p.dirs] == ["a", "a/b"]
    assert [f.entry.name for f in p.files] == ["a/b/f", "z"]
    assert [s.entry.name for s in p.symlinks] == ["a/l"]
    assert [m.entry.name for m in p.dir_meta] == ["a/b", "a"]  # deepest first, after content
    assert p.fetch_bytes == 6 and not p.deletes


def test_plan_blocks_zero_copy_fetch():
    data = os.urandom(128 * 1024) + bytes(128 * 1024) + os.urandom(1000)
    e = fe("f", data=data)
    h0 = e.block_hash(0)
    here = BlockLocation("other-folder", "x", 0, 128 * 1024)
    p = plan([e], {}, {}, locate=lambda h: [here] if h == h0 else [])
    b0, b1, b2 = p.files[0].block_plans()
    assert b0.copy_from == (here,) and not b0.fetch
    assert b1.zero and b1.hash == zero_hash(128 * 1024) and not b1.fetch
    assert b2.fetch and b2.size == 1000
    assert p.fetch_bytes == 1000


def test_clean_local_file_needs_nothing_but_edits_are_reverted():
    e = fe("f", data=b"abc", mtime=7)
    st = ls(size=3, mtime=7)
    assert plan([e], {"f": st}, {"f": was(e, st)}).empty
    edited = ls(size=3, mtime=9, ino=2)
    p = plan([e], {"f": edited}, {"f": was(e, st)})
    assert p.files[0].local_edit and p.files[0].existing
    chmodded = LocalState(FILE, 3, 0o600, 7, 200, 1, 0, 0)  # ctime moved
    assert plan([e], {"f": chmodded}, {"f": was(e, st)}).files[0].existing
    unknown = plan([e], {"f": st}, {})  # a file we never wrote: read it first
    assert unknown.files[0].existing and not unknown.files[0].local_edit


def test_metadata_only_changes():
    e = fe("f", data=b"abc", mode=0o755, mtime=7)
    st = ls(size=3, mode=0o644, mtime=7)
    p = plan([e], {"f": st}, {"f": was(e, st)})
    assert not p.files and p.meta[0].mode == 0o755
    assert plan([e], {"f": st}, {"f": was(e, st)}, options=PlanOptions(ignore_permissions=True)).empty
    owned = plan([e], {"f": st}, {"f": was(e, st)}, options=PlanOptions(as_root=True))
    assert owned.meta[0].owner == (0, 0)
    setuid = fe("s", data=b"abc", mode=0o4755)
    assert plan([setuid], {}, {}).files[0].mode == 0o755  # setuid/setgid/sticky are not reproduced


def test_mirror_deletes_overlay_does_not():
    desired = [fe("keep"), FileEntry("gone", FILE, 3, deleted=True)]
    local = {"keep": ls(), "gone": ls(), "extra": ls(), "dir": ls(DIR), "dir/inner": ls(), "runtime": ls(DIR), "runtime/x": ls()}
    rules_default = IgnoreRules.build(defaults=True)
    mirror = plan(desired, local, {}, rules=rules_default)
    assert [d.name for d in mirror.deletes] == ["dir/inner", "dir", "extra", "gone"]
    overlay = plan(desired, local, {}, options=PlanOptions(strategy=OVERLAY), rules=rules_default)
    assert not overlay.deletes


def test_type_changes():
    desired = [fe("was-dir"), fe("was-file", DIR), fe("was-link")]
    local = {"was-dir": ls(DIR), "was-dir/x": ls(), "was-file": ls(), "was-link": ls(SYMLINK, target="/etc")}
    p = plan(desired, local, {})
    assert {f.entry.name: f.replace for f in p.files} == {"was-dir": DIR, "was-link": SYMLINK}
    assert p.dirs[0].replace == FILE
    assert not p.deletes  # was-dir/x goes with its directory
    overlay = plan(desired, local, {}, options=PlanOptions(strategy=OVERLAY))
    assert [s.name for s in overlay.skipped] == ["was-dir"]


def test_case_insensitive_target_skips_collisions():
    p = plan([fe("README"), fe("readme")], {}, {}, options=PlanOptions(case_insensitive=True))
    assert [f.entry.name for f in p.files] == ["README"]
    assert "only by case" in p.skipped[0].reason


def test_include_keeps_the_directories_above():
    desired = [fe("dist", DIR), fe("dist/js", DIR), fe("dist/js/app.js"), fe("src", DIR), fe("src/a.py")]
    p = plan(desired, {"src": ls(DIR), "src/local": ls()}, {}, node_filter=NodeFilter(include=("dist/js/*.js",)))
    assert [d.entry.name for d in p.dirs] == ["dist", "dist/js"]
    assert [f.entry.name for f in p.files] == ["dist/js/app.js"]
    assert not p.deletes  # src is not this node's business


PATTERN_SETS = [
    (".git/", "/runtime/", "/tmp/"),
    ("*.log", "node_modules/", "/build/", "docs/**/*.pdf", "a?c", "[ab]*.tmp", "**/cache", "foo/**/bar"),
    ("*.log", "!keep.log", "dir/", "!dir/sub/"),  # negations: the pathspec path
]


@pytest.mark.parametrize("patterns", PATTERN_SETS)
@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(["a", "b", "abc", "x.log", "keep.log", "node_modules", "build", "docs", "f.pdf", "cache", "bar", "foo",
                              ".git", "runtime", "tmp", "dir", "sub", "at.tmp", "z"]), min_size=1, max_size=5),
    st.booleans(),
)
def test_fast_ignore_matches_pathspec(patterns: tuple[str, ...], parts: list[str], is_dir: bool):
    import pathspec

    name = "/".join(parts)
    spec = pathspec.GitIgnoreSpec.from_lines(list(patterns))
    assert IgnoreRules(patterns).ignored(name, is_dir) == spec.match_file(name + "/" if is_dir else name)
