"""Sync values at the edge: names, file entries, index chunks and folder configs decode only when
valid, with errors that name the field; hypothesis for the decoders."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode import codec, timefmt
from p2pnode.errors import DecodeError
from p2pnode.identity import KeyPair
from p2pnode.sync import names
from p2pnode.sync.blocks import HASH_LEN, MAX_BLOCK, MIN_BLOCK, block_count, block_size_for
from p2pnode.sync.model import (
    MAX_CHUNK_BYTES,
    FileEntry,
    FolderConfig,
    IndexChunk,
    NodeTarget,
    RetryPolicy,
    build_chunks,
)

PEERS = [KeyPair.generate().peer_id for _ in range(3)]

# -- names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["", "/abs", "a/../b", "..", ".", "a//b", "a/", "a/./b", "x\x00y", "e\u0301", "a/" + "x" * 256, "a/.p2psync.b.tmp", "\udcff"],
)
def test_bad_names(bad: str):
    with pytest.raises(names.BadName):
        names.validate(bad)


def test_normalize_and_collisions():
    assert names.normalize("cafe\u0301/x") == "café/x"
    assert names.child("", "cafe\u0301") == "café"
    assert names.child("dir", "plain") == "dir/plain"
    assert names.ancestors("a/b/c") == ["a", "a/b"] and names.parent("a/b/c") == "a/b" and names.parent("a") == ""
    assert names.find_collisions(["README", "readme", "Readme", "other", "ß", "SS"]) == {"README": ["readme", "Readme"], "ß": ["SS"]}


@given(st.text(max_size=80))
def test_normalize_gives_safe_names_or_refuses(text: str):
    try:
        name = names.normalize(text)
    except names.BadName:
        return
    assert not name.startswith("/") and "\x00" not in name
    assert all(part not in ("", ".", "..") for part in name.split("/"))
    assert unicodedata.is_normalized("NFC", name)
    assert names.validate(name) == name


@given(st.text(min_size=1, max_size=40).filter(lambda t: "/" not in t))
def test_child_matches_normalize(component: str):
    try:
        expected = names.normalize("dir/" + component)
    except names.BadName:
        with pytest.raises(names.BadName):
            names.child("dir", component)
        return
    assert names.child("dir", component) == expected


# -- file entries and chunks ----------------------------------------------------------------------------


def file_entry(name: str = "f", size: int = 1000, seq: int = 1) -> FileEntry:
    bs = block_size_for(size)
    return FileEntry(name, "file", seq, size, 0o644, 123, 1000, 1000, False, bs, bytes(HASH_LEN) * block_count(size, bs))


def test_block_size_rule():
    assert block_size_for(0) == MIN_BLOCK and block_size_for(32 * 2**20) == MIN_BLOCK
    assert block_size_for(32 * 2**20 + 1) == 2 * MIN_BLOCK
    assert block_size_for(2**30) == MAX_BLOCK and block_count(2**30, MAX_BLOCK) == 256
    assert block_size_for(10 * 2**30) == MAX_BLOCK and block_count(10 * 2**30, MAX_BLOCK) == 2560  # larger files: more blocks


entries = st.one_of(
    st.builds(file_entry, st.sampled_from(["a", "b/c", "é x"]), st.integers(0, 3_000_000), st.integers(1, 2**40)),
    st.builds(lambda n, s: FileEntry(n, "dir", s, mode=0o755, mtime_ns=-5), st.sampled_from(["d", "d/e"]), st.integers(1, 99)),
    st.builds(lambda t, s: FileEntry("l", "symlink", s, mode=0o777, target=t), st.text(min_size=1, max_size=30).filter(lambda t: "\x00" not in t and t.encode("utf-8", "ignore") == t.encode("utf-8", "surrogatepass")), st.integers(1, 99)),
    st.builds(lambda s: FileEntry("gone", "file", s, mtime_ns=9, deleted=True), st.integers(1, 99)),
)


@given(entries)
def test_entry_roundtrip(entry: FileEntry):
    assert FileEntry.from_dict(codec.decode(codec.encode(entry.to_dict()))) == entry


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)
entry_keys = ["name", "type", "seq", "size", "mode", "mtime_ns", "uid", "gid", "deleted", "block_size", "blocks", "target"]


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(entry_keys), cbor_values, max_size=12))
def test_entry_from_garbage_raises_decode_error_only(raw: dict):
    try:
        FileEntry.from_dict(raw)
    except DecodeError:
        pass


@settings(max_examples=200)
@given(cbor_values)
def test_chunk_from_garbage_raises_decode_error_only(raw: object):
    try:
        IndexChunk.from_bytes(codec.encode(raw))
    except DecodeError:
        pass


@pytest.mark.parametrize(
    "change,field",
    [
        ({"type": "fifo"}, "type"),
        ({"seq": 0}, "seq"),
        ({"mode": 0o10000}, "mode"),
        ({"block_size": 4096}, "block_size"),
        ({"blocks": b"short"}, "blocks"),
        ({"size": -1}, "size"),
        ({"uid": 2**32}, "uid"),
        ({"name": "../x"}, "name"),
    ],
)
def test_entry_errors_name_the_field(change: dict, field: str):
    raw = {**file_entry().to_dict(), **change}
    with pytest.raises(DecodeError, match=field):
        FileEntry.from_dict(raw)


def test_chunk_rules():
    e1, e2 = file_entry("a", seq=5), file_entry("b", seq=7)
    chunk = IndexChunk("app", 42, 4, 7, (e1, e2))
    assert IndexChunk.from_bytes(chunk.to_bytes()) == chunk
    for bad, match in [
        (IndexChunk("app", 42, 5, 7, (e1, e2)), "outside"),
        (IndexChunk("app", 42, 4, 6, (e1, e2)), "outside"),
        (IndexChunk("app", 42, 4, 7, (e1, file_entry("a", seq=6))), "twice"),
        (IndexChunk("app", 0, 4, 7, (e1,)), "index_id"),
        (IndexChunk("app", 42, 7, 7, ()), "seq"),
        (IndexChunk("bad id!", 42, 4, 7, (e1,)), "folder id"),
    ]:
        with pytest.raises(DecodeError, match=match):
            IndexChunk.from_bytes(codec.encode(bad.to_dict()))
    with pytest.raises(DecodeError, match="more than"):
        IndexChunk.from_bytes(bytes(MAX_CHUNK_BYTES + 1))


def test_build_chunks_splits_under_the_limit_and_chains():
    big = [file_entry(f"dir/file-{i:05d}", size=2**30, seq=10 + i) for i in range(200)]  # 256 hashes each: ~8.5 KB
    chunks = list(build_chunks("app", 9, 9, big, max_bytes=256 * 1024))
    assert len(chunks) > 5
    assert [e for c in chunks for e in c.entries] == big
    assert chunks[0].prev_seq == 9 and chunks[-1].seq == big[-1].seq
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.prev_seq == prev.seq
    for c in chunks:
        data = c.to_bytes()
        assert len(data) <= 256 * 1024
        assert IndexChunk.from_bytes(data) == c
    full = list(build_chunks("app", 9, 9, big))
    assert all(len(c.to_bytes()) <= MAX_CHUNK_BYTES for c in full)


# -- folder config ----------------------------------------------------------------------------------------


def folder(**kw: object) -> FolderConfig:
    base: dict = dict(
        id="web-app",
        source=PEERS[0],
        source_path="/srv/src",
        nodes=(NodeTarget(PEERS[1], "/srv/app"), NodeTarget(PEERS[2], "/srv/app", "overlay", ("dist/**",), (".git/**",))),
        issued_at_ns=timefmt.parse_ns("2026-11-25T10:00:00.000000001Z"),
        max_parallel_nodes=2,
        ignore_patterns=("node_modules/**", "*.log"),
        ignore_file="sync.ignore",
        ignore_permissions=True,
        retry=RetryPolicy(7, 1.0, 60.0, 0.25),
        post_sync=("systemctl", "reload", "app"),
    )
    base.update(kw)
    return FolderConfig(**base)  # type: ignore[arg-type]


def test_folder_roundtrip():
    f = folder()
    assert FolderConfig.from_dict(codec.decode(codec.encode(f.to_dict()))) == f
    minimal = {"id": "x", "source": str(PEERS[0]), "source_path": "/s", "nodes": [], "issued_at": "2026-01-01T00:00:00Z"}
    g = FolderConfig.from_dict(minimal)
    assert g.ignore_defaults and g.max_parallel_nodes == 1 and g.retry == RetryPolicy() and g.post_sync == ()


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("id",), "has space", "folder id"),
        (("source",), "nonsense", "source"),
        (("source_path",), "relative/dir", "source_path"),
        (("nodes", 0, "target_path"), "/srv/../etc", "target_path"),
        (("nodes", 0, "strategy"), "sync", "strategy"),
        (("nodes", 1, "node_id"), None, "node_id"),
        (("nodes", 1, "include"), ["\\"], "include"),
        (("ignore_patterns",), ["ok", "[z-a]"], "ignore_patterns"),
        (("ignore_file",), "../outside", "ignore_file"),
        (("max_parallel_nodes",), 0, "max_parallel_nodes"),
        (("retry", "max_attempts"), 0, "max_attempts"),
        (("retry", "backoff_cap_s"), 0.5, "backoff"),
        (("post_sync",), [""], "post_sync"),
        (("issued_at",), "yesterday", "issued_at"),
    ],
)
def test_folder_errors_name_the_field(path: tuple, value: object, match: str):
    raw = folder().to_dict()
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(DecodeError, match=match):
        FolderConfig.from_dict(raw)


def test_folder_nodes_rules():
    raw = folder().to_dict()
    raw["nodes"].append(dict(raw["nodes"][0]))
    with pytest.raises(DecodeError, match="listed twice"):
        FolderConfig.from_dict(raw)
    raw = folder(nodes=(NodeTarget(PEERS[0], "/srv/app"),)).to_dict()
    with pytest.raises(DecodeError, match="source cannot also be a receiver"):
        FolderConfig.from_dict(raw)
    assert folder().node(PEERS[2]).strategy == "overlay" and folder().node(KeyPair.generate().peer_id) is None


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(list(folder().to_dict())), cbor_values, max_size=14))
def test_folder_from_garbage_raises_decode_error_only(raw: dict):
    try:
        FolderConfig.from_dict(raw)
    except DecodeError:
        pass


def test_retry_delay_is_exponential_capped_and_jittered():
    r = RetryPolicy(max_attempts=5, backoff_base_s=2.0, backoff_cap_s=30.0, jitter=0.5)
    assert [r.delay(a, 0.0) for a in (1, 2, 3, 4, 5, 6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert r.delay(3, 0.999) == pytest.approx(8.0 * 0.5005)
    assert r.delay(10_000, 0.0) == 30.0
